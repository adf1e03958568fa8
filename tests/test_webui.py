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
    # six denoise units left at 2 s; vae_decode has not been timed, so the page says "at least"
    assert metrics["eta_seconds"] == pytest.approx(6 * 2.0)
    assert metrics["eta_untimed"] == ["vae_decode"]
    assert metrics["fps"] is None  # the end-to-end speed needs every stage timed

    # before the current stage has finished two units there is no ETA: fast decodes say nothing about denoising
    units = [u for u in units if u[0] == "decode"] + units[10:11]
    metrics = R.progress_metrics(stages, units, now=t0 + 7210)
    assert metrics["eta_seconds"] is None
    # a later denoising step is timed by the step before it (same family)
    stages = [{"name": "denoise.000.step", "done": 10, "total": 10, "complete": True},
              {"name": "denoise.001.step", "done": 0, "total": 10, "complete": False}]
    units = [("denoise.000.step", f"{i}", "", t0 + i * 3.0) for i in range(10)]
    metrics = R.progress_metrics(stages, units)
    assert metrics["eta_seconds"] == pytest.approx(30.0) and metrics["eta_untimed"] == []


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


def test_stage_titles_say_what_each_stage_does():
    from diffsynth.webui.labels import denoising_steps, field_help, field_label, is_basic, stage_title
    names = ["decode", "crop", "annotate.0.tile", "annotate.1.canny", "prompts", "latents", "denoise.000.windows",
             "denoise.000.step", "denoise.001.windows", "smooth.001.x0", "smooth.001.blend", "denoise.001.step",
             "vae_decode", "smooth.final", "smooth.final.1.contrast", "smooth.001.blend.2.sharpness", "encode"]
    steps = denoising_steps(names)
    assert steps == 2
    assert stage_title("denoise.000.windows", steps) == "Denoising, step 1 of 2"
    assert stage_title("denoise.001.step", steps) == "Denoising, step 2 of 2: blending the windows"
    assert stage_title("annotate.1.canny") == "Tracing edges for guide 2"
    assert stage_title("smooth.001.blend", steps) == "Smoothing after step 2 of 2"
    assert stage_title("smooth.final.1.contrast", steps) == "Smoothing the final frames: contrast"
    titles = [stage_title(name, steps) for name in names]
    assert not any("." in title for title in titles), titles  # no internal stage ids left
    assert len(set(titles)) == len(titles)
    # fields: a plain label, the config key in the help, everyday fields open and the rest folded
    assert field_label(("pipeline", "pipeline_inputs", "cfg_scale"), "cfg scale") == "Prompt strength"
    assert "`models.controlnet_units.0.scale`" in field_help(("models", "controlnet_units", 0, "scale"), "weight")
    assert is_basic(("models", "controlnet_units", 3, "scale"))
    assert not is_basic(("pipeline", "pipeline_inputs", "animatediff_stride"))
    assert not is_basic(("pipeline", "some_future_field"))  # unknown fields fold, they are never lost


def test_paths_outside_say_where_to_put_the_file(settings):
    with pytest.raises(UserError) as error:
        confine("/elsewhere/clip.mp4", settings, "videos")
    assert f"copy it into {settings.videos[0]} or add that folder to DIFFSYNTH_WEBUI_VIDEOS" in str(error.value)
    with pytest.raises(UserError, match="DIFFSYNTH_WEBUI_MODELS"):
        confine("/elsewhere/sd.safetensors", settings, "models")


def test_an_uploaded_video_is_saved_in_the_videos_folder_never_overwriting(settings):
    from diffsynth.webui.paths import save_upload
    first = save_upload("../../My clip (1).MP4", b"one", settings)
    assert first == settings.videos[0] / "My_clip_1.mp4" and first.read_bytes() == b"one"
    assert save_upload("My clip (1).MP4", b"one", settings) == first  # the same upload again: reused
    second = save_upload("My clip (1).MP4", b"two", settings)
    assert second == settings.videos[0] / "My_clip_1-1.mp4" and first.read_bytes() == b"one"
    with pytest.raises(UserError, match="not a video file"):
        save_upload("notes.txt", b"x", settings)
    with pytest.raises(UserError, match=f"larger than 1 MB; copy it into {settings.videos[0]}"):
        save_upload("big.mp4", b"x" * (1024 * 1024 + 1), settings, limit_mb=1)
    assert sorted(p.name for p in settings.videos[0].iterdir()) == ["My_clip_1-1.mp4", "My_clip_1.mp4"]


def test_videos_folder_is_created_on_first_start(tmp_path):
    from diffsynth.webui.settings import ensure_folders
    settings = Settings(models=[tmp_path / "m"], videos=[tmp_path / "videos", tmp_path / "more"],
                        configs=[tmp_path / "c"], output=tmp_path / "runs")
    ensure_folders(settings)
    assert (tmp_path / "videos").is_dir() and (tmp_path / "runs").is_dir()


def test_check_inputs_refuses_bad_video_and_models_before_a_run_folder_exists(demo_assets, settings):
    """The web UI's Render checks the source and the model files with the CLI's own functions, before
    save_run_config creates the run folder."""
    from helpers import small_config
    run_dir = settings.output / "never"
    config = parse_config(small_config(demo_assets, run_dir))
    R.check_inputs(config)  # the demo is fine
    broken = small_config(demo_assets, run_dir)
    (settings.videos[0] / "not-a-video.mp4").write_text("hello")
    broken["data"]["input_frames"]["video_file"] = str(settings.videos[0] / "not-a-video.mp4")
    with pytest.raises(UserError, match="cannot read .*not-a-video.mp4 as a video"):
        R.check_inputs(parse_config(broken))
    broken = small_config(demo_assets, run_dir)
    broken["models"]["model_list"] = [str(demo_assets / "models" / "motion_adapter")]
    with pytest.raises(UserError, match="has no"):
        R.check_inputs(parse_config(broken))
    broken = small_config(demo_assets, run_dir)
    broken["data"]["input_frames"]["start_frame_id"] = 400
    broken["data"]["input_frames"]["end_frame_id"] = 500
    with pytest.raises(UserError, match="holds no frames"):
        R.check_inputs(parse_config(broken))
    assert not run_dir.exists()


def make_manifest(run_dir, stages, units, outcome=None):
    """A manifest.sqlite with the render's schema (diffsynth.cache), filled with the given rows."""
    from diffsynth.cache import RunCache
    cache = RunCache(run_dir)
    for position, (name, total) in enumerate(stages):
        cache.db.execute("INSERT INTO stages (name, fingerprint, total, position) VALUES (?, 'f', ?, ?)",
                         (name, total, position))
    cache.db.executemany("INSERT INTO units VALUES (?, ?, ?, ?, 'c', ?)", units)
    if outcome:
        cache.set_value("outcome", outcome)
    cache.close()


def test_progress_is_read_from_the_manifest_without_reading_every_row(settings):
    run = settings.output / "long"
    t0 = 1_000_000.0
    units = [("decode", f"{i:06d}.safetensors", f"cache/decode/{i:06d}.safetensors", 100, t0 + i * 0.01)
             for i in range(5000)]
    units += [("vae_decode", f"{i:06d}.safetensors", f"cache/vae_decode/{i:06d}.safetensors", 100, t0 + 1000 + i)
              for i in range(10)]
    units += [("vae_decode", f"{i:06d}.safetensors", f"cache/vae_decode/{i:06d}.safetensors", -1, t0 + 1000 + i)
              for i in range(10, 12)]  # released: done, but its frame is gone
    make_manifest(run, [("decode", 5000), ("vae_decode", 5000), ("encode", 5001)], units,
                  outcome={"state": "interrupted", "message": "interrupted: stopped"})
    manifest = R.read_manifest(run)
    timings = manifest["timings"]
    assert len(timings.units()) == R.TIMING_SAMPLE + 12  # the newest finishes of each stage, not 5012 rows
    assert [s["done"] for s in manifest["stages"]] == [5000, 12, 0]
    assert manifest["stages"][0]["bytes"] == 500_000 and manifest["stages"][0]["complete"]
    assert manifest["frames"] == list(range(10))  # frames still on disk, in order
    assert timings.elapsed == pytest.approx(4999 * 0.01 + 11 * 1.0, rel=1e-6)  # the 950 s pause left out
    # the next refresh reads only the rows added since: two more decoded frames
    from diffsynth.cache import RunCache
    cache = RunCache(run)
    cache.db.executemany("INSERT INTO units VALUES ('vae_decode', ?, ?, 100, 'c', ?)",
                         [(f"{i:06d}.safetensors", f"cache/vae_decode/{i:06d}.safetensors", t0 + 1000 + i)
                          for i in (12, 13)])
    cache.close()
    manifest = R.read_manifest(run)
    assert manifest["timings"] is timings and timings.rows_last_read == 2
    assert manifest["stages"][1]["done"] == 14 and manifest["frames"] == [*range(10), 12, 13]
    assert timings.elapsed == pytest.approx(4999 * 0.01 + 13 * 1.0, rel=1e-6)
    report = R.read_progress(run)
    assert report["state"] == "interrupted" and report["message"] == "interrupted: stopped"
    assert report["done"] == 5014 and report["total"] == 15001
    assert report["metrics"]["current_stage"] == "vae_decode"
    assert report["metrics"]["stage_rate"] == pytest.approx(1.0)


def test_a_smoother_chain_entry_follows_its_processor_type():
    """smoother_configs[].config is FastBlend's settings or an enhancer's, chosen by processor_type (as the config
    validation does): the form shows and round-trips the right fields for each."""
    data = {"smoother_configs": [{"processor_type": "FastBlend", "config": {"window_size": 5}},
                                 {"processor_type": "Contrast", "config": {"rate": 1.4}}]}
    state = F.state_from_data(data)
    assert state["f:smoother_configs.0.config.window_size"] == 5
    assert state["f:smoother_configs.1.config.rate"] == 1.4
    assert "f:smoother_configs.1.config.window_size" not in state
    back = F.data_from_state(state)["smoother_configs"]
    assert back[0]["config"]["window_size"] == 5 and back[1]["config"] == {"rate": 1.4}
    state["f:smoother_configs.1.processor_type"] = "FastBlend"  # switched in the form: FastBlend's fields
    assert F.data_from_state(state)["smoother_configs"][1]["config"]["inference_mode"] == "fast"


def test_a_prompt_travel_mapping_round_trips_through_the_form():
    from diffsynth.config import PipelineInputs
    spec = next(s for s in F.fields_of(PipelineInputs) if s.name == "prompt")
    travel = {0: "a girl in a garden", 120: "a girl at night: stars"}
    text = F.to_widget_value(spec, travel)
    assert text == "0: a girl in a garden\n120: 'a girl at night: stars'"
    assert F.from_widget_value(spec, text) == travel
    for plain in ("best quality: anime, a girl", "a girl", "(cat:1.3), dog"):
        assert F.from_widget_value(spec, plain) == plain


def test_a_run_name_is_one_folder_name_even_through_links(settings, tmp_path):
    (settings.output / "a" / "cache").mkdir(parents=True)
    (settings.output / "a" / "manifest.sqlite").write_bytes(b"")
    for name in ("a/cache/b", "a/b", "./a/cache"):
        with pytest.raises(UserError, match="not one folder name"):
            run_folder(settings, name)
    (settings.output / "link").symlink_to(settings.output / "a" / "cache")
    with pytest.raises(UserError, match="not one folder name"):
        run_folder(settings, "link/b")
    assert run_folder(settings, "b") == settings.output / "b"
    data = F.data_from_state(dict(F.state_from_data({}), **{"f:data.output_folder": "a/cache/b"}))
    assert "not one folder name" in F.validate(data, settings)[1]["data.output_folder"][0]


def test_the_ray_address_comes_only_from_the_servers_settings(settings, tmp_path):
    data = {"executor": {"address": "ray://attacker:10001"}}
    _, problems = F.confine_paths(data, settings)
    assert "not one of this server's (none)" in problems["executor.address"]
    settings.ray_addresses = ["ray://head:10001"]
    assert "executor.address" not in F.confine_paths({"executor": {"address": "ray://head:10001"}}, settings)[1]
    assert "executor.address" in F.confine_paths(data, settings)[1]
    assert "executor.address" not in F.confine_paths({"executor": {"address": None}}, settings)[1]
    file = tmp_path / "webui.yaml"
    file.write_text(yaml.safe_dump({"ray_addresses": ["auto", "ray://head:10001"]}))
    assert load_settings({"DIFFSYNTH_WEBUI_SETTINGS": str(file)}).ray_addresses == ["auto", "ray://head:10001"]
    assert load_settings({"DIFFSYNTH_WEBUI_RAY_ADDRESSES": "auto, ray://b:1"}).ray_addresses == ["auto", "ray://b:1"]


def test_cancel_signals_only_the_process_that_was_launched(settings):
    """A pid is reused once its process is gone: a live diffsynth-looking process with the recorded pid but
    another start time is not the render the page launched, and is left alone."""
    import subprocess
    import sys
    import psutil
    run_dir = settings.output / "r"
    run_dir.mkdir()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "diffsynth", "render"])
    try:
        started = psutil.Process(process.pid).create_time()
        (run_dir / R.PID_FILE).write_text(f"{process.pid} {started - 100:.3f}")  # the pid's earlier owner
        assert not R.cancel(run_dir) and process.poll() is None
        (run_dir / R.PID_FILE).write_text(f"{process.pid} {started:.3f}")
        assert R.cancel(run_dir)
        assert process.wait(timeout=10) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
