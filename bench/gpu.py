"""Denoising speed on a GPU, against the peer users would pick. One script, no downloads, under 8 minutes on a lent
H100/H200: real-size SD1.5 + an AnimateDiff v2 motion module + two ControlNets (tile, and a second one fed canny
maps: a lineart ControlNet is the same architecture with other weights), random weights built from the shipped
configs, 1024×576, window 16 / stride 8, CFG 7, 10 steps, 32 frames, float16.

It reports frame-steps/s (frames × steps ÷ the denoising loop's seconds) of
  (a) cached:    this pipeline with its disk cache (the denoise stages, run by the runner),
  (b) in_memory: the same stages with every unit kept in memory instead (no files, no fsync, no checksums),
                 so (b)/(a) is the disk cache's overhead (target: (a) ≥ 0.97 × (b));
  (c) diffusers: diffusers' AnimateDiffVideoToVideoControlNetPipeline with FreeNoise context windows of the same
                 length and stride, the same models and settings (target: (a) ≥ 1.3 × (c)),
plus each one's peak GPU memory and the UNet's achieved TFLOP/s against the card's peak.
Writes bench/results/gpu.json (with --cpu: gpu_cpu_dry_run.json). `--cpu` runs the same three at tiny sizes
(the demo's tiny models, 64×64, 16 frames, 2 steps) on the CPU: a dry run of the script, not a measurement.
"""

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.cache import RunCache  # noqa: E402
from diffsynth.config import parse_config  # noqa: E402
from diffsynth.demo import ensure_demo_assets, write_synthetic_clip  # noqa: E402
from diffsynth.models.libraries import quiet_libraries  # noqa: E402
from diffsynth.models.loader import ModelStore  # noqa: E402
from diffsynth.pipeline import RenderContext, build_stages  # noqa: E402
from diffsynth.runner import run_stages  # noqa: E402

CONFIGS = REPO / "diffsynth" / "models" / "configs"
PEAK_FP16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 330.0}


def setup(cpu):
    if cpu:
        return {"width": 64, "height": 64, "frames": 16, "steps": 2, "window": 8, "stride": 4,
                "dtype": "float32", "device": "cpu"}
    return {"width": 1024, "height": 576, "frames": 32, "steps": 10, "window": 16, "stride": 8,
            "dtype": "float16", "device": "cuda"}


def write_real_size_models(folder):
    """SD1.5, a v2 motion module and two ControlNets at their real sizes, random weights, as diffusers folders."""
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsynth.models.tiny import make_scheduler, write_tokenizer
    torch.manual_seed(0)
    sd = folder / "stable_diffusion"
    tokenizer = write_tokenizer(sd / "tokenizer")  # a character vocabulary: the embedding table is what matters
    text_config = json.loads((CONFIGS / "sd15_text_encoder.json").read_text())
    text_config["vocab_size"] = max(text_config.get("vocab_size", 0), len(tokenizer))
    CLIPTextModel(CLIPTextConfig(**text_config)).half().save_pretrained(sd / "text_encoder")
    unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd15_unet.json").read_text()))
    unet.half().save_pretrained(sd / "unet")
    AutoencoderKL.from_config(json.loads((CONFIGS / "sd15_vae.json").read_text())).save_pretrained(sd / "vae")
    make_scheduler().save_pretrained(sd / "scheduler")
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    adapter_config = json.loads((CONFIGS / "animatediff_motion_adapter.json").read_text())
    MotionAdapter.from_config(adapter_config).half().save_pretrained(folder / "motion_adapter")
    controlnet_config = json.loads((CONFIGS / "sd15_controlnet.json").read_text())
    for name in ("controlnet_tile", "controlnet_canny"):
        ControlNetModel.from_config(controlnet_config).half().save_pretrained(folder / name)
    return {"stable_diffusion": sd, "motion_adapter": folder / "motion_adapter",
            "controlnet_tile": folder / "controlnet_tile", "controlnet_canny": folder / "controlnet_canny"}


def render_config(models, clip, run_dir, s):
    return parse_config({
        "models": {"model_list": [str(models["stable_diffusion"]), str(models["motion_adapter"])],
                   "controlnet_units": [
                       {"processor_id": "tile", "model_path": str(models["controlnet_tile"]), "scale": 0.5},
                       {"processor_id": "tile", "model_path": str(models["controlnet_canny"]), "scale": 0.5}],
                   "device": s["device"], "torch_dtype": s["dtype"]},
        "data": {"input_frames": {"video_file": str(clip), "width": s["width"], "height": s["height"],
                                  "end_frame_id": s["frames"]}, "output_folder": str(run_dir)},
        "pipeline": {"seed": 0, "pipeline_inputs": {
            "prompt": "best quality, anime", "negative_prompt": "worst quality", "cfg_scale": 7.0,
            "num_inference_steps": s["steps"], "animatediff_batch_size": s["window"],
            "animatediff_stride": s["stride"], "controlnet_batch_size": s["window"], "unet_batch_size": "auto",
            "smoother_progress_ids": []}},
    })


class MemoryRunCache(RunCache):
    """The run cache with every unit kept in a dict: no files, no fsync, no checksum; rows as before."""

    def __init__(self, run_dir):
        super().__init__(run_dir)
        self.db.execute("PRAGMA synchronous=OFF")
        self.memory = {}

    def write(self, stage, key, data, path=None):
        if callable(data):
            return super().write(stage, key, data, path)
        self.memory[(stage, key)] = data
        self.db.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?)",
                        (stage, key, f"memory/{stage}/{key}", len(data), "", time.time()))

    def read(self, stage, key):
        if (stage, key) in self.memory:
            return self.memory[(stage, key)]
        return super().read(stage, key)

    def verify_stage(self, stage, full=False):
        return []  # the units live in memory, not in files


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device):
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def reset_peak(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_our_denoising(config, cache, s, io_threads=True):
    """Seconds of the denoise stages (everything before them is computed first, untimed)."""
    stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
    first = next(i for i, stage in enumerate(stages) if stage.name.startswith("denoise."))
    last = max(i for i, stage in enumerate(stages) if stage.name.startswith("denoise."))
    run_stages(stages[:first], cache, progress=False, io_threads=io_threads)
    reset_peak(s["device"])
    synchronize(s["device"])
    started = time.perf_counter()
    run_stages(stages[:last + 1], cache, progress=False, io_threads=io_threads)
    synchronize(s["device"])
    return time.perf_counter() - started, stages


def time_diffusers(models, clip, s):
    """Seconds of diffusers' denoising loop: from the first step's start to the last step's end."""
    from diffusers import (
        AnimateDiffVideoToVideoControlNetPipeline,
        AutoencoderKL,
        ControlNetModel,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
    )
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffsynth.config import FramesConfig
    from diffsynth.video import decode, probe
    dtype = getattr(torch, s["dtype"])
    sd = Path(models["stable_diffusion"])
    pipe = AnimateDiffVideoToVideoControlNetPipeline(
        vae=AutoencoderKL.from_pretrained(sd / "vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder", torch_dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(sd / "unet", torch_dtype=dtype),
        motion_adapter=MotionAdapter.from_pretrained(models["motion_adapter"], torch_dtype=dtype),
        controlnet=[ControlNetModel.from_pretrained(models[name], torch_dtype=dtype)
                    for name in ("controlnet_tile", "controlnet_canny")],
        scheduler=DDIMScheduler.from_pretrained(sd / "scheduler")).to(s["device"])
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise(context_length=s["window"], context_stride=s["stride"])
    source = probe(FramesConfig(video_file=str(clip), width=8, height=8))
    frames = [Image.fromarray(image).resize((s["width"], s["height"]))
              for _, image in decode(source, range(s["frames"]))]
    step_ends = []

    def on_step_end(pipeline, step, timestep, kwargs):
        synchronize(s["device"])
        step_ends.append(time.perf_counter())
        return kwargs

    reset_peak(s["device"])
    step_ends.append(None)
    pipe(video=frames, conditioning_frames=[frames, frames], prompt="best quality, anime",
         negative_prompt="worst quality", num_inference_steps=s["steps"], guidance_scale=7.0, strength=1.0,
         controlnet_conditioning_scale=[0.5, 0.5], height=s["height"], width=s["width"], output_type="latent",
         callback_on_step_end=on_step_end, generator=torch.Generator("cpu").manual_seed(0))
    ends = step_ends[1:]
    per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
    return per_step * s["steps"], peak_memory(s["device"])


def unet_tflops(stages, s, seconds):
    """The UNet's achieved TFLOP/s in our denoising: FLOPs of one window's UNet call (counted by torch) × calls."""
    from torch.utils.flop_counter import FlopCounterMode
    windows = next(stage for stage in stages if stage.name == "denoise.000.windows")
    models = windows.ctx.models
    frames = s["window"]
    sample = torch.randn(2, 4, frames, s["height"] // 8, s["width"] // 8, device=models.device, dtype=models.dtype)
    text = torch.randn(2 * frames, 77, models.unet.config.cross_attention_dim, device=models.device,
                       dtype=models.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        models.unet(sample, windows.timestep, encoder_hidden_states=text)
    calls = len(windows.windows) * s["steps"]
    return counter.get_total_flops() * calls / seconds / 1e12


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="dry run at tiny sizes on the CPU")
    parser.add_argument("--out", help="results file (default: bench/results/gpu.json, or gpu_cpu_dry_run.json)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 10; fewer to fit a short device lease)")
    args = parser.parse_args()
    quiet_libraries()
    s = setup(args.cpu)
    if args.steps:
        s["steps"] = args.steps
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; run it on a GPU machine, or with --cpu for a dry run")
    device_name = torch.cuda.get_device_name() if s["device"] == "cuda" else platform.processor() or "cpu"
    results = {"device": device_name, "setup": s}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = ensure_demo_assets() / "models" if args.cpu else None
        models = ({name: models / name for name in ("stable_diffusion", "motion_adapter", "controlnet_tile",
                                                   "controlnet_canny")} if args.cpu
                  else write_real_size_models(tmp / "models"))
        clip = write_synthetic_clip(tmp / "clip.mp4", num_frames=s["frames"], width=s["width"], height=s["height"],
                                    audio=False)
        frame_steps = s["frames"] * s["steps"]

        cache = RunCache(tmp / "cached")
        seconds, stages = time_our_denoising(render_config(models, clip, tmp / "cached", s), cache, s)
        results["cached"] = frame_steps / seconds
        results["cached_peak_vram_bytes"] = peak_memory(s["device"])
        results["unet_tflops"] = unet_tflops(stages, s, seconds)
        cache.close()
        del stages

        cache = MemoryRunCache(tmp / "memory")
        seconds, stages = time_our_denoising(render_config(models, clip, tmp / "memory", s), cache, s,
                                             io_threads=False)
        results["in_memory"] = frame_steps / seconds
        cache.close()
        del stages

        seconds, peak = time_diffusers(models, clip, s)
        results["diffusers"] = frame_steps / seconds
        results["diffusers_peak_vram_bytes"] = peak
        shutil.rmtree(tmp / "models", ignore_errors=True)
    results["peak_vram_bytes"] = results["cached_peak_vram_bytes"]
    peak = next((value for name, value in PEAK_FP16_TFLOPS.items() if name in device_name), None)
    results["unet_share_of_peak"] = results["unet_tflops"] / peak if peak else None
    results["cache_overhead"] = 1 - results["cached"] / results["in_memory"]
    results["speedup_over_diffusers"] = results["cached"] / results["diffusers"]
    print(f"{device_name}: frame-steps/s cached {results['cached']:.3f}, in memory {results['in_memory']:.3f} "
          f"(cache overhead {results['cache_overhead']:+.1%}, target <= 3%), diffusers {results['diffusers']:.3f} "
          f"(ours / diffusers = {results['speedup_over_diffusers']:.2f}, target >= 1.3); UNet "
          f"{results['unet_tflops']:.2f} TFLOP/s; peak memory {results['peak_vram_bytes']}")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / ("gpu_cpu_dry_run.json" if args.cpu
                                                                        else "gpu.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
