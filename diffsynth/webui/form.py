"""The render form, generated from the pydantic schema (RenderConfig): which widget each field gets, the widgets'
state keys, converting between a config dict and widget values, and validation with per-field errors.

Widget keys are "f:" + the dotted config key ("f:pipeline.pipeline_inputs.cfg_scale",
"f:models.controlnet_units.0.scale"); a list of sub-forms keeps its length under "n:" + the dotted key. Field errors
are keyed by the same dotted key, so the page can show each under its widget.
"""

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from ..config import SMOOTHER_SETTINGS, RenderConfig, Schema, error_line, map_paths, parse_config, path_kind
from ..errors import UserError
from .paths import confine, run_folder

TEXT_AREA_FIELDS = {"prompt", "negative_prompt"}


@dataclass
class FieldSpec:
    name: str
    kind: str            # section, list_section, int, float, bool, str, text, choice, str_list, number_list,
    #                      dict, word_or_numbers (a word of `choices` or a list of numbers: data.shots)
    optional: bool       # None is allowed
    required: bool       # no default in the schema
    default: Any         # the schema's default (None when required or None)
    description: str
    choices: tuple = ()
    model: type = None   # the sub-schema of a section or list_section
    models: tuple = ()   # a section that is one of several schemas: all of them (model is the default one)
    item_type: type = None
    path_kind: str = None
    constraints: dict = None

    @property
    def label(self):
        return self.name.replace("_", " ")


def _unwrap_optional(annotation):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _is_schema(annotation):
    return isinstance(annotation, type) and issubclass(annotation, Schema)


def _constraints(info):
    found = {}
    for item in info.metadata:
        for name in ("gt", "ge", "lt", "le"):
            value = getattr(item, name, None)
            if value is not None:
                found[name] = value
    return found


def field_spec(name, info):
    annotation, optional = _unwrap_optional(info.annotation)
    required = info.is_required()
    if info.default_factory is not None:
        default = info.default_factory()
    elif info.default is PydanticUndefined:
        default = None
    else:
        default = info.default
    spec = dict(name=name, optional=optional, required=required, default=default,
                description=info.description or "", constraints=_constraints(info), path_kind=path_kind(info))
    origin = typing.get_origin(annotation)
    if _is_schema(annotation):
        return FieldSpec(kind="section", model=annotation, **spec)
    if origin in (typing.Union, types.UnionType) and all(_is_schema(a) for a in typing.get_args(annotation)):
        models = typing.get_args(annotation)  # the smoother chain's config: FastBlendSettings | EnhanceSettings
        default_model = type(spec["default"]) if type(spec["default"]) in models else models[0]
        return FieldSpec(kind="section", model=default_model, models=models, **spec)
    if origin in (typing.Union, types.UnionType):
        words = [a for a in typing.get_args(annotation) if typing.get_origin(a) is Literal]
        lists = [a for a in typing.get_args(annotation) if typing.get_origin(a) is list]
        if words and lists:  # data.shots: a word (auto, none) or numbers (frame indices), in one box
            return FieldSpec(kind="word_or_numbers", choices=tuple(w for a in words for w in typing.get_args(a)),
                             **spec)
    if origin is Literal:
        return FieldSpec(kind="choice", choices=tuple(typing.get_args(annotation)), **spec)
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if _is_schema(item):
            return FieldSpec(kind="list_section", model=item, **spec)
        if item in (int, float):
            return FieldSpec(kind="number_list", item_type=item, **spec)
        return FieldSpec(kind="str_list", item_type=str, **spec)
    if annotation is bool:
        return FieldSpec(kind="bool", **spec)
    if annotation is int:
        return FieldSpec(kind="int", **spec)
    if annotation is float:
        return FieldSpec(kind="float", **spec)
    if annotation is dict or origin is dict:
        return FieldSpec(kind="dict", **spec)
    return FieldSpec(kind="text" if name in TEXT_AREA_FIELDS else "str", **spec)


def section_model(spec, sibling):
    """The schema a section follows. A section that is one of several schemas (a smoother's `config`) follows its
    sibling `processor_type`, as the config's own validation does; `sibling(name)` reads a sibling's value."""
    if not spec.models:
        return spec.model
    chosen = SMOOTHER_SETTINGS.get(sibling("processor_type"))
    return chosen if chosen in spec.models else spec.model


def fields_of(model):
    """The form fields of a schema class, in the schema's order."""
    return [field_spec(name, info) for name, info in model.model_fields.items()]


def walk(model=RenderConfig, prefix=()):
    """Every (dotted path, FieldSpec) of the schema, depth first; list sections contribute their item template
    with the index written as `*`."""
    for spec in fields_of(model):
        path = prefix + (spec.name,)
        yield path, spec
        if spec.kind == "section":
            for section in spec.models or (spec.model,):
                yield from walk(section, path)
        elif spec.kind == "list_section":
            yield from walk(spec.model, path + ("*",))


def dotted(path):
    return ".".join(str(part) for part in path)


def widget_key(path):
    return "f:" + dotted(path)


def count_key(path):
    return "n:" + dotted(path)


# --- config dict ↔ widget values ---------------------------------------------------------------------------------

def default_data(model=RenderConfig):
    """A config dict of the schema's defaults; required fields get an empty value of their type."""
    data = {}
    for spec in fields_of(model):
        if spec.kind == "section":
            data[spec.name] = spec.default.model_dump() if spec.default is not None else default_data(spec.model)
        elif spec.kind == "list_section":
            data[spec.name] = None if spec.optional and spec.default is None else list(spec.default or [])
        elif not spec.required:
            data[spec.name] = spec.default
        elif spec.kind == "choice":
            data[spec.name] = spec.choices[0]
        elif spec.kind in ("str_list", "number_list"):
            data[spec.name] = []
        elif spec.kind in ("str", "text"):
            data[spec.name] = ""
        else:
            data[spec.name] = None
    return data


def _format_number_list(values):
    return ", ".join(str(v) for v in values or [])


def to_widget_value(spec, value):
    if spec.kind == "text" and isinstance(value, dict):  # prompt travel: one "frame: prompt" line per key
        return yaml.safe_dump({int(k): v for k, v in value.items()}, sort_keys=True, allow_unicode=True,
                              width=10_000).strip()
    if spec.kind in ("str", "text"):
        return "" if value is None else str(value)
    if spec.kind == "int":
        return None if value is None else int(value) if isinstance(value, (int, float)) and not isinstance(
            value, bool) and float(value).is_integer() else value
    if spec.kind == "float":
        return None if value is None else float(value) if isinstance(value, (int, float)) else value
    if spec.kind == "bool":
        return bool(value)
    if spec.kind == "str_list":
        return [str(v) for v in (value or [])]
    if spec.kind in ("number_list", "word_or_numbers"):
        return _format_number_list(value) if isinstance(value, list) else str(value or "")
    if spec.kind == "dict":
        return yaml.safe_dump(value, sort_keys=False).strip() if value else ""
    return value  # choice


def prompt_travel(text):
    """{frame: prompt} when a prompt box holds only "frame: prompt" lines (prompt travel), else None."""
    if not isinstance(text, str) or ":" not in text:
        return None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if isinstance(parsed, dict) and parsed and all(isinstance(k, int) and isinstance(v, str)
                                                    for k, v in parsed.items()):
        return parsed
    return None


def from_widget_value(spec, value):
    """The config value for a widget value; text that does not parse is passed on as-is, so the schema's own
    validation reports it under this field."""
    if spec.kind == "text":
        travel = prompt_travel(value)
        if travel is not None:
            return travel
    if spec.kind in ("str", "text"):
        value = "" if value is None else value
        return None if spec.optional and value.strip() == "" else value
    if spec.kind == "word_or_numbers" and (value or "").strip() in spec.choices:
        return value.strip()
    if spec.kind in ("number_list", "word_or_numbers"):
        text = (value or "").strip()
        if not text:
            return []
        try:
            parsed = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        except yaml.YAMLError:
            return text
        return parsed
    if spec.kind == "dict":
        text = (value or "").strip()
        if not text:
            return {}
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return {} if parsed is None else parsed
    if spec.kind == "str_list":
        return list(value or [])
    return value


def state_from_data(data, model=RenderConfig, prefix=()):
    """Widget state (key → value) for a config dict; missing keys get the schema's defaults."""
    data = data if isinstance(data, dict) else {}
    defaults = default_data(model)
    state = {}
    for spec in fields_of(model):
        path = prefix + (spec.name,)
        value = data.get(spec.name, defaults.get(spec.name))
        if spec.kind == "section":
            section = section_model(spec, lambda name: data.get(name, defaults.get(name)))
            state.update(state_from_data(value, section, path))
        elif spec.kind == "list_section":
            items = value if isinstance(value, list) else []
            state[count_key(path)] = len(items)
            for index, item in enumerate(items):
                state.update(state_from_data(item, spec.model, path + (index,)))
        else:
            state[widget_key(path)] = to_widget_value(spec, value)
    return state


def data_from_state(state, model=RenderConfig, prefix=()):
    """The config dict the widget state describes (before validation)."""
    defaults = default_data(model)
    data = {}
    for spec in fields_of(model):
        path = prefix + (spec.name,)
        if spec.kind == "section":
            section = section_model(spec, lambda name: state.get(widget_key(prefix + (name,)), defaults.get(name)))
            data[spec.name] = data_from_state(state, section, path)
        elif spec.kind == "list_section":
            count = int(state.get(count_key(path), 0) or 0)
            items = [data_from_state(state, spec.model, path + (index,)) for index in range(count)]
            data[spec.name] = None if spec.optional and not items else items
        else:
            key = widget_key(path)
            if key in state:
                data[spec.name] = from_widget_value(spec, state[key])
            else:
                data[spec.name] = defaults.get(spec.name)
    return data


def list_items(state, path, model):
    count = int(state.get(count_key(path), 0) or 0)
    return [data_from_state(state, model, path + (index,)) for index in range(count)]


def _replace_list(state, path, model, items):
    old = int(state.get(count_key(path), 0) or 0)
    prefix = widget_key(path) + "."
    for key in [k for k in list(state.keys()) if str(k).startswith(prefix)]:
        tail = key[len(prefix):].split(".", 1)[0]
        if tail.isdigit() and int(tail) >= len(items) and int(tail) < max(old, len(items)) + 1:
            del state[key]
    for index, item in enumerate(items):
        for key, value in state_from_data(item, model, path + (index,)).items():
            state[key] = value
    state[count_key(path)] = len(items)


def add_list_item(state, path, model, item=None):
    items = list_items(state, path, model)
    items.append(item if item is not None else default_data(model))
    _replace_list(state, path, model, items)


def remove_list_item(state, path, model, index):
    items = list_items(state, path, model)
    del items[index]
    _replace_list(state, path, model, items)


# --- paths and validation -----------------------------------------------------------------------------------------

def resolve_relative_paths(data, base_folder):
    """Make relative paths in a loaded config dict absolute against `base_folder` (as load_config does), leaving
    bad values alone for validation to report."""
    def absolute(value, kind, key):
        if kind == "output" or not value.strip():
            return value
        return str((Path(base_folder) / Path(value).expanduser()).resolve())

    return map_paths(data, absolute)


def confine_paths(data, settings, base=None):
    """Every path-typed field of a config dict (found by walking the schema) resolved and checked against its
    allowed folders. A relative path is taken relative to `base`, the folder of the config file the render will
    read (exactly as the render resolves it), or, for the page's form (base None), to its kind's first folder.
    The output folder must be a folder directly under the output root. Returns (a copy of the dict with every
    checked path made absolute, {dotted key: message}): launch or save the copy, which is what was checked."""
    errors = {}
    data = yaml.safe_load(yaml.safe_dump(data))
    address = (data.get("executor") or {}).get("address") if isinstance(data.get("executor"), dict) else None
    if address not in (None, "") and address not in settings.ray_addresses:
        allowed = ", ".join(settings.ray_addresses) or "none"
        errors["executor.address"] = (f"Ray cluster {address} is not one of this server's ({allowed}); the page "
                                      "joins only the clusters in its settings (ray_addresses in "
                                      "webui-settings.yaml, or DIFFSYNTH_WEBUI_RAY_ADDRESSES)")

    def check(value, kind, key):
        if not value.strip():
            return value
        try:
            if kind == "output":
                if base is not None and not Path(value).expanduser().is_absolute():
                    value = str(Path(base) / value)
                return str(run_folder(settings, value))
            return str(confine(value, settings, kind, base=base))
        except UserError as error:
            errors[key] = str(error)
            return value

    return map_paths(data, check), errors


def path_errors(data, settings, base=None):
    """{dotted key: message} for every path outside its allowed folders (see confine_paths)."""
    return confine_paths(data, settings, base)[1]


def with_output_folder(data, settings):
    """A copy of the form's config dict with output_folder (a run name) made the absolute run folder."""
    data = yaml.safe_load(yaml.safe_dump(data))
    name = (data.get("data") or {}).get("output_folder")
    try:
        data["data"]["output_folder"] = str(run_folder(settings, name))
    except (UserError, KeyError, TypeError):
        pass
    return data


def validate(data, settings):
    """Validate a form's config dict the way the CLI does (parse_config) plus path confinement.
    Returns (RenderConfig or None, {dotted key: [messages]}); "" is the key of whole-config errors."""
    errors = {}
    absolute, problems = confine_paths(data, settings)
    for key, message in problems.items():
        errors.setdefault(key, []).append(message)
    absolute = with_output_folder(absolute, settings)
    try:
        RenderConfig.model_validate(absolute)
    except ValidationError as error:
        for item in error.errors():
            errors.setdefault(dotted(item["loc"]), []).append(error_line(item))
    if errors:
        return None, errors
    try:
        return parse_config(absolute), {}
    except UserError as error:  # not expected: the same validation passed above
        return None, {"": [str(error)]}


def errors_for(errors, path, leaf=True):
    """Messages for one widget: its own key, and for a leaf widget also its items' keys (model_list.1)."""
    key = dotted(path)
    found = list(errors.get(key, []))
    if leaf:
        for other, messages in errors.items():
            if other.startswith(key + ".") and other[len(key) + 1:].split(".")[0].isdigit():
                found += messages
    return found


def config_yaml(config_or_data):
    data = config_or_data.model_dump() if hasattr(config_or_data, "model_dump") else config_or_data
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def load_config_text(text, base_folder):
    """A config file's text → (form data, [problems]); problems do not stop loading (the form shows them)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(f"not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError("a config must be a mapping of keys (models, data, pipeline, …)")
    data = resolve_relative_paths(data, base_folder)
    problems = []
    try:
        parse_config(data)
    except UserError as error:
        problems = str(error).split("; ")
    return data, problems


def output_as_run_name(data, settings):
    """The form shows output_folder as a run name under the output root: an absolute folder inside the root becomes
    its relative name, one elsewhere its last component (the run is then made under the output root)."""
    section = data.get("data") if isinstance(data, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("output_folder"), str):
        return data
    value = section["output_folder"].strip()
    path = Path(value).expanduser()
    if path.is_absolute():
        resolved = path.resolve()
        try:
            section["output_folder"] = str(resolved.relative_to(settings.output))
        except ValueError:
            section["output_folder"] = resolved.name
    else:
        section["output_folder"] = Path(value).name if ".." in Path(value).parts else value
    return data
