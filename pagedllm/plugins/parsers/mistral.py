"""Mistral tool calls: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` and the newer ``[TOOL_CALLS]name[ARGS]{...}``."""

from __future__ import annotations

import re

from pagedllm.core.parsers import FunctionCall, make_tool_call_id
from pagedllm.core.tool_parser import (
    Segments,
    ToolParser,
    arguments_json,
    call_from_dict,
    decode_json,
    held_back,
    skip_whitespace,
)

TOOL_CALLS = "[TOOL_CALLS]"
# The newer form (tokenizer v11+): a function name, an optional [ARGS] token, the arguments object.
_NAME = re.compile(r"([A-Za-z0-9_.\-]+)\s*(?:\[ARGS\])?")


class MistralToolParser(ToolParser):
    """Both Mistral forms; ids are 9 letters and digits, the only ids Mistral's chat templates accept.

    After ``[TOOL_CALLS]`` either a JSON array of calls (all valid, or the whole region
    is content) or one ``name{arguments}`` call; several ``[TOOL_CALLS]`` may follow
    each other. A region that fails is content up to the next ``[TOOL_CALLS]``.
    """

    def make_id(self) -> str:
        return make_tool_call_id(9, prefix="")

    def find_start(self, text: str, pos: int) -> int:
        return text.find(TOOL_CALLS, pos)

    def num_held_back(self, text: str, pos: int) -> int:
        return held_back(text, pos, TOOL_CALLS)

    def parse_region(self, text: str, start: int, final: bool) -> tuple[Segments, int | None]:
        pos = skip_whitespace(text, start + len(TOOL_CALLS))
        if pos == len(text) and not final:
            return [], None
        if text.startswith("[", pos):
            decoded = decode_json(text, pos)
            if decoded is None and not final:
                return [], None
            items = decoded[0] if decoded is not None and isinstance(decoded[0], list) else []
            calls = [call_from_dict(item) for item in items]
            if calls and all(calls):
                return calls, decoded[1]
        else:
            name = _NAME.match(text, pos)
            if name is not None and name.end() == len(text) and not final:
                return [], None  # the name or its [ARGS] token may go on
            decoded = decode_json(text, name.end()) if name is not None else None
            if decoded is None and name is not None and not final:
                return [], None
            arguments = arguments_json(decoded[0]) if decoded is not None and isinstance(decoded[0], dict) else None
            if arguments is not None:
                return [FunctionCall(name.group(1), arguments)], decoded[1]
        return self._malformed(text, start, final)

    def _malformed(self, text: str, start: int, final: bool) -> tuple[Segments, int | None]:
        """Content from ``start`` to the next ``[TOOL_CALLS]`` (or the end)."""
        following = text.find(TOOL_CALLS, start + len(TOOL_CALLS))
        if following >= 0:
            return [text[start:following]], following
        if final:
            return [text[start:]], len(text)
        return [text[start : len(text) - held_back(text, start + len(TOOL_CALLS), TOOL_CALLS)]], None
