"""Tool parsers: finished text and streams in random deltas give the same calls and content."""

from __future__ import annotations

import json
import random
import re

import pytest

import pagedllm.plugins.parsers as parsers_plugin
from pagedllm.core.parsers import DeltaMessage, accumulate_deltas
from pagedllm.core.tool_parser import ToolParser

WEATHER = {"city": "Paris", "unit": "celsius"}
NESTED = {"query": {"filters": [{"field": "année", "op": "≥", "value": 2020}], "limit": 5}, "tags": ["🚀", "naïve"]}

# parser name -> [(case id, model text, expected [(name, arguments)], expected content)]
CASES: dict[str, list[tuple[str, str, list[tuple[str, dict]], str | None]]] = {
    "hermes": [
        ("one", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
         [("get_weather", WEATHER)], None),
        ("several", '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>',
         [("a", {}), ("b", {"x": 1})], None),
        ("text_before", 'Let me check the weather.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>',
         [("get_weather", WEATHER)], "Let me check the weather.\n"),
        ("nested_unicode", '<tool_call>{"name": "search", "arguments": ' + json.dumps(NESTED, ensure_ascii=False) + "}</tool_call>",
         [("search", NESTED)], None),
        ("escaped_unicode", '<tool_call>{"name": "say", "arguments": {"text": "caf\\u00e9 \\ud83d\\ude80"}}</tool_call>',
         [("say", {"text": "café 🚀"})], None),
        ("delimiters_in_strings", '<tool_call>{"name": "echo", "arguments": {"s": "</tool_call> and <tool_call>{"}}</tool_call>',
         [("echo", {"s": "</tool_call> and <tool_call>{"})], None),
        ("unclosed_but_complete", '<tool_call>{"name": "f", "arguments": {"a": 1}}', [("f", {"a": 1})], None),
        ("malformed_json", 'Hi <tool_call>{"name": f}</tool_call> bye', [], 'Hi <tool_call>{"name": f}</tool_call> bye'),
        ("not_a_call", '<tool_call>{"function": "f"}</tool_call>', [], '<tool_call>{"function": "f"}</tool_call>'),
        ("truncated", 'Sure <tool_call>{"name": "f", "arguments": {"a": "</tool_call>',
         [], 'Sure <tool_call>{"name": "f", "arguments": {"a": "</tool_call>'),
        ("bad_then_good", '<tool_call>oops</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>',
         [("g", {})], "<tool_call>oops</tool_call>"),
        ("no_call", "The capital of France is Paris. I <3 tools <tool", [], "The capital of France is Paris. I <3 tools <tool"),
    ],
    "llama3_json": [
        ("one", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', [("get_weather", WEATHER)], None),
        ("one_tagged", '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
         [("get_weather", WEATHER)], None),
        ("several", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1, 2]}}',
         [("a", {}), ("b", {"x": [1, 2]})], None),
        ("text_before", 'I will look it up. <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
         [("get_weather", WEATHER)], "I will look it up. "),
        ("nested_unicode", '{"name": "search", "parameters": ' + json.dumps(NESTED, ensure_ascii=False) + "}", [("search", NESTED)], None),
        ("delimiters_in_strings", '<|python_tag|>{"name": "echo", "parameters": {"s": "; {\\"name\\": \\"x\\"} <|python_tag|>"}}',
         [("echo", {"s": '; {"name": "x"} <|python_tag|>'})], None),
        ("malformed", '{"name": "f", "parameters": {"a": 1,}}', [], '{"name": "f", "parameters": {"a": 1,}}'),
        ("good_then_truncated", '{"name": "a", "parameters": {}}; {"name": "b", "param',
         [("a", {})], '; {"name": "b", "param'),
        ("truncated", '<|python_tag|>{"name": "f", "parameters": {"a"', [], '<|python_tag|>{"name": "f", "parameters": {"a"'),
        ("text_after", '{"name": "a", "parameters": {}}\nDone.', [("a", {})], "\nDone."),
        ("json_answer_is_not_a_call", '{"answer": 42}', [], '{"answer": 42}'),
        ("no_call", "Here is some JSON: {\"name\": \"x\", \"parameters\": {}}", [],
         "Here is some JSON: {\"name\": \"x\", \"parameters\": {}}"),
    ],
    "mistral": [
        ("one", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', [("get_weather", WEATHER)], None),
        ("one_new_form", '[TOOL_CALLS]get_weather{"city": "Paris", "unit": "celsius"}', [("get_weather", WEATHER)], None),
        ("one_args_token", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', [("get_weather", WEATHER)], None),
        ("several", '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]',
         [("a", {}), ("b", {"x": 1})], None),
        ("several_new_form", '[TOOL_CALLS]a{}[TOOL_CALLS]b[ARGS]{"x": 1}', [("a", {}), ("b", {"x": 1})], None),
        ("text_before", 'Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
         [("get_weather", WEATHER)], "Checking. "),
        ("nested_unicode", "[TOOL_CALLS]search" + json.dumps(NESTED, ensure_ascii=False), [("search", NESTED)], None),
        ("quoted_arguments", '[TOOL_CALLS][{"name": "f", "arguments": "{\\"a\\": 1}"}]', [("f", {"a": 1})], None),
        ("delimiters_in_strings", '[TOOL_CALLS][{"name": "echo", "arguments": {"s": "[TOOL_CALLS]x{} ]"}}]',
         [("echo", {"s": "[TOOL_CALLS]x{} ]"})], None),
        ("malformed", '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"arguments": {}}] ok', [],
         '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"arguments": {}}] ok'),
        ("bad_then_good", "[TOOL_CALLS]no args here [TOOL_CALLS]g{}", [("g", {})], "[TOOL_CALLS]no args here "),
        ("truncated", '[TOOL_CALLS]get_weather[ARGS]{"city": "Par', [], '[TOOL_CALLS]get_weather[ARGS]{"city": "Par'),
        ("no_call", "Mistral [TOOL] calls [are] nice.", [], "Mistral [TOOL] calls [are] nice."),
    ],
    "pythonic": [
        ("one", '[get_weather(city="Paris", unit="celsius")]', [("get_weather", WEATHER)], None),
        ("several", "[a(), b(x=1, y=[1, 2.5, None, True])]", [("a", {}), ("b", {"x": 1, "y": [1, 2.5, None, True]})], None),
        ("text_before", 'Let me see. [get_weather(city="Paris", unit="celsius")]', [("get_weather", WEATHER)], "Let me see. "),
        ("llama4_tags", '<|python_start|>[get_weather(city="Paris", unit="celsius")]<|python_end|>', [("get_weather", WEATHER)], None),
        ("nested_unicode", "[search(query=" + repr(NESTED["query"]) + ", tags=" + repr(NESTED["tags"]) + ")]",
         [("search", NESTED)], None),
        ("delimiters_in_strings", "[echo(s='] [f(x=1)] \"', t=\"\"\"a)\nb\"\"\")]", [("echo", {"s": '] [f(x=1)] "', "t": "a)\nb"})], None),
        ("multiline", "[\n  a(x=1),\n  b(y='z'),\n]", [("a", {"x": 1}), ("b", {"y": "z"})], None),
        ("positional_argument", "[f(1, 2)]", [], "[f(1, 2)]"),
        ("not_a_literal", "[f(x=__import__('os').system('true'))]", [], "[f(x=__import__('os').system('true'))]"),
        ("mixed_list", "[f(x=1), 3]", [], "[f(x=1), 3]"),
        ("truncated", "[get_weather(city='Par", [], "[get_weather(city='Par"),
        ("text_after", "[f(x=1)]\nThat is all.", [("f", {"x": 1})], "\nThat is all."),
        ("no_call", "Lists like [1, 2] and [a b] (or f(x)) are text.", [], "Lists like [1, 2] and [a b] (or f(x)) are text."),
    ],
}

ALL_CASES = [pytest.param(name, *case, id=f"{name}-{case[0]}") for name, cases in CASES.items() for case in cases]


def load_parser(plugin_manager_factory, name: str) -> type[ToolParser]:
    pm = plugin_manager_factory([("parsers", parsers_plugin)])
    return pm.load("tool_parser", name)


def stream(parser: ToolParser, text: str, rng: random.Random, max_delta: int) -> list[DeltaMessage | None]:
    """Feed ``text`` in random deltas of 1..max_delta characters, then finish the stream."""
    deltas, previous = [], ""
    while len(previous) < len(text):
        current = text[: len(previous) + rng.randint(1, max_delta)]
        deltas.append(parser.extract_tool_calls_streaming(previous, current, current[len(previous):]))
        previous = current
    deltas.append(parser.extract_tool_calls_streaming(previous, previous, "", finished=True))
    return deltas


@pytest.mark.parametrize("name, case_id, text, expected_calls, expected_content", ALL_CASES)
def test_finished_text(plugin_manager_factory, name, case_id, text, expected_calls, expected_content):
    result = load_parser(plugin_manager_factory, name)(None).extract_tool_calls(text, None)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in result.tool_calls] == expected_calls
    assert result.tools_called == bool(expected_calls)
    assert result.content == expected_content
    id_format = r"[A-Za-z0-9]{9}" if name == "mistral" else r"call_[A-Za-z0-9]{24}"
    assert all(re.fullmatch(id_format, c.id) and c.type == "function" for c in result.tool_calls)
    assert len({c.id for c in result.tool_calls}) == len(result.tool_calls)


@pytest.mark.parametrize("name, case_id, text, expected_calls, expected_content", ALL_CASES)
def test_stream_equals_finished(plugin_manager_factory, name, case_id, text, expected_calls, expected_content):
    parser_cls = load_parser(plugin_manager_factory, name)
    finished = parser_cls(None).extract_tool_calls(text)
    for seed in range(25):
        rng = random.Random(seed)
        deltas = stream(parser_cls(None), text, rng, max_delta=1 if seed == 0 else rng.choice([2, 3, 5, 8]))
        content, reasoning, calls = accumulate_deltas(deltas)
        assert content == finished.content, f"seed {seed}"
        assert [(c.function.name, c.function.arguments) for c in calls] == [
            (c.function.name, c.function.arguments) for c in finished.tool_calls], f"seed {seed}"
        assert reasoning is None


@pytest.mark.parametrize("name", list(CASES))
def test_stream_deltas_are_openai_shaped(plugin_manager_factory, name):
    """Each call arrives once with index, id, type and name; content before a call streams before it."""
    text = {"hermes": 'Hello there.<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>',
            "llama3_json": 'Hello there.<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
            "mistral": 'Hello there.[TOOL_CALLS]a{}[TOOL_CALLS]b{"x": 1}',
            "pythonic": "Hello there.[a(), b(x=1)]"}[name]
    parser = load_parser(plugin_manager_factory, name)(None)
    deltas = [d for d in stream(parser, text, random.Random(1), max_delta=3) if d is not None]
    parts = [part for d in deltas for part in d.tool_calls]
    assert [(p.index, p.type, p.function.name) for p in parts] == [(0, "function", "a"), (1, "function", "b")]
    assert all(p.id for p in parts) and parts[0].id != parts[1].id
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert "".join(d.content or "" for d in deltas[:first_call]) == "Hello there."
    serialised = deltas[first_call].to_dict()
    assert serialised["tool_calls"][0]["function"]["name"] == "a" and "reasoning_content" not in serialised
    json.dumps([d.to_dict() for d in deltas])


def test_content_streams_before_the_end(plugin_manager_factory):
    """Plain text is not held back (only a tail that may begin a call tag is)."""
    parser = load_parser(plugin_manager_factory, "hermes")(None)
    assert parser.extract_tool_calls_streaming("", "Hello <tool", "Hello <tool").content == "Hello "
    assert parser.extract_tool_calls_streaming("Hello <tool", "Hello <tool>", ">").content == "<tool>"


def test_registered_names(plugin_manager_factory):
    pm = plugin_manager_factory([("parsers", parsers_plugin)])
    assert pm.names("tool_parser") == ["hermes", "llama3_json", "mistral", "pythonic"]
    assert pm.names("reasoning_parser") == ["deepseek_r1", "qwen3"]


FRAGMENTS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<|python_start|>", "<|python_end|>",
             '{"name": "f", "arguments": {"a": 1}}', '{"name": "g", "parameters": {}}', "[f(a=1)]", "[g(b='x'), h()]",
             "get_weather", "{", "}", "[", "]", "(", ")", '"', "'", ";", ",", " ", "\n", "é", "text", "\\", "1"]


@pytest.mark.parametrize("name", list(CASES))
def test_arbitrary_text_never_raises_and_streams_the_same(plugin_manager_factory, name):
    """Random mixes of the formats' delimiters and calls: no exception, stream == finished."""
    parser_cls = load_parser(plugin_manager_factory, name)
    rng = random.Random(name)
    for _ in range(150):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))
        finished = parser_cls(None).extract_tool_calls(text)
        content, _, calls = accumulate_deltas(stream(parser_cls(None), text, rng, max_delta=rng.randint(1, 6)))
        assert content == finished.content, text
        assert [(c.function.name, c.function.arguments) for c in calls] == [
            (c.function.name, c.function.arguments) for c in finished.tool_calls], text
        for call in finished.tool_calls:
            assert isinstance(json.loads(call.function.arguments), dict)
