"""FastBlend video deflickering (guided patch-match blending) in pure torch, split into resumable units.

Public API::

    from diffsynth.fastblend import FastBlendConfig, SmoothingPlan, smooth_in_memory
"""

from .config import FastBlendConfig
from .plan import FrameAccess, SmoothingPlan, TableAccess, frame_key, unit_seed
from .runner import smooth_in_memory

__all__ = [
    "FastBlendConfig",
    "FrameAccess",
    "SmoothingPlan",
    "TableAccess",
    "frame_key",
    "smooth_in_memory",
    "unit_seed",
]
