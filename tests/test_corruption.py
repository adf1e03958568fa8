"""Damaged cache files between runs: ten files across the stages flipped, truncated or deleted. Each is detected,
only it (and released units it needs) is recomputed, and the output is byte-identical. Counted from the manifest."""

import shutil
import sqlite3

from helpers import (
    committed_units,
    damage,
    kept_files,
    outputs,
    pick_damage,
    recomputed,
    released_units,
    run_cli,
    small_config,
    write_config,
)


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
    assert not [unit for unit in redone if unit[0] in ("crop", "latents", "denoise.001.step")]
    assert outputs(run_dir) == outputs(small_render / "run")
