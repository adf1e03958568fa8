"""diffusers → original ("LDM", A1111, AnimateDiff, ControlNet v1.1) key layouts: the inverse of diffusers' own
single-file conversion. Used to write the tiny model set in the layouts users' files have, so the tests load them
through exactly the code that loads real files; also handy to export a diffusers folder as one file."""

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CONTROLNET_PREFIX = "control_model."

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _rename(state_dict, prefix_map, exact, out_prefix, inner=None):
    """Rename by the first matching diffusers prefix; `inner(kind, rest)` renames what follows it."""
    out = {}
    for key, value in state_dict.items():
        if key in exact:
            out[out_prefix + exact[key]] = value
            continue
        for old, new, kind in prefix_map:
            if key.startswith(old):
                rest = key[len(old):]
                out[out_prefix + new + (inner(kind, rest) if inner else rest)] = value
                break
        else:
            raise KeyError(f"no LDM name for {key}")
    return out


def _resnet_rest(kind, rest):
    if kind == "resnet":
        for new, old in _RESNET:
            if rest.startswith(new + "."):
                return old + rest[len(new):]
    return rest


def _down_and_mid_map(config):
    lpb, levels = config["layers_per_block"], len(config["block_out_channels"])
    prefixes = []
    for i in range(levels):
        for j in range(lpb):
            block = (lpb + 1) * i + j + 1
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", "resnet"),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", "attention")]
        if i < levels - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.", ""))
    prefixes.append(("mid_block.attentions.0.", "middle_block.1.", "attention"))
    prefixes += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", "resnet") for j in range(2)]
    return prefixes


def unet_to_ldm(state_dict, config, prefix=UNET_PREFIX):
    lpb, levels = config["layers_per_block"], len(config["block_out_channels"])
    prefixes = _down_and_mid_map(config)
    for i in range(levels):
        for j in range(lpb + 1):
            block = (lpb + 1) * i + j
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", "resnet"),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", "attention")]
        if i < levels - 1:
            index = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(lpb + 1) * i + lpb}.{index}.", ""))
    return _rename(state_dict, prefixes, DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], prefix, _resnet_rest)


def controlnet_to_ldm(state_dict, config, prefix=CONTROLNET_PREFIX):
    prefixes = _down_and_mid_map(config)
    blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    prefixes += [(f"controlnet_cond_embedding.blocks.{k}.", f"input_hint_block.{2 * (k + 1)}.", "")
                 for k in range(blocks)]
    prefixes += [(f"controlnet_down_blocks.{k}.", f"zero_convs.{k}.0.", "") for k in range(64)]
    prefixes.append(("controlnet_mid_block.", "middle_block_out.0.", ""))
    exact = dict(DIFFUSERS_TO_LDM_MAPPING["controlnet"]["layers"])
    exact["controlnet_cond_embedding.conv_out.weight"] = f"input_hint_block.{2 * (blocks + 1)}.weight"
    exact["controlnet_cond_embedding.conv_out.bias"] = f"input_hint_block.{2 * (blocks + 1)}.bias"
    return _rename(state_dict, prefixes, exact, prefix, _resnet_rest)


_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out.")]


def vae_to_ldm(state_dict, config, prefix=VAE_PREFIX):
    levels = len(config["block_out_channels"])
    prefixes = []
    for i in range(levels):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", "resnet"),
                     (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", ""),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.", "resnet"),
                     (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{levels - 1 - i}.upsample.conv.", "")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", "resnet") for j in range(2)]
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", "attention"))

    def inner(kind, rest):
        if kind == "resnet":
            return rest.replace("conv_shortcut", "nin_shortcut")
        if kind == "attention":
            for new, old in _VAE_ATTENTION:
                if rest.startswith(new):
                    return old + rest[len(new):]
        return rest

    out = _rename(state_dict, prefixes, DIFFUSERS_TO_LDM_MAPPING["vae"], prefix, inner)
    for key, value in out.items():  # the LDM VAE's attention projections are 1×1 convolutions
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def clip_to_ldm(state_dict, prefix=CLIP_PREFIX):
    return {prefix + (key if key.startswith("text_model.") else "text_model." + key): value
            for key, value in state_dict.items()}


def motion_to_original(state_dict):
    """MotionAdapter keys → the AnimateDiff mm_sd_v15*.ckpt layout (with the positional encodings it stores)."""
    out = {}
    for key, value in state_dict.items():
        head, sep, tail = key.partition(".motion_modules.")
        index, _, rest = tail.partition(".")
        if rest.startswith("transformer_blocks.") and ".pos_embed.pe" in rest:
            block = rest.split(".pos_embed.")[0]
            for attention in (0, 1):
                out[f"{head}{sep}{index}.temporal_transformer.{block}.attention_blocks.{attention}.pos_encoder.pe"] = \
                    value
            continue
        rest = (rest.replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm.")
                .replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1."))
        out[f"{head}{sep}{index}.temporal_transformer.{rest}"] = value
    return out
