"""Textual inversions and LoRAs.

Textual inversion: each file (.pt A1111 `string_to_param`, .safetensors `emb_params`, diffusers .bin
`{token: vector}`) defines keyword = file stem; its n rows become tokens `kw_0 … kw_{n-1}` appended to the vocabulary,
and the keyword in a prompt expands to them (at the token-id level, so tokenizer normalisation cannot break it).

LoRA (kohya / A1111 layout): `lora_unet_<module>` / `lora_te_<module>` with `.lora_down.weight`, `.lora_up.weight`
and an optional `.alpha`; <module> is the diffusers module path with dots as underscores (kohya), or the original
LDM path (older A1111 files). Merged into the weights: W += user_alpha × (alpha / rank) × up @ down.
"""

import math
import re
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import WEIGHT_SUFFIXES, read_shapes, read_state_dict

LORA_PREFIXES = ("lora_unet_", "lora_te_")


# --- textual inversion -------------------------------------------------------------------------------------------

def read_embedding(path):
    """The (n, width) embedding rows of a textual-inversion file."""
    data = read_state_dict(path)
    if "string_to_param" in data and isinstance(data["string_to_param"], dict):
        tensor = next(iter(data["string_to_param"].values()))
    elif "emb_params" in data:
        tensor = data["emb_params"]
    else:
        tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
        if len(tensors) != 1:
            raise UserError(f"{path} is not a textual-inversion embedding (expected one tensor, found {len(tensors)})")
        tensor = tensors[0]
    tensor = tensor.detach().float()
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2:
        raise UserError(f"{path} is not a textual-inversion embedding (a tensor of shape {tuple(tensor.shape)})")
    return tensor


def textual_inversion_files(folder):
    """{keyword: path} for the embedding files in a folder (keyword = file stem)."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"models.textual_inversion_folder {folder} is not a folder (put embeddings such as "
                        "verybadimagenegative_v1.3.pt in it; they come from model sites like Civitai)")
    return {path.stem: path for path in sorted(folder.iterdir())
            if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES}


def token_names(keyword, count):
    return [f"{keyword}_{i}" for i in range(count)]


def add_textual_inversions(tokenizer, embeddings):
    """Add each keyword's tokens; returns {keyword: [token ids]}."""
    ids = {}
    for keyword, rows in embeddings.items():
        names = token_names(keyword, rows.shape[0])
        before = len(tokenizer)
        tokenizer.add_tokens(names)
        ids[keyword] = tokenizer.convert_tokens_to_ids(names)
        if len(tokenizer) != before + len(names) or min(ids[keyword]) < before:
            raise UserError(f"textual inversion '{keyword}': its tokens clash with tokens already in the vocabulary "
                            "(CLIP's tokenizer ignores case: two files whose names differ only in case?); rename it")
    return ids


def extend_text_encoder(text_encoder, embeddings, ids, path_of):
    """Append the embedding rows to the text encoder's token embedding, at the tokenizer's ids."""
    if not embeddings:
        return text_encoder
    old = text_encoder.get_input_embeddings().weight
    width = old.shape[1]
    for keyword, rows in embeddings.items():
        if rows.shape[1] != width:
            raise UserError(f"textual inversion {path_of[keyword]} has width {rows.shape[1]}, the text encoder "
                            f"{width}: it was made for another model (SD 2.x / SDXL?)")
    size = max(max(v) for v in ids.values()) + 1
    weight = torch.zeros(max(size, old.shape[0]), width, dtype=old.dtype)
    weight[:old.shape[0]] = old.detach().to("cpu")
    for keyword, rows in embeddings.items():
        weight[ids[keyword]] = rows.to(old.dtype)
    embedding = torch.nn.Embedding(weight.shape[0], width)
    embedding.weight = torch.nn.Parameter(weight, requires_grad=False)
    text_encoder.set_input_embeddings(embedding)
    text_encoder.config.vocab_size = weight.shape[0]
    return text_encoder


def split_keywords(text, keywords):
    """Split a prompt into [str | keyword-marker] pieces: [("text", s) | ("keyword", kw)]."""
    if not keywords:
        return [("text", text)]
    pattern = re.compile(r"(?<![\w])(" + "|".join(re.escape(k) for k in sorted(keywords, key=len, reverse=True))
                         + r")(?![\w])")
    pieces, position = [], 0
    for match in pattern.finditer(text):
        pieces.append(("text", text[position:match.start()]))
        pieces.append(("keyword", match.group(1)))
        position = match.end()
    pieces.append(("text", text[position:]))
    return pieces


# --- LoRA --------------------------------------------------------------------------------------------------------

def read_lora(path):
    """{module key (without lora_ prefix kind): (kind, down, up, alpha)} of a kohya/A1111 LoRA file."""
    return _lora_layers(path, read_state_dict(path))


def read_lora_shapes(path):
    """read_lora's layers with each tensor's shape in its place (the file's header only: nothing loaded)."""
    return _lora_layers(path, {key: torch.Size(shape) if shape is not None else None
                               for key, shape in read_shapes(path).items()}, shapes_only=True)


def _lora_layers(path, data, shapes_only=False):
    layers = {}
    for key, value in data.items():
        if not key.startswith(LORA_PREFIXES):
            continue
        name, _, suffix = key.partition(".")
        entry = layers.setdefault(name, {})
        if suffix == "lora_down.weight":
            entry["down"] = value
        elif suffix == "lora_up.weight":
            entry["up"] = value
        elif suffix == "alpha" and not shapes_only:
            entry["alpha"] = float(value)
    if not layers:
        raise UserError(f"{path} is not a LoRA in the kohya/A1111 layout (no lora_unet_*/lora_te_* keys)")
    incomplete = [name for name, entry in layers.items() if "down" not in entry or "up" not in entry]
    if incomplete:
        raise UserError(f"{path}: LoRA layer {incomplete[0]} lacks its lora_down or lora_up weight (a LyCORIS/LoHa "
                        "file? only plain LoRA / LoCon is supported)")
    return layers


def lora_misfit(model, layers, kind, path, ldm_names=None):
    """One line naming the first `kind` ("unet" or "te") layer of a LoRA that matches no module of `model` or whose
    tensors do not fit its weight, or None. Shapes only: `model` may be on the meta device, `layers` shapes or
    tensors (read_lora_shapes, read_lora)."""
    prefix = "lora_unet_" if kind == "unet" else "lora_te_"
    index = _module_index(model, ldm_names)
    unmatched = [name for name in layers if name.startswith(prefix) and index.get(name[len(prefix):]) is None]
    if unmatched:
        return (f"LoRA {path} does not fit this SD1.5 model: layer {unmatched[0]} matches no module "
                f"({len(unmatched)} unmatched; an SDXL or SD 2.x LoRA?)")
    for name, entry in layers.items():
        if not name.startswith(prefix):
            continue
        weight = tuple(index[name[len(prefix):]].weight.shape)
        down, up = tuple(_shape(entry["down"])), tuple(_shape(entry["up"]))
        if len(down) < 2 or len(up) < 2 or up[0] != weight[0] or up[1] != down[0] or \
                math.prod(down[1:]) != math.prod(weight[1:]):
            return (f"LoRA {path} does not fit this model: layer {name} has lora_down {list(down)} and lora_up "
                    f"{list(up)}, the model's weight there is {list(weight)} (a LoRA made for another base model: "
                    "SDXL, SD 2.x?); remove it from models.model_list or use one made for SD1.5")
    return None


def _shape(value):
    return value.shape if isinstance(value, torch.Tensor) else value


def _module_index(model, ldm_names=None):
    index = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight") and isinstance(getattr(module, "weight"), torch.Tensor):
            index[name.replace(".", "_")] = module
            index["text_model_" + name.replace(".", "_")] = module  # transformers 5 dropped text_model.
    for ldm, name in (ldm_names or {}).items():
        module = dict(model.named_modules()).get(name)
        if module is not None:
            index.setdefault(ldm.replace(".", "_"), module)
    return index


def unet_ldm_module_names(unet):
    """LDM module path → diffusers module path for a UNet (for LoRAs named after the original layout)."""
    from .ldm_layout import unet_to_ldm
    weights = {name: None for name, _ in unet.named_parameters() if name.endswith(".weight")}
    try:
        mapped = unet_to_ldm(weights, unet.config, prefix="")
    except KeyError:
        return {}
    names = list(weights)
    return {ldm.removesuffix(".weight"): name.removesuffix(".weight") for ldm, name in zip(mapped, names)}


@torch.no_grad()
def merge_lora(model, layers, kind, scale, path, ldm_names=None, file_alpha=True):
    """Merge the `kind` ("unet" or "te") layers of a LoRA into `model`; returns how many layers were merged.
    `file_alpha` False: the file's alpha is ignored (W += scale × up·down), as the original Diffutoon."""
    if scale == 0:
        return 0
    misfit = lora_misfit(model, layers, kind, path, ldm_names)
    if misfit:
        raise UserError(misfit)
    prefix = "lora_unet_" if kind == "unet" else "lora_te_"
    index = _module_index(model, ldm_names)
    merged = 0
    for name, entry in layers.items():
        if not name.startswith(prefix):
            continue
        module = index[name[len(prefix):]]
        weight = module.weight
        down, up = entry["down"].float(), entry["up"].float()
        rank = down.shape[0]
        factor = scale * (entry.get("alpha", rank) / rank) if file_alpha else scale
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        module.weight = torch.nn.Parameter((weight.float() + factor * delta).to(weight.dtype), requires_grad=False)
        merged += 1
    return merged
