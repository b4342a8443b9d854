"""Pythonic tool calls (Llama 3.2/4, ToolACE): a Python list of calls, ``[get_weather(city="Paris"), now()]``."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize

from pagedllm.core.parsers import FunctionCall
from pagedllm.core.tool_parser import Segments, ToolParser, held_back, skip_whitespace

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"  # Llama 4 wraps the list in these
_START = re.compile(r"(?:<\|python_start\|>\s*)?\[\s*[A-Za-z_][\w.]*\s*\(")
# A tail of the text that may still grow into _START.
_PARTIAL_START = re.compile(r"(?:<\|python_start\|>\s*)?(?:\[\s*(?:[A-Za-z_][\w.]*\s*)?)?\Z")
_BRACKETS = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}


class PythonicToolParser(ToolParser):
    """A list opening with ``[name(`` holds calls with keyword arguments of literal values.

    The list is read with Python's ``tokenize`` (to find its closing bracket, strings
    included) and ``ast`` (never evaluated). It counts only as a whole: if any element
    is not a call with literal keyword arguments, the list is content.
    """

    def find_start(self, text: str, pos: int) -> int:
        match = _START.search(text, pos)
        return match.start() if match else -1

    def num_held_back(self, text: str, pos: int) -> int:
        match = _PARTIAL_START.search(text, pos)
        partial = len(text) - match.start() if match and match.start() < len(text) else 0
        return max(partial, held_back(text, pos, PYTHON_START))

    def parse_region(self, text: str, start: int, final: bool) -> tuple[Segments, int | None]:
        pos = skip_whitespace(text, start + len(PYTHON_START)) if text.startswith(PYTHON_START, start) else start
        end = _closing_bracket(text, pos)
        if end is None:
            return ([text[start:]], len(text)) if final else ([], None)
        calls = _parse_calls(text[pos:end])
        if calls is None:
            return [text[start:end]], end
        after = skip_whitespace(text, end)
        if text.startswith(PYTHON_END, after):
            return calls, after + len(PYTHON_END)
        if not final and PYTHON_END.startswith(text[after:]):
            return calls, None  # the closing tag may follow
        return calls, end


def _closing_bracket(text: str, pos: int) -> int | None:
    """Index just past the bracket that closes the one at ``pos``; None if the text does not close it."""
    line_starts = [0]
    for line in io.StringIO(text[pos:]):
        line_starts.append(line_starts[-1] + len(line))
    depth = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(text[pos:]).readline):
            if token.type == tokenize.ERRORTOKEN:
                return None  # e.g. a string still open: its closing quote may come later
            if token.type == tokenize.OP and token.string in _BRACKETS:
                depth += _BRACKETS[token.string]
                if depth == 0:
                    row, col = token.end
                    return pos + line_starts[row - 1] + col
    except (tokenize.TokenError, SyntaxError):
        return None
    return None


def _parse_calls(source: str) -> list[FunctionCall] | None:
    """The calls of a list literal like ``[f(a=1), g()]``; None unless every element is such a call."""
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        name = _dotted_name(node.func) if isinstance(node, ast.Call) else None
        if name is None or node.args or any(k.arg is None for k in node.keywords):
            return None
        try:
            arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            calls.append(FunctionCall(name, json.dumps(arguments, ensure_ascii=False, allow_nan=False)))
        except (ValueError, TypeError, SyntaxError, RecursionError):  # not a literal, or no JSON form (sets, bytes)
            return None
    return calls


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None
