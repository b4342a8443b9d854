"""Attention backends against a dense reference: causal attention over each request's whole sequence.

Each case runs two steps through the backend, as the engine does: the first prefills
every request's context (writing it into the paged cache), the second attends a mixed
batch (decodes, then prefill chunks with and without context) over what the first wrote.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm.core.attention import AttentionMetadata
from pagedllm.plugins.backends.cpu_attention import CpuAttentionBackend, load_kernel
from pagedllm.plugins.backends.torch_attention import TorchAttentionBackend


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


def _metadata(steps, tables, block_size):
    """steps: (seq_len after the step, query_len) per request, decodes first."""
    max_blocks = max(len(t) for t in tables)
    starts, slots = [0], []
    for (seq_len, query_len), table in zip(steps, tables):
        starts.append(starts[-1] + query_len)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - query_len, seq_len)]
    seq_lens = [s for s, _ in steps]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int64),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64), query_start_loc=torch.tensor(starts, dtype=torch.int64),
        num_decodes=sum(1 for _, q in steps if q == 1), block_size=block_size,
        seq_lens_list=seq_lens, query_start_loc_list=starts,
    )


def _run_case(backend_cls, num_heads, num_kv_heads, head_dim, block_size, shapes, seed, dtype=torch.float32, atol=1e-5):
    """shapes: (seq_len, query_len) of the second step per request; the first computes the rest."""
    if backend_cls is CpuAttentionBackend and load_kernel() is None:
        pytest.skip("no C++ tool chain for the CPU kernel")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 1024
    free_blocks = list(range(num_blocks))
    rng.shuffle(free_blocks)
    backend = backend_cls(num_heads, head_dim, num_kv_heads, head_dim**-0.5)
    cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size), dtype=dtype)
    tables, full, expected = [], [], []
    for seq_len, query_len in shapes:
        tables.append([free_blocks.pop() for _ in range(-(-seq_len // block_size))])
        q_full = torch.randn(seq_len, num_heads, head_dim).to(dtype)
        k_full = torch.randn(seq_len, num_kv_heads, head_dim).to(dtype)
        v_full = torch.randn(seq_len, num_kv_heads, head_dim).to(dtype)
        full.append((q_full, k_full, v_full))
        expected.append(_dense_reference(q_full.float(), k_full.float(), v_full.float(), head_dim**-0.5, query_len))

    # Step 1: the context of every request that has one, as prefills from position 0.
    first = [(i, seq_len - query_len) for i, (seq_len, query_len) in enumerate(shapes) if seq_len > query_len]
    first.sort(key=lambda item: item[1] != 1)  # single-token steps count as decodes: they go first
    if first:
        batch = _metadata([(ctx, ctx) for _, ctx in first], [tables[i] for i, _ in first], block_size)
        q, k, v = (torch.cat([full[i][j][:ctx] for i, ctx in first]) for j in range(3))
        out = backend.forward(q, k, v, cache, batch)
        want = torch.cat([_dense_reference(*(t.float()[:ctx] for t in full[i]), head_dim**-0.5, ctx) for i, ctx in first])
        torch.testing.assert_close(out.float(), want, atol=atol, rtol=atol)

    # Step 2: the mixed batch.
    batch = _metadata(shapes, tables, block_size)
    q, k, v = (torch.cat([full[i][j][seq_len - query_len :] for i, (seq_len, query_len) in enumerate(shapes)]) for j in range(3))
    # The engine hands the backend strided views of one fused qkv tensor: do the same.
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = (qkv[:, a:b].view(-1, n, head_dim) for a, b, n in
               [(0, q_size, num_heads), (q_size, q_size + kv_size, num_kv_heads), (q_size + kv_size, None, num_kv_heads)])
    out = backend.forward(q, k, v, cache, batch)
    torch.testing.assert_close(out.float(), torch.cat(expected), atol=atol, rtol=atol)


def _mixed_shapes(rng, num_decodes, max_ctx):
    # Decodes (query 1) of varied context, then prefill chunks with and without context.
    shapes = [(rng.randint(1, max_ctx), 1) for _ in range(num_decodes)] + [(9, 9), (30, 7), (17, 1 + 16), (70, 33)]
    return [(ctx, q) if q <= ctx else (q, q) for ctx, q in shapes]


BACKENDS = [TorchAttentionBackend, CpuAttentionBackend]


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("num_decodes", [21, 2])  # many decodes: whole sequences per work item; few: split sequences
@pytest.mark.parametrize("head_dim,block_size", [(16, 4), (64, 16)])  # generic sizes, and the kernel's specialised path
def test_backend_matches_dense_attention(backend_cls, num_heads, num_kv_heads, num_decodes, head_dim, block_size):
    rng = random.Random(num_heads * 10 + num_kv_heads + head_dim)
    shapes = _mixed_shapes(rng, num_decodes, 40 if num_decodes > 2 else 400)
    _run_case(backend_cls, num_heads, num_kv_heads, head_dim, block_size, shapes, seed=num_decodes)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_single_long_decode(backend_cls):
    """One request decoding over a long context: the CPU kernel splits it into parts and merges them."""
    _run_case(backend_cls, 9, 3, 64, 16, [(1000, 1)], seed=1)


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache(backend_cls, dtype):
    rng = random.Random(3)
    _run_case(backend_cls, 6, 2, 64, 16, _mixed_shapes(rng, 5, 100), seed=3, dtype=dtype, atol=2e-2)
