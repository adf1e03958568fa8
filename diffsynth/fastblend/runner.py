"""In-memory driver of a SmoothingPlan (tests, benchmarks, small clips)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import FastBlendConfig
from .plan import SmoothingPlan


class ListFrames:
    """FrameAccess over in-memory lists. ``style`` may hold None where no style frame exists (interpolation)."""

    def __init__(self, guide: Sequence[torch.Tensor], style: Sequence[torch.Tensor | None], device) -> None:
        self._guide, self._style, self._device = guide, style, torch.device(device)
        self.num_frames = len(guide)

    def guide(self, i: int) -> torch.Tensor:
        return self._guide[i].to(self._device, torch.float32)

    def style(self, i: int) -> torch.Tensor:
        frame = self._style[i]
        if frame is None:
            raise KeyError(f"no style frame {i}")
        return frame.to(self._device, torch.float32)


class DictTables:
    """TableAccess backed by a dict; stores tables as ``dtype`` (float16 by default, like the disk cache)."""

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype
        self.data: dict[str, torch.Tensor] = {}

    def put(self, key: str, value: torch.Tensor) -> None:
        self.data[key] = value.to(self.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self.data[key].float()

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def _expand_style(style, num_frames: int, config: FastBlendConfig):
    if len(style) == num_frames:
        return list(style)
    if config.inference_mode == "interpolation" and len(style) == len(config.keyframe_ids):
        full = [None] * num_frames
        for k, frame in zip(config.keyframe_ids, style):
            full[k] = frame
        return full
    raise ValueError(f"got {len(style)} style frames for {num_frames} guide frames")


def smooth_in_memory(
    guide: Sequence[torch.Tensor],
    style: Sequence[torch.Tensor | None],
    config: FastBlendConfig,
    device: torch.device | str = "cpu",
    table_dtype: torch.dtype = torch.float16,
    shot_starts: Sequence[int] = (0,),
) -> list[torch.Tensor]:
    """Run FastBlend on in-memory frames: guide and style are lists of (H, W, 3) tensors, 0..255.

    For "interpolation", ``style`` is either one entry per frame (None or anything at non-keyframes; only the
    keyframes are read) or one entry per keyframe id, in ``config.keyframe_ids`` order.
    Returns the smoothed frames, (H, W, 3) float32 on ``device``. Tables are dropped as soon as they are
    releasable and are stored as ``table_dtype`` in between, like the disk-backed pipeline does. ``shot_starts``:
    the first frame of each shot; no frame draws from another shot (SmoothingPlan).
    """
    num_frames = len(guide)
    frames = ListFrames(guide, _expand_style(style, num_frames, config), device)
    tables = DictTables(table_dtype)
    plan = SmoothingPlan(num_frames, config, device, shot_starts)
    output: list[torch.Tensor | None] = [None] * num_frames
    for position, key in enumerate(plan.unit_keys()):
        result = plan.compute(key, frames, tables)
        if key.startswith("frame/"):
            output[int(key.split("/")[1])] = result
        else:
            tables.put(key, result)
        for released in plan.newly_releasable(position + 1):
            tables.delete(released)
    return output  # type: ignore[return-value]
