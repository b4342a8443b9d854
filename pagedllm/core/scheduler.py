"""Scheduler: continuous batching under a token budget, chunked prefill, preemption by recompute."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedllm.core.config import SchedulerConfig
from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.core.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """What runs in one step: the scheduler's message to the model runner.

    ``requests`` are ordered single-token steps (decodes) first, then prefill chunks;
    request ``i`` computes ``num_scheduled_tokens[i]`` tokens starting at its
    ``num_computed_tokens``.
    """

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    #: Copy-on-write block copies (src_block_id, dst_block_id) to do before the step.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    #: Requests preempted (their blocks freed) while building this batch.
    preempted_req_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def num_decodes(self) -> int:
        return sum(1 for n in self.num_scheduled_tokens if n == 1)

    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    """Decides, every step, which requests run and how many tokens each computes.

    Running requests are served first-come first-served; a new or preempted request joins
    when the token budget, ``max_num_seqs`` and free KV blocks allow. When a running
    request cannot get a block, the most recently admitted running request is preempted:
    its blocks are freed and it is recomputed later (its generated tokens are kept).
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        #: parent request id -> its n samples (for prompt sharing by fork).
        self.siblings: dict[str, list[Request]] = {}
        self.num_preemptions = 0

    # -- queue --------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)
        self.requests[request.req_id] = request
        if request.parent_id is not None:
            self.siblings.setdefault(request.parent_id, []).append(request)

    def finish_request(self, req_id: str, status: RequestStatus) -> Request | None:
        """End a request (finished or aborted) and free its blocks."""
        request = self.requests.pop(req_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(req_id)
        if request.parent_id is not None:
            group = self.siblings.get(request.parent_id, [])
            if request in group:
                group.remove(request)
            if not group:
                self.siblings.pop(request.parent_id, None)
        return request

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ---------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []

        # 1. Running requests, oldest first; preempt the newest when blocks run out.
        i = 0
        allocate_slots, has_free_slot = self.kv_cache.allocate_slots, self.kv_cache.has_free_slot
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                i += 1
                continue
            if num_new == 1 and has_free_slot(request.req_id, request.num_computed_tokens):
                scheduled.append((request, 1))  # a decode step inside its partial block: nothing to allocate
                budget -= 1
                i += 1
                continue
            while True:
                copies = allocate_slots(request.req_id, _TokenIds(request), request.num_computed_tokens, num_new)
                if copies is not None:
                    break
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted_req_ids.append(victim.req_id)
                if victim is request:
                    break
            if copies is None:
                break  # the request itself was preempted; it sits at the head of the queue
            batch.block_copies.extend(copies)
            scheduled.append((request, num_new))
            budget -= num_new
            i += 1

        # 2. Waiting requests, in order, unless this step had to preempt.
        if not batch.preempted_req_ids:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                request = self.waiting[0]
                fork_from = self._fork_source(request)
                if fork_from is False:
                    skipped.append(self.waiting.popleft())  # its prompt is being computed by a sibling
                    continue
                if fork_from is not None:
                    # Share the sibling's prompt blocks; recompute only the last prompt token
                    # (its logits start this sample) — copy-on-write protects the shared block.
                    self.kv_cache.fork(fork_from.req_id, request.req_id, request.num_prompt_tokens - 1)
                    request.num_computed_tokens = request.num_prompt_tokens - 1
                elif request.num_computed_tokens == 0 and request.sampling_params.prompt_logprobs is None:
                    # (prompt logprobs need every prompt position computed, so no prefix hits)
                    request.num_computed_tokens = self.kv_cache.match_prefix(request.req_id, request.all_token_ids)
                request.num_cached_tokens = request.num_computed_tokens
                num_new = self._num_new_tokens(request, budget)
                copies = None if num_new == 0 else self.kv_cache.allocate_slots(
                    request.req_id, request.all_token_ids, request.num_computed_tokens, num_new
                )
                if copies is None:
                    self.kv_cache.free(request.req_id)
                    request.num_computed_tokens = 0
                    break
                self.waiting.popleft()
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                batch.block_copies.extend(copies)
                scheduled.append((request, num_new))
                budget -= num_new
            self.waiting.extendleft(reversed(skipped))

        # Single-token steps first: the attention backend batches them together.
        if any(n != 1 for _, n in scheduled):
            scheduled.sort(key=lambda item: item[1] != 1)
        batch.requests = [r for r, _ in scheduled]
        batch.num_scheduled_tokens = [n for _, n in scheduled]
        return batch

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        num_new = request.num_tokens - request.num_computed_tokens
        if num_new > budget:
            num_new = budget if self.config.enable_chunked_prefill else 0
        return num_new

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request.req_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _fork_source(self, request: Request) -> Request | None | bool:
        """The sibling to share the prompt with, None to prefill alone, False to wait."""
        if request.parent_id is None or request.index == 0 or request.num_computed_tokens or request.num_prompt_tokens < 2:
            return None
        leader = next((r for r in self.siblings.get(request.parent_id, ()) if r.index == 0), None)
        if leader is None or leader.num_preemptions:
            return None
        if leader.status == RequestStatus.RUNNING and leader.num_computed_tokens >= leader.num_prompt_tokens:
            return leader
        if leader.status in (RequestStatus.WAITING, RequestStatus.RUNNING):
            return False
        return None

    def update_after_step(self, batch: ScheduledBatch) -> list[Request]:
        """Advance computed counts; return the requests whose step ends at a sampling position."""
        sampling: list[Request] = []
        for request, num in zip(batch.requests, batch.num_scheduled_tokens):
            request.num_computed_tokens += num
            if request.num_computed_tokens >= request.num_tokens:
                sampling.append(request)
        return sampling


class _TokenIds(Sequence[int]):
    """A request's prompt + output token ids, read in place: the KV-cache manager only takes
    the length and slices of full blocks, so running requests need not copy theirs every step."""

    __slots__ = ("prompt", "output")

    def __init__(self, request: Request) -> None:
        self.prompt, self.output = request.prompt_token_ids, request.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, index):
        if isinstance(index, slice) and index.step is None:
            num_prompt = len(self.prompt)
            start, stop = index.start or 0, len(self) if index.stop is None else index.stop
            if 0 <= start and stop <= num_prompt:
                return self.prompt[start:stop]
            if num_prompt <= start and 0 <= stop:
                return self.output[start - num_prompt : stop - num_prompt]
        return (self.prompt + self.output)[index]
