"""A whole render of the small config: its outputs, status, and what a config change recomputes."""

import json
import shutil
import sqlite3

import av
import pytest
import torch
from helpers import run_cli, small_config, write_config

from diffsynth.cache import RunCache, bytes_to_tensors
from diffsynth.config import parse_config
from diffsynth.models.loader import ModelStore
from diffsynth.pipeline import RenderContext, build_stages
from diffsynth.runner import run_stages
from diffsynth.video import audio_duration


@pytest.fixture(scope="module")
def rendered(small_render):
    return small_render


def unit_times(run_dir):
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    rows = db.execute("SELECT stage, key, finished FROM units").fetchall()
    db.close()
    return {(stage, key): finished for stage, key, finished in rows}


def test_video_has_every_frame_audio_and_source_rate(rendered):
    with av.open(str(rendered / "run" / "video.mp4")) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = list(container.decode(video=0))
        assert len(frames) == 12
        assert (frames[0].width, frames[0].height) == (64, 64)
        assert video.average_rate == 12
        assert audio.codec_context.name == "aac"
    assert abs(audio_duration(rendered / "run" / "video.mp4") - 1.0) < 0.03  # 12 frames at 12 fps
    assert sorted(p.name for p in (rendered / "run" / "frames").glob("*.png")) == [f"{i:05d}.png" for i in range(12)]
    saved = json.loads((rendered / "run" / "config.json").read_text())
    assert saved["pipeline"]["pipeline_inputs"]["prompt"] == "a toon cat"


def test_status_reports_every_stage_complete(rendered):
    result = run_cli("status", rendered / "run", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["state"] == "complete" and report["complete"]
    names = [stage["name"] for stage in report["stages"]]
    assert names[:2] == ["crop", "annotate.1.canny"]  # decode is fused into crop: no source frame is stored
    assert names[-3:] == ["vae_decode", "smooth.final", "encode"]
    assert {"smooth.000.x0", "smooth.000.blend"} <= set(names)
    assert all(stage["complete"] for stage in report["stages"])


def test_smoothing_tables_are_released_and_change_the_frames(rendered):
    db = sqlite3.connect(rendered / "run" / "manifest.sqlite")
    tables = db.execute("SELECT key, size FROM units WHERE stage = 'smooth.final' AND key LIKE 'table/%'").fetchall()
    frames = db.execute("SELECT key FROM units WHERE stage = 'smooth.final' AND key NOT LIKE 'table/%'").fetchall()
    db.close()
    assert len(tables) > 0 and len(frames) == 12
    assert all(size == -1 for _, size in tables), "every table is released once no frame needs it"
    assert not [
        p for p in (rendered / "run" / "cache" / "smooth.final").rglob("*") if p.is_file() and "table" in str(p)]
    cache = RunCache(rendered / "run")
    smoothed = [cache.read("smooth.final", f"{i:06d}.safetensors") for i in range(12)]
    cache.close()
    assert smoothed[3] != (rendered / "run" / "cache" / "vae_decode" / "000003.safetensors").read_bytes()


def rerender_changed(rendered, demo_assets, tmp_path, change):
    """Copy the rendered run, render it again with `change(config)` applied; returns (reused, redone) stage names,
    told apart by the manifest's finish times, and the new run folder."""
    run_dir = tmp_path / "run"
    shutil.copytree(rendered / "run", run_dir)
    before = unit_times(run_dir)
    config = small_config(demo_assets, run_dir)
    change(config)
    result = run_cli("render", write_config(tmp_path / "c.yaml", config), "--no-progress")
    assert result.returncode == 0, result.stderr
    after = unit_times(run_dir)
    reused = {stage for (stage, key), t in after.items() if before.get((stage, key)) == t}
    redone = {stage for (stage, key), t in after.items() if before.get((stage, key)) != t}
    return reused, redone, run_dir


def test_prompt_change_reuses_everything_upstream_of_the_prompt(rendered, demo_assets, tmp_path):
    def change(config):
        config["pipeline"]["pipeline_inputs"]["prompt"] = "a toon dog"
    reused, redone, run_dir = rerender_changed(rendered, demo_assets, tmp_path, change)
    assert reused == {"crop", "annotate.1.canny", "latents"}
    assert {"prompts", "vae_decode", "encode", "denoise.001.step"} <= redone
    assert not reused & redone
    assert (rendered / "run" / "frames" / "00003.png").read_bytes() != (run_dir / "frames" / "00003.png").read_bytes()


def test_crop_change_recomputes_everything_but_the_prompts(rendered, demo_assets, tmp_path):
    def change(config):
        config["data"]["input_frames"]["resize_mode"] = "fill"
    reused, _, _ = rerender_changed(rendered, demo_assets, tmp_path, change)
    assert reused == {"prompts"}


def test_smoother_change_reuses_the_diffusion(rendered, demo_assets, tmp_path):
    """A FastBlend setting change recomputes from the first smoothing pass on (here in-loop at step 0). Step 0's
    window ε was deleted once step 0 was done (ephemeral), so it is recomputed to get x0 again; everything before
    the diffusion is reused."""
    def change(config):
        config["smoother_configs"][0]["config"]["guide_weight"] = 5.0
    reused, redone, _ = rerender_changed(rendered, demo_assets, tmp_path, change)
    assert reused == {"crop", "annotate.1.canny", "prompts", "latents"}
    assert {"denoise.000.windows", "smooth.000.x0", "smooth.000.blend", "smooth.final", "encode"} <= redone


def test_initial_noise_does_not_depend_on_the_frame_range(demo_assets, tmp_path):
    """Frame 8's initial latent is the same whether the render starts at frame 0 or at frame 6."""
    latents = {}
    for start in (0, 6):
        config = small_config(demo_assets, tmp_path / f"run{start}")
        config["data"]["input_frames"]["start_frame_id"] = start
        config = parse_config(config)
        cache = RunCache(config.data.output_folder)
        stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
        upto = [s.name for s in stages].index("latents") + 1
        run_stages(stages[:upto], cache, progress=False)
        latents[start] = bytes_to_tensors(cache.read("latents", f"{8 - start:06d}.safetensors"))["latent"]
        cache.close()
    assert torch.equal(latents[0], latents[6])


def test_crf_change_on_a_complete_run_recomputes_only_the_encode(rendered, demo_assets, tmp_path):
    def change(config):
        config["data"]["crf"] = 30
    reused, redone, run_dir = rerender_changed(rendered, demo_assets, tmp_path, change)
    assert redone == {"encode"}
    assert "smooth.000.blend" in reused and "smooth.final" in reused and "denoise.001.step" in reused
    assert (run_dir / "video.mp4").read_bytes() != (rendered / "run" / "video.mp4").read_bytes()


def test_final_smoothing_off_and_on_again_reuses_the_diffusion(rendered, demo_assets, tmp_path):
    def final_off(config):
        config["pipeline"]["pipeline_inputs"]["smoother_progress_ids"] = [0]
    reused, redone, run_dir = rerender_changed(rendered, demo_assets, tmp_path, final_off)
    assert redone == {"encode"}
    assert {"smooth.000.blend", "denoise.001.step", "vae_decode"} <= reused
    assert "smooth.final" not in {stage for stage, _ in unit_times(run_dir)}

    before = unit_times(run_dir)
    config = small_config(demo_assets, run_dir)  # final smoothing back on
    result = run_cli("render", write_config(tmp_path / "again.yaml", config), "--no-progress")
    assert result.returncode == 0, result.stderr
    redone = {stage for (stage, key), t in unit_times(run_dir).items() if before.get((stage, key)) != t}
    assert redone == {"smooth.final", "encode"}
    assert (run_dir / "video.mp4").read_bytes() == (rendered / "run" / "video.mp4").read_bytes()


def test_initial_noise_is_shared_without_a_motion_module_and_per_frame_with_one(demo_assets, tmp_path):
    """The original draws one noise for every frame when there is no motion module (an image model then flickers
    less) and one per frame with it; the shared noise comes from the seed alone, whatever the frame range."""
    latents = {}
    for motion in (True, False):
        for start in (0, 3):
            config = small_config(demo_assets, tmp_path / f"run-{motion}-{start}")
            config["data"]["input_frames"]["start_frame_id"] = start
            if not motion:
                config["models"]["model_list"] = config["models"]["model_list"][:1]
            config = parse_config(config)
            cache = RunCache(config.data.output_folder)
            stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
            run_stages(stages[:[s.name for s in stages].index("latents") + 1], cache, progress=False)
            latents[motion, start] = [bytes_to_tensors(cache.read("latents", f"{i:06d}.safetensors"))["latent"]
                                      for i in range(4)]
            cache.close()
    shared = latents[False, 0]
    assert all(torch.equal(shared[0], frame) for frame in shared + latents[False, 3])
    per_frame = latents[True, 0]
    assert not torch.equal(per_frame[0], per_frame[1])
    assert torch.equal(per_frame[3], latents[True, 3][0])  # frame 3 of the clip, whichever frame the range starts at
