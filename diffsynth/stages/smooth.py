"""Stages 7 and 9, FastBlend smoothing, resumable through the manifest.

A smoothing stage's units are its FastBlend plan's units: blended tables (fast mode) and target frames, so a crash
loses at most one of them. Tables are stored as float16 and released (file deleted, row kept) as soon as no unit
still to be produced needs them, so smoothing's disk use grows with the window, not with the video. Frames are read
on demand through a small LRU: RAM holds about one window of frames.

- `smooth.final` (stage 9): the decoded frames, guided by the cropped input frames, before encoding.
- `smooth.<k>.x0` + `smooth.<k>.blend` (stage 7, in-loop at step k): x0 estimated from the step's ε, VAE-decoded in
  float32, then blended; the step stage VAE-encodes the blended frames and recomputes ε from them.
"""

from collections import OrderedDict
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ..cache import image_to_bytes, tensors_to_bytes
from ..errors import UserError
from ..fastblend import FastBlendConfig, SmoothingPlan, kernels
from ..fastblend import frame_key as plan_frame_key
from ..models.loader import device_kind
from ..schedule import x0_from_eps
from .base import Stage, frame_index, frame_key
from .denoise import CombinedEps
from .vae_decode import decode_latent, frame_vae_tile, vae_tile_params

PLAN_FRAME_PREFIX = plan_frame_key(0)[: -len("000000")]


def fastblend_config(settings):
    """The FastBlend config of `smoother_configs[0].config` (validated by the schema already)."""
    values = settings.model_dump()
    values["keyframe_ids"] = tuple(values["keyframe_ids"])
    return FastBlendConfig(**values)


class CachedFrames:
    """FrameAccess over two cached per-frame stages, holding at most `capacity` frames (uint8) on the compute device:
    a frame crosses to a GPU once per visit to the window, not once per patch-match call that reads it."""

    def __init__(self, stage, guide_stage, style_stage, capacity, device):
        self.stage, self.guide_stage, self.style_stage = stage, guide_stage, style_stage
        self.num_frames = len(guide_stage.unit_keys())
        self.capacity, self.device = capacity, device
        self._frames = OrderedDict()

    def _get(self, source, index):
        key = (source.name, index)
        if key in self._frames:
            self._frames.move_to_end(key)
        else:
            image = self.stage.read_image(source, frame_key(index))
            self._frames[key] = torch.from_numpy(image.copy()).to(self.device)
            if len(self._frames) > self.capacity:
                self._frames.popitem(last=False)
        return self._frames[key].to(torch.float32)

    def guide(self, index):
        return self._get(self.guide_stage, index)

    def style(self, index):
        return self._get(self.style_stage, index)


class CachedTables:
    """TableAccess over this stage's own finished table units (float16 on disk)."""

    def __init__(self, stage):
        self.stage = stage

    def get(self, key):  # float16 across to the device, widened there
        return self.stage.read_tensors(self.stage, table_file(key))["table"].to(self.stage.device).float()


def table_file(plan_key):
    return plan_key + ".safetensors"


class SmoothStage(Stage):
    version = "2"  # 2: frames stored zstd-compressed (cache.image_to_bytes); tables unchanged (float16 safetensors)
    prefetch_inputs = False  # frames come through its own window-sized LRU; prefetching a window per unit would hold too much

    def __init__(self, ctx, name, guide, style, settings, ephemeral=False, shot_starts=(0,)):
        super().__init__(ctx, [guide, style])
        self.name, self.guide, self.style, self.ephemeral = name, guide, style, ephemeral
        self.config = fastblend_config(settings)
        self.device = ctx.device
        self.shot_starts = sorted({0, *shot_starts})
        try:
            self.plan = SmoothingPlan(len(guide.unit_keys()), self.config, device=self.device,
                                      shot_starts=self.shot_starts)
        except ValueError as error:  # interpolation keyframes out of range, or a shot without one
            raise UserError(f"smoother_configs FastBlend: {error}; give keyframe_ids inside the rendered range, "
                            "at least one in every shot (see data.shots)") from None
        self._plan_keys = self.plan.unit_keys()
        self._position = {self._cache_key(key): i for i, key in enumerate(self._plan_keys)}
        self._table_keys = [key for key in self._plan_keys if not key.startswith(PLAN_FRAME_PREFIX)]

    def params(self):
        # The device too: patch-match's random search draws differ between the CPU and CUDA. And the kernels'
        # back end where it is not the torch path (whose fingerprints predate the choice): their sums differ.
        params = {"fastblend": asdict(self.config), "device": device_kind(self.device)}
        if kernels.backend_name(self.device) != "torch":
            params["kernels"] = kernels.backend_name(self.device)
        if len(self.shot_starts) > 1:  # only with cuts: a video of one shot keeps its fingerprint
            params["shot_starts"] = self.shot_starts
        return params

    @staticmethod
    def _cache_key(plan_key):
        if plan_key.startswith(PLAN_FRAME_PREFIX):
            return frame_key(int(plan_key[len(PLAN_FRAME_PREFIX):]))
        return table_file(plan_key)

    def unit_keys(self):
        return [self._cache_key(key) for key in self._plan_keys]

    def frame_keys(self):
        """The per-frame outputs (what the next stage reads), in frame order."""
        return [frame_key(i) for i in range(len(self.guide.unit_keys()))]

    def reads(self, key):
        plan_key = self._plan_keys[self._position[key]]
        frames = [frame_key(i) for i in self.plan.needed_frames(plan_key)]
        return ([(self.guide, k) for k in frames] + [(self.style, k) for k in frames]
                + [(self, table_file(table)) for table in self.plan.needed_tables(plan_key)])

    def internal_keys(self):
        return [table_file(plan_key) for plan_key in self._table_keys]

    def _frames(self):
        capacity = 2 * (2 * self.config.window_size + 2 + self.config.batch_size)
        return CachedFrames(self, self.guide, self.style, capacity=capacity, device=self.device)

    def _unit_bytes(self, key, result):
        if key.startswith("table"):
            return tensors_to_bytes({"table": result.to(torch.float16)})
        return image_to_bytes(result.round().clamp(0, 255).to(torch.uint8).cpu().numpy())

    def compute(self, key):
        """One unit on its own (a Ray worker's way; `run` shares one frame LRU between consecutive units)."""
        result = self.plan.compute(self._plan_keys[self._position[key]], self._frames(), CachedTables(self))
        return self._unit_bytes(key, result), None

    def run(self, pending_keys):
        pending = sorted(pending_keys, key=self._position.__getitem__)
        frames, tables = self._frames(), CachedTables(self)
        if pending:  # tables a previous run finished with but had not yet released (it died in between)
            self._release(self.plan.releasable_after(self._position[pending[0]]))
        for key in pending:
            position = self._position[key]
            yield key, self._unit_bytes(key, self.plan.compute(self._plan_keys[position], frames, tables)), None
            self._release(self.plan.newly_releasable(position + 1))
        # Tables recomputed out of order (released ones a pending unit needed again) may have been skipped above.
        self._release(self._table_keys)

    def _release(self, plan_table_keys):
        self.ctx.cache.release_units(self.name, [table_file(plan_key) for plan_key in plan_table_keys])


class InLoopX0Stage(Stage):
    """Per frame: x0 estimated from step k's combined ε, VAE-decoded in float32 (the style FastBlend smooths)."""
    version = "2"  # 2: frames stored zstd-compressed
    ephemeral = True

    def __init__(self, ctx, step_index, latents, windows_stage, alpha_t):
        super().__init__(ctx, [latents, windows_stage])
        self.name = f"smooth.{step_index:03d}.x0"
        self.latents, self.windows_stage, self.alpha_t = latents, windows_stage, alpha_t
        self.eps = CombinedEps(self, windows_stage)

    def params(self):
        return {"alpha_t": self.alpha_t, "models": self.ctx.models.identity("vae"), **vae_tile_params(self.ctx)}

    def unit_keys(self):
        return self.latents.unit_keys()

    def reads(self, key):
        return [(self.latents, key)] + self.eps.reads(frame_index(key))

    def compute(self, key):
        x_t = self.read_tensors(self.latents, key)["latent"]
        eps = self.eps(frame_index(key))
        x0 = x0_from_eps(x_t, eps, self.alpha_t)
        return image_to_bytes(decode_latent(self.ctx.models.vae, x0, frame_vae_tile(self.ctx))), None




class EnhanceStage(Stage):
    """A post-processor of the smoother chain, per frame: PIL's ImageEnhance.Contrast or .Sharpness with `rate`,
    as the original's Contrast and Sharpness smoothers."""
    version = "2"  # 2: frames stored zstd-compressed

    def __init__(self, ctx, name, frames, kind, rate, ephemeral=False):
        super().__init__(ctx, [frames])
        self.name, self.frames, self.kind, self.rate, self.ephemeral = name, frames, kind, rate, ephemeral

    def params(self):
        return {"kind": self.kind, "rate": self.rate}

    def unit_keys(self):
        return self.frames.frame_keys()

    def compute(self, key):
        enhancer = getattr(ImageEnhance, self.kind)  # Contrast or Sharpness
        image = Image.fromarray(self.read_image(self.frames, key))
        return image_to_bytes(np.asarray(enhancer(image).enhance(self.rate))), None
