"""Dyadic block bookkeeping of fast mode (pure integer logic, no tensors).

A block at level L with index j covers frames [j * 2^L, (j + 1) * 2^L - 1]. Forward tables store, for each
block, the mean of its style frames warped to the block's LAST frame; backward tables the mean warped to its
FIRST frame (this is the original's "reversed sequence", kept in original frame numbering so that the block
layout does not depend on the video length). Level-0 blocks are single style frames and are never stored.
"""

from __future__ import annotations

from typing import NamedTuple

FORWARD = "fwd"
BACKWARD = "bwd"


class Block(NamedTuple):
    direction: str
    level: int
    index: int

    @property
    def size(self) -> int:
        return 1 << self.level

    @property
    def first(self) -> int:
        return self.index << self.level

    @property
    def last(self) -> int:
        return self.first + self.size - 1

    @property
    def anchor(self) -> int:
        """The frame the block's blend is warped to."""
        return self.last if self.direction == FORWARD else self.first

    @property
    def key(self) -> str:
        return table_key(self.direction, self.level, self.index)

    def halves(self) -> tuple["Block", "Block"]:
        """(anchored half, other half): the half that shares this block's anchor, and the one that must be warped."""
        left = Block(self.direction, self.level - 1, 2 * self.index)
        right = Block(self.direction, self.level - 1, 2 * self.index + 1)
        return (right, left) if self.direction == FORWARD else (left, right)


def table_key(direction: str, level: int, index: int) -> str:
    return f"table/{direction}/{level}/{index:06d}"


def parse_table_key(key: str) -> Block:
    prefix, direction, level, index = key.split("/")
    if prefix != "table" or direction not in (FORWARD, BACKWARD):
        raise KeyError(f"not a table key: {key!r}")
    return Block(direction, int(level), int(index))


def max_level(window_size: int) -> int:
    """Largest L with 2^L <= window_size + 1: bigger blocks never fit in a query range."""
    return (window_size + 1).bit_length() - 1


def blocks_ending_at(first: int, last: int, top_level: int) -> list[Block]:
    """Split [first, last] into aligned forward blocks, greedily from ``last`` backwards (largest first)."""
    blocks = []
    end = last + 1  # exclusive
    while end > first:
        level = 0
        while level < top_level and end % (2 << level) == 0 and end - (2 << level) >= first:
            level += 1
        blocks.append(Block(FORWARD, level, (end >> level) - 1))
        end -= 1 << level
    return blocks


def blocks_starting_at(first: int, last: int, top_level: int) -> list[Block]:
    """Split [first, last] into aligned backward blocks, greedily from ``first`` forwards (largest first)."""
    blocks = []
    start = first
    while start <= last:
        level = 0
        while level < top_level and start % (2 << level) == 0 and start + (2 << level) - 1 <= last:
            level += 1
        blocks.append(Block(BACKWARD, level, start >> level))
        start += 1 << level
    return blocks


def table_dependencies(block: Block) -> list[Block]:
    """Stored tables that building ``block`` reads: the anchored half, unless it is a single frame."""
    anchored, _ = block.halves()
    return [anchored] if anchored.level >= 1 else []
