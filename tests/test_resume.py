"""Resume after a real SIGKILL, in each kind of stage: the final frames and video are byte-identical to an
uninterrupted render, and the units finished before the kill are not recomputed."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, run_cli, small_config, write_config


def outputs(run_dir):
    run_dir = Path(run_dir)
    frames = {p.name: p.read_bytes() for p in sorted((run_dir / "frames").glob("*.png"))}
    return frames, (run_dir / "video.mp4").read_bytes()


@pytest.fixture(scope="module")
def reference(small_render):
    return outputs(small_render / "run")


def render_until_hang(config, hang_at, timeout=300):
    """Start a render that hangs mid-write at `hang_at`, then SIGKILL it. Returns the time of the kill."""
    env = dict(os.environ, DIFFSYNTH_TEST_HANG_AT=hang_at, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "diffsynth", "render", str(config), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    deadline = time.time() + timeout
    try:
        for line in process.stdout:
            if line.startswith("HANGING"):
                break
            assert time.time() < deadline, "render never reached the kill point"
        else:
            pytest.fail(f"render ended (exit {process.wait()}) before reaching {hang_at}")
        killed_at = time.time()
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        return killed_at
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("hang_at", ["decode:5", "annotate:4", "denoise.001.windows:2", "smooth.000.blend:9",
                                     "vae_decode:6", "smooth.final:20", "encode:13"])
def test_killed_render_resumes_to_identical_bytes(demo_assets, reference, tmp_path, hang_at):
    config = write_config(tmp_path / "config.yaml", small_config(demo_assets, tmp_path / "run"))
    killed_at = render_until_hang(config, hang_at)
    stage = hang_at.split(":")[0]
    db = sqlite3.connect(tmp_path / "run" / "manifest.sqlite")
    done_before = db.execute("SELECT stage, key, finished FROM units WHERE stage LIKE ?", (stage + "%",)).fetchall()
    db.close()
    if not stage.startswith("encode"):
        assert done_before, f"nothing of {stage} was finished before the kill"

    result = run_cli("render", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path / "run") == reference

    db = sqlite3.connect(tmp_path / "run" / "manifest.sqlite")
    for stage_name, key, finished in done_before:
        row = db.execute("SELECT finished FROM units WHERE stage = ? AND key = ?", (stage_name, key)).fetchone()
        retired = db.execute("SELECT retired FROM stages WHERE name = ?", (stage_name,)).fetchone()[0]
        assert retired or (row and row[0] == finished < killed_at), f"{stage_name}/{key} was recomputed"
    assert not list((tmp_path / "run").rglob("*.tmp")), "leftover temporary files"


def test_sigterm_stops_cleanly_with_exit_3_and_a_second_render_is_refused(demo_assets, small_render, tmp_path):
    config = write_config(tmp_path / "config.yaml", small_config(demo_assets, tmp_path / "run"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "diffsynth", "render", str(config), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        manifest = tmp_path / "run" / "manifest.sqlite"
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until the render is inside a stage, holding the lock
            if manifest.exists():
                db = sqlite3.connect(manifest)
                started = db.execute("SELECT COUNT(*) FROM units WHERE stage = 'crop'").fetchone()[0]
                db.close()
                if started:
                    break
            time.sleep(0.05)
        second = run_cli("render", config, "--no-progress")
        assert second.returncode == 2 and "in use" in second.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 3
        assert "interrupted" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    status = run_cli("status", tmp_path / "run", "--json")
    assert '"state": "interrupted"' in status.stdout
    assert run_cli("render", config, "--no-progress").returncode == 0
    assert outputs(tmp_path / "run") == outputs(small_render / "run")
