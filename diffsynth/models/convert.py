"""Single-file checkpoints → diffusers models, with diffusers' own key conversion and configs shipped in the package.

Each model is built on the `meta` device (no random init, no memory) and its converted tensors are assigned in place,
so a memory-mapped checkpoint is not copied twice. Shapes are checked first: an SD 2.x or SDXL file fails with one
line naming the file and the first tensor that does not fit, not with a page of PyTorch errors.

Configs: the shipped JSON files under configs/ hold the real SD1.5 / ControlNet v1.1 / AnimateDiff hyperparameters.
What varies between real files is read from the tensors (AnimateDiff v1/v2/v3: frames, mid block, layers). A model
with a non-standard architecture (the tiny test models) carries a sidecar `<file>.config.json` whose keys
("unet", "vae", "text_encoder", "controlnet", "motion_adapter", "tokenizer_folder") override the shipped values.
"""

import gzip
import json
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from .clip_vocab import byte_alphabet

CONFIG_DIR = Path(__file__).parent / "configs"
CLIP_BPE = CONFIG_DIR / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"


def shipped_config(name):
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def sidecar(path):
    """The `<file>.config.json` beside a model file, or {}."""
    side = Path(str(path) + ".config.json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{side} is not valid JSON: {error}") from None


def component_config(path, component, shipped_name):
    config = shipped_config(shipped_name)
    config.update(sidecar(path).get(component, {}))
    return config


def meta_tensors(shapes):
    """Stand-ins for a file's tensors (from read_shapes) so conversion and shape checks run without reading data."""
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items() if shape is not None}


def check_state_dict(model_state, converted, path, what, ignore=()):
    """One UserError line for the first missing, surplus or wrong-shaped tensor."""
    missing = [key for key in model_state if key not in converted]
    if missing:
        raise UserError(f"{path} is not a usable {what}: it has no tensor for '{missing[0]}' "
                        f"({len(missing)} of {len(model_state)} missing)")
    for key, tensor in model_state.items():
        if tuple(converted[key].shape) != tuple(tensor.shape):
            raise UserError(f"{path} does not fit an SD1.5 {what}: '{key}' has shape {tuple(converted[key].shape)}, "
                            f"expected {tuple(tensor.shape)} (an SD 2.x / SDXL file, or a different architecture?)")
    surplus = [key for key in converted if key not in model_state and not key.endswith(tuple(ignore))]
    if surplus:
        raise UserError(f"{path} is not a plain {what}: unexpected tensor '{surplus[0]}' ({len(surplus)} in all)")


def build(factory, converted, path, what, ignore=()):
    """Build on the meta device, check, then assign the converted tensors (no copy, no random init)."""
    with torch.device("meta"):
        model = factory()
    check_state_dict(model.state_dict(), converted, path, what, ignore)
    state = {key: converted[key] for key in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers are not in any file: rebuild them
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            attribute = name.rpartition(".")[2]
            if attribute != "position_ids":
                raise RuntimeError(f"cannot materialise buffer {name} of {what}")
            owner.register_buffer(attribute, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return model.eval()


def shape_check(factory, converted, path, what, ignore=()):
    with torch.device("meta"):
        model = factory()
    check_state_dict(model.state_dict(), converted, path, what, ignore)


# --- Stable Diffusion 1.5 single files (original LDM layout) -----------------------------------------------------

def unet_parts(path, checkpoint):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    config = component_config(path, "unet", "sd15_unet")
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    return (lambda: UNet2DConditionModel.from_config(config)), converted, "Stable Diffusion 1.5 UNet"


def has_vae(keys):
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS
    return any(key.startswith(tuple(LDM_VAE_KEYS)) for key in keys)


def vae_parts(path, checkpoint):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    config = component_config(path, "vae", "sd15_vae")
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    return (lambda: AutoencoderKL.from_config(config)), converted, "Stable Diffusion 1.5 VAE"


def text_encoder_parts(path, checkpoint):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(**component_config(path, "text_encoder", "sd15_text_encoder"))
    converted = convert_ldm_clip_checkpoint(checkpoint)
    if "text_model.embeddings.token_embedding.weight" not in converted and converted:
        converted = {"text_model." + key: value for key, value in converted.items()}  # very old transformers layout
    with torch.device("meta"):
        model_keys = set(CLIPTextModel(config).state_dict())
    if not any(key.startswith("text_model.") for key in model_keys):  # transformers 5 dropped the prefix
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    converted = {key: value for key, value in converted.items() if not key.endswith("position_ids")}
    return (lambda: CLIPTextModel(config)), converted, "Stable Diffusion 1.5 CLIP text encoder"


def controlnet_parts(path, checkpoint):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    config = component_config(path, "controlnet", "sd15_controlnet")
    converted = convert_controlnet_checkpoint(checkpoint, config)
    converted = {key: value for key, value in converted.items() if value is not None}
    return (lambda: ControlNetModel.from_config(config)), converted, "SD1.5 ControlNet"


def motion_config_from_keys(shapes):
    """What differs between AnimateDiff v1 / v2 / v3 files, read from the tensors themselves."""
    config = {}
    channels, frames = [], None
    for i in range(8):
        key = f"down_blocks.{i}.motion_modules.0.temporal_transformer.proj_in.weight"
        if key not in shapes:
            break
        channels.append(shapes[key][0])
    if channels:
        config["block_out_channels"] = channels
    layers = {int(key.split(".")[3]) for key in shapes if key.startswith("down_blocks.0.motion_modules.")}
    if layers:
        config["motion_layers_per_block"] = max(layers) + 1
    config["use_motion_mid_block"] = any(key.startswith("mid_block.motion_modules.") for key in shapes)
    for key, shape in shapes.items():
        if key.endswith("pos_encoder.pe") and shape is not None:
            frames = shape[1]
            break
    if frames:
        config["motion_max_seq_length"] = frames
    return config


def motion_parts(path, checkpoint):
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    config = shipped_config("animatediff_motion_adapter")
    config.update(motion_config_from_keys({key: tuple(value.shape) for key, value in checkpoint.items()}))
    config.update(sidecar(path).get("motion_adapter", {}))
    converted = convert_animatediff_checkpoint_to_diffusers(checkpoint)
    for key, value in checkpoint.items():  # diffusers drops the stored sinusoidal encodings; keep them (exact)
        if key.endswith(".attention_blocks.0.pos_encoder.pe"):
            block = key.replace(".temporal_transformer", "").replace(".attention_blocks.0.pos_encoder.pe", "")
            converted[f"{block}.pos_embed.pe"] = value
    return (lambda: MotionAdapter.from_config(config)), converted, "AnimateDiff motion module"


# --- CLIP tokenizer from the shipped BPE data ----------------------------------------------------------------------

def clip_tokenizer():
    """SD1.5's CLIP tokenizer (openai/clip-vit-large-patch14) rebuilt from the BPE merges shipped in the package."""
    from transformers import CLIPTokenizer

    lines = gzip.open(CLIP_BPE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="diffsynth-clip-") as folder:
        folder = Path(folder)
        (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        (folder / "tokenizer_config.json").write_text((CLIP_BPE.parent / "tokenizer_config.json").read_text())
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
