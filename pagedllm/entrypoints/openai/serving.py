"""What the endpoints share: model names, tokenization and chat templates, budget checks,
starting engine requests, and following their outputs (metrics, request log, SSE framing)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pagedllm.core.async_engine import AsyncLLMEngine, RequestStream
from pagedllm.core.config import ServerConfig
from pagedllm.core.outputs import RequestOutput
from pagedllm.core.request import PositionLogprobs
from pagedllm.core.sampling_params import SamplingParams
from pagedllm.entrypoints.openai.metrics import RequestTracker, ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    ChatMessage,
    ErrorInfo,
    ErrorResponse,
    RequestError,
)

logger = logging.getLogger("pagedllm.entrypoints.openai")

#: Log-probabilities are JSON numbers: -inf becomes this, as in vLLM.
MIN_LOGPROB = -9999.0


@dataclass
class EnginePrompt:
    """A prompt ready for the engine: its token ids and (when known) its text."""

    token_ids: list[int]
    text: str | None = None


@dataclass
class EventStream:
    """A streamed response's SSE events and the engine requests behind them.

    The server aborts the requests when the response ends for any reason (finished ones
    are unaffected), so a client that leaves early always frees its KV blocks.
    """

    events: AsyncIterator[str]
    request_ids: list[str]


def served_model_names(engine: AsyncLLMEngine) -> list[str]:
    """The names requests may use; the first is the one responses report."""
    mc = engine.config.model_config
    names = mc.served_model_name
    if isinstance(names, str):  # a config file may give one name as a string
        names = [names]
    return list(names or [mc.model or engine.engine.source.path.stem])


def sse(data: str) -> str:
    return f"data: {data}\n\n"


def error_body(exc: RequestError) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)).model_dump()


class OpenAIServing:
    """Helpers over one AsyncLLMEngine, shared by the completion, chat and token endpoints."""

    def __init__(self, engine: AsyncLLMEngine, server_config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.server_config = server_config
        self.metrics = metrics
        self.model_names = served_model_names(engine)
        self.model_name = self.model_names[0]
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len

    # -- checks ---------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise RequestError(f"The model '{model}' does not exist; this server serves {', '.join(self.model_names)}",
                               status=404, param="model", code="model_not_found")

    def check_max_tokens(self, requested: int | None, num_prompt_tokens: int, field: str, prompt_field: str) -> int:
        """The output budget: ``requested`` if prompt + output fit the model, else a 400 naming ``field``."""
        room = self.max_model_len - num_prompt_tokens
        if room <= 0:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the {prompt_field} has "
                f"{num_prompt_tokens} tokens, which leaves no room to generate", param=prompt_field)
        if requested is None:
            return room
        if requested > room:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens, but {num_prompt_tokens} "
                f"{prompt_field} tokens plus {field}={requested} make {num_prompt_tokens + requested}; "
                f"lower {field} (at most {room}) or shorten the {prompt_field}", param=field)
        return requested

    @staticmethod
    def warn_ignored_fields(request: Any) -> None:
        if request.model_extra:
            logger.warning("ignored unknown request fields: %s", ", ".join(sorted(request.model_extra)))

    # -- prompts ----------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | Sequence[int], add_special_tokens: bool, field: str = "prompt") -> EnginePrompt:
        if isinstance(prompt, str):
            token_ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
            text: str | None = prompt
        else:
            token_ids, text = list(prompt), None
            vocab_size = self.engine.engine.vocab_size
            bad = [t for t in token_ids if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(f"{field} has token ids outside the vocabulary (size {vocab_size}): {bad[:10]}",
                                   param=field)
        if not token_ids:
            raise RequestError(f"{field} is empty", param=field)
        return EnginePrompt(token_ids, text)

    def prompt_text(self, prompt: EnginePrompt) -> str:
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids)
        return prompt.text

    def chat_prompt(
        self, messages: list[ChatMessage], *, add_generation_prompt: bool, continue_final_message: bool,
        chat_template: str | None, chat_template_kwargs: dict[str, Any] | None, add_special_tokens: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> EnginePrompt:
        """Render a conversation with the model's chat template (or the request's) and tokenize it.

        ``tools`` (OpenAI's tool list) go to the template, which shows them to the model.
        """
        import jinja2

        if continue_final_message and add_generation_prompt:
            raise RequestError("continue_final_message and add_generation_prompt cannot both be true",
                               param="continue_final_message")
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template; start the server with --chat-template, or use "
                               "/v1/completions", param="messages")
        conversation = [m.to_template() for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=chat_template, tools=tools,
                **(chat_template_kwargs or {}),
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise RequestError(f"the chat template could not render these messages: {exc}", param="messages") from None
        prompt = self.tokenize_prompt(text, add_special_tokens, field="messages")
        prompt.text = text
        return prompt

    # -- requests -----------------------------------------------------------------------

    async def start(self, request_ids: list[str], prompts: list[EnginePrompt], params: list[SamplingParams],
                    constraint_field: str | None = None) -> list[RequestStream]:
        """Add one engine request per prompt; if one is refused, abort the others and raise.

        The engine refuses a structured-output constraint that cannot compile: the 400
        names ``constraint_field``, the request field it came from.
        """
        streams: list[RequestStream] = []
        try:
            for request_id, prompt, p in zip(request_ids, prompts, params):
                streams.append(await self.engine.add_request(request_id, prompt.token_ids, p))
        except BaseException as exc:
            for stream in streams:
                self.engine.abort(stream.request_id)
            if isinstance(exc, ValueError) and constraint_field and p.structured_outputs is not None:
                raise RequestError(f"{constraint_field}: {exc}", param=constraint_field) from None
            raise
        return streams

    async def follow(self, stream: RequestStream, prompt: EnginePrompt) -> AsyncIterator[RequestOutput]:
        """Yield a request's outputs while feeding metrics; log one line when it ends; abort if left early."""
        stream.on_output = RequestTracker(self.metrics).observe
        start = time.monotonic()
        last: RequestOutput | None = None
        try:
            async for output in stream:
                last = output
                yield output
        finally:
            if not stream.finished:
                self.engine.abort(stream.request_id)
            self._log_request(stream, prompt, last, time.monotonic() - start)

    def _log_request(self, stream: RequestStream, prompt: EnginePrompt, last: RequestOutput | None,
                     latency: float) -> None:
        num_generated = sum(len(c.token_ids) for c in last.outputs) if last else 0
        if last is not None and last.finished:
            status = "finish=" + ",".join(str(c.finish_reason) for c in last.outputs)
        else:
            status = "aborted"
        ttft = ""
        if last is not None and last.metrics is not None and last.metrics.first_token_time is not None:
            ttft = f" ttft={last.metrics.first_token_time - last.metrics.arrival_time:.3f}s"
        shown = ""
        if self.server_config.max_log_len > 0:
            shown = f" prompt={self.prompt_text(prompt)[: self.server_config.max_log_len]!r}"
        logger.info("request %s: prompt_tokens=%d generation_tokens=%d %s%s latency=%.3fs%s", stream.request_id,
                    len(prompt.token_ids), num_generated, status, ttft, latency, shown)


async def merge(iterators: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async generators as they come, tagged with the generator's index.

    Closing the merge (or cancelling it) closes every generator, so their clean-up runs now.
    """
    pending: dict[asyncio.Future, int] = {}
    try:
        if len(iterators) == 1:
            async for item in iterators[0]:
                yield 0, item
            return
        pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[i]))] = i
                yield i, item
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for it in iterators:
            await it.aclose()


async def until_disconnected(receive: Any, coro: Any) -> Any:
    """Run ``coro``; if the client disconnects first, cancel it (aborting its requests) and return None."""
    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        logger.info("client disconnected; its request was aborted")
        return None
    return work.result()


def token_name(token_id: int, text: str | None, as_id: bool) -> str:
    """How a token is named in logprobs: its text, or ``token_id:<id>`` when asked."""
    return f"token_id:{token_id}" if as_id else text or ""


def logprob_value(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def prompt_logprobs_json(prompt_logprobs: list[PositionLogprobs | None] | None) -> list | None:
    """vLLM's ``prompt_logprobs`` shape: per prompt position, token id -> {logprob, rank, decoded_token}."""
    if prompt_logprobs is None:
        return None
    return [
        None if position is None else {
            str(token_id): {"logprob": logprob_value(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token_id, lp in position.items()
        }
        for position in prompt_logprobs
    ]


def engine_error(output: RequestOutput, param: str | None) -> RequestError:
    """The error of a request the engine ended after accepting it (a constraint that failed to compile)."""
    return RequestError(output.extra["error"], param=param)


def stream_error(exc: Exception) -> str:
    """An error event for a stream whose 200 status is already sent."""
    if not isinstance(exc, RequestError):
        logger.error("streamed request failed: %s: %s", type(exc).__name__, exc)
        exc = RequestError(str(exc), status=500, type="server_error", code=type(exc).__name__)
    return sse(json.dumps(error_body(exc)))
