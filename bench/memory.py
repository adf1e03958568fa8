"""Peak RSS of a render at 1024 frames divided by the same at 64 frames (same small resolution): target ≤ 1.05.

Each render runs in its own process (tiny models, 64×64, one denoising step, a tile ControlNet), measured with
getrusage of that process alone. Writes bench/results/memory.json.
"""

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

MEASURE = """
import resource, subprocess, sys
code = subprocess.run([sys.executable, "-m", "diffsynth", "render", sys.argv[1], "--no-progress"],
                      stdout=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def render_peak_rss(folder, clip, num_frames):
    models = ensure_demo_assets() / "models"
    config = {
        "models": {"model_list": [str(models / "stable_diffusion"), str(models / "motion_adapter")],
                   "controlnet_units": [{"processor_id": "tile", "model_path": str(models / "controlnet_tile"),
                                         "scale": 0.5}], "device": "cpu"},
        "data": {"input_frames": {"video_file": str(clip), "width": 64, "height": 64, "end_frame_id": num_frames},
                 "output_folder": str(folder / f"run{num_frames}")},
        "pipeline": {"pipeline_inputs": {"prompt": "toon", "num_inference_steps": 1, "animatediff_batch_size": 16,
                                         "animatediff_stride": 8, "controlnet_batch_size": 32}},
    }
    path = folder / f"config{num_frames}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.time()
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, cwd=REPO)
    code, peak_kib = out.stdout.split()
    assert code == "0", out.stderr[-2000:]
    return int(peak_kib) / 1024, time.time() - started


def main():
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = write_synthetic_clip(folder / "long.mp4", num_frames=1024, width=96, height=72)
        small_mib, small_s = render_peak_rss(folder, clip, 64)
        large_mib, large_s = render_peak_rss(folder, clip, 1024)
    ratio = large_mib / small_mib
    result = {"peak_rss_mib_64": round(small_mib, 1), "peak_rss_mib_1024": round(large_mib, 1),
              "ratio": round(ratio, 3), "target": 1.05, "seconds_64": round(small_s, 1),
              "seconds_1024": round(large_s, 1), "machine": f"{platform.machine()}, {platform.processor()}",
              "cpus": __import__("os").cpu_count()}
    print(f"peak RSS: 64 frames {small_mib:.0f} MiB, 1024 frames {large_mib:.0f} MiB, ratio {ratio:.3f} "
          f"(target ≤ 1.05) {'OK' if ratio <= 1.05 else 'OVER TARGET'}")
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
