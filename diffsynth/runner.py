"""The generic runner: walks the stages in order, skips done units, runs the rest, reports progress.

It knows no stage by name. Its rules:
- a stage whose fingerprint changed starts over (the cache forgets it); stages no longer planned are dropped;
- nothing done is recomputed unless a unit still to be computed reads it: before running anything, the released
  units that the pending units read (each stage declares its reads, `Stage.reads`) are made not-done, and only they;
- a unit whose cached file turns out corrupt when read is forgotten and the walk starts again from the top, so the
  stage that made it recomputes it;
- an ephemeral stage's files are released once every stage that reads it is complete;
- SIGINT/SIGTERM stop after the current unit (Interrupted, exit code 3).
"""

import logging
import signal
import sqlite3
import sys
import threading
import time

from tqdm import tqdm

from .cache import CorruptUnit, read_unit, storage_error
from .errors import Interrupted

log = logging.getLogger("diffsynth")


class StopFlag:
    """Set by SIGINT/SIGTERM; the runner checks it between units. A second signal stops at once."""

    def __init__(self):
        self.stop_requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.stop_requested:
            raise Interrupted("stopped at once by a second signal")
        self.stop_requested = True
        log.warning("signal %s: stopping after the current unit", signal.Signals(signum).name)


class InputPrefetcher:
    """The runner's reader thread for one stage: while the model computes unit i, it reads and checks the declared
    inputs (`Stage.reads`) of units i+1 and i+2 from its own manifest connection; `RunCache.read` serves them from
    memory. Holds at most two units' inputs. A read that fails here is simply left to the model's thread, which
    reads it again and reports it as usual."""

    AHEAD = 2

    def __init__(self, stage, pending, cache):
        self.stage, self.pending, self.cache = stage, pending, cache
        self.done = -1  # index in `pending` of the last unit the model's thread finished
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._read_ahead, name=f"prefetch {stage.name}", daemon=True)
        self.thread.start()

    def _inputs(self, index):
        if index >= len(self.pending):
            return []
        return [(upstream.name, key) for upstream, key in self.stage.reads(self.pending[index])]

    def _read_ahead(self):
        db = self.cache.reader_connection()
        try:
            for index in range(len(self.pending)):
                with self.wake:
                    while not self.stopped and index > self.done + self.AHEAD:
                        self.wake.wait()
                    if self.stopped:
                        return
                for unit in self._inputs(index):
                    if self.stopped:
                        return
                    if unit not in self.cache.prefetched:
                        try:
                            self.cache.prefetched[unit] = read_unit(db, self.cache.run_dir, *unit)
                        except (CorruptUnit, OSError):
                            pass
        finally:
            db.close()

    def finished(self, index):
        """Unit `index` of `pending` is done: forget inputs only it needed, and let the thread read further."""
        wanted = {unit for ahead in range(1, self.AHEAD + 1) for unit in self._inputs(index + ahead)}
        for unit in list(self.cache.prefetched):
            if unit not in wanted:
                self.cache.prefetched.pop(unit, None)
        with self.wake:
            self.done = index
            self.wake.notify()

    def stop(self):
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join()
        self.cache.prefetched.clear()


def run_stages(stages, cache, progress=True, stop=None, verify=False, io_threads=True, executor=None,
               partial=False, earlier=None):
    """Run every stage to completion (or until a stop is requested). `stop`: a StopFlag the caller installed
    earlier (so a signal during its own start-up counts too); by default the runner installs one itself.
    Start-up checks every kept unit's size, and the checksums of the final outputs; `verify` checks every kept
    unit's checksum (slow on a long video: it reads the whole cache). Every read checks the checksum anyway.
    `executor`: a RayExecutor (diffsynth.executor) to run the units on many workers; None runs them here.
    `partial`: `stages` are the first stages of a plan that is only made once they are done (the shot detection's
    result decides the sliding windows): the other stages' rows are left alone and nothing is reported yet; the
    run of the whole plan that follows passes this run's report as `earlier`, so its report counts both.
    Returns a RunReport: how many units were computed and how many were reused from the cache."""
    if stop is None:
        with StopFlag() as stop:
            return run_stages(stages, cache, progress, stop, verify, io_threads, executor, partial, earlier)
    names = [stage.name for stage in stages]
    assert len(set(names)) == len(names), f"duplicate stage names in {names}"
    if not partial:
        cache.forget_other_stages(set(names))
    keys = {}
    for position, stage in enumerate(stages):
        keys[stage.name] = stage.unit_keys()
        cache.open_stage(stage.name, stage.fingerprint, len(keys[stage.name]), position)
        damaged = cache.verify_stage(stage.name, full=verify or not _readers(stage, stages))
        if damaged:
            log.warning("stage %s: %d cached unit(s) missing or damaged on disk, recomputing them: %s",
                        stage.name, len(damaged), first_few(damaged))
    removed = cache.remove_leftovers()
    if removed:
        log.info("removed %d leftover file(s) of an interrupted run", removed)
    unknown = cache.unknown_files()
    if unknown:
        log.warning("%d file(s) in the run folder are not the render's (left alone): %s", len(unknown),
                    first_few(unknown))
    report = RunReport(stages, keys, cache, earlier)
    report.announce(progress)
    if stop.stop_requested:
        raise Interrupted("stopped before the first unit; run the same command again to resume")
    while not (executor.walk(stages, keys, cache, stop, progress, report) if executor else
               _walk(stages, keys, cache, stop, progress, report, io_threads, retire=not partial)):
        pass
    if not partial:
        report.finish()
    return report


def first_few(names, count=5):
    """The first `count` names for a log line, and "…" when there are more."""
    return ", ".join(names[:count]) + (" …" if len(names) > count else "")


class RunReport:
    """What a render reused from the cache and what it computed, per stage, for the log, the console and status."""

    def __init__(self, stages, keys, cache, earlier=None):
        self.cache = cache
        self.total = {stage.name: len(keys[stage.name]) for stage in stages}
        self.reused = {stage.name: len(keys[stage.name]) - len(_pending(stage, keys, cache)) for stage in stages}
        self.computed = {stage.name: 0 for stage in stages}
        self.executor = None  # what the Ray executor counted (diffsynth.executor.ExecutorCounts.record())
        for name, count in (earlier.computed if earlier else {}).items():  # computed by the partial run before
            if name in self.computed:
                self.computed[name] += count
                self.reused[name] -= count

    @property
    def units_computed(self):
        return sum(self.computed.values())

    @property
    def units_reused(self):
        return sum(self.reused.values())

    def announce(self, progress):
        """Say, before any work, which stages are reused whole from the cache and which are partly done."""
        for name, total in self.total.items():
            if self.reused[name] == total:
                log.info("stage %s: all %d units reused from the cache", name, total)
                if progress:
                    tqdm.write(f"{name}: reused from the cache ({total} units)", file=sys.stderr)
            elif self.reused[name]:
                log.info("stage %s: %d of %d units reused from the cache", name, self.reused[name], total)

    def finish(self):
        if self.units_computed == 0:
            self.summary = f"everything was reused from the cache ({self.units_reused} units); nothing was computed"
        else:
            redone = [name for name, count in self.computed.items() if count]
            self.summary = (f"{self.units_computed} unit(s) computed in {len(redone)} stage(s), "
                            f"{self.units_reused} reused from the cache")
        log.info(self.summary)
        record = {"computed": self.units_computed, "reused": self.units_reused,
                  "computed_by_stage": {k: v for k, v in self.computed.items() if v}}
        if self.executor is not None:
            record["executor"] = self.executor
        self.cache.set_value("last_render", record)


def _pending(stage, keys, cache):
    done = cache.done_keys(stage.name)
    return [key for key in keys[stage.name] if key not in done]


def _readers(stage, stages):
    return [other for other in stages if stage in other.inputs]


def _recompute_released_inputs(stages, keys, cache):
    """Make not-done again exactly the released units that a unit still to be computed reads (and, in turn, the
    released units those read): the declared reads of each stage (`Stage.reads`) decide. Returns how many."""
    by_name = {stage.name: stage for stage in stages}
    released = {stage.name: cache.released_keys(stage.name) for stage in stages}
    if not any(released.values()):
        return 0
    worklist = [(stage, key) for stage in stages for key in _pending(stage, keys, cache)]
    forced = {}
    while worklist:
        stage, key = worklist.pop()
        for upstream, upstream_key in stage.reads(key):
            if upstream_key in released.get(upstream.name, ()):
                released[upstream.name].discard(upstream_key)
                forced.setdefault(upstream.name, []).append(upstream_key)
                worklist.append((by_name[upstream.name], upstream_key))
    for name, forced_keys in forced.items():
        log.info("stage %s: recomputing %d released unit(s) that units still to do read", name, len(forced_keys))
        cache.forget_units(name, forced_keys)
    return sum(len(forced_keys) for forced_keys in forced.values())


def _walk(stages, keys, cache, stop, progress, report, io_threads, retire=True):
    """One pass over the stages; False when it must start again (a corrupt input was found). `retire`: release
    the inputs every reader of which is done (not in a partial run: stages not in it may still read them)."""
    _recompute_released_inputs(stages, keys, cache)
    for stage in stages:
        pending = _pending(stage, keys, cache)
        if pending:
            try:
                _run_stage(stage, pending, len(keys[stage.name]), cache, stop, progress, report, io_threads)
            except CorruptUnit as corrupt:
                log.warning(str(corrupt))
                cache.forget_unit(corrupt.stage, corrupt.key)
                return False
        if retire:
            _retire_finished_inputs(stage, stages, cache)
    return True


def _run_stage(stage, pending, total, cache, stop, progress, report, io_threads):
    started = time.time()
    prefetcher = InputPrefetcher(stage, pending, cache) if io_threads and stage.prefetch_inputs else None
    log.info("stage %s: %d of %d units to do", stage.name, len(pending), total)
    reused = total - len(pending)
    description = f"{stage.name} ({reused} reused)" if reused else stage.name
    bar = tqdm(total=total, initial=reused, desc=description, unit="unit", disable=not progress,
               dynamic_ncols=True, leave=True)
    try:
        for index, (key, data, path) in enumerate(stage.run(pending)):
            if prefetcher:
                prefetcher.finished(index)
            write_unit(cache, stage, key, data, path)
            report.computed[stage.name] += 1
            bar.update(1)
            if stop.stop_requested:
                raise Interrupted(f"stopped after {stage.name}/{key}; run the same command again to resume")
    finally:
        if prefetcher:
            prefetcher.stop()
        bar.close()
    log.info("stage %s: done in %.1f s", stage.name, time.time() - started)


def write_unit(cache, stage, key, data, path, digest=None):
    """Store one computed unit; a full or read-only disk becomes one line for the user."""
    try:
        cache.write(stage.name, key, data, path, digest)
    except (OSError, sqlite3.OperationalError) as error:
        raise storage_error(error, cache.run_dir, f"{stage.name}/{key}") or error from None


def releasable(stage, keep=None):
    """Whether the run's data.keep policy (`Stage.keep`, or `keep` when given) lets `stage`'s files go once every
    stage reading it is complete: ephemeral stages under every policy; under `resume` every stage not marked
    `kept_for_resume`; under `outputs` every stage. A stage that nothing reads (the outputs) is nobody's input, so
    it is never released. Pure: diffsynth.plan simulates the disk under each policy with it."""
    policy = keep or stage.keep
    return stage.ephemeral or policy == "outputs" or (policy == "resume" and not stage.kept_for_resume)


def may_release(upstream, stages, cache):
    """Whether `upstream`'s files may be deleted now: its policy allows it, it is not released yet, and every stage
    reading it is complete (so nothing still to be computed reads it)."""
    return (releasable(upstream) and not cache.is_retired(upstream.name)
            and all(_is_complete(reader, cache) for reader in _readers(upstream, stages)))


def _retire_finished_inputs(stage, stages, cache):
    for upstream in stage.inputs:
        if may_release(upstream, stages, cache):
            cache.retire_stage(upstream.name)


def _is_complete(stage, cache):
    done, total, _ = cache.progress(stage.name)
    return done >= total
