"""Prompt travel: `prompt` / `negative_prompt` as {frame: prompt}. One prompts unit per keyframe prompt; each
frame's embedding is interpolated linearly between the keys around it when a sliding window is built, and the UNet
and the ControlNets get each frame's own embedding."""

import json
import types

import pytest
import torch
from helpers import committed_units, recomputed, small_config

from diffsynth.cache import RunCache
from diffsynth.config import config_json, parse_config
from diffsynth.errors import UserError
from diffsynth.models.loader import ModelStore
from diffsynth.pipeline import RenderContext, build_stages
from diffsynth.runner import run_stages
from diffsynth.stages.prompts import EMBEDDINGS_KEY, PromptStage, PromptTimeline, interpolation_between

POSITIVE = {0: "a toon cat", 8: "a toon dog at night, ((stars))"}  # 12 frames: 8..11 hold the last key
NEGATIVE = {0: "blurry", 6: "dark, lowres"}


def test_interpolation_between_keys():
    keys = [2, 6, 10]
    assert interpolation_between(keys, 0) == (2, 2, 0.0)  # before the first key: the first key holds
    assert interpolation_between(keys, 2) == (2, 2, 0.0)  # at a key: that key exactly
    assert interpolation_between(keys, 6) == (6, 6, 0.0)
    assert interpolation_between(keys, 3) == (2, 6, 0.25)
    assert interpolation_between(keys, 8) == (6, 10, 0.5)
    assert interpolation_between(keys, 10) == (10, 10, 0.0)
    assert interpolation_between(keys, 50) == (10, 10, 0.0)  # after the last key: the last key holds
    assert interpolation_between([0], 7) == (0, 0, 0.0)


def test_config_accepts_mappings_and_round_trips(demo_assets, tmp_path):
    config = parse_config(small_config(demo_assets, tmp_path / "run", prompt=POSITIVE, negative_prompt=NEGATIVE))
    assert config.pipeline.pipeline_inputs.prompt == POSITIVE
    # config.json (JSON object keys are strings) reads back with integer frame keys.
    assert parse_config(json.loads(config_json(config))).pipeline.pipeline_inputs.prompt == POSITIVE
    with pytest.raises(UserError, match="pipeline.pipeline_inputs.prompt.*negative"):
        parse_config(small_config(demo_assets, tmp_path / "run", prompt={-1: "a cat"}))
    with pytest.raises(UserError, match="at least one"):
        parse_config(small_config(demo_assets, tmp_path / "run", negative_prompt={}))


def prompt_stage(demo_assets, tmp_path, models=None, **pipeline_inputs):
    config = parse_config(small_config(demo_assets, tmp_path / "run", **pipeline_inputs))
    return PromptStage(types.SimpleNamespace(config=config, models=models or ModelStore(config.models)))


def test_fingerprint_changes_when_a_key_changes_and_plain_prompts_keep_their_layout(demo_assets, tmp_path):
    models = ModelStore(parse_config(small_config(demo_assets, tmp_path / "run")).models)
    travel = prompt_stage(demo_assets, tmp_path, models, prompt=POSITIVE, negative_prompt=NEGATIVE)
    assert travel.unit_keys() == ["negative.000000.safetensors", "negative.000006.safetensors",
                                  "positive.000000.safetensors", "positive.000008.safetensors"]
    moved_key = prompt_stage(demo_assets, tmp_path, models, prompt={0: POSITIVE[0], 9: POSITIVE[8]},
                             negative_prompt=NEGATIVE)
    changed_text = prompt_stage(demo_assets, tmp_path, models, prompt={**POSITIVE, 8: "a toon dog"},
                                negative_prompt=NEGATIVE)
    changed_negative = prompt_stage(demo_assets, tmp_path, models, prompt=POSITIVE, negative_prompt={0: "blurry"})
    fingerprints = {stage.fingerprint for stage in (travel, moved_key, changed_text, changed_negative)}
    assert len(fingerprints) == 4
    assert prompt_stage(demo_assets, tmp_path, models, prompt=dict(POSITIVE),
                        negative_prompt=dict(NEGATIVE)).fingerprint == travel.fingerprint

    plain = prompt_stage(demo_assets, tmp_path, models, prompt="a toon cat", negative_prompt="blurry")
    assert plain.unit_keys() == [EMBEDDINGS_KEY]
    assert set(plain.params()) == {"prompt", "negative_prompt", "clip_skip", "models"}  # as before travel existed


def test_mapping_prompt_renders_with_each_frames_own_embedding(demo_assets, tmp_path):
    config = parse_config(small_config(demo_assets, tmp_path / "run", prompt=POSITIVE, negative_prompt=NEGATIVE))
    cache = RunCache(config.data.output_folder)
    stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
    prompts = next(stage for stage in stages if stage.name == "prompts")
    windows = next(stage for stage in stages if stage.name == "denoise.000.windows")
    assert windows.windows == [(0, 8), (4, 12)]

    # What the UNet and the ControlNets are given as encoder_hidden_states at step 0.
    unet_text, controlnet_text = [], []
    models = windows.ctx.models
    models.unet.register_forward_pre_hook(
        lambda module, args, kwargs: unet_text.append(kwargs["encoder_hidden_states"].float().clone()),
        with_kwargs=True)
    models.controlnets[0].register_forward_pre_hook(
        lambda module, args, kwargs: controlnet_text.append(kwargs["encoder_hidden_states"].float().clone()),
        with_kwargs=True)
    run_stages(stages[:stages.index(windows) + 1], cache, progress=False)

    timeline = PromptTimeline(prompts)
    frame_embeddings = timeline.load(windows, range(12))
    key_embedding = {(half, frame): windows.read_tensors(prompts, f"{half}.{frame:06d}.safetensors")["embedding"]
                     for half, keys in (("positive", POSITIVE), ("negative", NEGATIVE)) for frame in keys}
    positive = frame_embeddings("positive", range(12))
    negative = frame_embeddings("negative", range(12))
    # At a key: exactly the key's embedding; halfway between two keys: exactly their mean; past the last key: it.
    assert torch.equal(positive[0:1], key_embedding["positive", 0])
    assert torch.equal(positive[8:9], key_embedding["positive", 8])
    assert torch.equal(positive[4:5], (key_embedding["positive", 0] + key_embedding["positive", 8]) / 2)
    assert torch.equal(positive[11:12], key_embedding["positive", 8])
    assert torch.equal(negative[3:4], (key_embedding["negative", 0] + key_embedding["negative", 6]) / 2)
    assert torch.equal(negative[6:7], key_embedding["negative", 6])
    torch.testing.assert_close(positive[2:3], 0.75 * key_embedding["positive", 0] + 0.25 * key_embedding["positive", 8])
    assert not torch.equal(key_embedding["positive", 0], key_embedding["positive", 8])

    # Every prompt has the chunk count of the longest, so they stack and both CFG halves line up.
    assert {tensor.shape for tensor in key_embedding.values()} == {positive[0:1].shape}
    # Each window's UNet batch is [negative × frames, positive × frames], frame by frame.
    assert len(unet_text) == 2
    for (start, end), text in zip(windows.windows, unet_text):
        torch.testing.assert_close(text, torch.cat([negative[start:end], positive[start:end]]), rtol=0, atol=0)
    # The ControlNets run once per CFG half over frames [0, 12) (controlnet_batch_size 16), with per-frame text.
    assert len(controlnet_text) == 2
    torch.testing.assert_close(controlnet_text[0], negative, rtol=0, atol=0)
    torch.testing.assert_close(controlnet_text[1], positive, rtol=0, atol=0)

    # The rest of the render, then again: the prompts units (and everything else) are reused, nothing recomputed.
    run_stages(stages, cache, progress=False)
    cache.close()
    run_dir = config.data.output_folder
    assert len(list((tmp_path / "run" / "frames").glob("*.png"))) == 12
    before = committed_units(tmp_path / "run")
    assert {key for stage, key in before if stage == "prompts"} == set(prompts.unit_keys())
    cache = RunCache(run_dir)
    run_stages(build_stages(RenderContext(config, cache, ModelStore(config.models))), cache, progress=False)
    cache.close()
    assert recomputed(before, committed_units(tmp_path / "run")) == []


def test_a_travel_that_holds_one_prompt_renders_as_the_plain_prompt(demo_assets, tmp_path):
    """{0: p} for every frame is the plain prompt p: the window ε (both CFG halves, ControlNets) is bit-identical."""
    eps = {}
    for name, prompt in (("plain", "a toon cat"), ("travel", {0: "a toon cat"})):
        config = parse_config(small_config(demo_assets, tmp_path / name, prompt=prompt, num_inference_steps=1,
                                           smoother_progress_ids=[]))
        cache = RunCache(config.data.output_folder)
        stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
        windows = next(stage for stage in stages if stage.name == "denoise.000.windows")
        run_stages(stages[:stages.index(windows) + 1], cache, progress=False)
        eps[name] = [windows.read_tensors(windows, windows.window_key(j))["eps"] for j in range(len(windows.windows))]
        cache.close()
    for plain, travel in zip(eps["plain"], eps["travel"]):
        assert torch.equal(travel, plain)
