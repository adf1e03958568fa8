"""A disk that fills up mid-render, for real: a small tmpfs (root can mount one; elsewhere the injected-ENOSPC test
in test_cache.py covers the same path). The render stops with one line and exit code 2, keeps what it finished, and
once there is space the same command finishes with the bytes of an uninterrupted render."""

import os
import subprocess

import pytest
from helpers import committed_units, outputs, run_cli, small_config, write_config


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (test_cache.py injects ENOSPC instead)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_stops_with_one_line_and_the_same_command_finishes(demo_assets, small_render, small_disk,
                                                                        tmp_path):
    config = write_config(tmp_path / "config.yaml", small_config(demo_assets, small_disk / "run"))
    # --force: the 1 MB disk is below the planned peak, and the refusal up front (test_plan.py) is not what is
    # tested here; the disk has to fill up mid-render.
    result = run_cli("render", config, "--no-progress", "--force")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write") and "No space left" in lines[0], lines
    assert "run the same command again" in lines[0]
    finished = committed_units(small_disk / "run")
    assert finished, "the units finished before the disk filled up are recorded"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    result = run_cli("render", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    after = committed_units(small_disk / "run")
    assert all(after.get(unit) == finished_at for unit, finished_at in finished.items()), "finished units redone"
    assert outputs(small_disk / "run") == outputs(small_render / "run")
