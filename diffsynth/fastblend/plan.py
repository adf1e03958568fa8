"""SmoothingPlan: FastBlend split into small deterministic units of work.

A unit is either a target frame ("frame/{i:06d}") or, in fast mode, one dyadic table ("table/fwd/{L}/{j:06d}",
"table/bwd/{L}/{j:06d}"). ``unit_keys()`` lists them in an execution order that keeps the set of live tables
bounded by the window (tables are produced just before the first frame that needs them and are releasable right
after the last one). Each unit reads only frames inside its window and the tables in ``needed_tables(key)``.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Protocol

import torch

from . import blocks as blk
from .config import FastBlendConfig
from .patch_match import PatchMatchParams, warp

FRAME_PREFIX = "frame/"


class FrameAccess(Protocol):
    num_frames: int

    def guide(self, i: int) -> torch.Tensor: ...  # (H, W, 3) float32, 0..255, on the plan's device

    def style(self, i: int) -> torch.Tensor: ...  # same


class TableAccess(Protocol):
    def get(self, key: str) -> torch.Tensor: ...


def frame_key(i: int) -> str:
    return f"{FRAME_PREFIX}{i:06d}"


def parse_frame_key(key: str) -> int:
    if not key.startswith(FRAME_PREFIX):
        raise KeyError(f"not a frame key: {key!r}")
    return int(key[len(FRAME_PREFIX) :])


def unit_seed(key: str, call: int) -> int:
    """Seed of the ``call``-th patch-match call of a unit: a stable hash (not Python's salted hash())."""
    digest = hashlib.sha256(f"{key}#{call}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class SmoothingPlan:
    """FastBlend over ``num_frames`` frames. ``shot_starts``: the first frame of each shot of the video; every unit
    draws its frames from its own shot only (a frame's window, a table's block and the keyframes a frame is
    interpolated from all stop at the cuts), as if each shot were a video of its own. One shot (the default) is the
    original's plan."""

    def __init__(self, num_frames: int, config: FastBlendConfig, device: torch.device | str = "cpu",
                 shot_starts: Sequence[int] = (0,)) -> None:
        if num_frames < 1:
            raise ValueError("num_frames must be >= 1")
        self.num_frames = num_frames
        self.config = config
        self.device = torch.device(device)
        self.shot_starts = sorted({0, *shot_starts})
        if self.shot_starts[-1] >= num_frames:
            raise ValueError(f"shot start {self.shot_starts[-1]} out of range for {num_frames} frames")
        self.params = PatchMatchParams(
            minimum_patch_size=config.minimum_patch_size,
            num_iter=config.num_iter,
            guide_weight=config.guide_weight,
            initialize=config.initialize,
            tracking_window_size=config.tracking_window_size,
        )
        self.top_level = blk.max_level(config.window_size)
        if config.inference_mode == "interpolation":
            self.keyframes = config.keyframe_ids
            if self.keyframes[-1] >= num_frames:
                raise ValueError(f"keyframe id {self.keyframes[-1]} out of range for {num_frames} frames")
            for first, end in self.shots():
                if not self._shot_keyframes(first):
                    raise ValueError(f"the shot of frames {first} to {end - 1} holds no keyframe (interpolation "
                                     "draws each frame from keyframes of its own shot)")
        self._keys = self._build_order()
        self._position = {key: i for i, key in enumerate(self._keys)}
        self._build_release_schedule()

    # ----------------------------------------------------------------------------------------------------------
    # Unit order and bookkeeping

    def shots(self) -> list[tuple[int, int]]:
        """[(first, end)] of each shot."""
        bounds = self.shot_starts + [self.num_frames]
        return list(zip(bounds, bounds[1:]))

    def _shot(self, t: int) -> tuple[int, int]:
        """(first, last) frame of frame ``t``'s shot."""
        position = bisect.bisect_right(self.shot_starts, t) - 1
        bounds = self.shot_starts + [self.num_frames]
        return bounds[position], bounds[position + 1] - 1

    def _window(self, t: int) -> tuple[int, int]:
        w = self.config.window_size
        first, last = self._shot(t)
        return max(first, t - w), min(last, t + w)

    def _shot_keyframes(self, t: int) -> tuple[int, ...]:
        """Interpolation: the keyframes of frame ``t``'s shot."""
        first, last = self._shot(t)
        return self.keyframes[bisect.bisect_left(self.keyframes, first) : bisect.bisect_right(self.keyframes, last)]

    def _query_blocks(self, t: int) -> tuple[list[blk.Block], list[blk.Block]]:
        """Fast mode: forward blocks covering [t - window, t] and backward blocks covering [t, t + window]."""
        first, last = self._window(t)
        return (
            blk.blocks_ending_at(first, t, self.top_level),
            blk.blocks_starting_at(t, last, self.top_level),
        )

    def _build_order(self) -> list[str]:
        if self.config.inference_mode != "fast":
            return [frame_key(t) for t in range(self.num_frames)]
        order: list[str] = []
        emitted: set[str] = set()

        def emit(block: blk.Block) -> None:
            if block.level == 0 or block.key in emitted:
                return
            for dependency in blk.table_dependencies(block):
                emit(dependency)
            emitted.add(block.key)
            order.append(block.key)

        for t in range(self.num_frames):
            forward, backward = self._query_blocks(t)
            for block in forward + backward:
                emit(block)
            order.append(frame_key(t))
        return order

    def _build_release_schedule(self) -> None:
        last_use: dict[str, int] = {}
        for position, key in enumerate(self._keys):
            for table in self.needed_tables(key):
                last_use[table] = position
        # A table may be released once every unit up to and including its last reader is done.
        schedule = sorted((position + 1, self._position[table], table) for table, position in last_use.items())
        self._release_at = [release for release, _, _ in schedule]
        self._release_keys = [table for _, _, table in schedule]

    def unit_keys(self) -> list[str]:
        return list(self._keys)

    def needed_tables(self, key: str) -> list[str]:
        if key.startswith(FRAME_PREFIX):
            t = parse_frame_key(key)
            if self.config.inference_mode != "fast":
                return []
            forward, backward = self._query_blocks(t)
            return [block.key for block in forward + backward if block.level >= 1]
        return [dependency.key for dependency in blk.table_dependencies(blk.parse_table_key(key))]

    def needed_frames(self, key: str) -> list[int]:
        """The frames (guide and style) a unit may read: its window for a target frame, its block for a table."""
        if not key.startswith(FRAME_PREFIX):
            block = blk.parse_table_key(key)
            return list(range(block.first, block.last + 1))
        t = parse_frame_key(key)
        if self.config.inference_mode != "interpolation":
            first, last = self._window(t)
            return list(range(first, last + 1))
        keys = self._shot_keyframes(t)
        position = bisect.bisect_left(keys, t)
        neighbours = keys[max(0, position - 1) : position + 1]
        return sorted({t, *neighbours})

    def releasable_after(self, done_keys_prefix_len: int) -> list[str]:
        """Table keys that no unit at position >= done_keys_prefix_len needs any more (all of them, not only the
        newly releasable ones). The result for n is always a prefix of the result for n + 1, ordered by the
        position after which each table became releasable."""
        return self._release_keys[: bisect.bisect_right(self._release_at, done_keys_prefix_len)]

    def newly_releasable(self, done_keys_prefix_len: int) -> list[str]:
        """Table keys that become releasable exactly when the first ``done_keys_prefix_len`` units are done."""
        n = done_keys_prefix_len
        return self._release_keys[bisect.bisect_left(self._release_at, n) : bisect.bisect_right(self._release_at, n)]

    # ----------------------------------------------------------------------------------------------------------
    # Computation

    def compute(self, key: str, frames: FrameAccess, tables: TableAccess) -> torch.Tensor:
        if key not in self._position:
            raise KeyError(f"unknown unit {key!r}")
        if key.startswith(FRAME_PREFIX):
            t = parse_frame_key(key)
            mode = self.config.inference_mode
            if mode == "balanced":
                return self._balanced(key, t, frames)
            if mode == "accurate":
                return self._accurate(key, t, frames)
            if mode == "interpolation":
                return self._interpolation(key, t, frames)
            return self._fast_frame(key, t, frames, tables)
        return self._fast_table(key, blk.parse_table_key(key), frames, tables)

    def _frame(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=torch.float32)

    def _warp_to(self, key, target: int, sources, frames, style_error="remap", first_call=0):
        """Warp (source_guide, source_style) pairs onto frame ``target``'s guide, ``batch_size`` at a time (pairs of
        sources stay together with the pairwise error). Yields one (b, H, W, 3) tensor per batch."""
        target_guide = self._frame(frames.guide(target))
        batch_size = self.config.batch_size
        if style_error == "pairwise":
            batch_size += batch_size % 2
        for call, start in enumerate(range(0, len(sources), batch_size), start=first_call):
            chunk = sources[start : start + batch_size]
            guides = torch.stack([self._frame(g) for g, _ in chunk])
            styles = torch.stack([self._frame(s) for _, s in chunk])
            yield warp(guides, target_guide, styles, style_error, self.params, unit_seed(key, call))

    def _balanced(self, key: str, t: int, frames: FrameAccess) -> torch.Tensor:
        first, last = self._window(t)
        total = self._frame(frames.style(t)).clone()
        sources = [s for s in range(first, last + 1) if s != t]
        for chunk_start in range(0, len(sources), self.config.batch_size):
            # Load only one batch of source frames at a time.
            chunk = sources[chunk_start : chunk_start + self.config.batch_size]
            pairs = [(frames.guide(s), frames.style(s)) for s in chunk]
            for warped in self._warp_to(key, t, pairs, frames, first_call=chunk_start):
                total += warped.sum(dim=0)
        return total / (len(sources) + 1)

    def _accurate(self, key: str, t: int, frames: FrameAccess) -> torch.Tensor:
        """As the original's accurate mode: every frame of the window, the target itself included, is warped to
        the target in batches whose patch error compares against the mean of the batch's own remaps (recomputed
        for every candidate match); the result is the mean of all the remaps."""
        first, last = self._window(t)
        sources = list(range(first, last + 1))
        total = None
        for chunk_start in range(0, len(sources), self.config.batch_size):
            chunk = sources[chunk_start : chunk_start + self.config.batch_size]
            pairs = [(frames.guide(s), frames.style(s)) for s in chunk]
            for warped in self._warp_to(key, t, pairs, frames, "mean", first_call=chunk_start):
                total = warped.sum(dim=0) if total is None else total + warped.sum(dim=0)
        return total / len(sources)

    def _interpolation(self, key: str, t: int, frames: FrameAccess) -> torch.Tensor:
        """As the original's interpolation mode: a frame between keyframes l and r is the blend of both keyframes'
        styles warped to it, matched together (the pairwise error: the two warps must agree), weighted by
        distance; before the first and after the last keyframe, that keyframe warped (paired with itself). The
        keyframes are those of the frame's own shot: each shot has its own first and last."""
        keys = self._shot_keyframes(t)
        if t in keys:
            return self._frame(frames.style(t)).clone()
        position = bisect.bisect_left(keys, t)
        left = keys[max(position - 1, 0)]
        right = keys[min(position, len(keys) - 1)]
        pairs = [(frames.guide(left), frames.style(left)), (frames.guide(right), frames.style(right))]
        warped_left, warped_right = next(self._warp_to(key, t, pairs, frames, "pairwise"))
        if left == right:
            return warped_left
        return (warped_left * (right - t) + warped_right * (t - left)) / (right - left)

    def _block_value(self, block: blk.Block, frames: FrameAccess, tables: TableAccess) -> torch.Tensor:
        """A block's blend at its anchor: the style frame itself for level 0, else the stored table."""
        if block.level == 0:
            return self._frame(frames.style(block.anchor))
        return self._frame(tables.get(block.key))

    def _fast_table(self, key: str, block: blk.Block, frames: FrameAccess, tables: TableAccess) -> torch.Tensor:
        anchored, other = block.halves()
        total = self._block_value(anchored, frames, tables) * anchored.size
        sources = list(range(other.first, other.last + 1))
        for chunk_start in range(0, len(sources), self.config.batch_size):
            chunk = sources[chunk_start : chunk_start + self.config.batch_size]
            pairs = [(frames.guide(s), frames.style(s)) for s in chunk]
            for warped in self._warp_to(key, block.anchor, pairs, frames, first_call=chunk_start):
                total += warped.sum(dim=0)
        return total / block.size

    def _fast_frame(self, key: str, t: int, frames: FrameAccess, tables: TableAccess) -> torch.Tensor:
        forward, backward = self._query_blocks(t)
        weight_left = sum(block.size for block in forward)
        weight_right = sum(block.size for block in backward)
        total = -self._frame(frames.style(t))  # counted once in each direction; keep it once
        to_warp = []
        for block in forward + backward:
            value = self._block_value(block, frames, tables)
            if block.anchor == t:
                total += value * block.size
            else:
                to_warp.append((block, value))
        pairs = [(frames.guide(block.anchor), value) for block, value in to_warp]
        sizes = [block.size for block, _ in to_warp]
        offset = 0
        for warped in self._warp_to(key, t, pairs, frames):
            weights = torch.tensor(sizes[offset : offset + len(warped)], dtype=torch.float32, device=self.device)
            total += (warped * weights.view(-1, 1, 1, 1)).sum(dim=0)
            offset += len(warped)
        return total / (weight_left + weight_right - 1)
