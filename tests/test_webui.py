"""The web UI's Streamlit-free logic: the form generated from the schema, path confinement, settings, progress."""

import os
from pathlib import Path

import pytest
import yaml

from diffsynth.config import RenderConfig, parse_config
from diffsynth.errors import UserError
from diffsynth.webui import form as F
from diffsynth.webui import runs as R
from diffsynth.webui.paths import confine, list_models, list_videos, run_folder
from diffsynth.webui.settings import Settings, load_settings


@pytest.fixture
def settings(tmp_path):
    for name in ("models", "videos", "configs", "runs"):
        (tmp_path / name).mkdir()
    return Settings(models=[tmp_path / "models"], videos=[tmp_path / "videos"], configs=[tmp_path / "configs"],
                    output=tmp_path / "runs")


def test_every_schema_field_has_a_widget_with_the_schema_default():
    paths = {F.dotted(path): spec for path, spec in F.walk()}
    # a leaf for every pydantic field, nested models included: the form cannot drift from the schema
    for name, info in RenderConfig.model_fields["pipeline"].annotation.model_fields["pipeline_inputs"] \
            .annotation.model_fields.items():
        assert f"pipeline.pipeline_inputs.{name}" in paths
    assert paths["pipeline.pipeline_inputs.cfg_scale"].kind == "float"
    assert paths["pipeline.pipeline_inputs.num_inference_steps"].default == 10
    assert paths["models.controlnet_units"].kind == "list_section"
    assert paths["models.controlnet_units.*.processor_id"].choices[:2] == ("tile", "canny")
    assert paths["models.torch_dtype"].kind == "choice"
    assert paths["data.input_frames.video_file"].path_kind == "videos"
    assert paths["data.input_frames.end_frame_id"].optional
    state = F.state_from_data({})
    assert state["f:pipeline.pipeline_inputs.animatediff_stride"] == 8
    assert state["f:pipeline.pipeline_inputs.cfg_scale"] == 7.0
    assert state["n:models.controlnet_units"] == 0


def test_state_round_trips_a_config(demo_assets, tmp_path):
    from diffsynth.demo import DEMO_CONFIG
    data, problems = F.load_config_text(DEMO_CONFIG.read_text(), DEMO_CONFIG.parent)
    assert problems == []
    assert Path(data["data"]["input_frames"]["video_file"]).is_absolute()
    back = F.data_from_state(F.state_from_data(data))
    assert parse_config(back).model_dump() == parse_config(data).model_dump()


def test_add_and_remove_controlnet_units_shift_the_rest():
    state = F.state_from_data({})
    unit = F.fields_of(F.RenderConfig.model_fields["models"].annotation)[1].model
    path = ("models", "controlnet_units")
    for processor in ("tile", "canny", "depth"):
        F.add_list_item(state, path, unit, {"processor_id": processor, "model_path": f"/m/{processor}", "scale": 0.5})
    F.remove_list_item(state, path, unit, 0)
    units = F.data_from_state(state)["models"]["controlnet_units"]
    assert [u["processor_id"] for u in units] == ["canny", "depth"]
    assert "f:models.controlnet_units.2.scale" not in state


def test_bad_values_are_reported_under_their_field(settings):
    state = F.state_from_data({})
    state["f:pipeline.pipeline_inputs.cfg_scale"] = -1.0
    state["f:pipeline.pipeline_inputs.smoother_progress_ids"] = "1, x"
    state["f:data.output_folder"] = "run1"
    config, errors = F.validate(F.data_from_state(state), settings)
    assert config is None
    assert "greater than or equal to 0" in errors["pipeline.pipeline_inputs.cfg_scale"][0]
    assert "data.input_frames" in errors  # neither video_file nor image_folder
    assert F.errors_for(errors, ("pipeline", "pipeline_inputs", "cfg_scale"))


def test_paths_outside_the_configured_folders_are_refused(settings, tmp_path):
    with pytest.raises(UserError, match="outside the allowed videos folders"):
        confine("/etc/passwd", settings, "videos")
    with pytest.raises(UserError, match="outside"):
        confine("../../etc/passwd", settings, "videos")
    (settings.videos[0] / "escape.mp4").symlink_to("/etc/passwd")
    with pytest.raises(UserError, match="outside"):
        confine(settings.videos[0] / "escape.mp4", settings, "videos")
    (settings.videos[0] / "ok.mp4").write_bytes(b"x")
    assert confine("ok.mp4", settings, "videos") == (settings.videos[0] / "ok.mp4").resolve()
    with pytest.raises(UserError):
        run_folder(settings, "../elsewhere")
    with pytest.raises(UserError):
        run_folder(settings, "/tmp/x")
    assert run_folder(settings, "r1") == settings.output / "r1"
    state = F.state_from_data({})
    state["f:data.input_frames.video_file"] = "/etc/passwd"
    state["f:models.model_list"] = ["/etc/shadow"]
    state["f:data.output_folder"] = "../../oops"
    _, errors = F.validate(F.data_from_state(state), settings)
    assert "outside the allowed videos" in errors["data.input_frames.video_file"][0]
    assert "outside the allowed models" in errors["models.model_list.0"][0]
    assert "outside" in errors["data.output_folder"][0]


def test_pickers_list_videos_and_model_folders(settings):
    (settings.videos[0] / "sub").mkdir()
    (settings.videos[0] / "sub" / "a.mp4").write_bytes(b"x")
    (settings.videos[0] / "notes.txt").write_text("x")
    pipe = settings.models[0] / "sd15"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "config.json").write_text("{}")
    (settings.models[0] / "lora.safetensors").write_bytes(b"x")
    assert list_videos(settings) == [str(settings.videos[0] / "sub" / "a.mp4")]
    assert list_models(settings) == sorted([str(pipe), str(settings.models[0] / "lora.safetensors")])


def test_settings_from_env_and_file(tmp_path):
    file = tmp_path / "webui.yaml"
    file.write_text(yaml.safe_dump({"models": ["m"], "output": "out"}))
    settings = load_settings({"DIFFSYNTH_WEBUI_SETTINGS": str(file),
                              "DIFFSYNTH_WEBUI_VIDEOS": os.pathsep.join([str(tmp_path / "v1"), str(tmp_path / "v2")])})
    assert settings.models == [tmp_path / "m"]
    assert settings.output == tmp_path / "out"
    assert settings.videos == [tmp_path / "v1", tmp_path / "v2"]
    file.write_text(yaml.safe_dump({"modles": ["m"]}))
    with pytest.raises(UserError, match="modles"):
        load_settings({"DIFFSYNTH_WEBUI_SETTINGS": str(file)})


def test_progress_metrics_rate_eta_and_pauses():
    t0 = 1_000_000.0
    stages = [{"name": "decode", "done": 10, "total": 10, "complete": True},
              {"name": "denoise.000.step", "done": 4, "total": 10, "complete": False},
              {"name": "vae_decode", "done": 0, "total": 10, "complete": False}]
    units = [("decode", f"{i}", f"cache/decode/{i}", t0 + i * 0.1) for i in range(10)]
    # a two-hour pause (interrupted, resumed later) must not count as work
    units += [("denoise.000.step", f"{i}", f"cache/d/{i}", t0 + 7200 + i * 2.0) for i in range(4)]
    metrics = R.progress_metrics(stages, units, now=t0 + 7210)
    assert metrics["current_stage"] == "denoise.000.step"
    assert metrics["stage_rate"] == pytest.approx(0.5)
    assert metrics["elapsed_seconds"] < 20
    assert metrics["eta_seconds"] > 6 * 2.0  # six denoise units left at 2 s, plus the decodes
    assert metrics["fps"] > 0


def test_runs_list_and_progress_of_a_folder_without_a_render(settings):
    run = settings.output / "r1"
    run.mkdir()
    (run / R.CONFIG_NAME).write_text("{}")
    (run / R.PROCESS_LOG).write_text("error: bad config value for 'x': nope\n")
    runs = R.list_runs(settings)
    assert [r["name"] for r in runs] == ["r1"]
    assert runs[0]["state"] == "failed"
    assert "bad config value" in runs[0]["message"]
    assert R.format_seconds(3725) == "1h 02m"


def test_resume_launches_exactly_the_config_it_checked(settings, tmp_path, monkeypatch):
    """A run folder renamed (or a config.json edited to point elsewhere): Resume renders into the run folder itself,
    and a path outside the allowed folders in the stored config is refused before anything is launched."""
    launched = []
    monkeypatch.setattr(R, "launch", lambda run_dir, config_path, extra_env=None: launched.append(config_path))
    run = settings.output / "renamed"
    run.mkdir()
    (run / "manifest.sqlite").write_bytes(b"")
    (settings.videos[0] / "clip.mp4").write_bytes(b"x")
    stored = {"data": {"input_frames": {"video_file": str(settings.videos[0] / "clip.mp4")},
                       "output_folder": str(tmp_path / "old-name-or-anywhere")}}
    (run / R.RESOLVED_CONFIG).write_text(yaml.safe_dump(stored))
    R.resume(run, settings)
    assert yaml.safe_load(Path(launched[0]).read_text())["data"]["output_folder"] == str(run)

    stored["data"]["input_frames"]["video_file"] = "/etc/passwd"
    (run / R.RESOLVED_CONFIG).write_text(yaml.safe_dump(stored))
    with pytest.raises(UserError, match="outside"):
        R.resume(run, settings)
    assert len(launched) == 1


def test_every_path_field_of_the_schema_is_confined_as_the_render_resolves_it(settings, tmp_path):
    """Path fields are found by walking the schema: a field named like a path that is not marked would escape
    confinement. Relative paths from the form are taken in their kind's folder and saved absolute, so the render
    reads exactly the checked file; from a stored config, relative to that config's folder, as the render does."""
    from diffsynth.config import _schema_class, path_kind

    def unmarked(model, prefix=""):
        for name, info in model.model_fields.items():
            nested = _schema_class(info.annotation)
            if nested:
                yield from unmarked(nested, f"{prefix}{name}.")
            elif name.endswith(("_file", "_folder", "_path", "_list")) and not path_kind(info):
                yield prefix + name
    assert list(unmarked(RenderConfig)) == []

    (settings.videos[0] / "clip.mp4").write_bytes(b"x")
    (settings.models[0] / "annotators").mkdir()
    state = F.state_from_data({})
    state["f:data.input_frames.video_file"] = "clip.mp4"
    state["f:models.model_list"] = [str(settings.models[0] / "sd.safetensors")]
    state["f:models.annotators_folder"] = "/etc"
    state["f:models.tokenizer_folder"] = "../../.."
    state["f:data.output_folder"] = "r1"
    _, errors = F.validate(F.data_from_state(state), settings)
    assert "outside the allowed models" in errors["models.annotators_folder"][0]
    assert "outside the allowed models" in errors["models.tokenizer_folder"][0]
    state["f:models.annotators_folder"] = "annotators"
    state["f:models.tokenizer_folder"] = None
    config, errors = F.validate(F.data_from_state(state), settings)
    assert errors == {}
    assert config.data.input_frames.video_file == str((settings.videos[0] / "clip.mp4").resolve())
    assert config.models.annotators_folder == str((settings.models[0] / "annotators").resolve())

    run = settings.output / "r2"
    run.mkdir()
    stored = {"data": {"input_frames": {"video_file": "clip.mp4"}, "output_folder": "."}}
    data, problems = F.confine_paths(stored, settings, base=run)
    assert "data.input_frames.video_file" in problems  # the render would read runs/r2/clip.mp4: not a videos path
    stored["data"]["input_frames"]["video_file"] = "../../videos/clip.mp4"
    data, problems = F.confine_paths(stored, settings, base=run)
    assert problems == {}
    assert data["data"]["input_frames"]["video_file"] == str((settings.videos[0] / "clip.mp4").resolve())
    assert data["data"]["output_folder"] == str(run)
