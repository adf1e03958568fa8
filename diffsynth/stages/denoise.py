"""Stage 6, denoise: for each DDIM step, two stages.

- `denoise.<k>.windows`: one unit per AnimateDiff sliding window — the window's ε with classifier-free guidance
  (both halves in one batch) and every ControlNet unit's residuals × its scale. A crash loses at most one window.
- `denoise.<k>.step`: one unit per frame — the tent-weighted mean of the ε of the windows holding the frame, then
  the DDIM step to the next timestep.
Both are ephemeral: once the next step is complete their files are deleted, so disk use stays at about two steps'
latents and one step's ε, however many steps there are.
"""

import math
from collections import OrderedDict
from functools import cached_property

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ..cache import as_rgb, bytes_to_image, tensors_to_bytes
from ..errors import UserError
from ..models.split_inference import motion_unet_eps
from ..schedule import (
    LATENT_SCALE,
    alphas_cumprod,
    ddim_step,
    eps_from_x0,
    shot_of,
    shot_windows,
    tent_weight,
    timesteps,
    windows_containing,
)
from .base import Stage, frame_index, frame_key
from .latents import encode_image
from .prompts import PromptTimeline
from .vae_decode import frame_vae_tile, vae_tile_params


def denoising_schedule(ctx):
    inputs = ctx.config.pipeline.pipeline_inputs
    steps = timesteps(inputs.denoising_strength, inputs.num_inference_steps)
    alphas = alphas_cumprod(ctx.models.has_motion_module)
    alpha_t = [alphas[t].item() for t in steps]
    return steps, alpha_t, alpha_t[1:] + [1.0]


def window_plan(ctx, num_frames, shot_starts=(0,)):
    """The sliding windows, made inside each shot (`shot_starts`: the first frame of each)."""
    inputs = ctx.config.pipeline.pipeline_inputs
    if ctx.models.has_motion_module and inputs.animatediff_batch_size > ctx.models.motion_max_frames:
        raise UserError(f"pipeline.pipeline_inputs.animatediff_batch_size {inputs.animatediff_batch_size} is longer "
                        f"than the motion module's {ctx.models.motion_max_frames} frames; use at most that")
    return shot_windows(shot_starts, num_frames, inputs.animatediff_batch_size, inputs.animatediff_stride)


def resolved_batch_sizes(ctx):
    """(unet_batch_size, controlnet_batch_size) as numbers: `auto` resolved by the VRAM model for the device's
    total memory (the same every time on the same device, so a resume keeps its fingerprints)."""
    from ..vram import device_memory_bytes, resolve_batch_sizes
    models = ctx.models
    return resolve_batch_sizes(ctx.config, device_memory_bytes(models.device), models.device,
                               models.has_motion_module)


class DenoiseWindowsStage(Stage):
    # 2: the motion modules normalise per frame (models.motion_norm); 3: on a GPU both CFG halves in one ControlNet
    # call (other low bits there; the CPU's are unchanged)
    version = "3"
    ephemeral = True
    runs_in_order = True  # a window reuses the ControlNet residuals of the frames it shares with the one before

    def __init__(self, ctx, step_index, latents, prompts, control_sources, num_frames, shot_starts=(0,)):
        super().__init__(ctx, [latents, prompts, *control_sources])
        self.name = f"denoise.{step_index:03d}.windows"
        self.step_index = step_index
        self.latents, self.prompts, self.control_sources = latents, prompts, control_sources
        self.num_frames = num_frames
        self.shot_starts = sorted({0, *shot_starts})
        self.windows = window_plan(ctx, num_frames, self.shot_starts)
        self.timestep = denoising_schedule(ctx)[0][step_index]
        self.prompt_timeline = PromptTimeline(prompts)
        self.unet_batch_size, self.controlnet_batch_size = resolved_batch_sizes(ctx)

    def params(self):
        inputs = self.ctx.config.pipeline.pipeline_inputs
        return {"timestep": self.timestep, "windows": self.windows, "cfg_scale": inputs.cfg_scale,
                "controlnet_scales": [u.scale for u in self.ctx.config.models.controlnet_units],
                "controlnet_batch_size": self.controlnet_batch_size, "unet_batch_size": self.unet_batch_size,
                "models": self.ctx.models.identity("unet"), "dtype": str(self.ctx.models.dtype),
                **({"cross_frame_attention": True} if inputs.cross_frame_attention else {}),
                # Only with cuts, so a video of one shot keeps its fingerprint (the ControlNet groups follow the
                # shots even where the windows come out the same).
                **({"shot_starts": self.shot_starts} if len(self.shot_starts) > 1 else {}),
                **({"cfg_halves": "apart"} if inputs.cfg_halves == "apart" else {})}

    @staticmethod
    def window_key(j):
        return f"w{j:05d}.safetensors"

    def unit_keys(self):
        return [self.window_key(j) for j in range(len(self.windows))]

    def reads(self, key):
        start, end = self.windows[int(key[1:].split(".")[0])]
        frames = [frame_key(i) for i in range(start, end)]
        control_frames = [frame_key(i) for i in self.residuals.frames_computed_with(start, end)]
        return (self.prompt_timeline.reads(self.frames_with_text(start, end))
                + [(self.latents, k) for k in control_frames]
                + [(source, k) for source in self.control_sources for k in control_frames]
                + [(self.latents, k) for k in frames if k not in control_frames])

    def frames_with_text(self, start, end):
        """The frames whose text embeddings window [start, end) uses: its own, and those its ControlNet groups
        compute (a group may reach past the window)."""
        control_frames = self.residuals.frames_computed_with(start, end)
        return range(min([start, *control_frames]), max([end, *(i + 1 for i in control_frames)]))

    @cached_property
    def residuals(self):
        return ControlNetResiduals(self, self.num_frames)

    def next_window_span(self, j):
        """The frames the window this process computes after window j may share with it: of window j + 1 when it
        goes forwards (one process; a Ray worker's block), of j - 1 backwards (a worker's block every other step),
        of both when it cannot tell yet (its first window); (end, end) when there is none."""
        previous, self.previous_window = getattr(self, "previous_window", None), j
        after = [k for k in ((j + 1,) if previous == j - 1 else (j - 1,) if previous == j + 1 else (j - 1, j + 1))
                 if 0 <= k < len(self.windows)]
        if not after:
            end = self.windows[j][1]
            return end, end
        return min(self.windows[k][0] for k in after), max(self.windows[k][1] for k in after)

    def read_latents(self, indices):
        return torch.stack([self.read_tensors(self.latents, frame_key(i))["latent"] for i in indices])

    def conditions_on_device(self, indices):
        """Each ControlNet unit's conditioning images of frames `indices` on the model's device, RGB in [0, 1],
        (frames, 3, H, W) in the model's dtype: yielded one unit at a time, so on a GPU the next unit's frames are
        decoded while the last one's ControlNet runs. See `upload_frames`."""
        models = self.ctx.models
        for source in self.control_sources:
            data = [self.read_bytes(source, frame_key(i)) for i in indices]  # this thread's manifest connection
            yield condition_input(upload_frames(data, models.device), models.dtype)

    @torch.no_grad()
    def compute(self, key):
        j = int(key[1:].split(".")[0])
        start, end = self.windows[j]
        models = self.ctx.models
        device, dtype = models.device, models.dtype
        inputs = self.ctx.config.pipeline.pipeline_inputs
        latents = self.read_latents(range(start, end))
        frames = end - start
        # Each frame's own text embedding (one per CFG half; the same for every frame without prompt travel).
        frame_embeddings = self.prompt_timeline.load(self, self.frames_with_text(start, end))
        negative = frame_embeddings("negative", range(start, end))
        positive = frame_embeddings("positive", range(start, end))
        latents = latents.to(device, dtype)
        down_residuals, mid_residual = self.residuals.window(start, end, frame_embeddings)
        self.residuals.keep_for(*self.next_window_span(j))
        if negative.shape[1] == positive.shape[1]:
            # Classifier-free guidance in one batch: [negative × frames, positive × frames].
            sample = torch.cat([latents, latents])
            text = torch.cat([negative, positive]).to(device, dtype)
            eps = self._unet(sample, text, down_residuals, mid_residual, frames, inputs).float()
        else:
            # The halves' prompts have their own lengths (long_prompts: diffutoon): one batch per half, each
            # attending to its own prompt's tokens only, as the original runs them.
            halves = (slice(0, frames), slice(frames, 2 * frames))
            eps = torch.cat([self._unet(latents, text.to(device, dtype),
                                        None if down_residuals is None else [r[half] for r in down_residuals],
                                        None if mid_residual is None else mid_residual[half], frames, inputs).float()
                             for text, half in zip((negative, positive), halves)])
        eps_negative, eps_positive = eps.chunk(2)
        # Guidance on the device (float32 elementwise: the same bits as on the CPU), so half the bytes come back.
        eps = eps_negative + inputs.cfg_scale * (eps_positive - eps_negative)
        return tensors_to_bytes({"eps": eps.cpu()}), None

    def _unet(self, sample, text, down_residuals, mid_residual, frames, inputs):
        """ε of the batch `sample`: both CFG halves [negative × frames, positive × frames], or one half's frames."""
        unet = self.ctx.models.unet
        if inputs.cross_frame_attention:
            return self._unet_cross_frame(sample, text, down_residuals, mid_residual, frames, inputs)
        if self.ctx.models.has_motion_module:
            # The motion modules see all the window's frames at once; the spatial layers unet_batch_size at a time.
            # A batch of one half is run as `apart` runs each half.
            cfg_halves = inputs.cfg_halves if sample.shape[0] == 2 * frames else "apart"
            return motion_unet_eps(unet, sample, text, self.timestep, down_residuals, mid_residual, frames,
                                   self.unet_batch_size, cfg_halves)
        # Without a motion module frames are independent: unet_batch_size frames per forward.
        chunk = self.unet_batch_size
        outputs = []
        for i in range(0, sample.shape[0], chunk):
            residuals = None if down_residuals is None else [r[i:i + chunk] for r in down_residuals]
            outputs.append(unet(sample[i:i + chunk], self.timestep, encoder_hidden_states=text[i:i + chunk],
                                down_block_additional_residuals=residuals,
                                mid_block_additional_residual=None if mid_residual is None else
                                mid_residual[i:i + chunk]).sample)
        return torch.cat(outputs)

    def _unet_cross_frame(self, sample, text, down_residuals, mid_residual, frames, inputs):
        """cross_frame_attention: each UNet batch holds unet_batch_size frames of one CFG half (never both halves:
        their tokens must not mix), and the spatial self-attention joins the batch's frames into one sequence."""
        unet = self.ctx.models.unet
        processor = use_cross_frame_attention(unet)
        chunk = self.unet_batch_size
        groups = [(first, min(first + chunk, half + frames)) for half in range(0, sample.shape[0], frames)
                  for first in range(half, half + frames, chunk)]
        if self.ctx.models.has_motion_module:  # one call for the window; joined in the same groups
            processor.groups = [end - first for first, end in groups]
            video = sample.reshape(-1, frames, *sample.shape[1:]).permute(0, 2, 1, 3, 4)
            out = unet(video, self.timestep, encoder_hidden_states=text,
                       down_block_additional_residuals=down_residuals,
                       mid_block_additional_residual=mid_residual).sample
            return out.permute(0, 2, 1, 3, 4).reshape(sample.shape)
        outputs = []
        for first, end in groups:
            processor.groups = [end - first]
            residuals = None if down_residuals is None else [r[first:end] for r in down_residuals]
            outputs.append(unet(sample[first:end], self.timestep, encoder_hidden_states=text[first:end],
                                down_block_additional_residuals=residuals,
                                mid_block_additional_residual=None if mid_residual is None else
                                mid_residual[first:end]).sample)
        return torch.cat(outputs)


class CrossFrameAttention:
    """Self-attention over the tokens of several frames at once (the original's cross_frame_attention): the batch's
    samples, in consecutive groups of `groups[k]` frames, are joined into one sequence per group, attended, and
    split back. A group of one frame is ordinary self-attention."""

    def __init__(self):
        self.groups = None  # set before each UNet call
        self.attend = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, tokens, channels = hidden_states.shape
        groups = self.groups or [batch]
        assert sum(groups) == batch, f"cross-frame groups {groups} do not cover the batch of {batch}"
        outputs, first = [], 0
        for size in groups:
            joined = hidden_states[first:first + size].reshape(1, size * tokens, channels)
            outputs.append(self.attend(attn, joined, None, attention_mask, temb).reshape(size, tokens, channels))
            first += size
        return torch.cat(outputs)


def use_cross_frame_attention(unet):
    """Install CrossFrameAttention on the spatial self-attention layers (attn1 of the down/mid/up transformer blocks,
    not the motion modules); returns the processor (shared, so one `groups` setting covers every layer)."""
    for module in unet.modules():
        if isinstance(getattr(module, "cross_frame_processor", None), CrossFrameAttention):
            return module.cross_frame_processor
    processor = CrossFrameAttention()
    processors = {name: (processor if name.endswith("attn1.processor") and "motion_modules" not in name
                         else existing) for name, existing in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    unet.cross_frame_processor = processor
    return processor


class ControlNetResiduals:
    """Each frame's ControlNet residuals at one step, computed once and kept in memory for the next window that
    holds the frame: windows overlap (stride 8, window 16: every frame is in two), and a frame's ControlNet input at
    a step is the same in both. Never on disk: they are large.

    A frame's residuals are computed in a group of frames decided by the frame index alone (frames
    [s + g·B, s + (g+1)·B) of the shot starting at frame s, for controlnet_batch_size B, cut at the shot's end), one
    CFG half at a time, so its bits never depend on which window asked first, or on where a resumed render started,
    and a window never reads a frame of another shot. Where B divides the window stride and length, these are
    exactly the ControlNet calls made without reuse.

    Memory, whatever order windows arrive in (with many workers a worker gets a block of windows, and windows of
    the next step in between): after a window only the frames the next window can reuse are kept (its frames, up to
    the end of its last group), and a process keeps the residuals of at most `STEPS_KEPT` steps (the least recently
    used step's are dropped): at most STEPS_KEPT × (one window + one group) frames, instead of one overlap stranded
    per step for the whole render."""

    STEPS_KEPT = 2
    _holding = OrderedDict()  # id → the ControlNetResiduals of this process holding residuals, least recent first

    # Both CFG halves in one ControlNet call: on a GPU with cfg_halves: together (one call of 2 × the group fills
    # the card better; the VRAM model counts its samples). Not on the CPU, where it buys nothing and a batch of 2B
    # samples rounds differently from two of B (oneDNN/MKL pick kernels by batch size): a CPU run keeps its bits.
    # None = that rule; True/False force it (the tests check the joined path's assembly on the CPU).
    join_halves = None

    def halves_together(self):
        stage = self.stage
        if stage.ctx.config.pipeline.pipeline_inputs.cfg_halves != "together":
            return False
        if self.join_halves is not None:
            return self.join_halves
        return torch.device(stage.ctx.models.device).type == "cuda"

    def __init__(self, stage, num_frames):
        self.stage, self.num_frames = stage, num_frames
        self.group = stage.controlnet_batch_size
        self.shot_starts = getattr(stage, "shot_starts", [0])
        self.kept = {}  # frame index → ([down residual per level], mid residual), each (2 halves, C, h, w)

    def __getstate__(self):  # shipped to a Ray worker before any residual exists; never ship tensors
        return {**self.__dict__, "kept": {}}

    def groups(self, start, end):
        """[(first, end)] of the groups holding frames [start, end) (frames of one shot)."""
        shot_start, shot_end = shot_of(start, self.shot_starts, self.num_frames)
        first = shot_start + (start - shot_start) // self.group * self.group
        return [(group, min(group + self.group, shot_end)) for group in range(first, end, self.group)]

    def frames_computed_with(self, start, end):
        """The frames whose inputs computing window [start, end)'s residuals may read: the groups it touches."""
        if not self.stage.control_sources:
            return []
        groups = self.groups(start, end)
        return list(range(groups[0][0], groups[-1][1]))

    def keep_for(self, start, end):
        """Keep only what window [start, end) (the next one) can reuse: its frames and the rest of its last group."""
        groups = self.groups(start, end) if start < end else []  # (end, end) after the last window: keep nothing
        end = groups[-1][1] if groups else end
        for index in [i for i in self.kept if not start <= i < end]:
            del self.kept[index]

    def _hold(self):
        holding = ControlNetResiduals._holding
        holding[id(self)] = self
        holding.move_to_end(id(self))
        while len(holding) > self.STEPS_KEPT:
            holding.popitem(last=False)[1].kept.clear()

    def window(self, start, end, frame_embeddings):
        """(down residuals, mid residual) for the window's batch [negative × frames, positive × frames], summed over
        the ControlNet units, or (None, None) without ControlNets. `frame_embeddings(half, indices)` gives the text
        embeddings of the frames of every group the window touches."""
        if not self.stage.control_sources:
            return None, None
        self._hold()
        for first, group_end in self.groups(start, end):
            if any(i not in self.kept for i in range(max(first, start), min(end, group_end))):
                self._compute_group(first, group_end, frame_embeddings)
        frames = [self.kept[i] for i in range(start, end)]
        levels = len(frames[0][0])
        down = [torch.cat([f[0][level][half:half + 1] for half in (0, 1) for f in frames]) for level in range(levels)]
        mid = torch.cat([f[1][half:half + 1] for half in (0, 1) for f in frames])
        return down, mid

    def _compute_group(self, first, end, frame_embeddings):
        """One group's residuals: per ControlNet unit, one call with both CFG halves [negative × frames,
        positive × frames] (`halves_together`) or one call per half; each unit's conditioning frames uploaded once
        and used by both halves."""
        stage = self.stage
        models = stage.ctx.models
        device, dtype = models.device, models.dtype
        indices = range(first, end)
        counts = stage.counts
        counts["controlnet_frame_evaluations"] = counts.get("controlnet_frame_evaluations", 0) + len(indices)
        frames = len(indices)
        latents = stage.read_latents(indices).to(device, dtype)
        negative = frame_embeddings("negative", indices).contiguous().to(device, dtype)
        positive = frame_embeddings("positive", indices).contiguous().to(device, dtype)
        # Prompts of their own lengths per half (long_prompts: diffutoon) cannot share a batch.
        together = self.halves_together() and negative.shape[1] == positive.shape[1]
        calls = ([(torch.cat([latents, latents]), torch.cat([negative, positive]))] if together
                 else [(latents, negative), (latents, positive)])
        totals = [None] * len(calls)  # per call: [down residual per level..., mid residual]
        for unit, controlnet, condition in zip(stage.ctx.config.models.controlnet_units, models.controlnets,
                                               stage.conditions_on_device(indices)):
            if together:
                condition = torch.cat([condition, condition])
            for k, (sample, text) in enumerate(calls):
                down, mid = controlnet(sample, stage.timestep, encoder_hidden_states=text, controlnet_cond=condition,
                                       conditioning_scale=unit.scale, return_dict=False)
                # summed over units in unit order, as before reuse existed
                totals[k] = [*down, mid] if totals[k] is None else [a + b for a, b in zip(totals[k], [*down, mid])]
        halves = ([[level[:frames] for level in totals[0]], [level[frames:] for level in totals[0]]] if together
                  else totals)
        for offset, index in enumerate(indices):
            pairs = [torch.stack([n[offset], p[offset]]) for n, p in zip(*halves)]
            self.kept[index] = (pairs[:-1], pairs[-1])


_DECODERS = None  # a few threads decoding cached frames (zstd and numpy release the GIL)


def upload_frames(data, device):
    """Cached frames' bytes → one uint8 (frames, H, W, 3) tensor on `device`: decoded by a small thread pool
    into one buffer (pinned on a GPU machine) and uploaded in one asynchronous copy: a quarter of the float32
    bytes, and the host moves on while it travels."""
    global _DECODERS
    if _DECODERS is None:
        from concurrent.futures import ThreadPoolExecutor
        _DECODERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="frame-decode")
    images = list(_DECODERS.map(lambda frame: as_rgb(bytes_to_image(frame)), data))
    cuda = torch.device(device).type == "cuda"
    frames = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=cuda)
    for frame, image in zip(frames, images):
        frame.copy_(torch.from_numpy(image))
    return frames.to(device, non_blocking=True) if cuda else frames


def condition_input(frames, dtype):
    """uint8 (frames, H, W, 3) → the ControlNet's conditioning input (frames, 3, H, W) in [0, 1] in `dtype`, on
    the frames' device, by the same float32 operations as `image_to_vae_input` then `.add(1).div(2)`, so the
    values are the same bits wherever they are computed, and in the same (contiguous) layout: convolutions pick
    other kernels, with other low bits, for a channels-last input."""
    return frames.permute(0, 3, 1, 2).contiguous().float().div(127.5).sub(1).add(1).div(2).to(dtype)


def combine_window_eps(index, windows, read_window_eps):
    """The tent-weighted mean of the ε of every window that holds frame `index`."""
    total, weight_sum = None, 0.0
    for j in windows_containing(index, windows):
        start, end = windows[j]
        weight = tent_weight(index, start, end)
        eps = read_window_eps(j)[index - start] * weight
        total = eps if total is None else total + eps
        weight_sum += weight
    return total / weight_sum


class CombinedEps:
    """A step's per-frame ε, for a stage that reads `windows_stage`: each window's file is read once while the
    consecutive frames that share it are computed (an LRU of the windows overlapping one frame)."""

    def __init__(self, reader, windows_stage):
        inputs = windows_stage.ctx.config.pipeline.pipeline_inputs
        self.reader, self.windows, self.windows_stage = reader, windows_stage.windows, windows_stage
        self.capacity = math.ceil(inputs.animatediff_batch_size / inputs.animatediff_stride) + 1
        self._recent = OrderedDict()  # window index → ε, the last `capacity` windows read

    def _window_eps(self, j):
        if j in self._recent:
            self._recent.move_to_end(j)
        else:
            self._recent[j] = self.reader.read_tensors(self.windows_stage, self.windows_stage.window_key(j))["eps"]
            if len(self._recent) > self.capacity:
                self._recent.popitem(last=False)
        return self._recent[j]

    def __call__(self, index):
        return combine_window_eps(index, self.windows, self._window_eps)

    def reads(self, index):
        """The window units frame `index`'s ε is combined from."""
        return [(self.windows_stage, self.windows_stage.window_key(j))
                for j in windows_containing(index, self.windows)]


class DenoiseStepStage(Stage):
    """One DDIM step per frame. With `smoothed` (in-loop smoothing at this step), x0 is replaced by the smoothed
    frames, VAE-encoded, and ε recomputed from it before the step."""
    version = "1"
    ephemeral = True

    def __init__(self, ctx, step_index, latents, windows_stage, smoothed=None):
        super().__init__(ctx, [latents, windows_stage] + ([smoothed] if smoothed else []))
        self.name = f"denoise.{step_index:03d}.step"
        self.step_index = step_index
        self.latents, self.windows_stage, self.smoothed = latents, windows_stage, smoothed
        steps, alpha_t, alpha_prev = denoising_schedule(ctx)
        self.alpha_t, self.alpha_prev = alpha_t[step_index], alpha_prev[step_index]
        self.ephemeral = step_index < len(steps) - 1  # the final latents are kept for the VAE decode
        self.model_free = smoothed is None  # in-loop smoothing VAE-encodes the smoothed frame
        self.eps = CombinedEps(self, windows_stage)

    def params(self):
        params = {"alpha_t": self.alpha_t, "alpha_prev": self.alpha_prev}
        if self.smoothed is not None:
            params["models"] = self.ctx.models.identity("vae")
            params.update(vae_tile_params(self.ctx))
        return params

    def unit_keys(self):
        return self.latents.unit_keys()

    def reads(self, key):
        if self.smoothed is not None:  # ε comes from the smoothed x0, not from the windows
            return [(self.latents, key), (self.smoothed, key)]
        return [(self.latents, key)] + self.eps.reads(frame_index(key))

    def compute(self, key):
        index = frame_index(key)
        x_t = self.read_tensors(self.latents, key)["latent"]
        if self.smoothed is None:
            eps = self.eps(index)
        else:  # in-loop smoothing: ε recomputed from the smoothed frame's x0
            image = self.read_image(self.smoothed, key)
            x0 = encode_image(self.ctx.models.vae, image, frame_vae_tile(self.ctx)) * LATENT_SCALE
            eps = eps_from_x0(x_t, x0, self.alpha_t)
        return tensors_to_bytes({"latent": ddim_step(x_t, eps, self.alpha_t, self.alpha_prev)}), None
