"""The CLI's paper cuts: --set values and paths, a closed pipe, the demo config copy, model-file messages,
warnings, and a make target that must never delete renders."""

import subprocess
import sys
import time
import warnings

import numpy as np
from helpers import REPO, write_config
from PIL import Image

from diffsynth.cli import main
from diffsynth.config import load_config


def test_set_paths_are_taken_as_typed_and_relative_to_the_current_folder(demo_assets, tmp_path, monkeypatch):
    from helpers import small_config
    (tmp_path / "configs").mkdir()
    config = small_config(demo_assets, "../runs/x")  # relative paths in a file: relative to the file
    config["data"]["input_frames"]["video_file"] = "clip.mp4"
    config_path = write_config(tmp_path / "configs" / "c.yaml", config)
    monkeypatch.chdir(tmp_path)
    loaded = load_config(config_path)
    assert loaded.data.input_frames.video_file == str(tmp_path / "configs" / "clip.mp4")
    assert loaded.data.output_folder == str(tmp_path / "runs" / "x")
    loaded = load_config(config_path, ["data.input_frames.video_file=my clip #1: take 2.mp4",
                                       "data.output_folder=out/run a", "pipeline.seed=7",
                                       "models.model_list=[a.safetensors, /abs/b.ckpt]"])
    assert loaded.data.input_frames.video_file == str(tmp_path / "my clip #1: take 2.mp4")
    assert loaded.data.output_folder == str(tmp_path / "out" / "run a")
    assert loaded.pipeline.seed == 7
    assert loaded.models.model_list == [str(tmp_path / "a.safetensors"), "/abs/b.ckpt"]


def test_status_into_a_closed_pipe_exits_quietly(small_render):
    process = subprocess.Popen([sys.executable, "-m", "diffsynth", "status", str(small_render / "run")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    process.stdout.close()  # like `| head -1` that has read what it wanted
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_demo_write_config_gives_a_copy_that_works_anywhere(demo_assets, tmp_path, capsys):
    assert main(["demo", "--write-config", str(tmp_path / "mine" / "toon.yaml")]) == 0
    written = tmp_path / "mine" / "toon.yaml"
    assert capsys.readouterr().out.strip() == str(written)
    config = load_config(written)
    assert config.data.output_folder == str(tmp_path / "mine" / "runs" / "toon")
    assert config.data.input_frames.video_file == str(demo_assets / "clip.mp4")
    assert main(["models", "check", str(written)]) == 0


def test_a_missing_model_names_its_path_and_only_the_kind_expected_there(demo_assets, tmp_path, capsys):
    from helpers import small_config
    config = small_config(demo_assets, tmp_path / "run")
    config["models"]["controlnet_units"][0]["model_path"] = str(tmp_path / "tile.pth")
    path = write_config(tmp_path / "c.yaml", config)
    assert main(["models", "check", str(path)]) == 2
    problem = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBLEM"))
    assert str(tmp_path / "tile.pth") in problem and "not found" in problem and "ControlNet" in problem
    assert "AnimateDiff" not in problem and "SD1.5 checkpoint" not in problem and ":  (" not in problem
    assert main(["render", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "models.controlnet_units.0.model_path" in err and "AnimateDiff" not in err


def test_caching_a_read_only_frame_warns_nothing():
    from diffsynth.cache import bytes_to_image, image_to_bytes
    frame = np.asarray(Image.new("RGB", (8, 4), (10, 20, 30)))  # PIL's arrays are read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (bytes_to_image(image_to_bytes(frame)) == frame).all()


def test_make_clean_never_deletes_renders():
    dry_run = subprocess.run(["make", "-n", "clean"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "rm -rf" in dry_run and "runs" not in dry_run


def test_two_processes_asking_for_the_demo_assets_at_once_write_them_once(tmp_path):
    """The web UI and `diffsynth demo` (or two test processes) may both find the assets missing: one writes, the
    other waits and reuses them. Counted: how many times the models and the clip were written."""
    script = (
        "import sys, time, pathlib\n"
        "import diffsynth.demo as demo, diffsynth.models.tiny as tiny\n"
        "write_models, write_clip = tiny.write_tiny_models, demo.write_synthetic_clip\n"
        "tiny.write_tiny_models = lambda f: (print('models written', flush=True), write_models(f))[1]\n"
        "demo.write_synthetic_clip = lambda p: (print('clip written', flush=True), write_clip(p))[1]\n"
        "go = pathlib.Path(sys.argv[2])\n"
        "pathlib.Path(sys.argv[3]).touch()\n"
        "while not go.exists(): time.sleep(0.01)\n"
        "demo.ensure_demo_assets(sys.argv[1])\n"
    )
    folder, go = tmp_path / "assets", tmp_path / "go"
    ready = [tmp_path / f"ready{n}" for n in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", script, str(folder), str(go), str(flag)],
                                  stdout=subprocess.PIPE, text=True) for flag in ready]
    while not all(flag.exists() for flag in ready):  # both imported and waiting: they start together
        assert all(process.poll() is None for process in processes), "a process died before starting"
        time.sleep(0.05)
    go.touch()
    printed = "".join(process.communicate(timeout=300)[0] for process in processes)
    assert [process.returncode for process in processes] == [0, 0]
    assert printed.count("models written") == 1 and printed.count("clip written") == 1, printed
    assert (folder / "models" / "COMPLETE").exists() and (folder / "clip.mp4").stat().st_size > 0
