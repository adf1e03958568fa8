"""Bad input, as a campaign: config values, files, videos, model files and `--set`, each through the CLI against a
finished run folder. Each gets exit code 2 and one line naming the problem (no traceback), and afterwards the run
folder still holds every unit it had, untouched."""

import shutil

import pytest
from helpers import committed_units, outputs, small_config, write_config

from diffsynth.cli import main


def inputs(c):
    return c["pipeline"]["pipeline_inputs"]


def frames(c):
    return c["data"]["input_frames"]


def write(tmp, name, data):
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def empty_folder(tmp):
    (tmp / "empty").mkdir(exist_ok=True)
    return str(tmp / "empty")


# (id, change(config, tmp) -> extra CLI args or None, text the error line must contain)
CASES = [
    ("missing video", lambda c, t: frames(c).update(video_file=str(t / "nope.mp4")), "video file not found"),
    ("text file as video", lambda c, t: frames(c).update(video_file=write(t, "notes.mp4", b"not a video\n")),
     "cannot read"),
    ("truncated video", lambda c, t: frames(c).update(
        video_file=write(t, "cut.mp4", (t.parent / "clip.mp4").read_bytes()[:3000])), "cut.mp4"),
    ("zero frame range", lambda c, t: frames(c).update(start_frame_id=500, end_frame_id=600), "holds no frames"),
    ("width not a multiple of 8", lambda c, t: frames(c).update(width=100), "width"),
    ("height zero", lambda c, t: frames(c).update(height=0), "height"),
    ("end before start", lambda c, t: frames(c).update(start_frame_id=5, end_frame_id=3), "frame"),
    ("video and image folder", lambda c, t: frames(c).update(image_folder=empty_folder(t)), "exactly one"),
    ("neither video nor images", lambda c, t: frames(c).update(video_file=None), "exactly one"),
    ("missing image folder", lambda c, t: frames(c).update(video_file=None, image_folder=str(t / "nowhere")),
     "nowhere"),
    ("empty image folder", lambda c, t: frames(c).update(video_file=None, image_folder=empty_folder(t)), "empty"),
    ("window longer than the motion module", lambda c, t: inputs(c).update(animatediff_batch_size=40),
     "animatediff_batch_size 40"),
    ("stride longer than the window", lambda c, t: inputs(c).update(animatediff_stride=12), "animatediff_stride"),
    ("cfg_scale a word", lambda c, t: inputs(c).update(cfg_scale="high"), "cfg_scale"),
    ("zero steps", lambda c, t: inputs(c).update(num_inference_steps=0), "num_inference_steps"),
    ("strength above 1", lambda c, t: inputs(c).update(denoising_strength=1.5), "denoising_strength"),
    ("smoothing a step that does not exist", lambda c, t: inputs(c).update(smoother_progress_ids=[7]),
     "smoother_progress_ids"),
    ("negative seed", lambda c, t: c["pipeline"].update(seed=-1), "seed"),
    ("unknown processor", lambda c, t: c["models"]["controlnet_units"][1].update(processor_id="cany"),
     "processor_id"),
    ("ControlNet scale too large", lambda c, t: c["models"]["controlnet_units"][0].update(scale=9), "scale"),
    ("controlnet_frames count", lambda c, t: c["data"].update(controlnet_frames=[dict(frames(c))]),
     "controlnet_frames"),
    ("controlnet_frames size", lambda c, t: c["data"].update(controlnet_frames=[dict(frames(c), width=128)] * 2),
     "data.controlnet_frames.0 is 128x64"),
    ("unknown FastBlend mode", lambda c, t: c["smoother_configs"][0]["config"].update(inference_mode="fastest"),
     "inference_mode"),
    ("even patch size", lambda c, t: c["smoother_configs"][0]["config"].update(minimum_patch_size=4),
     "must be odd"),
    ("FastBlend window 0", lambda c, t: c["smoother_configs"][0]["config"].update(window_size=0), "window_size"),
    ("missing ControlNet file", lambda c, t: c["models"]["controlnet_units"][0].update(
        model_path=str(t / "control_v11f1e_sd15_tile.pth")), "model file not found"),
    ("no models", lambda c, t: c["models"].update(model_list=[]), "model_list"),
    ("text file as base model", lambda c, t: c["models"]["model_list"].__setitem__(
        0, write(t, "sd15.safetensors", b"hello")), "sd15.safetensors"),
    ("random bytes as ControlNet", lambda c, t: c["models"]["controlnet_units"][0].update(
        model_path=write(t, "tile.pth", bytes(range(256)) * 8)), "tile.pth: not a weights file"),
    ("unknown dtype", lambda c, t: c["models"].update(torch_dtype="float8"), "torch_dtype"),
    ("vram level 3", lambda c, t: c["models"].update(vram_limit_level=3), "vram_limit_level"),
    ("misspelt key", lambda c, t: inputs(c).update(cfg_scael=inputs(c).pop("cfg_scale")), "did you mean 'cfg_scale'"),
    ("unknown section", lambda c, t: c.update(pipelin={}), "pipelin"),
    ("output folder is a file", lambda c, t: c["data"].update(output_folder=write(t, "out.txt", b"mine")),
     "is a file"),
    ("--set a bad value", lambda c, t: ["--set", "pipeline.pipeline_inputs.cfg_scale=-1"], "cfg_scale"),
    ("--set an unknown key", lambda c, t: ["--set", "pipeline.sead=3"], "did you mean 'seed'"),
    ("--set without =", lambda c, t: ["--set", "pipeline.seed"], "pipeline.seed"),
]


@pytest.fixture(scope="module")
def finished_run(small_render, tmp_path_factory):
    """A copy of the finished small render, and the committed units and outputs it holds."""
    folder = tmp_path_factory.mktemp("campaign")
    shutil.copytree(small_render / "run", folder / "run")
    return folder / "run", committed_units(folder / "run"), outputs(folder / "run")


@pytest.mark.parametrize("name, change, expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(demo_assets, finished_run, tmp_path, capsys, name, change,
                                                       expected):
    run_dir, units, finished_outputs = finished_run
    work = tmp_path / "inputs"
    work.mkdir()
    shutil.copy(demo_assets / "clip.mp4", tmp_path / "clip.mp4")
    config = small_config(demo_assets, run_dir)
    extra = change(config, work) or []
    code = main(["render", str(write_config(tmp_path / "config.yaml", config)), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert committed_units(run_dir) == units
    assert outputs(run_dir) == finished_outputs


def test_config_files_that_are_not_configs(tmp_path, capsys):
    cases = {"missing.yaml": None, "broken.yaml": "models: [unclosed\n", "list.yaml": "- a\n- b\n"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert main(["render", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err, err
