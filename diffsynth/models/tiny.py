"""Tiny, seeded model files with the real architectures and layouts (for the demo and the tests).

The pictures they make are meaningless; what is real is the plumbing: the same diffusers classes, the same folder
layouts and loading code as a user's Stable Diffusion 1.5 set, small enough to run on a 2-core CPU in seconds.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, MotionAdapter, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_SEED = 20240131
TEXT_WIDTH = 32
BLOCK_CHANNELS = (32, 64)


def _seeded(seed_offset):
    torch.manual_seed(TINY_SEED + seed_offset)


def _perturb_zero_tensors(model, seed_offset):
    """Random init leaves ControlNet's zero convolutions (and a few biases) at zero, so the model would have no
    effect at all; give every all-zero parameter small seeded values so each part visibly changes the output."""
    generator = torch.Generator().manual_seed(TINY_SEED + seed_offset)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def make_unet():
    _seeded(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=BLOCK_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    _perturb_zero_tensors(unet, 1)
    return unet


def make_motion_adapter():
    _seeded(2)
    adapter = MotionAdapter(
        block_out_channels=BLOCK_CHANNELS,
        motion_layers_per_block=1,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    _perturb_zero_tensors(adapter, 2)
    return adapter


def make_controlnet(unet, seed_offset):
    _seeded(seed_offset)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    # from_unet copies the UNet's weights; re-randomise so each ControlNet is its own model.
    generator = torch.Generator().manual_seed(TINY_SEED + seed_offset)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return controlnet


def make_vae():
    _seeded(4)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def make_text_encoder(vocab_size):
    _seeded(5)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def _bytes_to_unicode():
    """CLIP's byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tokenizer(folder):
    """A CLIP tokenizer with a character-level vocabulary (no merges): every byte and byte+"</w>"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(folder)


def make_scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=True, steps_offset=0, timestep_spacing="linspace")


def write_tiny_models(folder):
    """Write the tiny model set as diffusers folders under `folder`; returns {name: path}."""
    from .loader import quiet_libraries
    quiet_libraries()
    folder = Path(folder)
    sd = folder / "stable_diffusion"
    tokenizer = write_tokenizer(sd / "tokenizer")
    make_text_encoder(len(tokenizer)).save_pretrained(sd / "text_encoder")
    unet = make_unet()
    unet.save_pretrained(sd / "unet")
    make_vae().save_pretrained(sd / "vae")
    make_scheduler().save_pretrained(sd / "scheduler")
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }, indent=2))
    make_motion_adapter().save_pretrained(folder / "motion_adapter")
    make_controlnet(unet, 10).save_pretrained(folder / "controlnet_tile")
    make_controlnet(unet, 11).save_pretrained(folder / "controlnet_canny")
    return {
        "stable_diffusion": sd,
        "motion_adapter": folder / "motion_adapter",
        "controlnet_tile": folder / "controlnet_tile",
        "controlnet_canny": folder / "controlnet_canny",
    }
