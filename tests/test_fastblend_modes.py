"""FastBlend modes on a synthetic flickering scene, determinism, and the unit/table bookkeeping."""

import pytest
import torch

from diffsynth.fastblend import FastBlendConfig, SmoothingPlan, smooth_in_memory
from diffsynth.fastblend.evaluation import flicker, flickering_scene, mean_abs_error
from diffsynth.fastblend.runner import DictTables, ListFrames

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = dict(minimum_patch_size=3, num_iter=3, batch_size=8)
MODES = {
    "balanced": FastBlendConfig(inference_mode="balanced", window_size=3, **SMALL),
    "accurate": FastBlendConfig(inference_mode="accurate", window_size=3, **SMALL),
    "fast": FastBlendConfig(inference_mode="fast", window_size=4, **SMALL),
    "interpolation": FastBlendConfig(inference_mode="interpolation", keyframe_ids=(0, 6, 11), **SMALL),
}


@pytest.fixture(scope="module")
def scene():
    return flickering_scene()


@pytest.fixture(scope="module")
def small_scene():
    """A smaller clip for the bookkeeping tests, which run units more than once."""
    return flickering_scene(num_frames=10, size=32, seed=1)


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_halves_flicker_and_lowers_error(scene, mode):
    clean, style = scene
    out = smooth_in_memory(clean, style, MODES[mode])
    assert len(out) == len(clean)
    assert all(o.shape == c.shape and o.dtype == torch.float32 for o, c in zip(out, clean))
    input_flicker, output_flicker = flicker(style, clean), flicker(out, clean)
    input_error, output_error = mean_abs_error(style, clean), mean_abs_error(out, clean)
    assert output_flicker <= 0.5 * input_flicker, (output_flicker, input_flicker)
    assert output_error < input_error, (output_error, input_error)


def test_window_zero_returns_the_style_frames(scene):
    clean, style = scene
    for mode in ("balanced", "fast"):
        out = smooth_in_memory(clean[:4], style[:4], FastBlendConfig(inference_mode=mode, window_size=0, **SMALL))
        for o, s in zip(out, style[:4]):
            torch.testing.assert_close(o, s)


def test_interpolation_keeps_keyframes_and_accepts_keyframe_only_style(scene):
    clean, style = scene
    config = MODES["interpolation"]
    keyframe_style = [style[k] for k in config.keyframe_ids]
    out = smooth_in_memory(clean[:12], keyframe_style, config)
    for k in config.keyframe_ids:
        torch.testing.assert_close(out[k], style[k])


class RecordingTables:
    def __init__(self, inner):
        self.inner, self.read = inner, []

    def get(self, key):
        self.read.append(key)
        return self.inner.get(key)


class CountingFrames(ListFrames):
    def __init__(self, *args):
        super().__init__(*args)
        self.touched = set()

    def guide(self, i):
        self.touched.add(i)
        return super().guide(i)

    def style(self, i):
        self.touched.add(i)
        return super().style(i)


def run_units(plan, frames, tables, dtype=torch.float16):
    """Run every unit in order, round-tripping tables through ``dtype``; check reads and frame locality."""
    out = {}
    window = plan.config.window_size
    for key in plan.unit_keys():
        recorder = RecordingTables(tables)
        frames.touched = set()
        result = plan.compute(key, frames, recorder)
        assert sorted(set(recorder.read)) == sorted(plan.needed_tables(key)), key
        if key.startswith("frame/"):
            t = int(key.split("/")[1])
            assert all(abs(i - t) <= window for i in frames.touched), (key, frames.touched)
            out[t] = result
        else:
            assert max(frames.touched) - min(frames.touched) <= window, (key, frames.touched)
            tables.put(key, result)
    return [out[t] for t in range(plan.num_frames)]


@pytest.mark.parametrize("mode", ["fast", "balanced"])
def test_needed_tables_frame_locality_and_float16_tables(small_scene, mode):
    clean, style = small_scene
    config = FastBlendConfig(inference_mode=mode, window_size=5, **SMALL)
    plan = SmoothingPlan(len(clean), config)
    frames = CountingFrames(clean, style, "cpu")
    half = run_units(plan, frames, DictTables(torch.float16))
    if mode == "fast":
        assert any(plan.needed_tables(k) for k in plan.unit_keys())
        # float16 tables only perturb the frames slightly (patch matching may pick a few different matches).
        full = run_units(plan, frames, DictTables(torch.float32))
        for a, b in zip(half, full):
            assert float((a - b).abs().mean()) < 0.5


@pytest.mark.parametrize("mode", ["fast", "accurate", "interpolation"])
def test_compute_is_deterministic(small_scene, mode):
    clean, style = small_scene
    config = FastBlendConfig(inference_mode=mode, window_size=4, keyframe_ids=(0, 5, 9), **SMALL)
    plan = SmoothingPlan(len(clean), config)
    frames, tables = ListFrames(clean, style, "cpu"), DictTables()
    keys = plan.unit_keys()
    for key in keys:
        if key.startswith("table/"):
            tables.put(key, plan.compute(key, frames, tables))
    for key in [k for k in keys if k.startswith("table/")][:2] + ["frame/000002", "frame/000007"]:
        first = plan.compute(key, frames, tables)
        # An unrelated computation in between must not change the random draws of a unit.
        torch.rand(10)
        assert torch.equal(first, plan.compute(key, frames, tables)), key


def max_live_tables(plan):
    keys = plan.unit_keys()
    live, peak = set(), 0
    for position, key in enumerate(keys):
        for table in plan.needed_tables(key):
            assert table in live, f"{key} needs {table} before it is computed or after release"
        if key.startswith("table/"):
            live.add(key)
        peak = max(peak, len(live))
        released = set(plan.releasable_after(position + 1))
        live -= released
    assert not live, "every table is released by the end"
    return peak


def test_live_tables_are_bounded_by_the_window_not_the_length():
    config = FastBlendConfig(inference_mode="fast", window_size=15)
    peaks = {n: max_live_tables(SmoothingPlan(n, config)) for n in (200, 400, 1000)}
    assert peaks[200] == peaks[400] == peaks[1000]
    assert peaks[200] <= 4 * 16  # a few tables per frame of the window
    bigger = max_live_tables(SmoothingPlan(400, FastBlendConfig(inference_mode="fast", window_size=60)))
    assert bigger > peaks[400]


def test_unit_order_and_release_bookkeeping():
    plan = SmoothingPlan(50, FastBlendConfig(inference_mode="fast", window_size=7))
    keys = plan.unit_keys()
    assert len(keys) == len(set(keys))
    assert [k for k in keys if k.startswith("frame/")] == [f"frame/{i:06d}" for i in range(50)]
    assert {k.split("/")[1] for k in keys if k.startswith("table/")} == {"fwd", "bwd"}
    position = {k: i for i, k in enumerate(keys)}
    for key in keys:  # dependencies come first
        assert all(position[t] < position[key] for t in plan.needed_tables(key))
    previous = []
    for n in range(len(keys) + 1):
        released = plan.releasable_after(n)
        assert released[: len(previous)] == previous  # monotone, prefix-stable
        for table in released:
            assert position[table] < n
            assert all(table not in plan.needed_tables(k) for k in keys[n:])
        assert released[len(previous) :] == plan.newly_releasable(n)
        previous = released
    assert sorted(previous) == sorted(k for k in keys if k.startswith("table/"))
    for mode in ("balanced", "accurate"):
        other = SmoothingPlan(5, FastBlendConfig(inference_mode=mode, window_size=2))
        assert other.unit_keys() == [f"frame/{i:06d}" for i in range(5)]
        assert other.releasable_after(5) == [] and other.needed_tables("frame/000001") == []


@pytest.mark.parametrize("mode", ["fast", "balanced", "accurate", "interpolation"])
@pytest.mark.parametrize("height,width", [(8, 8), (19, 26)])
def test_tiny_and_odd_frame_sizes(mode, height, width):
    # Patches larger than the frame (default max patch 13 on 8x8) and odd sizes between pyramid levels.
    g = torch.Generator().manual_seed(2)
    frames = [torch.rand(height, width, 3, generator=g) * 255 for _ in range(5)]
    config = FastBlendConfig(inference_mode=mode, window_size=2, num_iter=2, keyframe_ids=(1, 3))
    out = smooth_in_memory(frames, frames, config)
    assert [tuple(o.shape) for o in out] == [(height, width, 3)] * 5
    assert all(bool(torch.isfinite(o).all()) and float(o.min()) >= 0 and float(o.max()) <= 255 for o in out)


def test_config_validation():
    with pytest.raises(ValueError):
        FastBlendConfig(inference_mode="turbo")
    with pytest.raises(ValueError):
        FastBlendConfig(inference_mode="interpolation")  # needs keyframes
    with pytest.raises(ValueError):
        FastBlendConfig(minimum_patch_size=4)
    assert FastBlendConfig(keyframe_ids=[5, 1, 5]).keyframe_ids == (1, 5)
    with pytest.raises(ValueError):
        SmoothingPlan(4, FastBlendConfig(inference_mode="interpolation", keyframe_ids=(0, 4)))
    with pytest.raises(KeyError):
        SmoothingPlan(4, FastBlendConfig(inference_mode="balanced")).compute("frame/000009", None, None)
