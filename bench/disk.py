"""Disk use of a render, in bytes per output pixel (frames × width × height): target ≤ 7.2 at the peak with the
`data.keep: resume` policy (issue 10: 3667 frames at 1280×768 in ≤ 26 GiB, beside the models).

A toon-like render (tiny models; tile + canny ControlNets; final FastBlend smoothing; 16 frames at 640×384 from a
960×576 source, i.e. a source 1.5× the output's size, as 1080p → 1280×768) runs once per `data.keep` policy the
config schema offers (read from the schema; before the schema had one, once with today's behaviour). While it
runs, a thread sums the sizes of every file in the run folder every 50 ms (temporary files included): the largest
sum is the peak; the sum after completion is what stays. Both are extrapolated to 3667 frames at 1280×768: the
cache, frames/ and the video scale with the output pixels (the window-bounded parts — FastBlend tables, one step's
ε — are counted as if they grew too, so this is pessimistic), the manifest with the frame count, and the rest (the
SQLite WAL, bounded by its checkpoints, the log, config.json) stays as measured. The target is judged on the
extrapolated bytes per output pixel; the measured ones are printed beside it.

Prints each policy's figures and its ratio to 7.2 bytes/pixel, with the stages holding the most bytes at the peak;
exits non-zero when the policy the target is for (resume, or today's behaviour when the schema has no policy) is
over it. Writes bench/results/disk.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.config import DataConfig  # noqa: E402
from diffsynth.demo import ensure_demo_assets, write_synthetic_clip  # noqa: E402

TARGET = 7.2  # bytes per output pixel
FULL_FRAMES, FULL_WIDTH, FULL_HEIGHT = 3667, 1280, 768
TARGET_POLICY = "resume"


def keep_policies():
    """The values `data.keep` may take, from the schema; [None] (today's behaviour) when it has no such field."""
    field = DataConfig.model_fields.get("keep")
    if field is None:
        return [None]
    values = []
    for arg in [field.annotation, *typing.get_args(field.annotation)]:
        if typing.get_origin(arg) is typing.Literal:
            values += [v for v in typing.get_args(arg) if v not in values]
    return values or [field.default]


def folder_sizes(run_dir):
    """{part → bytes}: cache/<stage> per stage, frames, video.mp4, manifest.sqlite and the rest (WAL, log, config)."""
    sizes = {}
    for root, _, files in os.walk(run_dir):
        relative = Path(root).relative_to(run_dir).parts
        part = "/".join(relative[:2]) if relative[:1] == ("cache",) else (relative[0] if relative else None)
        for name in files:
            try:
                size = os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # released or renamed meanwhile
                continue
            key = part or (name if name in ("video.mp4", "manifest.sqlite") else "WAL, log, config")
            sizes[key] = sizes.get(key, 0) + size
    return sizes


def extrapolate(parts, frames, width, height):
    """Bytes at FULL_FRAMES frames of FULL_WIDTH × FULL_HEIGHT from the parts measured at frames × width × height."""
    pixel_scale = FULL_FRAMES * FULL_WIDTH * FULL_HEIGHT / (frames * width * height)
    total = 0
    for part, size in parts.items():
        if part.startswith("cache/") or part in ("frames", "video.mp4"):
            total += size * pixel_scale
        elif part == "manifest.sqlite":
            total += size * FULL_FRAMES / frames
        else:  # the WAL (bounded by SQLite's checkpoints), the log, config.json
            total += size
    return total


def config_for(folder, clip, policy, args):
    models = ensure_demo_assets() / "models"
    data = {"input_frames": {"video_file": str(clip), "width": args.width, "height": args.height,
                             "end_frame_id": args.frames},
            "output_folder": str(folder / f"run-{policy or 'today'}")}
    if policy is not None:
        data["keep"] = policy
    return {
        "models": {"model_list": [str(models / "stable_diffusion"), str(models / "motion_adapter")],
                   "controlnet_units": [
                       {"processor_id": "tile", "model_path": str(models / "controlnet_tile"), "scale": 0.5},
                       {"processor_id": "canny", "model_path": str(models / "controlnet_canny"), "scale": 0.5}],
                   "device": "cpu"},
        "data": data,
        "pipeline": {"seed": 0, "pipeline_inputs": {
            "prompt": "toon", "num_inference_steps": args.steps, "animatediff_batch_size": 16,
            "animatediff_stride": 8, "controlnet_batch_size": 16, "smoother_progress_ids": [-1]}},
        "smoother_configs": [{"processor_type": "FastBlend", "config": {
            "inference_mode": "fast", "window_size": 3, "minimum_patch_size": 3, "num_iter": 1}}],
    }


def measure(folder, clip, policy, args):
    config = config_for(folder, clip, policy, args)
    run_dir = Path(config["data"]["output_folder"])
    path = folder / f"config-{policy or 'today'}.yaml"
    path.write_text(yaml.safe_dump(config))
    peak = {"bytes": 0, "full": 0, "parts": {}}
    done = threading.Event()

    def sample():  # the peak is the moment whose extrapolation is largest; the raw largest sum is kept too
        while not done.is_set():
            if run_dir.is_dir():
                parts = folder_sizes(run_dir)
                peak["bytes"] = max(peak["bytes"], sum(parts.values()))
                full = extrapolate(parts, args.frames, args.width, args.height)
                if full > peak["full"]:
                    peak.update(full=full, parts=parts)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "diffsynth", "render", str(path), "--no-progress"],
                            capture_output=True, text=True, cwd=REPO)
    done.set()
    sampler.join()
    assert result.returncode == 0, result.stderr[-3000:]
    final = folder_sizes(run_dir)
    pixels = args.frames * args.width * args.height
    full_pixels = FULL_FRAMES * FULL_WIDTH * FULL_HEIGHT
    peak_full = extrapolate(peak["parts"], args.frames, args.width, args.height)
    final_full = extrapolate(final, args.frames, args.width, args.height)
    return {"policy": policy or "today (no data.keep)", "seconds": round(time.time() - started, 1),
            "peak_bytes": peak["bytes"], "final_bytes": sum(final.values()),
            "measured_peak_bytes_per_pixel": round(peak["bytes"] / pixels, 3),
            "measured_final_bytes_per_pixel": round(sum(final.values()) / pixels, 3),
            "peak_bytes_per_pixel": round(peak_full / full_pixels, 3),
            "final_bytes_per_pixel": round(final_full / full_pixels, 3),
            "peak_ratio_to_target": round(peak_full / full_pixels / TARGET, 3),
            "peak_gib_at_3667_frames_1280x768": round(peak_full / 2 ** 30, 1),
            "final_gib_at_3667_frames_1280x768": round(final_full / 2 ** 30, 1),
            "peak_parts_bytes_per_pixel": {k: round(v / pixels, 3) for k, v in
                                           sorted(peak["parts"].items(), key=lambda kv: -kv[1])},
            "final_parts_bytes_per_pixel": {k: round(v / pixels, 3) for k, v in
                                            sorted(final.items(), key=lambda kv: -kv[1])}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3, help="denoising steps")
    parser.add_argument("--policies", nargs="*", help="only these data.keep values (default: all the schema offers)")
    args = parser.parse_args()
    policies = args.policies or keep_policies()
    runs = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        folder = Path(tmp)
        clip = write_synthetic_clip(folder / "source.mp4", num_frames=args.frames, width=args.width * 3 // 2,
                                    height=args.height * 3 // 2, audio=False)
        for policy in policies:
            run = measure(folder, clip, policy, args)
            runs.append(run)
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(run["peak_parts_bytes_per_pixel"].items())[:6])
            print(f"keep={run['policy']}: peak {run['peak_bytes_per_pixel']:.2f} bytes/pixel at {FULL_FRAMES} frames "
                  f"(measured: {run['measured_peak_bytes_per_pixel']:.2f} at {args.frames}) "
                  f"(ratio {run['peak_ratio_to_target']:.2f} to {TARGET}; "
                  f"{run['peak_gib_at_3667_frames_1280x768']} GiB at {FULL_FRAMES} frames of "
                  f"{FULL_WIDTH}×{FULL_HEIGHT}), after completion {run['final_bytes_per_pixel']:.2f} bytes/pixel "
                  f"({run['final_gib_at_3667_frames_1280x768']} GiB); {run['seconds']:.0f} s\n"
                  f"    at the peak: {top}", flush=True)
    judged = next((r for r in runs if r["policy"] == TARGET_POLICY), runs[0] if policies == [None] else None)
    verdict = None if judged is None else judged["peak_bytes_per_pixel"] <= TARGET
    if judged is not None:
        print(f"target (peak ≤ {TARGET} bytes/pixel, keep={judged['policy']}): "
              f"{'OK' if verdict else 'OVER TARGET'}")
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "disk.json").write_text(json.dumps(
        {"frames": args.frames, "size": [args.width, args.height], "source_size": [args.width * 3 // 2,
                                                                                  args.height * 3 // 2],
         "steps": args.steps, "target_bytes_per_pixel": TARGET, "target_policy": judged and judged["policy"],
         "ok": verdict, "runs": runs, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}, indent=2))
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
