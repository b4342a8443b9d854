"""Hermes tool calls (Qwen 2.5/3, Hermes 2/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

from __future__ import annotations

from pagedllm.core.tool_parser import (
    Segments,
    ToolParser,
    call_from_dict,
    decode_json,
    held_back,
    skip_whitespace,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    """Each call is one JSON object between ``<tool_call>`` and ``</tool_call>``.

    The object is read as JSON, so the tags may appear inside its strings. A complete
    object whose closing tag is missing at the end of the text is still a call (the
    model stopped right after it); anything else that fails is content up to and
    including the next closing tag.
    """

    def find_start(self, text: str, pos: int) -> int:
        return text.find(START, pos)

    def num_held_back(self, text: str, pos: int) -> int:
        return held_back(text, pos, START)

    def parse_region(self, text: str, start: int, final: bool) -> tuple[Segments, int | None]:
        body = start + len(START)
        decoded = decode_json(text, body)
        if decoded is None and not final:
            return [], None  # truncated so far, or invalid: the complete text decides
        if decoded is not None:
            call = call_from_dict(decoded[0])
            after = skip_whitespace(text, decoded[1])
            if call is not None:
                if text.startswith(END, after):
                    return [call], after + len(END)
                if END.startswith(text[after:]):  # the text ends here, or inside the closing tag
                    return ([call], len(text)) if final else ([], None)
        close = text.find(END, body if decoded is None else decoded[1])
        if close >= 0:
            return [text[start : close + len(END)]], close + len(END)
        return ([text[start:]], len(text)) if final else ([], None)
