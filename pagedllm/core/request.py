"""Request: the engine's record of one sequence being generated."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Logprob:
    """Log-probability of one token, with its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


#: One position's log-probabilities: token id -> Logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass(eq=False)
class Request:
    """One sequence: its prompt, the tokens generated so far and its progress."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    #: Tokens generated so far.
    output_token_ids: list[int] = field(default_factory=list)
    #: How many tokens of ``all_token_ids`` have their keys and values in the cache.
    num_computed_tokens: int = 0
    #: How many prompt tokens came from the prefix cache when last scheduled.
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    #: The id of the parent request when this is one of the ``n`` samples of a prompt.
    parent_id: str | None = None
    #: Index among the parent's samples.
    index: int = 0
    #: Maximum total length (prompt + output) this request may reach.
    max_total_tokens: int = 0
    #: Per-request random generator (set when ``sampling_params.seed`` is given).
    generator: torch.Generator | None = None
    output_logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    #: The request's IncrementalDetokenizer (None with ``detokenize=False``).
    detokenizer: Any = None
    #: The output text handed out so far (stable: no tail that may still begin a stop string).
    text: str = ""
    #: Output tokens already handed out in ``DELTA`` outputs.
    num_sent_tokens: int = 0
    #: Opaque per-request state that plugins (detokenizer, guided decoding) keep here.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
