"""Data-safety campaigns on a small demo variant (4 steps, in-loop smoothing at step 1, final smoothing):

- kills: 20 SIGKILLs at random moments (seeded): each kill waits until a random number of units is committed, then a
  random 0-300 ms more, so it lands anywhere inside a unit's computation, write or commit, or in start-up; each is
  followed by a resume. Work redone after each kill is counted from the manifest (committed units whose row was
  written again); target: at most 1. The final frames/ and video.mp4 must equal an uninterrupted render's.
- corruption: 10 cached files across the stages, one at a time on a copy of the finished run, flipped (same size),
  truncated or deleted; `render --verify` must detect each, recompute only it (and released units it needs), and
  give identical bytes. Reports the units recomputed per damaged file.

Writes bench/results/data_safety.json. `--kills N` and `--seed S` change the campaign.
"""

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from helpers import (  # noqa: E402
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

from diffsynth.demo import ensure_demo_assets  # noqa: E402


def campaign_config(assets, run_dir):
    return small_config(assets, run_dir, num_inference_steps=4, smoother_progress_ids=[1, -1])


def units_committed(run_dir):
    try:
        db = sqlite3.connect(f"file:{run_dir / 'manifest.sqlite'}?mode=ro", uri=True, timeout=1)
        count = db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        db.close()
        return count
    except sqlite3.Error:
        return 0


def kill_when(config, run_dir, target_units, extra_delay):
    """Start a render; SIGKILL it once `target_units` units are committed plus `extra_delay` seconds. Returns
    True if it was killed, False if it finished first."""
    process = subprocess.Popen([sys.executable, "-m", "diffsynth", "render", str(config), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        while process.poll() is None and units_committed(run_dir) < target_units:
            time.sleep(0.01)
        time.sleep(extra_delay)
        if process.poll() is not None:
            return False
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return True
    finally:
        if process.poll() is None:
            process.kill()


def kill_campaign(assets, folder, reference, kills, rng):
    total = len(committed_units(reference))
    run_dir = folder / "killed"
    config = write_config(folder / "killed.yaml", campaign_config(assets, run_dir))
    targets = sorted(rng.randrange(0, total) for _ in range(kills))
    redone, before, killed = [], {}, 0
    for target in targets:
        if kill_when(config, run_dir, target, rng.uniform(0.0, 0.3)):
            killed += 1
        after = committed_units(run_dir)
        redone.append(len(recomputed(before, after)))
        before = after
    result = run_cli("render", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    redone.append(len(recomputed(before, committed_units(run_dir))))
    identical = outputs(run_dir) == outputs(reference)
    warnings = [line for line in (run_dir / "render.log").read_text().splitlines() if " WARNING " in line]
    return {"kills": killed, "kill_targets_units": targets, "redone_per_resume": redone, "max_redone": max(redone),
            "identical_bytes": identical, "warnings_in_log": len(warnings), "units_in_render": total}


def corruption_campaign(assets, folder, reference, count, seed):
    results = []
    for unit, how in pick_damage(reference, count, seed):
        run_dir = folder / f"damaged-{len(results)}"
        shutil.copytree(reference, run_dir)
        before, released = committed_units(run_dir), released_units(run_dir)
        damage(kept_files(run_dir)[unit], how)
        config = write_config(folder / "damaged.yaml", campaign_config(assets, run_dir))
        result = run_cli("render", config, "--no-progress", "--verify")
        assert result.returncode == 0, result.stderr
        redone = set(recomputed(before, committed_units(run_dir)))
        results.append({"unit": "/".join(unit), "damage": how, "detected": unit in redone,
                        "recomputed": len(redone), "recomputed_kept_undamaged": len(redone - {unit} - released),
                        "identical_bytes": outputs(run_dir) == outputs(reference)})
        shutil.rmtree(run_dir)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--damages", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    assets = ensure_demo_assets()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.time()
        result = run_cli("render", write_config(folder / "reference.yaml", campaign_config(assets, folder / "ref")),
                         "--no-progress")
        assert result.returncode == 0, result.stderr
        reference_seconds = time.time() - started
        kills = kill_campaign(assets, folder, folder / "ref", args.kills, rng)
        corruption = corruption_campaign(assets, folder, folder / "ref", args.damages, args.seed)
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "seed": args.seed,
              "reference_render_seconds": round(reference_seconds, 1), "kills": kills, "corruption": corruption}
    print(f"kills: {kills['kills']} SIGKILLs, work redone per resume max {kills['max_redone']} unit(s) "
          f"(target <= 1), identical bytes: {kills['identical_bytes']}, warnings in log: {kills['warnings_in_log']}")
    for row in corruption:
        print(f"corruption: {row['damage']:>8} {row['unit']:<45} detected {row['detected']}, recomputed "
              f"{row['recomputed']} (kept and undamaged: {row['recomputed_kept_undamaged']}), "
              f"identical {row['identical_bytes']}")
    out = REPO / "bench" / "results" / "data_safety.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    ok = (kills["max_redone"] <= 1 and kills["identical_bytes"]
          and all(r["detected"] and r["identical_bytes"] and not r["recomputed_kept_undamaged"] for r in corruption))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
