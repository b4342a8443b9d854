"""This machine's ceilings, measured in the same run as the benchmark they judge.

- compute: GFLOP/s of a large float32 matmul, the fastest of MKL's ``torch.mm``, oneDNN
  with a prepacked weight and pagedllm's own panel kernel (which its float32 linears use),
  all intra-op threads;
- memory: read bandwidth, GB/s, of summing a tensor far larger than the caches;

each the best of several timed calls.
"""

from __future__ import annotations

import time

import torch


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls: a ceiling is what the machine can do, and a
    shared machine only ever makes a call slower (a median reads 112 GFLOP/s where the
    best reads 220 in the same minute here)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    from pagedllm.core.layers import dense

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = _best_seconds(lambda: torch.mm(a, b), repeats)
    if torch.backends.mkldnn.is_available():
        onednn = torch.ops.mkldnn._reorder_linear_weight(b)
        best = min(best, _best_seconds(lambda: dense.linear(a, onednn, None), repeats))
    if dense.can_prepack(b):
        packed = dense.prepack(b)
        best = min(best, _best_seconds(lambda: dense.linear(a, packed, None, n), repeats))
    return 2 * n**3 / best / 1e9


def read_bandwidth_gbs(num_bytes: int = 1 << 30, repeats: int = 7) -> float:
    x = torch.ones(num_bytes // 4)
    return num_bytes / _best_seconds(x.sum, repeats) / 1e9  # the warm-up call touches every page once


def measure() -> dict:
    return {"threads": torch.get_num_threads(), "matmul_gflops": matmul_gflops(), "read_gbs": read_bandwidth_gbs()}


def model_costs(hf_config) -> dict:
    """FLOPs per token, LM-head FLOPs and KV bytes of a Llama-family model."""
    c = hf_config
    h, layers = c.hidden_size, c.num_hidden_layers
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    per_layer = h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h + 3 * h * c.intermediate_size
    return {
        "linear_params": layers * per_layer + h * c.vocab_size,
        "flops_per_token": 2 * layers * per_layer,
        # Only the last prompt token and the generated ones go through the LM head.
        "lm_head_flops": 2 * h * c.vocab_size,
        # QK^T and PV: 2 FLOPs per multiply-add, two products, per context token.
        "attn_flops_per_token_per_ctx": 4 * layers * heads * head_dim,
        "kv_bytes_per_ctx_token_fp32": 2 * layers * kv_heads * head_dim * 4,
    }


def workload_flops(costs: dict, prompt_lens: list[int], output_len: int) -> float:
    """Model FLOPs of a workload: every prompt and generated token through the weights and attention."""
    total = 0.0
    for p in prompt_lens:
        n = p + output_len
        total += n * costs["flops_per_token"] + output_len * costs["lm_head_flops"]
        total += costs["attn_flops_per_token_per_ctx"] * n * (n + 1) / 2  # token i attends to i+1 positions
    return total
