"""VAE tiling (models.vae_tile_size): frames wider or taller than the tile are VAE-encoded and -decoded with diffusers'
AutoencoderKL tiling; frames at or below it keep their bytes and fingerprints. The tiny demo models have
config.sample_size 64, so diffusers' own default would tile them at 64 px: these tests check the threshold is the
config's, in pixels of the frame."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from helpers import small_config

from diffsynth.cache import RunCache, bytes_to_image
from diffsynth.config import parse_config
from diffsynth.errors import UserError
from diffsynth.models.loader import ModelStore, vae_tile
from diffsynth.pipeline import RenderContext, build_stages
from diffsynth.runner import run_stages
from diffsynth.stages.latents import encode_image
from diffsynth.stages.vae_decode import decode_latent

VAE_STAGES = ("latents", "smooth.000.x0", "denoise.000.step", "vae_decode")


def tiling_config(demo_assets, folder, size=96, tile=None, frames=4):
    """The small config at size × size with in-loop smoothing at step 0 and denoising_strength < 1, so that every VAE
    call site runs: the initial latents' encode, the x0 decode, the step's encode of the smoothed frames, the final
    decode."""
    config = small_config(demo_assets, folder, denoising_strength=0.5, animatediff_batch_size=4,
                          animatediff_stride=2, smoother_progress_ids=[0])
    config["data"]["input_frames"].update(width=size, height=size, end_frame_id=frames)
    if tile is not None:
        config["models"]["vae_tile_size"] = tile
    return parse_config(config)


def stages_of(config):
    return {stage.name: stage for stage in build_stages(RenderContext(config, None, ModelStore(config.models)))}


def smooth_image(size=96):
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 2.5, y * 2.5, (x + y) * 1.2], -1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def vae(demo_assets, tmp_path_factory):
    config = tiling_config(demo_assets, tmp_path_factory.mktemp("vae") / "run")
    return ModelStore(config.models).vae


@pytest.fixture
def tiled_calls(monkeypatch):
    """Counts of diffusers' tiled encode and decode calls (any AutoencoderKL)."""
    counts = {"encode": 0, "decode": 0}

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return wrapper
    monkeypatch.setattr(AutoencoderKL, "_tiled_encode", counting("encode", AutoencoderKL._tiled_encode))
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", counting("decode", AutoencoderKL.tiled_decode))
    return counts


def test_the_tile_decision_is_in_pixels_of_the_frame():
    assert vae_tile(512, 512, 512) is None  # at the threshold: whole
    assert vae_tile(512, 512, 520) == 512 and vae_tile(512, 1536, 1536) == 512
    assert vae_tile(0, 4096, 4096) is None  # 0 = never
    assert parse_config({"models": {"model_list": []}, "data": {
        "input_frames": {"image_folder": "x"}, "output_folder": "y"}}).models.vae_tile_size == 512


def test_a_tile_size_that_is_not_a_multiple_of_32_is_refused(demo_assets, tmp_path):
    config = small_config(demo_assets, tmp_path / "run")
    config["models"]["vae_tile_size"] = 100
    with pytest.raises(UserError, match="models.vae_tile_size"):
        parse_config(config)


def test_frames_at_or_below_the_tile_keep_their_fingerprints(demo_assets, tmp_path):
    """64 × 64 frames: the default tile (512), a tile of exactly 64 and no tiling give the same fingerprints, for
    every stage, and no VAE stage's params name a tile: existing run folders stay valid."""
    never = stages_of(tiling_config(demo_assets, tmp_path / "run", size=64, tile=0))
    for tile in (None, 64):
        stages = stages_of(tiling_config(demo_assets, tmp_path / "run", size=64, tile=tile))
        assert {n: s.fingerprint for n, s in stages.items()} == {n: s.fingerprint for n, s in never.items()}
    assert all("vae_tile" not in never[name].params() for name in VAE_STAGES)


def test_larger_frames_name_their_tile_in_the_vae_stages_only(demo_assets, tmp_path):
    tiled = stages_of(tiling_config(demo_assets, tmp_path / "run", tile=64))
    whole = stages_of(tiling_config(demo_assets, tmp_path / "run", tile=0))
    for name in VAE_STAGES:
        assert tiled[name].params()["vae_tile"] == 64
        assert "vae_tile" not in whole[name].params()
        assert tiled[name].fingerprint != whole[name].fingerprint
    upstream = [name for name in tiled if name.startswith(("decode", "crop", "annotate", "prompts"))]
    assert upstream and all(tiled[n].fingerprint == whole[n].fingerprint for n in upstream)
    # a tile at least the frame's size: whole frames, the fingerprints of no tiling
    untiled = stages_of(tiling_config(demo_assets, tmp_path / "run", tile=96))
    assert {n: s.fingerprint for n, s in untiled.items()} == {n: s.fingerprint for n, s in whole.items()}


def test_tiled_encode_and_decode_run_deterministically_with_the_right_shapes(vae, tiled_calls):
    image = smooth_image()
    latent = encode_image(vae, image, 64)
    decoded = decode_latent(vae, latent, 64)
    assert tiled_calls == {"encode": 1, "decode": 1}
    assert latent.shape == (4, 12, 12) and decoded.shape == (96, 96, 3) and decoded.dtype == np.uint8
    assert torch.equal(encode_image(vae, image, 64), latent)
    assert decode_latent(vae, latent, 64).tobytes() == decoded.tobytes()
    # The untiled path after a tiled call: diffusers' own threshold (the tiny model's sample_size, 64 px) never
    # applies, the switch is off.
    whole_latent, whole = encode_image(vae, image, None), decode_latent(vae, latent, None)
    assert tiled_calls == {"encode": 2, "decode": 2}
    assert whole_latent.shape == latent.shape and whole.shape == decoded.shape


def test_tiles_are_decoded_as_whole_small_frames_and_stitched_in_place(vae):
    """The tiled decode's top-left corner, up to the first blend, is the corner of the first tile decoded on its own
    (the untiled decoder on the first 64 × 64 px of latent); the tiled frame stays close to the untiled one in
    colour (the tiny models' random weights make every pixel sensitive to its whole tile, so pixels are compared
    only loosely, through the channel means)."""
    latent = encode_image(vae, smooth_image(), None) * 0.18215
    tiled = decode_latent(vae, latent, 64)
    first_tile = decode_latent(vae, latent[:, :8, :8].contiguous(), None)
    assert np.array_equal(tiled[:48, :48], first_tile[:48, :48])  # 48 = 64 px - the 16-px blend
    whole = decode_latent(vae, latent, None)
    assert np.abs(tiled.mean((0, 1)) - whole.mean((0, 1))).max() < 4
    tiled_latent, whole_latent = encode_image(vae, smooth_image(), 64), encode_image(vae, smooth_image(), None)
    assert (tiled_latent.mean((1, 2)) - whole_latent.mean((1, 2))).abs().max() < 0.05


def test_every_vae_call_site_tiles_larger_frames(demo_assets, tmp_path, tiled_calls):
    """96 × 96 frames, vae_tile_size 64, 3 frames: the initial latents' and the smoothed frames' encodes, the x0 and
    the final decodes all go through diffusers' tiling, one call per frame each; the output frames are 96 × 96."""
    config = tiling_config(demo_assets, tmp_path / "run", tile=64, frames=3)
    cache = RunCache(config.data.output_folder)
    try:
        stages = build_stages(RenderContext(config, cache, ModelStore(config.models)))
        upto = [s.name for s in stages].index("vae_decode") + 1
        run_stages(stages[:upto], cache, progress=False)
        assert tiled_calls == {"encode": 3 + 3, "decode": 3 + 3}
        assert bytes_to_image(cache.read("vae_decode", "000000.safetensors")).shape == (96, 96, 3)
    finally:
        cache.close()
