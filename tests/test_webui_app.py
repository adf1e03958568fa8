"""The Streamlit page itself, driven by streamlit.testing.v1.AppTest: the form built from the schema, field errors,
a small demo render launched from the page, Cancel and Resume."""

import os
import signal
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from diffsynth.webui import runs as R

REPO = Path(__file__).resolve().parent.parent
SMALL = {  # the demo, made fast: 12 frames, one denoising step, two sliding windows (and no smoothing)
    "f:data.input_frames.end_frame_id": 12,
    "f:pipeline.pipeline_inputs.num_inference_steps": 1,
    "f:pipeline.pipeline_inputs.animatediff_batch_size": 8,
    "f:pipeline.pipeline_inputs.animatediff_stride": 4,
}


@pytest.fixture
def output_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("DIFFSYNTH_WEBUI_OUTPUT", str(root))
    yield root
    for pid_file in root.glob(f"*/{R.PID_FILE}"):  # never leave a render behind
        pid = R.render_pid(pid_file.parent)
        if pid:
            os.kill(pid, signal.SIGKILL)


def app():
    return AppTest.from_file(str(REPO / "webui.py"), default_timeout=120).run()


def errors(at):
    return [e.value for e in at.error]


def heading(at):
    found = [m.value for m in at.markdown if m.value.startswith("### ")]
    return found[0] if found else ""


def state_of(at):
    text = heading(at)
    return text.rsplit("**", 2)[-2] if text.count("**") >= 2 else None


def wait_for(at, predicate, timeout=240, interval=1.0):
    deadline = time.time() + timeout
    while True:
        at.run()
        assert not at.exception, at.exception
        if predicate(at):
            return at
        assert time.time() < deadline, f"timed out; page shows {heading(at)!r}, errors {errors(at)}"
        time.sleep(interval)


def small_demo_form(at, run_name):
    at.button(key="load_demo").click().run()
    assert not at.exception, at.exception
    for key, value in SMALL.items():
        at.number_input(key=key).set_value(value)
    at.text_input(key="f:pipeline.pipeline_inputs.smoother_progress_ids").set_value("")  # no FastBlend: faster
    at.text_input(key="f:data.output_folder").set_value(run_name)
    return at.run()


def test_form_is_built_from_the_schema_with_its_defaults(output_root):
    at = app()
    assert not at.exception, at.exception
    assert at.number_input(key="f:pipeline.pipeline_inputs.cfg_scale").value == 7.0
    assert at.number_input(key="f:pipeline.pipeline_inputs.num_inference_steps").value == 10
    assert at.number_input(key="f:pipeline.pipeline_inputs.animatediff_stride").value == 8
    assert at.number_input(key="f:pipeline.pipeline_inputs.animatediff_batch_size").value == 16
    assert at.number_input(key="f:data.input_frames.height").value == 512
    assert at.selectbox(key="f:models.torch_dtype").value == "auto"
    assert at.text_area(key="f:pipeline.pipeline_inputs.prompt").value == ""
    # ControlNet units: none by default; Add makes one with the schema's defaults, Remove takes it away
    at.button(key="add:models.controlnet_units").click().run()
    assert at.selectbox(key="f:models.controlnet_units.0.processor_id").value == "tile"
    assert at.number_input(key="f:models.controlnet_units.0.scale").value == 1.0
    at.button(key="add:models.controlnet_units").click().run()
    at.selectbox(key="f:models.controlnet_units.1.processor_id").set_value("canny").run()
    at.button(key="remove:models.controlnet_units:0").click().run()
    assert at.selectbox(key="f:models.controlnet_units.0.processor_id").value == "canny"
    assert not [w for w in at.selectbox if w.key == "f:models.controlnet_units.1.processor_id"]
    # the demo config loads into the form: video preview, frame-range slider, model pickers
    at.button(key="load_demo").click().run()
    assert at.text_input(key="f:data.input_frames.video_file").value.endswith("assets/demo/clip.mp4")
    assert at.slider(key="range:data.input_frames.range").value == (0, 48)
    assert len(at.multiselect(key="f:models.model_list").value) == 2
    assert at.number_input(key="f:models.controlnet_units.1.scale").value == 0.5
    assert any("aspect 1:1" in c.value for c in at.caption)
    # a smoother chain entry switched to Contrast shows the enhancer's field at its schema default
    count = at.session_state["n:smoother_configs"]
    at.button(key="add:smoother_configs").click().run()
    at.selectbox(key=f"f:smoother_configs.{count}.processor_type").set_value("Contrast").run()
    assert not at.exception, at.exception
    assert at.number_input(key=f"f:smoother_configs.{count}.config.rate").value == 1.0
    assert not [w for w in at.number_input if w.key == f"f:smoother_configs.{count}.config.window_size"]


def test_bad_values_show_field_errors_and_launch_nothing(output_root):
    at = small_demo_form(app(), "bad")
    at.number_input(key="f:pipeline.pipeline_inputs.cfg_scale").set_value(-2.0)
    at.number_input(key="f:pipeline.pipeline_inputs.animatediff_stride").set_value(20)  # > batch size 8
    at.text_input(key="f:data.input_frames.video_file").set_value("/etc/passwd")
    at.button(key="render").click().run()
    shown = errors(at)
    assert any("'pipeline.pipeline_inputs.cfg_scale'" in e and "greater than or equal to 0" in e for e in shown)
    assert any("/etc/passwd is outside the allowed videos folders" in e for e in shown)
    assert "run" not in at.query_params
    # a whole-section check (pydantic runs it once the section's fields are valid) shows on its section
    at.number_input(key="f:pipeline.pipeline_inputs.cfg_scale").set_value(7.0)
    at.button(key="render").click().run()
    shown = errors(at)
    assert not any("cfg_scale" in e for e in shown)
    assert any("'pipeline.pipeline_inputs': animatediff_stride must not exceed" in e for e in shown)
    assert "run" not in at.query_params
    assert list(output_root.iterdir()) == []  # no run folder, no process


def test_demo_render_from_the_page_completes_with_progress(output_root):
    at = small_demo_form(app(), "small")
    at.button(key="render").click().run()
    assert not errors(at), errors(at)
    assert at.query_params["run"] == ["small"] or at.query_params["run"] == "small"
    assert (output_root / "small" / R.CONFIG_NAME).is_file()  # saved before the launch
    seen_running = []

    def finished(at):
        if state_of(at) == "running" and at.dataframe:
            seen_running.append([m.value for m in at.metric])
        return state_of(at) in ("complete", "failed", "interrupted")

    wait_for(at, finished)
    assert state_of(at) == "complete", (heading(at), [c.value for c in at.code])
    assert seen_running, "never saw the run in progress"
    assert at.dataframe and at.get("video"), "the stage table and the video are shown"
    assert any(b.label == "Download video.mp4" for b in at.get("download_button"))
    assert (output_root / "small" / "video.mp4").stat().st_size > 0
    # a fresh page (a browser refresh) reconnects through the query parameter
    fresh = AppTest.from_file(str(REPO / "webui.py"), default_timeout=60)
    fresh.query_params["run"] = "small"
    fresh.run()
    assert state_of(fresh) == "complete"
    assert any(b.key == "open:small" for b in fresh.button)


def test_cancel_leaves_a_resumable_run_that_resume_completes(output_root):
    at = small_demo_form(app(), "cancelled")
    at.button(key="render").click().run()
    run_dir = output_root / "cancelled"
    wait_for(at, lambda at: state_of(at) == "running" and any(s["done"] for s in R.read_progress(run_dir)["stages"]),
             interval=0.3)
    at.button(key="cancel").click().run()
    wait_for(at, lambda at: state_of(at) in ("interrupted", "complete", "failed"))
    assert state_of(at) == "interrupted", heading(at)
    report = R.read_progress(run_dir)
    assert report["done"] < report["total"]
    assert "stopping after the current unit" in report["log"]
    assert any(b.key == "resume" for b in at.button)
    # the runs list offers Resume too; the page's own button resumes and the run completes
    assert any(b.key == "resume:cancelled" for b in at.button)
    at.button(key="resume").click().run()
    wait_for(at, lambda at: state_of(at) in ("complete", "failed"))
    assert state_of(at) == "complete", (heading(at), R.read_progress(run_dir)["log"][-2000:])
    assert (run_dir / "video.mp4").is_file()


@pytest.fixture
def videos_root(tmp_path, monkeypatch):
    """A videos folder of the test's own, beside the demo's assets (where the demo clip is)."""
    root = tmp_path / "videos"
    monkeypatch.setenv("DIFFSYNTH_WEBUI_VIDEOS", os.pathsep.join([str(root), str(REPO / "assets")]))
    return root


def test_a_config_error_is_shown_at_the_form_and_leaves_no_run_folder(output_root, videos_root):
    at = small_demo_form(app(), "mistake")
    assert videos_root.is_dir()  # created on the page's first start
    # a path outside the page's folders: the message says what to do
    at.text_input(key="f:data.input_frames.video_file").set_value("/etc/hosts")
    at.button(key="render").click().run()
    assert any(f"copy it into {videos_root} or add that folder to DIFFSYNTH_WEBUI_VIDEOS" in e for e in errors(at))
    # inside the folder but not a video: refused by the CLI's own probe, before any run folder exists
    (videos_root / "notes.mp4").write_text("not a video")
    at.text_input(key="f:data.input_frames.video_file").set_value(str(videos_root / "notes.mp4"))
    at.button(key="render").click().run()
    assert any(e.startswith("Not started: cannot read") and "notes.mp4 as a video" in e for e in errors(at)), \
        errors(at)
    # a motion module where the base model belongs: refused by the CLI's model detection
    at.text_input(key="f:data.input_frames.video_file").set_value(str(REPO / "assets" / "demo" / "clip.mp4"))
    at.multiselect(key="f:models.model_list").set_value([str(REPO / "assets" / "demo" / "models" / "motion_adapter")])
    at.button(key="render").click().run()
    assert any("Not started: models.model_list has no" in e for e in errors(at)), errors(at)
    assert "run" not in at.query_params
    assert list(output_root.iterdir()) == []  # no 'failed' run left behind


def test_a_failed_run_shows_its_error_line_not_a_traceback(output_root):
    run = output_root / "broken"
    run.mkdir()
    (run / R.CONFIG_NAME).write_text("{}")
    (run / R.PROCESS_LOG).write_text("--- render\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                                     "error: data.input_frames.video_file: video file not found: /v/clip.mp4\n")
    at = AppTest.from_file(str(REPO / "webui.py"), default_timeout=60)
    at.query_params["run"] = "broken"
    at.run()
    assert state_of(at) == "failed"
    assert errors(at) == ["error: data.input_frames.video_file: video file not found: /v/clip.mp4"]
    assert any(b.key == "resume" for b in at.button)


def test_the_run_page_names_stages_for_what_they_do_and_lists_them_all(output_root):
    """A run planned with 10 denoising steps: every stage is in the table (none scrolled away), named in words."""
    from diffsynth.cache import RunCache
    run = output_root / "planned"
    cache = RunCache(run)
    names = ["decode", "crop", "prompts", "latents"] + [f"denoise.{k:03d}.{part}" for k in range(10)
                                                        for part in ("windows", "step")] + ["vae_decode", "encode"]
    for position, name in enumerate(names):
        cache.db.execute("INSERT INTO stages (name, fingerprint, total, position) VALUES (?, 'f', 4, ?)",
                         (name, position))
    cache.db.executemany("INSERT INTO units VALUES ('decode', ?, 'p', 10, 'c', ?)",
                         [(f"{i:06d}.safetensors", 1e6 + i) for i in range(4)])
    cache.close()
    at = AppTest.from_file(str(REPO / "webui.py"), default_timeout=60)
    at.query_params["run"] = "planned"
    at.run()
    assert state_of(at) == "interrupted"
    table = at.dataframe[0].value
    assert len(table) == len(names)
    assert list(table["stage"])[4:6] == ["Denoising, step 1 of 10", "Denoising, step 1 of 10: blending the windows"]
    assert list(table["stage id"]) == names
    # nothing of the current stage (crop) has been timed: no made-up ETA
    assert [m.value for m in at.metric if m.label == "Time left"] == ["estimating…"]
    assert "**Now:** Reading, cropping and resizing the source frames" in [m.value for m in at.markdown]


def test_the_newest_frame_beside_its_source_and_a_scrubber_over_finished_frames(output_root):
    """A run with four finished frames: the newest is shown beside the source frame it was made from; turning
    'follow' off gives a slider over the finished frames, and each position shows that frame's pair."""
    import numpy as np

    from diffsynth.cache import RunCache, image_to_bytes, image_to_png
    run = output_root / "frames"
    cache = RunCache(run)
    cache.db.execute("INSERT INTO stages (name, fingerprint, total, position) VALUES ('crop', 'f', 6, 0)")
    cache.db.execute("INSERT INTO stages (name, fingerprint, total, position) VALUES ('encode', 'f', 7, 1)")
    (run / "frames").mkdir()
    (run / "cache" / "crop").mkdir(parents=True)
    for index in range(6):
        source = np.full((24, 32, 3), index * 10, np.uint8)
        (run / "cache" / "crop" / f"{index:06d}.safetensors").write_bytes(image_to_bytes(source))
        cache.db.execute("INSERT INTO units VALUES ('crop', ?, ?, 10, 'c', ?)",
                         (f"{index:06d}.safetensors", f"cache/crop/{index:06d}.safetensors", 1e6 + index))
    for index in range(4):
        (run / "frames" / f"{index:05d}.png").write_bytes(image_to_png(np.full((24, 32, 3), 200, np.uint8)))
        cache.db.execute("INSERT INTO units VALUES ('encode', ?, ?, 10, 'c', ?)",
                         (f"frames/{index:05d}.png", f"frames/{index:05d}.png", 1e6 + 10 + index))
    cache.close()
    at = AppTest.from_file(str(REPO / "webui.py"), default_timeout=60)
    at.query_params["run"] = "frames"
    at.run()
    assert not at.exception, at.exception
    captions = [c.value for c in at.caption]
    assert "result, frame 3" in captions and "source, frame 3" in captions
    assert len(at.get("image")) == 3  # the shot strip over the scrubber, the result and its source frame
    at.toggle(key="follow:frames").set_value(False).run()
    slider = at.slider(key="scrub:frames")
    assert (slider.min, slider.max, slider.value) == (0, 3, 3)
    slider.set_value(1).run()
    captions = [c.value for c in at.caption]
    assert "result, frame 1" in captions and "source, frame 1" in captions
    assert "result, frame 3" not in captions
