"""The VRAM model (diffsynth/vram.py), measured: peak memory of one sliding window of the denoise stage with the
real-size architectures (SD1.5 UNet + AnimateDiff v2 motion module + ControlNet, configs from diffsynth/models/
configs, random weights, nothing downloaded), at small latent sizes, chunked and unchunked.

CPU (default): float32; every tensor an aten op allocates inside the window is counted while alive (a
TorchDispatchMode that adds each new storage's bytes and subtracts them when it is freed), so the peak is exact
and free of allocator noise — what torch.cuda.max_memory_allocated counts on a GPU, less its 512-byte rounding and
library workspaces. The activation coefficients are fitted by least squares on the fit points, checked on held-out
points, and the model (diffsynth/vram.py, whose coefficients come from this fit) predicts float16 peaks at
1024×576 and 1536×1536. Exit 1 if a held-out point is off by more than 15 % or 1536×1536 with window 16 /
unet_batch_size 1 / controlnet_batch_size 1 is predicted above 24 GB.

--cuda: the same windows on a GPU in float16, measured with torch.cuda.max_memory_allocated, next to the model's
prediction (for a session lent a GPU). Writes bench/results/vram.json (--cuda: vram_cuda.json).
"""

import argparse
import json
import platform
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth import vram
from diffsynth.models.split_inference import motion_unet_eps

CONFIGS = REPO / "diffsynth" / "models" / "configs"
TARGET_BYTES = 24 * 10 ** 9
HELD_OUT_TOLERANCE = 0.15

# (frames, latent h, latent w, unet_batch_size, cfg_halves, controlnet units, controlnet_batch_size)
FIT_POINTS = [
    (4, 8, 8, 4, "together", 1, 4), (4, 8, 8, 1, "together", 1, 1), (8, 8, 8, 8, "together", 1, 8),
    (8, 8, 8, 2, "together", 1, 2), (4, 8, 16, 4, "together", 0, 1), (4, 8, 16, 1, "apart", 1, 1),
    (8, 8, 16, 1, "together", 1, 8), (4, 8, 16, 2, "together", 1, 4), (4, 16, 16, 4, "apart", 0, 1),
]
HELD_OUT_POINTS = [(8, 8, 16, 4, "apart", 1, 4), (4, 16, 16, 1, "together", 1, 1), (6, 16, 8, 3, "together", 1, 2)]
CUDA_POINTS = [(16, 72, 128, 16, "together", 2, 16), (16, 72, 128, 1, "together", 2, 1),
               (16, 192, 192, 1, "together", 2, 1), (16, 192, 192, 1, "apart", 2, 1)]
# More GPU points, so a later session can refit the coefficients from float16 measurements if the CPU fit is off.
CUDA_FIT_POINTS = [(16, 64, 64, 16, "together", 2, 16), (16, 64, 64, 4, "together", 2, 4),
                   (16, 64, 64, 1, "apart", 0, 1), (16, 64, 64, 1, "together", 0, 1),
                   (8, 96, 96, 2, "together", 1, 2), (16, 128, 128, 1, "together", 2, 1),
                   (16, 128, 128, 4, "apart", 2, 4), (32, 72, 128, 1, "together", 2, 1),
                   (16, 192, 192, 2, "together", 2, 2), (16, 96, 160, 1, "together", 1, 1)]


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by the storages created by aten ops since entering, and their peak."""

    def __init__(self, *models):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, {}
        # The weights' storages (and views of them: a transposed weight is a new tensor on an old storage) are the
        # weights term, not activations.
        self.existing = {t.untyped_storage().data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]}

    def _release(self, key):
        self.live -= self.storages.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.storages or key in self.existing or storage.nbytes() == 0:
                continue
            self.storages[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key)  # freed with its storage, views or not
        return out


def build_models(device, dtype, controlnet_units):
    from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel

    from diffsynth.models.loader import use_sdpa
    from diffsynth.models.motion import motion_unet

    def config(name):
        return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}

    def randomised(model):  # built on the meta device (no slow init), then filled with small random values
        model = model.to_empty(device=device)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02)
            for buffer in model.buffers():
                buffer.zero_()
        return model

    with torch.device("meta"):
        unet2d = UNet2DConditionModel(**config("sd15_unet"))
        adapter = MotionAdapter(**config("animatediff_motion_adapter"))
        controlnets = [ControlNetModel(**config("sd15_controlnet")) for _ in range(controlnet_units)]
        unet = motion_unet(unet2d, adapter, load_weights=False)
    counts = {"unet2d": sum(p.numel() for p in unet2d.parameters()), "motion": sum(p.numel() for p in adapter.parameters()),
              "controlnet": sum(p.numel() for p in controlnets[0].parameters()) if controlnets else None}
    unet = randomised(unet).to(dtype).eval()
    controlnets = [randomised(c).to(dtype).eval() for c in controlnets]
    for model in (unet, *controlnets):
        use_sdpa(model)
    return unet, controlnets, counts


@torch.no_grad()
def window_step(unet, controlnets, point, device, dtype):
    """One window as DenoiseWindowsStage computes it on a GPU: each ControlNet group of controlnet_batch_size
    frames, both CFG halves in one call with cfg_halves together (one half at a time with apart), summed over units
    and kept per frame; the window's residuals joined; the chunked UNet."""
    frames, h, w, unet_batch, halves, units, group = point
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(frames, 4, h, w, generator=generator).to(device, dtype)
    text = torch.randn(2 * frames, 77, 768, generator=generator).to(device, dtype)
    kept = {}
    for first in range(0, frames, group):
        indices = range(first, min(first + group, frames))
        condition = torch.rand(len(indices), 3, h * 8, w * 8, generator=generator).to(device, dtype)
        per_half = []
        n = len(indices)
        calls = ([(torch.cat([latents[first:first + n]] * 2), torch.cat([text[first:][:n], text[frames + first:][:n]]),
                   torch.cat([condition, condition]))] if halves == "together" else
                 [(latents[first:first + n], text[half * frames + first:][:n], condition) for half in range(2)])
        for sample, embeddings, cond in calls:
            total = None
            for controlnet in controlnets[:units]:
                down, mid = controlnet(sample, 500, encoder_hidden_states=embeddings, controlnet_cond=cond,
                                       return_dict=False)
                total = (list(down), mid) if total is None else ([a + b for a, b in zip(total[0], down)],
                                                                 total[1] + mid)
            per_half.append(total)
        if units and halves == "together":
            per_half = [([level[:n] for level in per_half[0][0]], per_half[0][1][:n]),
                        ([level[n:] for level in per_half[0][0]], per_half[0][1][n:])]
        if units:
            for offset, index in enumerate(indices):
                kept[index] = ([torch.stack([n[offset], p[offset]]) for n, p in zip(per_half[0][0], per_half[1][0])],
                               torch.stack([per_half[0][1][offset], per_half[1][1][offset]]))
    down = mid = None
    if units:
        levels = len(kept[0][0])
        down = [torch.cat([kept[i][0][level][half:half + 1] for half in (0, 1) for i in range(frames)])
                for level in range(levels)]
        mid = torch.cat([kept[i][1][half:half + 1] for half in (0, 1) for i in range(frames)])
    sample = torch.cat([latents, latents])
    return motion_unet_eps(unet, sample, text, 500, down, mid, frames, unet_batch, halves)


def predict(point, dtype_bytes, weights=False):
    frames, h, w, unet_batch, halves, units, group = point
    bytes_ = vram.predict_vram_bytes(w * 8, h * 8, frames, unet_batch, group, units, dtype_bytes, halves)
    if not weights:
        bytes_ -= (vram.UNET_PARAMS + vram.MOTION_V2_PARAMS + units * vram.CONTROLNET_PARAMS) * dtype_bytes
    return bytes_


def features(point):
    """The model's activation terms (elements), in the order of A_WINDOW, A_CHUNK, A_RES, A_CN."""
    frames, h, w, unet_batch, halves, units, group = point
    pixels, videos = h * w, (2 if halves == "together" else 1)
    return [videos * frames * pixels, videos * min(unet_batch, frames) * pixels,
            2 * frames * pixels * (units > 0), videos * min(group, frames) * pixels * (units > 0)]


def measure_cpu():
    unet, controlnets, counts = build_models("cpu", torch.float32, 1)
    rows = []
    for split, points in (("fit", FIT_POINTS), ("held_out", HELD_OUT_POINTS)):
        for point in points:
            started = time.perf_counter()
            with LiveTensorBytes(unet, *controlnets) as tracker:
                window_step(unet, controlnets, point, "cpu", torch.float32)
            rows.append({"split": split, "point": list(point), "peak_bytes": tracker.peak,
                         "seconds": round(time.perf_counter() - started, 1)})
            print(f"  {split:8s} {point}: {tracker.peak / 2**20:8.1f} MiB  ({rows[-1]['seconds']} s)", flush=True)
    return rows, counts


def fit(rows):
    fit_rows = [r for r in rows if r["split"] == "fit"]
    x = np.array([features(tuple(r["point"])) for r in fit_rows], dtype=float)
    y = np.array([r["peak_bytes"] / 4 for r in fit_rows], dtype=float)  # float32: elements
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    return dict(zip(("A_WINDOW", "A_CHUNK", "A_RES", "A_CN"), coefficients.round(1).tolist()))


def measure_cuda():
    device, dtype = "cuda", torch.float16
    unet, controlnets, _ = build_models(device, dtype, 2)
    weights = torch.cuda.memory_allocated()
    rows = []
    for split, point in [("target", p) for p in CUDA_POINTS] + [("fit", p) for p in CUDA_FIT_POINTS]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            window_step(unet, controlnets, point, device, dtype)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        except torch.cuda.OutOfMemoryError:
            peak = None
        predicted = predict(point, 2, weights=True)
        rows.append({"split": split, "point": list(point), "measured_bytes": peak, "predicted_bytes": predicted,
                     "weights_bytes": weights, "relative_error": None if peak is None else (predicted - peak) / peak})
        print(f"  {point}: measured {peak and peak / 2**30:.2f} GiB, predicted {predicted / 2**30:.2f} GiB")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="measure float16 windows on the GPU with "
                        "torch.cuda.max_memory_allocated next to the model's prediction")
    args = parser.parse_args()
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    if args.cuda:
        rows = measure_cuda()
        (results / "vram_cuda.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                           indent=2))
        return 0
    torch.manual_seed(0)
    print("measuring one window's peak on the CPU (float32, real-size architectures, random weights):")
    rows, counts = measure_cpu()
    fitted = fit(rows)
    in_module = {name: getattr(vram, name) for name in fitted}
    print(f"parameters: UNet {counts['unet2d']:,}, motion module {counts['motion']:,}, ControlNet "
          f"{counts['controlnet']:,}")
    print(f"fitted coefficients (elements per latent pixel per sample): {fitted}")
    print(f"diffsynth/vram.py's coefficients:                          {in_module}")
    failures = []
    for row in rows:
        row["predicted_bytes"] = predict(tuple(row["point"]), 4)
        row["relative_error"] = (row["predicted_bytes"] - row["peak_bytes"]) / row["peak_bytes"]
    for row in rows:
        mark = ""
        if row["split"] == "held_out" and abs(row["relative_error"]) > HELD_OUT_TOLERANCE:
            failures.append(f"held-out {row['point']} off by {row['relative_error']:+.1%}")
            mark = "  <-- over 15 %"
        print(f"  {row['split']:8s} {tuple(row['point'])}: measured {row['peak_bytes'] / 2**20:7.1f} MiB, model "
              f"{row['predicted_bytes'] / 2**20:7.1f} MiB ({row['relative_error']:+.1%}){mark}")
    predictions = []
    print("predicted float16 peaks, 2 ControlNet units, the text encoder and VAE resident (vram_limit_level 0):")
    for width, height, unet_batch, group, halves in [
            (1024, 576, 16, 16, "together"), (1024, 576, 1, 1, "together"), (1536, 1536, 16, 16, "together"),
            (1536, 1536, 1, 1, "together"), (1536, 1536, 1, 1, "apart")]:
        value = vram.predict_vram_bytes(width, height, 16, unet_batch, group, 2, 2, halves, other_models_resident=True)
        predictions.append({"width": width, "height": height, "window": 16, "unet_batch_size": unet_batch,
                            "controlnet_batch_size": group, "cfg_halves": halves, "predicted_bytes": value})
        print(f"  {width}x{height}, window 16, unet_batch_size {unet_batch:2d}, controlnet_batch_size {group:2d}, "
              f"{halves:8s}: {value / 1e9:6.2f} GB (target 24 GB: {value / TARGET_BYTES:.2f}x)")
    target = next(p for p in predictions if (p["width"], p["unet_batch_size"], p["cfg_halves"])
                  == (1536, 1, "together"))
    if target["predicted_bytes"] > TARGET_BYTES:
        failures.append(f"1536x1536 window 16 unet_batch_size 1 predicted {target['predicted_bytes'] / 1e9:.1f} GB "
                        "> 24 GB")
    (results / "vram.json").write_text(json.dumps({
        "machine": platform.node(), "torch": torch.__version__, "dtype": "float32", "parameters": counts,
        "fitted": fitted, "module_coefficients": in_module, "points": rows, "predictions_fp16": predictions,
        "failures": failures}, indent=2))
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
