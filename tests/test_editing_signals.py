"""The editing-signals recipe with tiny models: pass 1 renders a colour video (no motion module, cross-frame
attention); pass 2 renders the toon video with pass 1's video.mp4 as its tile ControlNet's frames. Each pass is a
run folder; re-rendering pass 1 changes its video, and pass 2 then recomputes from that input on."""

from helpers import run_cli, small_config, write_config
from test_render import unit_times


def colour_pass(demo_assets, folder, prompt):
    config = small_config(demo_assets, folder / "color_video", num_inference_steps=1, smoother_progress_ids=[-1],
                          unet_batch_size=4, cross_frame_attention=True, prompt=prompt)
    config["models"]["model_list"] = config["models"]["model_list"][:1]  # no motion module
    return write_config(folder / "color.yaml", config)


def toon_pass(demo_assets, folder):
    config = small_config(demo_assets, folder / "toon_video", num_inference_steps=1, smoother_progress_ids=[])
    frames = config["data"]["input_frames"]
    config["data"]["controlnet_frames"] = [dict(frames, video_file=str(folder / "color_video" / "video.mp4")),
                                           dict(frames)]
    return write_config(folder / "toon.yaml", config)


def test_two_passes_chain_and_the_second_follows_the_first(demo_assets, tmp_path):
    toon = toon_pass(demo_assets, tmp_path)
    missing = run_cli("render", toon, "--no-progress")  # pass 1 has not run: one line, nothing rendered
    assert missing.returncode == 2 and "video file not found" in missing.stderr
    assert not (tmp_path / "toon_video").exists()

    for config in (colour_pass(demo_assets, tmp_path, "a toon cat"), toon):
        result = run_cli("render", config, "--no-progress")
        assert result.returncode == 0, result.stderr
    first_toon = (tmp_path / "toon_video" / "video.mp4").read_bytes()
    before = unit_times(tmp_path / "toon_video")
    assert any(stage == "crop.controlnet0" for stage, _ in before)  # the tile frames come from pass 1's video

    result = run_cli("render", colour_pass(demo_assets, tmp_path, "a toon dog"), "--no-progress")
    assert result.returncode == 0, result.stderr
    result = run_cli("render", toon, "--no-progress")
    assert result.returncode == 0, result.stderr
    after = unit_times(tmp_path / "toon_video")
    redone = {stage for unit, stage in ((u, u[0]) for u in after) if before.get(unit) != after[unit]}
    assert "crop.controlnet0" in redone and "crop" not in redone and "latents" not in redone
    assert (tmp_path / "toon_video" / "video.mp4").read_bytes() != first_toon
