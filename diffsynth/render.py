"""The render: run or resume the stages a config describes (diffsynth.pipeline.build_stages) in one run folder.

It sits above both pipeline.py (the stage list) and plan.py (the free-space check before work starts), which
itself builds the stage list through pipeline.py: a module imports downward."""

import logging
import os
import sqlite3
import sys
from contextlib import nullcontext
from pathlib import Path

from .cache import RunCache, atomic_write, check_run_folder, storage_error
from .config import config_json
from .errors import Interrupted, UserError
from .executor import executor_for
from .models.check import lora_misfits
from .models.loader import ModelStore
from .pipeline import RenderContext, build_stages, shots_line
from .plan import check_free_space
from .runner import StopFlag, run_stages
from .stages.encode import VIDEO_KEY
from .stages.shots import ShotsStage

log = logging.getLogger("diffsynth")


def render(config, progress=True, verify=False, force=False):
    """Run or resume the render of `config` in its output folder; returns the path of video.mp4. `verify`: check
    every cached unit's checksum before starting (see run_stages). Refuses (UserError) when the disk cannot hold
    the predicted peak minus what the run folder already stores, unless `force` (diffsynth.plan).

    The inputs (videos, model files) are checked before the run folder is created or touched, so a bad input
    leaves no folder behind and changes nothing in an existing one."""
    run_dir = Path(config.data.output_folder)
    check_run_folder(run_dir)
    with StopFlag() as stop:  # from here on, SIGINT/SIGTERM mean "stop cleanly" (exit code 3)
        ctx = RenderContext(config, None, ModelStore(config.models))
        check_loras(ctx.models)
        stages = build_stages(ctx, detect=False)  # the disk is checked with one shot when none is detected yet
        warnings = input_warnings(stages)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)
        if not force:
            check_free_space(config, stages)  # before the run folder is touched: a refusal changes nothing
        cache = ctx.cache = RunCache(run_dir)
        try:
            cache.lock()
            handler = log_to(run_dir / "render.log")
            try:
                atomic_write(run_dir / "config.json", config_json(config).encode())
                log.info("render of %s: %d stages", run_dir, len(stages))
                for line in warnings:
                    log.warning("input: %s", line)
                cache.set_value("outcome", {"state": "running", "pid": os.getpid()})
                earlier = None
                if ctx.shot_starts is None:  # shots: auto, not detected yet: the crop and the detection first
                    shot_stage = next(stage for stage in stages if isinstance(stage, ShotsStage))
                    earlier = run_stages([shot_stage.frames, shot_stage], cache, progress=progress, stop=stop,
                                         partial=True)
                    stages = build_stages(ctx, detect=False)  # now planned with the stored shots
                log.info(shots_line(config, ctx.shot_starts, len(stages[0].unit_keys())))
                with executor_for(config.executor, ctx.device, stages) or nullcontext() as executor:
                    report = run_stages(stages, cache, progress=progress, stop=stop, verify=verify,
                                        executor=executor, earlier=earlier)
                cache.set_value("outcome", {"state": "complete"})
                log.info("render complete: %s", run_dir / VIDEO_KEY)
                print(report.summary, file=sys.stderr, flush=True)
            except Interrupted as interruption:
                record_outcome(cache, {"state": "interrupted", "message": str(interruption)})
                log.warning("interrupted: %s", interruption)
                raise
            except Exception as error:  # noqa: BLE001 - record why, then let the CLI report it
                error = storage_error(error, run_dir) or error
                record_outcome(cache, {"state": "failed", "message": str(error).splitlines()[0] if str(error)
                                       else type(error).__name__})
                if isinstance(error, UserError):
                    log.error("render stopped: %s", error)
                    raise error from None
                log.exception("render failed")
                raise
            finally:
                logging.getLogger("diffsynth").removeHandler(handler)
                handler.close()
        finally:
            cache.close()
    return run_dir / VIDEO_KEY


def check_loras(models):
    """Every LoRA's tensors against the base model's architecture (headers only), before the first stage runs: a
    LoRA for another model otherwise fails when the UNet loads, after the early stages."""
    misfits = lora_misfits(models.files.base, [path for path, _ in models.files.loras],
                           getattr(models.config, "lora_convention", "kohya"))
    if misfits:
        raise UserError(misfits[0][1])


def input_warnings(stages):
    """What the stages say about their inputs that the render will take as said (Stage.input_warnings)."""
    return [line for stage in stages for line in stage.input_warnings()]


def record_outcome(cache, outcome):
    """Best effort: on a full or read-only disk even this row cannot be committed, and the error being reported
    matters more (status reads a render that recorded nothing after "running" as interrupted)."""
    try:
        cache.set_value("outcome", outcome)
    except (sqlite3.Error, OSError) as error:
        log.warning("could not record the render's outcome: %s", error)


class QuietFileHandler(logging.FileHandler):
    """The render's log file. A line that cannot be written (a full disk) is dropped: the error that matters is
    reported on its own, as one line, not buried under logging's tracebacks."""

    def handleError(self, record):
        pass


def log_to(path):
    handler = QuietFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("diffsynth")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler
