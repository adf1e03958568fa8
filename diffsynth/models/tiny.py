"""Tiny, seeded model files with the real architectures and layouts (for the demo and the tests).

The pictures they make are meaningless; what is real is the plumbing: the same diffusers classes, the same folder
layouts and loading code as a user's Stable Diffusion 1.5 set, small enough to run on a 2-core CPU in seconds.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, MotionAdapter, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .clip_vocab import byte_alphabet
from .libraries import quiet_libraries

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


def write_tokenizer(folder):
    """A CLIP tokenizer with a character-level vocabulary (no merges): every byte and byte+"</w>"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
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


def _public(config):
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def _tiny_sidecar(path, sidecar):
    Path(str(path) + ".config.json").write_text(json.dumps(sidecar, indent=2, default=list))


def write_tiny_single_files(folder, models):
    """The tiny set (from write_tiny_models' folders) again, in the layouts users' files have: an A1111/LDM
    single-file SD1.5 checkpoint (.safetensors, and a .ckpt with EMA keys), an AnimateDiff mm_*.ckpt and ControlNet
    v1.1 .pth files. Each gets a `<file>.config.json` sidecar with the tiny architecture (real SD1.5 files need
    none: the shipped configs describe them). Returns {name: path}."""
    from safetensors.torch import save_file

    from . import ldm_layout
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = Path(models["stable_diffusion"])
    unet = UNet2DConditionModel.from_pretrained(sd / "unet")
    vae = AutoencoderKL.from_pretrained(sd / "vae")
    text = CLIPTextModel.from_pretrained(sd / "text_encoder")
    checkpoint = {}
    checkpoint.update(ldm_layout.unet_to_ldm(unet.state_dict(), unet.config))
    checkpoint.update(ldm_layout.vae_to_ldm(vae.state_dict(), vae.config))
    checkpoint.update(ldm_layout.clip_to_ldm(text.state_dict()))
    checkpoint = {key: value.contiguous() for key, value in checkpoint.items()}
    text_config = {key: value for key, value in text.config.to_dict().items()
                   if key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "max_position_embeddings", "projection_dim", "bos_token_id",
                              "eos_token_id", "pad_token_id", "hidden_act")}
    base_sidecar = {"unet": _public(unet.config), "vae": _public(vae.config), "text_encoder": text_config,
                    "tokenizer_folder": str((sd / "tokenizer").resolve())}
    out = {"sd_safetensors": folder / "tiny_sd15.safetensors", "sd_ckpt": folder / "tiny_sd15_ema.ckpt"}
    save_file(checkpoint, out["sd_safetensors"])
    # The .ckpt form: Lightning-style {"state_dict": ...} with EMA copies (flattened names, as in real files).
    ema = {"model_ema." + key.removeprefix("model.").replace(".", ""): value + 1.0
           for key, value in checkpoint.items() if key.startswith("model.diffusion_model.")}
    ema["model_ema.decay"] = torch.tensor(0.9999)
    torch.save({"state_dict": {**checkpoint, **ema}, "global_step": 1}, out["sd_ckpt"])
    for name in ("sd_safetensors", "sd_ckpt"):
        _tiny_sidecar(out[name], base_sidecar)

    adapter = MotionAdapter.from_pretrained(models["motion_adapter"])
    out["motion"] = folder / "mm_tiny_v2.ckpt"
    torch.save({key: value.contiguous() for key, value in ldm_layout.motion_to_original(adapter.state_dict()).items()},
               out["motion"])
    _tiny_sidecar(out["motion"], {"motion_adapter": {"motion_norm_num_groups": 8, "motion_num_attention_heads": 2}})

    for name in ("controlnet_tile", "controlnet_canny"):
        controlnet = ControlNetModel.from_pretrained(models[name])
        out[name] = folder / f"{name}.pth"
        torch.save({k: v.contiguous() for k, v in
                    ldm_layout.controlnet_to_ldm(controlnet.state_dict(), controlnet.config).items()}, out[name])
        _tiny_sidecar(out[name], {"controlnet": _public(controlnet.config)})
    return out
