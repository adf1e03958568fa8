"""DiffSynth Disk Cache: Diffutoon-style toon shading of long videos, with every intermediate on disk."""

__version__ = "0.1.0"
