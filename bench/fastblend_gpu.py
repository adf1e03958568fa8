"""FastBlend on one GPU: ours (the fused Triton kernels) against the original cupy FastBlend on the same card.

The same guide and style frames (a textured scene panning 1–1.5 px a frame; the style is the scene with a per-frame
gain, colour bias and noise, so style ≠ guide), 64 frames at 768×512 and 1280×768, fast and balanced modes, window 30,
the original's defaults otherwise (batch 8, patches 13…5, guide weight 10, identity start). Per mode and size:
frames/s of each (the same work timed: the whole smoothing of the clip from frames in memory to frames in memory,
after an untimed warm-up at the same size that compiles each side's kernels), peak VRAM of each, and the mean
absolute difference of the two outputs (uint8; close, not equal: different random draws, and the original
truncates where we round). Target (issue 20): ours ≥ 2× the original's frames/s in fast mode, MAE ≤ 2 grey levels.

The original runs in a process of its own (its package is also called `diffsynth`): its FastBlend folder is taken
from the PyPI wheel `diffsynth==1.1.7` and loaded under another name, which needs only numpy, cupy, opencv, Pillow
and tqdm (importing `diffsynth` 1.1.7 itself would pull transformers, modelscope, controlnet-aux…). On a machine that
reaches no registry, bring the wheel (prepared here, where pip works):

    python -m pip download --no-deps --only-binary=:all: -d .whl diffsynth==1.1.7
    python bench/fastblend_gpu.py --original-wheel .whl/diffsynth-1.1.7-py3-none-any.whl [--original-python PY]

Or `--original-venv VENV`: the venv issue 18's harness builds for the whole original (bench/original_diffutoon.py
`ensure_venv`; on a GPU machine `bench/gpu_device_run.sh original`): its installed FastBlend folder and interpreter
are used, loaded the same way. `--original-python` is the interpreter that has cupy (default: this one). Use the
cupy already there, built for the machine's CUDA (the lent H200's image has cupy-cuda13x): the `cupy-cuda12x` wheel
the original names is 136 MB (14.2.0, cp312), over the 64 MiB a device call can carry. Elsewhere, `pip install
cupy-cuda12x` (or -13x, to match the driver) in the interpreter given. Writes bench/results/fastblend_gpu.json.
`--cpu`: ours only, at a tiny size, on the CPU (the CI smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((768, 512), (1280, 768))  # (width, height)
MODES = ("fast", "balanced")
# The original FastBlend's defaults (its FastBlendSmoother / runners), window 30 as in the reference figure.
ORIGINAL_CONFIG = {"minimum_patch_size": 5, "threads_per_block": 8, "num_iter": 5, "gpu_id": 0,
                   "guide_weight": 10.0, "initialize": "identity", "tracking_window_size": 0}
BATCH_SIZE, WINDOW = 8, 30
FASTBLEND_IN_WHEEL = "diffsynth/extensions/FastBlend/"


class PeakDeviceMemory:
    """Peak of the device's used memory (total − free, all processes) above its level at start, sampled every
    10 ms by a thread: the same measure for both sides, whatever allocator each uses."""

    def __init__(self, mem_get_info):
        self.mem_get_info, self.peak, self._done = mem_get_info, 0, threading.Event()
        free, total = mem_get_info()
        self.baseline = total - free

    def _sample(self):
        while not self._done.is_set():
            free, total = self.mem_get_info()
            self.peak = max(self.peak, total - free - self.baseline)
            time.sleep(0.01)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------------------------------
# The original, in its own process (this function imports nothing of ours)


def load_original_fastblend(folder: Path):
    """The original FastBlend package from `folder` (its __init__.py), under the name `original_fastblend`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("original_fastblend", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["original_fastblend"] = module
    spec.loader.exec_module(module)
    return module


def original_worker(args) -> None:
    import cupy as cp
    import numpy as np
    from PIL import Image

    fastblend = load_original_fastblend(Path(args.fastblend_dir))
    from original_fastblend.runners.balanced import BalancedModeRunner

    data = np.load(args.frames)
    guide, style = list(data["guide"]), list(data["style"])

    def smooth(guide, style):
        if args.mode == "fast":  # what Diffutoon's pipeline calls: frames in, PIL frames out
            frames = fastblend.FastBlendSmoother().run(guide, style, BATCH_SIZE, WINDOW, dict(ORIGINAL_CONFIG))
            return np.stack([np.asarray(frame) for frame in frames])
        # The balanced runner only saves its frames as PNGs: keep them in memory instead (no encoding timed).
        kept = {}
        save = Image.Image.save
        Image.Image.save = lambda image, path, *a, **k: kept.__setitem__(os.path.basename(path), np.asarray(image))
        try:
            BalancedModeRunner().run(guide, style, BATCH_SIZE, WINDOW, dict(ORIGINAL_CONFIG), save_path="mem")
        finally:
            Image.Image.save = save
        return np.stack([kept["%05d.png" % i] for i in range(len(guide))])

    smooth(guide[:4], style[:4])  # warm-up: compiles the RawKernels at this size
    cp.cuda.Device(0).synchronize()
    with PeakDeviceMemory(cp.cuda.runtime.memGetInfo) as memory:
        start = time.perf_counter()
        out = smooth(guide, style)
        cp.cuda.Device(0).synchronize()
        seconds = time.perf_counter() - start
    np.save(args.result, out)
    print(json.dumps({"seconds": seconds, "peak_vram_mib": memory.peak / 2**20, "cupy": cp.__version__,
                      "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}))


def extract_original(wheel: Path, into: Path) -> Path:
    """The FastBlend folder of the diffsynth 1.1.7 wheel, unpacked into `into`."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(FASTBLEND_IN_WHEEL)]
        if not members:
            raise SystemExit(f"{wheel}: no {FASTBLEND_IN_WHEEL} inside; expected the diffsynth==1.1.7 wheel")
        archive.extractall(into, members)
    return into / FASTBLEND_IN_WHEEL


def _original_env():
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # never our package there


def fastblend_in_venv(venv: Path) -> tuple[str, Path]:
    """(interpreter, FastBlend folder) of an installed diffsynth 1.1.7 in `venv`, found without importing it."""
    python = venv / "bin" / "python"
    where = "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('diffsynth').origin))"
    out = subprocess.run([str(python), "-c", where], capture_output=True, text=True, env=_original_env(), cwd="/")
    folder = Path(out.stdout.strip()) / "extensions" / "FastBlend"
    if out.returncode != 0 or not (folder / "__init__.py").is_file():
        raise SystemExit(f"--original-venv {venv}: no diffsynth/extensions/FastBlend there "
                         "(bench/original_diffutoon.py's ensure_venv installs diffsynth==1.1.7)")
    return str(python), folder


def run_original(python, fastblend_dir, frames_file, mode, result_file):
    command = [python, str(Path(__file__).resolve()), "--original-worker", "--fastblend-dir", str(fastblend_dir),
               "--frames", str(frames_file), "--mode", mode, "--result", str(result_file)]
    out = subprocess.run(command, capture_output=True, text=True, env=_original_env(), cwd="/")
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Ours


def scene(num_frames, width, height):
    """uint8 (N, H, W, 3) guide and style frames."""
    from diffsynth.fastblend.evaluation import flickering_scene

    clean, style = flickering_scene(num_frames, height, seed=0, width=width)
    import torch

    as_uint8 = lambda frames: torch.stack(frames).round().clamp(0, 255).to(torch.uint8).numpy()  # noqa: E731
    return as_uint8(clean), as_uint8(style)


def run_ours(guide, style, mode, device, config_overrides):
    import torch

    from diffsynth.fastblend import FastBlendConfig, kernels, smooth_in_memory

    config = FastBlendConfig(inference_mode=mode, window_size=config_overrides.get("window_size", WINDOW),
                             batch_size=BATCH_SIZE,
                             minimum_patch_size=config_overrides.get("minimum_patch_size", 5),
                             num_iter=config_overrides.get("num_iter", 5), guide_weight=10.0, initialize="identity")

    def smooth(guide, style):
        # Frames go to the device once, as uint8 (the smoothing stage's frame LRU lives there too).
        frames = lambda array: list(torch.from_numpy(array).to(device))  # noqa: E731
        out = smooth_in_memory(frames(guide), frames(style), config, device=device)
        return torch.stack(out).round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    cuda = torch.device(device).type == "cuda"
    smooth(guide[:4], style[:4])  # warm-up: Triton compiles its kernels for this size's patch sizes
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    memory = PeakDeviceMemory(torch.cuda.mem_get_info) if cuda else None
    start = time.perf_counter()
    if memory:
        with memory:
            out = smooth(guide, style)
            torch.cuda.synchronize()
    else:
        out = smooth(guide, style)
    seconds = time.perf_counter() - start
    row = {"seconds": seconds, "kernels": kernels.backend_name(device)}
    if cuda:
        row.update(peak_vram_mib=memory.peak / 2**20, torch_max_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                   gpu=torch.cuda.get_device_name())
    return row, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="ours only, tiny size, on the CPU (smoke test)")
    parser.add_argument("--frames-count", type=int, default=64, dest="num_frames")
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="WxH,WxH")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--original-wheel", type=Path, help="the diffsynth==1.1.7 wheel (its FastBlend is run)")
    parser.add_argument("--original-python", default=sys.executable, help="interpreter with cupy for the original")
    parser.add_argument("--original-venv", type=Path,
                        help="instead of --original-wheel: the original's venv of bench/original_diffutoon.py "
                             "(ensure_venv; bench/gpu_device_run.sh original builds it on a GPU machine): its "
                             "FastBlend folder and its interpreter")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fastblend_gpu.json")
    # The original's worker process (internal).
    parser.add_argument("--original-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fastblend-dir", help=argparse.SUPPRESS)
    parser.add_argument("--frames", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.original_worker:
        original_worker(args)
        return 0

    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    overrides = {}
    if args.cpu:
        torch.set_num_threads(1)
        device, sizes, args.num_frames = "cpu", [(40, 32)], min(args.num_frames, 6)
        overrides = {"window_size": 2, "minimum_patch_size": 3, "num_iter": 2}
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine, or --cpu for the smoke test", file=sys.stderr)
            return 2
        device = "cuda"
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
        if args.original_wheel and not args.original_wheel.is_file():
            print(f"--original-wheel {args.original_wheel}: no such file (see --help for the download command)",
                  file=sys.stderr)
            return 2

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fastblend_dir = extract_original(args.original_wheel, tmp / "original") if args.original_wheel else None
        if args.original_venv and not args.cpu:
            args.original_python, fastblend_dir = fastblend_in_venv(args.original_venv)
        for width, height in sizes:
            guide, style = scene(args.num_frames, width, height)
            frames_file = tmp / f"frames_{width}x{height}.npz"
            np.savez(frames_file, guide=guide, style=style)
            for mode in args.modes.split(","):
                ours, ours_out = run_ours(guide, style, mode, device, overrides)
                row = {"size": f"{width}x{height}", "mode": mode, "frames": args.num_frames,
                       "ours_fps": args.num_frames / ours["seconds"], "ours": ours}
                row.update(original_fps=None, ratio=None, mae_vs_original=None)
                if fastblend_dir is None:
                    row["original"] = "not run (" + ("--cpu" if args.cpu else "no --original-wheel/--venv") + ")"
                else:
                    original = run_original(args.original_python, fastblend_dir, frames_file, mode,
                                            tmp / "original_out.npy")
                    row["original"] = original
                    if "seconds" in original:
                        original_out = np.load(tmp / "original_out.npy")
                        row["original_fps"] = args.num_frames / original["seconds"]
                        row["ratio"] = row["ours_fps"] / row["original_fps"]
                        row["mae_vs_original"] = float(np.abs(original_out.astype(np.float32)
                                                              - ours_out.astype(np.float32)).mean())
                rows.append(row)
                print(f"{width}x{height} {mode:>8}: ours {row['ours_fps']:.2f} frames/s"
                      + (f", original {row['original_fps']:.2f} frames/s, ratio {row['ratio']:.2f}, "
                         f"MAE {row['mae_vs_original']:.2f}" if row["ratio"] else f", original: {row['original']}"),
                      flush=True)

    result = {"device": device, "torch": torch.__version__, "window": WINDOW, "batch_size": BATCH_SIZE,
              "original_config": ORIGINAL_CONFIG, "config_overrides": overrides, "rows": rows,
              "targets": {"fast_ratio": 2.0, "mae_vs_original": 2.0}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
