"""``tool_choice`` "required" and named functions: the constraint that forces valid calls, and reading its output.

With such a ``tool_choice`` the model must call a tool whatever it would rather say, so
the output is constrained (guided decoding) to a JSON array of calls whose arguments
follow each tool's ``parameters`` schema::

    [{"name": "get_weather", "parameters": {"city": "Paris"}}, ...]

This format is the same for every model (it does not depend on the tool parser) and
is read by :class:`ForcedToolCallParser`, finished or streamed.
"""

from __future__ import annotations

from typing import Any

from pagedllm.core.parsers import FunctionCall
from pagedllm.core.sampling_params import StructuredOutputsParams
from pagedllm.core.tool_parser import Segments, ToolParser, call_from_dict, decode_json, skip_whitespace


def _function(tool: Any, index: int) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
    return function


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "parameters": parameters},
            "required": ["name", "parameters"]}


def tool_choice_structured_outputs(tools: list[dict[str, Any]] | None, tool_choice: Any,
                                   parallel_tool_calls: bool = True) -> StructuredOutputsParams | None:
    """The constraint that makes the model call a tool, or None when the choice is free.

    ``tools`` and ``tool_choice`` are OpenAI's request fields. ``"required"`` forces one or
    more calls of any tool; ``{"type": "function", "function": {"name": NAME}}`` exactly
    one call of NAME. ``"auto"``, ``"none"`` and None leave the model free (None is
    returned). ``parallel_tool_calls=False`` allows a single call. Bad values are a
    ValueError naming the field.
    """
    if tool_choice in (None, "auto", "none"):
        return None
    functions = [_function(tool, i) for i, tool in enumerate(tools or [])]
    if not functions:
        raise ValueError(f"tool_choice {tool_choice!r} needs a non-empty tools list")
    if tool_choice == "required":
        items: dict[str, Any] = {"anyOf": [_call_schema(f) for f in functions]}
        limit = {} if parallel_tool_calls else {"maxItems": 1}
        return StructuredOutputsParams(json={"type": "array", "items": items, "minItems": 1, **limit})
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
    chosen = [f for f in functions if f["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice names function '{name}', which is not in tools: "
                         f"{', '.join(f['name'] for f in functions)}")
    return StructuredOutputsParams(json={"type": "array", "items": _call_schema(chosen[0]), "minItems": 1, "maxItems": 1})


class ForcedToolCallParser(ToolParser):
    """Reads the ``[{"name": ..., "parameters": {...}}, ...]`` array a forced tool choice produces.

    Each call is committed (streamed) as soon as its object is complete; if the output
    was cut short (``max_tokens``), the calls before the cut are kept and the rest is
    content, in the finished result and the stream alike.
    """

    def find_start(self, text: str, pos: int) -> int:
        first = skip_whitespace(text, pos)
        return first if pos == 0 and text.startswith("[", first) else -1

    def parse_region(self, text: str, start: int, final: bool) -> tuple[Segments, int | None]:
        pos, content_from = start + 1, start
        segments: Segments = []
        while True:
            decoded = decode_json(text, pos)
            if decoded is None and not final:
                return segments, None
            call: FunctionCall | None = None if decoded is None else call_from_dict(decoded[0], ("parameters", "arguments"))
            if call is None:
                return segments + [text[content_from:]], len(text)
            segments.append(call)
            after = skip_whitespace(text, decoded[1])
            if text.startswith(",", after):
                pos, content_from = after + 1, decoded[1]
            elif text.startswith("]", after):
                return segments, after + 1
            elif after == len(text) and not final:
                return segments, None
            else:
                return segments + [text[decoded[1]:]], len(text)
