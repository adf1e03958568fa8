"""Frame-chunked UNet with a motion module: the spatial layers run unet_batch_size frames at a time, the motion
modules see the whole window (in pieces of pixel rows), and the result is bit-identical to the whole-window call on
the CPU in float32."""

import pytest
import torch

from diffsynth.models import split_inference
from diffsynth.models.loader import use_sdpa
from diffsynth.models.motion import motion_unet
from diffsynth.models.split_inference import FrameSplit, chunked, motion_unet_eps, samples_per_spatial_call
from diffsynth.models.tiny import make_controlnet, make_motion_adapter, make_unet

FRAMES, HEIGHT, WIDTH = 5, 8, 16  # latent size


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    unet2d = make_unet()
    unet = motion_unet(unet2d, make_motion_adapter()).eval()
    controlnet = make_controlnet(unet2d, 10).eval()
    use_sdpa(unet)
    use_sdpa(controlnet)
    return unet, controlnet


@pytest.fixture(scope="module")
def window(tiny_models):
    """A CFG batch [negative × frames, positive × frames] with per-frame text and ControlNet residuals."""
    _, controlnet = tiny_models
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2 * FRAMES, 4, HEIGHT, WIDTH, generator=generator)
    text = torch.randn(2 * FRAMES, 77, 32, generator=generator)
    condition = torch.rand(2 * FRAMES, 3, HEIGHT * 8, WIDTH * 8, generator=generator)
    with torch.no_grad():
        down, mid = controlnet(sample, 500, encoder_hidden_states=text, controlnet_cond=condition, return_dict=False)
    return sample, text, list(down), mid


def eps(unet, window, frames_per_call, cfg_halves="together", residuals=True):
    sample, text, down, mid = window
    return motion_unet_eps(unet, sample, text, 500, down if residuals else None, mid if residuals else None,
                           FRAMES, frames_per_call, cfg_halves)


def whole_window_call(unet, window):
    """The call the denoise stage made before chunking existed: the whole CFG batch in one UNet call."""
    sample, text, down, mid = window
    video = sample.reshape(2, FRAMES, *sample.shape[1:]).permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        out = unet(video, 500, encoder_hidden_states=text, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
    return out.permute(0, 2, 1, 3, 4).reshape(sample.shape)


def count_split_calls(monkeypatch):
    calls = []
    forward = FrameSplit.forward

    def counting(self, *args, **kwargs):
        calls.append(self.parts is not None)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(FrameSplit, "forward", counting)
    return calls


def test_whole_window_is_the_untouched_call(tiny_models, window, monkeypatch):
    """unet_batch_size ≥ the window with the halves together is exactly today's call: no wrapper runs, same bits."""
    unet, _ = tiny_models
    calls = count_split_calls(monkeypatch)
    assert torch.equal(eps(unet, window, FRAMES), whole_window_call(unet, window))
    assert torch.equal(eps(unet, window, 100), whole_window_call(unet, window))
    assert calls == []


@pytest.mark.parametrize("frames_per_call, residuals", [(1, True), (2, True), (4, False)])  # 2, 4: not divisors
def test_chunked_equals_whole_window_bit_for_bit(tiny_models, window, monkeypatch, frames_per_call, residuals):
    unet, _ = tiny_models
    reference = eps(unet, window, FRAMES, residuals=residuals)
    calls = count_split_calls(monkeypatch)
    chunked_eps = eps(unet, window, frames_per_call, residuals=residuals)
    assert torch.equal(chunked_eps, reference)
    assert any(calls) and not all(calls)  # both the spatial layers and the motion modules really ran in pieces
    assert "FrameSplit" not in repr(unet)  # the model is left as it was


def test_halves_apart_chunked_equal_apart_whole(tiny_models, window):
    """cfg_halves apart: one UNet call per half, chunked bit-identically to its own whole call (chunks of ≥ 2
    frames: here 5 = 3 + 2, where 2 + 2 + 1 would leave a one-sample chunk, see below); it differs from `together` in the low bits only (the time-embedding GEMMs have 1 row instead of 2,
    and MKL rounds GEMMs of a few rows differently), which is why `apart` is part of the stage's fingerprint."""
    unet, _ = tiny_models
    reference = eps(unet, window, FRAMES, "apart")
    assert torch.equal(eps(unet, window, 3, "apart"), reference)
    together = eps(unet, window, FRAMES)
    assert torch.allclose(reference, together, atol=1e-5) and not torch.equal(reference, together)


def test_one_sample_chunks_differ_only_through_the_conv_backend():
    """Why apart with 1 frame per call is not bit-identical at small sizes: ATen sends a float32 CPU conv with a
    batch of one, a kernel of at most 3×3 and at most 20480 input elements to its native Slow2d kernel
    (ConvParams::use_mkldnn in aten/src/ATen/native/Convolution.cpp), every larger batch to oneDNN, and the two
    round their sums differently. With ≥ 2 samples per call (always so with cfg_halves together) or larger
    inputs, every chunk takes the oneDNN path, as the whole batch does."""
    weight, bias = torch.randn(32, 32, 3, 3), torch.randn(32)

    def backend(shape):
        return str(torch._C._select_conv_backend(torch.randn(shape), weight, bias, [1, 1], [1, 1], [1, 1], False,
                                                 [0, 0], 1, None))
    assert backend((1, 32, 16, 24)) == "_ConvBackend.Slow2d"  # 12288 elements
    assert backend((2, 32, 16, 24)) == "_ConvBackend.Mkldnn"
    assert backend((1, 32, 32, 24)) == "_ConvBackend.Mkldnn"  # 24576 elements


def test_spatial_layers_see_the_chunk_and_motion_modules_the_window(tiny_models, window, monkeypatch):
    """Every spatial call holds at most 2 × frames_per_call samples; every motion transformer call holds all the
    window's frames (its second dimension)."""
    unet, _ = tiny_models
    seen = {"spatial": set(), "motion": set()}
    forward = FrameSplit.forward

    def recording(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        return result
    original_call = split_inference.SplitInferenceModule.forward

    def record_inner(self, **kwargs):
        tensor = next(kwargs[key] for key in self.input_kwargs_to_split if torch.is_tensor(kwargs.get(key)))
        for piece in torch.split(tensor, self.split_size, 0):
            seen["motion" if self.parts is not None else "spatial"].add(
                piece.shape[1] if self.parts is not None else piece.shape[0])
        return original_call(self, **kwargs)
    monkeypatch.setattr(split_inference.SplitInferenceModule, "forward", record_inner)
    monkeypatch.setattr(FrameSplit, "forward", recording)
    eps(unet, window, 3)
    assert seen["spatial"] == {6, 4}  # 10 samples: 6 + 4
    assert seen["motion"] == {FRAMES}


def test_samples_per_spatial_call():
    assert samples_per_spatial_call(16, 1, "together") == 2
    assert samples_per_spatial_call(16, 1, "apart") == 1
    assert samples_per_spatial_call(16, 16, "together") is None
    assert samples_per_spatial_call(16, 40, "apart") is None


def test_chunked_restores_the_layers_after_an_error(tiny_models):
    unet, _ = tiny_models
    before = [id(module) for module in unet.modules()]
    with pytest.raises(RuntimeError):
        with chunked(unet, 2, 3):
            unet(torch.randn(1, 5, 2, 8, 8), 1, encoder_hidden_states=torch.randn(2, 77, 32))  # 5 channels: fails
    assert [id(module) for module in unet.modules()] == before
