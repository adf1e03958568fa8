"""Peak RSS and peak disk of smoothing 512 frames vs 64 frames at the same resolution (fast mode, window 15):
both ratios should be ≤ 1.2. Runs `diffsynth smooth` in a subprocess for each length.

Peak disk is the largest total size of the smoothing stage's FastBlend tables seen while it runs (sampled every
50 ms): that is what grows with the video when tables are never deleted. The decoded frames and the smoothed output
grow with the video by nature and are reported separately. Writes bench/results/fastblend_scale.json.
"""

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.demo import write_synthetic_clip  # noqa: E402

SIZE = (48, 48)
SETTINGS = ["--mode", "fast", "--window-size", "15", "--minimum-patch-size", "3", "--num-iter", "2"]
MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def folder_bytes(folder, pattern):
    total = 0
    for path in folder.glob(pattern):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def measure(folder, num_frames):
    guide = write_synthetic_clip(folder / f"guide{num_frames}.mp4", num_frames=num_frames, width=SIZE[0],
                                 height=SIZE[1], fps=24, audio=False)
    run_dir = folder / f"run{num_frames}"
    command = [sys.executable, "-m", "diffsynth", "smooth", "--guide", str(guide), "--style", str(guide),
               "-o", str(folder / f"out{num_frames}.mp4"), "--run-dir", str(run_dir), "--no-progress", *SETTINGS]
    peak = {"tables": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["tables"] = max(peak["tables"], folder_bytes(run_dir, "cache/smooth/table/**/*"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.time()
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, cwd=REPO)
    done.set()
    sampler.join()
    code, peak_kib = out.stdout.split()
    assert code == "0", out.stderr[-2000:]
    return {"frames": num_frames, "peak_rss_mib": round(int(peak_kib) / 1024, 1),
            "peak_table_bytes": peak["tables"], "seconds": round(time.time() - started, 1),
            "frames_bytes": folder_bytes(run_dir, "cache/**/*") - 0}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        small = measure(Path(tmp), 64)
        large = measure(Path(tmp), 512)
    rss_ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    disk_ratio = large["peak_table_bytes"] / max(small["peak_table_bytes"], 1)
    print(f"smoothing at {SIZE[0]}×{SIZE[1]}, fast mode, window 15:")
    for r in (small, large):
        print(f"  {r['frames']:>4} frames: peak RSS {r['peak_rss_mib']:.0f} MiB, peak tables on disk "
              f"{r['peak_table_bytes'] / 1e6:.2f} MB, {r['seconds']:.0f} s")
    print(f"ratios 512/64: RSS {rss_ratio:.3f}, table disk {disk_ratio:.3f} (targets ≤ 1.2) "
          f"{'OK' if max(rss_ratio, disk_ratio) <= 1.2 else 'OVER TARGET'}")
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "fastblend_scale.json").write_text(json.dumps(
        {"size": SIZE, "runs": [small, large], "rss_ratio": round(rss_ratio, 3),
         "table_disk_ratio": round(disk_ratio, 3), "target": 1.2}, indent=2))


if __name__ == "__main__":
    main()
