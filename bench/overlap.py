"""How long the compute thread waits on the disk cache in the VAE-decode stage at 1280×768: the share of the stage's
wall time spent inside RunCache.read (reading and checksumming inputs) and RunCache.write (writing, fsyncing,
committing results) on the thread that runs the model, without and with the runner's I/O threads (a reader that
prefetches the next unit's declared inputs, a writer that commits the previous unit). Target with threads: ≤ 5 %.

The VAE is the tiny demo model's (small widths, real architecture) in float32, so the decode itself is far cheaper
than a real one and the disk's share is larger than in a real render: a strict test. Writes
bench/results/overlap.json.
"""

import json
import os
import platform
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.cache import RunCache, tensors_to_bytes  # noqa: E402
from diffsynth.models.tiny import make_vae  # noqa: E402
from diffsynth.runner import run_stages  # noqa: E402
from diffsynth.stages.base import Stage, frame_key  # noqa: E402
from diffsynth.stages.vae_decode import VaeDecodeStage  # noqa: E402

WIDTH, HEIGHT, FRAMES = 1280, 768, 16


class RandomLatents(Stage):
    """Stage standing in for the final denoising step: one random latent per frame."""
    name = "latents"

    def unit_keys(self):
        return [frame_key(i) for i in range(FRAMES)]

    def compute(self, key):
        generator = torch.Generator().manual_seed(int(key.split(".")[0]))
        return tensors_to_bytes({"latent": torch.randn(4, HEIGHT // 8, WIDTH // 8, generator=generator)}), None


class Models:
    device = "cpu"

    def __init__(self):
        self.vae = make_vae().eval()

    def identity(self, *components):
        return {"vae": "tiny"}

    def vae_tile(self, height, width):
        return None  # whole frames, as this benchmark has always decoded them


class Context:
    def __init__(self, cache):
        self.cache, self.models = cache, Models()
        frames = types.SimpleNamespace(height=HEIGHT, width=WIDTH)
        self.config = types.SimpleNamespace(data=types.SimpleNamespace(input_frames=frames))


def measure(io_threads):
    """(share of the VAE-decode stage's wall time the model's thread spent in cache reads and writes, wall s)."""
    waited = {"seconds": 0.0}
    model_thread = threading.get_ident()

    def timed(method):
        def wrapper(*args, **kwargs):
            if threading.get_ident() != model_thread:
                return method(*args, **kwargs)
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                waited["seconds"] += time.perf_counter() - started
        return wrapper

    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        cache = RunCache(Path(tmp) / "run")
        ctx = Context(cache)
        latents = RandomLatents(ctx)
        run_stages([latents], cache, progress=False)
        decode = VaeDecodeStage(ctx, latents)
        cache.read, cache.write = timed(cache.read), timed(cache.write)
        started = time.perf_counter()
        run_stages([latents, decode], cache, progress=False, io_threads=io_threads)
        wall = time.perf_counter() - started
        cache.close()
    return waited["seconds"] / wall, wall


def main():
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    measure(io_threads=False)  # warm-up: first model call, page cache
    before, wall_before = measure(io_threads=False)
    after, wall_after = measure(io_threads=True)
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "size": [WIDTH, HEIGHT], "frames": FRAMES,
              "wait_share_without_io_threads": round(before, 4), "wait_share_with_io_threads": round(after, 4),
              "stage_seconds_without": round(wall_before, 2), "stage_seconds_with": round(wall_after, 2),
              "target_share": 0.05}
    print(f"VAE decode at {WIDTH}x{HEIGHT}, {FRAMES} frames: the model's thread waits on the cache "
          f"{before:.1%} of the stage without I/O threads ({wall_before:.1f} s), {after:.1%} with them "
          f"({wall_after:.1f} s); target <= 5%")
    out = REPO / "bench" / "results" / "overlap.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    sys.exit(0 if after <= 0.05 else 1)


if __name__ == "__main__":
    main()
