"""Llama 3.1/3.2 JSON tool calls: ``<|python_tag|>`` (optional), then ``{"name": ..., "parameters": {...}}``, ``;``-separated."""

from __future__ import annotations

from pagedllm.core.tool_parser import (
    Segments,
    ToolParser,
    call_from_dict,
    decode_json,
    held_back,
    skip_whitespace,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """Calls follow ``<|python_tag|>``, or open the reply with ``{`` when the tag is left out.

    Calls are separated by ``;``. Each complete call stands on its own: if a later
    object is not a call (or is cut off), that object and the rest of the text are
    content, and the calls before it are kept.
    """

    def find_start(self, text: str, pos: int) -> int:
        tag = text.find(PYTHON_TAG, pos)
        if pos == 0:
            first = skip_whitespace(text, 0)
            if text.startswith("{", first) and (tag < 0 or first < tag):
                return first
        return tag

    def num_held_back(self, text: str, pos: int) -> int:
        return held_back(text, pos, PYTHON_TAG)

    def parse_region(self, text: str, start: int, final: bool) -> tuple[Segments, int | None]:
        pos = start + len(PYTHON_TAG) if text.startswith(PYTHON_TAG, start) else start
        content_from = start  # where the text turns into content if the next object fails
        segments: Segments = []
        while True:
            decoded = decode_json(text, pos)
            if decoded is None and not final:
                return segments, None
            call = None if decoded is None else call_from_dict(decoded[0])
            if call is None:
                return segments + [text[content_from:]], len(text)
            segments.append(call)
            end = decoded[1]
            after = skip_whitespace(text, end)
            if text.startswith(";", after):
                pos, content_from = after + 1, end
            elif after == len(text) and not final:
                return segments, None  # a ";" and another call may follow
            else:
                return segments, end
