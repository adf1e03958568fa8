"""ControlNet once per (frame, step): each frame's residuals are computed once and reused by the next window that
holds it. Counted (ControlNet calls per frame), and exact: the windows' ε are bit-identical on the CPU to the
computation without reuse, where every window ran the ControlNets on all its frames."""

import pytest
import torch
from helpers import small_config

from diffsynth.cache import RunCache, bytes_to_tensors
from diffsynth.config import parse_config
from diffsynth.models.loader import ModelStore
from diffsynth.pipeline import RenderContext, build_stages
from diffsynth.runner import run_stages


@torch.no_grad()
def window_eps_without_reuse(stage, j):
    """The window's ε as computed before reuse: ControlNet over the whole window batch, in chunks of
    controlnet_batch_size samples of [negative × frames, positive × frames]."""
    start, end = stage.windows[j]
    inputs = stage.ctx.config.pipeline.pipeline_inputs
    frames = end - start
    embeddings = stage.read_tensors(stage.prompts, "embeddings.safetensors")
    text = torch.cat([embeddings["negative"].expand(frames, -1, -1), embeddings["positive"].expand(frames, -1, -1)])
    latents = stage.read_latents(range(start, end))
    sample = torch.cat([latents, latents])
    down_total, mid_total = None, None
    for unit, controlnet, condition in zip(stage.ctx.config.models.controlnet_units, stage.ctx.models.controlnets,
                                           stage.read_conditions(range(start, end))):
        condition = torch.cat([condition, condition])
        chunk = inputs.controlnet_batch_size
        pieces = [controlnet(sample[i:i + chunk], stage.timestep, encoder_hidden_states=text[i:i + chunk],
                             controlnet_cond=condition[i:i + chunk], conditioning_scale=unit.scale, return_dict=False)
                  for i in range(0, sample.shape[0], chunk)]
        down = [torch.cat([piece[0][level] for piece in pieces]) for level in range(len(pieces[0][0]))]
        mid = torch.cat([piece[1] for piece in pieces])
        if down_total is None:
            down_total, mid_total = down, mid
        else:
            down_total = [a + b for a, b in zip(down_total, down)]
            mid_total = mid_total + mid
    eps = stage._unet(sample, text, down_total, mid_total, frames, inputs).float()
    negative, positive = eps.chunk(2)
    return negative + inputs.cfg_scale * (positive - negative)


@pytest.mark.parametrize("controlnet_batch_size", [1, 2, 4])
def test_reused_residuals_give_bit_identical_eps_and_controlnet_runs_once_per_frame(demo_assets, tmp_path,
                                                                                  controlnet_batch_size):
    config = small_config(demo_assets, tmp_path / "run", controlnet_batch_size=controlnet_batch_size,
                          smoother_progress_ids=[], num_inference_steps=1)
    config["data"]["input_frames"]["end_frame_id"] = 16  # windows [0,8) [4,12) [8,16): each inner frame in two
    config = parse_config(config)
    cache = RunCache(config.data.output_folder)
    stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
    windows = next(s for s in stages if s.name == "denoise.000.windows")
    frames_seen = []
    for controlnet in windows.ctx.models.controlnets:
        controlnet.register_forward_hook(lambda module, args, out: frames_seen.append(args[0].shape[0]))
    run_stages(stages[:stages.index(windows) + 1], cache, progress=False)
    # Each frame once per CFG half and ControlNet unit (two units), not once per window holding it.
    assert sum(frames_seen) == 16 * 2 * 2
    for j in range(len(windows.windows)):
        cached = bytes_to_tensors(cache.read(windows.name, windows.window_key(j)))["eps"]
        assert torch.equal(cached, window_eps_without_reuse(windows, j)), f"window {j} differs"
    cache.close()
