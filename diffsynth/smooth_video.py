"""`diffsynth smooth`: FastBlend on a video someone already rendered, guided by the original, resumably.

The same stages as a render's (decode, crop, smooth, encode) in a run folder of its own, so a killed smoothing run
continues where it stopped.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .cache import RunCache, write_atomically
from .config import SHOT_THRESHOLD, FastBlendSettings, FramesConfig
from .errors import UserError
from .models.loader import resolve_device
from .render import log_to
from .runner import run_stages
from .stages.crop import CropStage
from .stages.decode import DecodeStage
from .stages.encode import VIDEO_KEY, EncodeStage
from .stages.shots import SHOTS_KEY, ShotsStage, bytes_to_shots
from .stages.smooth import SmoothStage
from .video import decode, probe

log = logging.getLogger("diffsynth")


def shot_list(shots, num_frames):
    """The first frames of the shots for `--shots` none or a list (checked against the video), None for auto."""
    if shots == "auto":
        return None
    if shots == "none":
        return [0]
    outside = [index for index in shots if index >= num_frames]
    if outside:
        raise UserError(f"--shots has shot start {outside[0]}, but the video has {num_frames} frames (0 to "
                        f"{num_frames - 1}); give starts inside it")
    return sorted({0, *shots})


@dataclass
class SmoothContext:
    cache: RunCache
    device: str
    models: None = None
    config: None = None


def smooth_video(guide_path, style_path, output_path, settings: FastBlendSettings, run_dir=None, crf=17,
                 device="auto", progress=True, shots="none", shot_threshold=SHOT_THRESHOLD):
    """`shots` as `data.shots` (auto: the cuts detected on the guide; none; or the first frames of the shots):
    no FastBlend window blends two shots."""
    output_path = Path(output_path).resolve()
    run_dir = Path(run_dir) if run_dir else output_path.with_name(output_path.stem + ".smooth-run")
    guide = probe(FramesConfig(video_file=str(guide_path), width=8, height=8))
    style = probe(FramesConfig(video_file=str(style_path), width=8, height=8))
    if len(guide) != len(style):
        raise UserError(f"the guide {guide_path} has {len(guide)} frames and the style {style_path} has "
                        f"{len(style)}; give the original video and its rendering, frame for frame")
    (_, first_style_frame), = list(decode(style, [0]))
    height, width = first_style_frame.shape[:2]
    cache = RunCache(run_dir)
    try:
        cache.lock()
        handler = log_to(run_dir / "render.log")
        try:
            ctx = SmoothContext(cache, resolve_device(device))
            cropped_guide = CropStage(ctx, SimpleNamespace(width=width, height=height, resize_mode="crop"), guide,
                                      (0, len(guide)), name="crop.guide")
            decoded_style = DecodeStage(ctx, None, style, (0, len(style)), name="decode.style")
            front, earlier = [cropped_guide, decoded_style], None
            shot_starts = shot_list(shots, len(guide))
            if shot_starts is None:  # auto: detected on the guide first, a cached unit as in a render
                detection = ShotsStage(ctx, cropped_guide, shot_threshold)
                front.append(detection)
                earlier = run_stages(front, cache, progress=progress, partial=True)
                shot_starts = bytes_to_shots(cache.read(detection.name, SHOTS_KEY))
                log.info("shots: %d (new shots at frames %s)", len(shot_starts),
                         ", ".join(map(str, shot_starts[1:])) or "none")
            smoothed = SmoothStage(ctx, "smooth", cropped_guide, decoded_style, settings, shot_starts=shot_starts)
            audio = (guide.path, guide.seconds(0), guide.seconds(len(guide)))
            encode = EncodeStage(ctx, smoothed, style.fps, audio, (width, height), crf)
            run_stages(front + [smoothed, encode], cache, progress=progress, earlier=earlier)
            write_atomically(output_path, lambda tmp: shutil.copyfile(run_dir / VIDEO_KEY, tmp))
        finally:
            logging.getLogger("diffsynth").removeHandler(handler)
            handler.close()
    finally:
        cache.close()
    return output_path
