"""The smallest case of bench/oracle.py against the original Diffutoon (PyPI diffsynth==1.1.7, in its own venv):
one sliding window of 8 frames, one DDIM step, the motion module and a tile ControlNet, real-size random weights.

Off by default: it needs the original's venv (created from PyPI on first use, ~/.cache/diffsynth-oracle/venv or
DIFFSYNTH_ORACLE_VENV), ~6 GB of disk for the weights, ~10 GB of RAM and several minutes on 2 cores. Run it with
`DIFFSYNTH_ORACLE=1 .venv/bin/python -m pytest tests/test_oracle.py`. The per-frame motion norm it depends on is
checked cheaply and always by tests/test_motion_norm.py."""

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("DIFFSYNTH_ORACLE") != "1",
                                reason="set DIFFSYNTH_ORACLE=1 to compare with the original Diffutoon")


def test_one_window_one_step_matches_the_original(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import oracle
    report = oracle.main(["--cases", "base,base_window_norm", "--frames", "8", "--steps", "1",
                          "--json", str(tmp_path / "oracle.json")])
    summary = report["base"]["summary"]
    assert summary["eps_rel_l2_max"] <= oracle.EPS_TARGET
    assert summary["latents_rel_l2_max"] <= oracle.LATENTS_TARGET
    assert summary["max_grey_diff"] <= oracle.GREY_TARGET
    # The comparison can fail: diffusers' window-wide motion norm is far outside the targets.
    assert report["base_window_norm"]["summary"]["eps_rel_l2_max"] > 10 * oracle.EPS_TARGET
