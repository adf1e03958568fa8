"""cross_frame_attention (the original's editing-signals recipe): the spatial self-attention of the frames in one
UNet batch runs over all their tokens at once. Checked against attention written out by hand, and in a render."""

import torch
from diffusers.models.attention_processor import Attention
from helpers import small_config

from diffsynth.cache import RunCache, bytes_to_tensors
from diffsynth.config import parse_config
from diffsynth.models.loader import ModelStore
from diffsynth.pipeline import RenderContext, build_stages
from diffsynth.runner import run_stages
from diffsynth.stages.denoise import CrossFrameAttention


def test_joined_self_attention_equals_attention_over_the_concatenated_tokens():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    frames = torch.randn(4, 5, 16)  # 4 frames of 5 tokens
    processor = CrossFrameAttention()
    processor.groups = [2, 2]  # frames (0, 1) attend together, (2, 3) together
    out = processor(attn, frames)

    def by_hand(tokens):  # softmax(QKᵀ/√d)V per head, then the output projection
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        split = lambda x: x.reshape(-1, 2, 8).transpose(0, 1)  # noqa: E731
        weights = torch.softmax(split(q) @ split(k).transpose(1, 2) / 8 ** 0.5, dim=-1)
        mixed = (weights @ split(v)).transpose(0, 1).reshape(-1, 16)
        return attn.to_out[0](mixed)

    for first in (0, 2):
        expected = by_hand(frames[first:first + 2].reshape(10, 16)).reshape(2, 5, 16)
        assert torch.allclose(out[first:first + 2], expected, atol=1e-5)
    # Joined, a frame's output depends on the other frame of its group; apart (groups of one) it does not.
    processor.groups = [1, 1, 1, 1]
    assert not torch.allclose(processor(attn, frames)[0], out[0], atol=1e-4)


def window_eps(demo_assets, folder, **pipeline_inputs):
    config = small_config(demo_assets, folder, num_inference_steps=1, smoother_progress_ids=[], **pipeline_inputs)
    config["models"]["model_list"] = config["models"]["model_list"][:1]  # no motion module, as in the recipe
    config = parse_config(config)
    cache = RunCache(config.data.output_folder)
    stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
    run_stages(stages[:[s.name for s in stages].index("denoise.000.windows") + 1], cache, progress=False)
    eps = bytes_to_tensors(cache.read("denoise.000.windows", "w00000.safetensors"))["eps"]
    cache.close()
    return eps


def test_cross_frame_attention_changes_a_render_only_when_frames_share_a_batch(demo_assets, tmp_path):
    """Same batches, joined or not: the ε differs (exactly equal would mean nothing was joined); one frame per batch
    leaves it bit for bit unchanged."""
    plain = window_eps(demo_assets, tmp_path / "plain", unet_batch_size=4)
    joined = window_eps(demo_assets, tmp_path / "joined", unet_batch_size=4, cross_frame_attention=True)
    assert not torch.equal(plain, joined)
    plain_single = window_eps(demo_assets, tmp_path / "plain1", unet_batch_size=1)
    alone = window_eps(demo_assets, tmp_path / "alone", unet_batch_size=1, cross_frame_attention=True)
    assert torch.equal(plain_single, alone)
