"""Reasoning parsers: split ``<think>…</think>`` from the answer, for finished text and streams.

Like the tool parsers, one scan serves both: :meth:`ThinkReasoningParser.split` gives
the reasoning and content of a text, and without ``final`` only the part later text
cannot change (a tail that may be the start of ``</think>`` waits). Streaming sends
what that committed part adds, so the accumulated stream equals the finished result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagedllm.core.parsers import DeltaMessage
from pagedllm.core.tool_parser import held_back, skip_whitespace

START, END = "<think>", "</think>"


def _text_or_none(text: str) -> str | None:
    return text if text.strip() else None


class ThinkReasoningParser:
    """``<think>reasoning</think>content``; subclasses say whether output starts inside the block.

    A block never closed is all reasoning (the model was cut off while thinking).
    Reasoning and content that are empty or only whitespace come back as None. Use one
    instance per request when streaming.
    """

    #: True: the output starts inside the reasoning (the prompt opened ``<think>``).
    starts_in_reasoning = False

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._num_sent = {"reasoning_content": 0, "content": 0}

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of ``text``; without ``final``, only the committed part."""
        first = skip_whitespace(text, 0)
        if text.startswith(START, first):
            body = first + len(START)
        elif not final and START.startswith(text[first:]):
            return "", ""  # the opening tag may be on its way
        elif self.starts_in_reasoning:
            body = 0
        else:
            return "", text
        end = text.find(END, body)
        if end >= 0:
            return text[body:end], text[end + len(END) :]
        return text[body : len(text) - (0 if final else held_back(text, body, END))], ""

    def is_reasoning_end(self, output: str | Sequence[int]) -> bool:
        """Whether reasoning is over in this output (text or token ids), so the answer has begun.

        Guided decoding constrains only what follows: the engine asks this for every
        guided request until it says True.
        """
        text = output if isinstance(output, str) else self.tokenizer.decode(list(output), skip_special_tokens=False)
        first = skip_whitespace(text, 0)
        if text.startswith(START, first):
            return END in text[first + len(START) :]
        return not self.starts_in_reasoning or END in text

    def extract_reasoning_content(self, text: str, request: Any = None) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a finished text."""
        reasoning, content = self.split(text, final=True)
        return _text_or_none(reasoning), _text_or_none(content)

    def extract_reasoning_content_streaming(
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
        """What ``current_text`` (all text so far) adds; call once more with ``finished=True`` at the end."""
        reasoning, content = self.split(current_text, final=finished)
        delta = DeltaMessage()
        for name, text in (("reasoning_content", reasoning), ("content", content)):
            # Whitespace-only text is held until real text follows, as the finished result drops it.
            if text.strip() and len(text) > self._num_sent[name]:
                setattr(delta, name, text[self._num_sent[name] :])
                self._num_sent[name] = len(text)
        return delta if delta.reasoning_content is not None or delta.content is not None else None


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    """DeepSeek-R1: the output starts inside the reasoning; an opening ``<think>`` is optional."""

    starts_in_reasoning = True


class Qwen3ReasoningParser(ThinkReasoningParser):
    """Qwen3: reasoning only when the output opens with ``<think>``; otherwise all content."""
