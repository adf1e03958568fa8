"""Helpers shared by the test modules (imported as `helpers`; conftest.py holds the fixtures)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def small_config(demo_assets, output_folder, **pipeline_inputs):
    """A fast render config on the demo assets: 12 frames at 64×64, two sliding windows, tile + canny, FastBlend
    on x0 after the first step and on the final frames."""
    models = demo_assets / "models"
    inputs = {"prompt": "a toon cat", "negative_prompt": "blurry", "cfg_scale": 7.0, "clip_skip": 2,
              "num_inference_steps": 2, "animatediff_batch_size": 8, "animatediff_stride": 4,
              "controlnet_batch_size": 16, "smoother_progress_ids": [0, -1]}
    inputs.update(pipeline_inputs)
    return {
        "models": {"model_list": [str(models / "stable_diffusion"), str(models / "motion_adapter")],
                   "controlnet_units": [
                       {"processor_id": "tile", "model_path": str(models / "controlnet_tile"), "scale": 0.5},
                       {"processor_id": "canny", "model_path": str(models / "controlnet_canny"), "scale": 0.5}],
                   "device": "cpu"},
        "data": {"input_frames": {"video_file": str(demo_assets / "clip.mp4"), "width": 64, "height": 64,
                                  "start_frame_id": 0, "end_frame_id": 12},
                 "output_folder": str(output_folder)},
        "pipeline": {"seed": 3, "pipeline_inputs": inputs},
        "smoother_configs": [{"processor_type": "FastBlend", "config": {
            "inference_mode": "fast", "window_size": 3, "minimum_patch_size": 3, "num_iter": 2}}],
    }


def write_config(path, config):
    path = Path(path)
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args, env=None, timeout=600):
    """Run `python -m diffsynth ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "diffsynth", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
