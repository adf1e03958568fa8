"""Launching, watching, cancelling and resuming renders from the web UI.

A render is the CLI's `python -m diffsynth render CONFIG`, started in its own session (start_new_session=True), so
closing the browser tab, refreshing it or restarting the page's script does not stop it. Everything the page shows is
read back from the run folder: manifest.sqlite (done/total per stage, unit finish times → rate and ETA, the newest
finished frame), render.log (the log tail), and webui-process.log (the process's own output, for errors that happen
before the render's log exists). A run folder is identified by its name under the output root.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import yaml

from ..cache import RunCache, is_locked, open_manifest
from ..config import read_text
from ..demo import REPO_ROOT
from ..errors import UserError

CONFIG_NAME = "config.yaml"        # what the page saved before launching
RESOLVED_CONFIG = "config.json"    # what the render wrote (absolute paths); Resume prefers it
PROCESS_LOG = "webui-process.log"
PID_FILE = "webui.pid"
ACTIVE_STATES = ("starting", "running")

_children = {}  # pid → Popen, so finished children are reaped (no zombies that look alive)


# --- processes ------------------------------------------------------------------------------------------------------

def _pid_alive(pid, started=None, not_after=None):
    """Whether `pid` is a live diffsynth render, and (a pid can be reused once its process is gone) the same
    process: started at `started` (the start time recorded when the page launched it), or no later than
    `not_after` (the time the lock holder wrote the lock file: a process started after that is not the holder)."""
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child that another page run launched
    except (ChildProcessError, OSError):
        pass
    try:
        import psutil
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or not _is_render_process(process):
            return False
        created = process.create_time()
    except Exception:  # noqa: BLE001 - no such process, no access: not ours
        return False
    if started is not None and abs(created - started) > 1.0:
        return False
    return not_after is None or created <= not_after + 1.0


def _is_render_process(process):
    try:
        command = " ".join(process.cmdline())
    except Exception:  # noqa: BLE001
        return False
    return "diffsynth" in command and "render" in command


def _read_pid(path):
    return _read_pid_record(path)[0]


def _read_pid_record(path):
    """(pid, start time or None) from a pid file ("1234 1700000000.52", as launch writes it) or the render's lock
    file ("pid 1234")."""
    try:
        words = Path(path).read_text().split()
    except OSError:
        return None, None
    numbers = [word for word in words if word.replace(".", "", 1).isdigit()]
    pid = int(numbers[0]) if numbers and numbers[0].isdigit() else None
    started = float(numbers[1]) if len(numbers) > 1 else None
    return pid, started


def _process_start(pid):
    try:
        import psutil
        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone already: nothing to record
        return None


def render_pid(run_dir):
    """The pid of the render working in this run folder, or None: the lock holder, else the process the page
    launched while it is still starting up (before it takes the lock). A process that held the lock and let it go
    is only exiting: it no longer counts."""
    return render_process(run_dir)[0]


def render_process(run_dir):
    """(pid, how to recognise that very process: {"started": …} or {"not_after": …}) of render_pid."""
    run_dir = Path(run_dir)
    lock_pid = _read_pid(run_dir / "lock")
    if is_locked(run_dir):
        try:
            return lock_pid, {"not_after": (run_dir / "lock").stat().st_mtime}
        except OSError:
            return lock_pid, {}
    launched, started = _read_pid_record(run_dir / PID_FILE)
    if launched and launched != lock_pid and _pid_alive(launched, started=started):
        return launched, {"started": started}
    return None, {}


def check_inputs(config):
    """The checks a render makes first, made before the page creates the run folder, so a mistake in the form
    leaves no 'failed' run behind: every source video or image folder opens and holds frames in the chosen range,
    and every model file is what its place in the config needs (the CLI's own functions). UserError, one line."""
    from ..models.loader import classify_model_list
    from ..pipeline import frame_range
    from ..video import probe

    for frames in [config.data.input_frames, *(config.data.controlnet_frames or [])]:
        frame_range(frames, probe(frames))
    models = config.models
    classify_model_list(models.model_list, [unit.model_path for unit in models.controlnet_units],
                        models.lora_alphas, models.textual_inversion_folder)


def save_run_config(config, run_dir):
    """Write the validated config into the run folder (absolute paths) before launching; returns its path."""
    run_dir = Path(run_dir)
    RunCache(run_dir).close()  # claims the folder as a run folder (refused if it holds someone else's files)
    data = config.model_dump() if hasattr(config, "model_dump") else config
    path = run_dir / CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)
    return path


def launch(run_dir, config_path, extra_env=None):
    """Start `python -m diffsynth render CONFIG` for a run folder in the background; returns its pid.
    Refuses (UserError) while a render is already working in that folder."""
    run_dir = Path(run_dir)
    if render_pid(run_dir):
        raise UserError(f"a render is already running in {run_dir.name}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra_env or {})
    with open(run_dir / PROCESS_LOG, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} render {config_path}\n".encode())
        log.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", "diffsynth", "render", str(config_path), "--no-progress"],
            cwd=str(run_dir), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, close_fds=True)
    _children[process.pid] = process
    started = _process_start(process.pid)  # with the pid: a later process given the same pid is not this one
    (run_dir / PID_FILE).write_text(f"{process.pid} {started:.3f}" if started else str(process.pid))
    return process.pid


def resume(run_dir, settings, extra_env=None):
    """Launch the render again with the run folder's own config (config.json, else config.yaml)."""
    from .form import confine_paths
    run_dir = Path(run_dir)
    for name in (RESOLVED_CONFIG, CONFIG_NAME):
        config_path = run_dir / name
        if config_path.is_file():
            break
    else:
        raise UserError(f"{run_dir.name} has no config.json or config.yaml to resume from")
    data = yaml.safe_load(read_text(config_path)) or {}
    data = dict(data)
    if isinstance(data.get("data"), dict):
        data["data"] = dict(data["data"], output_folder=str(run_dir))
    # Relative paths resolved as the render would (against the config file's folder, the run folder), checked, and
    # exactly that launched: the run folder's config with output_folder made this folder (a renamed run folder
    # renders into itself) and every path absolute, written beside it, not the stored file.
    data, problems = confine_paths(data, settings, base=run_dir)
    if problems:
        key, message = next(iter(problems.items()))
        raise UserError(f"cannot resume {run_dir.name}: {key}: {message}")
    return launch(run_dir, save_run_config(data, run_dir), extra_env)


def cancel(run_dir):
    """Ask the render to stop after its current unit (SIGTERM; the run stays resumable). False if none runs."""
    pid, same = render_process(run_dir)
    if not pid or not _pid_alive(pid, **same):  # only that very diffsynth render is signalled (pids are reused)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


# --- progress -------------------------------------------------------------------------------------------------------

def tail(path, lines=30, max_bytes=64 * 1024):
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - max_bytes))
            text = file.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _connect_read_only(run_dir):
    """A read-only connection to the run's manifest (never a write: the page must not contend with the render, and
    a poll changes nothing in the folder): cache.open_manifest's."""
    return open_manifest(run_dir, read_only=True, timeout=5)


# Finish times kept per stage for the rates: enough for a steady estimate, bounded however long the video is.
TIMING_SAMPLE = 64
PAUSE_SECONDS = 60.0  # a gap between two finishes longer than this is a pause (interrupted, resumed later), not work


class Timings:
    """The finish times a run page needs, read incrementally: each refresh reads only the manifest rows added since
    the last one (by rowid, which grows in finishing order), so a refresh costs the same on a 48-frame clip and on a
    10,000-frame film. Keeps the newest TIMING_SAMPLE finish times per stage and the seconds of work so far (the gaps
    between consecutive finishes, pauses left out)."""

    def __init__(self):
        self.last_rowid = 0
        self.last_finished = None
        self.elapsed = 0.0
        self.recent = {}  # stage → deque of its newest finish times
        self.rows_last_read = 0  # how many rows the last refresh read (the tests check it stays small)

    def read_new_rows(self, db):
        rows = db.execute("SELECT rowid, stage, finished FROM units WHERE rowid > ? ORDER BY rowid",
                          (self.last_rowid,)).fetchall()
        for rowid, stage, finished in rows:
            if self.last_finished is not None and 0 <= finished - self.last_finished <= PAUSE_SECONDS:
                self.elapsed += finished - self.last_finished
            self.last_finished = finished
            self.recent.setdefault(stage, deque(maxlen=TIMING_SAMPLE)).append(finished)
            self.last_rowid = rowid
        self.rows_last_read = len(rows)

    def units(self):
        """(stage, key, path, finished) rows for progress_metrics (keys and paths are not needed there)."""
        return sorted(((stage, None, None, t) for stage, times in self.recent.items() for t in times),
                      key=lambda row: row[3])


_timings = {}  # (run folder, manifest inode) → Timings; a re-created manifest starts afresh
_timings_lock = threading.Lock()  # Streamlit draws each browser session in its own thread


def _run_timings(run_dir, db):
    manifest = Path(run_dir) / "manifest.sqlite"
    key = (str(Path(run_dir).resolve()), manifest.stat().st_ino)
    with _timings_lock:
        timings = _timings.get(key)
        newest = db.execute("SELECT MAX(rowid) FROM units").fetchone()[0] or 0
        if timings is None or newest < timings.last_rowid:  # rows deleted at the end: read again from the start
            timings = _timings[key] = Timings()
        timings.read_new_rows(db)
        return timings


def read_manifest(run_dir, with_timings=True):
    """What the page needs from manifest.sqlite: per stage done/total/bytes (one aggregate query), the render's
    recorded outcome, the finished frames still on disk, and (with_timings) the Timings of the run. None when
    there is no readable manifest."""
    if not (Path(run_dir) / "manifest.sqlite").is_file():
        return None
    try:
        db = _connect_read_only(run_dir)
    except (sqlite3.Error, UserError):
        return None
    try:
        counts = {stage: (done, size) for stage, done, size in db.execute(
            "SELECT stage, COUNT(*), COALESCE(SUM(CASE WHEN size > 0 THEN size END), 0) FROM units GROUP BY stage")}
        stages = []
        for name, total, retired in db.execute("SELECT name, total, retired FROM stages ORDER BY position"):
            done, size = counts.get(name, (0, 0))
            stages.append({"name": name, "done": done, "total": total, "complete": done >= total,
                           "retired": bool(retired), "bytes": 0 if retired else size})
        row = db.execute("SELECT value FROM run WHERE key = 'outcome'").fetchone()
        outcome = json.loads(row[0]) if row else {}
        frame_rows = db.execute(
            "SELECT stage, key FROM units WHERE stage IN ('encode', 'vae_decode') AND size > 0").fetchall()
        shots = detected_shots(db, run_dir)
        timings = _run_timings(run_dir, db) if with_timings else None
    except (sqlite3.Error, ValueError, OSError):
        return None
    finally:
        db.close()
    return {"stages": stages, "outcome": outcome, "timings": timings, "shots": shots,
            "frames": sorted({index for index in map(_frame_of_row, frame_rows) if index is not None})}


def detected_shots(db, run_dir):
    """The first frame of each shot the render planned with: the shots stage's result (data.shots: auto), else
    the shots its config.json gives (none: one shot; a list); None while not known yet."""
    from ..cache import CorruptUnit, read_unit
    from ..stages.shots import SHOTS_KEY, ShotsStage, bytes_to_shots
    try:
        shots = json.loads((Path(run_dir) / "config.json").read_text())["data"].get("shots", "auto")
    except (OSError, ValueError, KeyError, TypeError):
        shots = "auto"
    if shots == "none":
        return [0]
    if isinstance(shots, list):
        return sorted({0, *shots})
    try:
        return bytes_to_shots(read_unit(db, run_dir, ShotsStage.name, SHOTS_KEY))
    except (CorruptUnit, OSError, ValueError, KeyError):
        return None


def shot_strip(num_frames, finished, shot_starts, index, width=640, height=14):
    """uint8 (height, width, 3) picture of the frame scrubber's track: finished frames light, the others dark, a
    red line where each new shot starts, and the frame shown in white."""
    strip = np.full((height, width, 3), 60, np.uint8)
    column = lambda frame: min(width - 1, frame * width // max(1, num_frames))  # noqa: E731
    for frame in finished:
        strip[3:-3, column(frame):column(frame + 1) + 1] = 170
    for start in (shot_starts or [0])[1:]:
        strip[:, column(start)] = (230, 40, 40)
    strip[:, max(0, column(index) - 1):column(index) + 2] = 255
    return strip


def shot_caption(shot_starts, num_frames, index):
    """"frame 20 is in shot 2 of 4 (frames 16–31); new shots at 16, 32, 64"."""
    if not shot_starts:
        return "shots: not detected yet"
    position = max(i for i, start in enumerate(shot_starts) if start <= index)
    end = shot_starts[position + 1] if position + 1 < len(shot_starts) else num_frames
    text = f"frame {index} is in shot {position + 1} of {len(shot_starts)} (frames {shot_starts[position]}–{end - 1})"
    return text + (f"; new shots at {', '.join(map(str, shot_starts[1:]))}" if len(shot_starts) > 1 else "")


def _frame_of_row(row):
    """The output frame index a unit holds (frames/00012.png, vae_decode 000012.safetensors), or None."""
    stage, key = row
    if stage == "encode":
        match = re.fullmatch(r"frames/(\d+)\.png", key)
    else:
        match = re.fullmatch(r"(\d+)\.safetensors", key)
    return int(match.group(1)) if match else None


def _family(name):
    """Stages that do the same work per unit: denoise.003.windows ~ denoise.000.windows."""
    return ".".join("#" if part.isdigit() else part for part in name.split("."))


def _active_seconds(times, gap=None):
    """Seconds of work between the first and last finish time, leaving out long pauses (between an interruption and
    its resume)."""
    if len(times) < 2:
        return 0.0
    diffs = [b - a for a, b in zip(times, times[1:])]
    ordered = sorted(diffs)
    median = ordered[len(ordered) // 2]
    limit = gap if gap is not None else max(PAUSE_SECONDS, 20 * median)
    return sum(d for d in diffs if d <= limit)


def progress_metrics(stages, units, now=None, elapsed_seconds=None):
    """Per-stage seconds/unit from the finish times, the current stage's rate, frames/s end to end, and the ETA.

    A stage's rate comes from its own finish times, else from a stage of the same family (denoising step 2 from
    step 1). A stage that neither has timed is *untimed*: the ETA then covers only the timed stages (eta_untimed
    names the rest, and the page says "at least"), and before the current stage is timed there is no ETA at all —
    a few fast decodes say nothing about how long denoising takes."""
    by_stage = {}
    for stage, _, _, finished in units:
        by_stage.setdefault(stage, []).append(finished)
    seconds_per_unit = {}
    for name, times in by_stage.items():
        times = sorted(times)
        if len(times) >= 2:
            active = _active_seconds(times)
            if active > 0:
                seconds_per_unit[name] = active / (len(times) - 1)
    family_spu = {}
    for name, spu in seconds_per_unit.items():
        family_spu.setdefault(_family(name), []).append(spu)
    all_times = sorted(t for times in by_stage.values() for t in times)
    spent = _active_seconds(all_times) if elapsed_seconds is None else elapsed_seconds

    def estimate(name):
        if name in seconds_per_unit:
            return seconds_per_unit[name]
        family = family_spu.get(_family(name))
        return sum(family) / len(family) if family else None

    current = next((s for s in stages if not s["complete"]), None)
    remaining, untimed = 0.0, []
    for stage in stages:
        left = max(0, stage["total"] - stage["done"])
        if left:
            spu = estimate(stage["name"])
            if spu is None:
                untimed.append(stage["name"])
            else:
                remaining += left * spu
    rate = None
    if current is not None and current["name"] in seconds_per_unit and seconds_per_unit[current["name"]] > 0:
        rate = 1.0 / seconds_per_unit[current["name"]]
    if current is None:
        eta = 0.0
    elif current["name"] in untimed:
        eta = None  # nothing timed yet where the render is: any number would be a guess
    else:
        eta = remaining
    frames = next((s["total"] for s in stages if s["name"] == "vae_decode"), None)
    fps = None
    if frames and not untimed and spent + remaining > 0 and len(all_times) >= 2:
        fps = frames / (spent + remaining)
    return {"current_stage": current["name"] if current else None, "stage_rate": rate, "fps": fps,
            "eta_seconds": eta, "eta_untimed": untimed if eta is not None else [],
            "elapsed_seconds": spent, "last_finished": all_times[-1] if all_times else None}


def output_frame_file(run_dir, index):
    """The file holding finished output frame `index`: the final PNG, else the decoded frame in the cache."""
    for file in (Path(run_dir) / "frames" / f"{index:05d}.png",
                 Path(run_dir) / "cache" / "vae_decode" / f"{index:06d}.safetensors"):
        if file.is_file():
            return file
    return None


def source_frame_file(run_dir, index):
    """The cropped source frame `index` as the render saw it (the crop stage's unit), or None once released."""
    file = Path(run_dir) / "cache" / "crop" / f"{index:06d}.safetensors"
    return file if file.is_file() else None


def read_frame(file):
    """uint8 (H, W, 3) array of a frame file (PNG or a cached frame); None if it vanished (released meanwhile).
    For display only: no checksum check (the render checks every read it makes)."""
    from PIL import Image

    from ..cache import bytes_to_image
    try:
        if file.suffix == ".png":
            with Image.open(file) as image:
                return np.asarray(image.convert("RGB"))
        return bytes_to_image(file.read_bytes())
    except (OSError, ValueError, KeyError):
        return None


def read_progress(run_dir, with_timings=True):
    """Everything the run page shows, read from the run folder. state: new, starting, running, complete,
    interrupted or failed. Without timings (the runs list), the metrics are left empty."""
    run_dir = Path(run_dir)
    report = {"run_dir": str(run_dir), "name": run_dir.name, "state": "new", "stages": [], "message": None,
              "video": None, "frames": [], "shots": None, "log": "", "process_log": tail(run_dir / PROCESS_LOG, 15),
              "pid": render_pid(run_dir), "metrics": progress_metrics([], [])}
    manifest = read_manifest(run_dir, with_timings)
    if manifest is not None:
        stages, outcome = manifest["stages"], manifest["outcome"]
        complete = bool(stages) and all(stage["complete"] for stage in stages)
        if is_locked(run_dir):
            state = "running"
        elif complete:
            state = "complete"
        else:  # a killed process recorded nothing after "running": that is an interruption too
            state = "failed" if outcome.get("state") == "failed" else "interrupted"
        report.update(state=state, stages=stages, message=outcome.get("message"), frames=manifest["frames"],
                      shots=manifest["shots"], video=str(run_dir / "video.mp4") if complete else None)
        timings = manifest["timings"]
        if timings is not None:
            report["metrics"] = progress_metrics(stages, timings.units(), elapsed_seconds=timings.elapsed)
    elif (run_dir / "manifest.sqlite").is_file():
        report.update(state="failed", message="manifest.sqlite cannot be read")
    if report["state"] != "running":
        if report["pid"] and report["state"] != "complete":
            report["state"] = "starting"  # launched, not holding the lock yet (loading, or a resume just begun)
        elif report["state"] == "new" and (run_dir / PROCESS_LOG).is_file():
            report["state"] = "failed"
        if report["state"] in ("failed", "interrupted") and not report["message"]:
            report["message"] = _last_error(report["process_log"])
        elif report["state"] == "failed" and report["message"] is None:
            report["message"] = "the render exited before starting; see the process log"
    if report["video"] and not Path(report["video"]).is_file():
        report["video"] = None
    report["log"] = tail(run_dir / "render.log", 40)
    report["done"] = sum(s["done"] for s in report["stages"])
    report["total"] = sum(s["total"] for s in report["stages"])
    return report


def _last_error(process_log):
    for line in reversed(process_log.splitlines()):
        if line.startswith(("error:", "interrupted:")) or "Error" in line.split(":")[0]:
            return line
    return None


def list_runs(settings):
    """Every run folder under the output root, newest first, with its state."""
    root = Path(settings.output)
    if not root.is_dir():
        return []
    runs = []
    for folder in root.iterdir():
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        if not any((folder / name).exists() for name in ("manifest.sqlite", CONFIG_NAME, PID_FILE)):
            continue
        try:
            report = read_progress(folder, with_timings=False)
        except Exception as error:  # noqa: BLE001 - one broken folder must not hide the others
            report = {"name": folder.name, "state": "failed", "message": str(error), "done": 0, "total": 0}
        report["mtime"] = max((folder / n).stat().st_mtime for n in ("manifest.sqlite", CONFIG_NAME, PID_FILE)
                              if (folder / n).exists())
        runs.append(report)
    runs.sort(key=lambda r: r["mtime"], reverse=True)
    return runs


def format_seconds(seconds):
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
