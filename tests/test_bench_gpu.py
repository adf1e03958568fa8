"""bench/gpu.py's CPU dry run (tiny sizes): the script that a lent GPU runs must work end to end before it is
spent on it. Checks the result file's figures and their consistency, not timings."""

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
    s = report["setup"]
    assert s["device"] == "cpu" and s["frames"] == 16
    for name in ("cached", "in_memory", "diffusers"):
        assert report[name] > 0, name
        seconds = report["seconds"][name]
        # Warm-up and loading are outside the timed steps, and the whole render holds all of them.
        assert report["load_seconds"][name] == seconds["load"] > 0
        assert seconds["warm_up"] > 0 and seconds["steady"] > 0
        assert seconds["whole_render"] >= seconds["load"] + seconds["warm_up"] + seconds["steady"] - 1e-6
        assert report[name] == s["frames"] * s["steps"] / seconds["steady"]
        assert name in report["mfu"] and report["mfu"][name] is None  # no fp16 peak known for a CPU
    assert report["original"] is None and "original" not in report["mfu"]  # never run with --cpu
    assert "gpu_idle_share" in report and report["gpu_idle_share"] is None  # measured on a GPU only
    flops = report["flops_per_frame_step"]
    # Counted per variant: ControlNet once per frame for ours, in every window for the original (windows 8 / 4:
    # inner frames in two), and a FreeNoise UNet call (only motion attention windowed) for diffusers.
    assert flops["original"] > flops["cached"] == flops["in_memory"] > flops["diffusers"] > 0
    assert report["unet_tflops"] > 0
    assert "missing or damaged" not in result.stderr  # the in-memory run reused its own units
