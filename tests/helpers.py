"""Helpers shared by the test modules (imported as `helpers`; conftest.py holds the fixtures)."""

import atexit
import json
import os
import random
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def small_config(demo_assets, output_folder, **pipeline_inputs):
    """A fast render config on the demo assets: 12 frames at 64×64, two sliding windows, tile + canny, FastBlend
    on x0 after the first step and on the final frames, one shot (data.shots: none). The UNet takes a whole window per call (unet_batch_size 8):
    chunked calls give the same bits on the CPU (tests/test_unet_chunks.py) at about twice the time."""
    models = demo_assets / "models"
    inputs = {"prompt": "a toon cat", "negative_prompt": "blurry", "cfg_scale": 7.0, "clip_skip": 2,
              "num_inference_steps": 2, "animatediff_batch_size": 8, "animatediff_stride": 4,
              "unet_batch_size": 8, "controlnet_batch_size": 16, "smoother_progress_ids": [0, -1]}
    inputs.update(pipeline_inputs)
    return {
        "models": {"model_list": [str(models / "stable_diffusion"), str(models / "motion_adapter")],
                   "controlnet_units": [
                       {"processor_id": "tile", "model_path": str(models / "controlnet_tile"), "scale": 0.5},
                       {"processor_id": "canny", "model_path": str(models / "controlnet_canny"), "scale": 0.5}],
                   "device": "cpu"},
        "data": {"input_frames": {"video_file": str(demo_assets / "clip.mp4"), "width": 64, "height": 64,
                                  "start_frame_id": 0, "end_frame_id": 12},
                 # One shot, as the original: the shots stage has its own tests (tests/test_shots.py, which also
                 # shows auto gives this render's bytes on this clip without cuts).
                 "output_folder": str(output_folder), "shots": "none"},
        "pipeline": {"seed": 3, "pipeline_inputs": inputs},
        "smoother_configs": [{"processor_type": "FastBlend", "config": {
            "inference_mode": "fast", "window_size": 3, "minimum_patch_size": 3, "num_iter": 2}}],
    }


def write_config(path, config):
    path = Path(path)
    path.write_text(yaml.safe_dump(config))
    return path


# `python -m diffsynth` processes are forked from one process that has imported the program (tests/
# cli_forkserver.py): ~9 s of imports saved per process. Set DIFFSYNTH_TESTS_FRESH_PROCESSES=1 to start real ones.
FRESH_PROCESSES = os.environ.get("DIFFSYNTH_TESTS_FRESH_PROCESSES") == "1"
_forkserver = {}


def _forkserver_socket():
    """The fork server's socket path, starting the server on first use (one per pytest process) and again if it
    died (a test's failure then stays that test's)."""
    if "socket" not in _forkserver or _forkserver["server"].poll() is not None:
        folder = tempfile.mkdtemp(prefix="diffsynth-forkserver-")
        path = os.path.join(folder, "socket")
        server = subprocess.Popen([sys.executable, "-u", str(REPO / "tests" / "cli_forkserver.py"), path],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=REPO)
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the test fork server did not start (exit {server.wait()})")

        def stop():
            server.kill()
            server.wait()
            shutil.rmtree(folder, ignore_errors=True)
        atexit.register(stop)
        _forkserver.update(socket=path, server=server)
    return _forkserver["socket"]


class ForkedCli:
    """A `python -m diffsynth ARGS` process forked by the fork server, with the parts of subprocess.Popen the
    tests use: pid, stdout/stderr (PIPE, DEVNULL or inherited), poll, wait, communicate, send_signal, kill."""

    def __init__(self, args, env, stdout, stderr, text):
        self.args, self.returncode, self._buffer = args, None, b""
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connection.connect(_forkserver_socket())
        child_ends = [os.open(os.devnull, os.O_RDONLY)]
        self.stdout = self.stderr = None
        for name, spec, inherited in (("stdout", stdout, 1), ("stderr", stderr, 2)):
            if spec == subprocess.PIPE:
                read_end, write_end = os.pipe()
                setattr(self, name, open(read_end, "r" if text else "rb"))
                child_ends.append(write_end)
            elif spec == subprocess.DEVNULL:
                child_ends.append(os.open(os.devnull, os.O_WRONLY))
            else:
                child_ends.append(os.dup(inherited))
        request = json.dumps({"argv": list(args), "env": env, "cwd": str(REPO)}).encode()
        socket.send_fds(self._connection, [request], child_ends)
        for descriptor in child_ends:
            os.close(descriptor)
        self.pid = int(self._read_line(None).split()[1])

    def _read_line(self, timeout):
        """The server's next line; None if it has not come within `timeout` seconds (None: wait for it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                return None
            chunk = self._connection.recv(4096)
            if not chunk:
                raise RuntimeError("the test fork server went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _exit_code(self, timeout):
        """The exit code once the server has reported it (None if not within `timeout` seconds)."""
        if self.returncode is None:
            line = self._read_line(timeout)
            if line is not None:
                self.returncode = int(line.split()[1])
                self._connection.close()
        return self.returncode

    def poll(self):
        return self._exit_code(0)

    def wait(self, timeout=None):
        if self._exit_code(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout=None):
        read = {}
        readers = [threading.Thread(target=lambda name, pipe: read.__setitem__(name, pipe.read()), args=(name, pipe),
                                    daemon=True)
                   for name, pipe in (("stdout", self.stdout), ("stderr", self.stderr))
                   if pipe is not None and not pipe.closed]
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        return read.get("stdout"), read.get("stderr")

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def start_cli(*args, env=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, fresh=False):
    """Start `python -m diffsynth ARGS` in the repository with os.environ + PYTHONUNBUFFERED + `env`: forked by the
    fork server, or a real process with `fresh` (or DIFFSYNTH_TESTS_FRESH_PROCESSES=1)."""
    args = [str(arg) for arg in args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if fresh or FRESH_PROCESSES:
        return subprocess.Popen([sys.executable, "-m", "diffsynth", *args], stdout=stdout, stderr=stderr,
                                text=text, env=full_env, cwd=REPO)
    return ForkedCli(args, full_env, stdout, stderr, text)


def run_cli(*args, env=None, timeout=600, fresh=False):
    """Run `python -m diffsynth ARGS` to its end (see start_cli); returns a CompletedProcess (text)."""
    process = start_cli(*args, env=env, fresh=fresh)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def outputs(run_dir):
    run_dir = Path(run_dir)
    frames = {p.name: p.read_bytes() for p in sorted((run_dir / "frames").glob("*.png"))}
    return frames, (run_dir / "video.mp4").read_bytes()


def render_until_hang(config, hang_at, timeout=300):
    """Start a render that hangs mid-write at `hang_at`, then SIGKILL it. Returns the time of the kill."""
    return command_until_hang(["render", config, "--no-progress"], hang_at, timeout)


def command_until_hang(args, hang_at, timeout=300):
    """Start `python -m diffsynth ARGS` hanging mid-write at `hang_at`, then SIGKILL it. Returns the time of the
    kill."""
    process = start_cli(*args, env={"DIFFSYNTH_TEST_HANG_AT": hang_at}, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        for line in process.stdout:
            if line.startswith("HANGING"):
                break
            assert time.time() < deadline, f"{args[0]} never reached the kill point"
        else:
            pytest.fail(f"{args[0]} ended (exit {process.wait()}) before reaching {hang_at}")
        killed_at = time.time()
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        return killed_at
    finally:
        if process.poll() is None:
            process.kill()


def committed_units(run_dir):
    """{(stage, key): finish time} of every committed unit, kept or released; {} before the render has made its
    manifest (a kill during start-up). Read-only: never creates a manifest."""
    from diffsynth.cache import open_manifest
    manifest = Path(run_dir) / "manifest.sqlite"
    if not manifest.is_file():
        return {}
    db = open_manifest(run_dir, read_only=True)  # creates no -wal/-shm (SQLite's plain mode=ro would)
    try:
        rows = db.execute("SELECT stage, key, finished FROM units").fetchall()
    except sqlite3.OperationalError:  # the file exists, its tables not yet
        rows = []
    finally:
        db.close()
    return {(stage, key): finished for stage, key, finished in rows}


def recomputed(before, after):
    """Units committed in `before` whose row is gone or was written again in `after`."""
    return sorted(unit for unit, finished in before.items() if after.get(unit) != finished)


def kill_chain(config, run_dir, kill_points):
    """Kill a render at each point in turn (each run resuming the last), then finish it. Returns {kill point or
    "final resume": the committed units that run computed again}, counted from the manifest."""
    redone, before = {}, {}
    for kill_point in kill_points:
        render_until_hang(config, kill_point)
        after = committed_units(run_dir)
        redone[kill_point] = recomputed(before, after)
        before = after
    result = run_cli("render", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    redone["final resume"] = recomputed(before, committed_units(run_dir))
    return redone


def kept_files(run_dir):
    """{(stage, key): path} of every unit whose file is kept on disk."""
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    rows = db.execute("SELECT stage, key, path FROM units WHERE size >= 0").fetchall()
    db.close()
    return {(stage, key): run_dir / path for stage, key, path in rows}


def released_units(run_dir):
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    rows = db.execute("SELECT stage, key FROM units WHERE size < 0").fetchall()
    db.close()
    return set(rows)


def damage(path, how):
    data = path.read_bytes()
    if how == "flip":  # same size: only the checksum can tell
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.unlink()


def pick_damage(run_dir, count, seed):
    """`count` kept units, spread over the stages (round-robin over stages in a seeded order), each with a kind of
    damage."""
    rng = random.Random(seed)
    by_stage = {}
    for unit in sorted(kept_files(run_dir)):
        by_stage.setdefault(unit[0], []).append(unit)
    stages = sorted(by_stage)
    rng.shuffle(stages)
    chosen = []
    while len(chosen) < count:
        for stage in stages:
            candidates = [unit for unit in by_stage[stage] if unit not in chosen]
            if candidates and len(chosen) < count:
                chosen.append(rng.choice(candidates))
    return [(unit, ("flip", "truncate", "delete")[index % 3]) for index, unit in enumerate(chosen)]


def unit_files(run_dir):
    """Every file a render's units own on disk (cache/, frames/, video.mp4), as paths relative to the run folder."""
    run_dir = Path(run_dir)
    found = {str(p.relative_to(run_dir)) for folder in ("cache", "frames") if (run_dir / folder).is_dir()
             for p in (run_dir / folder).rglob("*") if p.is_file()}
    return found | ({"video.mp4"} if (run_dir / "video.mp4").is_file() else set())


def kept_by_stage(run_dir):
    """{stage: number of units whose file is kept}, from the manifest (stages with none kept are absent)."""
    db = sqlite3.connect(Path(run_dir) / "manifest.sqlite")
    rows = db.execute("SELECT stage, COUNT(*) FROM units WHERE size >= 0 GROUP BY stage").fetchall()
    db.close()
    return dict(rows)


def folder_bytes(run_dir):
    """Every byte in the run folder: the units' files and its own (manifest.sqlite and its -wal/-shm, render.log,
    config.json, the lock)."""
    return sum(path.stat().st_size for path in Path(run_dir).rglob("*") if path.is_file())


def render_measuring_disk(config_data):
    """Render `config_data` (a config dict) in this process, measuring the disk for real: after every unit write,
    release, retire and forget, every file in the run folder is summed (the folder walked, not the manifest; the
    manifest's WAL too). Returns (peak bytes, final bytes)."""
    from diffsynth import cache as cache_module
    from diffsynth.config import parse_config
    from diffsynth.render import render

    config = parse_config(config_data)
    run_dir = Path(config.data.output_folder)
    samples = [0]

    def measured(method):
        def wrapper(self, *args, **kwargs):
            result = method(self, *args, **kwargs)
            samples.append(folder_bytes(run_dir))
            return result
        return wrapper

    originals = {name: getattr(cache_module.RunCache, name)
                 for name in ("write", "release_units", "retire_stage", "forget_units")}
    try:
        for name, method in originals.items():
            setattr(cache_module.RunCache, name, measured(method))
        render(config, progress=False)
    finally:
        for name, method in originals.items():
            setattr(cache_module.RunCache, name, method)
    return max(samples), folder_bytes(run_dir)  # the end: after the render closed its manifest
