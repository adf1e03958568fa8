"""Many workers: wall time of the CPU-bound stages (VAE decode and final FastBlend) on 1 and on N workers.

A 64-frame 256×256 render (tiny models, one denoising step, final smoothing) is made once; then, for each worker
count, a copy of its run folder forgets the VAE decode, final smoothing and encode stages and renders again, so
only those are computed. Every process runs torch on one thread (OMP_NUM_THREADS=1): the thread count is part of
a CPU result's fingerprint, and one thread per worker is what spreads work over the cores.

The time of a run is from its log's "vae_decode: … units to do" line (the workers already started, the models not
yet loaded) to the last final-smoothing unit's commit in the manifest. The outputs of every worker count must be
byte-identical. Prints the speed-up against --target (1.6 on two cores) and exits 1 below it.

    python bench/scale.py [--workers 2] [--frames 64] [--size 256]
"""

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.cache import RunCache  # noqa: E402
from diffsynth.demo import ensure_demo_assets, write_synthetic_clip  # noqa: E402

TIMED_STAGES = ("vae_decode", "smooth.final")
FORGOTTEN_STAGES = ("vae_decode", "smooth.final", "encode")


def bench_config(assets, clip, run_dir, frames, size, workers):
    models = assets / "models"
    return {
        "models": {"model_list": [str(models / "stable_diffusion"), str(models / "motion_adapter")],
                   "device": "cpu"},
        "data": {"input_frames": {"video_file": str(clip), "width": size, "height": size, "start_frame_id": 0,
                                  "end_frame_id": frames},
                 "output_folder": str(run_dir)},
        "pipeline": {"seed": 1, "pipeline_inputs": {
            "prompt": "a toon city", "num_inference_steps": 1, "animatediff_batch_size": 16,
            "animatediff_stride": 8, "unet_batch_size": 16, "smoother_progress_ids": [-1]}},
        "smoother_configs": [{"processor_type": "FastBlend", "config": {
            "inference_mode": "fast", "window_size": 3, "minimum_patch_size": 3, "num_iter": 2}}],
        "executor": {"workers": workers},
    }


def render(config_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "diffsynth", "render", str(config_path), "--no-progress",
                             "--force"], capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"render failed: {result.stderr[-2000:]}")
    return time.time() - started


def timed_span(run_dir):
    """Seconds from the start of the VAE decode (its "units to do" log line) to the last timed unit's commit."""
    start = None
    for line in (run_dir / "render.log").read_text().splitlines():
        if "stage vae_decode:" in line and "units to do" in line:
            start = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the last render's line
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    marks = ",".join("?" * len(TIMED_STAGES))
    end = db.execute(f"SELECT MAX(finished) FROM units WHERE stage IN ({marks})", TIMED_STAGES).fetchone()[0]
    db.close()
    return end - start


def outputs(run_dir):
    return (run_dir / "video.mp4").read_bytes(), sorted((p.name, p.read_bytes()) for p in (run_dir / "frames").glob("*.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--target", type=float, default=1.6)
    args = parser.parse_args()
    assets = ensure_demo_assets()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        clip = work / "clip.mp4"
        write_synthetic_clip(clip, num_frames=args.frames, width=args.size * 3 // 2, height=args.size * 3 // 2,
                             audio=False)
        base = work / "base"
        config = base.with_suffix(".yaml")
        config.write_text(yaml.safe_dump(bench_config(assets, clip, base, args.frames, args.size, 1)))
        print(f"rendering the base run ({args.frames} frames, {args.size}²) …", flush=True)
        render(config)
        results, reference = {}, None
        for workers in (1, args.workers):
            run_dir = work / f"workers{workers}"
            shutil.copytree(base, run_dir)
            cache = RunCache(run_dir)
            for stage in FORGOTTEN_STAGES:
                cache.reset_stage(stage)
            cache.close()
            config = run_dir.with_suffix(".yaml")
            config.write_text(yaml.safe_dump(bench_config(assets, clip, run_dir, args.frames, args.size, workers)))
            total = render(config)
            results[workers] = {"stages_s": round(timed_span(run_dir), 2), "render_s": round(total, 2)}
            print(f"{workers} worker(s): VAE decode + final smoothing {results[workers]['stages_s']:.1f} s "
                  f"(whole command {total:.1f} s)", flush=True)
            if reference is None:
                reference = outputs(run_dir)
            elif outputs(run_dir) != reference:
                sys.exit(f"{workers} workers gave different bytes than 1")
        speedup = results[1]["stages_s"] / results[args.workers]["stages_s"]
        print(f"speed-up with {args.workers} workers: {speedup:.2f}× (target ≥ {args.target}×); outputs identical")
        record = {"frames": args.frames, "size": args.size, "cores": os.cpu_count(), "workers": results,
                  "speedup": round(speedup, 3), "target": args.target, "identical": True}
        out = REPO / "bench" / "results" / "scale.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        return 0 if speedup >= args.target else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
