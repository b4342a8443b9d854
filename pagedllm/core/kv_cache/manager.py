"""KVCacheManager: each request's block table, prefix-cache hits, and copy-on-write of shared blocks."""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.core.kv_cache.block_pool import ROOT_HASH, BlockPool, hash_block


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps requests to KV-cache blocks of ``block_size`` tokens.

    The scheduler calls ``match_prefix`` once for a new request, ``allocate_slots`` every
    step before running it, ``fork`` to share a prefix with a new request, and ``free``
    when the request finishes or is preempted. Pure Python; O(blocks touched) per call.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}
        # Bumped whenever a request's table changes, so callers can tell a stale copy (a fresh
        # value each time: a freed and re-added id never reads as unchanged).
        self._table_versions: dict[str, int] = {}
        self._next_version = 0
        # Chain hash of each of the request's full blocks, in order: the parent hash of the next.
        self._block_hashes: dict[str, list[int]] = {}
        # Prompt tokens looked up in / found in the prefix cache.
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: free plus cached-but-unreferenced (evictable)."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    def block_table(self, req_id: str) -> list[int]:
        """A copy of the request's block ids, in order ([] if unknown)."""
        return list(self._block_tables.get(req_id, ()))

    def block_tables(self, req_ids: Sequence[str]) -> list[Sequence[int]]:
        """The block ids of each request, without copying: read them before the next allocation."""
        tables, empty = self._block_tables, ()
        return [tables.get(req_id, empty) for req_id in req_ids]

    def table_versions(self, req_ids: Sequence[str]) -> list[int]:
        """For each request a number that changes whenever its block table does (-1 if it has none)."""
        versions = self._table_versions
        return [versions.get(req_id, -1) for req_id in req_ids]

    def _changed(self, req_id: str) -> None:
        self._next_version += 1
        self._table_versions[req_id] = self._next_version

    def match_prefix(self, req_id: str, token_ids: Sequence[int]) -> int:
        """Give a new request the cached blocks matching its prompt; return the tokens they cover.

        Never covers the whole prompt: the last token is left to compute for its logits.
        """
        if self._block_tables.get(req_id):
            raise ValueError(f"match_prefix needs an empty block table, request {req_id!r} has one")
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        block_ids: list[int] = []
        block_hashes: list[int] = []
        parent_hash = ROOT_HASH
        for i in range((len(token_ids) - 1) // bs):
            block_hash = hash_block(parent_hash, token_ids[i * bs : (i + 1) * bs])
            block_id = self.block_pool.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
            parent_hash = hash(block_hash)
            block_hashes.append(parent_hash)
        for block_id in block_ids:
            self.block_pool.incref(block_id)
        self._block_tables[req_id] = block_ids
        self._block_hashes[req_id] = block_hashes
        self._changed(req_id)
        num_hit_tokens = len(block_ids) * bs
        self.num_prefix_queries += len(token_ids)
        self.num_prefix_hits += num_hit_tokens
        return num_hit_tokens

    def allocate_slots(
        self, req_id: str, token_ids: Sequence[int], num_computed_tokens: int, num_new_tokens: int
    ) -> list[tuple[int, int]] | None:
        """Make the table cover ``num_computed_tokens + num_new_tokens`` tokens.

        Returns the ``(src_block_id, dst_block_id)`` copies the runner must do first
        (copy-on-write of shared blocks the new tokens go into), or None, changing nothing,
        when there are not enough allocatable blocks.
        """
        bs = self.block_size
        num_tokens = num_computed_tokens + num_new_tokens
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {num_computed_tokens=} {num_new_tokens=}")
        if len(token_ids) < num_tokens:
            raise ValueError(f"request {req_id!r}: {len(token_ids)} token_ids, need {num_tokens}")
        table = self._block_tables.get(req_id, [])
        if num_computed_tokens > len(table) * bs:
            raise ValueError(
                f"request {req_id!r}: {num_computed_tokens} computed tokens but the block table covers {len(table) * bs}"
            )
        # Existing blocks the new tokens are written into; the rest of the range is new blocks.
        first_written = num_computed_tokens // bs
        end_written = min(_cdiv(num_tokens, bs), len(table)) if num_new_tokens else first_written
        written = range(first_written, end_written)
        num_shared = sum(1 for i in written if self.block_pool.ref_count(table[i]) > 1)
        num_appended = max(0, _cdiv(num_tokens, bs) - len(table))
        if num_shared + num_appended > self.num_free_blocks:
            return None

        table = self._block_tables.setdefault(req_id, table)
        self._changed(req_id)
        copies: list[tuple[int, int]] = []
        for i in written:
            block_id = table[i]
            if self.block_pool.ref_count(block_id) > 1:
                # Others still read this block; write into a private copy.
                new_block_id = self.block_pool.allocate()
                self.block_pool.decref(block_id)
                table[i] = new_block_id
                copies.append((block_id, new_block_id))
            else:
                # Only re-computation writes into a full block; whatever it writes, stale
                # contents must not stay findable. Re-hashed below once full again.
                self.block_pool.uncache(block_id)
        table.extend(self.block_pool.allocate() for _ in range(num_appended))
        if self.enable_prefix_caching:
            self._cache_full_blocks(req_id, table, token_ids, first_written, num_tokens // bs)
        return copies

    def has_free_slot(self, req_id: str, position: int) -> bool:
        """Whether the token at ``position`` can be written with nothing to allocate, copy or hash:
        it falls in a private block of the table that it does not fill (15 of 16 decode steps)."""
        table = self._block_tables.get(req_id)
        bs = self.block_size
        i = position // bs
        if not table or i >= len(table) or not (position + 1) % bs:
            return False
        block = self.block_pool.blocks[table[i]]
        return block.ref_count == 1 and block.block_hash is None

    def fork(self, parent_req_id: str, child_req_id: str, num_tokens: int) -> None:
        """Share the parent's blocks covering its first ``num_tokens`` tokens with a new child."""
        if parent_req_id == child_req_id:
            raise ValueError(f"cannot fork request {parent_req_id!r} into itself")
        if self._block_tables.get(child_req_id):
            raise ValueError(f"fork needs an empty block table, request {child_req_id!r} has one")
        parent_table = self._block_tables.get(parent_req_id, [])
        num_blocks = _cdiv(num_tokens, self.block_size)
        if num_tokens < 0 or num_blocks > len(parent_table):
            raise ValueError(
                f"cannot fork {num_tokens} tokens of request {parent_req_id!r}, "
                f"its block table covers {len(parent_table) * self.block_size}"
            )
        child_table = parent_table[:num_blocks]
        for block_id in child_table:
            self.block_pool.incref(block_id)
        self._block_tables[child_req_id] = child_table
        self._changed(child_req_id)
        parent_hashes = self._block_hashes.get(parent_req_id, [])
        self._block_hashes[child_req_id] = parent_hashes[: num_tokens // self.block_size]

    def free(self, req_id: str) -> None:
        """Release the request's blocks and forget it; unknown ids are ignored."""
        table = self._block_tables.pop(req_id, [])
        self._table_versions.pop(req_id, None)
        self._block_hashes.pop(req_id, None)
        # Tail first, so a sequence's tail is evicted before its head (which is more shareable).
        for block_id in reversed(table):
            self.block_pool.decref(block_id)

    def reset_prefix_cache(self) -> bool:
        """Drop the hashes of all unreferenced blocks; False if some block is still in use."""
        self.block_pool.reset()
        return self.num_free_blocks == self.num_blocks

    def _cache_full_blocks(
        self, req_id: str, table: list[int], token_ids: Sequence[int], first_written: int, num_full_blocks: int
    ) -> None:
        """Register the request's blocks that are full after this step in the prefix cache."""
        bs = self.block_size
        block_hashes = self._block_hashes.setdefault(req_id, [])
        # Blocks from ``first_written`` on get new contents: their old chain hashes are void.
        del block_hashes[first_written:]
        parent_hash = block_hashes[-1] if block_hashes else ROOT_HASH
        for i in range(len(block_hashes), num_full_blocks):
            block_hash = hash_block(parent_hash, token_ids[i * bs : (i + 1) * bs])
            self.block_pool.cache(table[i], block_hash)
            parent_hash = hash(block_hash)
            block_hashes.append(parent_hash)
