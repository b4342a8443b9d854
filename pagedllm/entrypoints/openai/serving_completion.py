"""POST /v1/completions: one engine request per prompt, answered whole or streamed as SSE."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from pagedllm.core.outputs import CompletionOutput, RequestOutput
from pagedllm.core.request import PositionLogprobs
from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    RequestError,
    UsageInfo,
    random_id,
)
from pagedllm.entrypoints.openai.serving import (
    EnginePrompt,
    EventStream,
    OpenAIServing,
    engine_error,
    logprob_value,
    merge,
    prompt_logprobs_json,
    sse,
    stream_error,
    token_name,
)

logger = logging.getLogger("pagedllm.entrypoints.openai")


def _prompt_list(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # one prompt as token ids
    return list(prompt)


def completion_logprobs(
    token_ids: Sequence[int], positions: Sequence[PositionLogprobs | None], tokenizer, text_offset: int,
    as_ids: bool = False,
) -> CompletionLogProbs:
    """OpenAI's completions shape; a position without logprobs (the first prompt token) gets None.

    Where two top tokens share a text, the key keeps the more likely one's logprob.
    """
    out = CompletionLogProbs()
    for token_id, position in zip(token_ids, positions):
        if position is None:
            token = token_name(token_id, tokenizer.decode([token_id]), as_ids)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            token = token_name(token_id, position[token_id].decoded_token, as_ids)
            out.token_logprobs.append(logprob_value(position[token_id].logprob))
            top: dict[str, float] = {}
            for top_id, lp in sorted(position.items(), key=lambda item: item[1].rank):
                top.setdefault(token_name(top_id, lp.decoded_token, as_ids), logprob_value(lp.logprob))
            out.top_logprobs.append(top)
        out.tokens.append(token)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


class CompletionServing:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, request: CompletionRequest) -> CompletionResponse | EventStream:
        """The response, or (``stream: true``) its SSE events; raises RequestError."""
        s = self.serving
        s.check_model(request.model)
        s.warn_ignored_fields(request)
        if request.stream_options is not None and not request.stream:
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        prompts = [s.tokenize_prompt(p, request.add_special_tokens) for p in _prompt_list(request.prompt)]
        params = [
            request.to_sampling_params(s.check_max_tokens(request.max_tokens, len(p.token_ids), "max_tokens", "prompt"))
            for p in prompts
        ]
        request_id = random_id("cmpl")
        ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        streams = await s.start(ids, prompts, params, request.constraint_field)
        outputs = [s.follow(stream, prompt) for stream, prompt in zip(streams, prompts)]
        if request.stream:
            return EventStream(self._stream(request, request_id, prompts, outputs), ids)
        return await self._collect(request, request_id, prompts, outputs)

    def _choice_logprobs(self, request: CompletionRequest, prompt: EnginePrompt, output: RequestOutput,
                         completion: CompletionOutput, start: int, echo: bool, text_offset: int) -> CompletionLogProbs | None:
        if request.logprobs is None:
            return None
        token_ids = completion.token_ids[start:]
        positions: list[PositionLogprobs | None] = list((completion.logprobs or [])[start:])
        if echo:
            token_ids = prompt.token_ids + token_ids
            positions = list(output.prompt_logprobs or [None] * len(prompt.token_ids)) + positions
        return completion_logprobs(token_ids, positions, self.serving.tokenizer, text_offset,
                                   request.return_tokens_as_token_ids)

    async def _collect(self, request: CompletionRequest, request_id: str, prompts: list[EnginePrompt],
                       outputs: list[AsyncIterator[RequestOutput]]) -> CompletionResponse:
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async with aclosing(merge(outputs)) as merged:
            async for i, output in merged:
                finals[i] = output
        choices = []
        for i, (prompt, output) in enumerate(zip(prompts, finals)):
            assert output is not None and output.finished
            if "error" in output.extra:
                raise engine_error(output, request.constraint_field)
            for completion in output.outputs:
                prefix = self.serving.prompt_text(prompt) if request.echo else ""
                choices.append(CompletionChoice(
                    index=i * request.n + completion.index, text=prefix + completion.text,
                    logprobs=self._choice_logprobs(request, prompt, output, completion, 0, request.echo, 0),
                    finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(output.prompt_logprobs) if request.prompt_logprobs is not None else None,
                ))
        num_prompt = sum(len(p.token_ids) for p in prompts)
        num_generated = sum(len(c.token_ids) for o in finals for c in o.outputs)  # type: ignore[union-attr]
        return CompletionResponse(
            id=request_id, model=self.serving.model_name, choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated, total_tokens=num_prompt + num_generated),
        )

    async def _stream(self, request: CompletionRequest, request_id: str, prompts: list[EnginePrompt],
                      outputs: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.serving.model_name
        sent_chars: dict[int, int] = {}  # choice index -> characters of its text sent
        sent_tokens: dict[int, int] = {}
        text_offsets: dict[int, int] = {}
        done: set[int] = set()
        try:
            async with aclosing(merge(outputs)) as merged:
                async for i, output in merged:
                    if "error" in output.extra:
                        raise engine_error(output, request.constraint_field)
                    prompt = prompts[i]
                    for completion in output.outputs:
                        index = i * request.n + completion.index
                        if index in done:
                            continue
                        first = index not in sent_tokens
                        num_chars, num_tokens = sent_chars.get(index, 0), sent_tokens.get(index, 0)
                        text = completion.text[num_chars:]
                        new_logprobs = request.logprobs is not None and len(completion.token_ids) > num_tokens
                        starts = first and (request.echo or request.prompt_logprobs is not None)
                        if not (text or new_logprobs or starts or completion.finished):
                            continue
                        echo = request.echo and first
                        prefix = self.serving.prompt_text(prompt) if echo else ""
                        logprobs = self._choice_logprobs(request, prompt, output, completion, num_tokens, echo,
                                                         text_offsets.get(index, 0))
                        if logprobs is not None:
                            text_offsets[index] = text_offsets.get(index, 0) + sum(map(len, logprobs.tokens))
                        show_prompt_logprobs = first and request.prompt_logprobs is not None
                        chunk = CompletionResponse(
                            id=request_id, created=created, model=model,
                            choices=[CompletionChoice(
                                index=index, text=prefix + text, logprobs=logprobs,
                                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                                prompt_logprobs=prompt_logprobs_json(output.prompt_logprobs) if show_prompt_logprobs else None,
                            )],
                        )
                        sent_chars[index] = len(completion.text)
                        sent_tokens[index] = len(completion.token_ids)
                        if completion.finished:
                            done.add(index)
                        yield sse(chunk.model_dump_json(exclude_none=True))
            if request.stream_options is not None and request.stream_options.include_usage:
                num_prompt = sum(len(p.token_ids) for p in prompts)
                num_generated = sum(sent_tokens.values())
                usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                                  total_tokens=num_prompt + num_generated)
                chunk = CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage)
                yield sse(chunk.model_dump_json(exclude_none=True))
        except Exception as exc:  # the response has started: report in the stream
            yield stream_error(exc)
        yield sse("[DONE]")
