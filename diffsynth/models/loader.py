"""Find and load the model files a config names, lazily and one component at a time.

`models.model_list` may name its files in any order: what each one is (a Stable Diffusion base, an AnimateDiff
motion module, a ControlNet) is detected from its contents, never from its name. Here: diffusers folders.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..errors import UserError

BASE, MOTION, CONTROLNET = "stable diffusion base model", "AnimateDiff motion module", "ControlNet"
WHERE_TO_FIND = {
    BASE: "a Stable Diffusion 1.5 diffusers folder (with model_index.json)",
    MOTION: "an AnimateDiff motion-adapter folder (config.json with _class_name MotionAdapter)",
    CONTROLNET: "a ControlNet folder (config.json with _class_name ControlNetModel)",
}


def detect_kind(path):
    """What a model path holds: BASE, MOTION or CONTROLNET; UserError when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path} (check models.model_list / controlnet_units paths)")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return BASE
        config_file = path / "config.json"
        if config_file.is_file():
            class_name = json.loads(config_file.read_text()).get("_class_name")
            if class_name == "MotionAdapter":
                return MOTION
            if class_name == "ControlNetModel":
                return CONTROLNET
    raise UserError(f"cannot tell what model {path} is: expected {WHERE_TO_FIND[BASE]}, "
                    f"{WHERE_TO_FIND[MOTION]} or {WHERE_TO_FIND[CONTROLNET]}")


def file_identity(path):
    """A cheap fingerprint of a model file or folder: names, sizes and modification times (hashing gigabytes of
    weights at every start would cost minutes)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256(str(path).encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@dataclass
class ModelFiles:
    base: Path
    motion: Path | None = None
    controlnets: list = field(default_factory=list)


def classify_model_list(model_list, controlnet_paths):
    files = ModelFiles(base=None)
    for path in model_list:
        kind = detect_kind(path)
        if kind == BASE:
            if files.base is not None:
                raise UserError(f"models.model_list names two base models: {files.base} and {path}; keep one")
            files.base = Path(path)
        elif kind == MOTION:
            files.motion = Path(path)
        else:
            raise UserError(f"{path} is a ControlNet; list it under models.controlnet_units, not models.model_list")
    if files.base is None:
        raise UserError(f"models.model_list has no {BASE}: add {WHERE_TO_FIND[BASE]}")
    for path in controlnet_paths:
        kind = detect_kind(path)
        if kind != CONTROLNET:
            raise UserError(f"controlnet unit model {path} is a {kind}, not a ControlNet")
        files.controlnets.append(Path(path))
    return files


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype, device):
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


class ModelStore:
    """Loads each component on first use, so a resumed run whose diffusion is done never reads the UNet."""

    def __init__(self, models_config):
        self.files = classify_model_list(models_config.model_list,
                                         [unit.model_path for unit in models_config.controlnet_units])
        self.device = resolve_device(models_config.device)
        self.dtype = resolve_dtype(models_config.torch_dtype, self.device)
        quiet_libraries()

    def identity(self, *components):
        """Fingerprint parts for the named components ("text", "unet", "vae", "controlnet")."""
        parts = {}
        if "text" in components or "unet" in components or "vae" in components:
            parts["base"] = file_identity(self.files.base)
        if "unet" in components:
            parts["motion"] = file_identity(self.files.motion) if self.files.motion else None
            parts["controlnets"] = [file_identity(path) for path in self.files.controlnets]
        return parts

    @property
    def has_motion_module(self):
        return self.files.motion is not None

    @cached_property
    def motion_max_frames(self):
        """The motion module's positional-embedding length: the longest window it can take (32 for mm_sd_v15_v2)."""
        config = json.loads((self.files.motion / "config.json").read_text())
        return config.get("motion_max_seq_length", 32)

    @cached_property
    def tokenizer(self):
        from transformers import CLIPTokenizer
        return CLIPTokenizer.from_pretrained(self.files.base / "tokenizer", local_files_only=True)

    @cached_property
    def text_encoder(self):
        from transformers import CLIPTextModel
        model = CLIPTextModel.from_pretrained(self.files.base / "text_encoder", local_files_only=True)
        return model.to(self.device, self.dtype).eval()

    @cached_property
    def unet(self):
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
        unet = UNet2DConditionModel.from_pretrained(self.files.base / "unet", local_files_only=True)
        if self.files.motion is not None:
            adapter = MotionAdapter.from_pretrained(self.files.motion, local_files_only=True)
            unet = UNetMotionModel.from_unet2d(unet, adapter)
        return unet.to(self.device, self.dtype).eval()

    @cached_property
    def controlnets(self):
        from diffusers import ControlNetModel
        return [ControlNetModel.from_pretrained(path, local_files_only=True).to(self.device, self.dtype).eval()
                for path in self.files.controlnets]

    @cached_property
    def vae(self):
        """Always float32: float16 VAE decoders give black frames."""
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_pretrained(self.files.base / "vae", local_files_only=True).to(self.device).eval()


def quiet_libraries():
    """Offline by construction, and no per-file progress bars interleaved with ours."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
