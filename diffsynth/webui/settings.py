"""Which folders the web UI may read and write: models, videos, configs and the output root.

Every path typed or picked in the page must lie inside one of these (after resolving symlinks and `..`).
Configured by environment variables (os.pathsep-separated lists) or a small YAML settings file:

    DIFFSYNTH_WEBUI_MODELS   default: ./models and ./assets
    DIFFSYNTH_WEBUI_VIDEOS   default: ./videos and ./assets
    DIFFSYNTH_WEBUI_CONFIGS  default: ./configs and ./examples (the output root is always allowed too)
    DIFFSYNTH_WEBUI_OUTPUT   default: ./runs  (one folder: every run folder is created directly under it)
    DIFFSYNTH_WEBUI_SETTINGS a YAML file with keys models, videos, configs (lists) and output (one path);
                             default: ./webui-settings.yaml when it exists

Relative defaults are relative to the repository root; relative paths in the settings file to that file's folder;
relative paths in environment variables to the current folder. Environment variables win over the file.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import read_text
from ..demo import REPO_ROOT
from ..errors import UserError

ENV_PREFIX = "DIFFSYNTH_WEBUI_"
LIST_KEYS = ("models", "videos", "configs")


@dataclass
class Settings:
    models: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    configs: list = field(default_factory=list)
    output: Path = None
    # The Ray clusters a render may join (executor.address), from the server's own settings: never typed in the
    # page, since a Ray cluster answers with pickles and joining one runs what it sends.
    ray_addresses: list = field(default_factory=list)

    def roots(self, kind):
        """The allowed folders for one kind of path: models, videos, configs or output."""
        if kind == "output":
            return [self.output]
        if kind == "configs":
            return list(self.configs) + [self.output]
        return list(getattr(self, kind))


def default_settings():
    return Settings(models=[REPO_ROOT / "models", REPO_ROOT / "assets"],
                    videos=[REPO_ROOT / "videos", REPO_ROOT / "assets"],
                    configs=[REPO_ROOT / "configs", REPO_ROOT / "examples"],
                    output=REPO_ROOT / "runs")


def _resolve(value, base):
    return (Path(base) / Path(str(value)).expanduser()).resolve()


def load_settings(environ=None):
    environ = os.environ if environ is None else environ
    settings = default_settings()
    file = environ.get(ENV_PREFIX + "SETTINGS")
    file = Path(file) if file else REPO_ROOT / "webui-settings.yaml"
    if file.is_file():
        try:
            data = yaml.safe_load(read_text(file, "web UI settings")) or {}
        except yaml.YAMLError as error:
            raise UserError(f"web UI settings {file} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"web UI settings {file} must be a mapping (models, videos, configs, output)")
        unknown = set(data) - set(LIST_KEYS) - {"output", "ray_addresses"}
        if unknown:
            raise UserError(f"web UI settings {file}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in LIST_KEYS:
            if key in data:
                values = data[key] if isinstance(data[key], list) else [data[key]]
                setattr(settings, key, [_resolve(v, file.parent) for v in values])
        if "output" in data:
            settings.output = _resolve(data["output"], file.parent)
        if "ray_addresses" in data:
            values = data["ray_addresses"] if isinstance(data["ray_addresses"], list) else [data["ray_addresses"]]
            settings.ray_addresses = [str(v).strip() for v in values if str(v).strip()]
    for key in LIST_KEYS:
        value = environ.get(ENV_PREFIX + key.upper())
        if value:
            setattr(settings, key, [_resolve(v, Path.cwd()) for v in value.split(os.pathsep) if v])
    if environ.get(ENV_PREFIX + "RAY_ADDRESSES"):  # comma-separated: an address holds colons
        settings.ray_addresses = [v.strip() for v in environ[ENV_PREFIX + "RAY_ADDRESSES"].split(",") if v.strip()]
    if environ.get(ENV_PREFIX + "OUTPUT"):
        settings.output = _resolve(environ[ENV_PREFIX + "OUTPUT"], Path.cwd())
    settings.models = [Path(p).resolve() for p in settings.models]
    settings.videos = [Path(p).resolve() for p in settings.videos]
    settings.configs = [Path(p).resolve() for p in settings.configs]
    settings.output = Path(settings.output).resolve()
    return settings


def ensure_folders(settings):
    """Create the first videos folder and the output root on the page's first start, so an artist has a folder to
    copy videos into and the page's hints name a folder that exists."""
    for folder in (settings.videos[0], settings.output):
        Path(folder).mkdir(parents=True, exist_ok=True)
