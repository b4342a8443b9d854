"""NoRepeatNGramProcessor: never generate an n-gram the request's prompt or output already holds."""

from __future__ import annotations

from typing import Any

import torch

#: The ``SamplingParams.extra_args`` key a request sets to turn the processor on.
EXTRA_ARG = "no_repeat_ngram_size"


class NoRepeatNGramProcessor:
    """Bans (sets to -inf) every token that would complete an n-gram seen before.

    Per request, ``n = sampling_params.extra_args["no_repeat_ngram_size"]``; rows of
    requests without the key (or with ``n <= 0``) are left unchanged.
    """

    #: Among the hard bans (the built-ins run 100-900: bans, penalties, temperature, truncation).
    order = 100

    def apply(self, logits: torch.Tensor, state: Any) -> torch.Tensor:
        # logits: [num_reqs, vocab_size] float32
        rows: list[int] = []
        token_ids: list[torch.Tensor] = []
        for row, request in enumerate(state.requests):
            n = self._ngram_size(request)
            if n <= 0:
                continue
            banned = banned_tokens(request.prompt_token_ids + request.output_token_ids, n)
            banned = banned[banned < logits.shape[1]]
            if banned.numel():
                rows.append(row)
                token_ids.append(banned)
        if rows:
            row_index = torch.cat([torch.full_like(t, r) for r, t in zip(rows, token_ids)])
            col_index = torch.cat(token_ids)
            logits = logits.clone()  # processors never modify their input: it also feeds the logprobs
            logits[row_index.to(logits.device), col_index.to(logits.device)] = float("-inf")
        return logits

    @staticmethod
    def _ngram_size(request: Any) -> int:
        extra_args = request.sampling_params.extra_args or {}
        n = extra_args.get(EXTRA_ARG, 0)
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"extra_args['{EXTRA_ARG}'] must be an integer, got {n!r}")
        return n


def banned_tokens(token_ids: list[int], n: int) -> torch.Tensor:
    """Tokens that would repeat an n-gram of ``token_ids`` if generated next."""
    if len(token_ids) < n:
        return torch.empty(0, dtype=torch.long)
    tokens = torch.tensor(token_ids, dtype=torch.long)
    windows = tokens.unfold(0, n, 1)  # [num_ngrams, n]
    if n == 1:
        return windows[:, 0].unique()
    prefix = tokens[len(tokens) - (n - 1):]  # [n - 1], the tokens the next one would follow
    matches = (windows[:, :-1] == prefix).all(dim=1)
    return windows[matches, -1].unique()
