"""Peak RSS and peak disk of smoothing 512 frames vs 64 frames at the same resolution (fast mode, window 15):
both ratios should be ≤ 1.2. Runs `diffsynth smooth` in a subprocess for each length.

Peak disk is the largest total size of the smoothing stage's FastBlend tables seen while it runs (sampled every
50 ms): that is what grows with the video when tables are never deleted. The decoded frames and the smoothed output
grow with the video by nature and are reported separately. The style is not the guide: it is the guide's
pattern with a per-frame colour gain and bias and grain (a rendering that flickers), so patch matching and blending
do real work. The script also prints how much an O(N) leak of one frame per frame would add to the larger run's
RSS and whether that beats the 20 % margin (at 48×48 it does not: RSS here guards against leaks of the library
state; the table-disk ratio is what catches tables kept for the whole video). Writes
bench/results/fastblend_scale.json.
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

from fractions import Fraction  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402

from diffsynth.demo import synthetic_frame, write_synthetic_clip  # noqa: E402

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


def write_style_clip(path, num_frames, fps=24):
    """The guide's frames with a per-frame colour gain (0.8–1.2), bias (±20) and grain (σ 8): a flickering
    rendering of the same motion, deterministic."""
    with av.open(str(path), "w", format="mp4") as output:
        video = output.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        video.options = {"crf": "12"}
        for index in range(num_frames):
            rng = np.random.default_rng(index)
            frame = synthetic_frame(index, SIZE[0], SIZE[1]).astype(np.float32)
            frame = frame * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3) + rng.normal(0, 8, frame.shape)
            frame = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            for packet in video.encode(frame):
                output.mux(packet)
        for packet in video.encode():
            output.mux(packet)
    return path


def measure(folder, num_frames):
    guide = write_synthetic_clip(folder / f"guide{num_frames}.mp4", num_frames=num_frames, width=SIZE[0],
                                 height=SIZE[1], fps=24, audio=False)
    style = write_style_clip(folder / f"style{num_frames}.mp4", num_frames)
    run_dir = folder / f"run{num_frames}"
    command = [sys.executable, "-m", "diffsynth", "smooth", "--guide", str(guide), "--style", str(style),
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
    leak_mib = (large["frames"] - small["frames"]) * SIZE[0] * SIZE[1] * 3 / 2 ** 20
    margin_mib = 0.2 * small["peak_rss_mib"]
    print(f"an O(N) leak of one uint8 frame per frame would add {leak_mib:.1f} MiB against a margin of "
          f"{margin_mib:.0f} MiB: {'visible' if leak_mib > margin_mib else 'NOT visible in RSS at this size'}")
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "fastblend_scale.json").write_text(json.dumps(
        {"size": SIZE, "runs": [small, large], "rss_ratio": round(rss_ratio, 3),
         "table_disk_ratio": round(disk_ratio, 3), "target": 1.2, "style": "guide × gain + bias + grain",
         "frame_leak_mib": round(leak_mib, 1), "rss_margin_mib": round(margin_mib, 1)}, indent=2))
    return 0 if max(rss_ratio, disk_ratio) <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
