"""bench/gpu.py's CPU dry run (tiny sizes): the script that a lent GPU runs must work end to end before it is
spent on it. Checks the result file's figures, not timings."""

import json
import subprocess
import sys

from helpers import REPO


def test_gpu_benchmark_dry_run_on_the_cpu(demo_assets, tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "bench/gpu.py", "--cpu", "--out", str(out)], capture_output=True,
                            text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["setup"]["device"] == "cpu" and report["setup"]["frames"] == 16
    for name in ("cached", "in_memory", "diffusers"):
        assert report[name] > 0, name
    assert report["unet_tflops"] > 0
    assert "missing or damaged" not in result.stderr  # the in-memory run reused its own units
