"""Bad input, as a campaign: config values, files, videos, model files and `--set`, each through the CLI against a
finished run folder. Each gets exit code 2 and one line naming the problem (no traceback), and afterwards the run
folder still holds every unit it had, untouched."""

import shutil
from pathlib import Path

import pytest
from helpers import committed_units, outputs, small_config, write_config

from diffsynth.cli import main
from diffsynth.errors import UserError


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


# --- every config key, from the schema ------------------------------------------------------------------------------

def _schema_leaves(model, prefix=()):
    """(dotted key path as a tuple, field) of every field of a schema class, nested sections walked (a list of
    sections at index 0; FastBlend's and Contrast's settings both under smoother_configs.0.config)."""
    from diffsynth.config import EnhanceSettings, FastBlendSettings, _schema_class
    for name, info in model.model_fields.items():
        path = prefix + (name,)
        yield path, info
        if name == "config" and model.__name__ == "SmootherConfig":
            for settings in (FastBlendSettings, EnhanceSettings):
                yield from _schema_leaves(settings, path)
            continue
        nested = _schema_class(info.annotation)
        if nested is not None:
            is_list = "list[" in str(info.annotation)
            yield from _schema_leaves(nested, path + ((0,) if is_list else ()))


def bad_value(info):
    """A value the field must refuse, from its type and bounds: below a lower bound, above an upper one, outside a
    choice, a word for a number, a list for a text, a text for a list or a section."""
    import annotated_types
    from typing import Literal, get_args, get_origin

    from diffsynth.config import _schema_class
    annotation = info.annotation
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            return meta.ge - 1
        if isinstance(meta, annotated_types.Gt):
            return meta.gt
        if isinstance(meta, annotated_types.Le):
            return meta.le + 1
    if _schema_class(annotation) is not None:
        return "not a section"
    args = [arg for arg in get_args(annotation) if arg is not type(None)] or [annotation]
    if get_origin(annotation) is Literal or all(get_origin(arg) is Literal for arg in args):
        return "no-such-choice"
    if annotation is bool:
        return "maybe"
    if any(get_origin(arg) is dict for arg in args):
        return {-1: "a negative prompt-travel key"}
    if any(get_origin(arg) is list for arg in args):
        inner = get_args(next(arg for arg in args if get_origin(arg) is list))[0]
        return ["x"] if inner in (int, float) else "one text, not a list"
    if any(arg in (int, float) for arg in args):
        return "many"
    return ["a", "list"]


def _base_for(path):
    """The small config (paths need not exist: the value is refused first), shaped so `path` exists."""
    config = small_config(Path("/nonexistent/assets"), "/nonexistent/run")
    if path[:2] == ("data", "controlnet_frames"):
        config["data"]["controlnet_frames"] = [dict(frames(config)) for _ in config["models"]["controlnet_units"]]
    if path[:3] == ("smoother_configs", 0, "config") and len(path) > 3 and path[3] == "rate":
        config["smoother_configs"] = [{"processor_type": "Contrast", "config": {"rate": 1.1}}]
    return config


def _set(config, path, value):
    node = config
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[path[-1]] = value


def _field_key(path):
    return ".".join(map(str, path))


def schema_cases():
    from diffsynth.config import RenderConfig
    seen, cases = set(), []
    for path, info in _schema_leaves(RenderConfig):
        key = _field_key(path)
        if key not in seen:
            seen.add(key)
            cases.append((key, path, bad_value(info)))
    return cases


SCHEMA_CASES = schema_cases()


def test_schema_cases_cover_every_config_key():
    from diffsynth.config import RenderConfig
    keys = {case[0] for case in SCHEMA_CASES}
    assert "pipeline.pipeline_inputs.cfg_scale" in keys and "smoother_configs.0.config.rate" in keys
    assert "executor.address" in keys and "data.input_frames.resize_mode" in keys
    assert len(keys) >= 60, len(keys)
    assert set(RenderConfig.model_fields) <= keys  # the sections themselves too


@pytest.mark.parametrize("key, path, value", SCHEMA_CASES, ids=[case[0] for case in SCHEMA_CASES])
def test_every_config_key_refuses_a_bad_value_in_one_line(tmp_path, capsys, key, path, value):
    """Through the CLI in this process (validation fails before anything is read): exit 2, one line naming the key."""
    config = _base_for(path)
    _set(config, path, value)
    code = main(["render", str(write_config(tmp_path / "config.yaml", config)), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert key in err, err
    assert not Path("/nonexistent/run").exists()


# --- the run folder's own files ----------------------------------------------------------------------------------

def _snapshot(folder):
    """{relative path: (bytes' checksum, mtime)} of every file in a folder, and the folders."""
    import hashlib
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                         p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*"))}


def _garbage(run, name):
    (run / name).write_bytes(bytes(range(256)) * 12)


def _other_database(run, name):
    import sqlite3
    (run / name).unlink()
    db = sqlite3.connect(run / name)
    db.execute("CREATE TABLE photos (id INTEGER, path TEXT)")
    db.commit()
    db.close()


def _truncated(run, name):
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[: len(data) // 2 // 4096 * 4096 or 4096])


def _as_folder(run, name):
    path = run / name
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.mkdir()
    (path / "keep.txt").write_text("mine")


def _as_file(run, name):
    if (run / name).is_dir():
        shutil.rmtree(run / name)
    (run / name).write_text("mine")


# (id, damage(run folder), file, text the error line must contain)
RUN_FOLDER_CASES = [
    ("garbage manifest", _garbage, "manifest.sqlite", "is not a run manifest (damaged?)"),
    ("another program's database as manifest", _other_database, "manifest.sqlite", "is not a run manifest"),
    ("manifest cut in half", _truncated, "manifest.sqlite", "is not a run manifest"),
    ("manifest is a folder", _as_folder, "manifest.sqlite", "not a render's"),
    ("config.json is a folder", _as_folder, "config.json", "config.json file"),
    ("render.log is a folder", _as_folder, "render.log", "render.log file"),
    ("lock is a folder", _as_folder, "lock", "lock file"),
    ("video.mp4 is a folder", _as_folder, "video.mp4", "video.mp4 file"),
    ("cache is a file", _as_file, "cache", "cache folder"),
    ("frames is a file", _as_file, "frames", "frames folder"),
]


@pytest.fixture
def damaged_copy(finished_run, tmp_path):
    run_dir, units, finished_outputs = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, units, finished_outputs


@pytest.mark.parametrize("name, damage_run, file, expected", RUN_FOLDER_CASES, ids=[c[0] for c in RUN_FOLDER_CASES])
def test_a_damaged_run_folder_is_refused_before_work_and_left_as_it_is(demo_assets, damaged_copy, tmp_path, capsys,
                                                                       name, damage_run, file, expected):
    run, units, finished_outputs = damaged_copy
    damage_run(run, file)
    before = _snapshot(run)
    config = write_config(tmp_path / "config.yaml", small_config(demo_assets, run))
    commands = [["render", str(config), "--no-progress"]]
    if file == "manifest.sqlite" and damage_run is not _as_folder:
        commands += [["status", str(run)], ["plan", str(config)]]
    for command in commands:
        code = main(command)
        err = capsys.readouterr().err.strip()
        assert code == 2, (command[0], err)
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, (command[0], err)
    assert _snapshot(run) == before  # never deleted, rebuilt or written behind the user's back
    if file not in ("manifest.sqlite", "frames", "video.mp4"):
        assert committed_units(run) == units and outputs(run) == finished_outputs


def test_the_output_folders_place_is_checked_through_links(demo_assets, finished_run, tmp_path, capsys):
    run_dir, units, _ = finished_run
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "into_cache").symlink_to(run_dir / "cache")
    cases = {"loop": "cannot be reached", "loop/run": "cannot be reached", "a_file/run": "is a file",
             str(run_dir / "cache" / "crop" / "mine"): "inside the cache/", "into_cache/new": "inside the cache/",
             str(run_dir / "frames" / "mine"): "inside the frames/"}
    for folder, expected in cases.items():
        config = write_config(tmp_path / "config.yaml", small_config(demo_assets, tmp_path / folder))
        for command in (["render", str(config), "--no-progress"], ["plan", str(config)]):
            code = main(command)
            err = capsys.readouterr().err.strip()
            assert code == 2 and len(err.splitlines()) == 1 and expected in err, (folder, command[0], err)
    assert not (run_dir / "cache" / "crop" / "mine").exists() and not (run_dir / "frames" / "mine").exists()
    assert committed_units(run_dir) == units


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("data: {output_folder: café}\n".encode("latin-1"))
    (tmp_path / "latin1.py").write_bytes("config = {'x': 'café'}\n".encode("latin-1"))
    for name in ("latin1.yaml", "latin1.py"):
        for command in ("render", "plan"):
            assert main([command, str(tmp_path / name)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "not UTF-8" in err and name in err, err
    assert main(["models", "check", str(tmp_path / "latin1.yaml")]) == 2
    assert "not UTF-8" in capsys.readouterr().err


# --- input files: a LoRA for another model, an unreadable image, mixed frame sizes, a travel key past the end ------

def _misfit_lora(path, models):
    """A kohya LoRA whose layer names fit the tiny UNet but whose tensors are another model's widths."""
    from safetensors.torch import save_file
    import torch
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 320), f"{key}.lora_up.weight": torch.zeros(640, 2),
               f"{key}.alpha": torch.tensor(1.0)}, path)
    return path


def test_a_lora_that_does_not_fit_is_found_by_models_check_and_before_the_render_starts(demo_assets, tmp_path,
                                                                                         capsys):
    config = small_config(demo_assets, tmp_path / "run")
    lora = _misfit_lora(tmp_path / "sdxl_style.safetensors", demo_assets / "models")
    config["models"]["model_list"].append(str(lora))
    config["models"]["lora_alphas"] = [0.8]
    path = write_config(tmp_path / "config.yaml", config)
    assert main(["models", "check", str(path)]) == 2
    out = capsys.readouterr()
    row = next(line for line in out.out.splitlines() if "sdxl_style" in line)
    assert row.startswith("PROBLEM") and "lora_down [2, 320]" in row, out.out
    assert main(["render", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit this model" in err and "sdxl_style" in err, err
    assert not (tmp_path / "run").exists()  # refused before any stage ran


def _image_folder(folder, sizes):
    from PIL import Image
    folder.mkdir()
    for index, size in enumerate(sizes):
        Image.new("RGB", size, (index * 40, 90, 200)).save(folder / f"{index:03d}.png")
    return folder


def _warnings(config):
    from diffsynth.config import parse_config
    from diffsynth.plan import build_plan_stages
    from diffsynth.render import input_warnings
    stages, _ = build_plan_stages(parse_config(config))
    return input_warnings(stages)


def test_mixed_frame_sizes_and_travel_keys_past_the_end_are_warned_about(demo_assets, tmp_path):
    config = small_config(demo_assets, tmp_path / "run")
    assert _warnings(config) == []
    frames(config).update(video_file=None, image_folder=str(_image_folder(tmp_path / "mixed",
                                                                          [(96, 64)] * 4 + [(64, 96)] * 2)))
    frames(config).pop("end_frame_id")
    inputs(config).update(prompt={0: "a cat", 3: "a dog", 40: "a bird", 60: "a fish"})
    lines = _warnings(config)
    assert len(lines) == 3, lines
    assert "holds frames of 2 sizes (4 at 96x64, 2 at 64x96; e.g. 004.png is 64x96)" in lines[0]
    assert "key 40 of pipeline.pipeline_inputs.prompt" in lines[1] and "frame 5 gets 5.4% of it" in lines[1], lines[1]
    assert "key 60" in lines[2] and "never used" in lines[2]
    (tmp_path / "mixed" / "002.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*002.png"):
        _warnings(config)


def test_the_render_prints_and_logs_its_warnings_before_work(demo_assets, tmp_path, capsys, monkeypatch):
    """Refused for free space right after: the warning came first, and nothing was computed."""
    import diffsynth.plan
    from diffsynth.config import parse_config
    from diffsynth.render import render
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(diffsynth.plan.shutil, "disk_usage", lambda path: usage._replace(free=500))
    config = small_config(demo_assets, tmp_path / "run")
    inputs(config).update(prompt={0: "a cat", 30: "a dog"})
    with pytest.raises(UserError, match="not enough free disk"):
        render(parse_config(config), progress=False)
    assert "warning: prompt travel key 30" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- status and plan read, never write -----------------------------------------------------------------------------

def test_status_changes_nothing_in_a_finished_run_folder(damaged_copy, capsys):
    from diffsynth.webui.runs import read_manifest
    run, units, _ = damaged_copy
    before = _snapshot(run)
    assert main(["status", str(run), "--json"]) == 0 and '"complete": true' in capsys.readouterr().out
    assert read_manifest(run)["stages"]  # the web UI's poll
    assert _snapshot(run) == before and not (run / "manifest.sqlite-wal").exists()


def test_status_reads_a_killed_renders_wal_and_a_live_ones_without_writing(damaged_copy, capsys):
    """A live render: a writer holding the lock with rows only in its WAL. A killed one: its manifest, -wal and -shm
    as the kill left them (copied while the writer was open)."""
    from diffsynth.cache import RunCache
    run, units, _ = damaged_copy
    writer = RunCache(run)
    writer.lock()
    writer.set_value("outcome", {"state": "running", "pid": 1})
    writer.open_stage("extra", "fingerprint", 3, 99)
    killed = run.parent / "killed"
    shutil.copytree(run, killed)
    (killed / "lock").write_text("")  # not held by anyone: the render was killed
    try:
        before = _snapshot(run)
        assert main(["status", str(run), "--json"]) == 0
        report = capsys.readouterr().out
        assert '"state": "running"' in report and '"name": "extra"' in report
        after = _snapshot(run)
        # The manifest and its WAL are not written; the -shm is SQLite's shared lock state, which every reader of a
        # live WAL marks (it is the render's, and it changes with every commit it makes).
        assert {k: v for k, v in after.items() if not k.endswith("-shm")} == \
            {k: v for k, v in before.items() if not k.endswith("-shm")}
    finally:
        writer.close()
    before = _snapshot(killed)
    assert main(["status", str(killed), "--json"]) == 0
    report = capsys.readouterr().out
    assert '"name": "extra"' in report and '"state": "interrupted"' in report  # rows only in the -wal, read
    assert _snapshot(killed) == before
