"""FastBlend quality benchmark on a synthetic flickering clip.

Builds a textured scene panning with known motion (the clean video, used as the guide), renders a "style" video
from it with strong per-frame flicker (gain, colour bias and noise per frame), runs every FastBlend mode and
reports, per mode:

* mae: mean absolute error of the output against the clean frames (0..255 scale);
* flicker: mean over consecutive frames of |(x[i+1] - clean[i+1]) - (x[i] - clean[i])|, how much the deviation
  from the clean video changes from frame to frame (0 for the clean video; jitter and noise make it large);
* fps: output frames per second of the whole run (patch matching dominates).

Writes bench/results/fastblend_quality.json. Run: .venv/bin/python bench/fastblend_quality.py [--help]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffsynth.fastblend import FastBlendConfig, smooth_in_memory  # noqa: E402
from diffsynth.fastblend.evaluation import flicker, flickering_scene, mean_abs_error  # noqa: E402

MODES = ("balanced", "accurate", "fast", "interpolation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="frame height (and width unless --width)")
    parser.add_argument("--width", type=int, default=None, help="frame width (default: --size)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--window", type=int, default=4, help="window_size of balanced/accurate/fast")
    parser.add_argument("--keyframe-every", type=int, default=4, help="interpolation: keyframe spacing")
    parser.add_argument("--minimum-patch-size", type=int, default=3)
    parser.add_argument("--num-iter", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is robust on a busy box)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fastblend_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clean, style = flickering_scene(args.frames, args.size, width=args.width)
    keyframes = tuple(range(0, args.frames, args.keyframe_every))
    if keyframes[-1] != args.frames - 1:
        keyframes += (args.frames - 1,)
    common = dict(
        window_size=args.window,
        batch_size=args.batch_size,
        minimum_patch_size=args.minimum_patch_size,
        num_iter=args.num_iter,
    )
    rows = [{"mode": "input (style)", "mae": mean_abs_error(style, clean), "flicker": flicker(style, clean)}]
    for mode in args.modes.split(","):
        config = FastBlendConfig(inference_mode=mode, keyframe_ids=keyframes if mode == "interpolation" else (),
                                 **common)
        start = time.perf_counter()
        out = smooth_in_memory(clean, style, config, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out = [o.cpu() for o in out]
        rows.append({
            "mode": mode,
            "mae": mean_abs_error(out, clean),
            "flicker": flicker(out, clean),
            "seconds": seconds,
            "fps": args.frames / seconds,
        })
        print(f"  {mode}: {seconds:.1f} s", flush=True)

    print(f"\n{args.frames} frames {args.width or args.size}x{args.size}, window {args.window}, patches "
          f"{args.minimum_patch_size + 2 * (args.num_iter - 1)}..{args.minimum_patch_size}, device {args.device}")
    print(f"{'mode':<16}{'MAE vs clean':>14}{'flicker':>10}{'frames/s':>10}")
    for row in rows:
        fps = f"{row['fps']:.2f}" if "fps" in row else "-"
        print(f"{row['mode']:<16}{row['mae']:>14.2f}{row['flicker']:>10.2f}{fps:>10}")

    result = {
        "scene": {"frames": args.frames, "size": args.size, "width": args.width or args.size, "motion_px_per_frame": [1, 1.5],
                  "flicker": "gain 0.75-1.25, colour bias +-25, gaussian noise sigma 10"},
        "config": {**common, "keyframe_ids": list(keyframes)},
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": rows,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
