"""Resume after a real SIGKILL, in each kind of stage: the final frames and video are byte-identical to an
uninterrupted render, and the units finished before the kill are not recomputed."""

import signal
import sqlite3
import subprocess
import time

import pytest
from helpers import (
    committed_units,
    outputs,
    recomputed,
    render_until_hang,
    run_cli,
    small_config,
    start_cli,
    write_config,
)


@pytest.fixture(scope="module")
def reference(small_render):
    return outputs(small_render / "run")


# One kill per resume from a fresh folder, in the stages the small config has and the four-step kill chain of
# tests/test_rework.py (which kills crop, annotate, vae_decode and smooth.final too, counting units redone) has not:
# denoising step 1, the in-loop smoothing at step 0, and the video being encoded late.
@pytest.mark.parametrize("hang_at", ["denoise.001.windows:2", "smooth.000.blend:9", "encode:13"])
def test_killed_render_resumes_to_identical_bytes(demo_assets, reference, tmp_path, hang_at):
    config = write_config(tmp_path / "config.yaml", small_config(demo_assets, tmp_path / "run"))
    render_until_hang(config, hang_at)
    stage = hang_at.split(":")[0]
    done_before = committed_units(tmp_path / "run")
    if not stage.startswith("encode"):
        assert any(name.startswith(stage) for name, _ in done_before), f"nothing of {stage} was finished"

    result = run_cli("render", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path / "run") == reference
    # Every unit committed before the kill, in any stage, kept or released, still has its row and finish time.
    assert len(recomputed(done_before, committed_units(tmp_path / "run"))) <= 1
    assert not list((tmp_path / "run").rglob("*.tmp")), "leftover temporary files"


def test_sigterm_stops_cleanly_with_exit_3_and_a_second_render_is_refused(demo_assets, tmp_path):
    # The demo's whole clip (48 frames) one frame per UNet call: a render long enough to still be running when the
    # second one has started (the 12-frame one could finish first).
    data = small_config(demo_assets, tmp_path / "run", unet_batch_size=1)
    data["data"]["input_frames"]["end_frame_id"] = 48
    config = write_config(tmp_path / "config.yaml", data)
    process = start_cli("render", config, "--no-progress", stdout=subprocess.DEVNULL)
    try:
        manifest = tmp_path / "run" / "manifest.sqlite"
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until the render is inside a stage, holding the lock
            if manifest.exists():
                db = sqlite3.connect(manifest)
                try:
                    started = db.execute("SELECT COUNT(*) FROM units WHERE stage = 'crop'").fetchone()[0]
                except sqlite3.OperationalError:  # the render created the file but not yet its tables
                    started = 0
                finally:
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
    done_before = committed_units(tmp_path / "run")
    assert run_cli("render", config, "--no-progress").returncode == 0
    assert recomputed(done_before, committed_units(tmp_path / "run")) == []
    assert (tmp_path / "run" / "video.mp4").is_file()
