"""What a run folder holds: per stage done/total, bytes on disk, complete or not; running or not. Read-only: the
manifest is opened with SQLite's mode=ro (cache.RunCache.reader) and nothing in the folder is created or changed."""

import sqlite3
from pathlib import Path

from .cache import NOT_A_MANIFEST, RunCache
from .errors import UserError


def run_status(run_dir):
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.sqlite").is_file():
        raise UserError(f"{run_dir} is not a run folder (no manifest.sqlite)")
    for attempt in range(2):  # a render that closed its manifest between the open and the reads: read it again
        cache = RunCache.reader(run_dir)
        try:
            return _report(run_dir, cache)
        except sqlite3.DatabaseError:  # its tables are a manifest's, but a page is damaged
            if attempt:
                raise UserError(NOT_A_MANIFEST.format(path=run_dir / "manifest.sqlite")) from None
        finally:
            cache.close()


def _report(run_dir, cache):
    made = cache.has_tables()  # False: a render stopped before it made the tables (nothing done)
    stages = []
    for name in cache.stage_names() if made else []:
        done, total, retired = cache.progress(name)
        stages.append({"name": name, "done": done, "total": total, "complete": done >= total,
                       "retired": retired, "bytes": 0 if retired else cache.bytes_on_disk(name)})
    complete = bool(stages) and all(stage["complete"] for stage in stages)
    outcome = cache.get_value("outcome", {}) if made else {}
    if cache.is_locked():
        state = "running"
    elif complete:
        state = "complete"
    else:  # a killed process recorded nothing after "running": that is an interruption too
        state = "failed" if outcome.get("state") == "failed" else "interrupted"
    return {"run_dir": str(run_dir), "state": state, "complete": complete, "stages": stages,
            "units_left": sum(max(0, stage["total"] - stage["done"]) for stage in stages),
            "last_render": cache.get_value("last_render") if made else None,
            "message": outcome.get("message"), "video": str(run_dir / "video.mp4") if complete else None}
