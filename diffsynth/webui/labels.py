"""Plain-language names for the page: what each config field is called in the form (the config key stays in the
field's help), which fields are folded away as advanced, and what each render stage does.

Keys are dotted config keys with list indices written as `*` (models.controlnet_units.*.scale). A field not listed
here keeps its key-derived label and is treated as advanced, so a new schema field appears folded, never lost.
"""

import re

# dotted key → (label, basic). Basic fields are drawn open; the rest go under each section's "More settings".
FIELDS = {
    "data.input_frames.video_file": ("Video file", True),
    "data.input_frames.image_folder": ("…or a folder of images", False),
    "data.input_frames.width": ("Output width (px)", True),
    "data.input_frames.height": ("Output height (px)", True),
    "data.input_frames.start_frame_id": ("First frame", True),
    "data.input_frames.end_frame_id": ("Stop before frame", True),
    "data.input_frames.resize_mode": ("Fit to the output size", False),
    "data.controlnet_frames": ("Separate guide videos for the ControlNets", False),
    "data.output_folder": ("Run name", True),
    "data.fps": ("Output frame rate", False),
    "data.crf": ("Video quality (CRF, lower is better)", False),
    "data.save_frames": ("Also save every frame as a PNG", False),
    "data.keep": ("Keep on disk", False),
    "data.shots": ("Shots (auto = find the cuts, none, or the frames where a new shot starts)", False),
    "data.shot_threshold": ("Cut detection threshold", False),
    "models.model_list": ("Base model and motion module", True),
    "models.controlnet_units": ("ControlNet guides", True),
    "models.controlnet_units.*.processor_id": ("Guide type", True),
    "models.controlnet_units.*.model_path": ("ControlNet model", True),
    "models.controlnet_units.*.scale": ("Strength", True),
    "models.textual_inversion_folder": ("Textual inversion folder", False),
    "models.lora_alphas": ("LoRA strengths", False),
    "models.device": ("Device", False),
    "models.torch_dtype": ("Precision", False),
    "models.vram_limit_level": ("Save GPU memory (0 = off)", False),
    "models.vae_tile_size": ("VAE tile size for large frames (px, 0 = never tile)", False),
    "models.annotators_folder": ("Annotator weights folder", False),
    "models.tokenizer_folder": ("Tokenizer folder", False),
    "pipeline.seed": ("Seed", False),
    "pipeline.pipeline_inputs.prompt": ("Describe the look", True),
    "pipeline.pipeline_inputs.negative_prompt": ("Avoid", True),
    "pipeline.pipeline_inputs.cfg_scale": ("Prompt strength", True),
    "pipeline.pipeline_inputs.num_inference_steps": ("Denoising steps", True),
    "pipeline.pipeline_inputs.denoising_strength": ("How much to change the video (1 = fully)", True),
    "pipeline.pipeline_inputs.clip_skip": ("CLIP skip", False),
    "pipeline.pipeline_inputs.animatediff_batch_size": ("Frames per window", False),
    "pipeline.pipeline_inputs.animatediff_stride": ("Frames between windows", False),
    "pipeline.pipeline_inputs.unet_batch_size": ("Frames per UNet call", False),
    "pipeline.pipeline_inputs.controlnet_batch_size": ("Frames per ControlNet call", False),
    "pipeline.pipeline_inputs.smoother_progress_ids": ("Smooth after these steps (-1 = the final frames)", False),
    "smoother_configs": ("Smoothing settings", False),
    "smoother_configs.*.processor_type": ("Smoother", False),
    "smoother_configs.*.config.inference_mode": ("Smoothing mode", False),
    "smoother_configs.*.config.window_size": ("Smoothing window (frames each side)", False),
    "smoother_configs.*.config.rate": ("Strength (1 = unchanged)", False),
    "executor.workers": ("Workers computing at once (more than 1 uses Ray)", False),
    "executor.address": ("Ray cluster to join", False),
    "executor.gpus_per_worker": ("GPUs per worker", False),
    "executor.cpus_per_worker": ("CPU cores per worker", False),
    "executor.cache_per_worker_gb": ("Memory each worker keeps of what it was sent (GB)", False),
}


def template_key(path):
    """The FIELDS key of a widget path: list indices become `*`."""
    return ".".join("*" if str(part).isdigit() else str(part) for part in path)


def field_label(path, fallback):
    entry = FIELDS.get(template_key(path))
    return entry[0] if entry else fallback


def is_basic(path):
    entry = FIELDS.get(template_key(path))
    return bool(entry and entry[1])


def field_help(path, description):
    """The help tooltip: what the field does, then its config key (what the YAML and the CLI's --set call it)."""
    key = ".".join(str(part) for part in path)
    return f"{description}\n\nConfig key: `{key}`" if description else f"Config key: `{key}`"


# --- stages ---------------------------------------------------------------------------------------------------------

STAGE_TITLES = {
    "decode": "Reading the source frames",
    "crop": "Reading, cropping and resizing the source frames",
    "prompts": "Reading the prompts",
    "latents": "Preparing the starting noise",
    "vae_decode": "Turning the result into pictures",
    "smooth.final": "Smoothing the final frames",
    "encode": "Writing the frames and the video",
}
PROCESSOR_NAMES = {"tile": "detail", "canny": "edges", "lineart": "line art", "lineart_coarse": "coarse line art",
                   "lineart_anime": "anime line art", "softedge": "soft edges", "depth": "depth",
                   "openpose": "poses"}


def denoising_steps(stage_names):
    """How many denoising steps a render has: one denoise.<k>.windows stage per step."""
    return sum(1 for name in stage_names if re.fullmatch(r"denoise\.\d+\.windows", name))


def stage_title(name, steps=None):
    """What a stage does, for people: 'Denoising, step 1 of 10' for denoise.000.windows."""
    if name in STAGE_TITLES:
        return STAGE_TITLES[name]
    of = f" of {steps}" if steps else ""
    match = re.fullmatch(r"(smooth\.(?:final|\d+\.blend))\.(\d+)\.(\w+)", name)
    if match:  # a later smoother of the chain (smooth.final.1.contrast): the smoothing it follows, and what it does
        return f"{stage_title(match.group(1), steps)}: {match.group(3)}"
    match = re.fullmatch(r"denoise\.(\d+)\.(windows|step)", name)
    if match:
        step = int(match.group(1)) + 1
        return f"Denoising, step {step}{of}" + ("" if match.group(2) == "windows" else ": blending the windows")
    match = re.fullmatch(r"smooth\.(\d+)\.(x0|blend)", name)
    if match:
        step = int(match.group(1)) + 1
        return f"Smoothing after step {step}{of}" + (": previewing" if match.group(2) == "x0" else "")
    match = re.fullmatch(r"annotate\.(\d+)\.(\w+)", name)
    if match:
        processor = PROCESSOR_NAMES.get(match.group(2), match.group(2))
        return f"Tracing {processor} for guide {int(match.group(1)) + 1}"
    return name
