"""One chat choice's output as an OpenAI message: reasoning, content and tool calls, finished or streamed.

The reasoning parser (if the server has one) splits ``reasoning_content`` from the
answer; the tool parser (if the request may call tools) reads calls from that answer.
Both are plugins with the same streaming contract: each call is given all the text so
far, returns what it adds, and is called once more with ``finished=True`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.core.parsers import DeltaMessage


@dataclass
class ParsedMessage:
    """A finished choice: what goes in its ``message``."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class MessageParser:
    """Parses one choice; use one instance per choice (the parsers keep stream state).

    ``reasoning_parser`` and ``tool_parser`` are parser instances or None. Without
    either, the text is the content unchanged.
    """

    def __init__(self, reasoning_parser: Any = None, tool_parser: Any = None) -> None:
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        self._text = ""
        self._content = ""  # the answer streamed so far (after the reasoning)
        self.tools_called = False

    def parse(self, text: str) -> ParsedMessage:
        """The message of a finished text."""
        reasoning, content = None, text
        if self.reasoning_parser is not None:
            reasoning, content = self.reasoning_parser.extract_reasoning_content(text)
        message = ParsedMessage(content, reasoning)
        if self.tool_parser is not None and content is not None:
            extracted = self.tool_parser.extract_tool_calls(content)
            if extracted.tools_called:
                self.tools_called = True
                message.content = extracted.content
                message.tool_calls = [call.to_dict() for call in extracted.tool_calls]
        return message

    def feed(self, text: str, finished: bool) -> DeltaMessage | None:
        """What ``text`` (all the choice's text so far) adds to the streamed message; None if nothing yet.

        Call it with ``finished=True`` once, last (``text`` may be unchanged then): text held
        back because it could still start a tag or a call is released.
        """
        previous, self._text = self._text, text
        if self.reasoning_parser is None:
            delta = DeltaMessage(content=text[len(previous):] or None)
        else:
            delta = self.reasoning_parser.extract_reasoning_content_streaming(
                previous, text, text[len(previous):], finished=finished) or DeltaMessage()
        if self.tool_parser is not None:
            previous_content = self._content
            self._content += delta.content or ""
            tool_delta = self.tool_parser.extract_tool_calls_streaming(
                previous_content, self._content, delta.content or "", finished=finished) or DeltaMessage()
            delta.content, delta.tool_calls = tool_delta.content, tool_delta.tool_calls
            self.tools_called = self.tools_called or bool(tool_delta.tool_calls)
        if delta.content is None and delta.reasoning_content is None and not delta.tool_calls:
            return None
        return delta
