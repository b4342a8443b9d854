"""SamplingParams: how one request chooses its tokens, validated on construction."""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import dataclass, field, fields
from typing import Any

_GREEDY_EPS = 1e-5


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output (guided decoding): exactly one kind is set.

    The engine compiles it with a guided-decoding backend plugin when the request is
    added; a constraint that does not compile is a ValueError from ``add_request``.
    """

    #: A JSON schema (a dict or its JSON text) the output validates against.
    json: str | dict[str, Any] | None = None
    #: A regular expression the whole output matches.
    regex: str | None = None
    #: The output is exactly one of these strings.
    choice: list[str] | None = None
    #: An EBNF grammar (llama.cpp's GBNF dialect, start rule ``root``) the output parses with.
    grammar: str | None = None
    #: Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).
    json_object: bool | None = None
    #: An xgrammar structural tag (a dict or its JSON text): free text with constrained tagged parts.
    structural_tag: str | dict[str, Any] | None = None
    #: Guided-decoding backend plugin for this request; default: the engine's ``guided_decoding_backend``.
    backend: str | None = None

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self) -> None:
        chosen = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(f"structured_outputs: exactly one of {', '.join(self.KINDS)} must be set, "
                             f"got {', '.join(chosen) or 'none'}")
        for name in ("json", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    json.loads(value)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.{name} is not valid JSON: {e}") from None
            elif value is not None and not isinstance(value, (dict, bool)):
                raise ValueError(f"structured_outputs.{name} must be a dict or JSON text, got {type(value).__name__}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
        for name in ("regex", "grammar", "backend"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")

    @property
    def kind(self) -> str:
        """The one constraint that is set: json, regex, choice, grammar, json_object or structural_tag."""
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple[str, str]:
        """(kind, canonical text): equal for equal constraints, e.g. the same schema with keys reordered."""
        value = getattr(self, self.kind)
        if self.kind in ("json", "structural_tag"):
            value = json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        elif self.kind == "choice":
            value = json.dumps(value)
        return self.kind, str(value)


#: vLLM's older name.
GuidedDecodingParams = StructuredOutputsParams


class RequestOutputKind(enum.IntEnum):
    """Which outputs ``LLMEngine.step()`` returns for a request (vLLM's enum, same values)."""

    #: Every step: the whole text and token ids so far.
    CUMULATIVE = 0
    #: Every step: only the text, token ids and logprobs new since the previous output.
    DELTA = 1
    #: Only the finished output (what ``LLM.generate`` uses: no per-step output building).
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """Sampling parameters of one request, with vLLM's names and defaults.

    Invalid values raise ``ValueError`` naming the field.
    """

    #: Number of output sequences to return for the prompt.
    n: int = 1
    #: Penalises tokens already present in the output (OpenAI semantics, additive).
    presence_penalty: float = 0.0
    #: Penalises tokens by how often they appear in the output (additive).
    frequency_penalty: float = 0.0
    #: Multiplicative penalty on tokens in the prompt or output (1.0 = off).
    repetition_penalty: float = 1.0
    #: Softmax temperature; 0 means greedy.
    temperature: float = 1.0
    #: Nucleus sampling: keep the smallest set of tokens with this much probability.
    top_p: float = 1.0
    #: Keep only the k most likely tokens; 0 or -1 means all.
    top_k: int = 0
    #: Drop tokens whose probability is below ``min_p`` times the top probability.
    min_p: float = 0.0
    #: Seed of this request's own random generator: same seed, same tokens, whatever
    #: else shares the batch.
    seed: int | None = None
    #: Strings that end generation; they are not included in the text unless
    #: ``include_stop_str_in_output``.
    stop: str | list[str] | None = None
    #: Token ids that end generation (in addition to the model's EOS).
    stop_token_ids: list[int] | None = None
    #: Keep generating past EOS.
    ignore_eos: bool = False
    #: Maximum number of tokens to generate; None means up to the model length.
    max_tokens: int | None = 16
    #: Minimum number of tokens before EOS or stop token ids may end the request.
    min_tokens: int = 0
    #: Number of top log-probabilities to return per generated token (plus the sampled
    #: one); None for none.
    logprobs: int | None = None
    #: Number of top log-probabilities to return per prompt token; None for none.
    prompt_logprobs: int | None = None
    #: Produce text (turn off to get token ids only).
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    #: Token id -> bias added to its logit (clamped to [-100, 100] like OpenAI).
    logit_bias: dict[int, float] | None = None
    #: Words (strings) that are never generated; each is banned as a token sequence.
    bad_words: list[str] | None = None
    #: Restrict sampling to these token ids.
    allowed_token_ids: list[int] | None = None
    #: Free-form per-request options for third-party logits processors.
    extra_args: dict[str, Any] | None = None
    #: Constrain the output to a JSON schema, regex, choice list or grammar (a
    #: :class:`StructuredOutputsParams` or a dict of its fields).
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    #: vLLM's older name for ``structured_outputs``.
    guided_decoding: StructuredOutputsParams | dict[str, Any] | None = None
    #: Which outputs ``step()`` returns: cumulative ones every step (default), deltas, or the final one only.
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    # Filled by the engine: the token-id form of ``bad_words``, the model's EOS and the stop ids.
    _bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)
    _eos_token_ids: set[int] = field(default_factory=set, repr=False)
    #: The token ids that end the request once ``min_tokens`` are out: ``stop_token_ids``, plus EOS unless ignored.
    _stop_ids: frozenset[int] = field(default_factory=frozenset, repr=False)
    #: Greedy with no penalty: the sampling state needs no tensor for it (set by the engine).
    _plain_greedy: bool = field(default=False, repr=False)
    #: No allowed_token_ids, logit_bias, bad_words, min_tokens or structured output (set by the engine).
    _unconstrained: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k == -1:
            self.top_k = 0
        kind = self.output_kind
        if isinstance(kind, str):
            kind = RequestOutputKind.__members__.get(kind.upper(), kind)
        elif isinstance(kind, int) and not isinstance(kind, bool) and kind in RequestOutputKind._value2member_map_:
            kind = RequestOutputKind(kind)
        if not isinstance(kind, RequestOutputKind):
            raise ValueError(f"SamplingParams.output_kind must be one of {', '.join(k.name for k in RequestOutputKind)}, "
                             f"got {self.output_kind!r}")
        self.output_kind = kind
        self._validate()
        self._resolve_structured_outputs()

    def _resolve_structured_outputs(self) -> None:
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("SamplingParams.guided_decoding is the older name of structured_outputs; set only one")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if isinstance(self.structured_outputs, dict):
            unknown = set(self.structured_outputs) - {f.name for f in fields(StructuredOutputsParams)}
            if unknown:
                raise ValueError(f"SamplingParams.structured_outputs has unknown key(s): {', '.join(sorted(unknown))}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"SamplingParams.structured_outputs must be a StructuredOutputsParams or a dict, "
                             f"got {type(self.structured_outputs).__name__}")

    def _validate(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be -1, 0 (off) or a positive integer")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens",
            "must be an integer >= 1",
        )
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0), "logprobs", "must be an integer >= 0")
        check(
            self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
            "prompt_logprobs",
            "must be an integer >= 0",
        )
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        check(self.detokenize or not self.stop, "stop", "needs detokenize=True (stop strings are matched in the text)")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0")
        check(all(isinstance(w, str) and w for w in self.bad_words), "bad_words", "must be non-empty strings")
        if self.logit_bias is not None:
            check(all(t >= 0 for t in self.logit_bias), "logit_bias", "keys must be token ids >= 0")
        if self.allowed_token_ids is not None:
            check(len(self.allowed_token_ids) > 0, "allowed_token_ids", "must not be empty")
            check(all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids), "allowed_token_ids", "must be token ids >= 0")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check token ids given by the user against the model's vocabulary."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            bad = [t for t in getattr(self, name) or [] if t >= vocab_size]
            if bad:
                raise ValueError(f"SamplingParams.{name} has token ids outside the vocabulary (size {vocab_size}): {bad}")
        bad = [t for t in self.logit_bias or {} if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.logit_bias has token ids outside the vocabulary (size {vocab_size}): {bad}")

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
