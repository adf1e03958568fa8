"""The tests' fork server (tests/cli_forkserver.py) must give what a real `python -m diffsynth` gives: the same
stdout, stderr and exit code, the caller's environment, and a pid of its own that a signal really ends."""

import signal

from helpers import run_cli, small_config, start_cli, write_config


def test_a_forked_command_prints_and_exits_as_a_real_process(small_render, tmp_path):
    for args in [("status", small_render / "run"), ("render", tmp_path / "missing.yaml"), ("render", "--nope")]:
        forked, real = run_cli(*args), run_cli(*args, fresh=True)
        assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr), args
    assert run_cli("render", tmp_path / "missing.yaml").returncode == 2


def test_a_forked_command_sees_the_callers_environment_and_dies_of_a_signal(demo_assets, tmp_path):
    # The kill point comes only through the environment given for this process: without it the render would end.
    config = write_config(tmp_path / "config.yaml", small_config(demo_assets, tmp_path / "run"))
    process = start_cli("render", config, "--no-progress",
                        env={"DIFFSYNTH_TEST_HANG_AT": "crop:1"})
    line = process.stdout.readline()
    assert line.startswith("HANGING"), line
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
