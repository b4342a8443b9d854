"""POST /v1/chat/completions: the conversation through the chat template, answered whole or as SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from pagedllm.core.outputs import RequestOutput
from pagedllm.core.request import PositionLogprobs
from pagedllm.core.tool_choice import ForcedToolCallParser
from pagedllm.entrypoints.openai.message_parser import MessageParser
from pagedllm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChoiceLogProbs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProb,
    ChatLogProbsContent,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
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


def _logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob_value(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs], num_top: int,
                  as_ids: bool = False) -> ChatChoiceLogProbs:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and the ``num_top`` most likely."""
    content = []
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        top = sorted((item for item in position.items() if item[1].rank <= num_top), key=lambda item: item[1].rank)
        content.append(ChatLogProbsContent(
            **_logprob(token_name(token_id, chosen.decoded_token, as_ids), chosen.logprob),
            top_logprobs=[ChatLogProb(**_logprob(token_name(i, lp.decoded_token, as_ids), lp.logprob))
                          for i, lp in top[:num_top]],
        ))
    return ChatChoiceLogProbs(content=content)


class ChatServing:
    def __init__(self, serving: OpenAIServing) -> None:
        """Loads the server's tool and reasoning parsers: an unknown name fails here, at start-up."""
        self.serving = serving
        plugins = serving.engine.engine.plugins
        server_config = serving.server_config
        self.tool_parser = None
        if server_config.tool_call_parser:
            self.tool_parser = plugins.load("tool_parser", server_config.tool_call_parser)
        elif server_config.enable_auto_tool_choice:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (one of: "
                             f"{', '.join(plugins.names('tool_parser'))})")
        name = serving.engine.config.structured_output_config.reasoning_parser
        self.reasoning_parser = plugins.load("reasoning_parser", name) if name else None

    def _tool_parser(self, request: ChatCompletionRequest):
        """The class reading this request's tool calls: None when the model may not call tools."""
        choice = request.effective_tool_choice
        if not request.tools or choice == "none":
            return None
        if choice != "auto":
            return ForcedToolCallParser
        if not (self.serving.server_config.enable_auto_tool_choice and self.tool_parser is not None):
            raise RequestError('"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                               "--tool-call-parser", param="tool_choice" if request.tool_choice else "tools")
        return self.tool_parser

    def _message_parser(self, tool_parser) -> MessageParser:
        tokenizer = self.serving.tokenizer
        return MessageParser(self.reasoning_parser(tokenizer) if self.reasoning_parser else None,
                             tool_parser(tokenizer) if tool_parser else None)

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | EventStream:
        """The response, or (``stream: true``) its SSE events; raises RequestError."""
        s = self.serving
        s.check_model(request.model)
        s.warn_ignored_fields(request)
        if request.stream_options is not None and not request.stream:
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        template_kwargs = dict(request.chat_template_kwargs or {})
        if request.reasoning_effort is not None:
            template_kwargs.setdefault("reasoning_effort", request.reasoning_effort)
        tool_parser = self._tool_parser(request)
        prompt = s.chat_prompt(
            request.messages, add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message, chat_template=request.chat_template,
            chat_template_kwargs=template_kwargs, add_special_tokens=request.add_special_tokens, tools=request.tools,
        )
        field, requested = request.max_tokens_field
        params = request.to_sampling_params(s.check_max_tokens(requested, len(prompt.token_ids), field, "messages"),
                                            parse_tool_calls=tool_parser is not None)
        request_id = random_id("chatcmpl")
        (stream,) = await s.start([request_id], [prompt], [params], request.constraint_field)
        outputs = s.follow(stream, prompt)
        parsers = [self._message_parser(tool_parser) for _ in range(request.n)]
        if request.stream:
            return EventStream(self._stream(request, request_id, prompt, outputs, parsers), [request_id])
        return await self._collect(request, request_id, prompt, outputs, parsers)

    @staticmethod
    def _echo_prefix(request: ChatCompletionRequest) -> str:
        """With ``echo``, the answer repeats a final assistant message it continues."""
        last = request.messages[-1]
        if request.echo and last.role == "assistant":
            return last.to_template().get("content") or ""
        return ""

    async def _collect(self, request: ChatCompletionRequest, request_id: str, prompt: EnginePrompt,
                       outputs: AsyncIterator[RequestOutput], parsers: list[MessageParser]) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        async with aclosing(merge([outputs])) as merged:
            async for _, final in merged:
                pass
        assert final is not None and final.finished
        if "error" in final.extra:
            raise engine_error(final, request.constraint_field)
        prefix = self._echo_prefix(request)
        num_top = request.top_logprobs or 0
        choices = []
        for c in final.outputs:
            parser = parsers[c.index]
            parsed = parser.parse(c.text)
            content = prefix + parsed.content if parsed.content is not None else prefix or None
            choices.append(ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=content, reasoning_content=parsed.reasoning_content,
                                            tool_calls=parsed.tool_calls),
                logprobs=chat_logprobs(c.token_ids, c.logprobs or [], num_top, request.return_tokens_as_token_ids) if request.logprobs else None,
                finish_reason="tool_calls" if parser.tools_called else c.finish_reason, stop_reason=c.stop_reason,
            ))
        num_prompt = len(prompt.token_ids)
        num_generated = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=request_id, model=self.serving.model_name, choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated, total_tokens=num_prompt + num_generated),
            prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs) if request.prompt_logprobs is not None else None,
        )

    async def _stream(self, request: ChatCompletionRequest, request_id: str, prompt: EnginePrompt,
                      outputs: AsyncIterator[RequestOutput], parsers: list[MessageParser]) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.serving.model_name
        num_top = request.top_logprobs or 0

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)
            return sse(body.model_dump_json(exclude_none=True))

        prefix = self._echo_prefix(request)
        for index in range(request.n):  # the role first, as OpenAI does, before any token
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=prefix))])
        sent_tokens = [0] * request.n
        done: set[int] = set()
        try:
            async with aclosing(merge([outputs])) as merged:
                async for _, output in merged:
                    if "error" in output.extra:
                        raise engine_error(output, request.constraint_field)
                    for c in output.outputs:
                        if c.index in done:
                            continue
                        parser = parsers[c.index]
                        delta = parser.feed(c.text, c.finished)
                        new_ids = c.token_ids[sent_tokens[c.index]:]
                        if not (delta or c.finished or (request.logprobs and new_ids)):
                            continue
                        logprobs = None
                        if request.logprobs:
                            logprobs = chat_logprobs(new_ids, (c.logprobs or [])[sent_tokens[c.index]:], num_top,
                                                     request.return_tokens_as_token_ids)
                        sent_tokens[c.index] = len(c.token_ids)
                        finish_reason = c.finish_reason
                        if c.finished:
                            done.add(c.index)
                            finish_reason = "tool_calls" if parser.tools_called else c.finish_reason
                        yield chunk([ChatStreamChoice(
                            index=c.index, delta=DeltaMessage(**delta.to_dict()) if delta else DeltaMessage(),
                            logprobs=logprobs, finish_reason=finish_reason, stop_reason=c.stop_reason,
                        )])
            if request.stream_options is not None and request.stream_options.include_usage:
                num_prompt, num_generated = len(prompt.token_ids), sum(sent_tokens)
                yield chunk([], UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                                          total_tokens=num_prompt + num_generated))
        except Exception as exc:  # the response has started: report in the stream
            yield stream_error(exc)
        yield sse("[DONE]")
