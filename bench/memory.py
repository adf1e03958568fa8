"""Peak RSS of a render at 240 frames divided by the same at 24 frames (same resolution): target ≤ 1.05.

Each render runs in its own process (tiny models, 256×256 from a 384×384 source, one denoising step, a tile
ControlNet, final FastBlend smoothing), measured with getrusage of that process alone.

The size is chosen so that the benchmark can fail: a render that kept every frame it stores in a list (an O(N)
leak) would hold 240 × 256 × 256 × 3 bytes ≈ 47 MB per image stage (crop, VAE decode, smoothed frames: ≈ 141 MB),
far above 5 % of the ~1.2 GB the libraries take. `--inject-leak` demonstrates it: the renders then keep a copy of
every frame the cache stores (diffsynth.cache.image_to_bytes wrapped before the stages import it), and the ratio
must come out over the target. The script prints the leak such a bug would add and the margin it has to beat.
Writes bench/results/memory.json (memory_leak_injected.json with --inject-leak).
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.demo import ensure_demo_assets, write_synthetic_clip  # noqa: E402

SIZE = 256
SMALL, LARGE = 24, 240
MEASURE = """
import resource, subprocess, sys
code = subprocess.run([sys.executable, "-c", sys.argv[2], sys.argv[1]], stdout=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
RENDER = "import sys; from diffsynth.cli import main; sys.exit(main(['render', sys.argv[1], '--no-progress']))"
LEAKY_RENDER = """
import sys
import numpy as np
import diffsynth.cache as cache
kept, store = [], cache.image_to_bytes
def leaky(array):  # the deliberate O(N) leak: every stored frame stays in memory
    kept.append(np.array(array))
    return store(array)
cache.image_to_bytes = leaky  # before the stages import it
from diffsynth.cli import main
sys.exit(main(['render', sys.argv[1], '--no-progress']))
"""


def render_peak_rss(folder, clip, num_frames, leak=False, size=SIZE):
    models = ensure_demo_assets() / "models"
    config = {
        "models": {"model_list": [str(models / "stable_diffusion"), str(models / "motion_adapter")],
                   "controlnet_units": [{"processor_id": "tile", "model_path": str(models / "controlnet_tile"),
                                         "scale": 0.5}], "device": "cpu"},
        "data": {"input_frames": {"video_file": str(clip), "width": size, "height": size,
                                  "end_frame_id": num_frames},
                 "output_folder": str(folder / f"run{num_frames}{'-leak' if leak else ''}")},
        "pipeline": {"pipeline_inputs": {"prompt": "toon", "num_inference_steps": 1, "animatediff_batch_size": 16,
                                         "animatediff_stride": 8, "controlnet_batch_size": 16,
                                         "smoother_progress_ids": [-1]}},
        "smoother_configs": [{"processor_type": "FastBlend", "config": {
            "inference_mode": "fast", "window_size": 2, "minimum_patch_size": 3, "num_iter": 1}}],
    }
    path = folder / f"config{num_frames}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.time()
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), LEAKY_RENDER if leak else RENDER],
                         capture_output=True, text=True, cwd=REPO)
    code, peak_kib = out.stdout.split()
    assert code == "0", out.stderr[-2000:]
    return int(peak_kib) / 1024, time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inject-leak", action="store_true", help="keep every stored frame in memory (the check "
                        "that this benchmark fails on an O(N) leak)")
    parser.add_argument("--size", type=int, default=SIZE, help="frame side in pixels (smaller: a smoke run only)")
    parser.add_argument("--frames", type=int, nargs=2, default=[SMALL, LARGE], metavar=("SMALL", "LARGE"))
    args = parser.parse_args()
    size, (small, large) = args.size, args.frames
    leak_mib = (large - small) * size * size * 3 * 3 / 2 ** 20  # three image stages: crop, VAE decode, smoothing
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = write_synthetic_clip(folder / "long.mp4", num_frames=large, width=size * 3 // 2,
                                    height=size * 3 // 2, audio=False)
        small_mib, small_s = render_peak_rss(folder, clip, small, args.inject_leak, size)
        large_mib, large_s = render_peak_rss(folder, clip, large, args.inject_leak, size)
    ratio = large_mib / small_mib
    ok = ratio <= 1.05
    result = {"size": size, "frames": [small, large], "leak_injected": args.inject_leak,
              f"peak_rss_mib_{small}": round(small_mib, 1), f"peak_rss_mib_{large}": round(large_mib, 1),
              "ratio": round(ratio, 3), "target": 1.05, "margin_mib": round(0.05 * small_mib, 1),
              "leak_of_every_frame_mib": round(leak_mib, 1), f"seconds_{small}": round(small_s, 1),
              f"seconds_{large}": round(large_s, 1), "machine": f"{platform.machine()}, {platform.processor()}",
              "cpus": __import__("os").cpu_count()}
    print(f"{size}×{size}{', leak injected' if args.inject_leak else ''}: peak RSS {small} frames "
          f"{small_mib:.0f} MiB, {large} frames {large_mib:.0f} MiB, ratio {ratio:.3f} (target ≤ 1.05) "
          f"{'OK' if ok else 'OVER TARGET'}; a leak of every stored frame would add ~{leak_mib:.0f} MiB, the "
          f"margin is {0.05 * small_mib:.0f} MiB")
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    name = "memory_leak_injected.json" if args.inject_leak else "memory.json"
    if (size, small, large) != (SIZE, SMALL, LARGE):
        name = name.replace(".json", f"_smoke_{size}px.json")  # not the benchmark's figures
    (REPO / "bench" / "results" / name).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
