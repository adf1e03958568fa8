"""Work kept, counted: after a SIGKILL the resume recomputes at most one committed unit, and rendering a complete run
again computes nothing. Counted from the manifest (each committed unit's row and finish time, retired stages and
released units included), not inferred from the output's bytes."""

import json
import shutil
import sqlite3

import pytest
from helpers import committed_units, kill_chain, outputs, recomputed, run_cli, small_config, write_config


def four_step_config(demo_assets, run_dir):
    """Four denoising steps with in-loop smoothing at step 1 and final smoothing: kills land in later steps."""
    return small_config(demo_assets, run_dir, num_inference_steps=4, smoother_progress_ids=[1, -1])


@pytest.fixture(scope="module")
def four_step_reference(demo_assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("four_step")
    config = write_config(folder / "config.yaml", four_step_config(demo_assets, folder / "run"))
    result = run_cli("render", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    return folder


# One kill in each kind of stage and at each point of the commit protocol, in the order a render reaches them; each
# process resumes the folder the previous one was killed in.
KILL_SEQUENCE = [
    "crop:5", "before_commit@crop:3", "annotate:4", "before_commit@prompts:1", "latents:6",
    "denoise.000.windows:2", "before_commit@denoise.000.step:5", "retire@denoise.000.windows:1",
    "smooth.001.x0:3", "release@smooth.001.blend:2", "before_commit@smooth.001.blend:3",
    "denoise.001.step:4", "retire@denoise.000.step:1", "denoise.003.step:7",
    "vae_decode:6", "release@smooth.final:3", "smooth.final:10", "encode:5", "before_commit@encode:9",
]


def test_resumes_after_kills_recompute_at_most_one_committed_unit(demo_assets, four_step_reference, tmp_path):
    config = write_config(tmp_path / "config.yaml", four_step_config(demo_assets, tmp_path / "run"))
    run_dir = tmp_path / "run"
    redone = kill_chain(config, run_dir, KILL_SEQUENCE)

    worst = max(len(units) for units in redone.values())
    assert worst <= 1, {point: units for point, units in redone.items() if len(units) > 1}
    assert outputs(run_dir) == outputs(four_step_reference / "run")
    log = (run_dir / "render.log").read_text()
    assert " WARNING " not in log, [line for line in log.splitlines() if " WARNING " in line]
    assert not list(run_dir.rglob("*.tmp")), "leftover temporary files"
    # Released units left no files behind: every file under cache/ belongs to a kept row.
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    kept = {path for (path,) in db.execute("SELECT path FROM units WHERE size >= 0")}
    db.close()
    assert {str(p.relative_to(run_dir)) for p in (run_dir / "cache").rglob("*") if p.is_file()} <= kept


def test_rendering_a_complete_run_again_computes_nothing(four_step_reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(four_step_reference / "run", run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["output_folder"] = str(run_dir)
    config_path = write_config(tmp_path / "config.yaml", config)
    before = committed_units(run_dir)
    log_lines = len((run_dir / "render.log").read_text().splitlines())

    status = json.loads(run_cli("status", run_dir, "--json").stdout)
    assert status["state"] == "complete" and status["units_left"] == 0
    assert "nothing left to compute" in run_cli("status", run_dir).stdout

    result = run_cli("render", config_path, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "everything was reused from the cache" in result.stderr
    assert recomputed(before, committed_units(run_dir)) == []
    assert committed_units(run_dir) == before
    new_log = "\n".join((run_dir / "render.log").read_text().splitlines()[log_lines:])
    assert " WARNING " not in new_log and "corrupt" not in new_log
    assert "stage denoise.000.windows: all 2 units reused from the cache" in new_log
    status = json.loads(run_cli("status", run_dir, "--json").stdout)
    assert status["last_render"]["computed"] == 0 and status["last_render"]["reused"] == len(before)


def test_progress_bars_say_which_stages_were_reused(four_step_reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(four_step_reference / "run", run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["output_folder"] = str(run_dir)
    config["data"]["crf"] = 30
    result = run_cli("render", write_config(tmp_path / "config.yaml", config))
    assert result.returncode == 0, result.stderr
    assert "denoise.003.step: reused from the cache (12 units)" in result.stderr
    assert "encode: reused" not in result.stderr
    assert "13 unit(s) computed in 1 stage(s)" in result.stderr
