"""The motion modules normalise each frame on its own, as AnimateDiff and the original Diffutoon do
(`b c f h w -> (b f) c h w` before the GroupNorm), not the whole window as diffusers' AnimateDiffTransformer3D.
Checked against the norm and the motion module written out by hand, in every UNet the loader builds, and by what
it implies: only the temporal attention may make a frame's ε depend on the other frames of its window."""

from contextlib import contextmanager

import pytest
import torch
from diffusers import MotionAdapter

from diffsynth.config import parse_config
from diffsynth.models.loader import ModelStore
from diffsynth.models.motion import FrameGroupNorm, motion_modules, motion_unet, set_motion_norm
from diffsynth.models.tiny import BLOCK_CHANNELS, make_motion_adapter, make_unet

FRAMES, SIZE = 12, 8  # latent frames and size
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: two threads only spin on a busy CI box


def per_frame_group_norm_by_hand(x, groups, weight, bias, eps):
    """x (batch, C, frames, H, W): each (sample, frame, group) normalised by its own mean and biased variance."""
    out = torch.empty_like(x)
    channels = x.shape[1] // groups
    for b in range(x.shape[0]):
        for f in range(x.shape[2]):
            for g in range(groups):
                part = x[b, g * channels:(g + 1) * channels, f].double()
                mean, var = part.mean(), part.var(unbiased=False)
                out[b, g * channels:(g + 1) * channels, f] = ((part - mean) / torch.sqrt(var + eps)).float()
    return out * weight[None, :, None, None, None] + bias[None, :, None, None, None]


def test_frame_group_norm_equals_the_hand_written_per_frame_norm():
    generator = torch.Generator().manual_seed(0)
    # diffusers hands the norm a (batch, frames, C, H, W) tensor viewed as (batch, C, frames, H, W)
    x = (torch.randn(2, 5, 16, 3, 4, generator=generator) * 3 + 1).permute(0, 2, 1, 3, 4)
    x[:, :, 2] += 10  # one frame far brighter: a window norm would shift every other frame
    norm = FrameGroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=generator))
        norm.bias.copy_(torch.randn(16, generator=generator))
        expected = per_frame_group_norm_by_hand(x, 4, norm.weight, norm.bias, 1e-6)
        out = norm(x)
        window = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
    assert out.shape == x.shape
    assert torch.allclose(out, expected, atol=2e-6, rtol=0)
    assert (window - expected).abs().max() > 0.5  # diffusers' window norm is far from it: the test can fail
    assert torch.equal(norm(x[:, :, 1:3]), out[:, :, 1:3])  # a frame's result does not depend on the others


@pytest.fixture(scope="module")
def unet():
    return motion_unet(make_unet(), make_motion_adapter()).eval()


def test_motion_module_equals_animatediffs_formulation(unet):
    """The whole motion module against AnimateDiff's data flow written out: (b f) c h w → per-frame GroupNorm →
    (b h w) f c → proj_in → temporal transformer blocks → proj_out → back, plus the residual."""
    module = next(motion_modules(unet))
    channels = module.norm.num_channels
    generator = torch.Generator().manual_seed(1)
    batch = 2
    x = torch.randn(batch * FRAMES, channels, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        out = module(x, num_frames=FRAMES)
        normed = torch.nn.functional.group_norm(x, module.norm.num_groups, module.norm.weight, module.norm.bias,
                                                module.norm.eps)  # per (b f) sample: per frame
        h = normed.reshape(batch, FRAMES, channels, SIZE, SIZE).permute(0, 3, 4, 1, 2)
        h = module.proj_in(h.reshape(batch * SIZE * SIZE, FRAMES, channels))
        for block in module.transformer_blocks:
            h = block(h)
        h = module.proj_out(h).reshape(batch, SIZE, SIZE, FRAMES, channels).permute(0, 3, 4, 1, 2)
        expected = h.reshape(batch * FRAMES, channels, SIZE, SIZE) + x
        set_motion_norm(unet, "window")
        try:
            window = module(x, num_frames=FRAMES)
        finally:
            set_motion_norm(unet, "frame")
    assert isinstance(module.norm, FrameGroupNorm)
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    assert (window - expected).abs().max() > 1e-2


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_motion_module_is_per_frame(version):
    """v1 (no mid-block motion module) and v2/v3 (with one): every motion module gets the per-frame norm, sharing
    the adapter's parameters (a state dict is unchanged); `window` puts diffusers' GroupNorm back."""
    adapter = MotionAdapter(block_out_channels=BLOCK_CHANNELS, motion_layers_per_block=1,
                            motion_mid_block_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=version != "v1")
    built = motion_unet(make_unet(), adapter)
    modules = list(motion_modules(built))
    expected = 3 * len(BLOCK_CHANNELS) + (version != "v1")  # down: 1 per block, up: 2 per block, mid: v2 on
    assert len(modules) == expected and all(type(m.norm) is FrameGroupNorm for m in modules)
    keys = set(built.state_dict())
    set_motion_norm(built, "window")
    assert all(type(m.norm) is torch.nn.GroupNorm for m in motion_modules(built)) and set(built.state_dict()) == keys


@contextmanager
def without_temporal_attention(unet):
    """Within the block the motion modules' attention outputs are zero: every remaining layer is per frame."""
    outputs = [attention.to_out[0] for module in motion_modules(unet) for block in module.transformer_blocks
               for attention in (block.attn1, block.attn2)]
    saved = [(layer.weight.clone(), layer.bias.clone()) for layer in outputs]
    with torch.no_grad():
        for layer in outputs:
            layer.weight.zero_()
            layer.bias.zero_()
    try:
        yield unet
    finally:
        with torch.no_grad():
            for layer, (weight, bias) in zip(outputs, saved):
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)


def window_eps(unet, latents, text, start, end):
    """ε of frames [start, end) as one video (one CFG half is enough here)."""
    video = latents[start:end].permute(1, 0, 2, 3)[None]  # (1, C, frames, h, w)
    with torch.no_grad():
        out = unet(video, 500, encoder_hidden_states=text.expand(end - start, -1, -1)).sample
    return out[0].permute(1, 0, 2, 3)


@pytest.mark.parametrize("motion_norm", ["frame", "window"])
def test_a_frames_eps_depends_on_its_window_only_through_temporal_attention(unet, motion_norm):
    """Frames 3..5 lie in windows [0, 6) and [3, 9). With the temporal attention silenced, per-frame norms make
    their ε the same in both windows (to float32 GEMM rounding); the window norm does not."""
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(9, 4, 4, 4, generator=generator)
    latents[6:] *= 3  # the later frames differ in scale, so the second window's statistics differ
    text = torch.randn(1, 77, 32, generator=generator)
    with without_temporal_attention(set_motion_norm(unet, motion_norm)) as local:
        difference = (window_eps(local, latents, text, 0, 6)[3:] - window_eps(local, latents, text, 3, 9)[:3])
    set_motion_norm(unet, "frame")
    if motion_norm == "window":
        assert difference.abs().max() > 1e-3
        return
    assert difference.abs().max() < 1e-5
    # With the attention on, a frame's ε does depend on the window's other frames (AnimateDiff's point).
    assert (window_eps(unet, latents, text, 0, 6)[3:] - window_eps(unet, latents, text, 3, 9)[:3]).abs().max() > 1e-3


def test_loader_builds_the_unet_with_the_configured_norm(tiny):
    """The UNet every render uses (folders and the original single-file layouts), and its fingerprint."""
    def store(model_list, **models):
        return ModelStore(parse_config({
            "models": {"model_list": [str(p) for p in model_list], "device": "cpu", **models},
            "data": {"input_frames": {"image_folder": "x"}, "output_folder": "run"}}).models)

    files = store([tiny.files["sd_safetensors"], tiny.files["motion"]])
    assert all(type(m.norm) is FrameGroupNorm for m in motion_modules(files.unet))
    folders = store([tiny.folders["stable_diffusion"], tiny.folders["motion_adapter"]], motion_norm="window")
    assert all(type(m.norm) is torch.nn.GroupNorm for m in motion_modules(folders.unet))
    assert files.identity("unet")["motion_norm"] == "frame" and folders.identity("unet")["motion_norm"] == "window"
    assert "motion_norm" not in store([tiny.folders["stable_diffusion"]]).identity("unet")
