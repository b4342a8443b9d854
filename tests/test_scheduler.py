"""The scheduler on fabricated requests: exact batches, token budget, chunked prefill, preemption order."""

from __future__ import annotations

from pagedllm.core.config import SchedulerConfig
from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.sampling_params import SamplingParams
from pagedllm.core.scheduler import Scheduler


def _scheduler(num_blocks=64, block_size=4, budget=16, max_num_seqs=8, prefix_caching=True, chunked=True):
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(config, kv)


def _request(req_id, num_prompt, start=0, **kw):
    return Request(req_id, list(range(start, start + num_prompt)), SamplingParams(max_tokens=100), **kw)


def _step(scheduler, next_token=7):
    """Schedule, pretend the model ran, append a token to every request that samples."""
    batch = scheduler.schedule()
    for request in scheduler.update_after_step(batch):
        request.output_token_ids.append(next_token)
    return batch


def _summary(batch):
    return [(r.req_id, n) for r, n in zip(batch.requests, batch.num_scheduled_tokens)]


def test_chunked_prefill_under_the_token_budget_and_decodes_first():
    s = _scheduler(budget=16)
    s.add_request(_request("a", 10))
    s.add_request(_request("b", 20, start=100))
    assert _summary(_step(s)) == [("a", 10), ("b", 6)]  # b's prompt is chunked
    assert _summary(_step(s)) == [("a", 1), ("b", 14)]  # a decodes, b continues: decodes first
    assert _summary(_step(s)) == [("a", 1), ("b", 1)]
    assert s.kv_cache.block_table("a") == [0, 1, 2]
    assert len(s.kv_cache.block_table("b")) == 6  # 22 tokens in blocks of 4


def test_without_chunking_a_long_prompt_waits_for_a_whole_budget():
    s = _scheduler(budget=16, chunked=False)
    s.add_request(_request("a", 10))
    s.add_request(_request("b", 12, start=100))
    assert _summary(_step(s)) == [("a", 10)]
    assert _summary(_step(s)) == [("a", 1), ("b", 12)]


def test_max_num_seqs_limits_running_requests():
    s = _scheduler(budget=100, max_num_seqs=2)
    for i in range(3):
        s.add_request(_request(f"r{i}", 5, start=10 * i))
    assert [r.req_id for r in _step(s).requests] == ["r0", "r1"]
    s.finish_request("r0", RequestStatus.FINISHED_STOPPED)
    assert _summary(_step(s)) == [("r1", 1), ("r2", 5)]


def test_preemption_takes_the_newest_request_and_it_resumes_with_its_tokens():
    # 6 blocks of 4 tokens. a and b: 8 prompt tokens each, 2 blocks each after the prefill.
    s = _scheduler(num_blocks=6, budget=64, prefix_caching=False)
    a, b = _request("a", 8), _request("b", 8, start=50)
    s.add_request(a)
    s.add_request(b)
    _step(s)
    assert s.kv_cache.num_free_blocks == 2
    for _ in range(4):
        _step(s)  # positions 8..11 go to each request's third block
    assert s.kv_cache.num_free_blocks == 0
    batch = s.schedule()  # a needs a fourth block for position 12: b (newest) is preempted
    assert batch.preempted_req_ids == ["b"]
    assert _summary(batch) == [("a", 1)]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [7] * 5  # generated tokens are kept
    assert list(s.waiting) == [b]
    s.update_after_step(batch)
    s.finish_request("a", RequestStatus.FINISHED_STOPPED)
    batch = s.schedule()
    assert _summary(batch) == [("b", 13)]  # recomputes prompt + generated tokens
    assert s.num_preemptions == 1


def test_prefix_cache_hit_skips_computed_blocks():
    s = _scheduler(budget=64)
    s.add_request(_request("a", 13))
    _step(s)
    s.finish_request("a", RequestStatus.FINISHED_STOPPED)
    s.add_request(_request("b", 13))  # same prompt: 3 full blocks cached
    batch = _step(s)
    assert _summary(batch) == [("b", 1)]
    assert batch.requests[0].num_cached_tokens == 12


def test_n_samples_wait_for_the_leader_then_fork_its_prompt():
    s = _scheduler(budget=64, prefix_caching=False)
    params = SamplingParams(n=2, max_tokens=10)
    leader = Request("0_p", list(range(10)), params, parent_id="p", index=0)
    follower = Request("1_p", list(range(10)), params.clone(), parent_id="p", index=1)
    s.add_request(leader)
    s.add_request(follower)
    assert _summary(_step(s)) == [("0_p", 10)]  # the follower waits for the shared prompt
    batch = _step(s)
    # The follower shares the leader's blocks and recomputes only the last prompt token;
    # both write into the shared third block, so exactly one copy is made.
    assert sorted(_summary(batch)) == [("0_p", 1), ("1_p", 1)]
    assert len(batch.block_copies) == 1
    assert s.kv_cache.block_table("0_p")[:2] == s.kv_cache.block_table("1_p")[:2]
    assert s.kv_cache.block_table("0_p")[2] != s.kv_cache.block_table("1_p")[2]


def test_finishing_and_aborting_free_every_block():
    s = _scheduler(budget=64)
    s.add_request(_request("a", 9))
    s.add_request(_request("b", 30, start=200))
    _step(s)
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    s.finish_request("b", RequestStatus.FINISHED_STOPPED)
    assert not s.has_unfinished()
    assert s.kv_cache.usage == 0.0
    assert s.kv_cache.num_free_blocks == s.kv_cache.num_blocks
