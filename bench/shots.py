"""Shots: does anything blend across a cut? A synthetic clip (PyAV, diffsynth.demo.cut_clip_frames) with three hard
cuts between very different scenes and one gradual dissolve (not a cut):

(a) the cuts the shots stage detects (PySceneDetect's content detector on the cropped frames, through the render's
    own crop and shots stages in a run folder) against the true three;
(b) the sliding windows (16 frames, stride 8) that hold frames of two shots, with data.shots none and auto;
(c) final smoothing (FastBlend, on tensors) of a flickering 'rendering' of the clip (posterized + noise): the mean
    absolute difference of the first and last two frames of each shot to their own unsmoothed frames, against
    mid-shot frames', with shots none (before) and auto (after). Target: boundary ≤ mid-shot with auto.

Writes bench/results/shots.json and the before/after picture docs/shots_before_after.png.

    python bench/shots.py [--size 64x48] [--window-size 5]
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffsynth.cache import RunCache  # noqa: E402
from diffsynth.config import SHOT_THRESHOLD, FramesConfig  # noqa: E402
from diffsynth.demo import cut_clip_frames, write_frames_clip  # noqa: E402
from diffsynth.fastblend import FastBlendConfig, smooth_in_memory  # noqa: E402
from diffsynth.runner import run_stages  # noqa: E402
from diffsynth.schedule import shot_windows, sliding_windows  # noqa: E402
from diffsynth.stages.crop import CropStage  # noqa: E402
from diffsynth.stages.shots import SHOTS_KEY, ShotsStage, bytes_to_shots  # noqa: E402
from diffsynth.video import probe  # noqa: E402


def detect(clip, width, height):
    with tempfile.TemporaryDirectory() as folder:
        cache = RunCache(Path(folder) / "run")
        try:
            ctx = SimpleNamespace(cache=cache, config=None, models=None, device="cpu")
            frames = FramesConfig(video_file=str(clip), width=width, height=height)
            source = probe(frames)
            crop = CropStage(ctx, frames, source, (0, len(source)))
            shots = ShotsStage(ctx, crop, SHOT_THRESHOLD)
            started = time.perf_counter()
            run_stages([crop, shots], cache, progress=False)
            seconds = time.perf_counter() - started
            return bytes_to_shots(cache.read(shots.name, SHOTS_KEY)), seconds
        finally:
            cache.close()


def crossing(windows, starts):
    return sum(1 for first, end in windows if any(first < cut < end for cut in starts[1:]))


def boundary_and_mid(smoothed, style, starts):
    error = [float((out - own).abs().mean()) for out, own in zip(smoothed, style)]
    bounds = list(zip(starts, starts[1:] + [len(style)]))
    edges = [i for first, end in bounds for i in (first, first + 1, end - 2, end - 1)]
    mid = [i for i in range(len(style)) if i not in edges]
    return {"boundary": float(np.mean([error[i] for i in edges])), "mid_shot": float(np.mean([error[i] for i in mid])),
            "boundary_worst": max(error[i] for i in edges), "per_frame": [round(e, 3) for e in error]}


def picture(style, before, after, cut, path, scale=3):
    """Columns: the last two frames of a shot and the first two of the next; rows: unsmoothed, shots none, auto."""
    columns = [cut - 2, cut - 1, cut, cut + 1]
    rows = [("unsmoothed", style), ("smoothed, shots: none", before), ("smoothed, shots: auto", after)]
    height, width = style[0].shape[:2]
    tile_w, tile_h, label_w, gap = width * scale, height * scale, 150, 4
    canvas = Image.new("RGB", (label_w + len(columns) * (tile_w + gap), 18 + len(rows) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, index in enumerate(columns):
        draw.text((label_w + c * (tile_w + gap) + 4, 3), f"frame {index}" + (" (new shot)" if index == cut else ""),
                  fill="black")
    for r, (label, frames) in enumerate(rows):
        top = 18 + r * (tile_h + gap)
        draw.text((4, top + tile_h // 2 - 6), label, fill="black")
        for c, index in enumerate(columns):
            tile = frames[index].round().clamp(0, 255).to(torch.uint8).numpy()
            image = Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(image, (label_w + c * (tile_w + gap), top))
    cut_x = label_w + 2 * (tile_w + gap) - gap // 2 - 1
    draw.line([(cut_x, 14), (cut_x, canvas.height)], fill=(230, 40, 40), width=2)
    canvas.save(path, optimize=True)
    return path.stat().st_size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="64x48")
    parser.add_argument("--window-size", type=int, default=5)
    parser.add_argument("--mode", default="fast")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    torch.set_num_threads(1)
    frames, cuts = cut_clip_frames(width, height)
    starts = [0, *cuts]
    with tempfile.TemporaryDirectory() as folder:
        clip = write_frames_clip(Path(folder) / "cuts.mp4", frames)
        detected, detect_seconds = detect(clip, width, height)
    print(f"(a) cuts: true {cuts}, detected {detected[1:]} ({detect_seconds:.2f} s for {len(frames)} frames, crop "
          "included)")

    windows_none = sliding_windows(len(frames), 16, 8)
    windows_auto = shot_windows(detected, len(frames), 16, 8)
    print(f"(b) windows crossing a cut: shots none {crossing(windows_none, starts)} of {len(windows_none)}, "
          f"auto {crossing(windows_auto, starts)} of {len(windows_auto)}")

    guide = [torch.from_numpy(frame.astype(np.float32)) for frame in frames]
    noise = torch.Generator().manual_seed(0)
    style = [((frame // 32) * 32 + 16 + 6 * torch.randn(frame.shape, generator=noise)).clamp(0, 255)
             for frame in guide]
    config = FastBlendConfig(inference_mode=args.mode, window_size=args.window_size, minimum_patch_size=3,
                             num_iter=3)
    started = time.perf_counter()
    before = smooth_in_memory(guide, style, config)
    after = smooth_in_memory(guide, style, config, shot_starts=detected)
    smooth_seconds = time.perf_counter() - started
    errors = {"none": boundary_and_mid(before, style, starts), "auto": boundary_and_mid(after, style, starts)}
    for name, error in errors.items():
        print(f"(c) shots {name}: |smoothed - own unsmoothed| boundary frames {error['boundary']:.2f}, mid-shot "
              f"{error['mid_shot']:.2f} (ratio {error['boundary'] / error['mid_shot']:.2f}; worst boundary frame "
              f"{error['boundary_worst']:.2f})")
    ok = detected == starts and crossing(windows_auto, starts) == 0 and \
        errors["auto"]["boundary"] <= errors["auto"]["mid_shot"]
    print("target (exactly the 3 cuts, no window crossing one, boundary <= mid-shot with auto):",
          "met" if ok else "NOT met")

    png = ROOT / "docs" / "shots_before_after.png"
    png_bytes = picture(style, before, after, cuts[0], png)
    print(f"picture: {png.relative_to(ROOT)} ({png_bytes / 1e3:.0f} kB)")
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread",
              "clip": {"frames": len(frames), "size": [width, height], "true_cuts": cuts},
              "detected_cuts": detected[1:], "detect_seconds": detect_seconds,
              "windows_crossing_a_cut": {"none": crossing(windows_none, starts), "auto": crossing(windows_auto, starts),
                                         "total_none": len(windows_none), "total_auto": len(windows_auto)},
              "fastblend": {"mode": args.mode, "window_size": args.window_size, "seconds_both": smooth_seconds},
              "mean_abs_difference_to_own_unsmoothed": errors, "target_met": ok, "picture_bytes": png_bytes}
    out = ROOT / "bench" / "results" / "shots.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
