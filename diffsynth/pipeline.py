"""The ten stages wired from a config (`build_stages`); diffsynth.render runs them in a run folder."""

import logging
from dataclasses import dataclass
from fractions import Fraction

from .cache import RunCache, read_stored_unit
from .config import RenderConfig
from .errors import UserError
from .models.loader import ModelStore
from .stages.annotate import AnnotateStage
from .stages.crop import CropStage
from .stages.denoise import DenoiseStepStage, DenoiseWindowsStage, denoising_schedule
from .stages.encode import EncodeStage
from .stages.latents import InitialLatentsStage
from .stages.prompts import PromptStage
from .stages.shots import SHOTS_KEY, ShotsStage, bytes_to_shots
from .stages.smooth import EnhanceStage, InLoopX0Stage, SmoothStage
from .stages.vae_decode import VaeDecodeStage
from .video import probe

log = logging.getLogger("diffsynth")


@dataclass
class RenderContext:
    config: RenderConfig
    cache: RunCache
    models: ModelStore
    shot_starts: list | None = None  # the first frame of each shot, once known (set by build_stages)

    @property
    def device(self):
        return self.models.device

    def __getstate__(self):
        """A Ray worker gets the config and the models (loaded there); never the run's cache, which only the
        render process opens: the worker's stages read the inputs shipped with each unit instead."""
        return {"config": self.config, "cache": None, "models": self.models}

    def __setstate__(self, state):
        self.__dict__.update(state)


def frame_range(frames_config, source):
    start = frames_config.start_frame_id
    end = len(source) if frames_config.end_frame_id is None else min(frames_config.end_frame_id, len(source))
    if start >= end:
        raise UserError(f"frame range [{start}, {frames_config.end_frame_id}) of {source.path} holds no frames "
                        f"(it has {len(source)}); check data.input_frames.start_frame_id / end_frame_id")
    return start, end


def resolve_shots(ctx, shot_stage, num_frames, detect):
    """The first frame of each shot (`data.shots`): none → [0]; a list → itself, checked against the rendered
    range; auto → the shots stage's stored result in the run folder, else, with `detect`, detected now in memory
    (`diffsynth plan`), else None (not yet known: render detects it first, see `render`)."""
    shots = ctx.config.data.shots
    if shots == "none":
        return [0]
    if isinstance(shots, list):
        outside = [index for index in shots if index >= num_frames]
        if outside:
            raise UserError(f"data.shots has shot start {outside[0]}, but the rendered range holds {num_frames} "
                            f"frames (0 to {num_frames - 1}, counted from its first); give starts inside it")
        return sorted({0, *shots})
    stored = read_stored_unit(ctx.config.data.output_folder, shot_stage.name, shot_stage.fingerprint, SHOTS_KEY)
    if stored is not None:
        return bytes_to_shots(stored)
    if detect:
        log.info("detecting shots in %d frames", num_frames)
        return shot_stage.detect_in_memory()
    return None


def shots_line(config, shot_starts, num_frames):
    """The log's line on the shots."""
    if len(shot_starts) == 1:
        how = {"auto": "no cut found", "none": "data.shots: none"}.get(config.data.shots, "as given")
        return f"shots: 1 ({how}): the sliding windows and FastBlend run over the whole video"
    how = "found" if config.data.shots == "auto" else "given"
    return (f"shots: {len(shot_starts)} {how} (new shots at frames {', '.join(map(str, shot_starts[1:]))} of "
            f"{num_frames}); no sliding window and no FastBlend window crosses a cut")


def build_stages(ctx, detect=True):
    """The ordered stage list for a config. Frame sources shared by several consumers are decoded once.

    With `data.shots: auto`, the sliding windows and FastBlend's plans depend on the shots stage's result: when it
    is not stored yet, `detect` runs the detection in memory; without it the stages are planned as one shot and
    `ctx.shot_starts` stays None (render then runs the crop and the detection first and plans again)."""
    config = ctx.config
    inputs = config.pipeline.pipeline_inputs
    steps = inputs.num_inference_steps
    smooth_steps = {k for k in inputs.smoother_progress_ids if 0 <= k < steps}
    smooth_final = any(k in (-1, steps) for k in inputs.smoother_progress_ids)
    stages = []
    frame_stages = {}  # FramesConfig JSON → its crop stage

    def cropped_frames(frames_config, suffix):
        key = frames_config.model_dump_json()
        if key not in frame_stages:
            source = probe(frames_config)
            # Decode and crop in one stage: the source-resolution frames are never stored.
            cropped = CropStage(ctx, frames_config, source, frame_range(frames_config, source), name=f"crop{suffix}")
            stages.append(cropped)
            frame_stages[key] = (cropped, source)
        return frame_stages[key]

    input_crop, input_source = cropped_frames(config.data.input_frames, "")
    start, end = input_crop.start, input_crop.end
    num_frames = end - start
    shot_stage = None
    if config.data.shots == "auto":
        shot_stage = ShotsStage(ctx, input_crop, config.data.shot_threshold)
        stages.append(shot_stage)
    ctx.shot_starts = resolve_shots(ctx, shot_stage, num_frames, detect)
    shot_starts = ctx.shot_starts or [0]
    control_sources = []
    for index, unit in enumerate(config.models.controlnet_units):
        cropped, _ = cropped_frames(config.controlnet_frames_for(index), f".controlnet{index}")
        if len(cropped.unit_keys()) != num_frames:
            raise UserError(f"data.controlnet_frames[{index}] has {len(cropped.unit_keys())} frames in range, "
                            f"the input has {num_frames}; give both the same range")
        if unit.processor_id == "tile":
            control_sources.append(cropped)  # the cropped frame itself: no copy
        else:
            annotated = AnnotateStage(ctx, cropped, unit.processor_id, name=f"annotate.{index}.{unit.processor_id}")
            stages.append(annotated)
            control_sources.append(annotated)

    prompts = PromptStage(ctx, num_frames)
    latents = InitialLatentsStage(ctx, input_crop, first_frame_id=start)
    stages += [prompts, latents]
    for step_index in range(steps):
        windows = DenoiseWindowsStage(ctx, step_index, latents, prompts, control_sources, num_frames, shot_starts)
        stages.append(windows)
        smoothed = None
        if step_index in smooth_steps:
            x0 = InLoopX0Stage(ctx, step_index, latents, windows, denoising_schedule(ctx)[1][step_index])
            stages.append(x0)
            smoothed = smoother_chain(ctx, f"smooth.{step_index:03d}.blend", input_crop, x0, stages, shot_starts,
                                      ephemeral=True)
        latents = DenoiseStepStage(ctx, step_index, latents, windows, smoothed)
        stages.append(latents)
    decoded = VaeDecodeStage(ctx, latents)
    stages.append(decoded)
    if smooth_final:
        decoded = smoother_chain(ctx, "smooth.final", input_crop, decoded, stages, shot_starts)
    fps = Fraction(config.data.fps).limit_denominator(1001 * 1000) if config.data.fps else input_source.fps
    audio = None
    if input_source.is_video:
        audio = (input_source.path, input_source.seconds(start), input_source.seconds(end))
    size = (config.data.input_frames.width, config.data.input_frames.height)
    stages.append(EncodeStage(ctx, decoded, fps, audio, size, config.data.crf,
                              save_frames=config.data.save_frames))
    latents.kept_for_resume = True  # the final latents: small, and the most expensive results to recompute
    for stage in stages:  # what the runner may delete once read; not in any fingerprint (it never changes a byte)
        stage.keep = config.data.keep
    return stages


def smoother_chain(ctx, name, guide, frames, stages, shot_starts=(0,), ephemeral=False):
    """The config's smoothers in order on `frames` (FastBlend guided by `guide`, then e.g. Contrast, Sharpness),
    appended to `stages`; returns the last. The first keeps the plain `name` (a one-smoother chain is named as
    before), the next ones `name.<i>.<type>`."""
    for index, (kind, settings) in enumerate(ctx.config.smoother_chain()):
        stage_name = name if index == 0 else f"{name}.{index}.{kind.lower()}"
        if kind == "FastBlend":
            frames = SmoothStage(ctx, stage_name, guide, frames, settings, ephemeral=ephemeral, shot_starts=shot_starts)
        else:
            frames = EnhanceStage(ctx, stage_name, frames, kind, settings.rate, ephemeral=ephemeral)
        stages.append(frames)
    return frames
