"""The shipped configs and the example script validate against the schema (the single source of truth)."""

import runpy
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from diffsynth.config import RenderConfig, load_config, parse_config
from diffsynth.errors import UserError


@pytest.mark.parametrize("name", ["demo.yaml", "diffutoon_toon_shading.yaml"])
def test_shipped_configs_validate(name):
    config = parse_config(yaml.safe_load((REPO / "configs" / name).read_text()))
    assert config.pipeline.pipeline_inputs.smoother_progress_ids, "the shipped configs smooth"


def test_example_script_config_validates():
    namespace = runpy.run_path(str(REPO / "examples" / "diffutoon_toon_shading.py"), run_name="not_main")
    config = parse_config(namespace["config"])
    assert config.models.controlnet_units[1].processor_id == "lineart"


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text(yaml.safe_dump({"models": {"model_list": ["../m/base"]},
                                    "data": {"input_frames": {"video_file": "v.mp4"}, "output_folder": "out"}}))
    config = load_config(path)
    assert Path(config.models.model_list[0]) == (tmp_path / "m" / "base").resolve()
    assert Path(config.data.output_folder) == (tmp_path / "sub" / "out").resolve()


def test_schema_defaults_match_the_original_diffutoon():
    inputs = RenderConfig.model_fields["pipeline"].default_factory().pipeline_inputs
    assert (inputs.cfg_scale, inputs.clip_skip, inputs.num_inference_steps) == (7.0, 2, 10)
    assert (inputs.animatediff_batch_size, inputs.animatediff_stride) == (16, 8)


def test_smoothing_settings_are_validated_with_their_key():
    base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    base["smoother_configs"][0]["config"]["widnow_size"] = 3
    with pytest.raises(UserError, match=r"smoother_configs\.0\.config\.widnow_size.*window_size"):
        parse_config(base)
