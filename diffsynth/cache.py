"""The disk cache every stage writes through: one run folder, one SQLite manifest, atomic unit files.

A unit is done when its manifest row exists and its file matches the row (size at start-up, checksum on every
read). Nothing else counts as done: a file is written to a temporary name, fsynced, renamed into place and its
folder fsynced *before* the row is committed, so a crash at any point leaves either a complete unit or a leftover
that start-up removes.

A done unit is in one of two states: *kept* (its file is on disk) or *released* (its file was deleted on purpose
because nothing still to be computed reads it; the row stays, size -1, with its original finish time). Retiring an
ephemeral stage releases all its units at once. A released unit is still done: it is recomputed only when a unit
that still has to be produced reads it, and the runner works that out before it runs anything.

The program deletes only what it can prove it created: before a unit's file is written, its path is recorded as a
pending write; start-up deletes exactly the pending writes' files (a crash between rename and row) and the files
of released rows (a crash between a release's row update and its unlink). Any other file is left alone.
"""

import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import struct
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import zstandard
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import UserError

TMP_SUFFIX = ".tmp"
RELEASED = -1  # the size recorded for a finished unit whose file was deleted because nothing needs it any more
SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, total INTEGER NOT NULL, retired INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS units (
    stage TEXT NOT NULL, key TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, checksum TEXT NOT NULL,
    finished REAL NOT NULL, PRIMARY KEY (stage, key));
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_writes (path TEXT PRIMARY KEY);
"""


class CorruptUnit(Exception):
    """A cached file no longer matches its manifest row; the runner forgets the unit and recomputes it."""

    def __init__(self, stage, key, reason):
        super().__init__(f"cached unit {stage}/{key} is corrupt ({reason}); recomputing it")
        self.stage, self.key = stage, key


class ReleasedUnit(CorruptUnit):
    """A read of a unit whose file was released on purpose. The runner recomputes every released unit that a unit
    still to do declares it reads before running anything, so this means a stage read more than it declared."""

    def __init__(self, stage, key):
        Exception.__init__(self, f"unit {stage}/{key} was released but is read again (a read its stage did not "
                                 "declare); recomputing it")
        self.stage, self.key = stage, key


def checksum(data):
    # SHA-256: CPUs with SHA extensions hash ~1.5 GB/s, 4× faster here than BLAKE2b; a frame costs ~2 ms.
    return hashlib.sha256(data).hexdigest()[:32]


def file_checksum(path):
    """The checksum of a file, read in blocks (videos can be larger than memory should hold)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, write_to, before_rename=None):
    """Have `write_to(tmp_path)` write a file, then fsync and rename it into `path`, and fsync the folder: `path` is
    either absent, its old content, or the complete new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write_to(tmp)
    with open(tmp, "rb+") as file:
        os.fsync(file.fileno())
    if before_rename:
        before_rename()
    os.replace(tmp, path)
    fsync_folder(path.parent)


def atomic_write(path, data, before_rename=None):
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(data), before_rename)


STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def storage_error(error, run_dir, what="the run folder"):
    """A full or read-only disk is the user's to fix: a UserError (one line; the same command resumes), or None
    when `error` is something else."""
    number = getattr(error, "errno", None)
    if number in STORAGE_ERRNOS:
        reason = os.strerror(number)
    elif isinstance(error, sqlite3.OperationalError) and any(
            text in str(error) for text in ("disk is full", "readonly", "disk I/O error")):
        reason = str(error)
    else:
        return None
    return UserError(f"cannot write {what} in {run_dir}: {reason}; free space on that disk (or make it writable) "
                     "and run the same command again: finished units are kept")


def fingerprint(*parts):
    """A stable hash of JSON-able parts (a stage's name, code version, parameters and its inputs' fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --- unit payload formats: small pure functions, one way each -------------------------------------------------

def tensors_to_bytes(tensors):
    return save_safetensors({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def bytes_to_tensors(data):
    return load_safetensors(data)


FRAME_MAGIC = b"DSF1"  # a cached frame: magic, height, width, channels (uint32 LE each), then the zstd stream
_FRAME_HEADER = struct.Struct("<4sIII")
_ZSTD_LEVEL = 1


def image_to_bytes(array):
    """uint8 (H, W, 3) or one-channel (H, W) array → bytes, lossless: the 2-D gradient residual (pixel − left − up
    + up-left, per channel, mod 256) compressed with zstd level 1. At 1280×768 that is 1.1–1.7 MB for a natural
    frame (raw: 2.95 MB) in ~10 ms, and ~6 ms back; PNG at its fastest level is as small but costs 60–110 ms to
    write (bench/cache_cost.py). The residual's inverse is two running sums, so it round-trips exactly."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"a frame is (H, W) or (H, W, C), not {array.shape}")
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    residual = np.empty_like(array)
    residual[:, :1] = array[:, :1]
    np.subtract(array[:, 1:], array[:, :-1], out=residual[:, 1:])  # left difference …
    residual[1:] -= residual[:-1].copy()  # … then the up difference of that: the 2-D gradient predictor
    return _FRAME_HEADER.pack(FRAME_MAGIC, height, width, channels) + \
        zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(residual.tobytes())


def bytes_to_image(data):
    """The array `image_to_bytes` stored: (H, W, C) uint8, or (H, W) for a one-channel map (edge and depth maps;
    readers that need RGB expand it: `as_rgb`). Frames cached before this format (raw safetensors) read too."""
    if bytes(data[:4]) != FRAME_MAGIC:
        return bytes_to_tensors(data)["image"].numpy()
    _, height, width, channels = _FRAME_HEADER.unpack_from(data)
    shape = (height, width) if channels == 1 else (height, width, channels)
    raw = zstandard.ZstdDecompressor().decompress(memoryview(data)[_FRAME_HEADER.size:],
                                                  max_output_size=height * width * channels)
    image = np.frombuffer(raw, np.uint8).reshape(shape).copy()
    for row in range(1, height):  # undo the up difference: a running sum down the rows (in place, row by row)
        np.add(image[row], image[row - 1], out=image[row])
    return np.cumsum(image, axis=1, dtype=np.uint8)  # undo the left difference


def as_rgb(image):
    """A one-channel map as (H, W, 3); RGB frames unchanged."""
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE)


def image_to_png(array):
    """uint8 (H, W, 3) array → PNG bytes, for the frames users open (frames/00000.png). OpenCV's libpng at zlib
    level 1 with the RLE strategy: at 1280×768 about 60–80 ms and 1.2–1.5 MB, where Pillow's compress_level=1 took
    80–110 ms for 1.4–1.8 MB (bench/cache_cost.py)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3:
        array = np.ascontiguousarray(array[:, :, ::-1])  # OpenCV writes BGR
    ok, encoded = cv2.imencode(".png", array, list(PNG_PARAMS))
    if not ok:
        raise ValueError(f"cannot encode a {array.shape} frame as PNG")
    return encoded.tobytes()


def is_locked(run_dir):
    """True while some process holds the run folder's lock (used by `status` and the web UI)."""
    lock_path = Path(run_dir) / "lock"
    if not lock_path.is_file():
        return False
    with open(lock_path, "a+") as probe:
        try:  # shared: probes never block each other; a render taking the lock retries past a probe's moment
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


KILL_POINTS = ("before_rename", "before_commit", "retire", "release")


def parse_kill_point(spec):
    """Testing aid, DIFFSYNTH_TEST_HANG_AT=[point@]stage_prefix:n: the process prints 'HANGING …' and hangs at
    `point` of the n-th unit of a stage whose name starts with stage_prefix, so that a test can SIGKILL it there.
    Points: before_rename (default: temp file written and fsynced), before_commit (file renamed into place, row not
    yet committed), retire (stage marked retired, files not yet deleted), release (row marked released, file not
    yet deleted; n counts released units)."""
    point, _, rest = spec.rpartition("@")
    point = point or "before_rename"
    prefix, _, count = rest.rpartition(":")
    if point not in KILL_POINTS or not prefix or not count.isdigit() or int(count) < 1:
        raise UserError(f"DIFFSYNTH_TEST_HANG_AT={spec!r} is not [point@]stage_prefix:n with n >= 1 and point one "
                        f"of {', '.join(KILL_POINTS)}; it is a testing aid: unset it for a normal render")
    return point, prefix, int(count)


class KillPoint:
    """Hangs the process at the configured test kill point (see parse_kill_point); does nothing when unset."""

    def __init__(self, spec):
        self.point, self.prefix, self.count = parse_kill_point(spec) if spec else (None, None, 0)
        self.seen = 0

    def __call__(self, point, stage, key):
        if point != self.point or not stage.startswith(self.prefix):
            return
        self.seen += 1
        if self.seen >= self.count:
            print(f"HANGING at {point} in {stage}/{key}", flush=True)
            while True:
                time.sleep(1)


MANIFEST = "manifest.sqlite"


def read_unit(db, run_dir, stage, key):
    """A unit's bytes through manifest connection `db`: CorruptUnit (or ReleasedUnit) unless its file matches its
    row."""
    row = db.execute("SELECT path, size, checksum FROM units WHERE stage = ? AND key = ?", (stage, key)).fetchone()
    if row is None:
        raise CorruptUnit(stage, key, "not in the manifest")
    if row[1] == RELEASED:
        raise ReleasedUnit(stage, key)
    try:
        data = (Path(run_dir) / row[0]).read_bytes()
    except FileNotFoundError:
        raise CorruptUnit(stage, key, "file missing") from None
    if len(data) != row[1] or checksum(data) != row[2]:
        raise CorruptUnit(stage, key, "checksum mismatch")
    return data


def read_stored_unit(run_dir, stage, stage_fingerprint, key):
    """A done unit's bytes from a run folder, read-only (no lock taken, nothing written: a render in progress or
    `diffsynth plan` may ask), when its stage is stored with this fingerprint and the file matches its row; else
    None."""
    manifest = Path(run_dir) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        db = open_manifest(run_dir, read_only=True)  # creates no -wal/-shm (plain mode=ro would)
    except UserError:
        return None
    try:
        row = db.execute("SELECT fingerprint FROM stages WHERE name = ?", (stage,)).fetchone()
        if row is None or row[0] != stage_fingerprint:
            return None
        return read_unit(db, run_dir, stage, key)
    except (sqlite3.Error, CorruptUnit, OSError):
        return None
    finally:
        db.close()


def check_run_folder(run_dir):
    """A render may use a folder that does not exist yet, an empty one, or a run folder (one with our manifest).
    Anything else holds someone's files, which a render must never touch: refuse it (UserError). Checked before
    any work starts: the folder's place (through symbolic links), the run folder's own files, its manifest."""
    run_dir = Path(run_dir)
    try:
        os.stat(run_dir)
    except FileNotFoundError:
        if os.path.islink(run_dir):
            raise UserError(f"output folder {run_dir} is a symbolic link to {os.readlink(run_dir)}, which does not "
                            "exist; create its target or set data.output_folder to a real folder") from None
    except NotADirectoryError:
        raise UserError(f"output folder {run_dir}: a part of that path is a file, not a folder; set "
                        "data.output_folder to a new or empty folder") from None
    except OSError as error:  # ELOOP: a symbolic link loop; EACCES: a folder on the way that cannot be entered
        raise UserError(f"output folder {run_dir} cannot be reached ({os.strerror(error.errno)}); set "
                        "data.output_folder to a new or empty folder") from None
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output folder {run_dir} is a file, not a folder; set data.output_folder to a new or "
                        "empty folder")
    check_not_inside_a_run(run_dir)
    kind = filesystem_type(run_dir)
    if kind in NETWORK_FILESYSTEMS:
        raise UserError(f"output folder {run_dir} is on a network filesystem ({kind}), where the manifest's SQLite "
                        "journal is not safe; set data.output_folder to a folder on a local disk")
    if run_dir.is_dir() and not (run_dir / MANIFEST).is_file():
        entries = sorted(entry.name for entry in run_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
            raise UserError(f"output folder {run_dir} already holds files that are not a render's ({shown}); set "
                            "data.output_folder to a new or empty folder (a render writes only into its own run "
                            "folder)")
    if (run_dir / MANIFEST).is_file():
        check_run_files(run_dir)
        check_manifest(run_dir)  # a damaged manifest is refused before any work starts


# What a run folder holds besides its manifest, and what each must be; anything else in its place is not ours.
RUN_FILES = {"config.json": "file", "render.log": "file", "lock": "file", "video.mp4": "file", "cache": "folder",
             "frames": "folder", MANIFEST + "-wal": "file", MANIFEST + "-shm": "file"}


def check_run_files(run_dir):
    """Each of the run folder's own names, where present, is what the render will write there (a folder named
    config.json would fail the render half-way, after work was done)."""
    for name, kind in RUN_FILES.items():
        path = Path(run_dir) / name
        if not os.path.lexists(path):
            continue
        if path.is_symlink() or (path.is_dir() if kind == "file" else not path.is_dir()):
            what = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
            raise UserError(f"{path} is {what}, where the run folder keeps its {name} {kind}; move it out of the "
                            "run folder (nothing the render made is lost)")


def check_not_inside_a_run(run_dir):
    """A run folder must not lie inside another run folder's cache/ or frames/ (resolved through symbolic links):
    that run owns those folders, lists what it does not know there and deletes what its manifest says it wrote."""
    place = Path(os.path.realpath(Path(run_dir).absolute()))  # through links; a tail not made yet kept
    for folder in (place, *place.parents):
        if folder.name in ("cache", "frames") and (folder.parent / MANIFEST).is_file():
            raise UserError(f"output folder {run_dir} lies inside the {folder.name}/ of the run folder "
                            f"{folder.parent}, which belongs to that run; set data.output_folder to a folder "
                            "outside it (e.g. beside it)")


NOT_A_MANIFEST = "{path} is not a run manifest (damaged?): move it away to start over, or restore it"


def open_manifest(run_dir, read_only=False, timeout=30):
    """A connection to the run folder's manifest, checked: a file that is not SQLite, or a SQLite database whose
    tables are not a manifest's (someone else's database), is refused with one line (UserError) and never changed.

    `read_only` (status, plan, the web UI's polling) changes nothing in the folder. SQLite's plain `mode=ro` would
    still create the -wal and -shm files, so: with no -wal (a finished render, or none yet) the file is opened
    `immutable`; with a live render (it holds the lock) `mode=ro`, taking part in the WAL's locking as every reader
    must (it marks its snapshot in the -shm; the manifest and the -wal are not written); with a -wal a killed render
    left behind, the manifest and that -wal are read from a private copy (its committed rows are in the -wal, and
    opening it in place would rebuild the -shm)."""
    manifest = Path(run_dir) / MANIFEST
    try:
        if not read_only:
            db = sqlite3.connect(manifest, isolation_level=None, timeout=timeout)
        elif not Path(str(manifest) + "-wal").exists():
            db = sqlite3.connect(f"file:{_uri_path(manifest)}?mode=ro&immutable=1", uri=True, isolation_level=None,
                                 check_same_thread=False)
        elif is_locked(run_dir):
            db = sqlite3.connect(f"file:{_uri_path(manifest)}?mode=ro", uri=True, isolation_level=None,
                                 timeout=timeout, check_same_thread=False)
        else:
            db = _private_copy(manifest)
    except sqlite3.Error:
        raise UserError(NOT_A_MANIFEST.format(path=manifest)) from None
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        db.close()
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            raise UserError(f"{manifest} is locked by another process for longer than {timeout} s; wait for it "
                            "or stop it, then run the same command again") from None
        raise UserError(NOT_A_MANIFEST.format(path=manifest)) from None
    if tables and not MANIFEST_TABLES <= tables:  # no tables at all: a render stopped before making them
        db.close()
        raise UserError(NOT_A_MANIFEST.format(path=manifest))
    return db


def _private_copy(manifest):
    """The manifest with a killed render's -wal applied, in memory: copied (manifest and -wal) to a temporary
    folder, read there, and the copy deleted. The run folder's files are only read."""
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory(prefix="diffsynth-manifest-") as folder:
        copy = Path(folder) / MANIFEST
        shutil.copyfile(manifest, copy)
        shutil.copyfile(str(manifest) + "-wal", str(copy) + "-wal")
        source = sqlite3.connect(copy)
        try:
            db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            source.backup(db)
        finally:
            source.close()
    return db


MANIFEST_TABLES = {"stages", "units", "run", "pending_writes"}


def check_manifest(run_dir):
    """Refuse (UserError) a manifest that is not one, or whose pages are damaged (SQLite's quick_check reads every
    page once: milliseconds for a long video's manifest), before a render starts work on it; changes nothing."""
    db = open_manifest(run_dir, read_only=True)
    try:
        result = db.execute("PRAGMA quick_check(1)").fetchone()[0]
    except sqlite3.DatabaseError:
        result = "unreadable"
    finally:
        db.close()
    if result != "ok":
        raise UserError(NOT_A_MANIFEST.format(path=Path(run_dir) / MANIFEST))


def _uri_path(path):
    """A file path as SQLite's URI wants it (%, ?, # escaped)."""
    from urllib.parse import quote
    return quote(str(Path(path).absolute()))


NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "fuse.sshfs", "fuse.rclone",
                       "fuse.s3fs", "fuse.gcsfuse", "glusterfs", "ceph", "fuse.ceph", "lustre", "gpfs", "beegfs"}


def filesystem_type(path, mounts_file="/proc/mounts"):
    """The type of the filesystem holding `path` (its nearest existing folder), from the mount table; None where
    there is no readable mount table."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    path = path.resolve()
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        if (str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")) and \
                len(mount_point) >= len(best):
            best, kind = mount_point, fields[2]
    return kind


class RunCache:
    """A run folder: config.json, manifest.sqlite, cache/<stage>/…, frames/, video.mp4, lock, render.log."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        check_run_folder(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        self.db = open_manifest(self.run_dir)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        # Manifests written before retiring released each row kept their sizes on retired stages.
        self.db.execute("UPDATE units SET size = ? WHERE size != ? AND stage IN "
                        "(SELECT name FROM stages WHERE retired = 1)", (RELEASED, RELEASED))
        self.kill_point = KillPoint(os.environ.get("DIFFSYNTH_TEST_HANG_AT"))
        self.prefetched = {}  # (stage, key) → bytes already read and checked by the runner's reader thread

    # --- locking ------------------------------------------------------------------------------------------------
    def lock(self):
        """Hold the run folder for this process; a second render on the same folder refuses to start."""
        self._lock_file = open(self.run_dir / "lock", "a+")
        if not self._try_lock(attempts=40):  # ~2 s: a status poll or the web UI probing holds it for microseconds
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            raise UserError(f"run folder {self.run_dir} is in use by a render ({holder}); "
                            "wait for it to finish or stop it first") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()}")
        self._lock_file.flush()

    def _try_lock(self, attempts):
        for attempt in range(attempts):
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                time.sleep(0.05)
        return False

    def is_locked(self):
        return is_locked(self.run_dir)

    @classmethod
    def reader(cls, run_dir):
        """The run folder's manifest opened read-only (`diffsynth status`, the web UI): nothing in the folder is
        created or changed, and a render running there is not disturbed. Its methods that write fail."""
        cache = cls.__new__(cls)
        cache.run_dir, cache._lock_file, cache.prefetched = Path(run_dir), None, {}
        cache.kill_point = KillPoint(None)
        cache.db = open_manifest(run_dir, read_only=True)
        return cache

    def has_tables(self):
        """False for a manifest a render made but stopped before creating its tables in (nothing done yet)."""
        names = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return MANIFEST_TABLES <= names

    def close(self):
        self.db.close()
        if self._lock_file:
            self._lock_file.close()

    # --- run-level key/values ---------------------------------------------------------------------------------------
    def set_value(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO run VALUES (?, ?)", (key, json.dumps(value)))

    def get_value(self, key, default=None):
        row = self.db.execute("SELECT value FROM run WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # --- stages ---------------------------------------------------------------------------------------------------
    def unit_path(self, stage, key):
        return self.run_dir / "cache" / stage / key

    def open_stage(self, name, stage_fingerprint, total, position):
        """Register a stage; a stored stage with another fingerprint is stale, so its units are forgotten."""
        row = self.db.execute("SELECT fingerprint FROM stages WHERE name = ?", (name,)).fetchone()
        if row and row[0] != stage_fingerprint:
            self.reset_stage(name)
            row = None
        if row is None:
            self.db.execute("INSERT OR REPLACE INTO stages VALUES (?, ?, ?, 0, ?)",
                            (name, stage_fingerprint, total, position))
        else:
            self.db.execute("UPDATE stages SET total = ?, position = ? WHERE name = ?", (total, position, name))

    def forget_other_stages(self, names):
        """Drop stages that the current plan no longer has (a removed ControlNet unit, smoothing turned off)."""
        for (name,) in self.db.execute("SELECT name FROM stages").fetchall():
            if name not in names:
                self.reset_stage(name)
                self.db.execute("DELETE FROM stages WHERE name = ?", (name,))

    def reset_stage(self, name):
        """Forget every unit of a stage (a stale fingerprint, a stage no longer planned) and delete its files."""
        paths = [path for (path,) in self.db.execute("SELECT path FROM units WHERE stage = ? AND size != ?",
                                                      (name, RELEASED))]
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM units WHERE stage = ?", (name,))
            self.db.execute("UPDATE stages SET retired = 0 WHERE name = ?", (name,))
        for path in paths:
            (self.run_dir / path).unlink(missing_ok=True)

    def retire_stage(self, name):
        """Release every unit of an ephemeral stage once everything that reads it is complete. The stage and its
        rows stay: it is done. Rows first, in one transaction, then the files (a crash in between leaves files of
        released rows, which start-up deletes)."""
        paths = [path for (path,) in self.db.execute("SELECT path FROM units WHERE stage = ? AND size != ?",
                                                      (name, RELEASED))]
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE stages SET retired = 1 WHERE name = ?", (name,))
            self.db.execute("UPDATE units SET size = ? WHERE stage = ?", (RELEASED, name))
        self.kill_point("retire", name, "")
        for path in paths:
            (self.run_dir / path).unlink(missing_ok=True)

    def is_retired(self, name):
        row = self.db.execute("SELECT retired FROM stages WHERE name = ?", (name,)).fetchone()
        return bool(row and row[0])

    def stage_names(self):
        """The registered stages, in the order the runner walks them."""
        return [name for (name,) in self.db.execute("SELECT name FROM stages ORDER BY position")]

    # --- units ----------------------------------------------------------------------------------------------------
    def done_keys(self, stage):
        """Every done unit of a stage, kept or released."""
        return {key for (key,) in self.db.execute("SELECT key FROM units WHERE stage = ?", (stage,))}

    def released_keys(self, stage):
        return {key for (key,) in self.db.execute("SELECT key FROM units WHERE stage = ? AND size = ?",
                                                  (stage, RELEASED))}

    def count_done(self, stage):
        return self.db.execute("SELECT COUNT(*) FROM units WHERE stage = ?", (stage,)).fetchone()[0]

    def progress(self, stage):
        """(done, total, retired) of a registered stage; a retired stage is complete, its files deleted."""
        total, retired = self.db.execute("SELECT total, retired FROM stages WHERE name = ?", (stage,)).fetchone()
        return self.count_done(stage), total, bool(retired)

    def write(self, stage, key, data, path=None, digest=None):
        """Store a unit atomically and record it. `data` is its bytes, or a function that writes the file at the
        path it is given (a video streamed to disk). `path` (relative to the run folder) is for the final outputs
        that users open directly (frames/00000.png, video.mp4); other units live under cache/<stage>/.
        `digest`: the bytes' checksum as computed where they were made (a Ray worker), recorded instead of hashing
        them again here; a byte changed on the way fails the checksum of the first read, which recomputes it."""
        relative = self.relative_path(stage, key, path)
        file = self.run_dir / relative
        self.record_pending(relative)
        write_to = data if callable(data) else (lambda tmp: Path(tmp).write_bytes(data))
        write_atomically(file, write_to, before_rename=lambda: self.kill_point("before_rename", stage, key))
        self.kill_point("before_commit", stage, key)
        if callable(data):
            size, digest = file.stat().st_size, file_checksum(file)
        else:
            size, digest = len(data), digest or checksum(data)
        self.record_unit(stage, key, relative, size, digest)

    def relative_path(self, stage, key, path=None):
        return str(Path(path) if path else self.unit_path(stage, key).relative_to(self.run_dir))

    # The manifest's two transactions of a unit write (diffsynth.plan replays them to size the manifest and WAL).
    def record_pending(self, relative):
        self.db.execute("INSERT OR IGNORE INTO pending_writes VALUES (?)", (relative,))

    def record_unit(self, stage, key, relative, size, digest):
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?)",
                            (stage, key, relative, size, digest, time.time()))
            self.db.execute("DELETE FROM pending_writes WHERE path = ?", (relative,))

    def unit_record(self, stage, key):
        """(size, checksum) of a done unit from its manifest row, without reading its file; None if not done. A
        released unit's size is RELEASED."""
        return self.db.execute("SELECT size, checksum FROM units WHERE stage = ? AND key = ?",
                               (stage, key)).fetchone()

    def read(self, stage, key):
        """A unit's bytes, checked against its row. Served from `prefetched` when the runner's reader thread has
        already read and checked them."""
        data = self.prefetched.get((stage, key))
        if data is not None:
            return data
        return read_unit(self.db, self.run_dir, stage, key)

    def reader_connection(self):
        """A second connection to the manifest, for the runner's reader thread (a connection is not shared between
        threads)."""
        return sqlite3.connect(self.run_dir / MANIFEST, isolation_level=None, timeout=30, check_same_thread=False)

    def release_units(self, stage, keys):
        """Delete the files of finished units that nothing still to be computed needs; their rows stay, marked
        released (size -1), so they still count as done. Rows first, in one transaction, then the files."""
        keys = list(keys)
        if not keys:
            return
        marks = ",".join("?" * len(keys))
        rows = self.db.execute(f"SELECT key, path FROM units WHERE stage = ? AND size != ? AND key IN ({marks})",
                               (stage, RELEASED, *keys)).fetchall()
        if not rows:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE units SET size = ? WHERE stage = ? AND key = ?",
                                [(RELEASED, stage, key) for key, _ in rows])
        for key, path in rows:
            self.kill_point("release", stage, key)
            (self.run_dir / path).unlink(missing_ok=True)

    def forget_units(self, stage, keys):
        """Make units not done (to recompute them): delete their rows and any file they still have."""
        keys = list(keys)
        paths = []
        with self.db:
            self.db.execute("BEGIN")
            for key in keys:
                row = self.db.execute("SELECT path, size FROM units WHERE stage = ? AND key = ?",
                                      (stage, key)).fetchone()
                if row and row[1] != RELEASED:
                    paths.append(row[0])
                self.db.execute("DELETE FROM units WHERE stage = ? AND key = ?", (stage, key))
            self.db.execute("UPDATE stages SET retired = 0 WHERE name = ?", (stage,))
        for path in paths:
            (self.run_dir / path).unlink(missing_ok=True)

    def forget_unit(self, stage, key):
        self.forget_units(stage, [key])

    def verify_stage(self, stage, full=False):
        """Forget kept units whose file is missing or has the wrong size (and, with `full`, the wrong checksum).
        Released units have no file to check. Returns the forgotten keys."""
        bad = []
        rows = self.db.execute("SELECT key, path, size, checksum FROM units WHERE stage = ? AND size != ?",
                               (stage, RELEASED)).fetchall()
        for key, path, size, digest in rows:
            file = self.run_dir / path
            try:
                ok = file.stat().st_size == size and (not full or file_checksum(file) == digest)
            except FileNotFoundError:
                ok = False
            if not ok:
                bad.append(key)
        if bad:
            self.forget_units(stage, bad)
        return bad

    def remove_leftovers(self):
        """Finish what a crash interrupted, deleting only files this cache created: the files (and temp files) of
        pending writes that never got their row, and the files of released rows that were not yet deleted.
        Returns the number of files removed."""
        removed = 0
        pending = [path for (path,) in self.db.execute("SELECT path FROM pending_writes")]
        known = {path for (path,) in self.db.execute("SELECT path FROM units WHERE size != ?", (RELEASED,))}
        released = [path for (path,) in self.db.execute("SELECT path FROM units WHERE size = ?", (RELEASED,))]
        for path in pending:
            candidates = [path + TMP_SUFFIX] + ([] if path in known else [path])
            for candidate in candidates:
                file = self.run_dir / candidate
                if file.is_file():
                    file.unlink()
                    removed += 1
        self.db.execute("DELETE FROM pending_writes")
        for path in released:
            if path in known:
                continue  # the same path is a kept unit's file now (a stage that was reset and recomputed)
            file = self.run_dir / path
            if file.is_file():
                file.unlink()
                removed += 1
        return removed

    def unknown_files(self):
        """Files in the run folder's cache/ and frames/ that no row and no pending write accounts for: not ours to
        delete, so they are only reported."""
        known = {path for (path,) in self.db.execute("SELECT path FROM units")}
        found = []
        for folder in ("cache", "frames"):
            root = self.run_dir / folder
            if root.is_dir():
                found += [str(file.relative_to(self.run_dir)) for file in root.rglob("*")
                          if file.is_file() and str(file.relative_to(self.run_dir)) not in known]
        return sorted(found)

    def bytes_on_disk(self, stage):
        return self.db.execute("SELECT COALESCE(SUM(size), 0) FROM units WHERE stage = ? AND size > 0",
                               (stage,)).fetchone()[0]
