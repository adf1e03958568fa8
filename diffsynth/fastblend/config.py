"""FastBlend configuration (parameter names and defaults follow the original FastBlend tool)."""

from __future__ import annotations

from dataclasses import dataclass

INFERENCE_MODES = ("fast", "balanced", "accurate", "interpolation")
INITIALIZE_MODES = ("identity", "random")


@dataclass(frozen=True)
class FastBlendConfig:
    """Settings of one FastBlend smoothing run.

    inference_mode: "fast" (dyadic tables), "balanced" (warp every frame in the window to the target),
        "accurate" (balanced, but the patch error compares against the running mean), "interpolation"
        (only ``keyframe_ids`` have style frames; every frame is blended from its two neighbouring keyframes).
    window_size: frames on each side of the target that are blended into it.
    batch_size: how many (source, target) pairs one patch-match call processes at once.
    minimum_patch_size / num_iter: patch sizes per pyramid level go from
        ``minimum_patch_size + 2 * (num_iter - 1)`` down to ``minimum_patch_size`` in steps of 2.
    guide_weight: weight of the guide SSD against the style SSD in the patch error.
    initialize: initial nearest-neighbour field at the coarsest level, "identity" or "random".
    tracking_window_size: after each search step, try the matches of the sources up to this many places before
        and after in the batch (consecutive frames move alike), as the original; 0 = off.
    keyframe_ids: for "interpolation": indices of the frames that have a rendered style frame.
    """

    inference_mode: str = "fast"
    window_size: int = 60
    batch_size: int = 8
    minimum_patch_size: int = 5
    num_iter: int = 5
    guide_weight: float = 10.0
    initialize: str = "identity"
    tracking_window_size: int = 0
    keyframe_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES}, got {self.inference_mode!r}")
        if self.initialize not in INITIALIZE_MODES:
            raise ValueError(f"initialize must be one of {INITIALIZE_MODES}, got {self.initialize!r}")
        if self.window_size < 0:
            raise ValueError("window_size must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.minimum_patch_size < 1 or self.minimum_patch_size % 2 == 0:
            raise ValueError("minimum_patch_size must be a positive odd number")
        if self.num_iter < 1:
            raise ValueError("num_iter must be >= 1")
        if self.guide_weight < 0:
            raise ValueError("guide_weight must be >= 0")
        if self.tracking_window_size < 0:
            raise ValueError("tracking_window_size must be >= 0")
        # Normalise keyframe ids (lists from JSON/YAML are accepted) to a sorted tuple of unique ints.
        keys = tuple(sorted({int(k) for k in self.keyframe_ids}))
        object.__setattr__(self, "keyframe_ids", keys)
        if self.inference_mode == "interpolation" and not keys:
            raise ValueError('inference_mode "interpolation" needs at least one keyframe id')
        if keys and keys[0] < 0:
            raise ValueError("keyframe ids must be >= 0")

    @property
    def max_patch_size(self) -> int:
        return self.minimum_patch_size + 2 * (self.num_iter - 1)

    def patch_sizes(self) -> list[int]:
        """Patch size of each iteration at one pyramid level, largest first."""
        return [self.max_patch_size - 2 * i for i in range(self.num_iter)]
