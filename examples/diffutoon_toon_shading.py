"""Diffutoon toon shading from Python: edit the dict, run `python examples/diffutoon_toon_shading.py`.

The same keys as configs/diffutoon_toon_shading.yaml; validated by the same schema as the CLI. Run it again after a
crash and it resumes where it stopped. With `--demo` it renders the bundled tiny demo instead.
"""

import sys
from pathlib import Path

from diffsynth.config import parse_config, resolve_paths
from diffsynth.render import render

HERE = Path(__file__).resolve().parent

config = {
    "models": {
        "model_list": ["../models/stable_diffusion/aingdiffusion_v12.safetensors",
                       "../models/AnimateDiff/mm_sd_v15_v2.ckpt"],
        "controlnet_units": [
            {"processor_id": "tile", "model_path": "../models/ControlNet/control_v11f1e_sd15_tile.pth", "scale": 0.5},
            {"processor_id": "lineart", "model_path": "../models/ControlNet/control_v11p_sd15_lineart.pth",
             "scale": 0.5},
        ],
        "annotators_folder": "../models/Annotators",
        "textual_inversion_folder": "../models/textual_inversion",
        "device": "auto",
    },
    "data": {
        "input_frames": {"video_file": "../data/input_video.mp4", "height": 1536, "width": 1536,
                         "start_frame_id": 0, "end_frame_id": 30},
        "output_folder": "../runs/toon_video",
        "fps": 30,
    },
    "pipeline": {
        "seed": 0,
        "pipeline_inputs": {
            "prompt": "best quality, perfect anime illustration, light, a girl is dancing, smile, solo",
            "negative_prompt": "verybadimagenegative_v1.3",
            "cfg_scale": 7.0, "clip_skip": 2, "denoising_strength": 1.0, "num_inference_steps": 10,
            "animatediff_batch_size": 16, "animatediff_stride": 8, "unet_batch_size": 1, "controlnet_batch_size": 1,
            "smoother_progress_ids": [-1],
        },
    },
    "smoother_configs": [{"processor_type": "FastBlend", "config": {"inference_mode": "fast", "window_size": 30}}],
}

if __name__ == "__main__":
    if "--demo" in sys.argv:
        from diffsynth.config import load_config
        from diffsynth.demo import DEMO_CONFIG, ensure_demo_assets
        ensure_demo_assets()
        print(render(load_config(DEMO_CONFIG)))
    else:
        print(render(resolve_paths(parse_config(config), HERE)))
