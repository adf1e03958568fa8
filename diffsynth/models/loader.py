"""Find and load the model files a config names, lazily and one component at a time.

`models.model_list` may name its files in any order: what each one is (a Stable Diffusion base, an AnimateDiff
motion module, a ControlNet, a LoRA, a textual inversion, a VAE) is detected from its contents — tensor names and
shapes — never from its name. Single files are converted by diffsynth.models.convert; diffusers folders are read
with from_pretrained(local_files_only=True). Nothing is ever downloaded.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import is_weight_file, read_shapes, read_state_dict
from .libraries import quiet_libraries

BASE, MOTION, CONTROLNET = "stable diffusion base model", "AnimateDiff motion module", "ControlNet"
TEXTUAL_INVERSION, LORA, VAE = "textual inversion", "LoRA", "VAE"
WHERE_TO_FIND = {
    BASE: "an SD1.5 checkpoint (.safetensors/.ckpt in the original layout, e.g. aingdiffusion_v12.safetensors from "
          "a model site such as Civitai) or a diffusers folder (with model_index.json)",
    MOTION: "an AnimateDiff motion module (mm_sd_v15_v2.ckpt / v3_sd15_mm.ckpt from guoyww/animatediff) or a "
            "MotionAdapter folder",
    CONTROLNET: "a ControlNet v1.1 file (control_v11p_sd15_lineart.pth, control_v11f1e_sd15_tile.pth from "
                "lllyasviel/ControlNet-v1-1) or a ControlNetModel folder",
    TEXTUAL_INVERSION: "a textual-inversion embedding (.pt/.bin/.safetensors) in models.textual_inversion_folder",
    LORA: "a LoRA in the kohya/A1111 layout (.safetensors with lora_unet_*/lora_te_* keys)",
    VAE: "a standalone SD1.5 VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors)",
}


def kind_from_keys(path, shapes):
    """What a single weight file is, from its tensor names and shapes (never from its file name)."""
    keys = list(shapes)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            raise UserError(f"{path} is an SDXL checkpoint; this renderer needs {WHERE_TO_FIND[BASE]}")
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            raise UserError(f"{path} is an SD 2.x checkpoint; this renderer needs {WHERE_TO_FIND[BASE]}")
        return BASE
    if (any(k.startswith("control_model.") for k in keys) or "input_hint_block.0.weight" in shapes
            or "controlnet_cond_embedding.conv_in.weight" in shapes):
        return CONTROLNET
    if any(".motion_modules." in k for k in keys):
        return MOTION
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return LORA
    tensors = [shape for shape in shapes.values() if shape is not None]
    if "string_to_param" in shapes or "emb_params" in shapes or (len(shapes) == 1 and len(tensors) == 1
                                                                  and len(tensors[0]) in (1, 2)):
        return TEXTUAL_INVERSION
    if any(k.startswith("encoder.down.") for k in keys) and any(k.startswith("decoder.up.") for k in keys):
        return VAE
    if any(k.startswith("down_blocks.") for k in keys):
        raise UserError(f"{path} looks like one diffusers component file on its own; give its whole diffusers "
                        "folder instead")
    return None


MODEL_LIST_KINDS = (BASE, MOTION, LORA)


def detect_kind(path, expected=MODEL_LIST_KINDS, key="models.model_list"):
    """What a model path holds: BASE, MOTION, CONTROLNET, TEXTUAL_INVERSION, LORA or VAE; UserError (one line
    naming the file, what was expected there (`expected` kinds, at config key `key`) and where such files come
    from) when it is none of them."""
    path = Path(path)
    if not path.exists():
        wanted = " or ".join(WHERE_TO_FIND[kind] for kind in expected)
        raise UserError(f"model file not found: {path} (expected {wanted}; check {key})")
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
    elif is_weight_file(path):
        kind = kind_from_keys(path, read_shapes(path))
        if kind is not None:
            return kind
    wanted = " or ".join(WHERE_TO_FIND[kind] for kind in expected)
    raise UserError(f"cannot tell what model {path} is: expected {wanted} (check {key})")


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
    loras: list = field(default_factory=list)  # [(path, alpha)]
    vae: Path | None = None
    textual_inversions: dict = field(default_factory=dict)  # {keyword: path}


def classify_model_list(model_list, controlnet_paths, lora_alphas=(), textual_inversion_folder=None):
    files = ModelFiles(base=None)
    loras = []
    for path in model_list:
        kind = detect_kind(path)
        path = Path(path)
        if kind == BASE:
            if files.base is not None:
                raise UserError(f"models.model_list names two base models: {files.base} and {path}; keep one")
            files.base = path
        elif kind == MOTION:
            if files.motion is not None:
                raise UserError(f"models.model_list names two motion modules: {files.motion} and {path}; keep one")
            files.motion = path
        elif kind == LORA:
            loras.append(path)
        elif kind == VAE:
            files.vae = path
        elif kind == TEXTUAL_INVERSION:
            files.textual_inversions[path.stem] = path
        else:
            raise UserError(f"{path} is a ControlNet; list it under models.controlnet_units, not models.model_list")
    if files.base is None:
        raise UserError(f"models.model_list has no {BASE}: add {WHERE_TO_FIND[BASE]}")
    if len(lora_alphas) != len(loras):
        raise UserError(f"models.lora_alphas has {len(lora_alphas)} value(s) for {len(loras)} LoRA file(s) in "
                        "models.model_list; give one alpha per LoRA, in order")
    files.loras = list(zip(loras, lora_alphas))
    from .extras import textual_inversion_files
    for keyword, path in textual_inversion_files(textual_inversion_folder).items():
        files.textual_inversions.setdefault(keyword, path)
    for index, path in enumerate(controlnet_paths):
        kind = detect_kind(path, (CONTROLNET,), f"models.controlnet_units.{index}.model_path")
        if kind != CONTROLNET:
            raise UserError(f"controlnet unit model {path} is a {kind}, not a ControlNet: expected "
                            f"{WHERE_TO_FIND[CONTROLNET]}")
        files.controlnets.append(Path(path))
    return files


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_kind(device):
    """What a device is, for fingerprints: results differ in low bits between the CPU and a GPU, and between GPU
    models, so a run resumed on another kind of device recomputes rather than mixing results."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":  # the instruction set and the thread count change how sums are split, so low bits
        return f"cpu {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    return device.type


def use_deterministic_cuda_kernels():
    """A unit recomputed after a crash must give the same bits as the first time: no autotuned or atomics-based
    cuDNN/cuBLAS kernels. (Not yet exercised on a real GPU.)"""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first initialises
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_dtype(dtype, device):
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


class Offloader:
    """vram_limit_level: 0 keeps every model on the device; 1 keeps only the running group (text encoder / UNet with
    its ControlNets / VAE) there; 2 only the running model. Idle models wait on the CPU; a forward pre-hook moves a
    model onto the device just before it runs and sends the others back."""

    GROUPS = {"text_encoder": "text", "unet": "denoise", "vae": "vae"}

    def __init__(self, device, level=0):
        self.device, self.level = device, level
        self.models = {}  # name → (group, model)
        self.resident = set()

    def register(self, name, model, hook_modules=None, dtype=None):
        """Place `model` where it waits (the device at level 0, else the CPU), cast to `dtype` in the same pass:
        each tensor is copied once, straight from the file's dtype on the CPU to the device's."""
        group = self.GROUPS.get(name, "denoise")
        self.models[name] = (group, model)
        if self.level == 0:
            self.resident.add(name)
            return model.to(device=self.device, dtype=dtype)
        model.to(device="cpu", dtype=dtype)
        for module in hook_modules or [model]:
            module.register_forward_pre_hook(lambda _module, args, kwargs: self._before(name, args, kwargs),
                                             with_kwargs=True)
        return model

    def _before(self, name, args, kwargs):
        """Activate the model and bring its tensor inputs along (a stage may have built them on the CPU)."""
        self.activate(name)

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(self.device)
            if isinstance(value, (list, tuple)):
                return type(value)(move(v) for v in value)
            return value
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def activate(self, name):
        group, model = self.models[name]
        for other, (other_group, other_model) in self.models.items():
            keep = other == name or (self.level == 1 and other_group == group)
            if other in self.resident and not keep:
                other_model.to("cpu")
                self.resident.discard(other)
        if name not in self.resident:
            model.to(self.device)
            self.resident.add(name)
        if self.device.startswith("cuda") and self.level:
            torch.cuda.empty_cache()


class ModelStore:
    """Loads each component on first use, so a resumed run whose diffusion is done never reads the UNet.

    Base models come as SD1.5 single files (original layout) or diffusers folders; motion modules and ControlNets as
    single files or folders; LoRAs are merged into the UNet and text encoder; textual inversions extend the
    tokenizer and the text encoder's embedding table."""

    def __init__(self, models_config):
        quiet_libraries()
        self.config = models_config
        self.files = classify_model_list(models_config.model_list,
                                         [unit.model_path for unit in models_config.controlnet_units],
                                         models_config.lora_alphas, models_config.textual_inversion_folder)
        self.device = resolve_device(models_config.device)
        self.dtype = resolve_dtype(models_config.torch_dtype, self.device)
        if self.device.startswith("cuda"):
            use_deterministic_cuda_kernels()
        self.offloader = Offloader(self.device, getattr(models_config, "vram_limit_level", 0))

    def __getstate__(self):
        """What a Ray worker receives: the config and the device the fingerprints were made for. It loads the
        models itself, on first use (never shipped: they are large, and may sit on a GPU)."""
        return {"config": self.config, "device": self.device}

    def __setstate__(self, state):
        self.__init__(state["config"])
        self.device = state["device"]
        self.dtype = resolve_dtype(state["config"].torch_dtype, self.device)
        self.offloader = Offloader(self.device, getattr(state["config"], "vram_limit_level", 0))

    def identity(self, *components):
        """Fingerprint parts for the named components ("text", "unet", "vae", "controlnet")."""
        parts = {}
        if "text" in components or "unet" in components or "vae" in components:
            parts["base"] = file_identity(self.files.base)
        if "text" in components or "unet" in components:
            parts["loras"] = [[file_identity(path), alpha] for path, alpha in self.files.loras]
            if self.files.loras and getattr(self.config, "lora_convention", "kohya") != "kohya":
                parts["lora_convention"] = getattr(self.config, "lora_convention", "kohya")
        if "text" in components:
            parts["textual_inversions"] = {k: file_identity(p) for k, p in sorted(self.files.textual_inversions.items())}
            if self.tokenizer_folder is not None:
                parts["tokenizer"] = file_identity(self.tokenizer_folder)
        if "unet" in components:
            parts["motion"] = file_identity(self.files.motion) if self.files.motion else None
            if self.files.motion:
                parts["motion_norm"] = getattr(self.config, "motion_norm", "frame")
            parts["controlnets"] = [file_identity(path) for path in self.files.controlnets]
        if "vae" in components and self.files.vae is not None:
            parts["vae"] = file_identity(self.files.vae)
        parts["device"] = device_kind(self.device)
        return parts

    def vae_tile(self, height, width):
        """The VAE tile size (pixels) for a height × width frame, or None: see `vae_tile`."""
        return vae_tile(getattr(self.config, "vae_tile_size", DEFAULT_VAE_TILE_SIZE), height, width)

    @property
    def base_is_file(self):
        return self.files.base.is_file()

    @property
    def has_motion_module(self):
        return self.files.motion is not None

    @cached_property
    def motion_max_frames(self):
        """The motion module's positional-embedding length: the longest window it can take (32 for mm_sd_v15_v2)."""
        if self.files.motion.is_file():
            from .convert import motion_config_from_keys, sidecar
            config = motion_config_from_keys(read_shapes(self.files.motion))
            config.update(sidecar(self.files.motion).get("motion_adapter", {}))
        else:
            config = json.loads((self.files.motion / "config.json").read_text())
        return config.get("motion_max_seq_length", 32)

    def _base_component(self, parts_function, prefixes):
        from .convert import build
        checkpoint = read_state_dict(self.files.base, prefixes)
        factory, converted, what = parts_function(self.files.base, checkpoint)
        return build(factory, converted, self.files.base, what)

    @cached_property
    def tokenizer_folder(self):
        """models.tokenizer_folder, else a sidecar's, else None (the CLIP tokenizer shipped in the package)."""
        if not self.base_is_file:
            return self.files.base / "tokenizer"
        folder = getattr(self.config, "tokenizer_folder", None)
        if folder is None:
            from .convert import sidecar
            folder = sidecar(self.files.base).get("tokenizer_folder")
            if folder is not None:
                folder = self.files.base.parent / folder
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"tokenizer folder {folder} not found (models.tokenizer_folder: a folder with the CLIP "
                            "tokenizer's vocab.json and merges.txt, or leave it unset for SD1.5's own)")
        return None if folder is None else Path(folder)

    @cached_property
    def _embeddings(self):
        from .extras import read_embedding
        return {keyword: read_embedding(path) for keyword, path in self.files.textual_inversions.items()}

    @cached_property
    def tokenizer(self):
        from transformers import CLIPTokenizer

        from .convert import clip_tokenizer
        from .extras import add_textual_inversions
        if self.tokenizer_folder is not None:
            tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_folder, local_files_only=True)
        else:
            tokenizer = clip_tokenizer()
        self.textual_inversion_ids = add_textual_inversions(tokenizer, self._embeddings)
        return tokenizer

    def expand_prompt(self, text):
        """[str | [token ids]] pieces: textual-inversion keywords replaced by their tokens' ids."""
        from .extras import split_keywords
        self.tokenizer  # noqa: B018 - assigns textual_inversion_ids
        return [self.textual_inversion_ids[value] if kind == "keyword" else value
                for kind, value in split_keywords(text, self.textual_inversion_ids)]

    def _load_text_encoder(self):
        if self.base_is_file:
            from .convert import text_encoder_parts
            return self._base_component(text_encoder_parts, ["cond_stage_model.", "conditioner."])
        from transformers import CLIPTextModel
        return CLIPTextModel.from_pretrained(self.files.base / "text_encoder", local_files_only=True)

    @cached_property
    def text_encoder(self):
        from .extras import extend_text_encoder, merge_lora, read_lora
        model = self._load_text_encoder()
        tokenizer = self.tokenizer
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0] and not self._embeddings:
            raise UserError(f"the tokenizer ({len(tokenizer)} tokens) does not fit the text encoder of "
                            f"{self.files.base}; check models.tokenizer_folder")
        extend_text_encoder(model, self._embeddings, self.textual_inversion_ids, self.files.textual_inversions)
        if getattr(self.config, "lora_convention", "kohya") == "kohya":  # the original leaves the text encoder alone
            for path, alpha in self.files.loras:
                merge_lora(model, read_lora(path), "te", alpha, path)
        return self.offloader.register("text_encoder", model.eval(), dtype=self.dtype)

    def _load_unet2d(self):
        if self.base_is_file:
            from .convert import unet_parts
            return self._base_component(unet_parts, ["model.diffusion_model."])
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel.from_pretrained(self.files.base / "unet", local_files_only=True)

    def _load_motion_adapter(self):
        from diffusers import MotionAdapter
        if self.files.motion.is_dir():
            return MotionAdapter.from_pretrained(self.files.motion, local_files_only=True)
        from .convert import build, motion_parts
        factory, converted, what = motion_parts(self.files.motion, read_state_dict(self.files.motion))
        return build(factory, converted, self.files.motion, what)

    @cached_property
    def unet(self):
        from .extras import merge_lora, read_lora, unet_ldm_module_names
        unet = self._load_unet2d()
        ldm_names = unet_ldm_module_names(unet) if self.files.loras else None
        for path, alpha in self.files.loras:
            merge_lora(unet, read_lora(path), "unet", alpha, path, ldm_names,
                       file_alpha=getattr(self.config, "lora_convention", "kohya") == "kohya")
        if self.files.motion is not None:
            from .motion import motion_unet
            unet = motion_unet(unet, self._load_motion_adapter(), getattr(self.config, "motion_norm", "frame"),
                               path=self.files.motion)
        use_sdpa(unet)
        return self.offloader.register("unet", unet.eval(), dtype=self.dtype)

    def _load_controlnet(self, path):
        if path.is_dir():
            from diffusers import ControlNetModel
            return ControlNetModel.from_pretrained(path, local_files_only=True)
        from .convert import build, controlnet_parts
        factory, converted, what = controlnet_parts(path, read_state_dict(path))
        return build(factory, converted, path, what)

    @cached_property
    def controlnets(self):
        models = []
        for index, path in enumerate(self.files.controlnets):
            model = self._load_controlnet(path)
            use_sdpa(model)
            models.append(self.offloader.register(f"controlnet{index}", model.eval(), dtype=self.dtype))
        return models

    @cached_property
    def vae(self):
        """Always float32: float16 VAE decoders give black frames."""
        from .convert import build, has_vae, vae_parts
        if self.files.vae is not None:
            factory, converted, what = vae_parts(self.files.vae, read_state_dict(self.files.vae))
            vae = build(factory, converted, self.files.vae, what)
        elif self.base_is_file:
            if not has_vae(read_shapes(self.files.base)):
                raise UserError(f"{self.files.base} has no VAE baked in: add {WHERE_TO_FIND[VAE]} to "
                                "models.model_list")
            vae = self._base_component(vae_parts, ["first_stage_model.", "vae."])
        else:
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(self.files.base / "vae", local_files_only=True)
        return self.offloader.register("vae", vae.eval(), hook_modules=[vae.encoder, vae.decoder],
                                       dtype=torch.float32)


DEFAULT_VAE_TILE_SIZE = 512  # SD1.5's VAE sample size: the tile diffusers uses for it


def vae_tile(tile_size, height, width):
    """The one place that decides VAE tiling: a frame wider or taller than `tile_size` pixels (models.vae_tile_size;
    0 = never) is encoded and decoded in tiles of that size, returned; None = the whole frame at once, as before
    tiling existed (same bytes, same fingerprints). The stages put the returned size in their params() only when it
    is not None, and pass it to `set_vae_tiling` before each VAE call."""
    return tile_size if tile_size and (height > tile_size or width > tile_size) else None


def set_vae_tiling(vae, tile):
    """Switch diffusers' AutoencoderKL tiling on with `tile`-pixel tiles and its default quarter overlap, or off
    (tile None). Every attribute is set explicitly, in pixels and latent pixels, so a model whose config.sample_size
    is not 512 (the tiny test models) tiles exactly as SD1.5's VAE does; with the tile at least the frame's size
    diffusers' own check (frame > tile) never tiles either."""
    if tile is None:
        vae.use_tiling = False
        return
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD1.5
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // factor
    vae.tile_overlap_factor = 0.25
    vae.use_tiling = True


def use_sdpa(model):
    """PyTorch's scaled-dot-product attention (flash / memory-efficient kernels on a GPU)."""
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
        model.set_attn_processor(AttnProcessor2_0())
    except (ImportError, ValueError, AttributeError):
        pass
