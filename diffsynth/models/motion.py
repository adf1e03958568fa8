"""The AnimateDiff UNet: diffusers' UNetMotionModel with its motion modules normalised as AnimateDiff's own code.

AnimateDiff (guoyww's `motion_module.py`, and the original Diffutoon's `sd_motion.py`) applies each motion module's
GroupNorm to every frame on its own: it rearranges `b c f h w -> (b f) c h w` before the norm. diffusers'
`AnimateDiffTransformer3D` applies the same GroupNorm to the (batch, C, frames, H, W) volume, so its statistics span
the whole sliding window and a frame's normalised activations depend on which other frames share its window. The
weights were trained with the per-frame norm (every AnimateDiff version, v1 to v3, uses it), so `frame` is the
default; `window` (models.motion_norm) keeps diffusers' behaviour, to match diffusers' AnimateDiff pipelines.
"""

import torch
import torch.nn.functional as F

MOTION_NORMS = ("frame", "window")


class FrameGroupNorm(torch.nn.GroupNorm):
    """A motion module's GroupNorm applied to each frame of a (batch, C, frames, H, W) input separately, as
    AnimateDiff does. The same parameters (weight, bias) as the GroupNorm it replaces, so state dicts and the LoRA /
    loading code see no difference."""

    def forward(self, input):
        if input.dim() != 5:
            return super().forward(input)
        batch, channels, frames, height, width = input.shape
        # diffusers' input is a (batch, frames, C, H, W) tensor viewed as (batch, C, frames, H, W): the permute back
        # is that contiguous tensor, and the norm runs on (batch·frames, C, H, W) exactly as AnimateDiff's does.
        per_frame = input.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        normed = F.group_norm(per_frame, self.num_groups, self.weight, self.bias, self.eps)
        return normed.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)


def motion_modules(unet):
    """Every motion module (AnimateDiffTransformer3D) of a UNetMotionModel: down, mid (v2/v3) and up blocks."""
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        yield from getattr(block, "motion_modules", None) or []


def set_motion_norm(unet, motion_norm="frame"):
    """Make every motion module of `unet` normalise per frame (`frame`, AnimateDiff's) or over the whole window
    (`window`, diffusers'), in place; the parameters are kept, not copied. Returns `unet`."""
    if motion_norm not in MOTION_NORMS:
        raise ValueError(f"motion_norm {motion_norm!r} is not one of {MOTION_NORMS}")
    kind = FrameGroupNorm if motion_norm == "frame" else torch.nn.GroupNorm
    for module in motion_modules(unet):
        norm = module.norm
        if type(norm) is not kind:
            replacement = kind(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine,
                               device=norm.weight.device if norm.affine else None,
                               dtype=norm.weight.dtype if norm.affine else None)
            if norm.affine:
                replacement.weight, replacement.bias = norm.weight, norm.bias
            module.norm = replacement
    return unet


def motion_unet(unet2d, adapter, motion_norm="frame", load_weights=True, path=None):
    """The one way this project builds an AnimateDiff UNet: diffusers' UNetMotionModel from an SD1.5 UNet and a
    MotionAdapter, with `motion_norm`. With `load_weights` it is `UNetMotionModel.from_unet2d(unet2d, adapter)`
    without building the ~1.3 B parameters from_unet2d initialises at random (in float32) before copying the
    weights over: the model is built on the meta device and given the UNet's and the adapter's tensors themselves
    (no copy). As from_unet2d does, every tensor is cast to the 2-D UNet's dtype (an fp16 base makes the motion
    weights fp16 too), so the weights are the same bits. `path` (the motion module's file) names it in errors.
    load_weights=False: diffusers' model with its own initialisation, as from_unet2d(load_weights=False)."""
    from diffusers import UNetMotionModel

    from .convert import build
    if not load_weights or adapter.config.get("conv_in_channels"):  # PIA's 9-channel conv_in: diffusers' own way
        return set_motion_norm(UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=load_weights), motion_norm)
    dtype = unet2d.dtype
    state = {key: value.to(dtype) for key, value in unet2d.state_dict().items()}
    state.update({key: value.to(dtype) for key, value in adapter.state_dict().items() if ".motion_modules." in key})
    model = build(lambda: UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False), state,
                  path or "the motion module", "AnimateDiff motion module for this base model")
    return set_motion_norm(model, motion_norm)
