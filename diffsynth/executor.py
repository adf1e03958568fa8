"""Many workers: the units run on Ray actors, the render process stays the coordinator.

The coordinator alone owns the run folder, its lock and the manifest. Workers are Ray actors holding a copy of the
stages; they load the models once, on first use. A unit's inputs travel to the worker and its result's bytes come
back through Ray's object store, so workers need no shared filesystem; the coordinator checks, writes atomically and
commits each result exactly as the in-process runner does, in whatever order results arrive.

Scheduling rests on the one declaration of what a unit reads (`Stage.reads`): a unit is dispatched as soon as every
unit it reads is done, not stage by stage, so the windows of step k+1 start while step k finishes elsewhere.
Each worker holds at most `IN_FLIGHT` units (one computing, one waiting, so it never idles on the coordinator).
Stages marked `on_coordinator` (decoding a local file in order, encoding the video) run here, one unit at a time
between dispatches.

Faults: a worker that dies (killed, node lost) is replaced and its in-flight units are dispatched again; a unit that
raises (e.g. CUDA out of memory) is tried again on another worker, up to `ATTEMPTS` times. A coordinator that dies
is resumed by running the same command. A stop request (Ctrl-C) dispatches nothing more, commits the results still
arriving and stops.

Same bytes: every unit's result depends only on its inputs and its key (per-frame, per-step seeds), so the output
is byte-identical whatever the number of workers, on the same kind of device.
"""

import logging
import os
import signal
from collections import defaultdict, deque

import torch
from tqdm import tqdm

from .cache import CorruptUnit
from .errors import Interrupted, UserError
from .runner import _pending, _recompute_released_inputs, _retire_finished_inputs, first_few, write_unit

log = logging.getLogger("diffsynth")

IN_FLIGHT = 2
ATTEMPTS = 3
TEST_ENV_PREFIX = "DIFFSYNTH_TEST_"


class ShippedInputs:
    """A worker's stand-in for the run's cache: serves the inputs shipped with the unit being computed. A read of
    anything else is a stage that reads more than it declares, reported as such (it would break resume too)."""

    def __init__(self):
        self.units = {}
        self.prefetched = {}

    def read(self, stage, key):
        try:
            return self.units[(stage, key)]
        except KeyError:
            raise RuntimeError(f"a unit read {stage}/{key}, which its stage's reads() does not declare") from None


class UnitWorker:
    """A Ray actor: computes units of any stage from the shipped inputs. (Decorated with ray.remote on use, so
    importing this module never imports Ray.)"""

    def __init__(self, stages, threads):
        import torch
        torch.set_num_threads(threads)  # the render process's count: it is part of the CPU's fingerprint (low bits)
        self.stages = {stage.name: stage for stage in stages}
        self.shipped = ShippedInputs()
        for stage in stages:
            stage.ctx.cache = self.shipped
        self.computed = 0

    def compute(self, stage_name, key, inputs):
        self.computed += 1
        _test_kill_point(stage_name, self.computed)
        self.shipped.units = inputs
        try:
            data, path = self.stages[stage_name].compute(key)
        finally:
            self.shipped.units = {}
        return data, path

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


class RayExecutor:
    """Starts (or joins) Ray and runs the render's units on `workers` actors; `walk` is the runner's loop for it."""

    def __init__(self, settings, device, stages):
        self.settings, self.stages = settings, stages
        self.uses_gpu = str(device).startswith("cuda")
        self.ray = None
        self.started_ray = False
        self.actors = []

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
        self.workers = settings.workers
        if settings.address and settings.workers == 1:  # joined a cluster without a count: one per GPU (or CPU)
            resources = ray.cluster_resources()
            self.workers = max(1, int(resources.get("GPU", 0) // gpus) if gpus else
                               int(resources.get("CPU", 1) // settings.cpus_per_worker))
        log.info("executor: %d Ray worker(s) (%s CPU, %s GPU each)%s", self.workers, settings.cpus_per_worker, gpus,
                 f" on {settings.address}" if settings.address else "")
        # Started now, so they import and unpickle while the runner checks the cache (Ray creates actors in the
        # background); they load the models on their first unit.
        self.stages_ref = ray.put(self.stages)
        self.actors = [self._start_actor() for _ in range(self.workers)]
        return self

    def __exit__(self, *exc):
        for actor in self.actors:
            if actor is not None:
                self.ray.kill(actor)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()

    def _start_actor(self):
        actor_class = self.ray.remote(UnitWorker).options(num_cpus=self.settings.cpus_per_worker,
                                                         num_gpus=self.gpus_per_worker, max_restarts=0)
        return actor_class.remote(self.stages_ref, torch.get_num_threads())

    # --- the walk --------------------------------------------------------------------------------------------------
    def walk(self, stages, keys, cache, stop, progress, report):
        """Run every pending unit of every stage; False when it must start again (a corrupt input was found)."""
        _recompute_released_inputs(stages, keys, cache)
        walk = Walk(self, stages, keys, cache, stop, progress, report)
        try:
            return walk.run()
        finally:
            walk.close()


class Walk:
    """One pass of the distributed runner over all stages at once."""

    def __init__(self, executor, stages, keys, cache, stop, progress, report):
        self.executor, self.stages, self.cache, self.stop, self.report = executor, stages, cache, stop, report
        self.ray = executor.ray
        self.by_name = {stage.name: stage for stage in stages}
        self.position = {stage.name: index for index, stage in enumerate(stages)}
        self.done = {stage.name: cache.done_keys(stage.name) for stage in stages}
        self.left = {}           # stage name → units still to commit
        self.waiting = {}        # (stage name, key) → number of its inputs not done yet
        self.readers = defaultdict(list)  # input unit → pending units reading it
        self.ready = []          # per stage position, a deque of ready units
        self.internal_readers = {}  # internal unit (FastBlend table) → pending units of its stage still reading it
        self.in_flight = {}      # Ray reference → (worker index, stage name, key)
        self.attempts = defaultdict(int)
        self.local = None        # (stage, generator) of the on-coordinator stage running
        total = sum(len(k) for k in keys.values())
        self.bar = tqdm(total=total, initial=report.units_reused, desc=f"units ({executor.workers} workers)",
                        unit="unit", disable=not progress, dynamic_ncols=True)
        self._plan(keys)

    def _plan(self, keys):
        self.ready = [deque() for _ in self.stages]
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
                if not missing:
                    self.ready[self.position[stage.name]].append(key)
            # Tables a previous run finished with but had not yet released (it died in between).
            self._release_internal(stage, [k for k in internal if k in self.done[stage.name]])

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
        """Fill every live worker up to IN_FLIGHT, later stages first (their inputs can then be released sooner)."""
        executor = self.executor
        for position in reversed(range(len(self.stages))):
            stage, queue = self.stages[position], self.ready[position]
            if stage.on_coordinator:
                continue
            while queue:
                worker = self._free_worker()
                if worker is None:
                    return
                key = queue.popleft()
                inputs = {(upstream.name, k): self.cache.read(upstream.name, k) for upstream, k in stage.reads(key)}
                actor = executor.actors[worker]
                self.in_flight[actor.compute.remote(stage.name, key, inputs)] = (worker, actor, stage.name, key)

    def _free_worker(self):
        load = [0] * len(self.executor.actors)
        for worker, *_ in self.in_flight.values():
            load[worker] += 1
        candidates = [i for i, actor in enumerate(self.executor.actors) if actor is not None and load[i] < IN_FLIGHT]
        return min(candidates, key=load.__getitem__) if candidates else None

    def _step_local(self):
        """Advance the on-coordinator stage by one unit (starting one whose pending units can all run). True if a
        unit was done here."""
        if self.local is None:
            for stage in self.stages:
                if stage.on_coordinator and self.left[stage.name] and self._all_ready(stage):
                    queue = self.ready[self.position[stage.name]]
                    self.local = (stage, stage.run(list(queue)))
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
        return len(self.ready[self.position[stage.name]]) == self.left[stage.name]

    def _collect(self, timeout):
        references, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        for reference in references:
            worker, actor, name, key = self.in_flight.pop(reference)
            try:
                data, path = self.ray.get(reference)
            except self.ray.exceptions.RayActorError as error:
                self._worker_died(worker, actor, name, key, error)
                continue
            except self.ray.exceptions.RayTaskError as error:
                self._unit_failed(worker, name, key, error)
                continue
            self._commit(name, key, data, path)

    def _worker_died(self, worker, actor, name, key, error):
        executor = self.executor
        if executor.actors[worker] is actor:  # the first of its lost units to come back: replace the worker
            log.warning("worker %d died (%s); starting another", worker, str(error).splitlines()[0][:200])
            executor.actors[worker] = executor._start_actor()
        self._count_attempt(name, key, error)
        log.warning("re-dispatching %s/%s (its worker died)", name, key)
        self.ready[self.position[name]].appendleft(key)

    def _unit_failed(self, worker, name, key, error):
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            raise cause
        self._count_attempt(name, key, cause or error)
        log.warning("unit %s/%s failed on worker %d (%s); re-dispatching it", name, key, worker,
                    str(cause or error).splitlines()[0][:200])
        self.ready[self.position[name]].appendleft(key)

    def _count_attempt(self, name, key, error):
        self.attempts[(name, key)] += 1
        if self.attempts[(name, key)] >= ATTEMPTS:
            raise RuntimeError(f"unit {name}/{key} failed {ATTEMPTS} times on the workers; last: {error}") from None

    def _drain(self):
        """Commit what is still computing (a stop, or a corrupt input found): nothing new starts."""
        while self.in_flight:
            self._collect(timeout=None)

    def _commit(self, name, key, data, path):
        stage = self.by_name[name]
        write_unit(self.cache, stage, key, data, path)
        self.done[name].add(key)
        self.left[name] -= 1
        self.report.computed[name] += 1
        self.bar.update(1)
        for reader_name, reader_key in self.readers.pop((name, key), ()):
            self.waiting[(reader_name, reader_key)] -= 1
            if not self.waiting[(reader_name, reader_key)]:
                self.ready[self.position[reader_name]].append(reader_key)
        self._release_internal_read_by(stage, key)
        if not self.left[name]:
            self._release_internal(stage, stage.internal_keys())
            log.info("stage %s: done", name)
            _retire_finished_inputs(stage, self.stages, self.cache)

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
        self.cache.release_units(stage.name, releasable)


def executor_for(settings, device, stages):
    """The executor a render uses: None (in this process, no Ray) for one worker, else a RayExecutor."""
    return RayExecutor(settings, device, stages) if settings.distributed else None
