"""Frame-chunked UNet forward with a motion module (the original Diffutoon's `unet_batch_size` with AnimateDiff).

The spatial layers of a UNetMotionModel (resnets, spatial transformers, down/upsamplers, conv_in and the output
head) treat each frame on its own, so they can run a few frames at a time; the motion modules mix frames along time
and must see the whole window, but each latent pixel's frames on their own, so they can run a few pixels at a time.
Only the activations of one chunk exist at once inside a layer; the tensors between layers (and the skip
connections) stay whole-window.

Built on diffusers' FreeNoise split inference (`SplitInferenceModule`, as `enable_free_noise_split_inference` wraps
the same layers), but installed only for the duration of one call, so the model itself is never changed.
"""

import inspect
import math
from contextlib import contextmanager

import torch
from diffusers.pipelines.free_noise_utils import SplitInferenceModule


class FrameSplit(SplitInferenceModule):
    """SplitInferenceModule that also splits tensors passed positionally (the mid block calls its first resnet as
    `resnet(hidden_states, temb)`, the UNet calls conv_in as `conv_in(sample)`): positional arguments are bound to
    the wrapped module's parameter names first."""

    def __init__(self, module, split_size, input_kwargs_to_split, parts=None):
        super().__init__(module, split_size or 1, 0, input_kwargs_to_split)
        self._signature = inspect.signature(module.forward)
        self.parts = parts  # when set: split into this many pieces whatever the batch (the motion modules' rows)

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs).arguments
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
        if self.parts is not None:
            rows = next(bound[key].shape[0] for key in self.input_kwargs_to_split if torch.is_tensor(bound.get(key)))
            frames = next(bound[key].shape[1] for key in self.input_kwargs_to_split if torch.is_tensor(bound.get(key)))
            self.split_size = balanced_pieces(rows, self.parts, math.ceil(MIN_GEMM_ROWS / frames))
        return super().forward(**bound)


# MKL's float32 GEMM takes another code path, which rounds differently, when a matrix has few rows (below 4 to 16
# rows for the UNet's layer widths, measured): a motion-module piece keeps at least this many (pixel × frame) rows,
# so every piece's linear layers round as the whole call's do.
MIN_GEMM_ROWS = 64


def balanced_pieces(total, parts, minimum):
    """Sizes of at most `parts` pieces covering `total`, differing by at most one, none below `minimum` (unless
    the whole is): never a small remainder piece."""
    parts = max(1, min(parts, total // max(minimum, 1)))
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


class ResnetSplit(FrameSplit):
    """A resnet run a chunk at a time, with its time-embedding projection computed once for the whole batch, as in
    the whole call: the projection is a GEMM with one row per sample, and MKL rounds a GEMM of a few rows
    differently from one of many, so projecting each chunk's rows alone would change the low bits."""

    def __init__(self, module, split_size):
        super().__init__(module, split_size, ["input_tensor", "temb"])

    def forward(self, input_tensor, temb, *args, **kwargs):
        resnet = self.module
        if temb is None or resnet.time_emb_proj is None:
            return super().forward(input_tensor, temb, *args, **kwargs)
        projected = resnet.time_emb_proj(temb if resnet.skip_time_act else resnet.nonlinearity(temb))
        projection, skip_time_act = resnet.time_emb_proj, resnet.skip_time_act
        resnet.time_emb_proj, resnet.skip_time_act = torch.nn.Identity(), True  # each chunk takes its rows as they are
        try:
            return super().forward(input_tensor, projected, *args, **kwargs)
        finally:
            resnet.time_emb_proj, resnet.skip_time_act = projection, skip_time_act


class OutputHead(torch.nn.Module):
    """The UNet's conv_norm_out → conv_act → conv_out as one module, so a chunk goes through all three before the
    next: split one by one, each would still leave a whole-window intermediate."""

    def __init__(self, norm, act, conv):
        super().__init__()
        self.norm, self.act, self.conv = norm, act, conv

    def forward(self, input):
        return self.conv(self.act(self.norm(input)))


def spatial_wrappers(unet, samples_per_call):
    """[(container, key, wrapper)]: each spatial layer of `unet`, wrapped to run `samples_per_call` samples at a
    time (the split keyword arguments are the per-sample ones: hidden states, time embedding, text)."""
    swaps = []

    def wrap(container, key, split):
        swaps.append((container, key, FrameSplit(container[key], samples_per_call, split)))

    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for index in range(len(getattr(block, "resnets", None) or [])):
            swaps.append((block.resnets, index, ResnetSplit(block.resnets[index], samples_per_call)))
        for index in range(len(getattr(block, "attentions", None) or [])):
            wrap(block.attentions, index, ["hidden_states", "encoder_hidden_states"])
        for samplers in ("downsamplers", "upsamplers"):
            for index in range(len(getattr(block, samplers, None) or [])):
                wrap(getattr(block, samplers), index, ["hidden_states"])
    swaps.append((unet._modules, "conv_in", FrameSplit(unet.conv_in, samples_per_call, ["input"])))
    if unet.conv_norm_out is not None:
        head = OutputHead(unet.conv_norm_out, unet.conv_act, unet.conv_out)
        swaps += [(unet._modules, "conv_norm_out", FrameSplit(head, samples_per_call, ["input"])),
                  (unet._modules, "conv_act", torch.nn.Identity()), (unet._modules, "conv_out", torch.nn.Identity())]
    else:
        swaps.append((unet._modules, "conv_out", FrameSplit(unet.conv_out, samples_per_call, ["input"])))
    return swaps


def motion_wrappers(unet, parts):
    """[(container, key, wrapper)]: each motion module's projections and temporal transformer blocks, wrapped to
    run its rows of (batch·height·width, frames, channels) in `parts` pieces — each row is one latent pixel's
    frames, so every row still sees the whole window."""
    swaps = []

    def wrap(container, key, split):
        swaps.append((container, key, FrameSplit(container[key], None, split, parts=parts)))

    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for motion_module in getattr(block, "motion_modules", None) or []:
            wrap(motion_module._modules, "proj_in", ["input"])
            for index in range(len(motion_module.transformer_blocks)):
                wrap(motion_module.transformer_blocks, index, ["hidden_states", "encoder_hidden_states"])
            wrap(motion_module._modules, "proj_out", ["input"])
    return swaps


@contextmanager
def chunked(unet, samples_per_call=None, motion_parts=None):
    """Within the block, `unet` (a UNetMotionModel) runs its spatial layers `samples_per_call` samples (frames ×
    CFG halves) at a time and its motion modules' pixel rows in `motion_parts` pieces; None leaves that part
    whole. The layers are put back afterwards, also on an error."""
    swaps = []
    if samples_per_call is not None:
        swaps += spatial_wrappers(unet, samples_per_call)
    if motion_parts is not None and motion_parts > 1:
        swaps += motion_wrappers(unet, motion_parts)
    originals = [(container, key, container[key]) for container, key, _ in swaps]
    try:
        for container, key, wrapper in swaps:
            container[key] = wrapper
        yield unet
    finally:
        for container, key, original in reversed(originals):
            container[key] = original


def samples_per_spatial_call(frames, frames_per_call, cfg_halves):
    """Samples in one spatial-layer call: `frames_per_call` frames, of both CFG halves with `together` (the UNet
    batch is [negative × frames, positive × frames]), of one with `apart`; None when that is the whole batch."""
    videos = 2 if cfg_halves == "together" else 1
    samples = frames_per_call * videos
    return None if samples >= frames * videos else samples


@torch.no_grad()
def motion_unet_eps(unet, sample, text, timestep, down_residuals, mid_residual, frames, frames_per_call,
                    cfg_halves="together"):
    """ε of one sliding window through a UNetMotionModel, for the CFG batch `sample` (2·frames, 4, h, w) =
    [negative × frames, positive × frames] (or one half's frames alone, with `apart`) with per-sample `text` and
    ControlNet residuals (or None).

    cfg_halves `together`: one UNet call for both halves; `apart`: one call per half (half the whole-window
    activations). Spatial layers run `frames_per_call` frames at a time (of both halves with `together`), the
    motion modules in as many pieces of pixel rows, so their activations shrink in step; a chunk as large as the
    batch is the plain call, untouched."""
    halves = ([slice(0, sample.shape[0])] if cfg_halves == "together"
              else [slice(first, first + frames) for first in range(0, sample.shape[0], frames)])
    split = samples_per_spatial_call(frames, frames_per_call, cfg_halves)
    outputs = []
    for half in halves:
        part = sample[half]
        video = part.reshape(-1, frames, *part.shape[1:]).permute(0, 2, 1, 3, 4)  # (videos, channels, frames, h, w)
        with chunked(unet, split, None if split is None else math.ceil(part.shape[0] / split)):
            out = unet(video, timestep, encoder_hidden_states=text[half],
                       down_block_additional_residuals=None if down_residuals is None else
                       [residual[half] for residual in down_residuals],
                       mid_block_additional_residual=None if mid_residual is None else mid_residual[half]).sample
        outputs.append(out.permute(0, 2, 1, 3, 4).reshape(part.shape))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
