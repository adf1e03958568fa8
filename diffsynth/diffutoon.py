"""Run the original Diffutoon scripts and configs unchanged.

The original examples do

    from diffsynth import SDVideoPipelineRunner, download_models
    download_models([...preset names...])
    config = {...}
    SDVideoPipelineRunner().run(config)

Here `download_models` never touches the network: it checks that each preset's files are at the original paths
(relative to the current folder, as there) and otherwise stops with one line per missing file and where people get
it. `SDVideoPipelineRunner().run(config)` converts the original config (`config_from_original`) and renders it
through this project's resumable pipeline, in the original's output folder. `diffsynth render script.py` reads the
script's `config = {...}` literal with `ast` (`config_from_script`) and never runs the script: the originals download
models at import time.

Relative paths in an original config resolve against the current folder (the original's behaviour), not against the
script's folder. docs/coming_from_diffutoon.md lists every remaining difference.
"""

import ast
import copy
import difflib
from pathlib import Path

from .config import PROCESSOR_IDS, parse_config, parse_override, read_text, resolve_paths, set_by_path
from .errors import UserError

# Where the originals expect each file (relative to the current folder) and where people get it.
CONTROLNET_V11 = "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/"
ANNOTATORS = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"
MODEL_SOURCES = {
    "models/stable_diffusion/aingdiffusion_v12.safetensors": "https://civitai.com/api/download/models/229575",
    "models/stable_diffusion/v1-5-pruned-emaonly.safetensors":
        "https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors",
    "models/stable_diffusion/dreamshaper_8.safetensors": "Civitai (DreamShaper 8)",
    "models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors": "Civitai (Flat-2D Animerge v4.5 Sharp)",
    "models/AnimateDiff/mm_sd_v15_v2.ckpt": "https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
    "models/ControlNet/control_v11f1e_sd15_tile.pth": CONTROLNET_V11 + "control_v11f1e_sd15_tile.pth",
    "models/ControlNet/control_v11p_sd15_lineart.pth": CONTROLNET_V11 + "control_v11p_sd15_lineart.pth",
    "models/ControlNet/control_v11p_sd15_softedge.pth": CONTROLNET_V11 + "control_v11p_sd15_softedge.pth",
    "models/ControlNet/control_v11f1p_sd15_depth.pth": CONTROLNET_V11 + "control_v11f1p_sd15_depth.pth",
    "models/Annotators/sk_model.pth": ANNOTATORS + "sk_model.pth",
    "models/Annotators/sk_model2.pth": ANNOTATORS + "sk_model2.pth",
    "models/Annotators/ControlNetHED.pth": ANNOTATORS + "ControlNetHED.pth",
    "models/Annotators/dpt_hybrid-midas-501f0c75.pt": ANNOTATORS + "dpt_hybrid-midas-501f0c75.pt",
    "models/Annotators/body_pose_model.pth": ANNOTATORS + "body_pose_model.pth",
    "models/Annotators/hand_pose_model.pth": ANNOTATORS + "hand_pose_model.pth",
    "models/Annotators/facenet.pth": ANNOTATORS + "facenet.pth",
    "models/textual_inversion/verybadimagenegative_v1.3.pt":
        "https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16",
}

# The original's preset names → the files each one downloads (a ControlNet preset brings its annotator files).
PRESET_FILES = {
    "AingDiffusion_v12": ["models/stable_diffusion/aingdiffusion_v12.safetensors"],
    "StableDiffusion_v15": ["models/stable_diffusion/v1-5-pruned-emaonly.safetensors"],
    "DreamShaper_8": ["models/stable_diffusion/dreamshaper_8.safetensors"],
    "Flat2DAnimerge_v45Sharp": ["models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors"],
    "AnimateDiff_v2": ["models/AnimateDiff/mm_sd_v15_v2.ckpt"],
    "ControlNet_v11f1e_sd15_tile": ["models/ControlNet/control_v11f1e_sd15_tile.pth"],
    "ControlNet_v11p_sd15_lineart": ["models/ControlNet/control_v11p_sd15_lineart.pth",
                                     "models/Annotators/sk_model.pth", "models/Annotators/sk_model2.pth"],
    "ControlNet_v11p_sd15_softedge": ["models/ControlNet/control_v11p_sd15_softedge.pth",
                                      "models/Annotators/ControlNetHED.pth"],
    "ControlNet_v11f1p_sd15_depth": ["models/ControlNet/control_v11f1p_sd15_depth.pth",
                                     "models/Annotators/dpt_hybrid-midas-501f0c75.pt"],
    "TextualInversion_VeryBadImageNegative_v1.3": ["models/textual_inversion/verybadimagenegative_v1.3.pt"],
    "Annotators:sk_model": ["models/Annotators/sk_model.pth"],
    "Annotators:sk_model2": ["models/Annotators/sk_model2.pth"],
    "Annotators:ControlNetHED": ["models/Annotators/ControlNetHED.pth"],
    "Annotators:dpt_hybrid-midas-501f0c75": ["models/Annotators/dpt_hybrid-midas-501f0c75.pt"],
    # The names later DiffSynth-Studio versions use for the same annotator files.
    "Annotators:Lineart": ["models/Annotators/sk_model.pth", "models/Annotators/sk_model2.pth"],
    "Annotators:Softedge": ["models/Annotators/ControlNetHED.pth"],
    "Annotators:Depth": ["models/Annotators/dpt_hybrid-midas-501f0c75.pt"],
    "Annotators:Openpose": ["models/Annotators/body_pose_model.pth", "models/Annotators/facenet.pth",
                            "models/Annotators/hand_pose_model.pth"],
}

# The original runner reads annotator weights from this fixed folder (relative to the current folder).
ORIGINAL_ANNOTATORS_FOLDER = "models/Annotators"

# pipeline_inputs keys the original runner overwrites from `data` before running (its examples carry placeholders).
FILLED_IN_FROM_DATA = ("input_frames", "num_frames", "width", "height", "controlnet_frames")

# The processor ids the original knows; those missing from PROCESSOR_IDS have no annotator here.
ORIGINAL_PROCESSOR_IDS = ("canny", "depth", "softedge", "lineart", "lineart_anime", "openpose", "normal", "tile",
                          "none", "inpaint")


def download_models(model_id_list=(), downloading_priority=None):
    """Check that the files of the original's model presets are where the original puts them; never downloads.
    Returns their paths (relative to the current folder, as the original's). UserError: one line per missing file
    and where to get it. `downloading_priority` (ModelScope / HuggingFace) is accepted and ignored."""
    files = []
    for preset in model_id_list:
        if preset not in PRESET_FILES:
            close = difflib.get_close_matches(preset, list(PRESET_FILES), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known presets: {', '.join(PRESET_FILES)}"
            raise UserError(f"unknown model preset '{preset}' in download_models ({hint})")
        files += [path for path in PRESET_FILES[preset] if path not in files]
    missing = [path for path in files if not Path(path).is_file()]
    if missing:
        header = (f"{len(missing)} model file(s) missing under {Path.cwd()} (nothing is downloaded at run time; "
                  "get each by hand and put it at its path):")
        lines = [header] + [f"  {path}  <- {MODEL_SOURCES[path]}" for path in missing]
        raise UserError("\n".join(lines))
    return files


class SDVideoPipelineRunner:
    """The original's runner, rendering through this project's pipeline: resumable, in the same run folder
    (the original's `data.output_folder`). Run the same script again after a crash and it continues."""

    def __init__(self, in_streamlit=False):
        self.in_streamlit = in_streamlit  # the original showed progress in its web UI; here tqdm bars always

    def run(self, config):
        from .render import render  # heavy (torch, diffusers): only when a render really starts
        render_config = load_original_config(config)
        return render(render_config, progress=True)


def is_original_layout(data):
    """True for a config dict in the original's layout: its pipeline_inputs carry the keys the original runner fills
    in from `data` (input_frames, num_frames, width, height, controlnet_frames), which this schema does not have."""
    pipeline = data.get("pipeline") if isinstance(data, dict) else None
    inputs = pipeline.get("pipeline_inputs") if isinstance(pipeline, dict) else None
    return isinstance(inputs, dict) and any(key in inputs for key in FILLED_IN_FROM_DATA)


def load_original_config(original, overrides=(), base_folder=None):
    """An original config dict → this project's validated RenderConfig, with relative paths made absolute against
    `base_folder` (default: the current folder, as in the original). `overrides` are `--set key.path=value`
    strings in this project's key names."""
    converted = config_from_original(original)
    for override in overrides:
        set_by_path(converted, *parse_override(override))
    config = resolve_paths(parse_config(converted), Path(base_folder) if base_folder else Path.cwd())
    check_device_available(config.models.device)
    return config


def config_from_original(original):
    """Convert an original Diffutoon config dict to this project's schema (still a dict, not validated: the schema
    in diffsynth/config.py validates it, so unknown keys stay errors with suggestions). The input is not changed.

    - `pipeline.pipeline_inputs.{input_frames, num_frames, width, height, controlnet_frames}` are removed after
      checking they agree with `data` (the original runner overwrote them; the examples carry placeholders).
    - ControlNet files listed in `models.model_list` as well as in `models.controlnet_units` are dropped from
      model_list (the original loaded them from both; here units name their own files).
    - `start_frame_id: None` becomes the default 0 (`end_frame_id: None` already means "to the end").
    - `models.annotators_folder` defaults to the original's fixed `models/Annotators`.
    - `data.shots` defaults to `none`: the original's windows and FastBlend run across cuts (this project's own
      configs detect them, `auto`).
    """
    if not isinstance(original, dict):
        raise UserError(f"a Diffutoon config must be a dict of keys (models, data, pipeline, …), "
                        f"got {type(original).__name__}")
    config = copy.deepcopy(original)
    models = config.get("models")
    data = config.get("data")
    if isinstance(models, dict):
        _convert_models(models)
    if isinstance(data, dict):
        data.setdefault("shots", "none")
        for frames in [data.get("input_frames")] + list(data.get("controlnet_frames") or []):
            if isinstance(frames, dict) and "start_frame_id" in frames and frames["start_frame_id"] is None:
                del frames["start_frame_id"]
    inputs = (config.get("pipeline") or {}).get("pipeline_inputs")
    if isinstance(inputs, dict):
        _remove_filled_in_inputs(inputs, data if isinstance(data, dict) else {})
    return config


def _convert_models(models):
    units = models.get("controlnet_units") or []
    for index, unit in enumerate(units):
        processor = unit.get("processor_id") if isinstance(unit, dict) else None
        if processor in ORIGINAL_PROCESSOR_IDS and processor not in PROCESSOR_IDS:
            raise UserError(f"models.controlnet_units.{index}.processor_id '{processor}' is not supported here "
                            f"(processor ids: {', '.join(PROCESSOR_IDS)}); choose one of those or remove the unit")
    unit_files = {_normalised(unit["model_path"]) for unit in units
                  if isinstance(unit, dict) and isinstance(unit.get("model_path"), str)}
    if isinstance(models.get("model_list"), list):
        models["model_list"] = [path for path in models["model_list"]
                                if not (isinstance(path, str) and _normalised(path) in unit_files)]
    models.setdefault("annotators_folder", ORIGINAL_ANNOTATORS_FOLDER)


def _normalised(path):
    """A path as a comparable string: `models/a/../b.pth` and `./models/b.pth` are the same file."""
    return str((Path.cwd() / Path(path).expanduser()).resolve())


def _remove_filled_in_inputs(inputs, data):
    """Drop the keys the original runner fills in from `data`, each after checking it agrees with `data`."""
    frames = data.get("input_frames") if isinstance(data.get("input_frames"), dict) else {}
    prefix = "pipeline.pipeline_inputs."
    for key in ("input_frames", "controlnet_frames"):
        # The original replaced these with the loaded frames; only its empty placeholder can be meant here.
        if key in inputs and inputs[key] not in ([], None):
            raise UserError(f"{prefix}{key} is filled in from data.{key} (the original runner overwrote it too); "
                            "leave it [] or remove it and set data." + key)
    for key in ("width", "height"):
        if key in inputs and key in frames and inputs[key] != frames[key]:
            raise UserError(f"{prefix}{key} is {inputs[key]} but data.input_frames.{key} is {frames[key]}; the "
                            f"original runner took {key} from data.input_frames: make them agree or remove {prefix}{key}")
    if "num_frames" in inputs and frames.get("end_frame_id") is not None:
        # Only checkable without reading the video when the range has an end.
        expected = frames["end_frame_id"] - (frames.get("start_frame_id") or 0)
        if inputs["num_frames"] != expected:
            raise UserError(f"{prefix}num_frames is {inputs['num_frames']} but data.input_frames selects "
                            f"{expected} frames (end_frame_id - start_frame_id); the original runner took it from "
                            f"data.input_frames: make them agree or remove {prefix}num_frames")
    for key in FILLED_IN_FROM_DATA:
        inputs.pop(key, None)


def check_device_available(device):
    """The original examples set device "cuda"; without a CUDA GPU say so in one line instead of a torch error."""
    if isinstance(device, str) and device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"models.device is '{device}' but no CUDA GPU is available; set it to 'auto' (CUDA when "
                            "there is one, else the CPU) or 'cpu', e.g. --set models.device=auto")


# --- `diffsynth render script.py`: the config literal, read without running the script ----------------------------

MUTATING_METHODS = {"update", "setdefault", "pop", "popitem", "clear", "append", "extend", "insert", "remove"}


def config_from_script(path):
    """The config dict of an original-style script, read with `ast` and never executed (the originals download
    models at import time). The dict passed to `….run(NAME)`, else the last top-level `config = {...}`. UserError
    if it is not a plain literal, if the script runs several configs, or if it edits the config in Python."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config script not found: {path}")
    try:
        tree = ast.parse(read_text(path, "config script"), filename=str(path))
    except SyntaxError as error:
        raise UserError(f"{path} is not valid Python (line {error.lineno}: {error.msg})") from None
    run_calls = _runner_run_calls(tree)
    run_calls.sort(key=lambda node: node.lineno)
    if len(run_calls) > 1:
        where = ", ".join(f"{ast.unparse(call.args[0])} at line {call.lineno}" for call in run_calls)
        raise UserError(f"{path} runs {len(run_calls)} configs ({where}); `diffsynth render` renders one config "
                        f"without running the script: run it with `python {path.name}` (it renders through this "
                        "pipeline, resumably), or put each config in a file of its own")
    if run_calls and not isinstance(run_calls[0].args[0], ast.Name):
        argument = run_calls[0].args[0]
        return _literal(argument, path, "the config passed to .run()")
    name = run_calls[0].args[0].id if run_calls else "config"
    before = run_calls[0].lineno if run_calls else float("inf")
    assignments = [statement for statement in tree.body if _assigns_name(statement, name)
                   and statement.lineno < before]
    if not assignments:
        raise UserError(f"{path} has no top-level `{name} = {{...}}`; `diffsynth render` reads a script's config "
                        "literal without running the script (or give it a YAML/JSON config)")
    assignment = assignments[-1]
    _refuse_later_edits(tree, name, assignment, path)
    return _literal(assignment.value, path, f"`{name}` (line {assignment.lineno})")


def _is_runner(node):
    """`SDVideoPipelineRunner(...)` or `diffsynth.SDVideoPipelineRunner(...)`."""
    function = node.func if isinstance(node, ast.Call) else None
    name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
    return name == "SDVideoPipelineRunner"


def _runner_run_calls(tree):
    """The `….run(config)` calls on an SDVideoPipelineRunner (not e.g. `subprocess.run(...)`), in line order."""
    runner_names = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and _is_runner(node.value)
                    for target in node.targets if isinstance(target, ast.Name)}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "run" and len(node.args) == 1
             and (_is_runner(node.func.value)
                  or isinstance(node.func.value, ast.Name) and node.func.value.id in runner_names)]
    return sorted(calls, key=lambda node: node.lineno)


def _assigns_name(statement, name):
    if isinstance(statement, ast.Assign):
        return any(isinstance(target, ast.Name) and target.id == name for target in statement.targets)
    return isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) \
        and statement.target.id == name and statement.value is not None


def _literal(node, path, what):
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise UserError(f"{what} in {path} is not a plain literal (it computes something: "
                        f"{ast.unparse(node)[:60]}…); `diffsynth render` never runs a script: write the values out, "
                        f"or run it with `python {path.name}`") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} in {path} is a {type(value).__name__}, not a dict of config keys")
    return value


def _root_name(node):
    """`config["data"]["x"]` → "config": the variable a subscript or attribute chain starts from."""
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _refuse_later_edits(tree, name, assignment, path):
    """A script that changes its config in Python after the literal (the editing-signals example does) would be
    rendered wrongly from the literal alone: refuse it, naming the line."""
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) <= assignment.end_lineno:
            continue
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, ast.Delete) else [node.target]
        edited = any(isinstance(target, (ast.Subscript, ast.Attribute)) and _root_name(target) == name
                     for target in targets)
        edited = edited or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr in MUTATING_METHODS and _root_name(node.func.value) == name)
        if edited:
            raise UserError(f"{path} changes `{name}` in Python at line {node.lineno} after its literal (line "
                            f"{assignment.lineno}); `diffsynth render` reads the literal without running the script, "
                            f"so run it with `python {path.name}` instead (it renders through this pipeline)")


def load_script_config(path, overrides=()):
    """`diffsynth render script.py`: the script's config literal, converted and validated; relative paths against
    the current folder, as when the original runs the script."""
    return load_original_config(config_from_script(path), overrides)
