"""Guided decoding in the engine: compile a request's constraint off the step path, mask its rows, feed it tokens.

The constraint itself is a backend plugin's business (``pagedllm_register_guided_decoding_backends``);
this module holds what every backend shares: the compile worker, the per-sequence state
kept on the request, and the sampler stage that masks all guided rows of a step batched.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Protocol

from pagedllm.core.config import StructuredOutputConfig
from pagedllm.core.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import torch

    from pagedllm.core.plugins import PluginManager
    from pagedllm.core.request import Request
    from pagedllm.core.sampler import SamplingState

logger = logging.getLogger(__name__)

#: Where a guided request keeps its GuidedState.
GUIDED_KEY = "guided"


class GuidedMatcher(Protocol):
    """One sequence's position in its constraint."""

    def accept_token(self, token_id: int) -> bool: ...

    def is_terminated(self) -> bool: ...


class GuidedDecodingBackend(Protocol):
    """What the engine needs of a guided-decoding backend plugin (see the hook spec)."""

    def validate(self, spec: StructuredOutputsParams) -> None: ...

    def compile(self, spec: StructuredOutputsParams) -> Any: ...

    def new_matcher(self, compiled: Any) -> GuidedMatcher: ...

    def apply_masks(self, logits: torch.Tensor, rows: list[int], matchers: list[GuidedMatcher]) -> None: ...


class GuidedState:
    """A guided sequence's matcher, kept on its request so it survives preemption.

    (Recompute after preemption only refills the KV cache; tokens already generated are
    not sampled again, so the matcher is not fed twice.) With a reasoning parser the
    constraint starts once the reasoning is over: until then the row is free.
    """

    def __init__(self, backend: GuidedDecodingBackend, matcher: GuidedMatcher, reasoning_parser: Any = None) -> None:
        self.backend = backend
        self.matcher = matcher
        self.reasoning_parser = reasoning_parser
        self.is_active = reasoning_parser is None or reasoning_parser.is_reasoning_end([])

    def accept(self, request: Request) -> bool:
        """Feed the request's newest token; True when the constraint is done and the request must stop."""
        if not self.is_active:
            self.is_active = self.reasoning_parser.is_reasoning_end(request.output_token_ids)
            return False
        token_id = request.output_token_ids[-1]
        if not self.matcher.accept_token(token_id):
            # Only when no token was allowed (e.g. other processors masked the grammar's last choices).
            logger.warning("request %s: token %d breaks its structured-output constraint; stopping it",
                           request.req_id, token_id)
            return True
        return self.matcher.is_terminated()


class GuidedMaskStage:
    """The sampler stage that applies every guided row's token mask, one batched call per backend.

    It runs first (``order`` 0) and, like a logits processor, returns new logits: the
    raw ones still feed the returned logprobs.
    """

    order = 0

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.unconstrained:
            return logits
        groups: dict[int, tuple[GuidedDecodingBackend, list[int], list[GuidedMatcher]]] = {}
        for row, request in enumerate(state.requests):
            guided: GuidedState | None = request.extra.get(GUIDED_KEY)
            if guided is not None and guided.is_active:
                _, rows, matchers = groups.setdefault(id(guided.backend), (guided.backend, [], []))
                rows.append(row)
                matchers.append(guided.matcher)
        if not groups:
            return logits
        logits = logits.clone()
        for backend, rows, matchers in groups.values():
            backend.apply_masks(logits, rows, matchers)
        return logits


class StructuredOutputs:
    """The engine's guided-decoding helper: backends (built on first use) and the compile worker.

    A guided request is checked when it is added (a bad constraint is a ValueError
    then), compiled in a worker thread while the engine keeps stepping, and handed
    back by :meth:`ready` with a GuidedState on each of its sequences.
    """

    def __init__(self, plugins: PluginManager, config: StructuredOutputConfig, tokenizer: Any, vocab_size: int,
                 eos_token_ids: set[int]) -> None:
        self.plugins = plugins
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.reasoning_parser = None
        if config.reasoning_parser:
            self.reasoning_parser = plugins.load("reasoning_parser", config.reasoning_parser)(tokenizer)
        self._backends: dict[str, GuidedDecodingBackend] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[GuidedDecodingBackend, Future, list[Request]]] = []

    def backend(self, name: str | None = None) -> GuidedDecodingBackend:
        name = name or self.config.guided_decoding_backend
        if name not in self._backends:
            cls = self.plugins.load("guided_decoding", name)
            self._backends[name] = cls(self.tokenizer, self.vocab_size, stop_token_ids=self.eos_token_ids)
        return self._backends[name]

    def validate(self, spec: StructuredOutputsParams) -> None:
        """A ValueError naming the problem if ``spec`` cannot be compiled (or its backend is unknown)."""
        self.backend(spec.backend).validate(spec)

    def submit(self, spec: StructuredOutputsParams, requests: list[Request]) -> None:
        """Compile ``spec`` in the worker thread for ``requests`` (the sequences of one prompt)."""
        backend = self.backend(spec.backend)
        if self._pool is None:
            # One worker: compiles queue up, so a second request with the same
            # constraint finds the first one's result in the backend's cache.
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedllm-grammar")
        self._pending.append((backend, self._pool.submit(backend.compile, spec), requests))

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def ready(self, timeout: float = 0.0) -> list[tuple[list[Request], Exception | None]]:
        """The submitted requests whose compile finished (waiting up to ``timeout`` for one).

        Each comes with None, its sequences now holding their GuidedState, or the
        compile's error.
        """
        if not self._pending:
            return []
        done, _ = wait([future for _, future, _ in self._pending], timeout=timeout, return_when=FIRST_COMPLETED)
        finished, self._pending = [p for p in self._pending if p[1] in done], [p for p in self._pending if p[1] not in done]
        out: list[tuple[list[Request], Exception | None]] = []
        for backend, future, requests in finished:
            error = future.exception()
            if error is None:
                compiled = future.result()
                for request in requests:
                    request.extra[GUIDED_KEY] = GuidedState(backend, backend.new_matcher(compiled), self.reasoning_parser)
            out.append((requests, error))
        return out
