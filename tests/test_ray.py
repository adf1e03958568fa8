"""Many workers through Ray (diffsynth.executor): the same bytes for 1, 2 and 3 workers, a worker killed mid-unit,
the coordinator killed with workers busy. Each test starts its own local Ray instance (`--workers N`)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict, deque
from types import SimpleNamespace

import pytest
from helpers import (
    REPO,
    committed_units,
    outputs,
    recomputed,
    render_until_hang,
    run_cli,
    small_config,
    start_cli,
    write_config,
)

pytest.importorskip("ray")

import torch  # noqa: E402

from diffsynth.cache import bytes_to_tensors, tensors_to_bytes  # noqa: E402


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


def manifest_sizes(run_dir, stage_prefix):
    db = sqlite3.connect(f"file:{run_dir / 'manifest.sqlite'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT key, size FROM units WHERE stage LIKE ?", (stage_prefix,)).fetchall())
    finally:
        db.close()


def test_two_workers_send_each_byte_once_and_reuse_controlnet_across_a_block(demo_assets, tmp_path):
    """Counted in the run's record (status --json → last_render.executor): 2 workers, 20 frames, 4 windows a step
    (2 per worker's block), ControlNet groups of 4. The output's bytes against one worker's are compared by the
    worker-kill, coordinator-kill and stop tests."""
    config = small_config(demo_assets, tmp_path / "run", controlnet_batch_size=4, smoother_progress_ids=[])
    config["data"]["input_frames"]["end_frame_id"] = 20
    config["smoother_configs"] = []
    config["executor"] = {"workers": 2}
    result = run_cli("render", write_config(tmp_path / "config.yaml", config), "--no-progress")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    record = json.loads(run_cli("status", run_dir, "--json").stdout)["last_render"]
    executor, computed = record["executor"], record["computed_by_stage"]
    assert executor["workers"] == 2
    # Every unit not made here (decode + crop, encode) was dispatched once: no unit sent twice.
    assert executor["units_dispatched"] == record["computed"] - computed["crop"] - computed["encode"]
    assert executor["units_resent"] == 0
    # A worker's ready per-frame steps go as one task, and beside its windows (short and model-free).
    steps_computed = sum(n for name, n in computed.items() if name.startswith("denoise.") and name.endswith(".step"))
    assert executor["tasks_dispatched"] < executor["units_dispatched"]
    assert 0 < executor["units_model_free_lane"] <= steps_computed
    assert set(executor["busy_s"]) == {"0", "1"}
    assert all(seconds.get("denoise.000.windows", 0) > 0 for seconds in executor["busy_s"].values())
    # ControlNet: each frame evaluated once per step, but for the frames the two blocks' border windows share.
    frames, steps, block = 20, 2, 2
    assert 0 < executor["controlnet_frame_evaluations"] <= frames * steps * (1 + 1 / block)
    # Exactly as one process per block: each block's windows in order (windows of 8, stride 4), its first window
    # evaluates its 8 frames and each later one the 4 it does not share with the one before; a window taken from
    # another block may evaluate all its 8 again.
    assert executor["units_out_of_order"] == 0
    in_order = steps * 2 * (8 + (block - 1) * 4)
    taken = sum(n for name, n in executor["units_taken_by_stage"].items() if name.endswith(".windows"))
    assert in_order <= executor["controlnet_frame_evaluations"] <= in_order + 8 * taken, executor
    # Bytes: within 1.5× of the minimum (each latent in and out once per step, each window's ε out once, the
    # conditioning frames once per render).
    latents = manifest_sizes(run_dir, "denoise.001.step")
    latent_bytes = max(latents.values())
    shape = bytes_to_tensors((run_dir / "cache" / "denoise.001.step" / "000000.safetensors").read_bytes())["latent"]
    eps_bytes = len(tensors_to_bytes({"eps": torch.zeros(8, *shape.shape)}))
    conditioning = sum(manifest_sizes(run_dir, "crop").values()) + sum(manifest_sizes(run_dir, "annotate.%").values())
    minimum = steps * (2 * frames * latent_bytes + 4 * eps_bytes) + conditioning
    denoise = [name for name in computed if name.startswith("denoise.")]
    sent = sum(executor["bytes_to_workers_by_stage"].get(name, 0) for name in denoise)
    received = sum(executor["bytes_from_workers_by_stage"].get(name, 0) for name in denoise)
    assert received == steps * (frames * latent_bytes + 4 * eps_bytes)  # every result once, no more
    assert sent + received <= 1.5 * minimum, (sent, received, minimum)
    assert executor["inputs_referenced"] > 3 * executor["inputs_sent"]  # most inputs were held already
    # What a worker made reaches another from the object store, never read back from the run folder: only the
    # frames the render process decodes and crops are.
    assert set(executor["inputs_read_back_by_stage"]) == {"crop"}, executor["inputs_read_back_by_stage"]


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
    from diffsynth.executor import IN_FLIGHT, SHORT_IN_FLIGHT

    config = small_config(demo_assets, tmp_path / "run")
    config["executor"] = {"workers": 2}
    path = write_config(tmp_path / "config.yaml", config)
    process = start_cli("render", path, "--no-progress", stdout=subprocess.DEVNULL)
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
    # What was in flight on the workers when the stop was seen (at most IN_FLIGHT + SHORT_IN_FLIGHT each), and one
    # unit here: nothing new started.
    computing = [int(line.split("committing the ")[1].split()[0]) for line in
                 (tmp_path / "run" / "render.log").read_text().splitlines() if "stop requested" in line]
    assert len(computing) == 1 and computing[0] <= 2 * (IN_FLIGHT + SHORT_IN_FLIGHT), computing
    assert len(after_signal) <= computing[0] + 1, (after_signal, computing)
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


def test_more_workers_than_the_cluster_places_is_one_line(capsys):
    """Workers that cannot be placed would wait for ever: as many as fit start, and one line says why; none is a
    one-line error (exit code 2 from the CLI). In this process, on a one-CPU Ray instance (no render needed)."""
    import ray

    from diffsynth.config import ExecutorConfig
    from diffsynth.errors import UserError
    from diffsynth.executor import RayExecutor

    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with RayExecutor(ExecutorConfig(workers=3), "cpu", []) as executor:
            assert executor.workers == 1 and len(executor.actors) == 1
        line = "executor: 3 workers asked, 1 started: the cluster has 1 CPU, 0 GPU on 1 node(s), a worker needs 1 CPU"
        assert line in capsys.readouterr().err
        with pytest.raises(UserError, match=r"^no Ray worker can be placed: the cluster has 1 CPU, 0 GPU"):
            RayExecutor(ExecutorConfig(workers=2, gpus_per_worker=1), "cpu", []).__enter__()
    finally:
        ray.shutdown()


def test_workers_that_fit_are_counted_per_node():
    from diffsynth.executor import placeable_workers

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 3.0}},
             {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 4.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 8.0}}]
    assert placeable_workers(nodes, 1, 1) == 3 + 2  # the second node has CPUs for 2 of its 4 GPUs
    assert placeable_workers(nodes, 1, 0.5) == 6 + 2
    assert placeable_workers(nodes, 4, 0) == 4 + 0 + 2
    assert placeable_workers(nodes, 1, 0) == 26


def test_held_bytes_stay_within_their_bound():
    from diffsynth.executor import HeldBytes

    held = HeldBytes(10)
    for digest in "abcd":
        held.put(digest, digest * 4, 4)
    assert list(held.items) == ["c", "d"] and held.size == 8
    held.get("c")
    held.put("e", "eeee", 4)
    assert list(held.items) == ["c", "e"]
    held.put("big", "x" * 11, 11)  # larger than the bound: not kept, nothing dropped for it
    assert "big" not in held and held.size == 8


def test_a_window_keeps_controlnet_residuals_for_the_next_one_in_either_direction():
    """A Ray worker runs its block's windows backwards every other step (Walk.order): after each window the
    residuals kept are those the next window in the direction it goes can reuse; for its first, both neighbours'."""
    from diffsynth.schedule import sliding_windows
    from diffsynth.stages.denoise import DenoiseWindowsStage

    stage = DenoiseWindowsStage.__new__(DenoiseWindowsStage)  # only the window plan
    stage.windows = sliding_windows(40, 16, 8)  # [0, 16), [8, 24), [16, 32), [24, 40)
    assert stage.next_window_span(1) == (0, 32)  # first: windows 0 and 2
    assert stage.next_window_span(2) == (24, 40)  # forwards: window 3
    assert stage.next_window_span(3) == (40, 40)  # the last: nothing after it
    stage = DenoiseWindowsStage.__new__(DenoiseWindowsStage)
    stage.windows = sliding_windows(40, 16, 8)
    assert stage.next_window_span(3) == (16, 32)  # first, at the end: window 2 only
    assert stage.next_window_span(2) == (8, 24)  # backwards: window 1
    assert stage.next_window_span(1) == (0, 16)
    assert stage.next_window_span(0) == (16, 16)  # backwards past the first: nothing


def test_controlnet_residuals_stay_bounded_in_any_order():
    """What a worker keeps of a step's ControlNet residuals: the frames the next window can reuse (up to its last
    group), and at most STEPS_KEPT steps' worth, whatever order windows and steps arrive in."""
    from diffsynth.stages.denoise import ControlNetResiduals

    def residuals():
        stage = SimpleNamespace(controlnet_batch_size=4, control_sources=[object()])
        return ControlNetResiduals(stage, 40)

    steps = [residuals() for _ in range(3)]
    for step in steps:
        step._hold()
        step.kept = dict.fromkeys(range(0, 24))  # as if a window's groups had been computed
    assert not steps[0].kept and steps[1].kept and steps[2].kept  # only the two most recent steps hold any
    steps[2].keep_for(18, 26)
    assert sorted(steps[2].kept) == list(range(18, 24))  # the next window's frames, up to its last group (28)
    steps[1].keep_for(2, 10)  # a window arriving out of order drops what the later window had left
    assert sorted(steps[1].kept) == list(range(2, 12))


def test_a_lost_input_is_sent_again_from_the_run_folder_without_counting_an_attempt():
    """Results are sent on from the object store (the coordinator owns them); a node that went away takes the ones
    it stored. The unit that could not fetch one is sent again, its inputs read from the run folder, and that is not
    one of its three attempts (only the unit's own failures are)."""
    import ray

    from diffsynth.executor import SHARED_REFS_BYTES, ExecutorCounts, HeldBytes, Walk

    walk = Walk.__new__(Walk)  # only the state a failed unit touches
    walk.ray, walk.counts = ray, ExecutorCounts(2)
    walk.position, walk.block, walk.order = {"s": 0}, {"s": {"k": 0}}, {}
    walk.ready, walk.is_ready, walk.attempts = [[deque(), deque()]], set(), defaultdict(int)
    walk.held, walk.load = [HeldBytes(1 << 20), HeldBytes(1 << 20)], [[0, 0], [0, 0]]
    walk.shared_refs = HeldBytes(SHARED_REFS_BYTES)
    walk.shared_refs.put("digest", "a reference", 10)
    lost = ray.exceptions.ObjectLostError("00" * 28, None, "")
    walk._unit_failed(1, "s", ["k"], ray.exceptions.RayTaskError("compute", "traceback", lost))
    assert "digest" not in walk.shared_refs and walk.counts.units_resent == 1
    assert list(walk.ready[0][0]) == ["k"] and not walk.attempts
    # Any other failure is an attempt of the unit's, and what the store holds stays usable.
    walk.shared_refs.put("digest", "a reference", 10)
    walk._unit_failed(1, "s", ["k"], ray.exceptions.RayTaskError("compute", "traceback", ValueError("boom")))
    assert walk.attempts[("s", "k")] == 1 and "digest" in walk.shared_refs


def test_a_model_free_unit_runs_beside_a_long_one_on_its_worker(tmp_path):
    """A worker's second lane: a frame's step (short, model-free) sent to a worker whose window is computing runs
    at once, not behind it. The long unit here waits until the test has the short one's result (up to 60 s): in
    one lane the short one would only come after it."""
    import ray

    from diffsynth.cache import checksum
    from diffsynth.config import ExecutorConfig
    from diffsynth.executor import LANE, MODEL_FREE_LANE, RayExecutor
    from diffsynth.stages.base import Stage

    release = str(tmp_path / "release")

    class Waits(Stage):
        name = "waits"

        def compute(self, key):
            deadline = time.time() + 60
            while not os.path.exists(release) and time.time() < deadline:
                time.sleep(0.05)
            return b"long " + key.encode(), None

    class Adds(Stage):
        name = "adds"
        model_free = True

        def compute(self, key):
            return b"short " + key.encode(), None

    ctx = SimpleNamespace(cache=None)
    with RayExecutor(ExecutorConfig(workers=1, cpus_per_worker=1), "cpu", [Waits(ctx), Adds(ctx)]) as executor:
        actor = executor.actors[0]
        ray.get(actor.pid.remote(), timeout=300)  # started
        long_records, long_data = actor.compute.options(num_returns=2, concurrency_group=LANE).remote(
            "waits", ["a"], {})
        short_records, short_data = actor.compute.options(num_returns=2, concurrency_group=MODEL_FREE_LANE).remote(
            "adds", ["b"], {})
        assert bytes(ray.get(short_data, timeout=50)) == b"short b"
        assert ray.wait([long_data], timeout=0)[0] == []  # the long one is still computing
        (path, digest, work), = ray.get(short_records)
        assert digest == checksum(b"short b") and path is None
        open(release, "w").close()
        assert bytes(ray.get(long_data, timeout=120)) == b"long a"


def test_an_idle_worker_takes_a_window_only_after_a_window_s_time_and_the_last_in_its_owners_order():
    """A block turning round at a step's end has its whole next step ready at once while its neighbour waits a
    moment for its own first window: that neighbour must not take from it then. Once idle for a window's time it
    takes the one farthest from where the owner works: of a stage running backwards, the lowest window."""
    from diffsynth.executor import ExecutorCounts, HeldBytes, Walk

    class Windows:
        name, on_coordinator, model_free, runs_in_order = "w", False, False, True

        def reads(self, key):
            return []

    stage = Windows()
    keys = [f"w{j:05d}" for j in range(12)]
    walk = Walk.__new__(Walk)  # only the state taking reads
    walk.stages, walk.by_name, walk.counts = [stage], {"w": stage}, ExecutorCounts(2)
    walk.order = {"w": {key: -j for j, key in enumerate(keys)}}  # a step running backwards
    walk.ready, walk.is_ready = [[deque(), deque(keys[6:])]], {("w", key) for key in keys[6:]}  # worker 1's block
    walk.stage_seconds, walk.kind_seconds = {"w": (5.0, 10)}, {}  # 0.5 s a window
    walk.fetched_bytes, walk.fetch_seconds = 0, 0.0
    walk.held = [HeldBytes(1 << 20), HeldBytes(1 << 20)]
    walk.idle_since = [time.monotonic(), 0.0]
    assert walk._taken_unit(0) is None  # idle for less than a window
    walk.idle_since[0] = time.monotonic() - 1.0
    assert walk._taken_unit(0) == (stage, "w00006")
    assert walk.counts.taken_by_stage["w"] == 1 and "w00006" not in walk.ready[0][1]
