"""Fixed, seeded benchmark workloads: exact token lengths, EOS ignored, greedy."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    name: str
    description: str
    prompts: list[list[int]]
    output_len: int

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return len(self.prompts) * self.output_len

    @property
    def max_len(self) -> int:
        return max(len(p) for p in self.prompts) + self.output_len


def _tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    # Keep clear of the special tokens at both ends of typical vocabularies.
    return [rng.randrange(100, vocab_size - 100) for _ in range(n)]


def offline(vocab_size: int, num_requests: int = 64, min_prompt: int = 64, max_prompt: int = 512,
            output_len: int = 128, seed: int = 0, name: str = "W1") -> Workload:
    """W1: many requests of uneven prompt length, all submitted at once."""
    rng = random.Random(seed)
    prompts = [_tokens(rng, rng.randint(min_prompt, max_prompt), vocab_size) for _ in range(num_requests)]
    return Workload(name, f"{num_requests} requests, prompts {min_prompt}-{max_prompt} tokens, {output_len} output tokens",
                    prompts, output_len)


def single_stream(vocab_size: int, prompt_len: int = 256, output_len: int = 256, seed: int = 0) -> Workload:
    """W2: one request; TTFT and decode speed of a single stream."""
    rng = random.Random(seed)
    return Workload("W2", f"1 request, {prompt_len}-token prompt, {output_len} output tokens",
                    [_tokens(rng, prompt_len, vocab_size)], output_len)


def shared_prefix(vocab_size: int, num_requests: int = 32, prefix_len: int = 1024, suffix_len: int = 32,
                  output_len: int = 32, seed: int = 0) -> Workload:
    """W4: requests sharing a long prefix (a system prompt, a document) with short distinct tails."""
    rng = random.Random(seed)
    prefix = _tokens(rng, prefix_len, vocab_size)
    prompts = [prefix + _tokens(rng, suffix_len, vocab_size) for _ in range(num_requests)]
    return Workload("W4", f"{num_requests} requests sharing a {prefix_len}-token prefix + {suffix_len} distinct tokens, "
                    f"{output_len} output tokens", prompts, output_len)
