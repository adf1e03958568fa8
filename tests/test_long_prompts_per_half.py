"""`long_prompts: diffutoon` gives each CFG half its prompt at its own length, as the original encodes and attends
to each prompt (issue 18): a negative prompt shorter than the positive is not padded to it, and the window runs the
UNet and the ControlNets once per half. The default `chunks` pads both halves to the longest, as before."""

import types

import torch
from helpers import small_config

from diffsynth.cache import RunCache, bytes_to_tensors
from diffsynth.config import parse_config
from diffsynth.models.loader import ModelStore
from diffsynth.pipeline import RenderContext, build_stages
from diffsynth.runner import run_stages
from diffsynth.stages.base import frame_key
from diffsynth.stages.latents import image_to_vae_input
from diffsynth.stages.prompts import EMBEDDINGS_KEY, PromptStage

LONG = "a toon cat in a garden at night, " * 4  # the demo tokenizer: one token per character: two 77-token slices


def prompt_stage(config):
    return PromptStage(types.SimpleNamespace(config=config, models=ModelStore(config.models)))


def embeddings(stage, key=EMBEDDINGS_KEY):
    return bytes_to_tensors(stage.compute(key)[0])


def test_chunks_pads_both_halves_to_the_longest_and_keeps_its_params(demo_assets, tmp_path):
    stage = prompt_stage(parse_config(small_config(demo_assets, tmp_path / "run", prompt=LONG)))
    assert set(stage.params()) == {"prompt", "negative_prompt", "clip_skip", "models"}  # as before: fingerprints kept
    halves = embeddings(stage)
    assert halves["positive"].shape[1] == halves["negative"].shape[1] == 2 * 77
    # The negative's second chunk is the empty prompt's.
    empty = embeddings(prompt_stage(parse_config(small_config(demo_assets, tmp_path / "run", prompt="",
                                                              negative_prompt=""))))["negative"]
    assert torch.equal(halves["negative"][:, 77:], empty)


def test_diffutoon_keeps_each_halfs_length_and_pads_keyframes_within_a_half(demo_assets, tmp_path):
    plain = prompt_stage(parse_config(small_config(demo_assets, tmp_path / "run", prompt=LONG,
                                                   long_prompts="diffutoon")))
    assert plain.params()["padding"] == "per_half"
    halves = embeddings(plain)
    assert (halves["positive"].shape[1], halves["negative"].shape[1]) == (2 * 77, 77)
    travel = prompt_stage(parse_config(small_config(demo_assets, tmp_path / "run", long_prompts="diffutoon",
                                                    prompt={0: "a toon cat", 6: LONG},
                                                    negative_prompt={0: "blurry", 8: "ugly"})))
    lengths = {key: embeddings(travel, key)["embedding"].shape[1] for key in travel.unit_keys()}
    assert lengths == {"negative.000000.safetensors": 77, "negative.000008.safetensors": 77,
                       "positive.000000.safetensors": 2 * 77, "positive.000006.safetensors": 2 * 77}


@torch.no_grad()
def window_eps_by_hand(stage, j, text):
    """The window's ε with each CFG half run on its own: per half, the ControlNets in groups of
    controlnet_batch_size frames and one UNet call on the window's video, each with that half's text."""
    start, end = stage.windows[j]
    inputs = stage.ctx.config.pipeline.pipeline_inputs
    models = stage.ctx.models
    frames = end - start
    latents = stage.read_latents(range(start, end))
    conditions = [torch.cat([image_to_vae_input(stage.read_image(source, frame_key(i)), "cpu")
                             for i in range(start, end)]).add(1).div(2) for source in stage.control_sources]
    eps = {}
    for half in ("negative", "positive"):
        half_text = text[half].expand(frames, -1, -1)
        down_total = mid_total = None
        chunk = inputs.controlnet_batch_size
        for unit, controlnet, condition in zip(stage.ctx.config.models.controlnet_units, models.controlnets,
                                               conditions):
            pieces = [controlnet(latents[i:i + chunk], stage.timestep, encoder_hidden_states=half_text[i:i + chunk],
                                 controlnet_cond=condition[i:i + chunk], conditioning_scale=unit.scale,
                                 return_dict=False) for i in range(0, frames, chunk)]
            down = [torch.cat([piece[0][level] for piece in pieces]) for level in range(len(pieces[0][0]))]
            mid = torch.cat([piece[1] for piece in pieces])
            down_total = down if down_total is None else [a + b for a, b in zip(down_total, down)]
            mid_total = mid if mid_total is None else mid_total + mid
        video = latents.unsqueeze(0).permute(0, 2, 1, 3, 4)
        out = models.unet(video, stage.timestep, encoder_hidden_states=half_text,
                          down_block_additional_residuals=down_total, mid_block_additional_residual=mid_total).sample
        eps[half] = out.permute(0, 2, 1, 3, 4).reshape(latents.shape).float()
    return eps["negative"] + inputs.cfg_scale * (eps["positive"] - eps["negative"])


def test_diffutoon_window_runs_each_half_at_its_own_length(demo_assets, tmp_path):
    config = parse_config(small_config(demo_assets, tmp_path / "run", prompt=LONG, long_prompts="diffutoon",
                                       controlnet_batch_size=4, num_inference_steps=1, smoother_progress_ids=[]))
    cache = RunCache(config.data.output_folder)
    stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
    prompts = next(stage for stage in stages if stage.name == "prompts")
    windows = next(stage for stage in stages if stage.name == "denoise.000.windows")
    models = windows.ctx.models
    unet_text, controlnet_text = [], []
    unet_hook = models.unet.register_forward_pre_hook(
        lambda module, args, kwargs: unet_text.append(kwargs["encoder_hidden_states"].shape), with_kwargs=True)
    controlnet_hooks = [controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: controlnet_text.append(kwargs["encoder_hidden_states"].shape), with_kwargs=True)
        for controlnet in models.controlnets]
    run_stages(stages[:stages.index(windows) + 1], cache, progress=False)
    unet_hook.remove()
    for hook in controlnet_hooks:
        hook.remove()
    # Per window, the UNet once per half: the negative's 77 tokens, the positive's 154, never padded.
    assert unet_text == [(8, 77, unet_text[0][2]), (8, 154, unet_text[0][2])] * len(windows.windows)
    # The ControlNets per group of 4 frames, per unit, per half, each half with its own length.
    assert sorted({shape[:2] for shape in controlnet_text}) == [(4, 77), (4, 154)]
    assert len(controlnet_text) == 12 // 4 * 2 * 2
    text = windows.read_tensors(prompts, EMBEDDINGS_KEY)
    for j in range(len(windows.windows)):
        cached = bytes_to_tensors(cache.read(windows.name, windows.window_key(j)))["eps"]
        assert torch.equal(cached, window_eps_by_hand(windows, j, text)), f"window {j} differs"
    cache.close()


def test_diffutoon_own_lengths_in_the_cross_frame_path(demo_assets, tmp_path):
    """The cross-frame path also takes one half's batch: a call per half, the window's ε in the window's shape."""
    config = small_config(demo_assets, tmp_path / "run", prompt=LONG, long_prompts="diffutoon",
                          cross_frame_attention=True, num_inference_steps=1, smoother_progress_ids=[])
    config["data"]["input_frames"]["end_frame_id"] = 8  # one window
    config = parse_config(config)
    cache = RunCache(config.data.output_folder)
    stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
    windows = next(stage for stage in stages if stage.name == "denoise.000.windows")
    unet_text = []
    windows.ctx.models.unet.register_forward_pre_hook(
        lambda module, args, kwargs: unet_text.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    run_stages(stages[:stages.index(windows) + 1], cache, progress=False)
    assert unet_text == [77, 154]
    eps = bytes_to_tensors(cache.read(windows.name, windows.window_key(0)))["eps"]
    assert eps.shape == (8, 4, 8, 8) and torch.isfinite(eps).all()
    cache.close()
