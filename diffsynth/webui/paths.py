"""Path confinement and the file pickers' listings."""

import os
import re
from pathlib import Path

from ..errors import UserError

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
MODEL_SUFFIXES = {".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".sft"}
CONFIG_SUFFIXES = {".yaml", ".yml", ".json"}
KIND_NAMES = {"models": "models", "videos": "videos", "configs": "configs", "output": "output"}


def is_inside(path, root):
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


def confine(path, settings, kind, base=None):
    """The resolved absolute path if it lies inside one of the allowed folders for `kind`, else UserError.
    A relative path is taken relative to `base` (default: the first allowed folder of that kind)."""
    roots = settings.roots(kind)
    if path is None or str(path).strip() == "":
        raise UserError(f"no {kind} path given")
    text = str(path).strip()
    if "\x00" in text:
        raise UserError("a path must not contain NUL characters")
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = Path(base or roots[0]) / candidate
    try:
        resolved = candidate.resolve()  # follows symlinks: a link inside a root pointing outside is refused
    except (RuntimeError, OSError):  # a link loop
        raise UserError(f"{text} cannot be reached (a symbolic link loop); {what_to_do(kind, roots)}") from None
    for root in roots:
        if is_inside(resolved, Path(root).resolve()):
            return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise UserError(f"{text} is outside the allowed {kind} folders ({allowed}); {what_to_do(kind, roots)}")


def what_to_do(kind, roots):
    """The fix for a path outside the page's folders, in words: where to put the file, or which setting to change."""
    if kind == "output":
        return f"runs are made under {roots[0]}: give a run name, or set DIFFSYNTH_WEBUI_OUTPUT"
    return f"copy it into {roots[0]} or add that folder to DIFFSYNTH_WEBUI_{kind.upper()}"


def _walk(root, max_depth, keep, descend=lambda p: True):
    root = Path(root)
    if not root.is_dir():
        return
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if keep(entry):
                yield entry
            elif entry.is_dir() and depth + 1 < max_depth and descend(entry):
                stack.append((entry, depth + 1))


def list_videos(settings, max_depth=4):
    found = []
    for root in settings.videos:
        found += [p for p in _walk(root, max_depth, lambda p: p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES,
                                   descend=lambda p: p.name not in ("models",))]
    return sorted(set(str(p.resolve()) for p in found))


def is_model_folder(path):
    """A diffusers-style folder (a pipeline with model_index.json, or a single model with config.json)."""
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file())


def list_models(settings, max_depth=4):
    """Model files and diffusers model folders under the models folders (not descending into a model folder)."""
    found = []
    for root in settings.models:
        found += list(_walk(root, max_depth,
                            lambda p: is_model_folder(p) or (p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)))
    return sorted(set(str(p.resolve()) for p in found))


def list_configs(settings, max_depth=3):
    found = []
    for root in settings.roots("configs"):
        found += [p for p in _walk(root, max_depth, lambda p: p.is_file() and p.suffix.lower() in CONFIG_SUFFIXES,
                                   descend=lambda p: p.name not in ("cache", "frames", "models"))]
    return sorted(set(str(p.resolve()) for p in found))


def run_folder(settings, name):
    """The run folder for a run name typed in the page: directly under the output root, nothing else."""
    text = str(name or "").strip()
    if not text:
        raise UserError("give the run a name (its folder under the output root)")
    path = confine(text, settings, "output", base=settings.output)
    if path == settings.output:
        raise UserError("the run folder must be a folder under the output root, not the output root itself")
    if path.parent != Path(settings.output).resolve():  # `a/cache/b` would render inside run a's cache
        raise UserError(f"run name {text} is not one folder name: a run is a folder directly under "
                        f"{settings.output} (no '/'; a link there must not lead into another folder)")
    return path


def run_name(settings, run_dir):
    return str(Path(run_dir).resolve().relative_to(settings.output))


UPLOAD_LIMIT_MB = 2048  # keep in step with server.maxUploadSize in .streamlit/config.toml


def safe_file_name(name):
    """An uploaded file's name made safe to save: its last component, letters, digits, '-', '_', '.' only."""
    stem, suffix = Path(Path(str(name)).name).stem, Path(str(name)).suffix.lower()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "video"
    return stem[:100] + suffix


def save_upload(name, data, settings, limit_mb=UPLOAD_LIMIT_MB):
    """Save an uploaded video (bytes) into the first videos folder and return its path. A file of the same name
    and contents is reused; another file of that name gets a numbered name, so an upload never overwrites."""
    suffix = Path(str(name)).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"{name} is not a video file this page takes ({', '.join(sorted(VIDEO_SUFFIXES))})")
    if len(data) > limit_mb * 1024 * 1024:
        raise UserError(f"{name} is larger than {limit_mb} MB; copy it into {settings.videos[0]} instead")
    folder = Path(settings.videos[0])
    folder.mkdir(parents=True, exist_ok=True)
    file_name = safe_file_name(name)
    target = folder / file_name
    number = 1
    while target.exists():
        if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            return target
        target = folder / f"{Path(file_name).stem}-{number}{suffix}"
        number += 1
    temporary = target.with_name(f".{target.name}.part")
    temporary.write_bytes(data)
    os.replace(temporary, target)
    return target
