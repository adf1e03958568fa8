"""Many workers through Ray (diffsynth.executor): the same bytes for 1, 2 and 3 workers, a worker killed mid-unit,
the coordinator killed with workers busy. Each test starts its own local Ray instance (`--workers N`)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    REPO,
    committed_units,
    outputs,
    recomputed,
    render_until_hang,
    run_cli,
    small_config,
    write_config,
)

pytest.importorskip("ray")


def ray_processes():
    """PIDs of the Ray processes that hold memory (raylet, GCS server, workers with their models) on this machine.
    (Ray's small agent processes notice on their own, within a few minutes, that their raylet is gone.)"""
    pattern = "raylet|gcs_server|ray::UnitWorker|ray::IDLE"
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return {int(pid) for pid in found.split()}


def render_with_workers(demo_assets, folder, workers, env=None):
    config = small_config(demo_assets, folder / "run")
    config["executor"] = {"workers": workers}
    path = write_config(folder / "config.yaml", config)
    result = run_cli("render", path, "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.mark.parametrize("workers", [3])  # 2 workers: the worker-kill and stop tests compare their bytes too
def test_workers_give_the_bytes_of_one(small_render, demo_assets, tmp_path, workers):
    run_dir = render_with_workers(demo_assets, tmp_path, workers)
    frames, video = outputs(run_dir)
    assert (frames, video) == outputs(small_render / "run")
    log = (run_dir / "render.log").read_text()
    assert f"executor: {workers} Ray worker(s)" in log
    # Every stage ran on the workers or here, and each unit was computed exactly once.
    assert sorted(committed_units(run_dir)) == sorted(committed_units(small_render / "run"))
    assert "nothing was computed" not in log and "WARNING" not in log


def test_one_worker_does_not_import_ray():
    code = "import sys, diffsynth.render, diffsynth.executor; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False", result.stderr


def test_worker_killed_mid_unit_is_replaced(small_render, demo_assets, tmp_path):
    marker = tmp_path / "killed"
    env = {"DIFFSYNTH_TEST_KILL_WORKER_AT": "smooth.final:2", "DIFFSYNTH_TEST_KILL_WORKER_ONCE": str(marker)}
    run_dir = render_with_workers(demo_assets, tmp_path, 2, env=env)
    assert marker.exists(), "no worker reached the kill point"
    assert outputs(run_dir) == outputs(small_render / "run")
    log = (run_dir / "render.log").read_text()
    assert "died" in log
    redispatched = [line for line in log.splitlines() if "re-dispatching smooth.final/" in line]
    assert redispatched, log[-2000:]


def test_coordinator_killed_with_workers_busy_resumes(small_render, demo_assets, tmp_path):
    config = small_config(demo_assets, tmp_path / "run")
    config["executor"] = {"workers": 2}
    path = write_config(tmp_path / "config.yaml", config)
    before_kill = ray_processes()
    render_until_hang(path, "denoise.001.windows:1")
    snapshot = committed_units(tmp_path / "run")
    assert snapshot and ("denoise.001.windows", "w00001.safetensors") not in snapshot
    # Ray's processes of the killed render go with it (its reaper), so nothing is left holding memory.
    deadline = time.time() + 60
    while ray_processes() - before_kill and time.time() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before_kill
    result = run_cli("render", path, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert recomputed(snapshot, committed_units(tmp_path / "run")) == []
    assert outputs(tmp_path / "run") == outputs(small_render / "run")


def test_a_read_the_stage_does_not_declare_is_reported():
    from diffsynth.executor import ShippedInputs

    shipped = ShippedInputs()
    shipped.units = {("crop", "000000.safetensors"): b"x"}
    assert shipped.read("crop", "000000.safetensors") == b"x"
    with pytest.raises(RuntimeError, match="crop/000001.safetensors.*does not declare"):
        shipped.read("crop", "000001.safetensors")


def test_missing_ray_is_one_line(monkeypatch):
    from diffsynth.errors import UserError
    from diffsynth.executor import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install"):
        import_ray()
    assert os.environ.get("DIFFSYNTH_TEST_HANG_AT") is None


def test_stop_signal_commits_what_was_computing_and_starts_nothing(small_render, demo_assets, tmp_path):
    """SIGTERM (Ray's core would abort on it; the runner's handler must win): exit 3, the units that were
    computing are committed and nothing new starts, then the same command finishes with the same bytes."""
    from diffsynth.executor import IN_FLIGHT

    config = small_config(demo_assets, tmp_path / "run")
    config["executor"] = {"workers": 2}
    path = write_config(tmp_path / "config.yaml", config)
    process = subprocess.Popen([sys.executable, "-m", "diffsynth", "render", str(path), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + 300
        while len(committed_units(tmp_path / "run")) < 40:
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        signalled_at = time.time()
        stderr = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted:")
    after_signal = [unit for unit, finished in committed_units(tmp_path / "run").items() if finished > signalled_at]
    assert len(after_signal) <= 2 * IN_FLIGHT + 1, after_signal  # in flight on the workers, and one unit here
    result = run_cli("render", path, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path / "run") == outputs(small_render / "run")


def test_no_cluster_at_the_address_is_one_line(demo_assets, tmp_path):
    path = write_config(tmp_path / "config.yaml", small_config(demo_assets, tmp_path / "run"))
    result = run_cli("render", path, "--no-progress", "--ray", "auto", env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot join the Ray cluster at executor.address 'auto'")
    assert "Traceback" not in result.stderr
