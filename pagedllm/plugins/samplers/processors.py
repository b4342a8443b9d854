"""The built-in logits processors, in pipeline order: constraints, penalties, then temperature and truncation.

Each takes ``[num_reqs, vocab]`` float32 logits and a
:class:`~pagedllm.core.sampler.SamplingState`, returns new logits (never modifying its
input), and returns its input untouched when no request of the batch uses it. Rows whose
requests do not use a processor come out bit-for-bit unchanged.
"""

from __future__ import annotations

import torch

from pagedllm.core.sampler import SamplingState

_NEG_INF = float("-inf")
#: Like OpenAI, a logit bias is clamped to this range.
_MAX_LOGIT_BIAS = 100.0


def _mask_tokens(logits: torch.Tensor, banned: dict[int, list[int]]) -> torch.Tensor:
    """Set ``logits[row, token_id]`` to -inf for every token id listed under a row."""
    rows = [row for row, token_ids in banned.items() for _ in token_ids]
    if not rows:
        return logits
    cols = [token_id for token_ids in banned.values() for token_id in token_ids]
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(index, torch.tensor(_NEG_INF, device=logits.device))


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each token occurs per row of ``token_ids`` [num_reqs, len], padded with ``vocab_size``."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)  # [num_reqs, vocab + 1]
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=counts.dtype))
    return counts[:, :vocab_size]  # [num_reqs, vocab]


class AllowedTokenIdsProcessor:
    """Restricts a request to its ``allowed_token_ids``: every other token is masked."""

    order = 100

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.unconstrained:
            return logits
        allowed_by_row = {i: p.allowed_token_ids for i, p in enumerate(state.params) if p.allowed_token_ids is not None}
        if not allowed_by_row:
            return logits
        rows = [i for i, token_ids in allowed_by_row.items() for _ in token_ids]
        cols = [token_id for token_ids in allowed_by_row.values() for token_id in token_ids]
        allowed = torch.zeros_like(logits, dtype=torch.bool)  # [num_reqs, vocab]
        allowed[rows, cols] = True
        restricted = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)  # [num_reqs]
        restricted[list(allowed_by_row)] = True
        return logits.masked_fill(restricted[:, None] & ~allowed, _NEG_INF)


class LogitBiasProcessor:
    """Adds each request's ``logit_bias`` (token id -> bias, clamped to [-100, 100]) to its logits."""

    order = 200

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.unconstrained:
            return logits
        entries = [(i, token_id, bias) for i, p in enumerate(state.params) for token_id, bias in (p.logit_bias or {}).items()]
        if not entries:
            return logits
        rows, cols, biases = zip(*entries)
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        biases = torch.tensor(biases, dtype=logits.dtype, device=logits.device).clamp(-_MAX_LOGIT_BIAS, _MAX_LOGIT_BIAS)
        return logits.index_put(index, biases, accumulate=True)


class BadWordsProcessor:
    """Never completes a bad word: bans the last token of each of its token sequences
    when the output ends with the sequence's other tokens (single tokens always)."""

    order = 300

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.unconstrained:
            return logits
        banned: dict[int, list[int]] = {}
        for i, (request, p) in enumerate(zip(state.requests, state.params)):
            output = request.output_token_ids
            for sequence in p._bad_words_token_ids:
                prefix_len = len(sequence) - 1
                if prefix_len == 0 or output[-prefix_len:] == sequence[:-1]:
                    banned.setdefault(i, []).append(sequence[-1])
        return _mask_tokens(logits, banned)


class MinTokensProcessor:
    """Holds back EOS (unless ``ignore_eos``) and ``stop_token_ids`` until ``min_tokens`` are generated."""

    order = 400

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.unconstrained:
            return logits
        banned: dict[int, list[int]] = {}
        for i, (request, p) in enumerate(zip(state.requests, state.params)):
            if len(request.output_token_ids) < p.min_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else p._eos_token_ids)
                if stop_ids:
                    banned[i] = sorted(stop_ids)
        return _mask_tokens(logits, banned)


class PenaltiesProcessor:
    """Repetition penalty over prompt and output tokens (positive logits divided, negative
    multiplied), then frequency and presence penalties over output tokens (subtracted)."""

    order = 500

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.repetition_penalty is None:
            return logits
        vocab_size = logits.shape[1]
        output_counts = _token_counts(state.output_token_ids, vocab_size)  # [num_reqs, vocab]
        in_output = output_counts > 0
        seen = in_output | (_token_counts(state.prompt_token_ids, vocab_size) > 0)  # [num_reqs, vocab]

        repetition = state.repetition_penalty[:, None]  # [num_reqs, 1]
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalised, logits)
        frequency = state.frequency_penalty[:, None]
        presence = state.presence_penalty[:, None]
        return logits - frequency * output_counts - presence * in_output


class TemperatureProcessor:
    """Divides the logits of randomly sampled rows by their temperature."""

    order = 600

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.temperature is None:
            return logits
        return logits / state.temperature[:, None]


class MinPProcessor:
    """Drops tokens whose probability is below ``min_p`` times the most likely token's."""

    order = 700

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.min_p is None:
            return logits
        probs = logits.softmax(dim=-1)  # [num_reqs, vocab]
        threshold = state.min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [num_reqs, 1]
        return logits.masked_fill(probs < threshold, _NEG_INF)


class TopKProcessor:
    """Keeps the ``top_k`` highest logits of each row (ties with the k-th are kept)."""

    order = 800

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.top_k is None:
            return logits
        top_k = state.top_k.clamp(max=logits.shape[1])  # [num_reqs], 0 = off
        top_values = logits.topk(int(top_k.max()), dim=-1).values  # [num_reqs, max_k]
        threshold = top_values.gather(1, (top_k - 1).clamp(min=0)[:, None])  # [num_reqs, 1]
        threshold = threshold.masked_fill(top_k[:, None] == 0, _NEG_INF)
        return logits.masked_fill(logits < threshold, _NEG_INF)


class TopPProcessor:
    """Keeps the nucleus: the smallest set of most likely tokens holding ``top_p`` of the probability."""

    order = 900

    def apply(self, logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
        if state.top_p is None:
            return logits
        top_p = state.top_p[:, None]  # [num_reqs, 1]
        sorted_logits, sorted_ids = logits.sort(dim=-1)  # [num_reqs, vocab], ascending
        # A token goes when it and every less likely token together hold at most
        # 1 - top_p: the more likely ones already reach top_p without it.
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cumulative <= 1.0 - top_p) & (top_p < 1.0)
        drop_sorted[:, -1] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(1, sorted_ids, drop_sorted)
        return logits.masked_fill(drop, _NEG_INF)
