"""Tests of the paged KV-cache block manager: exact block tables, then allocator invariants."""

from __future__ import annotations

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedllm.core.kv_cache import KVCacheManager


def prefill(manager: KVCacheManager, req_id: str, token_ids: list[int]) -> int:
    """Schedule a whole prompt the way the scheduler does: prefix lookup, then one allocation."""
    num_hit_tokens = manager.match_prefix(req_id, token_ids)
    assert manager.allocate_slots(req_id, token_ids, num_hit_tokens, len(token_ids) - num_hit_tokens) == []
    return num_hit_tokens


def refs(manager: KVCacheManager) -> list[int]:
    return [block.ref_count for block in manager.block_pool.blocks]


# --- exact block tables ---------------------------------------------------------------------


def test_allocation_fills_blocks_in_order():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    token_ids = list(range(13))
    assert manager.allocate_slots("a", token_ids, 0, 10) == []
    assert manager.block_table("a") == [0, 1, 2]
    assert manager.num_free_blocks == 5
    assert manager.usage == 3 / 8
    # Positions 10 and 11 still fit in block 2; position 12 needs a new block.
    assert manager.allocate_slots("a", token_ids, 10, 2) == []
    assert manager.block_table("a") == [0, 1, 2]
    assert manager.allocate_slots("a", token_ids, 12, 1) == []
    assert manager.block_table("a") == [0, 1, 2, 3]
    assert manager.allocate_slots("b", [7] * 5, 0, 5) == []
    assert manager.block_table("b") == [4, 5]
    assert manager.block_table("unknown") == []
    manager.free("a")
    manager.free("b")
    manager.free("unknown")
    assert manager.usage == 0.0
    assert manager.num_free_blocks == 8


def test_prefix_hit_shares_full_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    assert prefill(manager, "a", prompt) == 0
    assert manager.block_table("a") == [0, 1, 2]
    assert prefill(manager, "b", prompt) == 8
    assert manager.block_table("b") == [0, 1, 3]
    assert refs(manager)[:4] == [2, 2, 1, 1]
    assert (manager.num_prefix_queries, manager.num_prefix_hits) == (20, 8)
    # Unreferenced cached blocks stay findable.
    manager.free("a")
    manager.free("b")
    assert manager.usage == 0.0
    assert manager.match_prefix("c", prompt) == 8
    assert manager.block_table("c") == [0, 1]
    assert manager.num_free_blocks == 6


def test_prefix_hit_leaves_the_last_prompt_token_to_compute():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prefill(manager, "a", list(range(8)))
    assert manager.match_prefix("b", list(range(8))) == 4
    assert manager.match_prefix("c", list(range(9))) == 8
    assert manager.match_prefix("d", list(range(1))) == 0
    assert manager.match_prefix("e", []) == 0


def test_prefix_match_follows_the_hash_chain():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prefill(manager, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Same second block after a different first block: no match at all.
    assert manager.match_prefix("b", [0, 0, 0, 0, 5, 6, 7, 8, 9]) == 0
    # Same first block, different second block: only the first matches.
    assert manager.match_prefix("c", [1, 2, 3, 4, 0, 6, 7, 8, 9]) == 4
    assert manager.block_table("c") == [0]
    # Both blocks are cached, but not one after the other: only the first matches.
    prefill(manager, "d", [0, 0, 0, 0, 9, 9, 9, 9, 9])
    assert manager.match_prefix("e", [0, 0, 0, 0, 5, 6, 7, 8, 9]) == 4
    assert manager.block_table("e") == manager.block_table("d")[:1]


def test_identical_blocks_are_cached_once():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    # Both computed side by side without a lookup: b's blocks are duplicates.
    manager.allocate_slots("a", prompt, 0, 9)
    manager.allocate_slots("b", prompt, 0, 9)
    assert manager.block_table("b") == [3, 4, 5]
    assert sorted(manager.block_pool.cached_block_ids.values()) == [0, 1]
    manager.free("a")
    manager.free("b")
    assert list(manager.block_pool.evictable_block_ids) == [1, 0]
    assert list(manager.block_pool.free_block_ids) == [6, 7, 2, 5, 4, 3]


def test_lru_eviction_takes_free_blocks_first_then_oldest_tail_first():
    manager = KVCacheManager(num_blocks=5, block_size=2)
    prefill(manager, "a", [1, 2, 3, 4, 5, 6])  # three full blocks, all cached
    prefill(manager, "b", [7, 8])
    assert manager.block_table("a") == [0, 1, 2]
    assert manager.block_table("b") == [3]
    manager.free("a")
    manager.free("b")
    assert list(manager.block_pool.evictable_block_ids) == [2, 1, 0, 3]
    # A hit makes blocks most recently used again once freed.
    assert manager.match_prefix("c", [1, 2, 3, 4, 5]) == 4
    manager.free("c")
    assert list(manager.block_pool.evictable_block_ids) == [2, 3, 1, 0]
    # The one free block goes first, then evictions in LRU order.
    manager.allocate_slots("d", [9] * 6, 0, 6)
    assert manager.block_table("d") == [4, 2, 3]
    assert manager.match_prefix("e", [7, 8, 0]) == 0
    assert manager.match_prefix("f", [1, 2, 3, 4, 5, 6, 0]) == 4
    assert manager.block_table("f") == [0, 1]


def test_fork_then_write_into_shared_block_copies_it():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prefill(manager, "p", [1, 2, 3, 4, 5, 6])
    manager.fork("p", "c", 6)
    assert manager.block_table("c") == [0, 1]
    assert refs(manager)[:2] == [2, 2]
    # The child writes position 6 into the shared, partly filled block 1.
    assert manager.allocate_slots("c", [1, 2, 3, 4, 5, 6, 7], 6, 1) == [(1, 2)]
    assert manager.block_table("c") == [0, 2]
    assert manager.block_table("p") == [0, 1]
    # Block 1 is the parent's alone now: written in place.
    assert manager.allocate_slots("p", [1, 2, 3, 4, 5, 6, 9], 6, 1) == []
    assert manager.block_table("p") == [0, 1]
    # A fork at a block boundary shares only full blocks: nothing to copy.
    manager.fork("p", "d", 4)
    assert manager.block_table("d") == [0]
    assert manager.allocate_slots("d", [1, 2, 3, 4, 8], 4, 1) == []
    assert manager.block_table("d") == [0, 3]
    assert refs(manager)[:4] == [3, 1, 1, 1]
    for req_id in ("p", "c", "d"):
        manager.free(req_id)
    assert manager.usage == 0.0


def test_failed_allocation_changes_nothing():
    manager = KVCacheManager(num_blocks=3, block_size=2)
    prefill(manager, "a", [1, 2, 3])
    manager.fork("a", "b", 3)
    before = (manager.block_table("a"), manager.block_table("b"), refs(manager), manager.num_free_blocks)
    # One copy-on-write plus one new block, but only one block is free.
    assert manager.allocate_slots("b", [1, 2, 3, 4, 5, 6], 3, 3) is None
    assert (manager.block_table("a"), manager.block_table("b"), refs(manager), manager.num_free_blocks) == before
    assert manager.allocate_slots("c", list(range(10)), 0, 10) is None
    assert manager.block_table("c") == []
    assert manager.allocate_slots("b", [1, 2, 3, 4], 3, 1) == [(1, 2)]


def test_recomputed_block_with_new_tokens_is_no_longer_findable():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    old = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    new = [0, 1, 2, 3, 9, 9, 9, 9, 8]
    prefill(manager, "a", old)
    # Rewind to position 4 (e.g. rejected tokens) and write different tokens over block 1.
    assert manager.allocate_slots("a", new, 4, 5) == []
    assert manager.block_table("a") == [0, 1, 2]
    assert manager.match_prefix("b", old) == 4
    assert manager.match_prefix("c", new) == 8


def test_disabled_prefix_caching_never_hits():
    manager = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    prompt = [1, 2, 3, 4, 5]
    assert prefill(manager, "a", prompt) == 0
    manager.free("a")
    assert manager.match_prefix("b", prompt) == 0
    assert (manager.num_prefix_queries, manager.num_prefix_hits) == (0, 0)
    assert manager.block_pool.cached_block_ids == {}
    assert list(manager.block_pool.free_block_ids) == [3, 2, 1, 0]


def test_reset_prefix_cache():
    manager = KVCacheManager(num_blocks=8, block_size=2)
    prefill(manager, "a", [1, 2, 3])
    prefill(manager, "b", [5, 6, 7])
    manager.free("b")
    assert manager.reset_prefix_cache() is False  # "a" still holds block 0
    assert manager.match_prefix("c", [5, 6, 7]) == 0
    assert manager.match_prefix("d", [1, 2, 3]) == 2
    for req_id in ("a", "c", "d"):
        manager.free(req_id)
    assert manager.reset_prefix_cache() is True
    assert manager.match_prefix("e", [1, 2, 3]) == 0
    assert manager.num_free_blocks == 8


def test_programmer_errors_raise_value_error():
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0)
    manager = KVCacheManager(num_blocks=4, block_size=2)
    prefill(manager, "a", [1, 2, 3])
    with pytest.raises(ValueError, match="empty block table"):
        manager.match_prefix("a", [1, 2, 3])
    with pytest.raises(ValueError, match="covers"):
        manager.allocate_slots("b", [1, 2, 3], 2, 1)
    with pytest.raises(ValueError, match="token_ids"):
        manager.allocate_slots("a", [1, 2, 3], 3, 1)
    with pytest.raises(ValueError, match="covers"):
        manager.fork("a", "b", 5)
    manager.fork("a", "b", 2)
    with pytest.raises(ValueError, match="empty block table"):
        manager.fork("a", "b", 2)


# --- invariants under random operation sequences -------------------------------------------

token_st = st.integers(0, 1)  # a tiny vocabulary makes shared prefixes common


class KVCacheMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler and a model runner, with a shadow of block contents."""

    @initialize(num_blocks=st.integers(1, 10), block_size=st.integers(1, 3), is_caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, is_caching: bool) -> None:
        self.manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching=is_caching)
        self.token_ids: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}
        # What the model runner has written into each slot of each block: the tokens up to
        # and including that position, since a position's K/V depends on its whole prefix.
        self.contents: list[list[tuple[int, ...] | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.next_req = 0

    def _new_req_id(self) -> str:
        self.next_req += 1
        return f"r{self.next_req}"

    def _snapshot(self):
        tables = {req_id: self.manager.block_table(req_id) for req_id in self.token_ids}
        return tables, refs(self.manager), self.manager.num_free_blocks

    def _check_hit(self, req_id: str, num_hit_tokens: int) -> None:
        bs = self.manager.block_size
        table = self.manager.block_table(req_id)
        assert len(table) * bs == num_hit_tokens
        token_ids = self.token_ids[req_id]
        for i, block_id in enumerate(table):
            assert self.contents[block_id] == [tuple(token_ids[: pos + 1]) for pos in range(i * bs, (i + 1) * bs)]

    @rule(prompt=st.lists(token_st, min_size=1, max_size=10))
    def add_request(self, prompt: list[int]) -> None:
        req_id = self._new_req_id()
        num_queries, num_hits = self.manager.num_prefix_queries, self.manager.num_prefix_hits
        num_hit_tokens = self.manager.match_prefix(req_id, prompt)
        assert num_hit_tokens % self.manager.block_size == 0 and num_hit_tokens < len(prompt)
        if self.manager.enable_prefix_caching:
            assert self.manager.num_prefix_queries == num_queries + len(prompt)
            assert self.manager.num_prefix_hits == num_hits + num_hit_tokens
        self.token_ids[req_id] = list(prompt)
        self.num_computed[req_id] = num_hit_tokens
        self._check_hit(req_id, num_hit_tokens)
        if num_hit_tokens:
            event("prefix hit")

    @precondition(lambda self: self.token_ids)
    @rule(data=st.data())
    def step(self, data) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.token_ids)))
        token_ids, num_computed = self.token_ids[req_id], self.num_computed[req_id]
        num_new = data.draw(st.integers(0, len(token_ids) - num_computed))
        before = self._snapshot()
        old_table = self.manager.block_table(req_id)
        copies = self.manager.allocate_slots(req_id, token_ids, num_computed, num_new)
        if copies is None:
            event("allocation failed")
            assert self._snapshot() == before
            self._free(req_id)  # preempt, as the scheduler would
            return
        table = self.manager.block_table(req_id)
        assert len(table) * self.manager.block_size >= num_computed + num_new
        if copies:
            event("copy-on-write")
        for src, dst in copies:
            assert old_table.index(src) == table.index(dst)
            self.contents[dst] = list(self.contents[src])
        for pos in range(num_computed, num_computed + num_new):
            block_id = table[pos // self.manager.block_size]
            assert self.manager.block_pool.ref_count(block_id) == 1, "wrote into a shared block"
            self.contents[block_id][pos % self.manager.block_size] = tuple(token_ids[: pos + 1])
        self.num_computed[req_id] += num_new
        if self.num_computed[req_id] == len(token_ids):
            token_ids.append(data.draw(token_st))  # the sampled token

    @precondition(lambda self: any(self.num_computed.values()))
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(sorted(r for r, n in self.num_computed.items() if n)))
        num_tokens = data.draw(st.integers(1, self.num_computed[parent]))
        child = self._new_req_id()
        self.manager.fork(parent, child, num_tokens)
        self.token_ids[child] = self.token_ids[parent][:num_tokens] + [data.draw(token_st)]
        self.num_computed[child] = num_tokens

    @precondition(lambda self: any(self.num_computed.values()))
    @rule(data=st.data())
    def rewind(self, data) -> None:
        """Forget computed tokens and change what follows, like rejected speculative tokens."""
        req_id = data.draw(st.sampled_from(sorted(r for r, n in self.num_computed.items() if n)))
        num_computed = data.draw(st.integers(0, self.num_computed[req_id] - 1))
        self.num_computed[req_id] = num_computed
        self.token_ids[req_id] = self.token_ids[req_id][:num_computed] + [data.draw(token_st)]

    @precondition(lambda self: self.token_ids)
    @rule(data=st.data())
    def free(self, data) -> None:
        self._free(data.draw(st.sampled_from(sorted(self.token_ids))))

    @rule()
    def reset_prefix_cache(self) -> None:
        is_idle = self.manager.usage == 0.0
        assert self.manager.reset_prefix_cache() is is_idle
        assert not self.manager.block_pool.evictable_block_ids

    def _free(self, req_id: str) -> None:
        self.manager.free(req_id)
        del self.token_ids[req_id], self.num_computed[req_id]
        assert self.manager.block_table(req_id) == []

    @invariant()
    def refcounts_match_tables(self) -> None:
        expected = [0] * self.manager.num_blocks
        for req_id in self.token_ids:
            table = self.manager.block_table(req_id)
            assert len(table) * self.manager.block_size >= self.num_computed[req_id]
            assert len(set(table)) == len(table)
            for block_id in table:
                expected[block_id] += 1
        assert refs(self.manager) == expected
        num_referenced = sum(1 for ref in expected if ref)
        assert self.manager.num_free_blocks + num_referenced == self.manager.num_blocks
        assert self.manager.usage == num_referenced / self.manager.num_blocks

    @invariant()
    def every_block_has_one_state(self) -> None:
        pool = self.manager.block_pool
        free, evictable = list(pool.free_block_ids), list(pool.evictable_block_ids)
        assert len(set(free)) == len(free) and not set(free) & set(evictable)
        for block in pool.blocks:
            is_free, is_evictable = block.block_id in free, block.block_id in evictable
            assert (block.ref_count == 0) == (is_free or is_evictable)
            assert not (is_free and block.block_hash is not None)
            assert not (is_evictable and block.block_hash is None)

    @invariant()
    def cached_blocks_hold_their_tokens(self) -> None:
        pool = self.manager.block_pool
        hashed = [block for block in pool.blocks if block.block_hash is not None]
        assert len(pool.cached_block_ids) == len(hashed)
        if not self.manager.enable_prefix_caching:
            assert not hashed
        for block in hashed:
            assert pool.cached_block_ids[block.block_hash] == block.block_id
            slots = self.contents[block.block_id]
            assert tuple(slot[-1] for slot in slots) == block.block_hash.token_ids
            assert all(slot[:-1] == slots[-1][: len(slot) - 1] for slot in slots)

    def teardown(self) -> None:
        if not hasattr(self, "manager"):
            return
        for req_id in list(self.token_ids):
            self._free(req_id)
        assert self.manager.usage == 0.0
        assert self.manager.num_free_blocks == self.manager.num_blocks
        assert all(ref == 0 for ref in refs(self.manager))


KVCacheMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_kv_cache_invariants = KVCacheMachine.TestCase
