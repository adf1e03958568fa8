"""Cache write + read cost per frame per stage at 1280×768: target ≤ 30 ms.

For each kind of unit a stage writes — a PNG frame (decode, crop, annotate, VAE decode, final frames), a latent
(initial latents, each denoising step) and a sliding window's ε (16 frames, shared by 16 frames, so counted per
frame) — time RunCache.write (temp file, fsync, rename, folder fsync, checksum, manifest row) plus RunCache.read
(with checksum verification). Writes bench/results/cache_cost.json.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.cache import (RunCache, bytes_to_image, bytes_to_tensors, image_to_bytes,  # noqa: E402
                             tensors_to_bytes)
from diffsynth.demo import synthetic_frame  # noqa: E402

WIDTH, HEIGHT, FRAMES, WINDOW = 1280, 768, 24, 16


def time_units(cache, stage, payloads, encode, decode):
    """Median over units of write + read time in ms (the median, because this machine's other work adds spikes)."""
    times = []
    for index, payload in enumerate(payloads):
        started = time.perf_counter()
        cache.write(stage, f"{index:06d}", encode(payload))
        decode(cache.read(stage, f"{index:06d}"))
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main():
    generator = torch.Generator().manual_seed(0)
    images = [synthetic_frame(i, WIDTH, HEIGHT) for i in range(FRAMES)]
    # Real frames are noisier than the synthetic pattern; add grain so PNG sizes are realistic (~2 MB).
    images = [np.clip(im.astype(np.int16) + np.random.default_rng(i).integers(-6, 7, im.shape), 0, 255)
              .astype(np.uint8) for i, im in enumerate(images)]
    latents = [torch.randn(4, HEIGHT // 8, WIDTH // 8, generator=generator) for _ in range(FRAMES)]
    windows = [torch.randn(WINDOW, 4, HEIGHT // 8, WIDTH // 8, generator=generator) for _ in range(5)]
    results = {}
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        cache = RunCache(tmp)
        results["frame image (decode/crop/annotate/vae_decode)"] = time_units(
            cache, "png", images, image_to_bytes, bytes_to_image)
        results["latent (latents, denoise step)"] = time_units(
            cache, "latent", latents, lambda t: tensors_to_bytes({"latent": t}), bytes_to_tensors)
        results["window eps, per frame (denoise windows)"] = time_units(
            cache, "eps", windows, lambda t: tensors_to_bytes({"eps": t}), bytes_to_tensors) / WINDOW
        png_size = cache.bytes_on_disk("png") / FRAMES
        cache.close()
    worst = max(results.values())
    print(f"cache write+read per frame at {WIDTH}×{HEIGHT} (target ≤ 30 ms):")
    for name, ms in results.items():
        print(f"  {name:<55} {ms:7.2f} ms   ratio to target {ms / 30:.2f}")
    print(f"worst {worst:.2f} ms: {'OK' if worst <= 30 else 'OVER TARGET'}; frame image {png_size / 1e6:.2f} MB")
    out = {"ms_per_frame": {k: round(v, 2) for k, v in results.items()}, "worst_ms": round(worst, 2),
           "target_ms": 30, "png_frame_bytes": int(png_size), "width": WIDTH, "height": HEIGHT}
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "cache_cost.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
