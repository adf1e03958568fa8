"""Stage 5, initial latents: per frame, noise drawn from (seed, source frame id) with a motion module, one noise from
the seed shared by every frame without one (as the original); with denoising_strength < 1 the
cropped frame is VAE-encoded (mean × 0.18215) and noised to the first timestep."""

import torch

from ..cache import tensors_to_bytes
from ..models.loader import set_vae_tiling
from ..schedule import LATENT_SCALE, add_noise, alphas_cumprod, frame_noise, shared_noise, timesteps
from .base import Stage, frame_index
from .vae_decode import frame_vae_tile, vae_tile_params


def image_to_vae_input(image, device):
    """uint8 (H, W, 3) → float32 (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)


@torch.no_grad()
def encode_image(vae, image, tile=None):
    """uint8 (H, W, 3) → the float32 (4, H/8, W/8) latent mean (unscaled), on the CPU; in `tile`-pixel tiles when
    given (ModelStore.vae_tile)."""
    set_vae_tiling(vae, tile)
    return vae.encode(image_to_vae_input(image, vae.device)).latent_dist.mean[0].float().cpu()


class InitialLatentsStage(Stage):
    name = "latents"
    version = "2"  # 2: one shared noise without a motion module

    def __init__(self, ctx, cropped, first_frame_id):
        super().__init__(ctx, [cropped])
        self.cropped = cropped
        self.first_frame_id = first_frame_id

    def params(self):
        inputs = self.ctx.config.pipeline.pipeline_inputs
        params = {"seed": self.ctx.config.pipeline.seed, "strength": inputs.denoising_strength,
                  "steps": inputs.num_inference_steps, "first_frame_id": self.first_frame_id,
                  "motion": self.ctx.models.has_motion_module}
        if inputs.denoising_strength < 1:
            params["models"] = self.ctx.models.identity("vae")
            params.update(vae_tile_params(self.ctx))
        return params

    def unit_keys(self):
        return self.cropped.unit_keys()

    @torch.no_grad()
    def compute(self, key):
        frames = self.ctx.config.data.input_frames
        index = frame_index(key)
        shape = (4, frames.height // 8, frames.width // 8)
        if self.ctx.models.has_motion_module:  # per frame: the motion module sees the frames together
            noise = frame_noise(self.ctx.config.pipeline.seed, self.first_frame_id + index, shape)
        else:  # one noise for all frames, as the original: a per-frame image model flickers less
            noise = shared_noise(self.ctx.config.pipeline.seed, shape)
        inputs = self.ctx.config.pipeline.pipeline_inputs
        if inputs.denoising_strength >= 1:
            return tensors_to_bytes({"latent": noise}), None
        image = self.read_image(self.cropped, key)
        x0 = encode_image(self.ctx.models.vae, image, frame_vae_tile(self.ctx)) * LATENT_SCALE
        alpha = alphas_cumprod(self.ctx.models.has_motion_module)[
            timesteps(inputs.denoising_strength, inputs.num_inference_steps)[0]].item()
        return tensors_to_bytes({"latent": add_noise(x0, noise, alpha)}), None
