"""The inner-loop kernels of patch matching, in pure torch, and the choice of back end.

This module is the seam for accelerated back ends: ``remap``, ``patch_error`` and ``pairwise_patch_error`` are the
only functions that touch every pixel times every patch offset. :func:`backend` picks, per device, the module that
provides them: this one (the CPU path, and the reference), or :mod:`diffsynth.fastblend.triton_kernels` on CUDA,
which has the same three functions plus ``FusedLevelSearch``, one level's search steps as single fused launches.

Layout conventions (shared with :mod:`diffsynth.fastblend.patch_match`):

* images are channel-last float tensors ``(B, H, W, C)``;
* a nearest-neighbour field (NNF) is an int32 tensor ``(B, H, W, 2)`` holding, for every target pixel, the
  ``(y, x)`` coordinate of its match in the source image, always inside ``[0, H) x [0, W)``;
* coordinates that fall outside the image while reading a patch are clamped to the border (edge padding).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

# Testing/benchmarking override of the back end: "torch" or "triton" (on the CPU only with TRITON_INTERPRET=1).
# Unset: Triton on CUDA, torch on the CPU. The choice is part of the smoothing stages' fingerprint (backend_name).
BACKEND_ENV = "DIFFSYNTH_FASTBLEND_KERNELS"
BACKENDS = ("torch", "triton")


def backend_name(device: torch.device | str) -> str:
    """The back end FastBlend uses on ``device``: "triton" on CUDA (or when forced), else "torch"."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: use one of {BACKENDS}, or unset it")
        return forced
    return "triton" if torch.device(device).type == "cuda" else "torch"


def backend(device: torch.device | str):
    """The module whose remap / patch_error / pairwise_patch_error (and FusedLevelSearch, if any) run on
    ``device``."""
    if backend_name(device) == "torch":
        return sys.modules[__name__]
    if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{BACKEND_ENV}=triton on the CPU needs TRITON_INTERPRET=1 (set before triton is imported)")
    from . import triton_kernels  # imported on first use: triton reads TRITON_INTERPRET at import

    return triton_kernels


def pad_edge(image: torch.Tensor, radius: int) -> torch.Tensor:
    """Edge-pad a (B, H, W, C) image by ``radius`` pixels on each side."""
    if radius == 0:
        return image
    padded = F.pad(image.permute(0, 3, 1, 2), (radius, radius, radius, radius), mode="replicate")
    return padded.permute(0, 2, 3, 1).contiguous()


def _flat_rows(padded: torch.Tensor) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B*Hp*Wp, C), rows addressed by ``b*Hp*Wp + y*Wp + x``."""
    return padded.reshape(-1, padded.shape[-1])


def _flat_index(nnf: torch.Tensor, radius: int, padded_hw: tuple[int, int]) -> torch.Tensor:
    """Row index, in the flattened padded image, of the pixel each NNF entry points at. Shape (B, H, W)."""
    batch = nnf.shape[0]
    hp, wp = padded_hw
    batch_offset = torch.arange(batch, dtype=nnf.dtype, device=nnf.device).view(batch, 1, 1) * (hp * wp)
    return batch_offset + (nnf[..., 0] + radius) * wp + (nnf[..., 1] + radius)


def patch_error(target: torch.Tensor, source: torch.Tensor, nnf: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sum of squared differences between the target patch at p and the source patch at nnf(p).

    target, source: (B, H, W, C) float features (already weighted, e.g. guide scaled by sqrt(guide_weight)).
    Returns (B, H, W) float.
    """
    radius = patch_size // 2
    batch, height, width, _ = target.shape
    target_pad = pad_edge(target, radius)
    source_pad = pad_edge(source, radius)
    hp, wp = source_pad.shape[1:3]
    rows = _flat_rows(source_pad)
    # Index of the patch's top-left corner; offset d is then a view of the rows starting d further on.
    corner = (_flat_index(nnf, radius, (hp, wp)) - (radius * wp + radius)).reshape(-1)
    error = torch.zeros_like(target)
    # One buffer for the gathered patch pixels and one for the differences, reused for every offset: a fresh
    # image-sized tensor per offset costs page faults on the CPU (the values are the same either way).
    matched = torch.empty(corner.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
    diff = torch.empty_like(target)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            torch.index_select(rows[(dy + radius) * wp + dx + radius :], 0, corner, out=matched)
            torch.sub(target_pad[:, radius + dy : radius + dy + height, radius + dx : radius + dx + width],
                      matched.view_as(target), out=diff)
            error.addcmul_(diff, diff)
    return error.sum(dim=-1)


def pairwise_patch_error(source_a, nnf_a, source_b, nnf_b, patch_size: int) -> torch.Tensor:
    """Sum of squared differences between the patch of source_a at nnf_a(p) and the patch of source_b at
    nnf_b(p): how well two sources agree about pixel p. (B, H, W, C) images, (B, H, W, 2) NNFs; returns
    (B, H, W)."""
    radius = patch_size // 2
    pad_a, pad_b = pad_edge(source_a, radius), pad_edge(source_b, radius)
    hp, wp = pad_a.shape[1:3]
    rows_a, rows_b = _flat_rows(pad_a), _flat_rows(pad_b)
    corner_a = (_flat_index(nnf_a, radius, (hp, wp)) - (radius * wp + radius)).reshape(-1)
    corner_b = (_flat_index(nnf_b, radius, (hp, wp)) - (radius * wp + radius)).reshape(-1)
    shape = (*nnf_a.shape[:3], source_a.shape[-1])
    error = torch.zeros(shape, dtype=source_a.dtype, device=source_a.device)
    matched_a, matched_b = torch.empty(shape, dtype=rows_a.dtype, device=rows_a.device), torch.empty(
        shape, dtype=rows_b.dtype, device=rows_b.device)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            offset = (dy + radius) * wp + dx + radius
            torch.index_select(rows_a[offset:], 0, corner_a, out=matched_a.view(-1, shape[-1]))
            torch.index_select(rows_b[offset:], 0, corner_b, out=matched_b.view(-1, shape[-1]))
            matched_a.sub_(matched_b)  # the difference, in place of the gathered a
            error.addcmul_(matched_a, matched_a)
    return error.sum(dim=-1)


def remap(source: torch.Tensor, nnf: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch voting: pixel p averages ``source[nnf(p + d) - d]`` over the offsets d of the patch with p + d in
    the image (``nnf(p + d) - d`` clamped to the image).

    source: (B, H, W, C); nnf: (B, H, W, 2). Returns (B, H, W, C).
    """
    radius = patch_size // 2
    batch, height, width, channels = source.shape
    source_pad = pad_edge(source, radius)
    hp, wp = source_pad.shape[1:3]
    rows = _flat_rows(source_pad)
    # Index field padded with a harmless valid index and a zero mask for the out-of-image neighbours p + d.
    base = _flat_index(nnf, radius, (hp, wp))
    base_pad = F.pad(base, (radius, radius, radius, radius), value=radius * wp + radius)
    mask = torch.ones(1, height, width, 1, dtype=source.dtype, device=source.device)
    mask_pad = F.pad(mask.permute(0, 3, 1, 2), (radius, radius, radius, radius)).permute(0, 2, 3, 1)
    total = torch.zeros_like(source)
    count = torch.zeros(1, height, width, 1, dtype=source.dtype, device=source.device)
    index = torch.empty(batch * height * width, dtype=base_pad.dtype, device=base_pad.device)
    voted = torch.empty(batch * height * width, channels, dtype=source.dtype, device=source.device)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            window = (slice(None), slice(radius + dy, radius + dy + height), slice(radius + dx, radius + dx + width))
            torch.sub(base_pad[window], dy * wp + dx, out=index.view(batch, height, width))
            valid = mask_pad[window]
            torch.index_select(rows, 0, index, out=voted)
            total.addcmul_(voted.view(batch, height, width, channels), valid)
            count += valid
    return total / count
