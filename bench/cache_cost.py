"""Cache write + read cost per frame per stage at 1280×768: target ≤ 30 ms; and the candidate frame formats.

For each kind of unit a stage writes — a cached frame (crop, VAE decode, smoothing; the format of
`cache.image_to_bytes`), a one-channel edge map (annotate), a frames/ PNG (encode), a latent (initial latents, each
denoising step) and a sliding window's ε (16 frames, shared by 16 frames, so counted per frame) — time
RunCache.write (temp file, fsync, rename, folder fsync, checksum, manifest row) plus RunCache.read (with checksum
verification) plus the format's encode and decode. frames/ PNGs are written once and never read back by the render,
so theirs is the write alone; they are an optional output (`data.save_frames`), reported beside the cache units
and not part of the verdict. Each figure is given as wall time and as this process's CPU time (which other jobs on
the machine do not inflate; fsync waits are in the wall time only).

Before that, the candidate lossless formats are measured on their own (encode + decode, size) on three kinds of
1280×768 frame: a frame of an H.264 video decoded at 1920×1152 and resized (what the crop stage stores), a smooth
gradient with low-frequency texture and fine grain (hard for every predictor), and the synthetic demo pattern with
grain. `--photo FILE` adds a photograph. Optional candidates (qoi, lz4) are skipped when not installed.
Writes bench/results/cache_cost.json.
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import zstandard
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.cache import (RunCache, bytes_to_image, bytes_to_tensors, image_to_bytes,  # noqa: E402
                             image_to_png, tensors_to_bytes)
from diffsynth.demo import synthetic_frame, write_synthetic_clip  # noqa: E402
from diffsynth.video import read_video_frames  # noqa: E402

WIDTH, HEIGHT, FRAMES, WINDOW = 1280, 768, 24, 16


def video_frames(folder, count):
    """Frames of an H.264 clip (crf 12, yuv420p) decoded at 1.5× the output size and resized to it."""
    clip = write_synthetic_clip(Path(folder) / "clip.mp4", num_frames=count, width=WIDTH * 3 // 2,
                                height=HEIGHT * 3 // 2, audio=False)
    return [cv2.resize(frame, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA) for frame in read_video_frames(clip)]


def gradient_texture(seed):
    """A smooth gradient, low- and mid-frequency texture and σ 2.5 grain: no flat areas, no repeats."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.stack([x / WIDTH * 200 + 20, y / HEIGHT * 180 + 40, (x + y) / (WIDTH + HEIGHT) * 150 + 60], -1)
    low = cv2.resize(rng.normal(0, 25, (HEIGHT // 16, WIDTH // 16, 3)).astype(np.float32), (WIDTH, HEIGHT),
                     interpolation=cv2.INTER_CUBIC)
    mid = cv2.resize(rng.normal(0, 10, (HEIGHT // 4, WIDTH // 4, 3)).astype(np.float32), (WIDTH, HEIGHT))
    return np.clip(base + low + mid + rng.normal(0, 2.5, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)


def grainy_pattern(index):
    image = synthetic_frame(index, WIDTH, HEIGHT)
    return np.clip(image.astype(np.int16) + np.random.default_rng(index).integers(-6, 7, image.shape), 0, 255) \
        .astype(np.uint8)


def candidates():
    """name → (encode, decode) of the lossless formats considered for cached frames."""
    def pil_png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def zstd_raw(array):
        return zstandard.ZstdCompressor(level=1).compress(array.tobytes())

    formats = {
        "raw safetensors (before)": (lambda a: tensors_to_bytes({"image": torch.from_numpy(a.copy())}),
                                     lambda b: bytes_to_tensors(b)["image"].numpy()),
        "PNG, Pillow compress_level 1": (pil_png, lambda b: np.asarray(Image.open(io.BytesIO(b)))),
        "PNG, OpenCV level 1 + RLE (frames/)": (image_to_png,
                                                lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), -1)[..., ::-1]),
        "zstd 1, raw bytes": (zstd_raw, lambda b: zstandard.ZstdDecompressor().decompress(b)),
        "zstd 1, left-difference filter": (
            lambda a: zstd_raw(np.concatenate([a[:, :1], np.diff(a, axis=1)], axis=1)),
            lambda b: np.cumsum(np.frombuffer(zstandard.ZstdDecompressor().decompress(b), np.uint8)
                                .reshape(HEIGHT, WIDTH, 3), axis=1, dtype=np.uint8)),
        "zstd 1, 2-D gradient filter (chosen)": (image_to_bytes, bytes_to_image),
    }
    try:
        import qoi
        formats["QOI"] = (lambda a: qoi.encode(np.ascontiguousarray(a)), qoi.decode)
    except ImportError:
        pass
    try:
        import lz4.frame
        formats["lz4, raw bytes"] = (lambda a: lz4.frame.compress(a.tobytes()), lz4.frame.decompress)
    except ImportError:
        pass
    return formats


def time_format(encode, decode, image, repeats=5):
    encode_ms, decode_ms, cpu_ms = [], [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        data = encode(image)
        encode_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        decode(data)
        decode_ms.append((time.perf_counter() - started) * 1000)
        cpu_ms.append((time.process_time() - cpu) * 1000)
    return {"bytes": len(data), "encode_ms": round(statistics.median(encode_ms), 1),
            "decode_ms": round(statistics.median(decode_ms), 1), "cpu_ms": round(statistics.median(cpu_ms), 1)}


def time_units(cache, stage, payloads, encode, decode, path=None):
    """Median over units of write + read time in ms (the median, because this machine's other work adds spikes).
    `path`: a final output (frames/…png) — write only, as the render never reads it back."""
    times, cpu_times = [], []
    for index, payload in enumerate(payloads):
        started, cpu = time.perf_counter(), time.process_time()
        cache.write(stage, f"{index:06d}", encode(payload), path=path(index) if path else None)
        if decode:
            decode(cache.read(stage, f"{index:06d}"))
        times.append((time.perf_counter() - started) * 1000)
        cpu_times.append((time.process_time() - cpu) * 1000)
    CPU_MS[stage] = statistics.median(cpu_times)
    return statistics.median(times)


CPU_MS = {}  # stage → median CPU ms of its units (time_units)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", help="also measure the formats on this picture (resized to 1280×768)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        decoded = video_frames(tmp, FRAMES)
    kinds = {"H.264 frame, decoded at 1920×1152, resized": decoded, "gradient + texture + grain":
             [gradient_texture(i) for i in range(FRAMES)], "demo pattern + grain": [grainy_pattern(i)
                                                                                   for i in range(FRAMES)]}
    if args.photo:
        photo = cv2.cvtColor(cv2.imread(args.photo), cv2.COLOR_BGR2RGB)
        kinds["photo"] = [cv2.resize(photo, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)]
    edges = [cv2.Canny(frame, 100, 200) for frame in decoded]

    formats = {}
    print(f"lossless formats at {WIDTH}×{HEIGHT} (MB, encode + decode ms; median of 5):")
    for name, (encode, decode) in candidates().items():
        formats[name] = {kind: time_format(encode, decode, frames[len(frames) // 2]) for kind, frames in kinds.items()}
        print(f"  {name:<40}" + "".join(f" | {r['bytes'] / 1e6:5.2f} MB {r['encode_ms']:5.1f} + {r['decode_ms']:5.1f}"
                                         f" (cpu {r['cpu_ms']:5.1f})" for r in formats[name].values()), flush=True)
    print("  columns: " + "; ".join(kinds))

    latents = [torch.randn(4, HEIGHT // 8, WIDTH // 8, generator=generator) for _ in range(FRAMES)]
    windows = [torch.randn(WINDOW, 4, HEIGHT // 8, WIDTH // 8, generator=generator) for _ in range(5)]
    results = {}
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        cache = RunCache(tmp)
        for kind, frames in kinds.items():
            if len(frames) > 1:
                results[f"cached frame (crop/vae_decode/smooth): {kind}"] = time_units(
                    cache, f"frame {kind}", frames, image_to_bytes, bytes_to_image)
        results["edge map, one channel (annotate)"] = time_units(cache, "edges", edges, image_to_bytes,
                                                                 bytes_to_image)
        results["frames/ PNG, write only (encode)"] = time_units(
            cache, "png", decoded, image_to_png, None, path=lambda i: f"frames/{i:05d}.png")
        results["latent (latents, denoise step)"] = time_units(
            cache, "latent", latents, lambda t: tensors_to_bytes({"latent": t}), bytes_to_tensors)
        results["window eps, per frame (denoise windows)"] = time_units(
            cache, "eps", windows, lambda t: tensors_to_bytes({"eps": t}), bytes_to_tensors) / WINDOW
        CPU_MS["eps"] /= WINDOW
        sizes = {name: cache.bytes_on_disk(name) / FRAMES for name in
                 [f"frame {kind}" for kind, frames in kinds.items() if len(frames) > 1] + ["edges", "png"]}
        cache.close()
    cpu = dict(zip(results, CPU_MS.values()))
    worst = max(ms for name, ms in results.items() if not name.startswith("frames/"))
    print(f"cache write+read per frame at {WIDTH}×{HEIGHT} (target ≤ 30 ms), wall (CPU):")
    for name, ms in results.items():
        print(f"  {name:<70} {ms:7.2f} ms ({cpu[name]:6.2f})   ratio to target {ms / 30:.2f}")
    print("mean stored bytes per unit: " + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items()))
    print(f"worst cache unit {worst:.2f} ms: {'OK' if worst <= 30 else 'OVER TARGET'} (frames/ PNGs, optional: "
          f"{results['frames/ PNG, write only (encode)']:.1f} ms)")
    out = {"ms_per_frame": {k: round(v, 2) for k, v in results.items()},
           "cpu_ms_per_frame": {k: round(v, 2) for k, v in cpu.items()}, "worst_ms": round(worst, 2),
           "load_average": os.getloadavg(),
           "target_ms": 30, "bytes_per_unit": {k: int(v) for k, v in sizes.items()}, "formats": formats,
           "width": WIDTH, "height": HEIGHT}
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "cache_cost.json").write_text(json.dumps(out, indent=2))
    return 0 if worst <= 30 else 1


if __name__ == "__main__":
    sys.exit(main())
