"""The messages tool and reasoning parsers return: OpenAI-shaped tool calls and streamed deltas.

Parsers are plugins (``pagedllm_register_tool_parsers`` /
``pagedllm_register_reasoning_parsers``); these plain dataclasses are the contract
between them and the server, which serialises them with :meth:`to_dict`.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import asdict, dataclass, field
from typing import Any

_ID_ALPHABET = string.ascii_letters + string.digits


def make_tool_call_id(length: int = 24, prefix: str = "call_") -> str:
    """A fresh tool-call id in OpenAI's shape: ``call_`` + 24 random letters and digits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


@dataclass
class FunctionCall:
    name: str
    #: The arguments as a JSON object text (OpenAI sends a string, not an object).
    arguments: str


@dataclass
class ToolCall:
    function: FunctionCall
    id: str = field(default_factory=make_tool_call_id)
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExtractedToolCalls:
    """A finished text split into tool calls and the remaining content."""

    tools_called: bool
    tool_calls: list[ToolCall]
    #: Text outside the calls; None when it is empty or only whitespace.
    content: str | None


@dataclass
class DeltaFunctionCall:
    name: str | None = None
    arguments: str | None = None


@dataclass
class DeltaToolCall:
    """One tool call's part of a streamed chunk; ``id``, ``type`` and ``name`` come once, first."""

    index: int
    function: DeltaFunctionCall
    id: str | None = None
    type: str | None = None


@dataclass
class DeltaMessage:
    """What one streamed chunk adds to the assistant message."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI ``delta`` object: unset fields left out."""
        data = _drop_none(asdict(self))
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


def accumulate_deltas(deltas: list[DeltaMessage | None]) -> tuple[str | None, str | None, list[ToolCall]]:
    """(content, reasoning_content, tool_calls) that a client assembling ``deltas`` sees.

    Empty strings come back as None, like the non-streaming parsers return them.
    """
    content, reasoning = "", ""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        if delta is None:
            continue
        content += delta.content or ""
        reasoning += delta.reasoning_content or ""
        for part in delta.tool_calls:
            call = calls.setdefault(part.index, ToolCall(FunctionCall("", ""), id=part.id or ""))
            call.function.name += part.function.name or ""
            call.function.arguments += part.function.arguments or ""
    return content or None, reasoning or None, [calls[i] for i in sorted(calls)]
