"""data.keep (all | resume | outputs): which files a finished render leaves, counted by stage from the manifest and
checked against the disk; the same output bytes under every policy; switching the policy on a finished run computes
nothing; a changed setting recomputes the released units it needs; a SIGKILL at a few points of each policy's
releases resumes to the same bytes, redoing at most one committed unit."""

import json
import shutil

import pytest
from helpers import (
    committed_units,
    kept_by_stage,
    kept_files,
    kill_chain,
    outputs,
    run_cli,
    small_config,
    unit_files,
    write_config,
)

# The small config's stages that `all` releases: the denoising intermediates and the in-loop smoothing.
EPHEMERAL = {"denoise.000.windows", "smooth.000.x0", "smooth.000.blend", "denoise.000.step", "denoise.001.windows"}
FINAL_LATENTS, OUTPUTS = "denoise.001.step", "encode"


def expected_kept(policy, stages):
    """The stages whose files a finished render keeps under `policy`."""
    if policy == "all":
        return set(stages) - EPHEMERAL
    return {FINAL_LATENTS, OUTPUTS} if policy == "resume" else {OUTPUTS}


def registered_stages(run_dir):
    return json.loads(run_cli("status", run_dir, "--json").stdout)["stages"]


def check_kept(run_dir, policy):
    """The kept units are exactly the policy's stages' (every unit of them, FastBlend's tables aside), and the
    files on disk are exactly the kept units' files."""
    stages = {stage["name"]: stage["total"] for stage in registered_stages(run_dir)}
    kept = kept_by_stage(run_dir)
    assert set(kept) == expected_kept(policy, stages), kept
    for name, count in kept.items():
        frames = 12 if name.startswith("smooth") else stages[name]  # a smoothing stage keeps its frames only
        assert count == frames, (name, count)
    assert unit_files(run_dir) == {str(path.relative_to(run_dir)) for path in kept_files(run_dir).values()}


def test_all_keeps_everything_but_the_denoising_intermediates(small_render):
    check_kept(small_render / "run", "all")


def test_switching_policy_on_a_finished_run_computes_nothing_and_releases(small_render, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_render / "run", run_dir)
    reference = outputs(run_dir)
    before = committed_units(run_dir)
    for policy in ("resume", "outputs", "all"):
        config = json.loads((run_dir / "config.json").read_text())
        config["data"]["output_folder"] = str(run_dir)  # the copy, never the shared reference
        config["data"]["keep"] = policy
        result = run_cli("render", write_config(tmp_path / "config.yaml", config), "--no-progress")
        assert result.returncode == 0, result.stderr
        assert "everything was reused from the cache" in result.stderr
        status = json.loads(run_cli("status", run_dir, "--json").stdout)
        assert status["last_render"]["computed"] == 0
        assert committed_units(run_dir) == before  # not a row written again
        assert outputs(run_dir) == reference
        # Released files do not come back for `all`: nothing still to compute reads them.
        check_kept(run_dir, "outputs" if policy == "all" else policy)


@pytest.mark.parametrize("policy,kill_points", [  # `all` (the default) is killed 19 times in tests/test_rework.py
    # latents go once step 0 is done; the crop and the decoded frames once the final smoothing is; its frames once
    # the video is written.
    ("resume", ["retire@latents:1", "vae_decode:6", "retire@crop:1", "retire@smooth.final:1"]),
    ("outputs", ["retire@denoise.001.step:1", "smooth.final:10", "retire@vae_decode:1", "retire@smooth.final:1"]),
])
def test_kills_during_each_policy_resume_to_identical_bytes(demo_assets, small_render, tmp_path, policy,
                                                            kill_points):
    config_data = small_config(demo_assets, tmp_path / "run")
    config_data["data"]["keep"] = policy
    config = write_config(tmp_path / "config.yaml", config_data)
    run_dir = tmp_path / "run"
    redone = kill_chain(config, run_dir, kill_points)
    assert max(len(units) for units in redone.values()) <= 1, redone
    assert outputs(run_dir) == outputs(small_render / "run")
    assert not list(run_dir.rglob("*.tmp")), "leftover temporary files"
    check_kept(run_dir, policy)
    log = (run_dir / "render.log").read_text()
    assert " WARNING " not in log, [line for line in log.splitlines() if " WARNING " in line]


def test_a_changed_setting_after_resume_recomputes_released_inputs_but_not_the_diffusion(small_render, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_render / "run", run_dir)
    frames, _ = outputs(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["output_folder"] = str(run_dir)  # the copy, never the shared reference
    config["data"]["keep"] = "resume"
    assert run_cli("render", write_config(tmp_path / "config.yaml", config), "--no-progress").returncode == 0
    config["data"]["crf"] = 30
    result = run_cli("render", write_config(tmp_path / "config.yaml", config), "--no-progress")
    assert result.returncode == 0, result.stderr
    computed = json.loads(run_cli("status", run_dir, "--json").stdout)["last_render"]["computed_by_stage"]
    # The final latents were kept: the frames are decoded and smoothed again, nothing is denoised again.
    assert not [name for name in computed if name.startswith("denoise")], computed
    assert {"vae_decode", "smooth.final", "encode"} <= set(computed), computed
    assert outputs(run_dir)[0] == frames  # the same frames, re-made from released inputs
    check_kept(run_dir, "resume")
