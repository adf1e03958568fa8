"""The VRAM model (diffsynth/vram.py) and `auto` batch sizes resolved from it."""

import json
from pathlib import Path

import pytest
import torch

from diffsynth import vram
from diffsynth.config import parse_config
from diffsynth.errors import UserError

CONFIGS = Path(vram.__file__).parent / "models" / "configs"
GB = 10 ** 9


def config(**pipeline_inputs):
    inputs = {"animatediff_batch_size": 16, "animatediff_stride": 8, **pipeline_inputs}
    return parse_config({
        "models": {"model_list": ["sd.safetensors", "mm.ckpt"], "torch_dtype": "float16", "device": "cuda",
                   "controlnet_units": [{"processor_id": "tile", "model_path": "t.pth", "scale": 0.5},
                                        {"processor_id": "lineart", "model_path": "l.pth", "scale": 0.5}]},
        "data": {"input_frames": {"video_file": "v.mp4", "width": 1536, "height": 1536}, "output_folder": "out"},
        "pipeline": {"pipeline_inputs": inputs}})


def test_parameter_counts_are_the_real_architectures():
    from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel

    def build(cls, name):
        settings = {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items()
                    if not k.startswith("_")}
        with torch.device("meta"):
            return sum(p.numel() for p in cls(**settings).parameters())
    assert build(UNet2DConditionModel, "sd15_unet") == vram.UNET_PARAMS
    assert build(MotionAdapter, "animatediff_motion_adapter") == vram.MOTION_V2_PARAMS
    assert build(ControlNetModel, "sd15_controlnet") == vram.CONTROLNET_PARAMS


def test_prediction_grows_with_each_setting():
    base = dict(width=1024, height=576, window=16, unet_batch_size=4, controlnet_batch_size=4, controlnet_units=2,
                dtype_bytes=2)
    reference = vram.predict_vram_bytes(**base)
    assert vram.predict_vram_bytes(**{**base, "unet_batch_size": 8}) > reference
    assert vram.predict_vram_bytes(**{**base, "controlnet_batch_size": 8}) > reference
    assert vram.predict_vram_bytes(**{**base, "window": 24}) > reference
    assert vram.predict_vram_bytes(**{**base, "width": 1536}) > reference
    assert vram.predict_vram_bytes(**base, cfg_halves="apart") < reference
    assert vram.predict_vram_bytes(**{**base, "dtype_bytes": 4}) > 1.9 * reference
    # a chunk larger than the window is the window
    assert vram.predict_vram_bytes(**{**base, "unet_batch_size": 99}) == vram.predict_vram_bytes(
        **{**base, "unet_batch_size": 16})


def largest_fitting(cfg, memory):
    """The expected answer, straight from the model: the largest n ≤ window that fits."""
    budget = memory * vram.USABLE_FRACTION
    fits = [n for n in range(1, 17) if vram.predict_for_config(cfg, n, n) <= budget]
    return max(fits) if fits else None


@pytest.mark.parametrize("memory_gb", [24, 32, 40, 48, 80, 141])
def test_auto_resolves_to_the_largest_chunk_that_fits(memory_gb):
    cfg = config(unet_batch_size="auto", controlnet_batch_size="auto", cfg_halves="apart")
    memory = memory_gb * GB
    expected = largest_fitting(cfg, memory)
    if expected is None:
        with pytest.raises(UserError, match="unet_batch_size and pipeline.pipeline_inputs.controlnet_batch_size"):
            vram.resolve_batch_sizes(cfg, memory)
        return
    assert vram.resolve_batch_sizes(cfg, memory) == (expected, expected)
    if expected < 16:  # one more frame would not fit
        assert vram.predict_for_config(cfg, expected + 1, expected + 1) > memory * vram.USABLE_FRACTION


def test_auto_covers_small_middle_and_whole_window_answers():
    """Across devices the answers span: nothing, a few frames, the whole window (so the cases above are real)."""
    cfg = config(unet_batch_size="auto", controlnet_batch_size="auto", cfg_halves="apart")
    answers = {largest_fitting(cfg, gb * GB) for gb in (8, 24, 32, 40, 48, 80, 141)}
    assert None in answers and 16 in answers and answers - {None, 16}


def test_auto_differs_between_devices_and_is_repeatable():
    cfg = config(unet_batch_size="auto", controlnet_batch_size="auto", cfg_halves="apart")
    small, large = vram.resolve_batch_sizes(cfg, 32 * GB), vram.resolve_batch_sizes(cfg, 141 * GB)
    assert small[0] < large[0] == 16
    assert vram.resolve_batch_sizes(cfg, 32 * GB) == small


def test_a_number_stays_and_only_auto_moves():
    cfg = config(unet_batch_size="auto", controlnet_batch_size=2, cfg_halves="apart")
    unet_batch, controlnet_batch = vram.resolve_batch_sizes(cfg, 48 * GB)
    assert controlnet_batch == 2
    assert vram.predict_for_config(cfg, unet_batch, 2) <= 48 * GB * vram.USABLE_FRACTION
    assert vram.resolve_batch_sizes(config(unet_batch_size=3, controlnet_batch_size=5), 1 * GB) == (3, 5)


def test_auto_on_the_cpu_is_the_whole_window():
    cfg = config(unet_batch_size="auto", controlnet_batch_size="auto")
    assert vram.resolve_batch_sizes(cfg, None, device="cpu") == (16, 16)


def test_nothing_fits_names_the_key():
    cfg = config(unet_batch_size="auto", controlnet_batch_size=1)
    with pytest.raises(UserError) as error:
        vram.resolve_batch_sizes(cfg, 4 * GB)
    message = str(error.value)
    assert "pipeline.pipeline_inputs.unet_batch_size" in message
    assert "controlnet_batch_size" not in message  # not auto: not named
    assert "GiB" in message


def test_schema_accepts_numbers_and_auto_only():
    assert config(unet_batch_size="auto").pipeline.pipeline_inputs.unet_batch_size == "auto"
    assert config(controlnet_batch_size=3).pipeline.pipeline_inputs.controlnet_batch_size == 3
    assert config().pipeline.pipeline_inputs.cfg_halves == "together"
    for bad in (0, "most", -2):
        with pytest.raises(UserError, match="unet_batch_size"):
            config(unet_batch_size=bad)
    with pytest.raises(UserError, match="cfg_halves"):
        config(cfg_halves="split")
