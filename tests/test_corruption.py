"""Damaged cache files between runs: ten files across the stages flipped, truncated or deleted. Each is detected,
only it (and released units it needs) is recomputed, and the output is byte-identical. Counted from the manifest."""

import random
import shutil
import sqlite3

from helpers import committed_units, outputs, recomputed, run_cli, small_config, write_config


def kept_files(run_dir):
    """{(stage, key): path} of every unit whose file is kept on disk."""
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    rows = db.execute("SELECT stage, key, path FROM units WHERE size >= 0").fetchall()
    db.close()
    return {(stage, key): run_dir / path for stage, key, path in rows}


def released_units(run_dir):
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    rows = db.execute("SELECT stage, key FROM units WHERE size < 0").fetchall()
    db.close()
    return set(rows)


def damage(path, how):
    data = path.read_bytes()
    if how == "flip":  # same size: only the checksum can tell
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.unlink()


def pick_damage(run_dir, count, seed):
    """`count` kept units, spread over the stages (round-robin over stages in a seeded order), each with a kind of
    damage."""
    rng = random.Random(seed)
    by_stage = {}
    for unit in sorted(kept_files(run_dir)):
        by_stage.setdefault(unit[0], []).append(unit)
    stages = sorted(by_stage)
    rng.shuffle(stages)
    chosen = []
    while len(chosen) < count:
        for stage in stages:
            candidates = [unit for unit in by_stage[stage] if unit not in chosen]
            if candidates and len(chosen) < count:
                chosen.append(rng.choice(candidates))
    return [(unit, ("flip", "truncate", "delete")[index % 3]) for index, unit in enumerate(chosen)]


def test_ten_damaged_files_are_detected_and_only_they_are_recomputed(demo_assets, small_render, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_render / "run", run_dir)
    config = write_config(tmp_path / "config.yaml", small_config(demo_assets, run_dir))
    before, released = committed_units(run_dir), released_units(run_dir)
    files = kept_files(run_dir)
    damaged = pick_damage(run_dir, 10, seed=8)
    assert len({stage for (stage, _), _ in damaged}) >= 8, "the damage is spread over the stages"
    for unit, how in damaged:
        damage(files[unit], how)

    result = run_cli("render", config, "--no-progress", "--verify")
    assert result.returncode == 0, result.stderr
    redone = set(recomputed(before, committed_units(run_dir)))
    damaged_units = {unit for unit, _ in damaged}
    assert damaged_units <= redone, "every damaged unit was detected and recomputed"
    assert redone - damaged_units <= released, "nothing kept and undamaged was recomputed"
    assert outputs(run_dir) == outputs(small_render / "run")
    assert "missing or damaged" in (run_dir / "render.log").read_text()


def test_a_flipped_byte_is_caught_when_read_without_verify(demo_assets, small_render, tmp_path):
    """Without --verify only sizes are checked at start-up; a same-size flip in a unit that a pending unit reads is
    caught by the read's checksum, recomputed, and the output is still identical."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_render / "run", run_dir)
    config = write_config(tmp_path / "config.yaml", small_config(demo_assets, run_dir))
    damage(kept_files(run_dir)[("vae_decode", "000004.safetensors")], "flip")
    damage(kept_files(run_dir)[("encode", "frames/00004.png")], "delete")  # so that frame 4 is read again
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    db.execute("DELETE FROM units WHERE stage = 'smooth.final' AND key = '000004.safetensors'")
    db.commit()
    db.close()
    before = committed_units(run_dir)
    result = run_cli("render", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    redone = recomputed(before, committed_units(run_dir))
    assert ("vae_decode", "000004.safetensors") in redone
    assert not [unit for unit in redone if unit[0] in ("decode", "crop", "latents", "denoise.001.step")]
    assert outputs(run_dir) == outputs(small_render / "run")
