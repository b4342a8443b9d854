"""XGrammarBackend: structured-output constraints compiled to token masks by the xgrammar library."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from pagedllm.core.sampling_params import StructuredOutputsParams

# xgrammar's errors start with "[12:00:00] /project/cpp/file.cc:123: " (and sometimes a failed check).
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def _message(exc: Exception) -> str:
    return _LOG_PREFIX.sub("", str(exc).strip())


@dataclass(frozen=True)
class XGrammarConstraint:
    """A compiled constraint, as the cache keeps it."""

    grammar: xgr.CompiledGrammar
    #: JSON: tokens holding raw control characters (U+0000-U+001F) are masked too. JSON
    #: never has them unescaped, but xgrammar's strings with a maxLength/minLength let them through.
    is_json: bool


class XGrammarMatcher:
    """One sequence's matcher (``accept_token(id) -> bool``, ``is_terminated()``)."""

    def __init__(self, constraint: XGrammarConstraint) -> None:
        self.matcher = xgr.GrammarMatcher(constraint.grammar)
        self.is_json = constraint.is_json

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XGrammarBackend:
    """Compiles constraints for one tokenizer and fills and applies their token bitmasks.

    JSON output is compact (no free whitespace between tokens): a model may otherwise
    emit whitespace until it runs out of tokens. Compiled grammars are kept in an LRU
    cache keyed on the constraint, so the same schema twice compiles once; ``compile``
    may run in a worker thread.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, *, stop_token_ids: Sequence[int] | None = None,
                 cache_size: int = 128, max_threads: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids else None
        self.max_threads = max_threads
        self._compiler: xgr.GrammarCompiler | None = None  # built by the first compile (about a second for 50k tokens)
        self._no_control_chars: torch.Tensor | None = None  # [ceil(vocab / 32)] int32 bitmask, with the compiler
        self._cache: OrderedDict[tuple[str, str], XGrammarConstraint] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._batch = xgr.BatchGrammarMatcher(max_threads)
        #: How many constraints were compiled (cache misses).
        self.num_compiles = 0

    # -- compiling --------------------------------------------------------------------

    def validate(self, spec: StructuredOutputsParams) -> None:
        """Fail fast: a ValueError naming the problem if ``spec`` cannot be compiled."""
        with self._lock:
            if spec.cache_key() in self._cache:
                return
        self._grammar(spec)

    def compile(self, spec: StructuredOutputsParams) -> XGrammarConstraint:
        """The compiled constraint, from the cache when the same one was compiled before."""
        key = spec.cache_key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = self._get_compiler().compile_grammar(self._grammar(spec))
        compiled = XGrammarConstraint(grammar, spec.kind in ("json", "json_object"))
        with self._lock:
            self.num_compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                # The model's vocabulary may be larger than the tokenizer's (padding rows):
                # xgrammar masks the ids it does not know, so they are never sampled.
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_enabled=False)
                allowed = torch.tensor([not any(b < 0x20 for b in token) for token in info.decoded_vocab])
                self._no_control_chars = _pack_bits(allowed, self.vocab_size)
            return self._compiler

    def _grammar(self, spec: StructuredOutputsParams) -> xgr.Grammar:
        kind, value = spec.kind, getattr(spec, spec.kind)
        try:
            if kind == "json":
                schema = value if isinstance(value, str) else json.dumps(value)
                return xgr.Grammar.from_json_schema(schema, any_whitespace=False)
            if kind == "json_object":
                return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return xgr.Grammar.from_regex(value)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in value)
                return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
            if kind == "grammar":
                return xgr.Grammar.from_ebnf(value)
            return xgr.Grammar.from_structural_tag(value if isinstance(value, str) else json.dumps(value))
        except Exception as e:  # xgrammar raises RuntimeError (and its own types) for bad input
            raise ValueError(f"structured_outputs.{kind} cannot be compiled: {_message(e)}") from None

    # -- decoding ---------------------------------------------------------------------

    def new_matcher(self, compiled: XGrammarConstraint) -> XGrammarMatcher:
        """A fresh matcher for one sequence."""
        return XGrammarMatcher(compiled)

    def apply_masks(self, logits: torch.Tensor, rows: list[int], matchers: list[XGrammarMatcher]) -> None:
        """Set to -inf, in place, every token the matcher of ``rows[i]`` does not allow next."""
        if self._bitmask.shape[0] < logits.shape[0]:
            self._bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        bitmask = self._bitmask[: logits.shape[0]]  # [num_reqs, ceil(vocab / 32)] int32
        self._batch.batch_fill_next_token_bitmask([m.matcher for m in matchers], bitmask, rows)
        json_rows = [row for row, m in zip(rows, matchers) if m.is_json]
        if json_rows:
            bitmask[json_rows] &= self._no_control_chars
        device_bitmask = bitmask if logits.device.type == "cpu" else bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, device_bitmask, vocab_size=self.vocab_size, indices=rows)


def _pack_bits(allowed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A [vocab] bool tensor as xgrammar's bitmask row: bit ``i % 32`` of int32 word ``i // 32``."""
    bits = torch.zeros(-(-vocab_size // 32) * 32, dtype=torch.int64)
    bits[: len(allowed)] = allowed.to(torch.int64)
    words = (bits.view(-1, 32) << torch.arange(32)).sum(dim=1)  # [ceil(vocab / 32)], each < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
