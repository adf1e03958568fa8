"""FastBlend's accurate and interpolation modes and tracking_window_size as the original computes them, checked
against references written here from the original's formulas (plain loops over pixels and patch offsets)."""

import itertools

import pytest
import torch

from diffsynth.fastblend import FastBlendConfig, SmoothingPlan
from diffsynth.fastblend import plan as plan_module
from diffsynth.fastblend.patch_match import TorchLevelSearch, identity_nnf, level_error, track

GUIDE_WEIGHT = 10.0
PATCH = 3


def at(image, y, x):
    """image (H, W, C) read with edge clamping."""
    height, width = image.shape[:2]
    return image[min(max(y, 0), height - 1), min(max(x, 0), width - 1)]


def ssd(target, source, nnf, y, x):
    """Σ over the patch offsets d of |target[p + d] - source[nnf(p) + d]|² for one pixel p = (y, x)."""
    r = PATCH // 2
    sy, sx = nnf[y, x].tolist()
    return sum(float(((at(target, y + dy, x + dx) - at(source, sy + dy, sx + dx)) ** 2).sum())
               for dy, dx in itertools.product(range(-r, r + 1), repeat=2))


def remap(source, nnf):
    """Patch voting: p averages source[nnf(p + d) - d] over the offsets d with p + d inside the image."""
    r = PATCH // 2
    height, width = source.shape[:2]
    out = torch.zeros_like(source)
    for y, x in itertools.product(range(height), range(width)):
        votes = [at(source, int(nnf[y + dy, x + dx, 0]) - dy, int(nnf[y + dy, x + dx, 1]) - dx)
                 for dy, dx in itertools.product(range(-r, r + 1), repeat=2)
                 if 0 <= y + dy < height and 0 <= x + dx < width]
        out[y, x] = torch.stack(votes).mean(dim=0)
    return out


@pytest.fixture
def scene():
    generator = torch.Generator().manual_seed(4)
    batch, height, width = 4, 6, 7
    source_guide = torch.rand(batch, height, width, 3, generator=generator) * 255
    source_style = torch.rand(batch, height, width, 3, generator=generator) * 255
    target_guide = (torch.rand(height, width, 3, generator=generator) * 255).expand(batch, -1, -1, -1)
    nnf = torch.stack((torch.randint(0, height, (batch, height, width), generator=generator),
                       torch.randint(0, width, (batch, height, width), generator=generator)), dim=-1)
    return source_guide, target_guide, source_style, nnf


def test_mean_target_style_error_matches_the_original_formula(scene):
    """use_mean_target_style: the style target is the mean over the batch of the sources remapped with the
    candidate NNF itself."""
    source_guide, target_guide, source_style, nnf = scene
    got = level_error("mean", source_guide, target_guide, source_style, nnf, PATCH, GUIDE_WEIGHT)(nnf)
    mean_target = torch.stack([remap(source_style[b], nnf[b]) for b in range(len(nnf))]).mean(dim=0)
    for b, y, x in itertools.product(range(len(nnf)), range(6), range(7)):
        expected = (GUIDE_WEIGHT * ssd(target_guide[b], source_guide[b], nnf[b], y, x)
                    + ssd(mean_target, source_style[b], nnf[b], y, x))
        assert got[b, y, x].item() == pytest.approx(expected, rel=1e-4)


def test_pairwise_error_matches_the_original_formula(scene):
    """use_pairwise_patch_error: the style term compares the two sources of a pair (2k, 2k+1), each at its own
    match, and both get the same value."""
    source_guide, target_guide, source_style, nnf = scene
    got = level_error("pairwise", source_guide, target_guide, source_style, nnf, PATCH, GUIDE_WEIGHT)(nnf)
    r = PATCH // 2
    for pair, y, x in itertools.product(range(2), range(6), range(7)):
        a, b = 2 * pair, 2 * pair + 1
        (ay, ax), (by, bx) = nnf[a, y, x].tolist(), nnf[b, y, x].tolist()
        style = sum(float(((at(source_style[a], ay + dy, ax + dx) - at(source_style[b], by + dy, bx + dx)) ** 2)
                          .sum()) for dy, dx in itertools.product(range(-r, r + 1), repeat=2))
        for member in (a, b):
            expected = GUIDE_WEIGHT * ssd(target_guide[member], source_guide[member], nnf[member], y, x) + style
            assert got[member, y, x].item() == pytest.approx(expected, rel=1e-4)


def test_tracking_hands_a_good_match_along_the_batch():
    """Three identical sources, the target their shift by one pixel: source 0 starts with the right match, 1 and 2
    with the identity. Trying the NNFs of the sources 1 and 2 places away fixes both."""
    generator = torch.Generator().manual_seed(1)
    source = torch.rand(1, 8, 8, 3, generator=generator).expand(3, -1, -1, -1) * 255
    target = torch.roll(source[0], shifts=1, dims=1)
    right = identity_nnf(1, 8, 8, "cpu")
    right[..., 1] = (right[..., 1] - 1).clamp(0, 7)
    nnf = torch.cat([right, identity_nnf(2, 8, 8, "cpu")])
    search = TorchLevelSearch("remap", source, target.expand(3, -1, -1, -1), source, nnf, PATCH, GUIDE_WEIGHT)
    error = search.error(nnf)
    tracked, tracked_error = track(search, nnf, error, window=2)
    assert torch.equal(tracked[1], right[0]) and torch.equal(tracked[2], right[0])
    assert (tracked_error <= error).all() and tracked_error[1:].sum() < error[1:].sum()
    untracked, _ = track(search, nnf, error, window=0)
    assert torch.equal(untracked, nnf)


class NumberedFrames:
    """Frame i's guide is i everywhere and its style 10·i: aggregation can be read off the output value."""
    num_frames = 9

    def guide(self, i):
        return torch.full((8, 8, 3), float(i))

    def style(self, i):
        return torch.full((8, 8, 3), 10.0 * i)


def test_accurate_mode_averages_every_remap_including_the_targets_own(monkeypatch):
    calls = []

    def fake_warp(guides, target_guide, styles, style_error, params, seed):
        calls.append((style_error, styles[:, 0, 0, 0].tolist()))
        return styles + 1000.0  # marks every frame that went through a remap
    monkeypatch.setattr(plan_module, "warp", fake_warp)
    plan = SmoothingPlan(9, FastBlendConfig(inference_mode="accurate", window_size=2, batch_size=2))
    out = plan.compute("frame/000004", NumberedFrames(), None)
    assert {style_error for style_error, _ in calls} == {"mean"}
    assert sorted(v for _, values in calls for v in values) == [20.0, 30.0, 40.0, 50.0, 60.0]  # t = 4 included
    assert torch.allclose(out, torch.full_like(out, (20 + 30 + 40 + 50 + 60) / 5 + 1000.0))


def test_interpolation_matches_both_keyframes_together_and_blends_by_distance(monkeypatch):
    calls = []

    def fake_warp(guides, target_guide, styles, style_error, params, seed):
        calls.append((style_error, styles[:, 0, 0, 0].tolist()))
        return styles
    monkeypatch.setattr(plan_module, "warp", fake_warp)
    plan = SmoothingPlan(9, FastBlendConfig(inference_mode="interpolation", keyframe_ids=(2, 6)))
    out = plan.compute("frame/000003", NumberedFrames(), None)
    assert calls == [("pairwise", [20.0, 60.0])]  # one call, the pair together
    assert torch.allclose(out, torch.full_like(out, (20 * 3 + 60 * 1) / 4))
    calls.clear()
    out = plan.compute("frame/000008", NumberedFrames(), None)  # after the last keyframe: it paired with itself
    assert calls == [("pairwise", [60.0, 60.0])] and torch.allclose(out, torch.full_like(out, 60.0))
