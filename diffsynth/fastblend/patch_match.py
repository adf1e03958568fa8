"""Pyramid patch matching (PatchMatch with guide + style features) in pure torch.

All functions are batched: index 0 of every tensor is the pair index, images are channel-last (B, H, W, C)
float tensors with values 0..255 and NNFs are int32 (B, H, W, 2) tensors of absolute (y, x) source coordinates.
Source and target images of one call share the same size.

Randomness (direction order of propagation, random-search offsets, random initialisation) comes only from the
generators passed in, so results are reproducible bit for bit on a given device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels

# Neighbour directions (dy, dx) tried by propagation.
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))


@dataclass(frozen=True)
class PatchMatchParams:
    minimum_patch_size: int = 5
    num_iter: int = 5
    guide_weight: float = 10.0
    initialize: str = "identity"
    random_search_rounds: int = 3
    random_search_radius: int = 4
    tracking_window_size: int = 0

    @property
    def max_patch_size(self) -> int:
        return self.minimum_patch_size + 2 * (self.num_iter - 1)

    def patch_sizes(self) -> list[int]:
        return [self.max_patch_size - 2 * i for i in range(self.num_iter)]

    def num_levels(self, height: int, width: int) -> int:
        """levels = int(log2(min(H, W) / max_patch)), at least 1."""
        return max(1, int(math.log2(min(height, width) / self.max_patch_size)))


class Randomness:
    """The two generators one patch-match call draws from: a CPU one for small host-side choices (direction
    order) and one on the compute device for per-pixel random numbers. Both seeded from one integer."""

    def __init__(self, seed: int, device: torch.device | str) -> None:
        device = torch.device(device)
        self.host = torch.Generator(device="cpu")
        self.host.manual_seed(seed)
        self.device = torch.Generator(device=device)
        self.device.manual_seed(seed ^ 0x5DEECE66D)
        self.device_type = device

    def direction_order(self) -> list[tuple[int, int]]:
        return [DIRECTIONS[i] for i in torch.randperm(len(DIRECTIONS), generator=self.host).tolist()]

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        # int32 like the NNFs (the same numbers as an int64 draw from the same state).
        return torch.randint(low, high, shape, generator=self.device, device=self.device_type, dtype=torch.int32)


# --------------------------------------------------------------------------------------------------------------
# Pyramid helpers


def pyramid_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Image size of every level, coarsest first: (H // 2^k, W // 2^k) for k = levels-1 .. 0."""
    return [(max(1, height >> k), max(1, width >> k)) for k in range(levels - 1, -1, -1)]


def resize_area(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-interpolated resize of a (B, H, W, C) image, on its own device."""
    if tuple(image.shape[1:3]) == tuple(size):
        return image
    resized = F.interpolate(image.permute(0, 3, 1, 2), size=size, mode="area")
    return resized.permute(0, 2, 3, 1).contiguous()


def clamp_nnf(nnf: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return torch.stack((nnf[..., 0].clamp(0, height - 1), nnf[..., 1].clamp(0, width - 1)), dim=-1)


def identity_nnf(batch: int, height: int, width: int, device: torch.device | str) -> torch.Tensor:
    ys = torch.arange(height, dtype=torch.int32, device=device).view(1, height, 1).expand(batch, height, width)
    xs = torch.arange(width, dtype=torch.int32, device=device).view(1, 1, width).expand(batch, height, width)
    return torch.stack((ys, xs), dim=-1).contiguous()


def random_nnf(batch: int, height: int, width: int, rng: Randomness) -> torch.Tensor:
    ys = rng.randint(0, height, (batch, height, width))
    xs = rng.randint(0, width, (batch, height, width))
    return torch.stack((ys, xs), dim=-1)


def upsample_nnf(nnf: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Carry an NNF to the next (about 2x larger) level: the value of the parent pixel times 2, plus 1 on odd
    rows / columns, clamped to the new size."""
    _, h_old, w_old, _ = nnf.shape
    height, width = size
    ys = torch.arange(height, device=nnf.device)
    xs = torch.arange(width, device=nnf.device)
    parent = nnf[:, (ys // 2).clamp(max=h_old - 1)][:, :, (xs // 2).clamp(max=w_old - 1)]
    odd = torch.stack(torch.meshgrid(ys % 2, xs % 2, indexing="ij"), dim=-1).to(nnf.dtype)
    return clamp_nnf(parent * 2 + odd, height, width)


# --------------------------------------------------------------------------------------------------------------
# One level's search steps

STYLE_ERRORS = ("remap", "mean", "pairwise")


def features(guide: torch.Tensor, style: torch.Tensor, guide_weight: float) -> torch.Tensor:
    """Concatenate guide and style so that one SSD gives guide_weight * SSD(guide) + SSD(style)."""
    return torch.cat((guide * math.sqrt(guide_weight), style), dim=-1)


def level_error(style_error, source_guide, target_guide, source_style, nnf, patch_size, guide_weight, ops=kernels):
    """The patch error of an NNF, as a function of the NNF, for one iteration at one level:
    guide_weight · SSD(target guide patch, source guide patch at nnf) + a style term that depends on the mode:
    - "remap" (balanced, fast): against the target style estimated at the iteration's start, the remap of the
      source style with the current NNF;
    - "mean" (accurate; the original's use_mean_target_style): against the mean over the batch of the source
      styles remapped with the candidate NNF itself, recomputed for every candidate;
    - "pairwise" (interpolation; the original's use_pairwise_patch_error): between the two sources of each pair
      (batch entries 2k and 2k+1), each read at its own NNF — no target style at all.
    ``ops``: the module whose remap / patch_error / pairwise_patch_error do the work (kernels.backend)."""
    if style_error == "remap":
        source = features(source_guide, source_style, guide_weight)
        target = features(target_guide, ops.remap(source_style, nnf, patch_size), guide_weight)
        return lambda candidate: ops.patch_error(target, source, candidate, patch_size)
    if style_error == "mean":
        source = features(source_guide, source_style, guide_weight)

        def error_with_mean_target(candidate):
            mean = ops.remap(source_style, candidate, patch_size).mean(dim=0, keepdim=True)
            target = features(target_guide, mean.expand_as(source_style), guide_weight)
            return ops.patch_error(target, source, candidate, patch_size)
        return error_with_mean_target
    if style_error == "pairwise":
        def error_between_pair(candidate):
            guide = ops.patch_error(target_guide, source_guide, candidate, patch_size) * guide_weight
            style = ops.pairwise_patch_error(source_style[0::2], candidate[0::2], source_style[1::2],
                                             candidate[1::2], patch_size)
            return guide + style.repeat_interleave(2, dim=0)
        return error_between_pair
    raise ValueError(f"unknown style error {style_error!r} (one of {STYLE_ERRORS})")


def keep_better(nnf, error, candidate, error_of):
    """Replace NNF entries by the candidate where the candidate's patch error is strictly lower."""
    candidate_error = error_of(candidate)
    better = candidate_error < error
    nnf = torch.where(better.unsqueeze(-1), candidate, nnf)
    return nnf, torch.where(better, candidate_error, error)


def shift_batch(nnf: torch.Tensor, d: int) -> torch.Tensor:
    """Entry b gets the NNF of entry b + d (the batch's ends repeated where b + d falls outside)."""
    batch = nnf.shape[0]
    index = (torch.arange(batch, device=nnf.device) + d).clamp(0, batch - 1)
    return nnf[index]


class TorchLevelSearch:
    """The search steps of one iteration at one level, each a materialised candidate NNF whose error is compared
    (the reference; kernels.backend's FusedLevelSearch has the same methods as single fused launches)."""

    def __init__(self, style_error, source_guide, target_guide, source_style, nnf, patch_size, guide_weight,
                 ops=kernels):
        self.error = level_error(style_error, source_guide, target_guide, source_style, nnf, patch_size,
                                 guide_weight, ops)
        self.pairwise = style_error == "pairwise"

    def propagate(self, nnf, error, dy, dx):
        """Try the match of the neighbour (dy, dx) away, shifted back by (dy, dx)."""
        height, width = nnf.shape[1:3]
        ys = (torch.arange(height, device=nnf.device) + dy).clamp(0, height - 1)
        xs = (torch.arange(width, device=nnf.device) + dx).clamp(0, width - 1)
        neighbour = nnf[:, ys][:, :, xs]
        shift = torch.tensor((dy, dx), dtype=nnf.dtype, device=nnf.device)
        return keep_better(nnf, error, clamp_nnf(neighbour - shift, height, width), self.error)

    def random_search(self, nnf, error, offsets):
        """Try the current match plus each drawn offset in turn."""
        height, width = nnf.shape[1:3]
        for offset in offsets:
            nnf, error = keep_better(nnf, error, clamp_nnf(nnf + offset, height, width), self.error)
        return nnf, error

    def track(self, nnf, error, step):
        """Try the match of the batch entry ``step`` places away (with pairwise sources, the pair's halves shift
        apart: entry 2k gets entry 2(k + step)'s)."""
        if self.pairwise:
            candidate = torch.empty_like(nnf)
            candidate[0::2], candidate[1::2] = shift_batch(nnf[0::2], step), shift_batch(nnf[1::2], step)
        else:
            candidate = shift_batch(nnf, step)
        return keep_better(nnf, error, candidate, self.error)


def track(search, nnf, error, window: int):
    """tracking_window_size: for d = 1..window, try the NNF of the source d places later, then d places earlier in
    the batch (consecutive frames move alike)."""
    for d in range(1, window + 1):
        for step in (d, -d):
            nnf, error = search.track(nnf, error, step)
    return nnf, error


def search_level(nnf, source_guide, target_guide, source_style, params: PatchMatchParams, rng, style_error="remap"):
    """num_iter iterations with shrinking patch sizes, each: the error of the current NNF; propagation from the 4
    directions in random order; random search (rounds of a uniform integer offset in [-radius, radius]^2 around
    the current match); tracking."""
    if style_error not in STYLE_ERRORS:
        raise ValueError(f"unknown style error {style_error!r} (one of {STYLE_ERRORS})")
    if style_error == "pairwise" and source_style.shape[0] % 2:
        raise ValueError("pairwise patch error needs pairs of sources (an even batch)")
    ops = kernels.backend(nnf.device)
    level_search = getattr(ops, "FusedLevelSearch", None)  # the torch module has none
    if level_search is None or style_error == "mean":  # mean: a remap of every candidate, composed of kernels
        level_search = functools.partial(TorchLevelSearch, ops=ops)
    radius = params.random_search_radius
    for patch_size in params.patch_sizes():
        search = level_search(style_error, source_guide, target_guide, source_style, nnf, patch_size,
                              params.guide_weight)
        error = search.error(nnf)
        for dy, dx in rng.direction_order():
            nnf, error = search.propagate(nnf, error, dy, dx)
        # Drawn before the rounds run (they do not depend on the results): the same numbers in the same order.
        offsets = [rng.randint(-radius, radius + 1, tuple(nnf.shape)) for _ in range(params.random_search_rounds)]
        nnf, error = search.random_search(nnf, error, offsets)
        nnf, error = track(search, nnf, error, params.tracking_window_size)
    return nnf


# --------------------------------------------------------------------------------------------------------------
# Public entry points


def _as_batch(image: torch.Tensor, batch: int) -> torch.Tensor:
    if image.dim() == 3:
        image = image.unsqueeze(0)
    return image.expand(batch, *image.shape[1:]).float()


def estimate_nnf(
    source_guide: torch.Tensor,
    target_guide: torch.Tensor,
    source_style: torch.Tensor,
    style_error: str = "remap",
    params: PatchMatchParams = PatchMatchParams(),
    seed: int = 0,
) -> torch.Tensor:
    """Pyramid patch match from source to target; returns the finest-level NNF (B, H, W, 2).

    source_guide, source_style: (B, H, W, 3). target_guide: (B, H, W, 3) or (H, W, 3) (shared by every pair).
    ``style_error``: how the style part of the patch error is measured (see level_error).
    """
    batch, height, width, _ = source_guide.shape
    device = source_guide.device
    rng = Randomness(seed, device)
    target_guide = _as_batch(target_guide, batch)
    levels = params.num_levels(height, width)
    nnf = None
    for size in pyramid_sizes(height, width, levels):
        if nnf is None:
            if params.initialize == "random":
                nnf = random_nnf(batch, size[0], size[1], rng)
            else:
                nnf = identity_nnf(batch, size[0], size[1], device)
        else:
            nnf = upsample_nnf(nnf, size)
        nnf = search_level(nnf, resize_area(source_guide, size), resize_area(target_guide, size),
                           resize_area(source_style, size), params, rng, style_error)
    return nnf


def warp(
    source_guide: torch.Tensor,
    target_guide: torch.Tensor,
    source_style: torch.Tensor,
    style_error: str = "remap",
    params: PatchMatchParams = PatchMatchParams(),
    seed: int = 0,
) -> torch.Tensor:
    """Warp each source style image onto its target: estimate the NNF, then patch-vote with the smallest patch.
    Returns (B, H, W, 3) float32."""
    nnf = estimate_nnf(source_guide, target_guide, source_style, style_error, params, seed)
    return kernels.backend(nnf.device).remap(source_style.float(), nnf, params.patch_sizes()[-1])
