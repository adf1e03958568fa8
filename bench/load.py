"""Loading in seconds: from `render` start to the first UNet call, with real-size models read from single files.

Real-size SD1.5 (an LDM `.safetensors` checkpoint, float16, as the usual community checkpoints), an AnimateDiff v2
motion module (`mm_sd_v15_v2.ckpt` layout, float32 as guoyww ships it) and two ControlNet v1.1 `.pth` files
(float32, as lllyasviel ships them), all with random weights (written once under --models and reused; ~7 GB), no
downloads. The render is tiny (1 frame of 64×64, 1 step) so that what is timed is the loading: the first UNet call
aborts it. The window's ControlNet group runs before its UNet call; its compute (a few seconds on a CPU, ms on a
GPU) is reported apart, with the process's CPU seconds (machine A is shared: wall time depends on its load). Runs
`--runs` times, each in a fresh process (nothing cached in Python; the files stay in the page cache, as on a
second render), and reports the medians. The free-space check (plan) is skipped (force).

These files, not bench/original_diffutoon.py's (all float16), because what loading costs depends on the dtypes
the upstream files have: the cast of a float32 motion module and ControlNets is part of it.

Target (issue 19): ≤ 15 s on the 2-core CPU machine A, ≤ 10 s on a GPU machine. Writes bench/results/load.json
(`--out` to change). `python bench/load.py --device cuda` on a GPU machine.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.models.convert import shipped_config

FILES = {"base": "sd15_random.safetensors", "motion": "mm_sd_v15_v2_random.ckpt",
         "controlnet_tile": "control_v11f1e_sd15_tile_random.pth",
         "controlnet_lineart": "control_v11p_sd15_lineart_random.pth"}


def random_state(model, dtype, generator):
    """Random tensors with `model`'s (a meta-device model's) names and shapes: fast (no per-layer init)."""
    return {key: (torch.randn(tensor.shape, generator=generator) * 0.02).to(dtype)
            for key, tensor in model.state_dict().items()}


def write_real_size_single_files(folder):
    """SD1.5 / AnimateDiff v2 / 2 × ControlNet v1.1 at their real sizes, random weights, in the original layouts
    (the shipped configs describe them: no sidecars). Returns {name: path}; files already there are kept."""
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsynth.models import ldm_layout
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / file for name, file in FILES.items()}
    if all(path.is_file() for path in paths.values()):
        return paths
    generator = torch.Generator().manual_seed(0)
    unet_config, vae_config = shipped_config("sd15_unet"), shipped_config("sd15_vae")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text = CLIPTextModel(CLIPTextConfig(**shipped_config("sd15_text_encoder")))
        adapter = MotionAdapter.from_config(shipped_config("animatediff_motion_adapter"))
        controlnet = ControlNetModel.from_config(shipped_config("sd15_controlnet"))
    if not paths["base"].is_file():
        checkpoint = {**ldm_layout.unet_to_ldm(random_state(unet, torch.float16, generator), unet.config),
                      **ldm_layout.vae_to_ldm(random_state(vae, torch.float16, generator), vae.config),
                      **ldm_layout.clip_to_ldm(random_state(text, torch.float16, generator))}
        checkpoint = {key: value for key, value in checkpoint.items() if not key.endswith("position_ids")}
        save_file({key: value.contiguous() for key, value in checkpoint.items()}, paths["base"])
        del checkpoint
    if not paths["motion"].is_file():
        torch.save(ldm_layout.motion_to_original(random_state(adapter, torch.float32, generator)), paths["motion"])
    for name in ("controlnet_tile", "controlnet_lineart"):
        if not paths[name].is_file():
            torch.save({key: value.contiguous() for key, value in ldm_layout.controlnet_to_ldm(
                random_state(controlnet, torch.float32, generator), controlnet.config).items()}, paths[name])
    return paths


def render_config(paths, clip, run_dir, device, dtype):
    from diffsynth.config import parse_config
    return parse_config({
        "models": {"model_list": [str(paths["base"]), str(paths["motion"])],
                   "controlnet_units": [
                       {"processor_id": "tile", "model_path": str(paths["controlnet_tile"]), "scale": 0.5},
                       {"processor_id": "tile", "model_path": str(paths["controlnet_lineart"]), "scale": 0.5}],
                   "device": device, "torch_dtype": dtype},
        "data": {"input_frames": {"video_file": str(clip), "width": 64, "height": 64, "end_frame_id": 1},
                 "output_folder": str(run_dir)},
        "pipeline": {"seed": 0, "pipeline_inputs": {
            "prompt": "best quality", "negative_prompt": "worst quality", "num_inference_steps": 1,
            "animatediff_batch_size": 1, "animatediff_stride": 1, "unet_batch_size": 1, "controlnet_batch_size": 1,
            "smoother_progress_ids": []}},
    })


class FirstUNetCall(Exception):
    pass


def time_to_first_unet_call(models_folder, device, dtype):
    """One measurement, in this process: {seconds from render() to the first UNet forward (which aborts it), CPU
    seconds of the process meanwhile, seconds spent inside ControlNet forwards}."""
    from diffusers import ControlNetModel, UNetMotionModel

    from diffsynth.demo import write_synthetic_clip
    from diffsynth.models.loader import quiet_libraries
    from diffsynth.render import render
    quiet_libraries()
    paths = write_real_size_single_files(models_folder)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = write_synthetic_clip(tmp / "clip.mp4", num_frames=4, width=64, height=64, audio=False)
        config = render_config(paths, clip, tmp / "run", device, dtype)
        seen = {"controlnet_seconds": 0.0}

        def synchronize():
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def before(module, args):
            if isinstance(module, UNetMotionModel):
                synchronize()
                seen["at"], seen["cpu_at"] = time.perf_counter(), time.process_time()
                raise FirstUNetCall
            if isinstance(module, ControlNetModel):
                synchronize()
                seen["controlnet_started"] = time.perf_counter()

        def after(module, args, output):
            if isinstance(module, ControlNetModel):
                synchronize()
                seen["controlnet_seconds"] += time.perf_counter() - seen["controlnet_started"]

        hooks = [torch.nn.modules.module.register_module_forward_pre_hook(before),
                 torch.nn.modules.module.register_module_forward_hook(after)]
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            render(config, progress=False, force=True)
        except FirstUNetCall:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        if "at" not in seen:
            raise RuntimeError("the render ended without calling the UNet")
        return {"seconds": seen["at"] - started, "cpu_seconds": seen["cpu_at"] - cpu_started,
                "controlnet_seconds": seen["controlnet_seconds"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "diffsynth_bench_load_models"),
                        help="folder of the random real-size files (written on first use, ~7 GB; reused)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="after", help="key of this measurement in the results file")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "load.json"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single run, printed as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_to_first_unet_call(args.models, args.device, args.dtype)))
        return
    started = time.perf_counter()
    write_real_size_single_files(args.models)
    print(f"model files ready in {args.models} ({time.perf_counter() - started:.0f} s)", flush=True)
    runs = []
    for run in range(args.runs):
        result = subprocess.run([sys.executable, __file__, "--one", "--models", args.models, "--device", args.device,
                                 "--dtype", args.dtype], capture_output=True, text=True, cwd=REPO, check=False,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        if result.returncode != 0:
            sys.exit(f"bench/load.py: run {run + 1} failed:\n{result.stderr[-3000:]}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"run {run + 1}: {runs[-1]['seconds']:.2f} s from render() to the first UNet call "
              f"({runs[-1]['controlnet_seconds']:.2f} s of it in the ControlNets' forward; "
              f"{runs[-1]['cpu_seconds']:.1f} CPU s)", flush=True)
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    results[args.label] = {"device": device_name, "torch_dtype": args.dtype, "runs": runs,
                           "load_average_1min": os.getloadavg()[0], "median_seconds": median["seconds"],
                           "median_controlnet_seconds": median["controlnet_seconds"],
                           "median_cpu_seconds": median["cpu_seconds"]}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"median {median['seconds']:.2f} s to the first UNet call, {median['controlnet_seconds']:.2f} s of it "
          f"ControlNet compute, {median['cpu_seconds']:.1f} CPU s (target <= 15 s on machine A's CPU, <= 10 s on "
          f"a GPU); wrote {out}")


if __name__ == "__main__":
    main()
