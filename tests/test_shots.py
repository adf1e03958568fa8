"""Shots (data.shots): cuts detected by PySceneDetect on the cropped frames, and neither a sliding window nor a
FastBlend window blends two shots. The clip: three hard cuts between very different scenes and a dissolve (which is
not a cut), diffsynth.demo.cut_clip_frames."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import outputs, run_cli, small_config, write_config

from diffsynth.cache import RunCache
from diffsynth.cli import main
from diffsynth.config import FramesConfig, parse_config
from diffsynth.demo import cut_clip_frames, write_frames_clip
from diffsynth.errors import UserError
from diffsynth.fastblend import FastBlendConfig, SmoothingPlan, smooth_in_memory
from diffsynth.fastblend.blocks import parse_table_key
from diffsynth.pipeline import RenderContext, build_stages
from diffsynth.plan import AbsentModels, shot_lines, shot_plan
from diffsynth.runner import run_stages
from diffsynth.schedule import shot_windows, sliding_windows
from diffsynth.stages.crop import CropStage
from diffsynth.stages.denoise import DenoiseWindowsStage
from diffsynth.stages.shots import SHOTS_KEY, ShotsStage, bytes_to_shots
from diffsynth.stages.smooth import SmoothStage
from diffsynth.video import probe

CUTS = [16, 32, 64]  # cut_clip_frames(64, 48): 80 frames, the dissolve inside the third shot (frames 36-59)


@pytest.fixture(scope="module")
def cut_clip(tmp_path_factory):
    frames, cuts = cut_clip_frames(64, 48)
    assert cuts == CUTS
    return write_frames_clip(tmp_path_factory.mktemp("shots") / "cuts.mp4", frames)


def front_stages(run_dir, clip, threshold):
    """The crop of the clip and the shot detection on it, as a render has them, in their own run folder."""
    cache = RunCache(run_dir)
    ctx = SimpleNamespace(cache=cache, config=None, models=None, device="cpu")
    frames = FramesConfig(video_file=str(clip), width=64, height=48)
    source = probe(frames)
    crop = CropStage(ctx, frames, source, (0, len(source)))
    return cache, crop, ShotsStage(ctx, crop, threshold)


def test_detects_exactly_the_three_hard_cuts_not_the_dissolve_once_and_again_only_for_a_new_threshold(cut_clip,
                                                                                                       tmp_path):
    cache, crop, shots = front_stages(tmp_path / "run", cut_clip, 27.0)
    try:
        report = run_stages([crop, shots], cache, progress=False)
        assert bytes_to_shots(cache.read("shots", SHOTS_KEY)) == [0, *CUTS]
        assert report.computed == {"crop": 80, "shots": 1}
        assert run_stages([crop, shots], cache, progress=False).units_computed == 0  # a resume redoes nothing
        # The detector's threshold is in the fingerprint: a new one recomputes the detection alone, not the crop.
        for threshold, starts in ((40.0, [0, *CUTS]), (60.0, [0, 16])):  # the cuts score about 82, 50 and 47
            shots = ShotsStage(crop.ctx, crop, threshold)
            report = run_stages([crop, shots], cache, progress=False)
            assert report.computed == {"crop": 0, "shots": 1}
            assert bytes_to_shots(cache.read("shots", SHOTS_KEY)) == starts
    finally:
        cache.close()


def cut_config(clip, run_dir, **data):
    """The small config on the cut clip, planned without models (AbsentModels: nothing is loaded)."""
    config = small_config(Path("/absent"), run_dir, smoother_progress_ids=[0, -1], controlnet_batch_size=6)
    config["data"]["input_frames"].update(video_file=str(clip), width=64, height=48, end_frame_id=None)
    config["data"].update({"shots": "auto", **data})
    return parse_config(config)


def planned(config):
    ctx = RenderContext(config, None, AbsentModels(config.models))  # no model is loaded: fingerprints as absent
    return build_stages(ctx)


def shot_of(frame, starts=(0, *CUTS)):
    return max(start for start in starts if start <= frame)


def test_no_window_of_the_plan_crosses_a_cut_and_plan_lists_the_shots(cut_clip, tmp_path):
    stages = planned(cut_config(cut_clip, tmp_path / "run"))
    windows_stage = next(stage for stage in stages if isinstance(stage, DenoiseWindowsStage))
    windows = windows_stage.windows
    assert windows == shot_windows([0, *CUTS], 80, 8, 4)
    assert all(shot_of(start) == shot_of(end - 1) for start, end in windows)
    assert {start for start, _ in windows} >= {0, *CUTS}  # each shot starts its own windows
    # The ControlNet groups (6 frames here) follow the shots: no window reads a frame of another shot.
    for start, end in windows:
        assert {shot_of(i) for i in windows_stage.residuals.frames_computed_with(start, end)} == {shot_of(start)}
    for smooth in (stage for stage in stages if isinstance(stage, SmoothStage)):  # in the loop and at the end
        for key in smooth.plan.unit_keys():
            assert len({shot_of(i) for i in smooth.plan.needed_frames(key)}) == 1, (smooth.name, key)
    plan = shot_plan(stages[0].ctx.config, stages)
    assert plan["list"] == [{"start": 0, "length": 16, "windows": 3}, {"start": 16, "length": 16, "windows": 3},
                            {"start": 32, "length": 32, "windows": 7}, {"start": 64, "length": 16, "windows": 3}]
    assert shot_lines(plan)[0].startswith("shots: 4 (detected by PySceneDetect's content detector, threshold 27.0)")


def test_threshold_and_explicit_shots_change_only_what_depends_on_them(cut_clip, tmp_path):
    fingerprints = {}
    for name, data in (("auto", {}), ("same cuts", {"shot_threshold": 40.0}), ("given", {"shots": list(CUTS)}),
                       ("fewer cuts", {"shot_threshold": 60.0})):
        fingerprints[name] = {stage.name: stage.fingerprint for stage in planned(cut_config(cut_clip, tmp_path,
                                                                                            **data))}
    auto, same, given, fewer = (fingerprints[name] for name in ("auto", "same cuts", "given", "fewer cuts"))
    assert {name for name in auto if auto[name] != same[name]} == {"shots"}  # same cuts: nothing after it changes
    assert {name: fp for name, fp in auto.items() if name != "shots"} == given  # a list: the same plan, no detection
    changed = {name for name in auto if auto[name] != fewer[name]}
    assert "crop" not in changed and "latents" not in changed and "prompts" not in changed
    assert {"denoise.000.windows", "smooth.000.blend", "smooth.final"} <= changed


def test_explicit_shot_lists_are_checked(cut_clip, tmp_path):
    for shots, message in (([5, 3], "must increase"), ([3, 3], "must increase"), ([-1], "negative")):
        with pytest.raises(UserError, match=rf"data\.shots.*{message}"):
            cut_config(cut_clip, tmp_path, shots=shots)
    with pytest.raises(UserError, match=r"data\.shots has shot start 80, but the rendered range holds 80 frames"):
        planned(cut_config(cut_clip, tmp_path, shots=[16, 80]))
    assert main(["smooth", "--guide", str(cut_clip), "--style", str(cut_clip), "-o", str(tmp_path / "o.mp4"),
                 "--shots", "9,4"]) == 2
    assert not (tmp_path / "o.smooth-run").exists()  # refused before any work


def test_without_cuts_the_plan_is_todays():
    for num_frames in range(1, 60):
        assert shot_windows([0], num_frames, 16, 8) == sliding_windows(num_frames, 16, 8)
    for mode in ("fast", "balanced", "accurate", "interpolation"):
        config = FastBlendConfig(inference_mode=mode, window_size=5, keyframe_ids=(0, 9, 30))
        today, one_shot = SmoothingPlan(37, config), SmoothingPlan(37, config, shot_starts=[0])
        assert today.unit_keys() == one_shot.unit_keys()
        for key in today.unit_keys():
            assert today.needed_frames(key) == one_shot.needed_frames(key)
            assert today.needed_tables(key) == one_shot.needed_tables(key)


def test_every_fastblend_mode_draws_only_from_the_frames_own_shot():
    starts = [0, 7, 20, 33]
    shot = [max(s for s in starts if s <= i) for i in range(40)]
    for mode in ("fast", "balanced", "accurate", "interpolation"):
        config = FastBlendConfig(inference_mode=mode, window_size=6, keyframe_ids=(2, 10, 18, 25, 39))
        plan = SmoothingPlan(40, config, shot_starts=starts)
        for key in plan.unit_keys():
            assert len({shot[i] for i in plan.needed_frames(key)}) == 1, (mode, key)
            for table in plan.needed_tables(key):  # tables never span a cut
                block = parse_table_key(table)
                assert shot[block.first] == shot[block.last], (mode, key, table)
    # Interpolation: each shot has its own first and last keyframe.
    plan = SmoothingPlan(40, FastBlendConfig(inference_mode="interpolation", keyframe_ids=(2, 10, 25, 39)),
                         shot_starts=[0, 20])
    assert plan.needed_frames("frame/000015") == [10, 15]  # after shot 1's last keyframe: that one alone, not 25
    assert plan.needed_frames("frame/000021") == [21, 25]  # before shot 2's first
    with pytest.raises(ValueError, match="frames 20 to 29 holds no keyframe"):
        SmoothingPlan(40, FastBlendConfig(inference_mode="interpolation", keyframe_ids=(2, 35)),
                      shot_starts=[20, 30])


def boundary_and_mid_error(smoothed, style, starts):
    """Mean |smoothed − its own unsmoothed frame| of the first and last two frames of each shot, and of the rest."""
    error = [float((out - own).abs().mean()) for out, own in zip(smoothed, style)]
    bounds = list(zip(starts, starts[1:] + [len(style)]))
    edges = [i for first, end in bounds for i in (first, first + 1, end - 2, end - 1)]
    mid = [i for i in range(len(style)) if i not in edges]
    return float(np.mean([error[i] for i in edges])), float(np.mean([error[i] for i in mid]))


def test_final_smoothing_carries_nothing_across_a_cut(one_torch_thread):
    """FastBlend on tensors: a flickering 'rendering' (posterized + noise) of the clip, smoothed with and without the
    shots. Without them the frames next to a cut blend in the other shot's colours."""
    frames, cuts = cut_clip_frames(24, 16, shot_length=8, dissolve=4)
    starts = [0, *cuts]
    guide = [torch.from_numpy(frame.astype(np.float32)) for frame in frames]
    noise = torch.Generator().manual_seed(0)
    style = [((frame // 32) * 32 + 16 + 6 * torch.randn(frame.shape, generator=noise)).clamp(0, 255)
             for frame in guide]
    config = FastBlendConfig(inference_mode="fast", window_size=2, minimum_patch_size=3, num_iter=2)
    before = boundary_and_mid_error(smooth_in_memory(guide, style, config), style, starts)
    after = boundary_and_mid_error(smooth_in_memory(guide, style, config, shot_starts=starts), style, starts)
    assert after[0] <= after[1], after
    assert before[0] > 2 * before[1], before  # what shots: none does: measurably more at the cuts


def test_auto_on_a_clip_without_cuts_keeps_the_bytes_and_reuses_everything(small_render, tmp_path):
    """The small render (shots: none) again with shots: auto: the demo clip has no cut, so only the detection runs;
    every other stage keeps its fingerprint and the outputs their bytes."""
    run = tmp_path / "run"
    shutil.copytree(small_render / "run", run)
    config = yaml_config(small_render, run)
    result = run_cli("render", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "1 unit(s) computed in 1 stage(s)" in result.stderr
    cache = RunCache(run)
    try:
        assert cache.get_value("last_render")["computed_by_stage"] == {"shots": 1}
    finally:
        cache.close()
    assert outputs(run) == outputs(small_render / "run")
    assert "shots: 1 (no cut found)" in (run / "render.log").read_text()


def yaml_config(small_render, run):
    import yaml
    config = yaml.safe_load((small_render / "config.yaml").read_text())
    config["data"].update(output_folder=str(run), shots="auto")
    return write_config(run.parent / "auto.yaml", config)


def test_web_ui_marks_the_shot_boundaries_on_the_frame_scrubber(cut_clip, tmp_path):
    from diffsynth.webui import runs
    run = tmp_path / "run"
    cache, crop, shots = front_stages(run, cut_clip, 27.0)
    try:
        run_stages([crop, shots], cache, progress=False)
    finally:
        cache.close()
    (run / "config.json").write_text('{"data": {"shots": "auto"}}')
    report = runs.read_progress(run)
    assert report["shots"] == [0, *CUTS]
    strip = runs.shot_strip(80, list(range(40)), report["shots"], index=20, width=160)
    red = [column for column in range(160) if tuple(strip[0, column]) == (230, 40, 40)]
    assert red == [2 * cut for cut in CUTS]
    assert runs.shot_caption(report["shots"], 80, 20).startswith("frame 20 is in shot 2 of 4 (frames 16–31)")
    (run / "config.json").write_text('{"data": {"shots": [10]}}')
    assert runs.read_progress(run)["shots"] == [0, 10]


def test_smooth_command_honours_shots(tmp_path, one_torch_thread):
    """`diffsynth smooth --shots auto`: the cuts detected on the guide (a cached unit of its run folder), and no
    FastBlend window blends two shots."""
    frames, cuts = cut_clip_frames(32, 24)
    frames, cuts = frames[:40], cuts[:2]  # two cuts are enough here: 40 frames to smooth
    guide = write_frames_clip(tmp_path / "guide.mp4", frames)
    assert main(["smooth", "--guide", str(guide), "--style", str(guide), "-o", str(tmp_path / "out.mp4"),
                 "--shots", "auto", "--window-size", "2", "--num-iter", "1", "--minimum-patch-size", "3",
                 "--no-progress"]) == 0
    cache = RunCache(tmp_path / "out.smooth-run")
    try:
        assert bytes_to_shots(cache.read("shots", SHOTS_KEY)) == [0, *cuts]
        tables = [key for key in cache.done_keys("smooth") if key.startswith("table")]
    finally:
        cache.close()
    shot = [max(start for start in [0, *cuts] if start <= i) for i in range(len(frames))]
    assert tables and all(shot[parse_table_key(key[:-len(".safetensors")]).first]
                          == shot[parse_table_key(key[:-len(".safetensors")]).last] for key in tables)
