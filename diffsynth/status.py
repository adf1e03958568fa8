"""What a run folder holds: per stage done/total, bytes on disk, complete or not; running or not."""

from pathlib import Path

from .cache import RunCache
from .errors import UserError


def run_status(run_dir):
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.sqlite").is_file():
        raise UserError(f"{run_dir} is not a run folder (no manifest.sqlite)")
    cache = RunCache(run_dir)
    try:
        stages = []
        for name in cache.stage_names():
            done, total, retired = cache.progress(name)
            stages.append({"name": name, "done": done, "total": total, "complete": done >= total,
                           "retired": retired, "bytes": 0 if retired else cache.bytes_on_disk(name)})
        complete = bool(stages) and all(stage["complete"] for stage in stages)
        outcome = cache.get_value("outcome", {})
        if cache.is_locked():
            state = "running"
        elif complete:
            state = "complete"
        else:  # a killed process recorded nothing after "running": that is an interruption too
            state = "failed" if outcome.get("state") == "failed" else "interrupted"
        return {"run_dir": str(run_dir), "state": state, "complete": complete, "stages": stages,
                "units_left": sum(max(0, stage["total"] - stage["done"]) for stage in stages),
                "last_render": cache.get_value("last_render"),
                "message": outcome.get("message"), "video": str(run_dir / "video.mp4") if complete else None}
    finally:
        cache.close()
