"""BlockPool: reference counts, the free list, and the LRU prefix cache of KV-cache blocks."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

#: Parent hash of a sequence's first block. ``hash()`` of a tuple never returns -1
#: (CPython reserves it as an error code), so no real block hash equals it.
ROOT_HASH = -1


class BlockHash(NamedTuple):
    """Key of a full block in the prefix cache: its parent's chain hash and its own tokens.

    The chain makes a block match only when its whole prefix matches. The dict lookup
    compares ``token_ids`` exactly, so only a 64-bit collision of two *parent* chain
    hashes could alias blocks, which we accept (as vLLM did with the builtin hash).
    Python's ``hash`` of a tuple of ints is stable across processes (no hash seed for ints).
    """

    parent_hash: int
    token_ids: tuple[int, ...]


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> BlockHash:
    """The prefix-cache key of a full block with these tokens after a block hashed ``parent_hash``."""
    return BlockHash(parent_hash, tuple(token_ids))


@dataclass(slots=True)
class Block:
    """One KV-cache block: how many block tables hold it, and its prefix-cache key if cached."""

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    """Hands out blocks and keeps unreferenced full blocks findable until they are evicted.

    Every block is in exactly one state:
    - free: ref 0, no hash, in ``free_block_ids``;
    - cached-evictable: ref 0, hashed, in ``evictable_block_ids`` (oldest first);
    - in use: ref >= 1 (hashed or not), in neither queue.
    A hashed block is always the value of its own key in ``cached_block_ids``.
    All operations are O(1) per block.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        # Insertion order is the LRU order: the first entry is evicted first.
        self.evictable_block_ids: OrderedDict[int, None] = OrderedDict()
        self.cached_block_ids: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``allocate`` can hand out now (free plus evictable)."""
        return len(self.free_block_ids) + len(self.evictable_block_ids)

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def allocate(self) -> int:
        """Take one block (ref 1): a free one if any, else evict the least recently used cached one."""
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        elif self.evictable_block_ids:
            block_id, _ = self.evictable_block_ids.popitem(last=False)
            self._drop_hash(self.blocks[block_id])
        else:
            raise RuntimeError("no free KV-cache block; check num_free_blocks before allocating")
        self.blocks[block_id].ref_count = 1
        return block_id

    def incref(self, block_id: int) -> None:
        """Add a reference; a cached block with ref 0 stops being evictable."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            # Only hashed blocks are handed out again while unreferenced.
            del self.evictable_block_ids[block_id]
        block.ref_count += 1

    def decref(self, block_id: int) -> None:
        """Drop a reference; at ref 0 a hashed block becomes the most recent evictable one."""
        block = self.blocks[block_id]
        if block.ref_count < 1:
            raise RuntimeError(f"block {block_id} freed more often than referenced")
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is None:
                self.free_block_ids.append(block_id)
            else:
                self.evictable_block_ids[block_id] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The cached block with this key, or None."""
        return self.cached_block_ids.get(block_hash)

    def cache(self, block_id: int, block_hash: BlockHash) -> None:
        """Make an in-use full block findable, unless an identical block already is."""
        block = self.blocks[block_id]
        if block_hash in self.cached_block_ids or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached_block_ids[block_hash] = block_id

    def uncache(self, block_id: int) -> None:
        """Make an in-use block unfindable, because its contents are about to change."""
        block = self.blocks[block_id]
        if block.ref_count < 1:
            raise RuntimeError(f"block {block_id} is not in use")
        self._drop_hash(block)

    def reset(self) -> None:
        """Forget every unreferenced cached block (in-use blocks keep their hashes)."""
        while self.evictable_block_ids:
            block_id, _ = self.evictable_block_ids.popitem(last=False)
            self._drop_hash(self.blocks[block_id])
            self.free_block_ids.append(block_id)

    def _drop_hash(self, block: Block) -> None:
        if block.block_hash is not None:
            del self.cached_block_ids[block.block_hash]
            block.block_hash = None
