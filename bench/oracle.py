"""This project's render against the original Diffutoon (PyPI diffsynth==1.1.7), quantity by quantity.

Both sides get the same random real-size weights in the original's file layouts, the same cropped frames and the
same initial noise (this project's per-frame noise, injected into the original). Each case prints a table: initial
noise and latents, the text embeddings, every sliding window's guided ε at every step, every step's latents, and
the decoded frames. Targets: every window's ε and every step's latents within 1e-4 relative L2 of the original's,
decoded frames within ±1 grey level.

    .venv/bin/python bench/oracle.py                          # every case, CPU float32, 64×64, 12 frames, 3 steps
    .venv/bin/python bench/oracle.py --cases base --frames 8 --steps 1     # the smallest (one window, one step)

The original runs first, in its own venv and process (bench/original_diffutoon.py), then this project's side runs
here; never both at once (each holds the real-size models: ~8-10 GB of RAM). Weights, frames and the original's
venv are cached under --work (default ~/.cache/diffsynth-oracle).
"""

import argparse
import gc
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from original_diffutoon import DEFAULT_VENV, ensure_venv, run_original, write_weights  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
EPS_TARGET, LATENTS_TARGET, GREY_TARGET = 1e-4, 1e-4, 1

PROMPT = "a toon cat sitting on a garden wall, flat colors, clean lines"
NEGATIVE = "blurry, low quality"
LONG_PROMPT = ", ".join(["masterpiece", "best quality", "a toon cat", "sitting on a red brick garden wall",
                         "flat pastel colors", "clean black outlines", "soft cel shading", "a blue sky",
                         "white clouds", "green leaves", "yellow flowers", "a wooden fence", "morning light",
                         "long shadows", "anime style", "highly detailed background", "sharp focus",
                         "vivid", "warm palette", "looking at the viewer", "cute", "fluffy tail",
                         "whiskers", "big eyes", "a small bell collar", "studio lighting"])

# name → (what differs from the base case, what it exercises). The base: one tile ControlNet at 0.5, strength 1.
CASES = {
    "base": ({}, "strength 1.0, tile ControlNet 0.5"),
    "strength_0.7": ({"denoising_strength": 0.7}, "VAE encode + add_noise to the first timestep"),
    "two_controlnets": ({"controlnets": 2}, "tile 0.5 + canny 0.5"),
    "long_prompt": ({"prompt": LONG_PROMPT, "long_prompts": "diffutoon"}, "a prompt over 75 tokens"),
    "cross_frame_attention": ({"cross_frame_attention": True, "unet_batch_size": 4},
                              "self-attention over 4 frames' tokens"),
    "textual_inversion": ({"negative_prompt": "badneg, blurry", "textual_inversion": True},
                          "a textual-inversion keyword in the negative prompt"),
    "lora": ({"lora": 0.8}, "a UNet LoRA, lora_convention diffutoon, alpha 0.8"),
}
# Cases that show a bug of the original rather than a behaviour to match (not in the default list).
BUGS = {
    "controlnet_bias": ({"controlnet_bias": True},
                        "the base case with a tile ControlNet whose 13 zero-convolution biases are not zero (as in "
                        "real v1.1 files): the original's loader drops 10 of them and puts 3 on the wrong layers"),
}
CASES.update(BUGS)
# Compared with the original's base run, no run of its own there: this project before issue 18.
BEFORE = {"base_window_norm": ("base", "the base case with models.motion_norm: window (diffusers' norm, as before)")}


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import os
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}"


def write_frames(folder, count, size=64):
    """`count` synthetic frames (a bright disc moving over a gradient with stripes), already at the output size,
    so both sides' crops are the identity."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(count):
        cx, cy = 16 + 2.5 * i, 24 + 8 * np.sin(i / 3)
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < 100).astype(np.float32)
        r = 60 + 2.5 * x + 80 * disc
        g = 40 + 2.0 * y + 40 * ((x + 2 * i) % 16 < 8)
        b = 200 - 1.5 * x + 50 * disc
        image = np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def case_inputs(changes, steps, window, stride):
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "cfg_scale": 7.0, "clip_skip": 2,
              "denoising_strength": 1.0, "num_inference_steps": steps, "animatediff_batch_size": window,
              "animatediff_stride": stride, "unet_batch_size": window, "controlnet_batch_size": window,
              "cross_frame_attention": False}
    inputs.update({k: v for k, v in changes.items() if k in inputs})
    return inputs


def controlnet_units(weights, changes):
    if changes.get("controlnet_bias"):
        weights = weights["with_bias"]
    units = [{"processor_id": "tile", "model_path": str(weights["controlnets"][0]), "scale": 0.5}]
    if changes.get("controlnets", 1) == 2:
        units.append({"processor_id": "canny", "model_path": str(weights["controlnets"][1]), "scale": 0.5})
    return units


def original_spec(weights, changes, frames, noise_file, steps, window, stride):
    return {"model_list": [str(weights["sd"]), str(weights["motion"])],
            "controlnet_units": controlnet_units(weights, changes),
            "textual_inversion_folder": str(weights["textual_inversion_folder"])
            if changes.get("textual_inversion") else None,
            "loras": [[str(weights["lora"]), changes["lora"]]] if "lora" in changes else [],
            "frames": str(frames), "noise": str(noise_file), "device": "cpu", "torch_dtype": "float32",
            "pipeline_inputs": case_inputs(changes, steps, window, stride)}


def our_config(weights, changes, frames, run_folder, steps, window, stride, motion_norm="frame"):
    from diffsynth.config import parse_config
    inputs = case_inputs(changes, steps, window, stride)
    if "long_prompts" in changes:
        inputs["long_prompts"] = changes["long_prompts"]
    models = {"model_list": [str(weights["sd"]), str(weights["motion"])],
              "controlnet_units": controlnet_units(weights, changes), "device": "cpu", "torch_dtype": "float32",
              "motion_norm": motion_norm}
    if changes.get("textual_inversion"):
        models["textual_inversion_folder"] = str(weights["textual_inversion_folder"])
    if "lora" in changes:
        models["model_list"].append(str(weights["lora"]))
        models.update(lora_alphas=[changes["lora"]], lora_convention="diffutoon")
    return parse_config({"models": models,
                         "data": {"input_frames": {"image_folder": str(frames), "width": 64, "height": 64},
                                  "output_folder": str(run_folder)},
                         "pipeline": {"seed": 0, "pipeline_inputs": inputs}})


class Stores:
    """ModelStores for the cases, sharing what they can: one store per models config, and the UNet and VAE of an
    earlier store with the same base model and LoRAs (the real-size UNet is ~3.4 GB in float32)."""

    def __init__(self):
        self.stores = {}

    def get(self, models_config):
        from diffsynth.models.loader import ModelStore
        from diffsynth.models.motion import set_motion_norm
        key = models_config.model_dump_json(exclude={"motion_norm"})
        if key not in self.stores:
            store = ModelStore(models_config)
            for other in self.stores.values():
                if other.files.base == store.files.base and other.files.loras == store.files.loras:
                    for name in ("unet", "vae"):
                        if name in other.__dict__:
                            store.__dict__[name] = other.__dict__[name]
            if store.files.loras:  # a merged UNet: the others are no longer needed (cases with a LoRA run last)
                self.stores.clear()
                gc.collect()
            self.stores[key] = store
        store = self.stores[key]
        set_motion_norm(store.unet, models_config.motion_norm)  # the one UNet object, norm as this case says
        if hasattr(store.unet, "cross_frame_processor"):  # a cross_frame_attention case ran on this UNet before
            from diffsynth.models.loader import use_sdpa
            del store.unet.cross_frame_processor
            use_sdpa(store.unet)
        store.config = models_config
        return store


def run_ours(config, store):
    """Run this project's stages up to the VAE decode, reading each stage's units as soon as it is done (the
    denoising intermediates are released once the next step is)."""
    from diffsynth.cache import RunCache, bytes_to_image, bytes_to_tensors
    from diffsynth.pipeline import RenderContext, build_stages
    from diffsynth.runner import run_stages
    from diffsynth.stages.prompts import EMBEDDINGS_KEY

    cache = RunCache(config.data.output_folder)
    stages = build_stages(RenderContext(config, cache, store))
    out, windows = {}, None
    started = time.perf_counter()
    for index, stage in enumerate(stages):
        run_stages(stages[:index + 1], cache, progress=False)
        keys = stage.unit_keys()
        name = stage.name
        if name == "prompts":
            embeddings = bytes_to_tensors(cache.read(name, EMBEDDINGS_KEY))
            out["prompt.positive"], out["prompt.negative"] = embeddings["positive"], embeddings["negative"]
        elif name == "latents":
            out["latents.init"] = torch.stack([bytes_to_tensors(cache.read(name, k))["latent"] for k in keys])
        elif name.endswith(".windows"):
            k = int(name.split(".")[1])
            windows = stage.windows
            for j, key in enumerate(keys):
                out[f"eps.{k}.{j}"] = bytes_to_tensors(cache.read(name, key))["eps"]
        elif name.endswith(".step"):
            k = int(name.split(".")[1])
            out[f"latents.{k}"] = torch.stack([bytes_to_tensors(cache.read(name, key))["latent"] for key in keys])
        elif name == "vae_decode":
            out["frames"] = torch.from_numpy(np.stack([bytes_to_image(cache.read(name, key)) for key in keys]))
            break
    cache.close()
    return out, {"windows": windows, "seconds": time.perf_counter() - started}


def save_original(folder, result):
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result["tensors"].items()}, folder / "result.safetensors")
    (folder / "info.json").write_text(json.dumps(result["info"], indent=1))
    (folder / "DONE").write_text("complete\n")


def load_original(folder):
    from safetensors.torch import load_file
    return {"tensors": load_file(folder / "result.safetensors"), "info": json.loads((folder / "info.json").read_text())}


def rel_l2(ours, theirs):
    ours, theirs = ours.double().flatten(), theirs.double().flatten()
    return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()


def compare(ours, theirs, steps, windows):
    """Rows (quantity, rel L2, max abs, max |value|) and the case's summary figures."""
    rows = []

    def row(name, a, b):
        a, b = a.double().reshape(b.shape), b.double()
        rows.append({"quantity": name, "rel_l2": rel_l2(a, b), "max_abs": (a - b).abs().max().item(),
                     "max_value": b.abs().max().item()})
        return rows[-1]["rel_l2"]

    row("initial noise (injected)", theirs["noise"], theirs["noise"])
    row("initial latents x_T", ours["latents.init"], theirs["latents.init"])
    for half in ("positive", "negative"):
        theirs_emb = theirs[f"prompt.{half}"].reshape(-1, theirs[f"prompt.{half}"].shape[-1])
        ours_emb = ours[f"prompt.{half}"].reshape(-1, theirs_emb.shape[-1])
        label = f"text embedding, {half} ({theirs_emb.shape[0]} tokens)"
        if ours_emb.shape[0] != theirs_emb.shape[0]:  # this project pads both halves to the longer one's chunks
            label = f"text embedding, {half} (first {theirs_emb.shape[0]} of our {ours_emb.shape[0]} tokens)"
            ours_emb = ours_emb[:theirs_emb.shape[0]]
        row(label, ours_emb, theirs_emb)
    eps = [row(f"ε step {k} window {j} {tuple(windows[j])}", ours[f"eps.{k}.{j}"], theirs[f"eps.{k}.{j}"])
           for k in range(steps) for j in range(len(windows))]
    latents = [row(f"latents after step {k}", ours[f"latents.{k}"], theirs[f"latents.{k}"]) for k in range(steps)]
    frames_ours = ours["frames"].int()
    frames_theirs = theirs["frames"].int()
    rounded = ((theirs["decoded"].permute(0, 2, 3, 1).double() / 2 + 0.5).clamp(0, 1) * 255).round().int()
    difference = frames_ours - frames_theirs
    grey = {"max_grey_diff": difference.abs().max().item(), "mean_abs_grey_diff": difference.abs().double().mean().item(),
            "grey_diff_values": sorted(set(difference.flatten().tolist())),
            "max_grey_diff_vs_rounded_original": (frames_ours - rounded).abs().max().item()}
    summary = {"eps_rel_l2_max": max(eps), "latents_rel_l2_max": max(latents),
               "final_latents_rel_l2": latents[-1], **grey}
    summary["meets_targets"] = (summary["eps_rel_l2_max"] <= EPS_TARGET
                                and summary["latents_rel_l2_max"] <= LATENTS_TARGET
                                and summary["max_grey_diff"] <= GREY_TARGET)
    return rows, summary


def print_case(name, description, rows, summary):
    print(f"\n### {name}: {description}\n")
    print("| quantity | rel L2 | max abs | max abs value |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['quantity']} | {r['rel_l2']:.2e} | {r['max_abs']:.2e} | {r['max_value']:.3g} |")
    print(f"| decoded frames (uint8) | max {summary['max_grey_diff']} grey levels, mean "
          f"{summary['mean_abs_grey_diff']:.3f}, differences {summary['grey_diff_values']}; against the original's "
          f"float output rounded: max {summary['max_grey_diff_vs_rounded_original']} | | |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join([*(n for n in CASES if n not in BUGS), *BEFORE]),
                        help=f"comma-separated, from {', '.join([*CASES, *BEFORE])} (default: all but "
                             f"{', '.join(BUGS)})")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--work", type=Path, default=DEFAULT_VENV.parent, help="weights, frames, the runs")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the original's virtual environment")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "oracle.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on each side (1: on a shared 2-core box more threads only spin)")
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES and n not in BEFORE]
    if unknown:
        parser.error(f"unknown case {unknown[0]}")
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)

    python = ensure_venv(args.venv)
    weights = write_weights(args.work / "weights")
    if any(CASES.get(n, ({},))[0].get("controlnet_bias") for n in names):
        weights["with_bias"] = write_weights(args.work / "weights", controlnet_zero_conv_bias=True)
    frames = write_frames(args.work / f"frames{args.frames}", args.frames)
    from safetensors.torch import save_file

    from diffsynth.schedule import frame_noise
    noise = torch.stack([frame_noise(0, i, (4, 8, 8)) for i in range(args.frames)])  # this project's, seed 0
    noise_file = args.work / f"noise{args.frames}.safetensors"
    save_file({"noise": noise}, noise_file)
    shape = (args.steps, args.window, args.stride)

    # The original first (its own process; it exits before this side loads anything).
    original_cases = [n for n in CASES if n in names or any(BEFORE[b][0] == n for b in names if b in BEFORE)]
    original_cases.sort(key=lambda n: "lora" in CASES[n][0])  # a LoRA is merged into the loaded UNet: last
    specs = [original_spec(weights, CASES[n][0], frames, noise_file, *shape) for n in original_cases]
    # The original's results are kept under --work, one folder per case by what was asked (the weights are fixed
    # once written), so a rerun of this side, or of a few cases, does not run the original again.
    harness = Path(__file__).with_name("original_diffutoon.py").read_bytes().hex()
    folders = [args.work / "original" / hashlib.sha256(json.dumps([spec, harness], sort_keys=True).encode())
               .hexdigest()[:16] for spec in specs]
    work = Path(tempfile.mkdtemp(prefix="oracle-", dir=args.work))
    try:
        started = time.perf_counter()
        missing = [i for i, folder in enumerate(folders) if not (folder / "DONE").exists()]
        if missing:
            fresh = run_original([specs[i] for i in missing], work / "original", python, threads=args.threads)
            for i, result in zip(missing, fresh):
                save_original(folders[i], result)
        original_seconds = time.perf_counter() - started
        results = [load_original(folder) for folder in folders]
        print(f"the original: {len(missing)} case(s) run, {len(specs) - len(missing)} reused from {args.work}")
        theirs = {n: r for n, r in zip(original_cases, results)}

        stores, report = Stores(), {}
        ours_order = [n for n in CASES if n in names] + [n for n in BEFORE if n in names]
        ours_order = sorted(ours_order, key=lambda n: "lora" in CASES.get(n, ({},))[0])  # the LoRA's UNet last
        for name in ours_order:
            base_name, description = (name, CASES[name][1]) if name in CASES else BEFORE[name]
            changes = CASES[base_name][0]
            config = our_config(weights, changes, frames, work / "ours" / name, *shape,
                                motion_norm="window" if name in BEFORE else "frame")
            ours, info = run_ours(config, stores.get(config.models))
            rows, summary = compare(ours, theirs[base_name]["tensors"], args.steps, info["windows"])
            print_case(name, description, rows, summary)
            report[name] = {"description": description, "rows": rows, "summary": summary,
                            "ours_seconds": info["seconds"],
                            "original_timings": theirs[base_name]["info"]["timings"],
                            "timesteps": theirs[base_name]["info"]["timesteps"]}
            write_json(args, report, original_seconds)  # as it goes: a long run keeps what it measured
        del stores
    finally:
        shutil.rmtree(work, ignore_errors=True)

    write_json(args, report, original_seconds)
    print(f"\nwritten {args.json}")
    print("\n| case | ε rel L2 (max over windows, steps) | latents rel L2 (max over steps) | decoded frames max "
          "grey diff | targets |")
    print("| --- | --- | --- | --- | --- |")
    for name, entry in report.items():
        s = entry["summary"]
        print(f"| {name} | {s['eps_rel_l2_max']:.2e} | {s['latents_rel_l2_max']:.2e} | {s['max_grey_diff']} | "
              f"{'met' if s['meets_targets'] else 'NOT met'} |")
    return report


def write_json(args, report, original_seconds):
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": machine(), "setting": {"device": "cpu", "dtype": "float32", "size": 64, "frames": args.frames,
                                          "window": args.window, "stride": args.stride, "steps": args.steps,
                                          "cfg_scale": 7.0, "clip_skip": 2, "tile_scale": 0.5},
        "targets": {"eps_rel_l2": EPS_TARGET, "latents_rel_l2": LATENTS_TARGET, "grey_levels": GREY_TARGET},
        "original_seconds": original_seconds, "cases": report}, indent=1))


if __name__ == "__main__":
    main()
