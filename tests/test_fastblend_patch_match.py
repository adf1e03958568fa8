"""Patch-match building blocks: kernels, NNF helpers and recovery of a known motion."""

import pytest
import torch
import torch.nn.functional as F

from diffsynth.fastblend import kernels
from diffsynth.fastblend.patch_match import (
    PatchMatchParams,
    estimate_nnf,
    identity_nnf,
    pyramid_sizes,
    upsample_nnf,
    warp,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def texture(size: int, seed: int = 0) -> torch.Tensor:
    """A colourful, smoothed-noise texture (size, size, 3) in 0..255."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 3, size, size, generator=g) * 255
    smooth = F.avg_pool2d(noise, 3, 1, 1)
    return ((smooth - smooth.mean()) * 3 + 128).clamp(0, 255)[0].permute(1, 2, 0).contiguous()


def shifted_pair(shift, size=64, margin=10, seed=0):
    """source and target crops of one texture with target(p) = source(p + shift)."""
    tex = texture(size + 2 * margin, seed)
    dy, dx = shift
    source = tex[margin : margin + size, margin : margin + size]
    target = tex[margin + dy : margin + dy + size, margin + dx : margin + dx + size]
    return source.contiguous(), target.contiguous()


def test_remap_with_identity_nnf_is_identity():
    image = torch.rand(2, 12, 15, 3) * 255
    for patch_size in (1, 3, 5):
        out = kernels.remap(image, identity_nnf(2, 12, 15, "cpu"), patch_size)
        torch.testing.assert_close(out, image)


def test_patch_error_is_zero_for_identical_images_and_weighted_ssd_otherwise():
    a = torch.rand(1, 9, 9, 2)
    nnf = identity_nnf(1, 9, 9, "cpu")
    assert kernels.patch_error(a, a, nnf, 3).abs().max() == 0
    b = a + 1.0  # every channel of every pixel differs by 1: SSD = patch_size^2 * channels
    torch.testing.assert_close(kernels.patch_error(a, b, nnf, 3), torch.full((1, 9, 9), 9.0 * 2))


def test_upsample_nnf_doubles_and_adds_parity():
    nnf = identity_nnf(1, 4, 5, "cpu")
    up = upsample_nnf(nnf, (8, 10))
    torch.testing.assert_close(up, identity_nnf(1, 8, 10, "cpu"))
    odd = upsample_nnf(nnf, (9, 11))  # odd sizes: last row/column reuse the last parent, clamped
    assert odd.shape == (1, 9, 11, 2)
    assert int(odd[..., 0].max()) <= 8 and int(odd[..., 1].max()) <= 10


def test_pyramid_levels_follow_the_reference_formula():
    params = PatchMatchParams(minimum_patch_size=5, num_iter=5)  # max patch 13
    assert params.patch_sizes() == [13, 11, 9, 7, 5]
    assert params.num_levels(512, 768) == 5  # int(log2(512 / 13)) = 5
    assert params.num_levels(8, 8) == 1
    assert pyramid_sizes(64, 96, 3) == [(16, 24), (32, 48), (64, 96)]


# Odd shifts need num_iter >= 5 to be found exactly at the finest level: upsampling only proposes even offsets
# there, and the random search + propagation of fewer iterations does not reach every pixel. Even shifts are
# exact at the coarser level already.
KNOWN_MOTION_CASES = [
    ((3, -2), 5, 5),
    ((3, -2), 3, 5),
    ((3, -2), 7, 5),
    ((1, 2), 5, 5),
    ((4, -4), 3, 3),
    ((4, -4), 7, 3),
    ((-2, 4), 5, 3),
]


@pytest.mark.parametrize("shift,minimum_patch_size,num_iter", KNOWN_MOTION_CASES)
def test_patch_match_recovers_known_shift(shift, minimum_patch_size, num_iter):
    source, target = shifted_pair(shift)
    params = PatchMatchParams(minimum_patch_size=minimum_patch_size, num_iter=num_iter)
    batch = 2
    nnf = estimate_nnf(source.expand(batch, -1, -1, -1), target, source.expand(batch, -1, -1, -1), "remap", params, 7)
    offset = nnf - identity_nnf(batch, 64, 64, "cpu")
    interior = offset[:, 8:-8, 8:-8]
    exact = (interior[..., 0] == shift[0]) & (interior[..., 1] == shift[1])
    assert exact.float().mean() > 0.99, f"levels={params.num_levels(64, 64)}"


def test_warp_reproduces_shifted_style_and_is_deterministic():
    source, target = shifted_pair((3, -2))
    style = 255 - source  # a different "style" image moving with the same motion
    params = PatchMatchParams(minimum_patch_size=5, num_iter=5)
    warped = warp(source[None], target, style[None], "remap", params, seed=3)
    expected = 255 - target
    assert (warped[0, 8:-8, 8:-8] - expected[8:-8, 8:-8]).abs().mean() < 1.0
    again = warp(source[None], target, style[None], "remap", params, seed=3)
    assert torch.equal(warped, again)


def test_random_initialisation_mostly_converges():
    # A random start has to find the motion through propagation alone (random search is local, +-4 pixels), so
    # with two pyramid levels most, not all, pixels lock onto it.
    source, target = shifted_pair((4, -4))
    params = PatchMatchParams(minimum_patch_size=5, num_iter=5, initialize="random")
    nnf = estimate_nnf(source[None], target, source[None], "remap", params, seed=11)
    offset = (nnf - identity_nnf(1, 64, 64, "cpu"))[:, 8:-8, 8:-8]
    assert ((offset[..., 0] == 4) & (offset[..., 1] == -4)).float().mean() > 0.75
