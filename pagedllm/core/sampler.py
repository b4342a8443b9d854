"""The sampler: runs the logits processors over a step's logits and picks each request's next token."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch

from pagedllm.core.layers.fused import argmax
from pagedllm.core.request import Logprob, PositionLogprobs, Request
from pagedllm.core.sampling_params import SamplingParams


class LogitsProcessor(Protocol):
    """One step of the logits pipeline (see ``pagedllm_register_logits_processors``).

    ``apply`` returns new logits, or its input when no row of the batch uses it. It
    must not modify ``logits`` in place: the raw logits also feed the returned logprobs.
    """

    order: int

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor: ...


@dataclass
class SamplerOutput:
    """What one step chose: a token per request and, where asked for, its logprobs."""

    token_ids: list[int]
    #: Per request; None unless its ``SamplingParams.logprobs`` is set.
    logprobs: list[PositionLogprobs | None]


@dataclass
class SamplingState:
    """The batch's sampling parameters as tensors, built once per step for every processor.

    A parameter's tensor is None when no request of the batch uses it, so processors
    return at once and an all-greedy batch costs nothing but the argmax. Greedy rows
    have the truncations (top-k, top-p, min-p) and temperature switched off: they take
    the argmax of the processed logits.
    """

    requests: list[Request]
    params: list[SamplingParams]
    vocab_size: int
    device: torch.device
    #: Rows sampled at random (temperature > 0); the others are greedy.
    random_rows: list[int]
    #: [num_reqs] float32, 1.0 on greedy rows.
    temperature: torch.Tensor | None = None
    #: [num_reqs] int64, 0 = off.
    top_k: torch.Tensor | None = None
    #: [num_reqs] float32, 1.0 = off.
    top_p: torch.Tensor | None = None
    #: [num_reqs] float32, 0.0 = off.
    min_p: torch.Tensor | None = None
    #: [num_reqs] float32 each; all three set as soon as one request uses any penalty.
    repetition_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    presence_penalty: torch.Tensor | None = None
    #: No request uses allowed_token_ids, logit_bias, bad_words, min_tokens or a structured
    #: output: the processors for those return at once (False when unknown).
    unconstrained: bool = False

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int, device: torch.device) -> SamplingState:
        params = [request.sampling_params for request in requests]
        unconstrained = all(p._unconstrained for p in params)
        if all(p._plain_greedy for p in params):  # the common case: no tensor to build
            return cls(requests=requests, params=params, vocab_size=vocab_size, device=device, random_rows=[],
                       unconstrained=unconstrained)
        is_random = [not p.is_greedy for p in params]
        state = cls(
            requests=requests,
            params=params,
            vocab_size=vocab_size,
            device=device,
            random_rows=[i for i, random in enumerate(is_random) if random],
            unconstrained=unconstrained,
        )

        def column(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)  # [num_reqs]

        pairs = list(zip(params, is_random))
        if any(random and p.temperature != 1.0 for p, random in pairs):
            state.temperature = column([p.temperature if random else 1.0 for p, random in pairs], torch.float32)
        if any(random and p.top_k > 0 for p, random in pairs):
            state.top_k = column([p.top_k if random else 0 for p, random in pairs], torch.int64)
        if any(random and p.top_p < 1.0 for p, random in pairs):
            state.top_p = column([p.top_p if random else 1.0 for p, random in pairs], torch.float32)
        if any(random and p.min_p > 0.0 for p, random in pairs):
            state.min_p = column([p.min_p if random else 0.0 for p, random in pairs], torch.float32)
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            state.repetition_penalty = column([p.repetition_penalty for p in params], torch.float32)
            state.frequency_penalty = column([p.frequency_penalty for p in params], torch.float32)
            state.presence_penalty = column([p.presence_penalty for p in params], torch.float32)
        return state

    @property
    def num_reqs(self) -> int:
        return len(self.requests)

    @property
    def all_greedy(self) -> bool:
        return not self.random_rows

    @cached_property
    def prompt_token_ids(self) -> torch.Tensor:
        """[num_reqs, max_prompt_len] int64, padded with ``vocab_size``; built on first use."""
        return self._padded([request.prompt_token_ids for request in self.requests])

    @cached_property
    def output_token_ids(self) -> torch.Tensor:
        """[num_reqs, max_output_len] int64, padded with ``vocab_size``; built on first use."""
        return self._padded([request.output_token_ids for request in self.requests])

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        width = max((len(row) for row in rows), default=0)
        padded = [row + [self.vocab_size] * (width - len(row)) for row in rows]
        return torch.tensor(padded, dtype=torch.int64, device=self.device).reshape(len(rows), width)


class Sampler:
    """Turns a step's logits into one token per request, through the logits processors."""

    def __init__(self, processors: list[LogitsProcessor], vocab_size: int) -> None:
        self.processors = sorted(processors, key=lambda processor: processor.order)
        self.vocab_size = vocab_size

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """Choose the next token of every request; row i of ``logits`` belongs to ``requests[i]``."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [num_reqs={len(requests)}, vocab], got {tuple(logits.shape)}")
        if logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns but the sampler's vocab_size is {self.vocab_size}")
        logits = logits.float()  # [num_reqs, vocab]
        state = SamplingState.from_requests(requests, self.vocab_size, logits.device)

        processed = logits
        for processor in self.processors:
            processed = processor.apply(processed, state)
        token_ids = self._choose(processed, state)  # [num_reqs]

        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=self._logprobs(logits, token_ids, requests))

    def _choose(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        token_ids = argmax(logits)  # [num_reqs]
        if state.all_greedy:
            return token_ids

        rows = state.random_rows
        probs = logits[rows].softmax(dim=-1)  # [num_random, vocab]
        # Exponential race: argmax(probs / q) with q ~ Exp(1) draws from probs. Each
        # seeded request draws its own q, so its tokens do not depend on the batch.
        q = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(rows) if state.requests[i].generator is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
        for j, i in enumerate(rows):
            generator = state.requests[i].generator
            if generator is not None:
                q[j] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=generator)
        token_ids[rows] = probs.div_(q).argmax(dim=-1)
        return token_ids

    def _logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, requests: list[Request]
    ) -> list[PositionLogprobs | None]:
        result: list[PositionLogprobs | None] = [None] * len(requests)
        rows = [i for i, request in enumerate(requests) if request.sampling_params.logprobs is not None]
        if not rows:
            return result
        num_tops = [requests[i].sampling_params.logprobs for i in rows]
        for i, position in zip(rows, _compute_logprobs(logits[rows], token_ids[rows], num_tops)):
            result[i] = position
        return result


def compute_logprobs(logits: torch.Tensor, token_ids: list[int] | torch.Tensor, num_top: int) -> list[PositionLogprobs]:
    """Log-softmax of ``logits`` [N, vocab]: per row the given token with its rank (1 = best)
    plus the ``num_top`` most likely tokens with ranks 1..num_top."""
    return _compute_logprobs(logits, token_ids, [num_top] * logits.shape[0])


def _compute_logprobs(
    logits: torch.Tensor, token_ids: list[int] | torch.Tensor, num_tops: list[int]
) -> list[PositionLogprobs]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, vocab]
    token_ids = torch.as_tensor(token_ids, dtype=torch.int64, device=logprobs.device)  # [N]
    token_logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [N]
    # Rank = 1 + how many tokens are strictly more likely.
    token_ranks = (logprobs > token_logprobs[:, None]).sum(dim=-1) + 1  # [N]

    max_top = min(max(num_tops, default=0), logprobs.shape[1])
    top_logprobs, top_ids = logprobs.topk(max_top, dim=-1)  # [N, max_top] each

    positions: list[PositionLogprobs] = []
    rows = zip(token_ids.tolist(), token_logprobs.tolist(), token_ranks.tolist(), top_ids.tolist(), top_logprobs.tolist())
    for (token_id, logprob, rank, ids, values), num_top in zip(rows, num_tops):
        position = {token_id: Logprob(logprob=logprob, rank=rank)}
        for top_rank, (top_id, top_logprob) in enumerate(zip(ids[:num_top], values[:num_top]), start=1):
            position.setdefault(top_id, Logprob(logprob=top_logprob, rank=top_rank))
        positions.append(position)
    return positions


def bad_words_to_token_ids(words: list[str], tokenizer: Any) -> list[list[int]]:
    """Token-id sequences that spell each bad word, at the start of a text and after a space.

    Like vLLM: each word is encoded as-is and with a leading space (without special
    tokens); empty and duplicate sequences are dropped.
    """
    sequences: list[list[int]] = []
    for word in words:
        word = word.lstrip()
        for text in (word, " " + word):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            token_ids = list(getattr(encoded, "ids", encoded))  # a raw `tokenizers.Tokenizer` gives an Encoding
            if token_ids and token_ids not in sequences:
                sequences.append(token_ids)
    return sequences
