"""`diffsynth models check CONFIG` verdicts: the demo config is fine; a ControlNet listed as the base model is not."""

import types

import pytest
import yaml

from diffsynth.cli import EXIT_BAD_INPUT, EXIT_OK, main
from diffsynth.demo import DEMO_CONFIG, ensure_demo_assets
from diffsynth.models.tiny import write_tiny_models, write_tiny_single_files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_check")
    folders = write_tiny_models(root / "folders")
    return types.SimpleNamespace(folders=folders, files=write_tiny_single_files(root / "files", folders))


def write_config(path, models):
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["models"] = models
    config["data"]["input_frames"]["video_file"] = str(DEMO_CONFIG.parent / config["data"]["input_frames"]["video_file"])
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_config_checks_ok(capsys):
    ensure_demo_assets()
    assert main(["models", "check", str(DEMO_CONFIG)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "stable diffusion base model" in out and "AnimateDiff motion module" in out
    assert out.count("ControlNet") == 2 and "PROBLEM" not in out


def test_single_files_check_ok(tiny, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {
        "model_list": [str(tiny.files["motion"]), str(tiny.files["sd_ckpt"])],
        "controlnet_units": [{"processor_id": "tile", "model_path": str(tiny.files["controlnet_tile"])}]})
    assert main(["models", "check", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "VAE baked in" in out and "EMA copies ignored" in out and "32 frames" in out


def test_controlnet_as_base_model_is_a_problem(tiny, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {
        "model_list": [str(tiny.files["controlnet_canny"]), str(tiny.files["motion"])],
        "controlnet_units": [{"processor_id": "tile", "model_path": str(tiny.files["controlnet_tile"])},
                             {"processor_id": "lineart", "model_path": str(tiny.files["controlnet_canny"])}]})
    assert main(["models", "check", str(config)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert any(line.startswith("PROBLEM") and "controlnet_canny.pth" in line and "model_list" in line
               for line in lines)
    assert any(line.startswith("PROBLEM") and "no stable diffusion base model" in line for line in lines)
    assert any(line.startswith("PROBLEM") and "annotator lineart" in line for line in lines)
    assert any(line.startswith("ok") and "mm_tiny_v2.ckpt" in line for line in lines)
    assert len(captured.err.strip().splitlines()) == 1 and "problem" in captured.err
