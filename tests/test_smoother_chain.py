"""The original's smoother chain: smoother_configs run in order wherever smoothing happens (FastBlend, then e.g.
Contrast and Sharpness); RIFE, whose network this renderer does not run, is a clear config error."""

import numpy as np
import pytest
from helpers import run_cli, small_config, write_config
from PIL import Image, ImageEnhance

from diffsynth.cache import RunCache, bytes_to_image
from diffsynth.config import parse_config
from diffsynth.errors import UserError


def test_fastblend_then_contrast_then_sharpness(demo_assets, tmp_path):
    config = small_config(demo_assets, tmp_path / "run", smoother_progress_ids=[0, -1])
    config["smoother_configs"] += [{"processor_type": "Contrast", "config": {"rate": 1.5}},
                                   {"processor_type": "Sharpness", "config": {"rate": 1.3}}]
    result = run_cli("render", write_config(tmp_path / "c.yaml", config), "--no-progress")
    assert result.returncode == 0, result.stderr
    cache = RunCache(tmp_path / "run")
    stages = cache.stage_names()
    assert stages[-4:] == ["smooth.final", "smooth.final.1.contrast", "smooth.final.2.sharpness", "encode"]
    in_loop = ["smooth.000.blend", "smooth.000.blend.1.contrast", "smooth.000.blend.2.sharpness", "denoise.000.step"]
    assert stages[stages.index("smooth.000.blend"):stages.index("denoise.000.step") + 1] == in_loop
    for index in (0, 7):
        blended = bytes_to_image(cache.read("smooth.final", f"{index:06d}.safetensors"))
        expected = ImageEnhance.Sharpness(ImageEnhance.Contrast(Image.fromarray(blended)).enhance(1.5)).enhance(1.3)
        written = np.asarray(Image.open(tmp_path / "run" / "frames" / f"{index:05d}.png"))
        assert np.array_equal(written, np.asarray(expected))
        assert written.astype(float).std() > blended.astype(float).std()  # the contrast really went up
    cache.close()


def test_chain_in_the_loop_and_its_config_round_trip():
    config = {"models": {"model_list": ["m"]}, "data": {"input_frames": {"video_file": "v.mp4"},
                                                        "output_folder": "o"},
              "smoother_configs": [{"processor_type": "FastBlend", "config": {"window_size": 3}},
                                   {"processor_type": "Contrast", "config": {"rate": 1.1}}]}
    parsed = parse_config(config)
    assert [(kind, settings.model_dump()) for kind, settings in parsed.smoother_chain()][1] == \
        ("Contrast", {"rate": 1.1})
    assert parse_config(parsed.model_dump()).smoother_chain() == parsed.smoother_chain()
    with pytest.raises(UserError, match="RIFE smoother needs .*flownet.pkl"):
        parse_config(dict(config, smoother_configs=[{"processor_type": "RIFE", "config": {}}]))
    with pytest.raises(UserError, match="window_size"):
        parse_config(dict(config, smoother_configs=[{"processor_type": "Contrast", "config": {"window_size": 3}}]))
