"""Many workers: the units run on Ray actors, the render process stays the coordinator.

The coordinator alone owns the run folder, its lock and the manifest. Workers are Ray actors holding a copy of the
stages; they load the models once, on first use. A unit's inputs travel to the worker and its result's bytes come
back through Ray's object store, so workers need no shared filesystem; the coordinator writes atomically and commits
each result exactly as the in-process runner does, in whatever order results arrive.

Each byte once: a worker keeps the bytes it was sent and the results it computed (`HeldBytes`, bounded by
executor.cache_per_worker_gb), keyed by their checksum; the coordinator keeps a slightly smaller mirror of what each
worker holds, and sends a checksum instead of bytes the worker has. A worker that no longer has one (the mirror is
conservative, not exact) says so and gets the unit again with its bytes; a replaced worker starts with an empty
mirror. Bytes sent to several workers are put into Ray's object store once (`ray.put`).

Locality: each stage's units are cut into one contiguous block per worker (by position in the stage's unit list, so
frame i's latent, the windows holding frame i and frame i's step unit fall in the same block of every stage; a frame's
step goes with the window that makes it ready, so that no ε travels for it), and a
worker computes its own block's units, taking another's only when it has nothing of its own and that is sooner than
its owner reaching it, counting what must be sent for it (from the far end of the longest queue). A stage whose
units reuse what the one before computed (`Stage.runs_in_order`: the windows and their ControlNet residuals) is
given to a worker in its block's order, as one process computes it, not in the order units get ready, every other
such stage backwards (a snake: turning round, a block's first window of a step reads its own last window of the step
before, not the neighbouring block's, and no block waits on the one before it step after step). So a worker reuses its
ControlNet residuals as one process does, and it mostly holds every input of its units already: its own results.
A per-frame step unit runs where its windows' ε are (no ε is sent but at the blocks' borders).

Scheduling rests on the one declaration of what a unit reads (`Stage.reads`): a unit is dispatched as soon as every
unit it reads is done, not stage by stage, so the windows of step k+1 start while step k finishes elsewhere.
Each worker holds at most `IN_FLIGHT` units (one computing, one waiting, so it never idles on the coordinator), and
up to `SHORT_IN_FLIGHT` more of the stages measured to be short (a frame's step: the ones a finished window makes
ready go together, not one round trip after another).
Stages marked `on_coordinator` (decoding a local file in order, encoding the video) run here, one unit at a time
between dispatches.

Checksums: a worker returns its result's checksum with it; the coordinator checks the size and records that
checksum (hashing ~GB per step again here would be its biggest cost). A byte changed on the way would fail the
checksum every read does, and the unit would be recomputed.

Faults: a worker that dies (killed, node lost) is replaced and its in-flight units are dispatched again; a unit that
raises (e.g. CUDA out of memory) is tried again on another worker, up to `ATTEMPTS` times. A coordinator that dies
is resumed by running the same command. A stop request (Ctrl-C) dispatches nothing more, commits the results still
arriving and stops. What was sent, computed and held is counted (`ExecutorCounts`) into the run's `last_render`.

Same bytes: every unit's result depends only on its inputs and its key (per-frame, per-step seeds), so the output
is byte-identical whatever the number of workers, on the same kind of device.
"""

import heapq
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict, defaultdict, deque

import numpy as np
import torch
from tqdm import tqdm

from .cache import RELEASED, CorruptUnit, checksum
from .errors import Interrupted, UserError
from .runner import _pending, _recompute_released_inputs, _retire_finished_inputs, first_few, write_unit

log = logging.getLogger("diffsynth")

IN_FLIGHT = 2
# Units measured to take under SHORT_UNIT_S (a frame's combine + DDIM step: ms) do not count in IN_FLIGHT: up to
# SHORT_IN_FLIGHT of them more are sent to a worker at once, so the per-frame steps a finished window makes ready are
# queued on it together, not sent one round trip after another while the next step's windows wait for them.
SHORT_UNIT_S = 0.05
SHORT_IN_FLIGHT = 16
ATTEMPTS = 3
TEST_ENV_PREFIX = "DIFFSYNTH_TEST_"
MIRROR_SHARE = 0.9  # the coordinator believes a worker holds only this share of what it keeps (orders differ a bit)
TAKE_BYTES_PER_S = 1e9  # what a worker taking another's unit assumes its missing inputs take to reach it (~10 Gb/s)
SHARED_REFS_BYTES = 512 << 20  # bytes the coordinator keeps in Ray's object store for the next worker needing them
LANE, MODEL_FREE_LANE = "units", "model_free"  # a worker's concurrency groups (UnitWorker)


class HeldBytes:
    """Bytes (or, in the coordinator's mirror, only sizes) by checksum, least recently used dropped beyond
    `capacity` bytes."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.items = OrderedDict()  # checksum → (value, size)
        self.size = 0

    def __contains__(self, digest):
        return digest in self.items

    def get(self, digest):
        self.items.move_to_end(digest)
        return self.items[digest][0]

    def clear(self):
        self.items.clear()
        self.size = 0

    def put(self, digest, value, size):
        if digest in self.items:
            self.items.move_to_end(digest)
            return
        if size > self.capacity:
            return
        self.items[digest] = (value, size)
        self.size += size
        while self.size > self.capacity:
            self.size -= self.items.popitem(last=False)[1][1]


class NotHeld(Exception):
    """A worker was sent a checksum for bytes it no longer holds: the coordinator sends the unit again, with them."""


class ShippedInputs:
    """A worker's stand-in for the run's cache: serves the inputs shipped with the unit being computed (by this
    thread: a worker computes a model-free unit beside one using the models). A read of anything else is a stage
    that reads more than it declares, reported as such (it would break resume too)."""

    def __init__(self):
        self.computing = threading.local()
        self.prefetched = {}

    @property
    def units(self):
        return getattr(self.computing, "units", {})

    @units.setter
    def units(self, units):
        self.computing.units = units

    def read(self, stage, key):
        try:
            return self.units[(stage, key)]
        except KeyError:
            raise RuntimeError(f"a unit read {stage}/{key}, which its stage's reads() does not declare") from None


class UnitWorker:
    """A Ray actor: computes units of any stage from the inputs sent or held. (Decorated with ray.remote on use, so
    importing this module never imports Ray.) Two lanes (Ray concurrency groups of one thread each): units in the
    order sent, and beside them short model-free ones (a frame's step), which the next step's windows wait for and
    which would otherwise wait behind the window queued next. One stage's units never run at once."""

    def __init__(self, stages, threads, cache_bytes):
        import ray
        import torch
        torch.set_num_threads(threads)  # the render process's count: it is part of the CPU's fingerprint (low bits)
        self.ray = ray
        self.stages = {stage.name: stage for stage in stages}
        self.shipped = ShippedInputs()
        for stage in stages:
            stage.ctx.cache = self.shipped
        self.held = HeldBytes(cache_bytes)
        self.computed = 0
        self.lock = threading.Lock()  # the held bytes and the count, shared by the lanes
        self.stage_locks = {stage.name: threading.Lock() for stage in stages}

    def compute(self, stage_name, keys, inputs):
        """Computes the units `keys` of one stage, in order: usually one; several short ones sent as one task (the
        per-frame steps a finished window made ready: a Ray task costs about a millisecond of each side's CPU,
        more than such a unit's work). `inputs`: the union of their inputs, (input stage, key) → (checksum,
        [ObjectRef of its bytes] or None when this worker holds them); each unit is served only its own
        (`Stage.reads`). Returns len(keys) + 1 objects (called with num_returns): a list of (path, checksum,
        {"busy_s": …, "fetch_s": …, "fetched_bytes": …, work counted by the stage}) per unit, the seconds
        computing it (the first unit's include fetching the sent inputs, of which fetch_s), then each unit's bytes
        as a uint8 array. The bytes are their own objects so that the coordinator can send them on to the next
        worker that reads them, without reading them back from the run folder."""
        started = time.perf_counter()
        with self.lock:
            missing = [unit for unit, (digest, sent) in inputs.items() if sent is None and digest not in self.held]
            if missing:
                raise NotHeld(f"{len(missing)} input(s) no longer held, e.g. {'/'.join(missing[0])}")
            available = {unit: self.held.get(digest) for unit, (digest, ref) in inputs.items() if ref is None}
        sent = [(unit, digest, sent[0]) for unit, (digest, sent) in inputs.items() if sent is not None]
        fetch_started = time.perf_counter()
        for (unit, digest, _), data in zip(sent, self.ray.get([ref for *_, ref in sent])):
            if isinstance(data, np.ndarray):  # another worker's result, sent on as it came (a read-only view)
                data = data.tobytes()
            available[unit] = data
            with self.lock:
                self.held.put(digest, data, len(data))
        timing = {"fetch_s": time.perf_counter() - fetch_started,
                  "fetched_bytes": sum(len(available[unit]) for unit, *_ in sent)}
        stage = self.stages[stage_name]
        records, results = [], []
        for key in keys:
            with self.lock:
                self.computed += 1
                computed = self.computed
            _test_kill_point(stage_name, computed)
            with self.stage_locks[stage_name]:
                counted = dict(getattr(stage, "counts", {}))
                self.shipped.units = {(upstream.name, upstream_key): available[(upstream.name, upstream_key)]
                                      for upstream, upstream_key in stage.reads(key)}
                try:
                    data, path = stage.compute(key)
                finally:
                    self.shipped.units = {}
                counts = {name: value - counted.get(name, 0) for name, value in getattr(stage, "counts", {}).items()}
            digest = checksum(data)
            with self.lock:
                self.held.put(digest, data, len(data))
            finished = time.perf_counter()
            records.append((path, digest, {"busy_s": finished - started, **timing, **counts}))
            started, timing = finished, {"fetch_s": 0.0, "fetched_bytes": 0}
            # As an array: Ray hands the coordinator a view of the object store's copy (no copy into its heap),
            # which it writes to the run folder from there.
            results.append(np.frombuffer(data, dtype=np.uint8))
        return (records, *results)

    def pid(self):
        return os.getpid()


def _test_kill_point(stage_name, computed):
    """Tests: DIFFSYNTH_TEST_KILL_WORKER_AT=stage_prefix:n SIGKILLs the worker at its n-th unit of that stage (once
    per render: the first worker to claim the marker file DIFFSYNTH_TEST_KILL_WORKER_ONCE)."""
    spec, marker = os.environ.get("DIFFSYNTH_TEST_KILL_WORKER_AT"), os.environ.get("DIFFSYNTH_TEST_KILL_WORKER_ONCE")
    if not spec or not marker:
        return
    prefix, _, count = spec.rpartition(":")
    if stage_name.startswith(prefix) and computed >= int(count):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("executor.workers > 1 and executor.address need Ray: pip install 'diffsynth-disk-cache[ray]' "
                        "(or pip install ray), or set executor.workers to 1") from None
    return ray


def placeable_workers(nodes, cpus_per_worker, gpus_per_worker):
    """How many workers of `cpus_per_worker` CPUs and `gpus_per_worker` GPUs fit on the alive nodes of `nodes`
    (ray.nodes()): a worker is placed on one node, so each node's share is counted on its own."""
    total = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        resources = node.get("Resources", {})
        fits = int(resources.get("CPU", 0) / cpus_per_worker + 1e-9)
        if gpus_per_worker:
            fits = min(fits, int(resources.get("GPU", 0) / gpus_per_worker + 1e-9))
        total += fits
    return total


class ExecutorCounts:
    """What a render on Ray sent, computed and spent, for `last_render.executor` in the run's record (status)."""

    def __init__(self, workers):
        self.workers = workers
        self.bytes_to_workers = defaultdict(int)    # by the stage of the unit the bytes were sent for
        self.bytes_from_workers = defaultdict(int)  # by the stage of the unit computed
        self.units_dispatched = 0
        self.tasks_dispatched = 0    # Ray tasks: a worker's ready short units go together (UnitWorker.compute)
        self.units_model_free_lane = 0  # units run beside the worker's others (short, model-free: a frame's step)
        self.inputs_sent = 0         # inputs sent as bytes
        self.inputs_referenced = 0   # inputs the worker held: only their checksum was sent
        # Inputs sent that were read back from the run folder, by their stage: those made here (a worker's results
        # are sent on from the object store while the coordinator keeps them, SHARED_REFS_BYTES)
        self.inputs_read_back = defaultdict(int)
        self.units_resent = 0        # a worker no longer held an input the coordinator thought it had
        self.taken_by_stage = defaultdict(int)  # units a worker took from another's block (it had nothing of its own)
        self.units_out_of_order = 0  # units of a stage that runs in order sent before their turn (nothing else could run)
        self.work = defaultdict(int)  # counted by the stages on the workers (controlnet_frame_evaluations)
        self.busy_s = defaultdict(lambda: defaultdict(float))  # worker → stage → seconds computing
        self.coordinator_s = defaultdict(float)  # the coordinator's own work: inputs, results, commit
        self.units_committed = 0

    def record(self):
        committed = max(1, self.units_committed)
        return {
            "workers": self.workers,
            "bytes_to_workers": sum(self.bytes_to_workers.values()),
            "bytes_from_workers": sum(self.bytes_from_workers.values()),
            "units_dispatched": self.units_dispatched, "tasks_dispatched": self.tasks_dispatched,
            "units_model_free_lane": self.units_model_free_lane,
            "controlnet_frame_evaluations": self.work.get("controlnet_frame_evaluations", 0),
            "inputs_sent": self.inputs_sent, "inputs_referenced": self.inputs_referenced,
            "inputs_read_back_by_stage": dict(self.inputs_read_back),
            "units_resent": self.units_resent, "units_taken": sum(self.taken_by_stage.values()),
            "units_taken_by_stage": dict(self.taken_by_stage),
            "units_out_of_order": self.units_out_of_order,
            "bytes_to_workers_by_stage": dict(self.bytes_to_workers),
            "bytes_from_workers_by_stage": dict(self.bytes_from_workers),
            "busy_s": {str(worker): {name: round(seconds, 3) for name, seconds in stages.items()}
                       for worker, stages in sorted(self.busy_s.items())},
            "coordinator_s": {name: round(seconds, 3) for name, seconds in self.coordinator_s.items()},
            "coordinator_ms_per_unit": {name: round(1000 * seconds / committed, 3)
                                        for name, seconds in self.coordinator_s.items()},
        }


class RayExecutor:
    """Starts (or joins) Ray and runs the render's units on `workers` actors; `walk` is the runner's loop for it."""

    def __init__(self, settings, device, stages):
        self.settings, self.stages = settings, stages
        self.uses_gpu = str(device).startswith("cuda")
        self.ray = None
        self.started_ray = False
        self.actors = []
        self.cache_bytes = int(settings.cache_per_worker_gb * (1 << 30))

    # --- Ray and the actors ----------------------------------------------------------------------------------------
    def __enter__(self):
        ray = self.ray = import_ray()
        settings = self.settings
        gpus = settings.gpus_per_worker if settings.gpus_per_worker is not None else (1 if self.uses_gpu else 0)
        self.gpus_per_worker = gpus
        # Ray's core installs its own fatal-signal handlers (SIGTERM would abort the render); the runner's stop
        # handlers are put back once it has started.
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        if not ray.is_initialized():
            options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                           runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                                     if k.startswith(TEST_ENV_PREFIX)}})
            if settings.address:
                try:
                    ray.init(address=settings.address, **options)
                except (ConnectionError, RuntimeError, ValueError) as error:
                    reason = str(error).splitlines()[0].split(". ")[0].rstrip(".")
                    raise UserError(f"cannot join the Ray cluster at executor.address {settings.address!r} "
                                    f"({reason}); start one with `ray start --head` or check the address") from None
            else:
                ray.init(num_cpus=max(1, round(settings.workers * settings.cpus_per_worker)),
                         num_gpus=None if gpus else 0, **options)
            self.started_ray = True
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        try:
            self.workers = self._placeable(settings, gpus)
        except UserError:
            self.__exit__()
            raise
        log.info("executor: %d Ray worker(s) (%s CPU, %s GPU each)%s", self.workers, settings.cpus_per_worker, gpus,
                 f" on {settings.address}" if settings.address else "")
        self.counts = ExecutorCounts(self.workers)
        # Started now, so they import and unpickle while the runner checks the cache (Ray creates actors in the
        # background); they load the models on their first unit.
        self.stages_ref = ray.put(self.stages)
        self.actors = [self._start_actor() for _ in range(self.workers)]
        # Kept from one walk to the next (a walk starts again after a corrupt input), as the actors are: what each
        # worker holds, as far as we know, and checksum → ObjectRef of bytes already in Ray's object store (inputs
        # sent once, the workers' results).
        self.held = [HeldBytes(int(self.cache_bytes * MIRROR_SHARE)) for _ in range(self.workers)]
        self.shared_refs = HeldBytes(SHARED_REFS_BYTES)
        return self

    def _placeable(self, settings, gpus):
        """The number of workers to start: as asked (by default on a cluster, one per GPU, or per CPU core), or as
        many as the cluster can place, said in one line (workers that cannot be placed would wait for ever)."""
        nodes = self.ray.nodes()
        fits = placeable_workers(nodes, settings.cpus_per_worker, gpus)
        asked = settings.workers
        if settings.address and settings.workers == 1:  # joined a cluster without a count: one per GPU (or CPU)
            asked = max(1, fits)
        resources = self.ray.cluster_resources()
        has = f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU on {len(nodes)} node(s)"
        needs = f"{settings.cpus_per_worker:g} CPU and {gpus:g} GPU each"
        if fits == 0:
            raise UserError(f"no Ray worker can be placed: the cluster has {has} and a worker needs {needs}; "
                            "lower executor.gpus_per_worker or executor.cpus_per_worker, or add nodes")
        if fits < asked:
            line = f"executor: {asked} workers asked, {fits} started: the cluster has {has}, a worker needs {needs}"
            log.warning(line)
            tqdm.write(line, file=sys.stderr)
            return fits
        return asked

    def __exit__(self, *exc):
        for actor in self.actors:
            if actor is not None:
                self.ray.kill(actor)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False

    def _start_actor(self):
        actor_class = self.ray.remote(num_cpus=self.settings.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                      max_restarts=0, concurrency_groups={LANE: 1, MODEL_FREE_LANE: 1})(UnitWorker)
        return actor_class.remote(self.stages_ref, torch.get_num_threads(), self.cache_bytes)

    # --- the walk --------------------------------------------------------------------------------------------------
    def walk(self, stages, keys, cache, stop, progress, report):
        """Run every pending unit of every stage; False when it must start again (a corrupt input was found)."""
        _recompute_released_inputs(stages, keys, cache)
        walk = Walk(self, stages, keys, cache, stop, progress, report)
        try:
            return walk.run()
        finally:
            walk.close()
            report.executor = self.counts.record()


class Walk:
    """One pass of the distributed runner over all stages at once."""

    def __init__(self, executor, stages, keys, cache, stop, progress, report):
        self.executor, self.stages, self.cache, self.stop, self.report = executor, stages, cache, stop, report
        self.ray, self.counts = executor.ray, executor.counts
        self.by_name = {stage.name: stage for stage in stages}
        self.position = {stage.name: index for index, stage in enumerate(stages)}
        self.done = {stage.name: cache.done_keys(stage.name) for stage in stages}
        workers = self.workers = len(executor.actors)
        # Stages that run in order: per (stage name, block) a heap of the positions of units not sent yet. Every
        # other one runs its blocks backwards (a snake): step k+1's windows read step k's, so a block running
        # forwards both times would start each step with its first window, which waits on the block before's last
        # (the border frames' steps), and those waits add up along the blocks, a step later for each; turning
        # round, its first window reads its own last one and the next block's first. Either way a window reuses
        # the ControlNet residuals of the one before (DenoiseWindowsStage keeps them for the next in either
        # direction) and the bits are the same (a frame's residuals are computed in a group fixed by its index).
        in_order = [stage for stage in stages if stage.runs_in_order]
        self.order = {stage.name: {key: index if turn % 2 == 0 else -index
                                   for index, key in enumerate(keys[stage.name])}
                      for turn, stage in enumerate(in_order)}
        # Each stage's units in one contiguous block per worker, by position in the stage's list; a unit reading a
        # stage that runs in order goes to the block of the last of those it reads in that stage's order (a frame's
        # step: where the window that makes it ready ran, so no ε travels for it, and whose next window reads it).
        self.block = {}
        for stage in stages:
            stage_keys = keys[stage.name]
            by_position = {key: (index * 2 + 1) * workers // (2 * len(stage_keys))
                           for index, key in enumerate(stage_keys)}
            if any(upstream.name in self.order for upstream in stage.inputs if upstream is not stage):
                by_position = {key: self._block_after(stage, key, block) for key, block in by_position.items()}
            self.block[stage.name] = by_position
        self.left = {}           # stage name → units still to commit
        self.waiting = {}        # (stage name, key) → number of its inputs not done yet
        self.readers = defaultdict(list)  # input unit → pending units reading it
        self.ready = []          # per stage position, per worker (its block), a deque of ready units
        self.is_ready = set()    # (stage name, key) of the units in those deques
        self.unsent = defaultdict(list)
        self.internal_readers = {}  # internal unit (FastBlend table) → pending units of its stage still reading it
        self.in_flight = {}      # Ray reference of a task's records → (worker index, actor, stage name, its keys,
        #                          short, the references of their bytes)
        self.load = [[0, 0] for _ in range(workers)]  # per worker: long units in flight, short ones
        self.idle_since = [time.monotonic()] * workers  # when each worker's last unit in flight came back
        self.dispatch_now = False  # a unit got ready for a worker with room since the last dispatch
        self.attempts = defaultdict(int)
        self.stage_seconds = {}  # stage name → (workers' seconds computing, units) of its units computed so far
        self.kind_seconds = {}   # the same by the stages' class
        self.fetch_seconds, self.fetched_bytes = 0.0, 0  # the workers' seconds receiving inputs, and their bytes
        self.local = None        # (stage, generator) of the on-coordinator stage running
        self.records = {}        # (stage name, key) → (size, checksum) of done units, from the manifest or a commit
        self.held = executor.held  # what each worker holds, as far as we know
        self.shared_refs = executor.shared_refs
        total = sum(len(k) for k in keys.values())
        self.bar = tqdm(total=total, initial=report.units_reused, desc=f"units ({workers} workers)",
                        unit="unit", disable=not progress, dynamic_ncols=True)
        self._plan(keys)

    def _block_after(self, stage, key, block):
        """The block of the last unit `key` reads of a stage that runs in order, in that stage's order (else
        `block`)."""
        last = max(((self.order[upstream.name][upstream_key], upstream.name, upstream_key)
                    for upstream, upstream_key in stage.reads(key)
                    if upstream is not stage and upstream.name in self.order), default=None)
        return block if last is None else self.block[last[1]][last[2]]

    def _plan(self, keys):
        self.ready = [[deque() for _ in range(self.workers)] for _ in self.stages]
        for stage in self.stages:
            pending = _pending(stage, keys, self.cache)
            self.left[stage.name] = len(pending)
            if pending:
                log.info("stage %s: %d of %d units to do", stage.name, len(pending), len(keys[stage.name]))
            internal = set(stage.internal_keys())
            for key in pending:
                missing = 0
                for upstream, upstream_key in stage.reads(key):
                    if upstream is stage and upstream_key in internal:
                        self.internal_readers.setdefault(upstream_key, set()).add(key)
                    if upstream_key not in self.done[upstream.name]:
                        missing += 1
                        self.readers[(upstream.name, upstream_key)].append((stage.name, key))
                self.waiting[(stage.name, key)] = missing
                if stage.name in self.order:
                    self._unsent(stage.name, key)
                if not missing:
                    self._make_ready(stage.name, key)
            # Tables a previous run finished with but had not yet released (it died in between).
            self._release_internal(stage, [k for k in internal if k in self.done[stage.name]])

    def _make_ready(self, name, key, first=False):
        block = self.block[name][key]
        queue = self.ready[self.position[name]][block]
        if self.load[block][0] < IN_FLIGHT:  # its worker has room: send before committing the other results
            self.dispatch_now = True
        if first:  # a unit sent back: before the others
            queue.appendleft(key)
            if name in self.order:
                self._unsent(name, key)
        else:
            queue.append(key)
        self.is_ready.add((name, key))

    def _unsent(self, name, key):
        heapq.heappush(self.unsent[(name, self.block[name][key])], (self.order[name][key], key))

    def _next_in_order(self, name, block):
        """The first unit of the block not sent yet, of a stage that runs in order."""
        heap = self.unsent[(name, block)]
        while heap and (heap[0][1] in self.done[name] or not self._waiting_to_send(name, heap[0][1])):
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    def _waiting_to_send(self, name, key):
        return (name, key) in self.is_ready or self.waiting.get((name, key), 0) > 0

    def _ready_count(self, stage):
        return sum(len(queue) for queue in self.ready[self.position[stage.name]])

    def close(self):
        self.bar.close()

    # --- the loop --------------------------------------------------------------------------------------------------
    def run(self):
        for stage in self.stages:  # ephemeral inputs of stages complete before this pass
            if not self.left[stage.name]:
                _retire_finished_inputs(stage, self.stages, self.cache)
        try:
            while any(self.left.values()):
                if self.stop.stop_requested:
                    log.info("stop requested: nothing new starts; committing the %d unit(s) computing",
                             len(self.in_flight))
                    self._drain()
                    raise Interrupted("stopped; the results that were computing are kept; run the same command "
                                      "again to resume")
                self._dispatch()
                if self._step_local():
                    self._collect(timeout=0)
                elif self.in_flight:
                    self._collect(timeout=1.0)
                elif any(self.left.values()):
                    stuck = [name for name, left in self.left.items() if left]
                    raise RuntimeError(f"nothing can run but stages {first_few(stuck)} have units left: a stage "
                                       "reads a unit no stage produces")
        except CorruptUnit as corrupt:
            log.warning(str(corrupt))
            self._drain()
            self.cache.forget_unit(corrupt.stage, corrupt.key)
            return False
        return True

    def _dispatch(self):
        """Fill every live worker up to IN_FLIGHT units (and SHORT_IN_FLIGHT short ones) from its own block; a
        worker with nothing in flight and nothing of its own takes another's."""
        self.dispatch_now = False
        while True:
            sent = False
            for worker in sorted(range(self.workers), key=lambda w: sum(self.load[w])):
                long_load, short_load = self.load[worker]
                room = (long_load < IN_FLIGHT, short_load < SHORT_IN_FLIGHT)
                if self.executor.actors[worker] is None or not any(room):
                    continue
                idle = not long_load and not short_load
                unit = (self._own_unit(worker, room, stalled=not self.in_flight)
                        or (self._taken_unit(worker) if idle else None))
                if unit is not None:
                    stage, key = unit
                    self._send(worker, stage, self._batch(worker, stage, key, SHORT_IN_FLIGHT - short_load))
                    sent = True
            if not sent:
                return

    def _seconds_per_unit(self, name):
        """The workers' mean seconds computing one of the stage's units so far; before the first, that of the
        stage's kind (its class: every step's per-frame stage is one); None before any."""
        busy, done = self.stage_seconds.get(name) or self.kind_seconds.get(type(self.by_name[name]), (0.0, 0))
        return busy / done if done else None

    def _is_short(self, name):
        """Whether the stage's units have been measured to take under SHORT_UNIT_S each on the workers; before that,
        whether it uses no model (a frame's DDIM step: arithmetic on its inputs)."""
        seconds = self._seconds_per_unit(name)
        return self.by_name[name].model_free if seconds is None else seconds < SHORT_UNIT_S

    def _own_unit(self, worker, room, stalled):
        """The next unit of the worker's own block that the worker has room for (`room`: for a long unit, for a
        short one): short units first, then the earliest stage with one ready. A worker runs its tasks in the order
        sent, and a frame's step (milliseconds) is what the next step's windows wait for: sent behind a window, it
        would hold them up by that window's time. While short units wait for room, no long unit goes ahead of them.

        Long units, earlier stages first, as one process runs them: the blocks beside a block wait on its windows
        of each step (those its border frames' steps read), so a worker that ran ahead to its later steps would
        stall them; and a block's initial latents, queued behind windows, would hold up the next block's first
        window. A stage that runs in order gives only its block's next unit, as one process computes them (a window
        out of order would compute its ControlNet residuals again; waiting for the one before is shorter), unless
        nothing at all is computing."""
        positions = [position for position in range(len(self.stages))
                     if self.ready[position][worker] and not self.stages[position].on_coordinator]
        for short in (True, False):
            for position in positions:
                stage = self.stages[position]
                if self._is_short(stage.name) != short:
                    continue
                if not room[short]:
                    if short:
                        return None
                    break
                key = self._ready_key(stage, position, worker, stalled)
                if key is not None:
                    return stage, key
        return None

    def _ready_key(self, stage, position, worker, stalled):
        """A ready unit of `stage` from the worker's block: the first, or for a stage that runs in order its next
        (None if that is not ready, unless `stalled`)."""
        queue = self.ready[position][worker]
        if stage.name in self.order:
            key = self._next_in_order(stage.name, worker)
            if key is not None and (stage.name, key) in self.is_ready:
                queue.remove(key)
                return self._sent(stage.name, key)
            if not stalled:
                return None
            self.counts.units_out_of_order += 1
        return self._sent(stage.name, queue.popleft())

    def _batch(self, worker, stage, key, room):
        """`key` and, for a short stage's unit, the worker's next ready units of that stage, up to `room` in all:
        sent as one task. A stage that runs in order goes one unit at a time, and so does a unit that failed before
        (so that a failing unit does not take others' attempts with it)."""
        keys = [key]
        if not self._is_short(stage.name) or stage.name in self.order or self.attempts.get((stage.name, key)):
            return keys
        queue = self.ready[self.position[stage.name]][worker]
        while queue and len(keys) < room and not self.attempts.get((stage.name, queue[0])):
            keys.append(self._sent(stage.name, queue.popleft()))
        return keys

    def _sent(self, name, key):
        self.is_ready.discard((name, key))
        return key

    def _taken_unit(self, worker):
        """The last unit of the longest queue of the latest stage with more waiting than its worker takes at once
        (so it is behind: a slower or a new worker loading its models), if taking it is worth what must be sent for
        it; the last is the farthest from where it works (of a stage that runs in order, the last in its order).
        Only by a worker idle for one unit's time: a block turning round at a step's end has its whole next step
        ready at once while its neighbour waits a moment for its own first window. Short units are not taken: their
        owner is sent many at once, and their inputs (a frame's step reads two windows' ε) are larger than their
        work. Taking less eagerly keeps the blocks, which is what keeps the bytes and ControlNet calls down."""
        idle_for = time.monotonic() - self.idle_since[worker]
        for position in reversed(range(len(self.stages))):
            stage = self.stages[position]
            # (Not its own block: what it has not been given of that is not its turn yet.)
            longest = max((queue for block, queue in enumerate(self.ready[position]) if block != worker), key=len,
                          default=())
            if (len(longest) <= 2 * IN_FLIGHT or stage.on_coordinator or self._is_short(stage.name)
                    or idle_for < (self._seconds_per_unit(stage.name) or 0)):
                continue
            order = self.order.get(stage.name)
            key = max(longest, key=order.get) if order else longest[-1]
            if self._worth_taking(worker, stage, key, len(longest)):
                self.counts.taken_by_stage[stage.name] += 1
                longest.remove(key)
                return stage, self._sent(stage.name, key)
        return None

    def _worth_taking(self, worker, stage, key, backlog):
        """Whether `worker` computing another's ready unit `key` is sooner than its owner reaching it: the owner
        has `backlog` ready units of the stage before it (at the stage's measured seconds per unit); the taker
        needs the unit's inputs it does not hold sent first (at the workers' measured bytes per second receiving,
        TAKE_BYTES_PER_S until 64 MB have been). A per-frame step unit whose windows' ε (16× its size) would
        travel is not; a window whose owner is still loading its models is. A stage's first unit: taken."""
        seconds = self._seconds_per_unit(stage.name)
        if seconds is None:
            return True
        rate = self.fetched_bytes / self.fetch_seconds if self.fetched_bytes >= 64 << 20 else TAKE_BYTES_PER_S
        held = self.held[worker]
        missing = sum(size for size, digest in (self._record(upstream.name, upstream_key)
                                                for upstream, upstream_key in stage.reads(key))
                      if digest not in held)
        return missing / rate + seconds < backlog * seconds

    def _send(self, worker, stage, keys):
        """Send the units `keys` of `stage` to `worker` as one task, each input once (by reference if it holds it)."""
        started = time.perf_counter()
        counts, held = self.counts, self.held[worker]
        inputs = {}
        for key in keys:
            for upstream, upstream_key in stage.reads(key):
                if (upstream.name, upstream_key) in inputs:
                    continue
                size, digest = self._record(upstream.name, upstream_key)
                if digest in held:
                    held.get(digest)
                    inputs[(upstream.name, upstream_key)] = (digest, None)
                    counts.inputs_referenced += 1
                    continue
                ref = self.shared_refs.get(digest) if digest in self.shared_refs else None
                if ref is None:
                    data = self.cache.read(upstream.name, upstream_key)  # checked against its checksum
                    counts.inputs_read_back[upstream.name] += 1
                    ref = self.ray.put(data)
                    self.shared_refs.put(digest, ref, size)
                inputs[(upstream.name, upstream_key)] = (digest, [ref])
                held.put(digest, None, size)
                counts.inputs_sent += 1
                counts.bytes_to_workers[stage.name] += size
        actor = self.executor.actors[worker]
        short = self._is_short(stage.name)
        lane = MODEL_FREE_LANE if short and stage.model_free else LANE
        record_ref, *data_refs = actor.compute.options(num_returns=len(keys) + 1, concurrency_group=lane).remote(
            stage.name, keys, inputs)
        self.in_flight[record_ref] = (worker, actor, stage.name, keys, short, data_refs)
        self.load[worker][short] += len(keys)
        counts.units_dispatched += len(keys)
        counts.tasks_dispatched += 1
        if lane == MODEL_FREE_LANE:
            counts.units_model_free_lane += len(keys)
        counts.coordinator_s["inputs"] += time.perf_counter() - started

    def _record(self, name, key):
        record = self.records.get((name, key))
        if record is None:
            record = self.cache.unit_record(name, key)
            if record is None or record[0] == RELEASED:  # cannot be: reads() declared it; let read() say why
                self.cache.read(name, key)
            self.records[(name, key)] = record
        return record

    def _step_local(self):
        """Advance the on-coordinator stage by one unit (starting one whose pending units can all run). True if a
        unit was done here."""
        if self.local is None:
            for stage in self.stages:
                if stage.on_coordinator and self.left[stage.name] and self._all_ready(stage):
                    queues = self.ready[self.position[stage.name]]
                    pending = set().union(*queues)
                    self.is_ready.difference_update((stage.name, key) for key in pending)
                    self.local = (stage, stage.run([key for key in self.block[stage.name] if key in pending]))
                    for queue in queues:
                        queue.clear()
                    break
            else:
                return False
        stage, units = self.local
        try:
            key, data, path = next(units)
        except StopIteration:
            self.local = None
            return True
        self._commit(stage.name, key, data, path)
        return True

    def _all_ready(self, stage):
        return self._ready_count(stage) == self.left[stage.name]

    def _collect(self, timeout, dispatch=True):
        """Commit the results that have arrived (waiting up to `timeout` for one). A unit a result made ready for a
        worker with room is sent at once, before the other results are committed (`dispatch`; not while draining):
        a block's first window of a step waits on its border frames' steps, so each worker waits on the one before
        it, and what each one waits adds up along the blocks."""
        computing = list(self.in_flight)
        references, _ = self.ray.wait(computing, num_returns=len(computing), timeout=0)  # all that are done
        if not references:
            references, _ = self.ray.wait(computing, num_returns=1, timeout=timeout)
        for reference in references:
            worker, actor, name, keys, short, data_refs = self.in_flight.pop(reference)
            self.load[worker][short] -= len(keys)
            if not any(self.load[worker]):
                self.idle_since[worker] = time.monotonic()
            started = time.perf_counter()
            try:
                records, *results = self.ray.get([reference, *data_refs])
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.OutOfMemoryError) as error:
                # (Ray's memory monitor kills a worker when the node runs out of memory: that worker is gone too.)
                self._worker_died(worker, actor, name, keys, error)
                continue
            except self.ray.exceptions.RayTaskError as error:
                self._unit_failed(worker, name, keys, error)
                continue
            self.counts.coordinator_s["results"] += time.perf_counter() - started
            for key, (path, digest, work), data, data_ref in zip(keys, records, results, data_refs):
                busy, fetch_s, fetched = work.pop("busy_s"), work.pop("fetch_s"), work.pop("fetched_bytes")
                self.counts.busy_s[worker][name] += busy
                for seconds, of in ((self.stage_seconds, name), (self.kind_seconds, type(self.by_name[name]))):
                    total, done = seconds.get(of, (0.0, 0))
                    seconds[of] = (total + busy - fetch_s, done + 1)
                if fetched:
                    self.fetch_seconds += fetch_s
                    self.fetched_bytes += fetched
                for counted, value in work.items():
                    self.counts.work[counted] += value
                self.counts.bytes_from_workers[name] += len(data)
                self.held[worker].put(digest, None, len(data))
                self._commit(name, key, data, path, digest)
                # The task's objects are this process's (Ray: the caller owns what a task returns), so they outlive
                # the worker; the next worker reading this unit is sent this object instead of the file read back.
                self.shared_refs.put(digest, data_ref, len(data))
            if dispatch and self.dispatch_now and not self.stop.stop_requested:
                self._dispatch()

    def _worker_died(self, worker, actor, name, keys, error):
        executor = self.executor
        if executor.actors[worker] is actor:  # the first of its lost units to come back: replace the worker
            log.warning("worker %d died (%s); starting another", worker, str(error).splitlines()[0][:200])
            executor.actors[worker] = executor._start_actor()
            self.held[worker] = HeldBytes(self.held[worker].capacity)  # the new one holds nothing
            # Its node may be gone with the results kept in that node's store: send from the run folder again.
            self.shared_refs.clear()
        for key in keys:
            self._count_attempt(name, key, error)
            log.warning("re-dispatching %s/%s (its worker died)", name, key)
        self._make_ready_again(name, keys)

    def _unit_failed(self, worker, name, keys, error):
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            raise cause
        if isinstance(cause, NotHeld):  # our mirror was wrong: forget it, send the unit again with its bytes
            log.info("worker %d: %s; sending %s/%s again", worker, cause, name, keys[0])
            self.held[worker] = HeldBytes(self.held[worker].capacity)
            self.counts.units_resent += len(keys)
            self._make_ready_again(name, keys)
            return
        if isinstance(cause, self.ray.exceptions.ObjectLostError):  # bytes sent on from a node that is gone
            log.info("worker %d: an input of %s/%s was lost (%s); sending it again from the run folder", worker,
                     name, keys[0], type(cause).__name__)
            self.shared_refs.clear()
            self.counts.units_resent += len(keys)
            self._make_ready_again(name, keys)
            return
        for key in keys:
            self._count_attempt(name, key, cause or error)
        log.warning("unit %s/%s failed on worker %d (%s); re-dispatching it%s", name, keys[0], worker,
                    str(cause or error).splitlines()[0][:200],
                    f" and the {len(keys) - 1} sent with it, each alone" if len(keys) > 1 else "")
        self._make_ready_again(name, keys)

    def _make_ready_again(self, name, keys):
        """Units sent back (their task failed or its worker died): before the others, in their order."""
        for key in reversed(keys):
            self._make_ready(name, key, first=True)

    def _count_attempt(self, name, key, error):
        self.attempts[(name, key)] += 1
        if self.attempts[(name, key)] >= ATTEMPTS:
            raise RuntimeError(f"unit {name}/{key} failed {ATTEMPTS} times on the workers; last: {error}") from None

    def _drain(self):
        """Commit what is still computing (a stop, or a corrupt input found): nothing new starts."""
        while self.in_flight:
            self._collect(timeout=None, dispatch=False)

    def _commit(self, name, key, data, path, digest=None):
        started = time.perf_counter()
        stage = self.by_name[name]
        write_unit(self.cache, stage, key, data, path, digest)
        if digest is not None:
            self.records[(name, key)] = (len(data), digest)
        self.done[name].add(key)
        self.left[name] -= 1
        self.report.computed[name] += 1
        self.bar.update(1)
        for reader_name, reader_key in self.readers.pop((name, key), ()):
            self.waiting[(reader_name, reader_key)] -= 1
            if not self.waiting[(reader_name, reader_key)]:
                self._make_ready(reader_name, reader_key)
        self._release_internal_read_by(stage, key)
        if not self.left[name]:
            self._release_internal(stage, stage.internal_keys())
            log.info("stage %s: done", name)
            _retire_finished_inputs(stage, self.stages, self.cache)
        self.counts.units_committed += 1
        self.counts.coordinator_s["commit"] += time.perf_counter() - started

    def _release_internal_read_by(self, stage, key):
        finished = []
        for upstream, upstream_key in stage.reads(key):
            readers = self.internal_readers.get(upstream_key) if upstream is stage else None
            if readers is not None:
                readers.discard(key)
                if not readers:
                    finished.append(upstream_key)
        self._release_internal(stage, finished)

    def _release_internal(self, stage, internal_keys):
        """Release done internal units that no pending unit reads any more."""
        releasable = [key for key in internal_keys
                      if key in self.done[stage.name] and not self.internal_readers.get(key)]
        for key in releasable:
            self.internal_readers.pop(key, None)
            self.records.pop((stage.name, key), None)
        self.cache.release_units(stage.name, releasable)


def executor_for(settings, device, stages):
    """The executor a render uses: None (in this process, no Ray) for one worker, else a RayExecutor."""
    return RayExecutor(settings, device, stages) if settings.distributed else None
