"""Reasoning parsers: <think> blocks split from content, finished and streamed, and where reasoning ends."""

from __future__ import annotations

import random

import pytest

import pagedllm.plugins.parsers as parsers_plugin
from pagedllm.core.parsers import accumulate_deltas
from pagedllm.testing.tiny import make_tokenizer

# (case id, text, deepseek_r1 (reasoning, content), qwen3 (reasoning, content))
CASES = [
    ("both_tags", "<think>\nLet me think: 2+2.\n</think>\n\nIt is 4.",
     ("\nLet me think: 2+2.\n", "\n\nIt is 4."), ("\nLet me think: 2+2.\n", "\n\nIt is 4.")),
    ("missing_opening_tag", "The user wants 4.</think>It is 4.",
     ("The user wants 4.", "It is 4."), (None, "The user wants 4.</think>It is 4.")),
    ("no_think_block", "It is 4.", ("It is 4.", None), (None, "It is 4.")),
    ("never_closed", "<think>Still thinking about <b>tags</b> and </thi", ("Still thinking about <b>tags</b> and </thi", None),
     ("Still thinking about <b>tags</b> and </thi", None)),
    ("empty_reasoning", "<think>\n\n</think>\n\nHi 🙂", (None, "\n\nHi 🙂"), (None, "\n\nHi 🙂")),
    ("leading_whitespace", "\n<think>a < b</think>x", ("a < b", "x"), ("a < b", "x")),
    ("only_reasoning", "<think>hmm</think>", ("hmm", None), ("hmm", None)),
    ("tags_in_content", "<think>r</think>Use <think> and </think> literally.", ("r", "Use <think> and </think> literally."),
     ("r", "Use <think> and </think> literally.")),
    ("empty", "", (None, None), (None, None)),
]
PARSERS = {"deepseek_r1": 2, "qwen3": 3}
ALL = [pytest.param(name, text, case[PARSERS[name]], id=f"{name}-{case[0]}") for case in CASES for name in PARSERS
       for text in [case[1]]]


@pytest.fixture
def load(plugin_manager_factory):
    pm = plugin_manager_factory([("parsers", parsers_plugin)])
    return lambda name: pm.load("reasoning_parser", name)


@pytest.mark.parametrize("name, text, expected", ALL)
def test_finished_text(load, name, text, expected):
    assert load(name)().extract_reasoning_content(text, None) == expected


@pytest.mark.parametrize("name, text, expected", ALL)
def test_stream_equals_finished(load, name, text, expected):
    for seed in range(30):
        rng = random.Random(seed)
        parser, previous, deltas = load(name)(None), "", []
        while len(previous) < len(text):
            current = text[: len(previous) + rng.randint(1, 1 if seed == 0 else 6)]
            deltas.append(parser.extract_reasoning_content_streaming(previous, current, current[len(previous):]))
            previous = current
        deltas.append(parser.extract_reasoning_content_streaming(previous, previous, "", finished=True))
        content, reasoning, calls = accumulate_deltas(deltas)
        assert (reasoning, content) == expected, f"seed {seed}"
        assert calls == []


def test_reasoning_streams_as_it_comes(load):
    parser = load("deepseek_r1")()
    assert parser.extract_reasoning_content_streaming("", "I think</th", "I think</th").reasoning_content == "I think"
    delta = parser.extract_reasoning_content_streaming("I think</th", "I think</think>So", "ink>So")
    assert (delta.reasoning_content, delta.content) == (None, "So")


@pytest.mark.parametrize("name, text, ended", [
    ("deepseek_r1", "", False), ("deepseek_r1", "thinking", False), ("deepseek_r1", "<think>a", False),
    ("deepseek_r1", "a</think>", True), ("deepseek_r1", "<think>a</think>{", True),
    ("qwen3", "", True), ("qwen3", "{", True), ("qwen3", "<think>a", False), ("qwen3", "<think>a</think>", True),
])
def test_is_reasoning_end_on_text_and_token_ids(load, name, text, ended):
    tokenizer = make_tokenizer()
    parser = load(name)(tokenizer)
    assert parser.is_reasoning_end(text) is ended
    assert parser.is_reasoning_end(tokenizer.encode(text, add_special_tokens=False)) is ended
