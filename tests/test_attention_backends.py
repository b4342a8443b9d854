"""Attention backends against a dense reference: causal attention over each request's whole sequence."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm.core.attention import AttentionMetadata
from pagedllm.plugins.backends.cpu_attention import CpuAttentionBackend, load_kernel
from pagedllm.plugins.backends.torch_attention import TorchAttentionBackend

BLOCK_SIZE = 4


def _dense_reference(q_full, k_full, v_full, scale, query_len):
    """[seq, heads, dim] inputs; attention of the last query_len positions, with GQA by repetition."""
    group = q_full.shape[1] // k_full.shape[1]
    k = k_full.repeat_interleave(group, 1)
    v = v_full.repeat_interleave(group, 1)
    seq_len = q_full.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q_full, k) * scale
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)[seq_len - query_len :]


@pytest.mark.parametrize("backend_cls", [TorchAttentionBackend, CpuAttentionBackend])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("num_decodes", [21, 2])  # many decodes: a request per work item; few: a head per item
def test_backend_matches_dense_attention(backend_cls, num_heads, num_kv_heads, num_decodes):
    if backend_cls is CpuAttentionBackend and load_kernel() is None:
        pytest.skip("no C++ tool chain for the CPU kernel")
    rng = random.Random(num_heads * 10 + num_kv_heads)
    torch.manual_seed(0)
    head_dim, num_blocks = 16, 512
    # Mixed batch: decodes (query 1) of varied context, then prefill chunks with and without context.
    shapes = [(rng.randint(1, 40), 1) for _ in range(num_decodes)] + [(9, 9), (30, 7), (17, 1 + 16)]
    shapes = [(ctx, q) if q <= ctx else (q, q) for ctx, q in shapes]
    free_blocks = list(range(num_blocks))
    rng.shuffle(free_blocks)
    cache = torch.zeros(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    tables, q_new, k_new, v_new, slots, expected = [], [], [], [], [], []
    for seq_len, query_len in shapes:
        table = [free_blocks.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
        tables.append(table)
        q_full = torch.randn(seq_len, num_heads, head_dim)
        k_full = torch.randn(seq_len, num_kv_heads, head_dim)
        v_full = torch.randn(seq_len, num_kv_heads, head_dim)
        for pos in range(seq_len - query_len):  # context already in the cache
            cache[0, table[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = k_full[pos]
            cache[1, table[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = v_full[pos]
        new = slice(seq_len - query_len, seq_len)
        q_new.append(q_full[new]), k_new.append(k_full[new]), v_new.append(v_full[new])
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(new.start, new.stop)]
        expected.append(_dense_reference(q_full, k_full, v_full, scale, query_len))
    max_blocks = max(len(t) for t in tables)
    starts = [0]
    for _, query_len in shapes:
        starts.append(starts[-1] + query_len)
    seq_lens = [s for s, _ in shapes]
    batch = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]),
        seq_lens=torch.tensor(seq_lens), query_start_loc=torch.tensor(starts),
        num_decodes=sum(1 for _, q in shapes if q == 1), block_size=BLOCK_SIZE,
        seq_lens_list=seq_lens, query_start_loc_list=starts,
    )
    out = backend_cls(num_heads, head_dim, num_kv_heads, scale).forward(torch.cat(q_new), torch.cat(k_new), torch.cat(v_new), cache, batch)
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-5, rtol=1e-5)
