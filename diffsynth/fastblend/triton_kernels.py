"""Fused patch-match kernels in Triton: the GPU back end behind :mod:`diffsynth.fastblend.kernels`.

Every kernel has the patch loop inside and one program per block of target pixels, so one step of one pyramid level
is one launch whatever the patch size (the torch path issues a gather, a subtraction and a multiply-add per patch
offset: ~93,000 aten ops per warp at 104×156). A search step (propagation from one direction, all rounds of random
search, one tracking shift) forms each pixel's candidate inside the kernel, computes its patch error and keeps it
where the error is strictly lower: no candidate field is materialised and nothing waits on the host.

Same layout and semantics as the torch functions of :mod:`diffsynth.fastblend.kernels`: channel-last float32 images
(B, H, W, C), NNFs (B, H, W, 2) of absolute (y, x) source coordinates, int32; coordinates outside the image are
clamped to the border (the torch path's edge padding, without a padded copy). The guide's sqrt(guide_weight) is
applied to both operands before the difference and the errors are summed over offsets in the same (dy, dx) order,
so on integer-valued images both paths are exact and agree bit for bit (tests/test_fastblend_kernels.py).

Determinism: every output element is written by one program, in a fixed loop order, with no atomics; the random
offsets come from the caller's seeded generator. The same unit gives the same bytes in every process on one GPU
model. ``TRITON_INTERPRET=1``, set before triton is imported, runs these kernels on CPU tensors (slowly): that is
how CI checks them.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# What a search launch does at each target pixel.
EVALUATE = 0  # the error of the current match (no candidate)
NEIGHBOUR = 1  # propagation: the match of the pixel (dy, dx) away, shifted back by (dy, dx)
RANDOM = 2  # random search: `rounds` candidates, current match + a drawn offset, one after the other
BATCH = 3  # tracking: the match of the batch entry `step` places away (of the same pair half with pairwise sources)


def _block(n: int) -> int:
    # The interpreter runs a program as numpy ops and pays per op: few, wide programs. Compiled: 128 pixels.
    return max(16, min(triton.next_power_of_2(n), 4096)) if INTERPRETED else 128


@triton.jit
def _clamp(v, high):
    return tl.minimum(tl.maximum(v, 0), high - 1)


@triton.jit
def _gather(image, pixel, mask, C: tl.constexpr, CP: tl.constexpr):
    """(BLOCK, CP) tile of the channels of flat pixel indices `pixel`; padding channels and masked lanes read 0."""
    channel = tl.arange(0, CP)
    return tl.load(image + pixel[:, None] * C + channel[None, :], mask=mask[:, None] & (channel[None, :] < C),
                   other=0.0)


@triton.jit
def _patch_ssd(image_a, b_a, y_a, x_a, image_b, b_b, y_b, x_b, scale, H, W, mask,
               R: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    """Σ over patch offsets d and channels of (scale·a[b_a, (y_a, x_a) + d] − scale·b[b_b, (y_b, x_b) + d])²,
    coordinates clamped to the image."""
    acc = tl.zeros((BLOCK, CP), dtype=tl.float32)
    for dy in range(-R, R + 1):
        row_a = (b_a * H + _clamp(y_a + dy, H)) * W
        row_b = (b_b * H + _clamp(y_b + dy, H)) * W
        for dx in range(-R, R + 1):
            diff = (_gather(image_a, row_a + _clamp(x_a + dx, W), mask, C, CP) * scale
                    - _gather(image_b, row_b + _clamp(x_b + dx, W), mask, C, CP) * scale)
            acc += diff * diff
    return tl.sum(acc, axis=1)


@triton.jit
def _remap_kernel(source, nnf, out, H, W, N, R: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Patch voting: out(p) = mean over the in-image p + d of source[clamp(nnf(p + d) − d)]."""
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = lane < N
    b = lane // (H * W)
    y = (lane // W) % H
    x = lane % W
    total = tl.zeros((BLOCK, CP), dtype=tl.float32)
    count = tl.zeros((BLOCK,), dtype=tl.float32)
    for dy in range(-R, R + 1):
        for dx in range(-R, R + 1):
            qy = y + dy
            qx = x + dx
            valid = mask & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            q = (b * H + qy) * W + qx
            sy = _clamp(tl.load(nnf + 2 * q, mask=valid, other=0) - dy, H)
            sx = _clamp(tl.load(nnf + 2 * q + 1, mask=valid, other=0) - dx, W)
            total += _gather(source, (b * H + sy) * W + sx, valid, C, CP)
            count += valid.to(tl.float32)
    channel = tl.arange(0, CP)
    # Masked lanes have no offset in the image; max(count, 1) keeps their (unstored) quotient finite.
    tl.store(out + lane[:, None] * C + channel[None, :], total / tl.maximum(count, 1.0)[:, None],
             mask=mask[:, None] & (channel[None, :] < C))


@triton.jit
def _patch_error_kernel(image_a, nnf_a, image_b, nnf_b, out, H, W, N, A_AT_NNF: tl.constexpr, R: tl.constexpr,
                        C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    """SSD between a's patch at p (or at nnf_a(p) if A_AT_NNF) and b's patch at nnf_b(p)."""
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = lane < N
    b = lane // (H * W)
    y = (lane // W) % H
    x = lane % W
    if A_AT_NNF:
        y = tl.load(nnf_a + 2 * lane, mask=mask, other=0)
        x = tl.load(nnf_a + 2 * lane + 1, mask=mask, other=0)
    by = tl.load(nnf_b + 2 * lane, mask=mask, other=0)
    bx = tl.load(nnf_b + 2 * lane + 1, mask=mask, other=0)
    tl.store(out + lane, _patch_ssd(image_a, b, y, x, image_b, b, by, bx, 1.0, H, W, mask, R, C, CP, BLOCK),
             mask=mask)


@triton.jit
def _remap_error(target_guide, source_guide, target_style, source_style, b, y, x, cy, cx, H, W, mask, guide_scale,
                 R: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    """SSD(√w·guide) + SSD(style) of target pixel (b, y, x) matched to source pixel (b, cy, cx)."""
    guide = _patch_ssd(target_guide, b, y, x, source_guide, b, cy, cx, guide_scale, H, W, mask, R, C, CP, BLOCK)
    return guide + _patch_ssd(target_style, b, y, x, source_style, b, cy, cx, 1.0, H, W, mask, R, C, CP, BLOCK)


@triton.jit
def _keep_better(candidate, error, cy, cx, y, x):
    """The match (y, x) and its error, replaced by the candidate's where its error is strictly lower (a tie keeps
    the current match, as the torch path does)."""
    better = candidate < error
    return tl.where(better, cy, y), tl.where(better, cx, x), tl.where(better, candidate, error)


@triton.jit
def _search_kernel(target_guide, source_guide, target_style, source_style, nnf_in, error_in, nnf_out, error_out,
                   offsets, H, W, B, N, guide_scale, dy, dx, step, rounds,
                   KIND: tl.constexpr, R: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    """One search step with the remap-style error (balanced, fast modes): each target pixel tries its candidate(s)
    and keeps a strictly lower error. Reads nnf_in/error_in and writes nnf_out/error_out, never the same buffers
    (a neighbour's match must be the one from before the step)."""
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = lane < N
    b = lane // (H * W)
    y = (lane // W) % H
    x = lane % W
    ny = tl.load(nnf_in + 2 * lane, mask=mask, other=0)
    nx = tl.load(nnf_in + 2 * lane + 1, mask=mask, other=0)
    if KIND == 0:  # EVALUATE
        error = _remap_error(target_guide, source_guide, target_style, source_style, b, y, x, ny, nx, H, W, mask,
                             guide_scale, R, C, CP, BLOCK)
    else:
        error = tl.load(error_in + lane, mask=mask, other=0.0)
        if KIND == 2:  # RANDOM
            for r in range(rounds):
                o = r * N + lane
                cy = _clamp(ny + tl.load(offsets + 2 * o, mask=mask, other=0).to(tl.int32), H)
                cx = _clamp(nx + tl.load(offsets + 2 * o + 1, mask=mask, other=0).to(tl.int32), W)
                candidate = _remap_error(target_guide, source_guide, target_style, source_style, b, y, x, cy, cx,
                                         H, W, mask, guide_scale, R, C, CP, BLOCK)
                ny, nx, error = _keep_better(candidate, error, cy, cx, ny, nx)
        else:
            if KIND == 1:  # NEIGHBOUR
                q = (b * H + _clamp(y + dy, H)) * W + _clamp(x + dx, W)
                cy = _clamp(tl.load(nnf_in + 2 * q, mask=mask, other=0) - dy, H)
                cx = _clamp(tl.load(nnf_in + 2 * q + 1, mask=mask, other=0) - dx, W)
            else:  # BATCH
                q = lane + (_clamp(b + step, B) - b) * H * W
                cy = tl.load(nnf_in + 2 * q, mask=mask, other=0)
                cx = tl.load(nnf_in + 2 * q + 1, mask=mask, other=0)
            candidate = _remap_error(target_guide, source_guide, target_style, source_style, b, y, x, cy, cx, H, W,
                                     mask, guide_scale, R, C, CP, BLOCK)
            ny, nx, error = _keep_better(candidate, error, cy, cx, ny, nx)
    tl.store(nnf_out + 2 * lane, ny, mask=mask)
    tl.store(nnf_out + 2 * lane + 1, nx, mask=mask)
    tl.store(error_out + lane, error, mask=mask)


@triton.jit
def _pair_errors(target_guide, source_guide, source_style, a, b, y, x, ay, ax, by, bx, H, W, mask, guide_weight,
                 R: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    """The pairwise error of both halves of a pair: w·SSD(guide of each at its own match) + the SSD between the
    two sources' styles, each read at its own match (shared)."""
    style = _patch_ssd(source_style, a, ay, ax, source_style, b, by, bx, 1.0, H, W, mask, R, C, CP, BLOCK)
    guide_a = _patch_ssd(target_guide, a, y, x, source_guide, a, ay, ax, 1.0, H, W, mask, R, C, CP, BLOCK)
    guide_b = _patch_ssd(target_guide, b, y, x, source_guide, b, by, bx, 1.0, H, W, mask, R, C, CP, BLOCK)
    return guide_a * guide_weight + style, guide_b * guide_weight + style


@triton.jit
def _pair_search_kernel(target_guide, source_guide, source_style, nnf_in, error_in, nnf_out, error_out, offsets,
                        H, W, PAIRS, N, guide_weight, dy, dx, step, rounds,
                        KIND: tl.constexpr, R: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
                        BLOCK: tl.constexpr):
    """One search step with the pairwise error (interpolation mode): lanes are (pair, y, x); both halves of a pair
    form their candidates together and each keeps its own where its error is strictly lower."""
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = lane < N  # N = PAIRS * H * W
    pair = lane // (H * W)
    y = (lane // W) % H
    x = lane % W
    a = 2 * pair
    b = a + 1
    la = (a * H + y) * W + x
    lb = la + H * W
    ay = tl.load(nnf_in + 2 * la, mask=mask, other=0)
    ax = tl.load(nnf_in + 2 * la + 1, mask=mask, other=0)
    by = tl.load(nnf_in + 2 * lb, mask=mask, other=0)
    bx = tl.load(nnf_in + 2 * lb + 1, mask=mask, other=0)
    if KIND == 0:  # EVALUATE
        error_a, error_b = _pair_errors(target_guide, source_guide, source_style, a, b, y, x, ay, ax, by, bx, H, W,
                                        mask, guide_weight, R, C, CP, BLOCK)
    else:
        error_a = tl.load(error_in + la, mask=mask, other=0.0)
        error_b = tl.load(error_in + lb, mask=mask, other=0.0)
        if KIND == 2:  # RANDOM
            for r in range(rounds):
                oa = r * 2 * N + la
                ob = r * 2 * N + lb
                cay = _clamp(ay + tl.load(offsets + 2 * oa, mask=mask, other=0).to(tl.int32), H)
                cax = _clamp(ax + tl.load(offsets + 2 * oa + 1, mask=mask, other=0).to(tl.int32), W)
                cby = _clamp(by + tl.load(offsets + 2 * ob, mask=mask, other=0).to(tl.int32), H)
                cbx = _clamp(bx + tl.load(offsets + 2 * ob + 1, mask=mask, other=0).to(tl.int32), W)
                candidate_a, candidate_b = _pair_errors(target_guide, source_guide, source_style, a, b, y, x, cay,
                                                        cax, cby, cbx, H, W, mask, guide_weight, R, C, CP, BLOCK)
                ay, ax, error_a = _keep_better(candidate_a, error_a, cay, cax, ay, ax)
                by, bx, error_b = _keep_better(candidate_b, error_b, cby, cbx, by, bx)
        else:
            if KIND == 1:  # NEIGHBOUR
                qa = (a * H + _clamp(y + dy, H)) * W + _clamp(x + dx, W)
                qb = qa + H * W
                cay = _clamp(tl.load(nnf_in + 2 * qa, mask=mask, other=0) - dy, H)
                cax = _clamp(tl.load(nnf_in + 2 * qa + 1, mask=mask, other=0) - dx, W)
                cby = _clamp(tl.load(nnf_in + 2 * qb, mask=mask, other=0) - dy, H)
                cbx = _clamp(tl.load(nnf_in + 2 * qb + 1, mask=mask, other=0) - dx, W)
            else:  # BATCH: the pair `step` places away
                qa = la + (_clamp(pair + step, PAIRS) - pair) * 2 * H * W
                qb = qa + H * W
                cay = tl.load(nnf_in + 2 * qa, mask=mask, other=0)
                cax = tl.load(nnf_in + 2 * qa + 1, mask=mask, other=0)
                cby = tl.load(nnf_in + 2 * qb, mask=mask, other=0)
                cbx = tl.load(nnf_in + 2 * qb + 1, mask=mask, other=0)
            candidate_a, candidate_b = _pair_errors(target_guide, source_guide, source_style, a, b, y, x, cay, cax,
                                                    cby, cbx, H, W, mask, guide_weight, R, C, CP, BLOCK)
            ay, ax, error_a = _keep_better(candidate_a, error_a, cay, cax, ay, ax)
            by, bx, error_b = _keep_better(candidate_b, error_b, cby, cbx, by, bx)
    tl.store(nnf_out + 2 * la, ay, mask=mask)
    tl.store(nnf_out + 2 * la + 1, ax, mask=mask)
    tl.store(nnf_out + 2 * lb, by, mask=mask)
    tl.store(nnf_out + 2 * lb + 1, bx, mask=mask)
    tl.store(error_out + la, error_a, mask=mask)
    tl.store(error_out + lb, error_b, mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Host side: the same signatures as kernels.py's torch functions, plus one level's search steps.


def _image(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


def _field(nnf: torch.Tensor) -> torch.Tensor:
    return nnf.to(torch.int32).contiguous()


def _grid(n: int):
    return (triton.cdiv(n, _block(n)),)


def _check_size(*tensors: torch.Tensor) -> None:
    for tensor in tensors:  # flat offsets are int32 inside the kernels
        if tensor.numel() >= 2**31:
            raise ValueError(f"a FastBlend batch of {tensor.numel()} values is too large for the fused kernels; "
                             "lower batch_size")


def remap(source: torch.Tensor, nnf: torch.Tensor, patch_size: int) -> torch.Tensor:
    source, nnf = _image(source), _field(nnf)
    _check_size(source)
    batch, height, width, channels = source.shape
    out = torch.empty_like(source)
    n = batch * height * width
    _remap_kernel[_grid(n)](source, nnf, out, height, width, n, R=patch_size // 2, C=channels,
                            CP=triton.next_power_of_2(channels), BLOCK=_block(n))
    return out


def patch_error(target: torch.Tensor, source: torch.Tensor, nnf: torch.Tensor, patch_size: int) -> torch.Tensor:
    target, source, nnf = _image(target), _image(source), _field(nnf)
    return _patch_error(target, nnf, source, nnf, patch_size, a_at_nnf=False)


def pairwise_patch_error(source_a, nnf_a, source_b, nnf_b, patch_size: int) -> torch.Tensor:
    source_a, source_b, nnf_a, nnf_b = _image(source_a), _image(source_b), _field(nnf_a), _field(nnf_b)
    return _patch_error(source_a, nnf_a, source_b, nnf_b, patch_size, a_at_nnf=True)


def _patch_error(a, nnf_a, b, nnf_b, patch_size, a_at_nnf):
    """One launch of the patch-error kernel: a's patch at each pixel (or at nnf_a, `a_at_nnf`) against b's at
    nnf_b; (batch, H, W) float32."""
    _check_size(a)
    batch, height, width, channels = a.shape
    out = torch.empty(batch, height, width, dtype=torch.float32, device=a.device)
    n = batch * height * width
    _patch_error_kernel[_grid(n)](a, nnf_a, b, nnf_b, out, height, width, n, A_AT_NNF=a_at_nnf,
                                  R=patch_size // 2, C=channels, CP=triton.next_power_of_2(channels),
                                  BLOCK=_block(n))
    return out


class FusedLevelSearch:
    """The search steps of one iteration at one pyramid level (see patch_match.TorchLevelSearch for the reference),
    each one kernel launch: the remap-style error (the target style is the source style remapped with the
    iteration's starting NNF) or the pairwise error."""

    def __init__(self, style_error, source_guide, target_guide, source_style, nnf, patch_size, guide_weight):
        self.pairwise = style_error == "pairwise"
        self.source_guide, self.target_guide = _image(source_guide), _image(target_guide)
        self.source_style = _image(source_style)
        _check_size(self.source_guide, self.target_guide, self.source_style)
        self.radius = patch_size // 2
        self.guide_weight = guide_weight
        self.target_style = None if self.pairwise else remap(self.source_style, nnf, patch_size)
        batch, self.height, self.width, self.channels = self.source_style.shape
        self.batch = batch

    def _launch(self, kind, nnf, error, offsets=None, dy=0, dx=0, step=0):
        nnf = _field(nnf)
        nnf_out = torch.empty_like(nnf)
        error_out = torch.empty(nnf.shape[:3], dtype=torch.float32, device=nnf.device)
        error = error_out if error is None else error.contiguous()  # EVALUATE reads no error
        rounds = 0 if offsets is None else offsets.shape[0]
        offsets = nnf if offsets is None else offsets  # a placeholder pointer when unused
        common = dict(KIND=kind, R=self.radius, C=self.channels, CP=triton.next_power_of_2(self.channels))
        if self.pairwise:
            pairs = self.batch // 2
            n = pairs * self.height * self.width
            _pair_search_kernel[_grid(n)](self.target_guide, self.source_guide, self.source_style, nnf, error,
                                          nnf_out, error_out, offsets, self.height, self.width, pairs, n,
                                          float(self.guide_weight), dy, dx, step, rounds, BLOCK=_block(n), **common)
        else:
            n = self.batch * self.height * self.width
            _search_kernel[_grid(n)](self.target_guide, self.source_guide, self.target_style, self.source_style,
                                     nnf, error, nnf_out, error_out, offsets, self.height, self.width, self.batch,
                                     n, math.sqrt(self.guide_weight), dy, dx, step, rounds, BLOCK=_block(n),
                                     **common)
        return nnf_out, error_out

    def error(self, nnf):
        return self._launch(EVALUATE, nnf, None)[1]

    def propagate(self, nnf, error, dy, dx):
        return self._launch(NEIGHBOUR, nnf, error, dy=dy, dx=dx)

    def random_search(self, nnf, error, offsets):
        if not offsets:
            return _field(nnf), error
        offsets = torch.stack(offsets)
        _check_size(offsets)
        return self._launch(RANDOM, nnf, error, offsets=offsets)

    def track(self, nnf, error, step):
        return self._launch(BATCH, nnf, error, step=step)
