"""The disk cache and the generic runner, with toy stages (no models): torn writes, corruption, fingerprints,
ephemeral stages."""

import sqlite3

import pytest

from diffsynth.cache import CorruptUnit, RunCache
from diffsynth.runner import run_stages
from diffsynth.stages.base import Stage


class Counter:
    def __init__(self):
        self.calls = []


class Numbers(Stage):
    """Unit i holds the bytes of (i + offset)."""

    def __init__(self, ctx, name, count, offset=0, inputs=(), ephemeral=False):
        super().__init__(ctx, inputs)
        self.name, self.count, self.offset, self.ephemeral = name, count, offset, ephemeral

    def params(self):
        return {"count": self.count, "offset": self.offset}

    def unit_keys(self):
        return [f"{i:03d}" for i in range(self.count)]

    def compute(self, key):
        self.ctx.calls.append((self.name, key))
        value = int(key) + self.offset
        for upstream in self.inputs:
            value += int(self.read_bytes(upstream, key))
        return str(value).encode(), None


def pipeline(ctx, offset=0, ephemeral_middle=False):
    first = Numbers(ctx, "first", 5, offset)
    middle = Numbers(ctx, "middle", 5, 10, [first], ephemeral=ephemeral_middle)
    last = Numbers(ctx, "last", 5, 100, [middle])
    return [first, middle, last]


@pytest.fixture
def run(tmp_path):
    def _run(**kwargs):
        ctx = Counter()
        ctx.cache = RunCache(tmp_path / "run")
        stages = pipeline(ctx, **kwargs)
        run_stages(stages, ctx.cache, progress=False)
        results = {s.name: [ctx.cache.read(s.name, k) for k in s.unit_keys()] for s in stages
                   if not ctx.cache.is_retired(s.name)}
        ctx.cache.close()
        return ctx.calls, results
    return _run


def test_complete_run_is_not_recomputed(run):
    calls, results = run()
    assert len(calls) == 15
    assert results["last"] == [str(i + 100 + i + 10 + i).encode() for i in range(5)]
    calls, again = run()
    assert calls == [] and again == results


def test_torn_writes_do_not_count_as_done(run, tmp_path):
    _, reference = run()
    cache_dir = tmp_path / "run" / "cache"
    db = sqlite3.connect(tmp_path / "run" / "manifest.sqlite")
    # A crash after the temp file was written: the pending write's temp file is a leftover, the unit is not done.
    db.execute("DELETE FROM units WHERE stage = 'middle' AND key = '002'")
    db.execute("INSERT INTO pending_writes VALUES ('cache/middle/002')")
    (cache_dir / "middle" / "002.tmp").write_bytes(b"half")
    # A crash between rename and the manifest row: the row is missing, the file must not count.
    db.execute("DELETE FROM units WHERE stage = 'middle' AND key = '003'")
    db.execute("INSERT INTO pending_writes VALUES ('cache/middle/003')")
    db.commit()
    db.close()
    # A row whose file was truncated (a disk that lied about fsync): wrong size, not done.
    (cache_dir / "last" / "004").write_bytes(b"1")
    calls, results = run()
    assert sorted(calls) == [("last", "004"), ("middle", "002"), ("middle", "003")]
    assert not (cache_dir / "middle" / "002.tmp").exists()
    assert results == reference


def test_files_the_cache_did_not_write_are_left_alone_and_reported(run, tmp_path, caplog):
    run()
    foreign = [tmp_path / "run" / "cache" / "middle" / "notes.txt", tmp_path / "run" / "frames" / "mine.png",
               tmp_path / "run" / "cache" / "middle" / "009.tmp", tmp_path / "run" / "video.mp4"]
    for file in foreign:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"the user's")
    calls, _ = run()
    assert calls == []
    assert all(file.read_bytes() == b"the user's" for file in foreign)
    assert "cache/middle/notes.txt" in caplog.text and "left alone" in caplog.text


def test_corrupted_file_is_detected_on_read_and_recomputed(run, tmp_path):
    _, reference = run()
    corrupt = tmp_path / "run" / "cache" / "middle" / "001"
    corrupt.write_bytes(b"99")  # same size, different content: only the checksum can tell
    db = sqlite3.connect(tmp_path / "run" / "manifest.sqlite")
    db.execute("DELETE FROM units WHERE stage = 'last' AND key = '001'")  # so that someone reads middle/001
    db.commit()
    db.close()
    calls, results = run()
    # last/001 reads the corrupt unit and stops, middle/001 is recomputed, then last/001 completes.
    assert calls == [("last", "001"), ("middle", "001"), ("last", "001")]
    assert results == reference


def test_read_of_a_corrupt_unit_raises(tmp_path):
    cache = RunCache(tmp_path)
    cache.write("s", "k", b"hello")
    (tmp_path / "cache" / "s" / "k").write_bytes(b"jello")
    with pytest.raises(CorruptUnit):
        cache.read("s", "k")


def test_changed_parameters_recompute_exactly_the_downstream_stages(run):
    run()
    calls, results = run(offset=1)
    assert {name for name, _ in calls} == {"first", "middle", "last"}
    calls, _ = run(offset=1)
    assert calls == []


def test_ephemeral_stage_is_released_when_its_readers_are_done_and_only_what_is_needed_is_rebuilt(run, tmp_path):
    _, reference = run(ephemeral_middle=True)
    assert not list((tmp_path / "run" / "cache" / "middle").glob("*"))
    db = sqlite3.connect(tmp_path / "run" / "manifest.sqlite")
    assert db.execute("SELECT COUNT(*) FROM units WHERE stage = 'middle' AND size = -1").fetchone()[0] == 5
    db.close()
    # A re-run computes nothing: the released units are done.
    calls, _ = run(ephemeral_middle=True)
    assert calls == []
    # Lose a unit of the last stage: the middle unit it reads is needed again, and only that one.
    (tmp_path / "run" / "cache" / "last" / "002").write_bytes(b"x")
    calls, results = run(ephemeral_middle=True)
    assert calls == [("middle", "002"), ("last", "002")]
    assert results["last"] == reference["last"]
    assert not list((tmp_path / "run" / "cache" / "middle").glob("*")), "the recomputed unit is released again"


def test_second_process_cannot_take_the_lock(tmp_path):
    from diffsynth.errors import UserError
    first = RunCache(tmp_path)
    first.lock()
    second = RunCache(tmp_path)
    with pytest.raises(UserError, match="in use"):
        second.lock()
    assert second.is_locked()
    first.close()
    assert not second.is_locked()
    second.lock()
    second.close()


def test_a_status_probe_does_not_make_a_starting_render_fail(tmp_path):
    """is_locked() probes while a render takes the lock: the render must still get it (the probe only looks)."""
    import fcntl
    import threading
    cache = RunCache(tmp_path)
    probe = open(tmp_path / "lock", "a+")
    fcntl.flock(probe, fcntl.LOCK_SH)  # a probe caught in the middle of looking
    threading.Timer(0.3, lambda: fcntl.flock(probe, fcntl.LOCK_UN)).start()
    cache.lock()
    assert cache.is_locked()
    cache.close()
    probe.close()


def test_a_full_disk_stops_with_one_line_and_the_same_command_finishes(run, tmp_path, monkeypatch):
    """ENOSPC at a unit write: a UserError naming the unit and what to do; the units already written are kept,
    and once space is back the run finishes computing only what was missing."""
    import errno

    import diffsynth.cache as cache_module
    from diffsynth.errors import UserError
    real_write = cache_module.write_atomically
    written = []

    def filling_disk(path, write_to, before_rename=None):
        if len(written) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        return real_write(path, write_to, before_rename)
    monkeypatch.setattr(cache_module, "write_atomically", filling_disk)
    with pytest.raises(UserError, match="No space left on device.*run the same command again"):
        run()
    monkeypatch.setattr(cache_module, "write_atomically", real_write)
    calls, results = run()
    assert len(calls) == 15 - 7
    assert results["last"] == [str(i + 100 + i + 10 + i).encode() for i in range(5)]
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_a_run_folder_on_a_network_filesystem_is_refused(tmp_path, monkeypatch):
    import diffsynth.cache as cache_module
    from diffsynth.errors import UserError
    mounts = tmp_path / "mounts"
    (tmp_path / "nas").mkdir()  # mount points exist
    (tmp_path / "my share").mkdir()
    share = str(tmp_path / "my share").replace(" ", "\\040")  # the mount table escapes spaces
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path / 'nas'} nfs4 rw 0 0\n"
                      f"//host/share {share} cifs rw 0 0\n")
    assert cache_module.filesystem_type(tmp_path / "nas" / "runs" / "new", mounts) == "nfs4"
    assert cache_module.filesystem_type(tmp_path / "my share" / "x", mounts) == "cifs"
    assert cache_module.filesystem_type(tmp_path / "local", mounts) == "ext4"
    real = cache_module.filesystem_type
    monkeypatch.setattr(cache_module, "filesystem_type", lambda path: real(path, mounts))
    with pytest.raises(UserError, match="network filesystem \\(nfs4\\).*local disk"):
        RunCache(tmp_path / "nas" / "run")
    assert not (tmp_path / "nas" / "run").exists()
    RunCache(tmp_path / "local" / "run").close()
