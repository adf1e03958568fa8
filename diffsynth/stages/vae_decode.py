"""Stage 8, VAE decode: per frame, latents → RGB PNG with the decoder in float32 (float16 decoders give black
frames)."""

import torch

from ..cache import image_to_bytes
from ..models.loader import set_vae_tiling
from ..schedule import LATENT_SCALE
from .base import Stage


@torch.no_grad()
def decode_latent(vae, latent, tile=None):
    """float32 (4, h, w) latent → uint8 (H, W, 3); in `tile`-pixel tiles when given (ModelStore.vae_tile)."""
    set_vae_tiling(vae, tile)
    image = vae.decode(latent[None].to(vae.device, torch.float32) / LATENT_SCALE).sample[0]
    image = (image.float().cpu() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy()


def frame_vae_tile(ctx):
    """The VAE tile size for the render's frames, or None (whole frames): ModelStore.vae_tile decides."""
    frames = ctx.config.data.input_frames
    return ctx.models.vae_tile(frames.height, frames.width)


def vae_tile_params(ctx):
    """The fingerprint entry of a VAE-calling stage: {"vae_tile": size} for tiled frames; nothing for frames at or
    below the tile size, so their fingerprints (and existing run folders) stay as they were before tiling."""
    tile = frame_vae_tile(ctx)
    return {} if tile is None else {"vae_tile": tile}


class VaeDecodeStage(Stage):
    name = "vae_decode"
    version = "3"  # 2: frames stored as raw uint8 safetensors instead of PNG; 3: frames stored zstd-compressed

    def __init__(self, ctx, latents):
        super().__init__(ctx, [latents])
        self.latents = latents

    def params(self):
        return {"models": self.ctx.models.identity("vae"), **vae_tile_params(self.ctx)}

    def unit_keys(self):
        return self.latents.unit_keys()

    def compute(self, key):
        latent = self.read_tensors(self.latents, key)["latent"]
        return image_to_bytes(decode_latent(self.ctx.models.vae, latent, frame_vae_tile(self.ctx))), None
