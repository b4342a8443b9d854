"""AsyncLLMEngine: many asyncio callers share one LLMEngine that steps in its own thread.

LLMEngine is synchronous and not thread-safe, so exactly one thread (the engine thread)
ever calls it: callers hand it commands (add, abort) through a queue, and it hands each
request's outputs back to the caller's event loop. The event loop therefore never runs
model compute, and requests from every caller join the same continuously batched step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pagedllm.core.config import EngineConfig
from pagedllm.core.engine import LLMEngine
from pagedllm.core.outputs import RequestOutput
from pagedllm.core.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """More requests wait than ``max_waiting_requests`` allows; retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread is stopped (shut down, or it failed to start)."""


class EngineStepError(RuntimeError):
    """A step of the engine raised; the requests in flight were aborted with this error."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, taken by the engine thread after every step."""

    num_running: int = 0
    num_waiting: int = 0
    #: Fraction of KV-cache blocks referenced by some request.
    kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    #: Prompt tokens looked up in / found in the prefix cache, since start.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    #: Requests added but not finished (a request with ``n > 1`` counts once).
    num_unfinished: int = 0


class RequestStream:
    """One request's outputs, delivered from the engine thread to the caller's event loop.

    Outputs are cumulative, so a consumer that falls behind skips to the newest one (DELTA
    outputs are merged instead);
    ``on_output(output, time)`` (optional) still sees every output, with the
    ``time.monotonic()`` at which the engine produced it (for latency metrics).
    Iterating yields RequestOutputs until the finished one; an engine failure is raised.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.on_output: Callable[[RequestOutput, float], None] | None = None
        self.finished = False
        #: DELTA outputs (SamplingParams.output_kind): a consumer that falls behind gets the
        #: queued ones merged into one, not just the newest.
        self.deltas = False
        self._loop = loop
        self._queue: asyncio.Queue[tuple[float, RequestOutput | BaseException]] = asyncio.Queue()

    def _put(self, item: RequestOutput | BaseException) -> None:
        """Engine thread: hand an output or an error to the consumer's loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (time.monotonic(), item))
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        newest: RequestOutput | None = None
        for produced, item in items:
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if self.on_output is not None:
                self.on_output(item, produced)
            newest = item if newest is None or not self.deltas else _merge_deltas(newest, item)
        assert newest is not None
        self.finished = newest.finished
        return newest


def _merge_deltas(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One DELTA output holding two consecutive ones: new text, token ids and logprobs joined."""
    by_index = {c.index: c for c in earlier.outputs}
    merged = []
    for c in later.outputs:
        e = by_index.get(c.index)
        if e is not None:
            logprobs = None if c.logprobs is None else (e.logprobs or []) + c.logprobs
            c = dataclasses.replace(c, text=e.text + c.text, token_ids=e.token_ids + c.token_ids, logprobs=logprobs)
        merged.append(c)
    return dataclasses.replace(later, outputs=merged)


@dataclass
class _Add:
    request_id: str
    prompt: str | Sequence[int]
    params: SamplingParams
    stream: RequestStream
    added: asyncio.Future


class AsyncLLMEngine:
    """Wraps an LLMEngine for asyncio callers; the engine steps in a background thread.

    ``async for output in engine.generate(prompt, params, request_id)`` yields the
    request's cumulative RequestOutputs; cancelling the consumer aborts the request and
    frees its KV blocks. Safe to call from any thread and any event loop.
    """

    def __init__(self, engine: LLMEngine, *, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.max_waiting_requests = (
            max_waiting_requests if max_waiting_requests is not None else engine.config.scheduler_config.max_waiting_requests
        )
        self._cond = threading.Condition()
        self._commands: list[_Add | str] = []  # _Add, or a request id to abort
        self._num_pending_adds = 0
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._stats = EngineStats(num_kv_blocks=engine.kv_cache.num_blocks)
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, **options: Any) -> AsyncLLMEngine:
        """Build the engine from flat engine options (as ``LLM(**options)`` takes them)."""
        return cls(LLMEngine(EngineConfig.from_options(**options)))

    # -- what callers read --------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> EngineStats:
        """The latest load snapshot (running/waiting requests, KV usage, prefix cache, preemptions)."""
        return self._stats

    # -- requests -------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams) -> RequestStream:
        """Queue a request; return its stream once the engine accepted it.

        Raises the engine's ValueError for bad input (to this caller only),
        EngineOverloadedError when too many requests wait, EngineDeadError after shutdown.
        """
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop)
        stream.deltas = params.output_kind == RequestOutputKind.DELTA
        added = loop.create_future()
        with self._cond:
            if not self.is_running:
                raise EngineDeadError("the engine is not running")
            limit = self.max_waiting_requests
            if limit is not None and self._stats.num_waiting + self._num_pending_adds >= limit:
                raise EngineOverloadedError(f"the server is overloaded: {limit} requests are already waiting")
            self._num_pending_adds += 1
            self._commands.append(_Add(request_id, prompt, params, stream, added))
            self._cond.notify()
        try:
            await added
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs; leaving early aborts it."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request and free its blocks; unknown or finished ids are ignored."""
        with self._cond:
            self._commands.append(request_id)
            self._cond.notify()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; requests in flight end with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug outside step(): say so, and fail callers rather than hang them
            logger.exception("the engine thread died")
            error = EngineDeadError(f"the engine thread died: {type(exc).__name__}: {exc}")
            with self._cond:
                self._stopping = True
                commands, self._commands = self._commands, []
            for command in commands:
                if isinstance(command, _Add):
                    _resolve(command.added, error)
            self._fail_all(error)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for command in commands:
                self._apply(command)
            if stopping:
                self._fail_all(EngineDeadError("the engine was shut down"))
                self._update_stats()
                return
            outputs: list[RequestOutput] = []
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as exc:
                    logger.exception("engine step failed; aborting the %d requests in flight", len(self._streams))
                    self._fail_all(EngineStepError(f"the engine failed: {type(exc).__name__}: {exc}"))
            self._update_stats()
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                stream._put(output)

    def _apply(self, command: _Add | str) -> None:
        if isinstance(command, str):
            if self._streams.pop(command, None) is not None:
                self.engine.abort_request(command)
            return
        with self._cond:
            self._num_pending_adds -= 1
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as exc:  # bad input: only this caller hears of it
            _resolve(command.added, exc)
            return
        # A caller that gave up meanwhile has queued an abort behind this add.
        self._streams[command.request_id] = command.stream
        _resolve(command.added, None)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine's state may be what failed; the caller still hears
                logger.exception("could not abort request %s", request_id)
            stream._put(exc)
        self._streams.clear()

    def _update_stats(self) -> None:
        scheduler, kv_cache = self.engine.scheduler, self.engine.kv_cache
        self._stats = EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_cache_usage=kv_cache.usage,
            num_kv_blocks=kv_cache.num_blocks,
            prefix_cache_queries=kv_cache.num_prefix_queries,
            prefix_cache_hits=kv_cache.num_prefix_hits,
            num_preemptions=scheduler.num_preemptions,
            num_unfinished=self.engine.get_num_unfinished_requests(),
        )


def _resolve(future: asyncio.Future, exc: BaseException | None) -> None:
    """Engine thread: settle a caller's future on its own loop."""

    def settle() -> None:
        if future.done():
            return
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is closed
        pass
