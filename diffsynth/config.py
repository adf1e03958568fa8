"""The render config schema: the single source of truth for YAML files, `--set` overrides, the web UI form and
the docs. Key names follow the original Diffutoon configs. Unknown keys and bad values are errors naming the key."""

import difflib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

PROCESSOR_IDS = ("tile", "canny", "lineart", "lineart_coarse", "lineart_anime", "softedge", "depth", "openpose")
MOTION_MODULE_MAX_FRAMES = 32
SHOT_THRESHOLD = 27.0  # PySceneDetect's ContentDetector default


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def path_field(default=..., *, kind, description):
    """A field that names a file or folder. `kind` (models, videos, output) is the web UI's allowed folder for it;
    `resolve_paths` and the web UI's confinement find every such field by walking the schema."""
    return Field(default, description=description, json_schema_extra={"path_kind": kind})


def path_kind(field_info):
    extra = field_info.json_schema_extra
    return extra.get("path_kind") if isinstance(extra, dict) else None


class ControlNetUnit(Schema):
    processor_id: Literal[PROCESSOR_IDS] = Field(description="annotator that turns frames into this ControlNet's input")
    model_path: str = path_field(kind="models", description="ControlNet model file or folder")
    scale: float = Field(1.0, ge=0.0, le=4.0, description="weight of this ControlNet's residuals")


class ModelsConfig(Schema):
    model_list: list[str] = path_field(kind="models", description="base model and motion module files, in any order")
    controlnet_units: list[ControlNetUnit] = Field(default_factory=list)
    textual_inversion_folder: str | None = path_field(None, kind="models",
                                                      description="folder of textual-inversion embeddings")
    lora_alphas: list[float] = Field(default_factory=list, description="one weight per LoRA file in model_list")
    lora_convention: Literal["kohya", "diffutoon"] = Field(
        "kohya", description="kohya: scale each LoRA by its file's alpha/rank and apply its text-encoder layers "
                             "(A1111, ComfyUI); diffutoon: as the original, W += lora_alpha × up·down with the "
                             "file's alpha ignored, UNet layers only (to reproduce an old Diffutoon render)")
    motion_norm: Literal["frame", "window"] = Field(
        "frame", description="how the motion modules' GroupNorm normalises: frame = each frame on its own, as "
                             "AnimateDiff and the original Diffutoon (the weights were trained so); window = over "
                             "the whole sliding window, as diffusers' AnimateDiff pipelines")
    device: str = Field("auto", description='"auto" (cuda when available), "cpu", "cuda", "cuda:1", …')
    torch_dtype: Literal["auto", "float16", "float32", "bfloat16"] = Field(
        "auto", description="weights' dtype; auto = float16 on GPU, float32 on CPU (the VAE is always float32)")
    vram_limit_level: int = Field(
        0, ge=0, le=2, description="0: all models on the GPU; 1: only the running stage's models (idle ones wait on "
                                   "the CPU); 2: only the running model")
    vae_tile_size: int = Field(
        512, ge=0, description="frames wider or taller than this many pixels are VAE-encoded and -decoded in tiles "
                               "of this size (diffusers' tiling, tiles overlapping by a quarter), so large frames "
                               "fit the GPU; a multiple of 32; 0 = never tile. Frames at or below it are unchanged")
    annotators_folder: str | None = path_field(
        None, kind="models", description="folder of annotator weights (sk_model.pth, ControlNetHED.pth, …; lllyasviel/Annotators)")
    tokenizer_folder: str | None = path_field(
        None, kind="models", description="CLIP tokenizer folder for a single-file base model (default: SD1.5's, shipped)")

    @field_validator("vae_tile_size")
    @classmethod
    def _tile_multiple_of_32(cls, value):
        """Tiles overlap by a quarter, in latent pixels (1/8): only a multiple of 32 lines the tiles up exactly."""
        if value % 32:
            raise ValueError(f"{value} is not a multiple of 32 (tiles overlap by a quarter of their latent size); "
                             "e.g. 512, or 0 to never tile")
        return value


class FramesConfig(Schema):
    video_file: str | None = path_field(None, kind="videos", description="source video (any format FFmpeg reads)")
    image_folder: str | None = path_field(None, kind="videos", description="or a folder of images, sorted by name")
    height: int = Field(512, gt=0, description="output height in pixels, a multiple of 8")
    width: int = Field(512, gt=0, description="output width in pixels, a multiple of 8")
    start_frame_id: int = Field(0, ge=0, description="first source frame to render")
    end_frame_id: int | None = Field(None, ge=1, description="one past the last frame (default: the end)")
    resize_mode: Literal["crop", "fill"] = Field(
        "crop", description="crop: centre-crop to the output aspect, then resize; fill: letterbox")

    @model_validator(mode="after")
    def _check(self):
        if (self.video_file is None) == (self.image_folder is None):
            raise ValueError("give exactly one of video_file or image_folder")
        for name in ("height", "width"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} {getattr(self, name)} is not a multiple of 8 (latents are 1/8 the size)")
        if self.end_frame_id is not None and self.end_frame_id <= self.start_frame_id:
            raise ValueError(f"frame range [{self.start_frame_id}, {self.end_frame_id}) is empty")
        return self


class DataConfig(Schema):
    input_frames: FramesConfig
    controlnet_frames: list[FramesConfig] | None = Field(
        None, description="one per ControlNet unit (default: the input frames)")
    output_folder: str = path_field(kind="output", description="the run folder: cache, manifest, frames/ and video.mp4")
    fps: float | None = Field(None, gt=0, description="output frame rate (default: the source's)")
    crf: int = Field(17, ge=0, le=51, description="H.264 quality (lower is better, 17 is visually lossless)")
    keep: Literal["all", "resume", "outputs"] = Field(
        "all", description="what stays on disk. all: every result except the denoising intermediates, so a changed "
                           "setting reuses the most; resume: each result is also deleted once every stage reading it "
                           "is done, except the final latents and the outputs (a crash still resumes losing at most "
                           "one unit; a changed setting recomputes what it needs); outputs: as resume, and after "
                           "success only video.mp4, frames/, config.json, the manifest and the log remain. Never "
                           "changes the output's bytes")
    save_frames: bool = Field(True, description="also save every final frame as frames/00000.png … (lossless, "
                                                "about 1.5 bytes a pixel on disk); off = only video.mp4")
    shots: Literal["auto", "none"] | list[int] = Field(
        "auto", description="where the video cuts to a new shot, so that no sliding window and no FastBlend window "
                            "blends two shots: auto = hard cuts detected on the cropped input frames (PySceneDetect's "
                            "content detector); none = one shot (the original Diffutoon's behaviour); or the frame "
                            "indices where a new shot starts (counted from the rendered range's first frame)")
    shot_threshold: float = Field(
        SHOT_THRESHOLD, gt=0, description="shots: auto only: the content detector's threshold on the change between "
                                          "two frames (PySceneDetect's default 27; lower finds more cuts)")

    @field_validator("shots")
    @classmethod
    def _shot_starts(cls, value):
        """An explicit list: frame indices from 0, increasing; its range is checked against the rendered frames
        when the render is planned (diffsynth.pipeline)."""
        if isinstance(value, list):
            negative = [index for index in value if index < 0]
            if negative:
                raise ValueError(f"shot start {negative[0]} is negative; give frame indices from 0 (the rendered "
                                 "range's first frame)")
            for before, after in zip(value, value[1:]):
                if after <= before:
                    raise ValueError(f"shot starts must increase, each once: {after} follows {before}; sort the "
                                     "list and remove repeats")
        return value


class PipelineInputs(Schema):
    prompt: str | dict[int, str] = Field(
        "", description="what to draw, with A1111 weighting: (word:1.3), (word) ×1.1, [word] ÷1.1, \\( for a "
                        "literal bracket; or a prompt travel {frame: prompt} (frames counted from the rendered "
                        "range's first), interpolated linearly between keys")
    negative_prompt: str | dict[int, str] = Field(
        "", description="what to avoid; the same syntax as prompt, and may also be a {frame: prompt} mapping")
    cfg_scale: float = Field(7.0, ge=0.0)
    clip_skip: int = Field(2, ge=1, description="2 = the penultimate text-encoder layer")
    denoising_strength: float = Field(1.0, gt=0.0, le=1.0)
    num_inference_steps: int = Field(10, ge=1, le=1000)
    animatediff_batch_size: int = Field(16, ge=1, description="frames per sliding window")
    animatediff_stride: int = Field(8, ge=1, description="frames between window starts")
    unet_batch_size: int | Literal["auto"] = Field(
        1, description="frames per UNet call (lower = less VRAM); with a motion module, frames per call of the "
                       "UNet's spatial layers, while the motion modules still see the whole window; auto = the "
                       "largest that fits the GPU's memory by the VRAM model (diffsynth/vram.py), the whole window "
                       "on the CPU")
    controlnet_batch_size: int | Literal["auto"] = Field(
        1, description="frames per ControlNet call (lower = less VRAM); auto as for unet_batch_size")
    cfg_halves: Literal["together", "apart"] = Field(
        "together", description="classifier-free guidance's negative and positive halves: together = in one UNet "
                                "batch (faster); apart = one UNet call per half (about half the activation memory "
                                "of a window)")
    long_prompts: Literal["chunks", "diffutoon"] = Field(
        "chunks", description="prompts over 75 tokens: chunks = 75-token chunks, each wrapped in start/end tokens "
                              "(A1111, ComfyUI); diffutoon = as the original, the whole prompt tokenized once and "
                              "cut into raw 77-token slices, and each CFG half attended at its own "
                              "length (one UNet and ControlNet call per half where they differ)")
    cross_frame_attention: bool = Field(
        False, description="the UNet's self-attention sees the tokens of all frames of one UNet batch "
                           "(unet_batch_size frames) at once, as the original's editing-signals recipe")
    smoother_progress_ids: list[int] = Field(
        default_factory=list, description="denoising steps (0-based) whose x0 is smoothed; -1 = the final frames")

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_travel_keys(cls, value):
        """A prompt travel needs at least one key, and keys are frame indices (counted from the rendered range's
        first frame), so never negative."""
        if isinstance(value, dict):
            if not value:
                raise ValueError("a prompt travel mapping needs at least one {frame: prompt} entry")
            negative = [frame for frame in value if frame < 0]
            if negative:
                raise ValueError(f"prompt travel key {negative[0]} is negative; keys are frame indices from 0 (the "
                                 "rendered range's first frame)")
        return value

    @field_validator("unet_batch_size", "controlnet_batch_size")
    @classmethod
    def _batch_size(cls, value):
        if value != "auto" and value < 1:
            raise ValueError(f"{value} is below 1; give a number of frames (at least 1) or auto")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.animatediff_stride > self.animatediff_batch_size:
            raise ValueError("animatediff_stride must not exceed animatediff_batch_size (frames would be skipped)")
        for step in self.smoother_progress_ids:
            if not -1 <= step <= self.num_inference_steps:
                raise ValueError(f"smoother_progress_ids has {step}, outside -1..{self.num_inference_steps}")
        return self


class PipelineConfig(Schema):
    seed: int = Field(0, ge=0)
    pipeline_inputs: PipelineInputs = Field(default_factory=PipelineInputs)


class FastBlendSettings(Schema):
    """FastBlend's parameters, with the original tool's names and defaults."""
    inference_mode: Literal["fast", "balanced", "accurate", "interpolation"] = Field(
        "fast", description="fast: dyadic tables; balanced/accurate: warp every frame in the window; "
                            "interpolation: only keyframe_ids are rendered")
    window_size: int = Field(60, ge=1, description="frames on each side blended into each frame (at least 1; to "
                             "smooth nothing, leave it out of smoother_progress_ids)")
    batch_size: int = Field(8, ge=1, description="frame pairs matched at once")
    minimum_patch_size: int = Field(5, ge=1, description="smallest patch (odd)")
    num_iter: int = Field(5, ge=1, description="patch-match iterations per pyramid level")
    guide_weight: float = Field(10.0, ge=0.0, description="weight of the guide (input frames) in the patch error")
    initialize: Literal["identity", "random"] = "identity"
    tracking_window_size: int = Field(0, ge=0, description="try the matches of the frames up to this many places "
                                      "before and after in a batch (0 = off)")
    keyframe_ids: list[int] = Field(default_factory=list, description="interpolation mode: the rendered keyframes")

    @field_validator("minimum_patch_size")
    @classmethod
    def _odd(cls, value):
        if value % 2 == 0:
            raise ValueError(f"{value} must be odd (patches are centred on a pixel)")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.inference_mode == "interpolation" and not self.keyframe_ids:
            raise ValueError("inference_mode interpolation needs keyframe_ids")
        return self


class EnhanceSettings(Schema):
    """A post-processor of the original's smoother chain: PIL's ImageEnhance with this factor."""
    rate: float = Field(1.0, ge=0.0, description="1 leaves the frame as it is; above 1 strengthens, below weakens")


SMOOTHER_SETTINGS = {"FastBlend": FastBlendSettings, "Contrast": EnhanceSettings, "Sharpness": EnhanceSettings}
RIFE_FILE = "models/RIFE/flownet.pkl"


class SmootherConfig(Schema):
    """One entry of the smoother chain, run in order at each point of smoother_progress_ids (as the original):
    FastBlend, then e.g. Contrast and Sharpness."""
    processor_type: Literal["FastBlend", "Contrast", "Sharpness", "RIFE"] = "FastBlend"
    config: FastBlendSettings | EnhanceSettings = Field(default_factory=FastBlendSettings)

    @model_validator(mode="before")
    @classmethod
    def _settings_of_the_type(cls, data):
        """Parse `config` with the settings of this processor type (the two kinds share no keys)."""
        if not isinstance(data, dict):
            return data
        kind = data.get("processor_type", "FastBlend")
        if kind == "RIFE":
            raise ValueError(f"the RIFE smoother needs its interpolation network ({RIFE_FILE}, from the "
                             "Practical-RIFE releases), which this renderer does not run; remove that entry "
                             "(FastBlend, Contrast and Sharpness are supported)")
        settings = SMOOTHER_SETTINGS.get(kind)
        if settings is not None and isinstance(data.get("config", {}), dict):
            try:
                data = dict(data, config=settings.model_validate(data.get("config") or {}))
            except ValidationError as error:  # keep each problem's key: smoother_configs.N.config.<key>
                raise ValidationError.from_exception_data(cls.__name__, [
                    {key: value for key, value in dict(problem, loc=("config", *problem["loc"])).items()
                     if key in ("type", "loc", "input", "ctx")} for problem in error.errors()]) from None
        return data


class ExecutorConfig(Schema):
    """Where the work units run. Never part of a fingerprint: the output's bytes do not depend on it."""
    workers: int = Field(1, ge=1, description="workers computing units at once; 1 = in this process (no Ray); "
                                               "more = Ray actors (a local Ray instance unless `address` is set)")
    address: str | None = Field(None, description='a Ray cluster to join: "auto" (the one started on this machine '
                                                  'with `ray start --head`) or "ray://host:10001"; workers then '
                                                  "defaults to the cluster's GPUs (or CPUs)")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs each worker holds (default: 1 where "
                                                                  "models.device is a GPU, 0 on the CPU)")
    cpus_per_worker: float = Field(1, gt=0, description="CPU cores Ray reserves for each worker. Workers compute "
                                   "with the render process's torch thread count (it changes a CPU result's low "
                                   "bits, so it is part of the CPU's fingerprint); OMP_NUM_THREADS sets both")
    cache_per_worker_gb: float = Field(4, ge=0, description="memory each worker keeps of the bytes it was sent or "
                                       "computed (frames, latents, ε), so the render process sends each only once; "
                                       "0 = keep nothing, send every input with every unit")

    @property
    def distributed(self):
        return self.workers > 1 or self.address is not None


class RenderConfig(Schema):
    models: ModelsConfig
    data: DataConfig
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    smoother_configs: list[SmootherConfig] = Field(default_factory=list)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _check(self):
        units = self.models.controlnet_units
        if self.data.controlnet_frames is not None and len(self.data.controlnet_frames) != len(units):
            raise ValueError(f"data.controlnet_frames has {len(self.data.controlnet_frames)} entries "
                             f"for {len(units)} controlnet units")
        size = (self.data.input_frames.width, self.data.input_frames.height)
        for index, frames in enumerate(self.data.controlnet_frames or []):
            if (frames.width, frames.height) != size:
                raise ValueError(f"data.controlnet_frames.{index} is {frames.width}x{frames.height} but "
                                 f"data.input_frames is {size[0]}x{size[1]}; give every controlnet_frames entry the "
                                 "input's width and height (ControlNet maps must match the frames)")
        return self

    def smoother_chain(self):
        """[(processor type, settings)] run in order wherever smoothing happens; FastBlend's defaults when none is
        given."""
        return [(s.processor_type, s.config) for s in self.smoother_configs] or [("FastBlend", FastBlendSettings())]

    def controlnet_frames_for(self, unit_index):
        if self.data.controlnet_frames is None:
            return self.data.input_frames
        return self.data.controlnet_frames[unit_index]


def error_line(error):
    """One line for a pydantic error: the dotted key, what is wrong, and a suggestion for misspelt keys."""
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = RenderConfig
        for part in error["loc"][:-1]:
            if isinstance(part, int):  # a list index: the element's schema is the list's
                continue
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            annotation = field.annotation if field else None
            parent = _schema_class(annotation)
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})" if known else ""
        return f"unknown config key '{location}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"bad config value for '{location}': {message}" if location else f"bad config: {message}"


def _schema_class(annotation):
    """The Schema class inside an annotation such as `FramesConfig`, `list[FramesConfig] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, Schema):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _schema_class(arg)
        if found:
            return found
    return None


def parse_config(data):
    """Validate a config dict; UserError with one line per problem (the first line names the first key)."""
    try:
        return RenderConfig.model_validate(data)
    except ValidationError as error:
        raise UserError("; ".join(error_line(e) for e in error.errors())) from None


def set_by_path(data, dotted_key, value):
    """Apply one `--set a.b.c=value` override: value is parsed as YAML (numbers, lists, true/false)."""
    keys = dotted_key.split(".")
    node = data
    for index, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"--set {dotted_key}: '{'.'.join(keys[:index + 1])}' is not a valid list index")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def field_at(dotted_key, model=None):
    """The schema field a dotted config key names (list indices skipped), or None."""
    model, info = model or RenderConfig, None
    for key in dotted_key.split("."):
        if key.isdigit() and info is not None:
            continue
        if model is None or key not in model.model_fields:
            return None
        info = model.model_fields[key]
        model = _schema_class(info.annotation)
    return info


def parse_override(text):
    """`key.path=value` → (key, value). A value is YAML (numbers, lists, true/false), except for a path field,
    whose value is taken as typed (a file name may hold '#' or ': ') and made absolute against the current folder,
    as a shell user expects; a path list may be given as a YAML list."""
    if "=" not in text:
        raise UserError(f"--set expects key.path=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    info = field_at(key)
    if info is None or not path_kind(info):
        try:
            return key, yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise UserError(f"--set {key}: the value is not valid YAML ({str(error).splitlines()[0]}); quote it") \
                from None

    def absolute(value):
        return resolved(Path(value).expanduser(), key) if isinstance(value, str) and value else value

    if raw.strip().startswith("[") and not key.split(".")[-1].isdigit():
        values = yaml.safe_load(raw)
        return key, [absolute(value) for value in values] if isinstance(values, list) else values
    if raw.strip() in ("", "null", "None"):
        return key, None
    return key, absolute(raw)


def read_text(path, what="config"):
    """A text file the user wrote (a config, a script, the web UI's settings), as UTF-8 (a byte-order mark is
    allowed, whatever the locale); UserError, one line, for a file that is not UTF-8 text or cannot be read."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                        f"{error.start}); save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror or error}") from None


def load_config(path, overrides=()):
    """Read a YAML (or JSON) config, apply `key.path=value` overrides, validate. Relative paths inside the config
    are taken relative to the config file's folder; paths given with --set, relative to the current folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of keys (models, data, pipeline, …)")
    for override in overrides:
        set_by_path(data, *parse_override(override))
    return resolve_paths(parse_config(data), path.parent)


def map_paths(data, function, model=None, prefix=()):
    """Replace every path-typed value in a config dict (fields made with `path_field`, found by walking the schema)
    by `function(value, kind, dotted_path)`; list fields item by item. Values of the wrong type are left alone."""
    model = model or RenderConfig
    if not isinstance(data, dict):
        return data
    for name, info in model.model_fields.items():
        if name not in data:
            continue
        value, path = data[name], prefix + (name,)
        nested, kind = _schema_class(info.annotation), path_kind(info)
        if nested is not None:
            for index, item in enumerate(value if isinstance(value, list) else [value]):
                map_paths(item, function, nested, path + ((index,) if isinstance(value, list) else ()))
        elif kind and isinstance(value, list):
            data[name] = [function(item, kind, ".".join(map(str, path + (index,)))) if isinstance(item, str)
                          else item for index, item in enumerate(value)]
        elif kind and isinstance(value, str):
            data[name] = function(value, kind, ".".join(map(str, path)))
    return data


def resolve_paths(config, base_folder):
    """Make every file path in the config absolute, relative to `base_folder`."""
    def absolute(value, kind, key):
        return resolved(Path(base_folder) / Path(value).expanduser(), key)

    return RenderConfig.model_validate(map_paths(config.model_dump(), absolute))


def resolved(path, key):
    """An absolute path with its symbolic links resolved; UserError naming the key for a link loop."""
    try:
        return str(Path(path).resolve())
    except (RuntimeError, OSError) as error:  # RuntimeError: Python < 3.13's "Symlink loop"
        reason = os.strerror(error.errno) if getattr(error, "errno", None) else "a symbolic link loop"
        raise UserError(f"{key}: {path} cannot be reached ({reason}); give a path without a link loop") from None


def config_json(config):
    return json.dumps(config.model_dump(), indent=2, sort_keys=True)
