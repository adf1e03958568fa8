"""DiffSynth Disk Cache: Diffutoon-style toon shading of long videos, with every intermediate on disk."""

__version__ = "0.1.0"

# The original Diffutoon scripts do `from diffsynth import SDVideoPipelineRunner, download_models`. Both live in
# diffsynth/diffutoon.py and are imported on first use, so `import diffsynth` stays light.
_DIFFUTOON_NAMES = ("SDVideoPipelineRunner", "download_models")


def __getattr__(name):
    if name in _DIFFUTOON_NAMES:
        from . import diffutoon
        return getattr(diffutoon, name)
    raise AttributeError(f"module 'diffsynth' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_DIFFUTOON_NAMES))
