"""Settings measured, not guessed (issue 19): one sliding window of the denoise stage as DenoiseWindowsStage
computes it on a GPU (each ControlNet unit once for both CFG halves, then the motion UNet), real-size random
weights (bench/load.py's files), 1024×576, window 16, float16, under each candidate setting: seconds (median of 3
after a warm-up call) and whether ε is the same bits as under the shipped settings (cuDNN deterministic, no
benchmark, contiguous, PyTorch's SDPA choice, eager). Then what a resumed render needs: the same window computed in
two fresh processes, under the shipped settings and under the fastest candidate, must be `torch.equal`.

Candidates: cuDNN deterministic on/off × benchmark on/off, channels_last weights and inputs, each SDPA backend
alone (flash, memory-efficient, cuDNN), and with --compile torch.compile of the UNet (first call with an empty
inductor cache, first call in a second process with the cache filled — what a resume would pay — and steady).

    python bench/gpu_settings.py --models /tmp/models [--compile] [--out FILE]
    python bench/gpu_settings.py --cpu     # dry run: the demo's tiny models, 64×64, window 4, float32

Writes bench/results/gpu_settings.json (--cpu: gpu_settings_cpu_dry_run.json).
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def setup(cpu):
    if cpu:
        return {"width": 64, "height": 64, "window": 4, "dtype": "float32", "device": "cpu"}
    return {"width": 1024, "height": 576, "window": 16, "dtype": "float16", "device": "cuda"}


def store_for(cpu, models_folder, s):
    from gpu import model_paths

    from diffsynth.config import ModelsConfig
    from diffsynth.models.loader import ModelStore
    paths = model_paths(cpu, Path(models_folder) if models_folder else Path(tempfile.gettempdir()) / "models")
    units = [{"processor_id": "tile", "model_path": str(paths[name]), "scale": 0.5}
             for name in ("controlnet_tile", "controlnet_lineart")]
    return ModelStore(ModelsConfig(model_list=[str(paths["base"]), str(paths["motion"])], controlnet_units=units,
                                   device=s["device"], torch_dtype=s["dtype"]))


def window_inputs(store, s):
    generator = torch.Generator().manual_seed(0)
    frames, h, w = s["window"], s["height"] // 8, s["width"] // 8
    width = store.unet.config.cross_attention_dim
    return {"latents": torch.randn(frames, 4, h, w, generator=generator),
            "text": torch.randn(2 * frames, 77, width, generator=generator),
            "conditions": [torch.randint(0, 256, (frames, s["height"], s["width"], 3), generator=generator,
                                         dtype=torch.uint8) for _ in store.controlnets]}


@torch.no_grad()
def window_eps(store, inputs, unet=None, channels_last=False):
    """ε of one window with CFG 7, as the stage computes it (ControlNet halves joined, one UNet call)."""
    from diffsynth.models.split_inference import motion_unet_eps
    from diffsynth.stages.denoise import condition_input
    device, dtype = store.device, store.dtype
    frames = inputs["latents"].shape[0]
    latents = inputs["latents"].to(device, dtype)
    sample, text = torch.cat([latents, latents]), inputs["text"].to(device, dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    totals = None
    for controlnet, frames_uint8 in zip(store.controlnets, inputs["conditions"]):
        condition = condition_input(frames_uint8.to(device), dtype)
        down, mid = controlnet(sample.contiguous(memory_format=memory_format), 500, encoder_hidden_states=text,
                               controlnet_cond=torch.cat([condition, condition]).contiguous(
                                   memory_format=memory_format), conditioning_scale=0.5, return_dict=False)
        totals = [*down, mid] if totals is None else [a + b for a, b in zip(totals, [*down, mid])]
    eps = motion_unet_eps(store.unet if unet is None else unet, sample, text, 500, totals[:-1], totals[-1],
                          frames, frames, "together").float()
    negative, positive = eps.chunk(2)
    return negative + 7.0 * (positive - negative)


def synchronize(store):
    if store.device == "cuda":
        torch.cuda.synchronize()


def timed(store, fn, repeat=3):
    fn()  # warm-up (cuDNN heuristics, autotuning with benchmark on, lazy kernel loading)
    seconds = []
    for _ in range(repeat):
        synchronize(store)
        started = time.perf_counter()
        out = fn()
        synchronize(store)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), out


@contextlib.contextmanager
def cudnn_flags(deterministic, benchmark):
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


@contextlib.contextmanager
def channels_last(store):
    models = [store.unet, *store.controlnets]
    for model in models:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for model in models:
            model.to(memory_format=torch.contiguous_format)


def sdpa_only(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                         "cudnn": SDPBackend.CUDNN_ATTENTION}[name]])


CANDIDATES = {  # name → (context manager factory(store), window_eps keyword arguments)
    "shipped (deterministic, no benchmark)": (lambda store: contextlib.nullcontext(), {}),
    "deterministic off": (lambda store: cudnn_flags(False, False), {}),
    "benchmark on": (lambda store: cudnn_flags(True, True), {}),
    "deterministic off, benchmark on": (lambda store: cudnn_flags(False, True), {}),
    "channels_last": (channels_last, {"channels_last": True}),
    "sdpa flash only": (lambda store: sdpa_only("flash"), {}),
    "sdpa efficient only": (lambda store: sdpa_only("efficient"), {}),
    "sdpa cudnn only": (lambda store: sdpa_only("cudnn"), {}),
}


def one_window(args, s):
    """--one-window FILE [--setting NAME]: compute the window in this (fresh) process, save ε, print seconds."""
    from safetensors.torch import save_file
    store = store_for(args.cpu, args.models, s)
    inputs = window_inputs(store, s)
    if args.setting == "compiled":
        unet = torch.compile(store.unet)
        synchronize(store)
        started = time.perf_counter()
        eps = window_eps(store, inputs, unet=unet)
        synchronize(store)
        print(json.dumps({"first_call_seconds": time.perf_counter() - started}))
    else:
        factory, keywords = CANDIDATES[args.setting]
        with factory(store):
            eps = window_eps(store, inputs, **keywords)
    save_file({"eps": eps.cpu().contiguous()}, args.one_window)


def fresh_process(args, setting, path, env=None):
    command = [sys.executable, __file__, "--one-window", str(path), "--setting", setting]
    command += ["--cpu"] if args.cpu else ["--models", args.models]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False,
                            env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))
    if result.returncode != 0:
        raise RuntimeError(f"{setting} in a fresh process failed:\n{result.stderr[-2000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def two_process_check(args, setting, tmp):
    from safetensors.torch import load_file
    first, second = tmp / f"{len(list(tmp.iterdir()))}a.safetensors", tmp / f"{len(list(tmp.iterdir()))}b.safetensors"
    fresh_process(args, setting, first)
    fresh_process(args, setting, second)
    a, b = load_file(first)["eps"], load_file(second)["eps"]
    return {"setting": setting, "equal": torch.equal(a, b), "max_abs_difference": (a - b).abs().max().item()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="dry run: tiny models on the CPU")
    parser.add_argument("--models", help="folder of bench/load.py's real-size files (written if missing)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the UNet (minutes on a GPU)")
    parser.add_argument("--out")
    parser.add_argument("--one-window", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="shipped (deterministic, no benchmark)", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from diffsynth.models.libraries import quiet_libraries
    quiet_libraries()
    s = setup(args.cpu)
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("bench/gpu_settings.py: no CUDA device here; run it on a GPU machine, or with --cpu for a dry run")
    if args.models is None:
        args.models = str(Path(tempfile.gettempdir()) / "diffsynth_bench_load_models")
    if args.one_window:
        return one_window(args, s)
    store = store_for(args.cpu, args.models, s)
    inputs = window_inputs(store, s)
    results = {"device": torch.cuda.get_device_name() if s["device"] == "cuda" else "cpu", "setup": s,
               "candidates": {}}
    reference = None
    for name, (factory, keywords) in CANDIDATES.items():
        if name.startswith("sdpa") and s["device"] != "cuda":
            continue
        try:
            with factory(store):
                seconds, eps = timed(store, lambda keywords=keywords: window_eps(store, inputs, **keywords))
        except Exception as error:  # noqa: BLE001 - a backend this card or build lacks: say so, go on
            results["candidates"][name] = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
            continue
        reference = eps if reference is None else reference
        results["candidates"][name] = {"seconds": seconds, "same_bits_as_shipped": torch.equal(eps, reference),
                                       "max_abs_difference": (eps - reference).abs().max().item()}
        print(f"{name:40s} {seconds:8.4f} s  same bits: {torch.equal(eps, reference)}", flush=True)
    timed_candidates = {k: v for k, v in results["candidates"].items() if "seconds" in v}
    fastest = min(timed_candidates, key=lambda k: timed_candidates[k]["seconds"])
    results["fastest"] = fastest
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["two_processes"] = [two_process_check(args, setting, tmp)
                                    for setting in dict.fromkeys(["shipped (deterministic, no benchmark)", fastest])]
        for check in results["two_processes"]:
            print(f"two processes, {check['setting']}: torch.equal {check['equal']}", flush=True)
        if args.compile:
            cache = tmp / "inductor"
            env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
            first = fresh_process(args, "compiled", tmp / "compiled_a.safetensors", env)
            resumed = fresh_process(args, "compiled", tmp / "compiled_b.safetensors", env)
            compiled_unet = torch.compile(store.unet)
            steady, eps = timed(store, lambda: window_eps(store, inputs, unet=compiled_unet))
            from safetensors.torch import load_file
            results["compile"] = {
                "first_call_seconds_empty_cache": first.get("first_call_seconds"),
                "first_call_seconds_cache_filled": resumed.get("first_call_seconds"),
                "steady_seconds": steady, "eager_seconds": results["candidates"][
                    "shipped (deterministic, no benchmark)"]["seconds"],
                "same_bits_as_eager": torch.equal(eps, reference),
                "two_processes_equal": torch.equal(load_file(tmp / "compiled_a.safetensors")["eps"],
                                                   load_file(tmp / "compiled_b.safetensors")["eps"])}
            print(f"torch.compile: {results['compile']}", flush=True)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / (
        "gpu_settings_cpu_dry_run.json" if args.cpu else "gpu_settings.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"fastest: {fastest}; wrote {out}")


if __name__ == "__main__":
    main()
