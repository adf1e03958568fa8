"""`diffsynth models check CONFIG`: every model file a config names, what it was detected as, and its problems —
found in seconds (headers and memory-mapped shapes only), before a long render finds them hours in."""

from pathlib import Path

from ..errors import UserError
from . import convert
from .annotators import ANNOTATOR_FILES, annotator_file
from .checkpoint import read_shapes
from .libraries import quiet_libraries
from .loader import BASE, CONTROLNET, LORA, MOTION, TEXTUAL_INVERSION, VAE, WHERE_TO_FIND, detect_kind


def _shapes(path, parts):
    factory, converted, what = parts
    convert.shape_check(factory, converted, path, what)


def _single_file_details(path, kind):
    """Shape-check a single file against the model it will build (meta tensors: no data read)."""
    shapes = read_shapes(path)
    tensors = convert.meta_tensors(shapes)
    if kind == BASE:
        parts = [convert.unet_parts, convert.text_encoder_parts]
        notes = ["single file"]
        if convert.has_vae(shapes):
            parts.append(convert.vae_parts)
            notes.append("VAE baked in")
        else:
            notes.append("no VAE: add a VAE file to model_list")
        if sum(key.startswith("model_ema.") for key in shapes) > 100:
            notes.append("EMA copies ignored")
        for function in parts:
            _shapes(path, function(path, tensors))
        return ", ".join(notes)
    if kind == CONTROLNET:
        _shapes(path, convert.controlnet_parts(path, tensors))
        return "single file"
    if kind == MOTION:
        config = convert.motion_config_from_keys(shapes)
        _shapes(path, convert.motion_parts(path, tensors))
        version = "v1" if not config.get("use_motion_mid_block") else "v2"
        return (f"single file, {config.get('motion_max_seq_length', '?')} frames, "
                f"{'with' if config.get('use_motion_mid_block') else 'no'} mid block (like {version}/v3)")
    if kind == VAE:
        _shapes(path, convert.vae_parts(path, tensors))
        return "replaces the base model's VAE"
    if kind == LORA:
        layers = {key.partition(".")[0] for key in shapes}
        return f"{len(layers)} layers"
    return ""


def meta_base_models(base):
    """The base model's UNet and CLIP text encoder built on the meta device (their architecture, no weights read):
    what a LoRA is checked against before anything is loaded."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    base = Path(base)
    if base.is_dir():
        unet_config = UNet2DConditionModel.load_config(base / "unet")
        text_config = CLIPTextConfig.from_pretrained(base / "text_encoder")
    else:
        unet_config = convert.component_config(base, "unet", "sd15_unet")
        text_config = CLIPTextConfig(**convert.component_config(base, "text_encoder", "sd15_text_encoder"))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config), CLIPTextModel(text_config)


def lora_misfits(base, loras, convention="kohya"):
    """[(LoRA path, one line)] for each LoRA whose tensors do not fit the base model (headers and the meta
    architecture only: seconds, before a render's first stage runs); `models check` lists them and the render
    refuses to start on the first."""
    from .extras import lora_misfit, read_lora_shapes, unet_ldm_module_names
    if not loras:
        return []
    unet, text_encoder = meta_base_models(base)
    ldm_names = unet_ldm_module_names(unet)
    problems = []
    for path in loras:
        try:
            layers = read_lora_shapes(path)
            misfit = lora_misfit(unet, layers, "unet", path, ldm_names)
            if misfit is None and convention == "kohya":  # the diffutoon convention leaves the text encoder alone
                misfit = lora_misfit(text_encoder, layers, "te", path)
        except UserError as error:
            misfit = str(error)
        if misfit:
            problems.append((path, misfit))
    return problems


def check_models(models_config):
    """[(status, path, text)] for every model file, and the number of problems."""
    quiet_libraries()
    rows, kinds = [], {}

    def entry(path, expected=None, role=""):
        try:
            kind = detect_kind(path, (expected,), role) if expected else detect_kind(path)
            if expected is not None and kind != expected:
                raise UserError(f"is a {kind}, but {role} needs {WHERE_TO_FIND[expected]}")
            details = _single_file_details(path, kind) if Path(path).is_file() else "diffusers folder"
            rows.append(("ok", str(path), f"{kind}" + (f" ({details})" if details else "")))
            return kind
        except UserError as error:
            message = str(error)
            rows.append(("PROBLEM", str(path), message.replace(f": {path}", "").replace(f"{path} ", "") or message))
            return None

    for path in models_config.model_list:
        kind = entry(path)
        if kind == CONTROLNET:
            rows[-1] = ("PROBLEM", str(path), f"{CONTROLNET} listed in models.model_list: move it to "
                                              "models.controlnet_units, and list " + WHERE_TO_FIND[BASE])
        kinds.setdefault(kind, []).append(path)
    if not kinds.get(BASE):
        rows.append(("PROBLEM", "models.model_list", f"no {BASE}: add {WHERE_TO_FIND[BASE]}"))
    if len(kinds.get(BASE, [])) > 1:
        rows.append(("PROBLEM", "models.model_list", "two base models; keep one"))
    loras = kinds.get(LORA, [])
    if len(kinds.get(BASE, [])) == 1:
        for path, misfit in lora_misfits(kinds[BASE][0], loras, getattr(models_config, "lora_convention", "kohya")):
            row = next(i for i, row in enumerate(rows) if row[1] == str(path))
            rows[row] = ("PROBLEM", str(path), misfit.replace(f"LoRA {path} ", "LoRA ").replace(f"{path}: ", ""))
    if len(loras) != len(models_config.lora_alphas):
        rows.append(("PROBLEM", "models.lora_alphas", f"{len(models_config.lora_alphas)} value(s) for {len(loras)} "
                                                      "LoRA file(s); give one alpha per LoRA, in order"))
    for index, unit in enumerate(models_config.controlnet_units):
        entry(unit.model_path, CONTROLNET, f"models.controlnet_units.{index}.model_path")
        if unit.processor_id in ANNOTATOR_FILES:
            try:
                path = annotator_file(unit.processor_id, getattr(models_config, "annotators_folder", None))
                rows.append(("ok", str(path), f"annotator {unit.processor_id}"))
            except UserError as error:
                rows.append(("PROBLEM", f"annotator {unit.processor_id}", str(error)))
    if models_config.textual_inversion_folder:
        from .extras import read_embedding, textual_inversion_files
        try:
            for keyword, path in textual_inversion_files(models_config.textual_inversion_folder).items():
                try:
                    rows.append(("ok", str(path), f"{TEXTUAL_INVERSION} '{keyword}', "
                                                  f"{read_embedding(path).shape[0]} token(s)"))
                except UserError as error:
                    rows.append(("PROBLEM", str(path), str(error)))
        except UserError as error:
            rows.append(("PROBLEM", "models.textual_inversion_folder", str(error)))
    if kinds.get(MOTION) and len(kinds[MOTION]) > 1:
        rows.append(("PROBLEM", "models.model_list", "two motion modules; keep one"))
    return rows, sum(status == "PROBLEM" for status, _, _ in rows)
