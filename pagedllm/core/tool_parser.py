"""ToolParser: the base of tool-call parsers, one left-to-right scan for finished text and streams.

A parser only says where a call region starts and what a region holds
(:meth:`ToolParser.find_start`, :meth:`ToolParser.parse_region`). The base class scans
the text with them and derives both results from the same scan:

- finished text: every region decided, calls and content;
- streams: the text so far is scanned again each time, but only the part that later
  text cannot change is *committed*, and a delta is what the new commitment adds.
  A call is committed when it is complete and valid, so a malformed or truncated call
  never leaks out half-parsed: like in the finished text, it becomes content. The
  accumulated stream therefore equals the finished result, whatever the deltas.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pagedllm.core.parsers import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCalls,
    FunctionCall,
    ToolCall,
    make_tool_call_id,
)

#: A scan's result: content strings and calls, in text order.
Segments = list[str | FunctionCall]



def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN and Infinity


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_json(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``pos`` (after whitespace) and where it ends; None if there is none (yet)."""
    pos = skip_whitespace(text, pos)
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def arguments_json(value: Any) -> str | None:
    """A call's arguments as the JSON text OpenAI sends; None unless they are an object.

    A JSON string holding an object is accepted too (some models quote their arguments).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a number too large for a float became inf
        return None


def call_from_dict(obj: Any, argument_keys: Sequence[str] = ("arguments", "parameters")) -> FunctionCall | None:
    """``{"name": str, "arguments" | "parameters": {...}}`` as a call; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    keys = [k for k in argument_keys if k in obj]
    arguments = arguments_json(obj[keys[0]]) if keys else "{}"
    return None if arguments is None else FunctionCall(obj["name"], arguments)


def held_back(text: str, pos: int, marker: str) -> int:
    """Length of the longest tail of ``text[pos:]`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text) - pos), 0, -1):
        if marker.startswith(text[len(text) - n :]):
            return n
    return 0


class ToolParser:
    """Turns model text into OpenAI tool calls; one instance per request when streaming.

    Subclasses implement :meth:`find_start` and :meth:`parse_region` (and may override
    :meth:`num_held_back`); everything else is shared.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._num_calls_sent = 0
        self._num_content_sent = 0

    # -- what a format defines --------------------------------------------------------

    def find_start(self, text: str, pos: int) -> int:
        """Index of the first call region at or after ``pos``; -1 if none starts there (yet)."""
        raise NotImplementedError

    def parse_region(self, text: str, start: int, final: bool) -> tuple[Segments, int | None]:
        """Read the call region at ``start``: (segments, end).

        Segments are calls, and content for text that turned out not to be a valid
        call. ``end`` is where scanning goes on, or None when ``final`` is False and
        more text is needed to decide; the segments returned are then only the part
        already certain. With ``final`` every region must be decided.
        """
        raise NotImplementedError

    def num_held_back(self, text: str, pos: int) -> int:
        """How much of the tail of content ``text[pos:]`` may still begin a call region."""
        return 0

    def make_id(self) -> str:
        return make_tool_call_id()

    # -- the scan ---------------------------------------------------------------------

    def scan(self, text: str, final: bool) -> Segments:
        """Content and calls of ``text``; without ``final``, only the committed part."""
        segments: Segments = []
        pos = 0
        while True:
            start = self.find_start(text, pos)
            if start < 0:
                end = len(text) if final else len(text) - self.num_held_back(text, pos)
                segments.append(text[pos:end])
                return segments
            segments.append(text[pos:start])
            region, end = self.parse_region(text, start, final)
            segments.extend(region)
            if end is None:
                return segments
            pos = end

    # -- the public interface -----------------------------------------------------------

    def extract_tool_calls(self, text: str, request: Any = None) -> ExtractedToolCalls:
        """Split a finished text into tool calls and content (malformed calls stay content)."""
        segments = self.scan(text, final=True)
        calls = [ToolCall(s, id=self.make_id()) for s in segments if isinstance(s, FunctionCall)]
        content = "".join(s for s in segments if isinstance(s, str))
        return ExtractedToolCalls(bool(calls), calls, content if content.strip() else None)

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int] = (),
        current_token_ids: Sequence[int] = (),
        delta_token_ids: Sequence[int] = (),
        request: Any = None,
        *,
        finished: bool = False,
    ) -> DeltaMessage | None:
        """What ``current_text`` (all text so far) adds to the message; None if nothing yet.

        Call it for every chunk, and once more with ``finished=True`` when the stream
        ends (the delta may be empty): text held back because it could still begin a
        call is released then. Only ``current_text`` is read; the other arguments keep
        vLLM's signature.
        """
        segments = self.scan(current_text, final=finished)
        content = "".join(s for s in segments if isinstance(s, str))
        calls = [s for s in segments if isinstance(s, FunctionCall)]
        delta = DeltaMessage()
        # Whitespace-only content is held until real text follows, as the finished result drops it.
        if content.strip() and len(content) > self._num_content_sent:
            delta.content = content[self._num_content_sent :]
            self._num_content_sent = len(content)
        for index in range(self._num_calls_sent, len(calls)):
            call = calls[index]
            delta.tool_calls.append(DeltaToolCall(
                index, DeltaFunctionCall(call.name, call.arguments), id=self.make_id(), type="function"))
        self._num_calls_sent = len(calls)
        return delta if delta.content is not None or delta.tool_calls else None
