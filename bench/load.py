"""Loading in seconds: from the start of `diffsynth render` to the first UNet call, with real-size models read
from single files.

Real-size SD1.5 (an LDM `.safetensors` checkpoint, float16, as the usual community checkpoints), an AnimateDiff v2
motion module (`mm_sd_v15_v2.ckpt` layout, float32 as guoyww ships it) and two ControlNet v1.1 `.pth` files
(float32, as lllyasviel ships them), all with random weights (written once under --models and reused; ~7 GB), no
downloads. The render is tiny (1 frame of 64×64, 1 step) so that what is timed is the loading: the first UNet call
aborts it. Each run is a fresh process (nothing cached in Python; the files stay in the page cache, as on a second
render), timed in two parts that add up to what the user waits for:
- `startup_seconds`: from spawning the process to `import diffsynth.render` done (the interpreter, torch, diffusers,
  transformers: what `diffsynth render` pays before its render() starts);
- `seconds`: from render() to the first UNet forward, the free-space check (`diffsynth plan`'s VAE round trip on
  the first frames) included unless --force.
The window's ControlNet group runs before its UNet call; its compute (about a second on a CPU, ms on a GPU) is
reported apart (`controlnet_seconds`) and `loading_seconds` = startup + seconds − ControlNet compute is the figure
compared with the target. CPU seconds and page faults of the process are reported beside the wall times (machine
A is shared: wall time depends on its load, `load_average_1min` is recorded before each run; the page faults, the
count of pages loading touches, do not). Before each run the model files are
read through once (`warm_seconds`), so every run starts with them in the page cache. Medians of `--runs` runs.
Before/after on a shared machine: `--code OTHER_CHECKOUT --label before --append --runs 1` alternated with
`--label after --append --runs 1`, so both see the same load.

These files, not bench/original_diffutoon.py's (all float16), because what loading costs depends on the dtypes
the upstream files have: the cast of a float32 motion module and ControlNets is part of it.

Target (issue 19): ≤ 15 s on the 2-core CPU machine A, ≤ 10 s on a GPU machine. Writes bench/results/load.json
(`--out` to change). `python bench/load.py --device cuda` on a GPU machine.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CODE = os.environ.get("BENCH_LOAD_CODE", str(REPO))  # the checkout whose diffsynth is measured (--code)
sys.path.insert(0, CODE)

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
    from diffsynth.models.convert import shipped_config
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


def time_to_first_unet_call(models_folder, device, dtype, force=False):
    """One measurement, in this process: {seconds from render() to the first UNet forward (which aborts it), CPU
    seconds of the process meanwhile, seconds spent inside ControlNet forwards, page faults meanwhile (each a
    fresh or file-backed page touched: the count of the memory work, which the machine's load does not change),
    the process's peak RSS}. `force` skips the free-space
    check (plan), as `diffsynth render --force` does."""
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
                seen["usage"] = resource.getrusage(resource.RUSAGE_SELF)
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
        usage = resource.getrusage(resource.RUSAGE_SELF)
        try:
            render(config, progress=False, force=force)
        except FirstUNetCall:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        if "at" not in seen:
            raise RuntimeError("the render ended without calling the UNet")
        return {"seconds": seen["at"] - started, "cpu_seconds": seen["cpu_at"] - cpu_started,
                "controlnet_seconds": seen["controlnet_seconds"],
                "page_faults": seen["usage"].ru_minflt + seen["usage"].ru_majflt - usage.ru_minflt - usage.ru_majflt,
                "peak_rss_gib": seen["usage"].ru_maxrss / 2**20}


def read_through(paths):
    """Read every file once (into the page cache, as a second render finds them); returns the seconds it took."""
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "diffsynth_bench_load_models"),
                        help="folder of the random real-size files (written on first use, ~7 GB; reused)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="after", help="key of this measurement in the results file")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "load.json"))
    parser.add_argument("--force", action="store_true", help="skip the free-space check, as render --force")
    parser.add_argument("--code", default=CODE, help="the checkout whose diffsynth is measured (default: this one)")
    parser.add_argument("--append", action="store_true", help="add these runs to the label's earlier ones")
    parser.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)  # a single run, printed as JSON
    args = parser.parse_args()
    if args.spawned_at is not None:
        import diffsynth.render  # noqa: F401 - timed: what `diffsynth render` imports before render() starts
        startup = {"startup_seconds": time.time() - args.spawned_at, "startup_cpu_seconds": time.process_time()}
        result = {**startup, **time_to_first_unet_call(args.models, args.device, args.dtype, args.force)}
        result["loading_seconds"] = result["startup_seconds"] + result["seconds"] - result["controlnet_seconds"]
        print(json.dumps(result))
        return
    code = subprocess.run(["git", "-C", args.code, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    started = time.perf_counter()
    paths = write_real_size_single_files(args.models)
    print(f"model files ready in {args.models} ({time.perf_counter() - started:.0f} s)", flush=True)
    runs = []
    for run in range(args.runs):
        warm_seconds = read_through(paths.values())
        load_average = os.getloadavg()[0]
        command = [sys.executable, __file__, "--models", args.models, "--device", args.device, "--dtype",
                   args.dtype, *(["--force"] if args.force else []), "--spawned-at", repr(time.time())]
        result = subprocess.run(command, capture_output=True, text=True, cwd=args.code, check=False,
                                env=dict(os.environ, PYTHONPATH=args.code, BENCH_LOAD_CODE=args.code))
        if result.returncode != 0:
            sys.exit(f"bench/load.py: run {run + 1} failed:\n{result.stderr[-3000:]}")
        runs.append({**json.loads(result.stdout.strip().splitlines()[-1]), "load_average_1min": load_average,
                     "warm_seconds": warm_seconds, "code": code})
        one = runs[-1]
        print(f"run {run + 1} (load {load_average:.1f}): {one['loading_seconds']:.2f} s of loading = "
              f"{one['startup_seconds']:.2f} s start-up and imports + {one['seconds']:.2f} s from render() to the "
              f"first UNet call - {one['controlnet_seconds']:.2f} s ControlNet compute; "
              f"{one['startup_cpu_seconds'] + one['cpu_seconds']:.1f} CPU s, {one['page_faults']} page faults, "
              f"peak RSS {one['peak_rss_gib']:.1f} GiB", flush=True)
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for one in runs:
        one["total_cpu_seconds"] = one["startup_cpu_seconds"] + one["cpu_seconds"]
    if args.append and args.label in results:
        runs = results[args.label]["runs"] + runs
    median = {key: statistics.median(run[key] for run in runs) for key, value in runs[0].items()
              if isinstance(value, (int, float))}
    target = 10.0 if args.device.startswith("cuda") else 15.0
    results[args.label] = {"device": device_name, "torch_dtype": args.dtype, "plan_skipped": args.force, "runs": runs, "target_loading_seconds": target,
                           **{f"median_{key}": value for key, value in median.items()}}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"median {median['loading_seconds']:.2f} s of loading (start-up {median['startup_seconds']:.2f} s + "
          f"render() to the first UNet call {median['seconds']:.2f} s, less {median['controlnet_seconds']:.2f} s "
          f"ControlNet compute), target <= {target:.0f} s: {median['loading_seconds'] / target:.2f}x the target; "
          f"{median['total_cpu_seconds']:.1f} CPU s, {median['page_faults']:.0f} page faults; median load average {median['load_average_1min']:.1f}; "
          f"wrote {out}")


if __name__ == "__main__":
    main()
