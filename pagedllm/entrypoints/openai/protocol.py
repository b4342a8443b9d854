"""The HTTP API's shapes: requests as OpenAI and vLLM accept them, responses as OpenAI sends them.

Each request family turns itself into SamplingParams in one place, ``to_sampling_params``:
structured output and tool calling extend those methods.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.core.sampling_params import SamplingParams
from pagedllm.core.tool_choice import tool_choice_structured_outputs

#: Most top log-probabilities a request may ask for per token (vLLM's default limit).
MAX_LOGPROBS = 20


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI-shaped error response."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # Unknown fields are ignored (and logged), as vLLM does: clients send extras freely.
    model_config = ConfigDict(extra="allow")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None


# -- requests -----------------------------------------------------------------------


class _SamplingRequest(OpenAIModel):
    """The sampling fields completions and chat share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling fields
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    #: Name tokens in logprobs "token_id:<id>" (distinct even where texts are not, e.g. partial UTF-8).
    return_tokens_as_token_ids: bool = False
    # Structured output (guided decoding): OpenAI's response_format, vLLM's guided_* and structured_outputs.
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def _structured_outputs(self) -> tuple[str, dict[str, Any]] | None:
        """(request field, StructuredOutputsParams fields) of the one constraint asked for, if any."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_schema":
            schema = (rf.json_schema or {}).get("schema")
            if schema is None:
                raise RequestError("response_format of type json_schema needs json_schema.schema",
                                   param="response_format.json_schema.schema")
            found.append(("response_format", {"json": schema}))
        elif rf is not None and rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "structural_tag":
            found.append(("response_format", {"structural_tag": rf.model_dump(exclude_none=True)}))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                found.append((f"guided_{kind}", {kind: value}))
        if self.structured_outputs is not None:
            found.append(("structured_outputs", dict(self.structured_outputs)))
        if len(found) > 1:
            raise RequestError(f"give one structured-output constraint, got {' and '.join(f for f, _ in found)}",
                               param=found[1][0])
        if not found:
            return None
        field, spec = found[0]
        if self.guided_decoding_backend is not None:
            spec.setdefault("backend", self.guided_decoding_backend)
        return field, spec

    def _sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                         constraint: tuple[str, dict[str, Any]] | None = None,
                         skip_special_tokens: bool | None = None) -> SamplingParams:
        """``constraint``: (field, spec) of a structured output the caller imposes instead of the request's."""
        constraint = constraint or self._structured_outputs()
        logit_bias = None
        if self.logit_bias:
            try:
                logit_bias = {int(token_id): bias for token_id, bias in self.logit_bias.items()}
            except ValueError:
                raise RequestError("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
        try:
            return SamplingParams(
                n=self.n,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                min_p=self.min_p or 0.0,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=self.repetition_penalty or 1.0,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logit_bias=logit_bias,
                bad_words=self.bad_words,
                allowed_token_ids=self.allowed_token_ids,
                structured_outputs=constraint[1] if constraint else None,
            )
        except ValueError as exc:  # "SamplingParams.<field> ...": name the request field
            message = str(exc).removeprefix("SamplingParams.")
            if message.startswith("structured_outputs") and constraint:
                raise RequestError(f"{constraint[0]}: {message}", param=constraint[0]) from None
            raise RequestError(message, param=message.split(" ", 1)[0]) from None

    @property
    def constraint_field(self) -> str | None:
        """The request field a constraint's compile error is about (for the 400 add_request may give)."""
        found = self._structured_outputs()
        return found[0] if found else None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """This request's SamplingParams; ``max_tokens`` is the checked budget for its prompt."""
        if self.suffix is not None:
            raise RequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of is not supported (only best_of == n)", param="best_of")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs  # echoed prompt tokens carry their logprobs too
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates read it: text parts joined into one string, and tool-call
        arguments as objects (OpenAI sends JSON text; templates such as Hermes' and Llama's print them)."""
        message = self.model_dump(exclude_none=True)
        for call in message.get("tool_calls", []):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                with contextlib.suppress(ValueError):
                    function["arguments"] = json.loads(function["arguments"])
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"content part of type {part.get('type')!r} is not supported (only 'text')",
                                       param="messages")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None

    @property
    def max_tokens_field(self) -> tuple[str, int | None]:
        """(name, value) of the output budget the request set: max_completion_tokens wins."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    @property
    def effective_tool_choice(self) -> str | dict[str, Any]:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def forced_tool_calls(self) -> dict[str, Any] | None:
        """The constraint of tool_choice "required" or a named function (None for auto and none)."""
        try:
            spec = tool_choice_structured_outputs(self.tools, self.effective_tool_choice,
                                                  self.parallel_tool_calls is not False)
        except ValueError as exc:
            raise RequestError(str(exc), param="tool_choice" if self.tools else "tools") from None
        return None if spec is None else {"json": spec.json}

    @property
    def constraint_field(self) -> str | None:
        return "tool_choice" if self.forced_tool_calls() is not None else super().constraint_field

    def to_sampling_params(self, max_tokens: int, parse_tool_calls: bool = False) -> SamplingParams:
        """This request's SamplingParams; ``max_tokens`` is the checked budget for its prompt.

        ``parse_tool_calls``: a tool parser reads the output, so special tokens (call
        markers such as ``[TOOL_CALLS]``) stay in the text unless the request says otherwise.
        """
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        forced = self.forced_tool_calls()
        if forced is not None and self._structured_outputs() is not None:
            raise RequestError(f"tool_choice {self.effective_tool_choice!r} cannot be combined with "
                               f"{self._structured_outputs()[0]}", param="tool_choice")
        skip_special_tokens = None
        if parse_tool_calls and "skip_special_tokens" not in self.model_fields_set:
            skip_special_tokens = False
        return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs,
                                     ("tool_choice", forced) if forced else None, skip_special_tokens)


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


# -- responses ----------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatChoiceLogProbs(BaseModel):
    content: list[ChatLogProbsContent] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
