"""The generic runner: walks the stages in order, skips done units, runs the rest, reports progress.

It knows no stage by name. Its rules:
- a stage whose fingerprint changed starts over (the cache forgets it); stages no longer planned are dropped;
- a unit whose cached file turns out corrupt when read is forgotten and the walk starts again from the top, so the
  stage that made it recomputes it;
- an ephemeral stage's files are deleted once every stage that reads it is complete; if one of those readers later
  needs it again (a corrupt unit downstream), the ephemeral stage is recomputed first;
- SIGINT/SIGTERM stop after the current unit (Interrupted, exit code 3).
"""

import logging
import os
import signal
import time

from tqdm import tqdm

from .cache import CorruptUnit
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


def _test_hang_hook():
    """Testing aid: DIFFSYNTH_TEST_HANG_AT=stage_prefix:n makes the process hang after writing the temp file of that
    stage's n-th unit (before rename and manifest row), so a test can SIGKILL it mid-write, deterministically."""
    spec = os.environ.get("DIFFSYNTH_TEST_HANG_AT")
    if not spec:
        return None
    prefix, count = spec.rsplit(":", 1)
    seen = {"n": 0}

    def hook(stage, key):
        if stage.startswith(prefix):
            seen["n"] += 1
            if seen["n"] >= int(count):
                print(f"HANGING in {stage}/{key}", flush=True)
                while True:
                    time.sleep(1)
    return hook


def run_stages(stages, cache, progress=True, stop=None):
    """Run every stage to completion (or until a stop is requested). `stop`: a StopFlag the caller installed
    earlier (so a signal during its own start-up counts too); by default the runner installs one itself."""
    if stop is None:
        with StopFlag() as stop:
            return run_stages(stages, cache, progress, stop)
    names = [stage.name for stage in stages]
    assert len(set(names)) == len(names), f"duplicate stage names in {names}"
    cache.forget_other_stages(set(names))
    keys = {}
    for position, stage in enumerate(stages):
        keys[stage.name] = stage.unit_keys()
        cache.open_stage(stage.name, stage.fingerprint, len(keys[stage.name]), position)
        cache.verify_stage(stage.name, full=not _readers(stage, stages))
    removed = cache.remove_leftovers()
    if removed:
        log.info("removed %d leftover file(s) from an interrupted run", removed)
    hang_hook = _test_hang_hook()
    if stop.stop_requested:
        raise Interrupted("stopped before the first unit; run the same command again to resume")
    while not _walk(stages, keys, cache, stop, progress, hang_hook):
        pass


def _readers(stage, stages):
    return [other for other in stages if stage in other.inputs]


def _walk(stages, keys, cache, stop, progress, hang_hook):
    """One pass over the stages; False when it must start again (a corrupt or retired input was found)."""
    for stage in stages:
        done = cache.done_keys(stage.name)
        if done is None:
            continue  # retired: complete, files no longer needed
        pending = [key for key in keys[stage.name] if key not in done]
        if pending:
            retired_inputs = [s for s in stage.inputs if cache.is_retired(s.name)]
            if retired_inputs:
                for upstream in retired_inputs:
                    log.info("recomputing %s, needed again by %s", upstream.name, stage.name)
                    cache.reset_stage(upstream.name)
                return False
            try:
                _run_stage(stage, pending, len(keys[stage.name]), cache, stop, progress, hang_hook)
            except CorruptUnit as corrupt:
                log.warning(str(corrupt))
                cache.forget_unit(corrupt.stage, corrupt.key)
                return False
        _retire_finished_inputs(stage, stages, cache)
    return True


def _run_stage(stage, pending, total, cache, stop, progress, hang_hook):
    started = time.time()
    log.info("stage %s: %d of %d units to do", stage.name, len(pending), total)
    bar = tqdm(total=total, initial=total - len(pending), desc=stage.name, unit="unit", disable=not progress,
               dynamic_ncols=True, leave=True)
    try:
        for key, data, path in stage.run(pending):
            if data is None:  # the stage wrote the file at `path` itself, atomically
                if hang_hook:
                    hang_hook(stage.name, key)
                cache.record_file(stage.name, key, path)
            else:
                before_rename = (lambda: hang_hook(stage.name, key)) if hang_hook else None
                cache.write(stage.name, key, data, path, before_rename=before_rename)
            bar.update(1)
            if stop.stop_requested:
                raise Interrupted(f"stopped after {stage.name}/{key}; run the same command again to resume")
    finally:
        bar.close()
    log.info("stage %s: done in %.1f s", stage.name, time.time() - started)


def _retire_finished_inputs(stage, stages, cache):
    for upstream in stage.inputs:
        if not upstream.ephemeral or cache.is_retired(upstream.name):
            continue
        readers = _readers(upstream, stages)
        if all(_is_complete(reader, cache) for reader in readers):
            cache.retire_stage(upstream.name)


def _is_complete(stage, cache):
    done, total, _ = cache.progress(stage.name)
    return done >= total
