"""Denoising speed on a GPU, against the peers users would pick, like with like. No downloads: real-size SD1.5 +
an AnimateDiff v2 motion module + two ControlNets v1.1 with random weights, written once as single files in the
original's layouts (bench/original_diffutoon.py's `write_weights`, the files bench/oracle.py compares on), read by
every variant; 1024×576, window 16 / stride 8, CFG 7, 10 steps, 32 frames, float16.

Variants:
  cached:    this pipeline with its disk cache (the denoise stages, run by the runner);
  in_memory: the same stages with every unit kept in memory instead (no files, no fsync, no checksums), so
             cached ÷ in_memory is the disk cache's overhead (target ≥ 0.97);
  diffusers: diffusers' AnimateDiffVideoToVideoControlNetPipeline with FreeNoise context windows of the same length
             and stride, built from the same files (target: cached ≥ 1.0 × diffusers);
  original:  the original Diffutoon (PyPI diffsynth==1.1.7, SDVideoPipeline) in its own venv and process through
             bench/original_diffutoon.py, the same files, its own unet/controlnet batch sizes at their best
             (target: cached ≥ 1.5 × it).
             Not with --cpu.

Fair by construction: each variant loads its models and runs one window before its timer (load and warm-up are
reported apart), every variant is timed over the same steps (all `steps` of the denoising loop, warm), and the
whole render (load + preparation + warm-up + steps) is reported beside it. FLOPs are counted per variant per
frame-step by torch's FlopCounterMode on meta tensors (no compute) with each variant's own schedule of UNet and
ControlNet calls, and MFU = counted FLOPs × frame-steps/s ÷ the card's dense fp16 peak (PEAK_FP16_TFLOPS).
gpu_idle_share: 1 − the mean GPU utilisation (NVML, sampled every 20 ms) over our cached loop.

Writes bench/results/gpu.json (with --cpu: gpu_cpu_dry_run.json). `--cpu` runs everything but the original at
tiny sizes (the demo's tiny models, 64×64, 16 frames, 2 steps) on the CPU: a dry run of the script, not a
measurement. bench/gpu_device_run.sh is the device run (wheels, settings sweep, this script).
"""

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# This project's modules are imported where they are used: `--variants original` on a device machine runs with
# only the wheels the original needs (no PyAV, pydantic or zstandard there; see bench/gpu_device_run.sh).

# Dense (no sparsity) fp16 tensor-core peaks with fp32 accumulation, TFLOP/s, from NVIDIA's data sheets; the first
# name found in torch.cuda.get_device_name() wins, so the longer names come first.
PEAK_FP16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
                    "B200": 2250.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0,
                    "L4": 121.0, "RTX 6000 Ada": 364.2, "RTX A6000": 154.8, "RTX 4090": 165.2, "RTX 4080": 97.5,
                    "RTX 3090": 71.0, "T4": 65.0, "V100": 125.0}
VARIANTS = ("cached", "in_memory", "diffusers", "original")


def setup(cpu):
    if cpu:
        return {"width": 64, "height": 64, "frames": 16, "steps": 2, "window": 8, "stride": 4,
                "dtype": "float32", "device": "cpu"}
    return {"width": 1024, "height": 576, "frames": 32, "steps": 10, "window": 16, "stride": 8,
            "dtype": "float16", "device": "cuda"}


def peak_tflops(device_name):
    return next((value for name, value in PEAK_FP16_TFLOPS.items() if name in device_name), None)


def model_paths(cpu, folder):
    """{base, motion, controlnet_tile, controlnet_lineart}: the demo's tiny folders, or real-size single files."""
    if cpu:
        from diffsynth.demo import ensure_demo_assets
        demo = ensure_demo_assets() / "models"
        return {"base": demo / "stable_diffusion", "motion": demo / "motion_adapter",
                "controlnet_tile": demo / "controlnet_tile", "controlnet_lineart": demo / "controlnet_canny"}
    from original_diffutoon import write_weights  # the original's layouts, as bench/oracle.py uses them
    weights = write_weights(folder)
    return {"base": weights["sd"], "motion": weights["motion"], "controlnet_tile": weights["controlnets"][0],
            "controlnet_lineart": weights["controlnets"][1]}


def render_config(models, clip, run_dir, s, unet_batch_size="auto", controlnet_batch_size="auto"):
    from diffsynth.config import parse_config
    return parse_config({
        "models": {"model_list": [str(models["base"]), str(models["motion"])],
                   "controlnet_units": [
                       {"processor_id": "tile", "model_path": str(models["controlnet_tile"]), "scale": 0.5},
                       {"processor_id": "tile", "model_path": str(models["controlnet_lineart"]), "scale": 0.5}],
                   "device": s["device"], "torch_dtype": s["dtype"]},
        "data": {"input_frames": {"video_file": str(clip), "width": s["width"], "height": s["height"],
                                  "end_frame_id": s["frames"]}, "output_folder": str(run_dir)},
        "pipeline": {"seed": 0, "pipeline_inputs": {
            "prompt": "best quality, anime", "negative_prompt": "worst quality", "cfg_scale": 7.0,
            "num_inference_steps": s["steps"], "animatediff_batch_size": s["window"],
            "animatediff_stride": s["stride"], "controlnet_batch_size": controlnet_batch_size,
            "unet_batch_size": unet_batch_size, "smoother_progress_ids": []}},
    })


def memory_run_cache(run_dir):
    """The run cache with every unit kept in a dict: no files, no fsync, no checksum; rows as before."""
    from diffsynth.cache import RunCache

    class MemoryRunCache(RunCache):
        def __init__(self, run_dir):
            super().__init__(run_dir)
            self.db.execute("PRAGMA synchronous=OFF")
            self.memory = {}

        def write(self, stage, key, data, path=None, digest=None):
            if callable(data):
                return super().write(stage, key, data, path, digest)
            self.memory[(stage, key)] = data
            self.db.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?)",
                            (stage, key, f"memory/{stage}/{key}", len(data), "", time.time()))

        def read(self, stage, key):
            if (stage, key) in self.memory:
                return self.memory[(stage, key)]
            return super().read(stage, key)

        def verify_stage(self, stage, full=False):
            return []  # the units live in memory, not in files

    return MemoryRunCache(run_dir)


def run_cache(run_dir):
    from diffsynth.cache import RunCache
    return RunCache(run_dir)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device):
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


class Clock:
    """Named seconds between synchronised marks: clock.mark("load") closes the section opened by the last mark."""

    def __init__(self, device):
        self.device, self.seconds = device, {}
        synchronize(device)
        self.last = self.started = time.perf_counter()

    def mark(self, name):
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now
        return now

    def result(self):
        return {**self.seconds, "whole_render": self.last - self.started}


class GPUBusy:
    """The GPU's mean utilisation (NVML: the share of time a kernel ran) sampled every 20 ms between start() and
    stop(); idle_share = 1 − that mean. None on the CPU or without NVML."""

    def __init__(self, device):
        self.samples, self.running, self.thread = [], False, None
        self.handle = None
        if device == "cuda":
            try:
                import pynvml
                pynvml.nvmlInit()
                index = torch.cuda.current_device()
                self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(index), pynvml
            except Exception:  # noqa: BLE001 - no NVML: no figure
                self.handle = None

    def _sample(self):
        while self.running:
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(0.02)

    @contextlib.contextmanager
    def measuring(self):
        if self.handle is None:
            yield
            return
        self.samples, self.running = [], True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        try:
            yield
        finally:
            self.running = False
            self.thread.join()

    @property
    def idle_share(self):
        return 1 - statistics.mean(self.samples) / 100 if self.samples else None


def time_ours(config, cache, s, busy, io_threads=True):
    """{load, prepare, warm_up, steady, whole_render} seconds of our pipeline, and its stages. load: every model
    onto the device; prepare: the stages before denoising (crop, annotate, prompts, latents); warm_up: one window
    (its ControlNet group and UNet call), its result discarded; steady: every denoise stage of every step."""
    from diffsynth.models.loader import ModelStore
    from diffsynth.pipeline import RenderContext, build_stages
    from diffsynth.runner import run_stages
    clock = Clock(s["device"])
    store = ModelStore(config.models)
    store.text_encoder, store.vae, store.unet, store.controlnets  # noqa: B018 - loads them
    clock.mark("load")
    stages = build_stages(RenderContext(config, cache, store))
    first = next(i for i, stage in enumerate(stages) if stage.name.startswith("denoise."))
    last = max(i for i, stage in enumerate(stages) if stage.name.startswith("denoise."))
    run_stages(stages[:first], cache, progress=False, io_threads=io_threads)
    clock.mark("prepare")
    windows = stages[first]
    windows.compute(windows.window_key(0))
    windows.residuals.kept.clear()  # the timed step computes its ControlNet groups again
    clock.mark("warm_up")
    reset_peak(s["device"])
    with busy.measuring():
        run_stages(stages[:last + 1], cache, progress=False, io_threads=io_threads)
        clock.mark("steady")
    return clock.result(), stages


def diffusers_pipeline(store, s):
    """diffusers' AnimateDiff video-to-video ControlNet pipeline from the same files, through our converters
    (the weights are the ones our pipeline loads), with FreeNoise context windows of our window and stride."""
    from diffusers import AnimateDiffVideoToVideoControlNetPipeline

    from diffsynth.models.tiny import make_scheduler
    dtype = getattr(torch, s["dtype"])
    pipe = AnimateDiffVideoToVideoControlNetPipeline(
        vae=store.vae, text_encoder=store._load_text_encoder(), tokenizer=store.tokenizer,
        unet=store._load_unet2d(), motion_adapter=store._load_motion_adapter(),
        controlnet=[store._load_controlnet(path) for path in store.files.controlnets],
        scheduler=make_scheduler()).to(s["device"], dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise(context_length=s["window"], context_stride=s["stride"])
    return pipe


def time_diffusers(config, clip, s, busy):
    """The same sections for diffusers: load (its components and pipeline onto the device), warm_up (one window:
    the first `window` frames, one step), steady (from the first step's first ControlNet call to the last step's
    end, all `steps`), whole_render (load + warm-up + the whole timed call)."""
    from diffusers import ControlNetModel
    from PIL import Image

    from diffsynth.config import FramesConfig
    from diffsynth.models.loader import ModelStore
    from diffsynth.video import decode, probe
    clock = Clock(s["device"])
    pipe = diffusers_pipeline(ModelStore(config.models), s)
    clock.mark("load")
    source = probe(FramesConfig(video_file=str(clip), width=8, height=8))
    frames = [Image.fromarray(image).resize((s["width"], s["height"]))
              for _, image in decode(source, range(s["frames"]))]
    arguments = {"prompt": "best quality, anime", "negative_prompt": "worst quality", "guidance_scale": 7.0,
                 "strength": 1.0, "controlnet_conditioning_scale": [0.5, 0.5], "height": s["height"],
                 "width": s["width"], "output_type": "latent", "generator": torch.Generator("cpu").manual_seed(0)}
    clock.mark("prepare")
    window = frames[:s["window"]]
    pipe(video=window, conditioning_frames=[window, window], num_inference_steps=1, **arguments)
    clock.mark("warm_up")
    marks = {}

    def first_controlnet_call(module, args):
        if "loop_start" not in marks:
            synchronize(s["device"])
            marks["loop_start"] = time.perf_counter()

    def on_step_end(pipeline, step, timestep, kwargs):
        synchronize(s["device"])
        marks["loop_end"] = time.perf_counter()
        return kwargs

    hooks = [module.register_forward_pre_hook(first_controlnet_call) for module in pipe.controlnet.modules()
             if isinstance(module, ControlNetModel)]
    reset_peak(s["device"])
    with busy.measuring():
        pipe(video=frames, conditioning_frames=[frames, frames], num_inference_steps=s["steps"],
             callback_on_step_end=on_step_end, **arguments)
        clock.mark("call")
    for hook in hooks:
        hook.remove()
    seconds = clock.result()
    seconds["steady"] = marks["loop_end"] - marks["loop_start"]
    return seconds, pipe


# The original's own batch sizes at their best that fits: on an 80 GB+ card the whole window in one UNet and one
# ControlNet call (its example config uses 1 and 1, for a 24 GB card).
ORIGINAL_BATCH_SIZES = {"unet_batch_size": 16, "controlnet_batch_size": 16}


def time_original(models, s, busy, tmp, python=None):
    """The original Diffutoon (PyPI diffsynth==1.1.7's SDVideoPipeline) on the same files, frames and settings,
    in its own venv and process through bench/original_diffutoon.py (issue 18's harness: `run_original`), or
    (None, why). Its timings: `load` (ModelManager), one entry per step, `call` (the whole pipeline call, VAE
    decode included). It has no warm-up window of its own: its first step is the warm-up, and `steady` is the mean
    of the other steps × steps (the same steps as ours, warm)."""
    try:
        import original_diffutoon
    except ImportError:
        return None, "bench/original_diffutoon.py (the harness for PyPI diffsynth==1.1.7) is not in this checkout"
    if not hasattr(original_diffutoon, "run_original"):
        return None, "bench/original_diffutoon.py has no run_original(): the harness's API changed"
    from PIL import Image
    from safetensors.torch import save_file

    from diffsynth.demo import synthetic_frame
    frames_folder = tmp / "original_frames"
    frames_folder.mkdir(exist_ok=True)
    for index in range(s["frames"]):  # the frames our clip encodes (before H.264), at the render's size
        Image.fromarray(synthetic_frame(index, s["width"], s["height"])).save(frames_folder / f"{index:05d}.png")
    noise = torch.randn(s["frames"], 4, s["height"] // 8, s["width"] // 8, generator=torch.Generator().manual_seed(0))
    save_file({"noise": noise}, tmp / "original_noise.safetensors")
    case = {"model_list": [str(models["base"]), str(models["motion"])],
            "controlnet_units": [{"processor_id": "tile", "model_path": str(models[name]), "scale": 0.5}
                                 for name in ("controlnet_tile", "controlnet_lineart")],
            "textual_inversion_folder": None, "loras": [], "frames": str(frames_folder),
            "noise": str(tmp / "original_noise.safetensors"), "device": s["device"], "torch_dtype": s["dtype"],
            "pipeline_inputs": {"prompt": "best quality, anime", "negative_prompt": "worst quality", "cfg_scale": 7.0,
                                "clip_skip": 1, "denoising_strength": 1.0, "num_inference_steps": s["steps"],
                                "animatediff_batch_size": s["window"], "animatediff_stride": s["stride"],
                                "cross_frame_attention": False, **ORIGINAL_BATCH_SIZES}}
    # ensure_venv checks the venv's diffsynth/transformers versions and puts its modelscope stub in place (on a
    # device machine the venv is made from carried wheels first: it cannot reach PyPI).
    python = original_diffutoon.ensure_venv(Path(python).parent.parent) if python else original_diffutoon.ensure_venv()
    started = time.perf_counter()
    with busy.measuring():
        result = original_diffutoon.run_original([case], tmp / "original", python=python, nice=0)
    timings = result[0]["info"]["timings"]
    steps = timings["steps"]
    steady = statistics.mean(steps[1:]) * len(steps) if len(steps) > 1 else steps[0]
    return {"load": timings["load"], "warm_up": steps[0] - steady / len(steps), "steady": steady,
            "call": timings["call"], "whole_render": time.perf_counter() - started}, None


# --------------------------------------------------------------------------------------------- FLOPs, counted

def meta_models(architectures):
    """The UNet (with motion modules) and one ControlNet of the loaded models' architectures ({"unet": config,
    "controlnet": config}), on the meta device, fp16."""
    from diffusers import ControlNetModel, UNetMotionModel

    from diffsynth.models.loader import use_sdpa
    with torch.device("meta"):
        unet = UNetMotionModel.from_config(architectures["unet"]).half()
        controlnet = ControlNetModel.from_config(architectures["controlnet"]).half()
    use_sdpa(unet)
    use_sdpa(controlnet)
    return unet, controlnet


def counted(fn):
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


def flops_per_frame_step(architectures, s):
    """FLOPs per frame and step of each variant's schedule, counted with FlopCounterMode on meta tensors:
    ours: each window's UNet call (both CFG halves) + each frame's ControlNets once per half (reused by the next
    window); the original: each window's UNet and ControlNets (it recomputes ControlNet in every window);
    diffusers FreeNoise: one UNet call on all frames with only the motion attention windowed + ControlNets once."""
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

    from diffsynth.models.split_inference import motion_unet_eps
    from diffsynth.schedule import sliding_windows
    unet, controlnet = meta_models(architectures)
    meta = {"device": "meta", "dtype": torch.float16}
    h, w, frames = s["height"] // 8, s["width"] // 8, s["frames"]
    width = unet.config.cross_attention_dim
    units = 2

    def unet_window(n):
        sample, text = torch.empty(2 * n, 4, h, w, **meta), torch.empty(2 * n, 77, width, **meta)
        return counted(lambda: motion_unet_eps(unet, sample, text, 500, None, None, n, n, "together"))

    controlnet_sample = counted(lambda: controlnet(
        torch.empty(1, 4, h, w, **meta), 500, encoder_hidden_states=torch.empty(1, 77, width, **meta),
        controlnet_cond=torch.empty(1, 3, s["height"], s["width"], **meta), conditioning_scale=0.5,
        return_dict=False))
    windows = sliding_windows(frames, s["window"], s["stride"])
    unet_calls = {n: unet_window(n) for n in {end - start for start, end in windows}}
    unet_flops = sum(unet_calls[end - start] for start, end in windows)
    ours = unet_flops + units * 2 * frames * controlnet_sample
    original = unet_flops + sum(units * 2 * (end - start) * controlnet_sample for start, end in windows)
    settings = types.SimpleNamespace(_free_noise_context_length=s["window"], _free_noise_context_stride=s["stride"],
                                     _free_noise_weighting_scheme="pyramid", device="meta", dtype=torch.float16)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if hasattr(block, "motion_modules"):
            AnimateDiffFreeNoiseMixin._enable_free_noise_in_block(settings, block)
    from diffsynth.models.loader import use_sdpa
    use_sdpa(unet)
    free_noise_unet = counted(lambda: unet(torch.empty(2, 4, frames, h, w, **meta), 500,
                                           encoder_hidden_states=torch.empty(2 * frames, 77, width, **meta)))
    diffusers = free_noise_unet + units * 2 * frames * controlnet_sample
    per_frame = {"cached": ours / frames, "in_memory": ours / frames, "diffusers": diffusers / frames,
                 "original": original / frames}
    return per_frame, unet_flops / frames


# --------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="dry run at tiny sizes on the CPU (no original)")
    parser.add_argument("--out", help="results file (default: bench/results/gpu.json, or gpu_cpu_dry_run.json)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 10; fewer to fit a short device lease)")
    parser.add_argument("--models", help="folder of the real-size random single files (written if missing)")
    parser.add_argument("--original-python", help="the original's venv interpreter (default: the harness's venv)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = parser.parse_args()
    from diffsynth.models.libraries import quiet_libraries
    quiet_libraries()
    s = setup(args.cpu)
    if args.steps:
        s["steps"] = args.steps
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; run it on a GPU machine, or with --cpu for a dry run")
    variants = [name for name in args.variants.split(",") if name and not (args.cpu and name == "original")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"bench/gpu.py: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    device_name = torch.cuda.get_device_name() if s["device"] == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(device_name)
    results = {"device": device_name, "setup": s, "peak_fp16_tflops": peak, "load_seconds": {},
               "seconds": {}, "mfu": {}, "gpu_idle_share_by_variant": {}}
    if args.cpu:
        results["original"], results["original_not_measured"] = None, "--cpu: the original runs on a GPU only"
    frame_steps = s["frames"] * s["steps"]
    architectures = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = model_paths(args.cpu, Path(args.models) if args.models else tmp / "models")
        clip = None
        if set(variants) - {"original"}:
            from diffsynth.demo import write_synthetic_clip
            clip = write_synthetic_clip(tmp / "clip.mp4", num_frames=s["frames"], width=s["width"],
                                        height=s["height"], audio=False)

        def record(name, seconds, busy, peak_bytes):
            results[name] = frame_steps / seconds["steady"]
            results["seconds"][name] = seconds
            results["load_seconds"][name] = seconds["load"]
            results["gpu_idle_share_by_variant"][name] = busy.idle_share
            results[f"{name}_peak_vram_bytes"] = peak_bytes
            print(f"{name}: {results[name]:.3f} frame-steps/s; seconds {json.dumps(seconds, default=float)}",
                  flush=True)

        for name, cache_class in (("cached", run_cache), ("in_memory", memory_run_cache)):
            if name not in variants:
                continue
            cache = cache_class(tmp / name)
            busy = GPUBusy(s["device"])
            seconds, stages = time_ours(render_config(models, clip, tmp / name, s), cache, s, busy,
                                        io_threads=name == "cached")
            record(name, seconds, busy, peak_memory(s["device"]))
            store = stages[0].ctx.models
            architectures = {"unet": dict(store.unet.config), "controlnet": dict(store.controlnets[0].config)}
            cache.close()
            del stages
        if "diffusers" in variants:
            busy = GPUBusy(s["device"])
            seconds, pipe = time_diffusers(render_config(models, clip, tmp / "diffusers", s), clip, s, busy)
            record("diffusers", seconds, busy, peak_memory(s["device"]))
            del pipe
        if "original" in variants:
            busy = GPUBusy(s["device"])
            seconds, why = time_original(models, s, busy, tmp, args.original_python)
            if seconds is None:
                print(f"original: not measured: {why}", flush=True)
                results["original"], results["original_not_measured"] = None, why
            else:
                record("original", seconds, busy, None)
        if architectures is None:  # neither of ours ran: the real-size architectures of the shipped configs
            from diffusers import MotionAdapter, UNet2DConditionModel

            from diffsynth.models.convert import shipped_config
            from diffsynth.models.motion import motion_unet
            with torch.device("meta"):
                unet = motion_unet(UNet2DConditionModel.from_config(shipped_config("sd15_unet")),
                                   MotionAdapter.from_config(shipped_config("animatediff_motion_adapter")),
                                   load_weights=False)
            architectures = {"unet": dict(unet.config), "controlnet": shipped_config("sd15_controlnet")}
        results["flops_per_frame_step"], unet_flops_per_frame_step = flops_per_frame_step(architectures, s)
        if not args.models:
            shutil.rmtree(tmp / "models", ignore_errors=True)
    for name in variants:
        if results.get(name):
            achieved = results["flops_per_frame_step"][name] * results[name] / 1e12
            results["mfu"][name] = achieved / peak if peak else None
            results.setdefault("achieved_tflops", {})[name] = achieved
    if results.get("cached"):
        results["peak_vram_bytes"] = results["cached_peak_vram_bytes"]
        results["unet_tflops"] = unet_flops_per_frame_step * results["cached"] / 1e12
        results["unet_share_of_peak"] = results["unet_tflops"] / peak if peak else None
        results["gpu_idle_share"] = results["gpu_idle_share_by_variant"]["cached"]
        for name in ("in_memory", "diffusers", "original"):
            if results.get(name):
                key = "cache_overhead" if name == "in_memory" else f"speedup_over_{name}"
                results[key] = (1 - results["cached"] / results[name] if name == "in_memory"
                                else results["cached"] / results[name])
    print(f"{device_name} (dense fp16 peak {peak} TFLOP/s), {frame_steps} frame-steps timed after one warm-up window:")
    for name in variants:
        rate = results.get(name)
        if rate:
            mfu = results["mfu"][name]
            print(f"  {name:10s} {rate:8.3f} frame-steps/s  {results['flops_per_frame_step'][name] / 1e12:7.3f} "
                  f"TFLOP/frame-step  MFU {'n/a' if mfu is None else f'{mfu:.1%}'}  load "
                  f"{results['load_seconds'][name]:.1f} s  whole render {results['seconds'][name]['whole_render']:.1f} s")
    for key, target in (("cache_overhead", "<= 3%"), ("speedup_over_diffusers", ">= 1.0"),
                        ("speedup_over_original", ">= 1.5"), ("gpu_idle_share", "<= 5%")):
        if results.get(key) is not None:
            print(f"  {key} = {results[key]:.3f} (target {target})")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / ("gpu_cpu_dry_run.json" if args.cpu
                                                                        else "gpu.json")
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
