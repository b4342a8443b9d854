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
from pagedllm.plugins.backends.torch_attention import TorchAttentionBackend, quantize_fp8


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


def _run_case(backend_cls, num_heads, num_kv_heads, head_dim, block_size, shapes, seed, dtype=torch.float32, atol=1e-5,
              cache_dtype=None, kv_scales=None, magnitude=1.0):
    """shapes: (seq_len, query_len) of the second step per request; the first computes the rest.

    With an fp8 ``cache_dtype`` the reference attends to keys and values rounded as torch
    rounds ``x / scale`` to that format (saturated), times the scale."""
    if backend_cls is CpuAttentionBackend and load_kernel() is None:
        pytest.skip("no C++ tool chain for the CPU kernel")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 1024
    free_blocks = list(range(num_blocks))
    rng.shuffle(free_blocks)
    backend = backend_cls(num_heads, head_dim, num_kv_heads, head_dim**-0.5)
    cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size), dtype=cache_dtype or dtype)
    scales = {} if cache_dtype is None else {"kv_scales": kv_scales}

    def cached(x, which):  # what the cache gives back for keys (0) or values (1)
        return x.float() if cache_dtype is None else quantize_fp8(x, kv_scales[which], cache_dtype).float() * kv_scales[which]

    tables, full, expected = [], [], []
    for seq_len, query_len in shapes:
        tables.append([free_blocks.pop() for _ in range(-(-seq_len // block_size))])
        q_full = (torch.randn(seq_len, num_heads, head_dim) / magnitude).to(dtype)  # scores of the usual size
        k_full = (torch.randn(seq_len, num_kv_heads, head_dim) * magnitude).to(dtype)
        v_full = (torch.randn(seq_len, num_kv_heads, head_dim) * magnitude).to(dtype)
        full.append((q_full, k_full, v_full))
        expected.append(_dense_reference(q_full.float(), cached(k_full, 0), cached(v_full, 1), head_dim**-0.5, query_len))

    # Step 1: the context of every request that has one, as prefills from position 0.
    first = [(i, seq_len - query_len) for i, (seq_len, query_len) in enumerate(shapes) if seq_len > query_len]
    first.sort(key=lambda item: item[1] != 1)  # single-token steps count as decodes: they go first
    if first:
        batch = _metadata([(ctx, ctx) for _, ctx in first], [tables[i] for i, _ in first], block_size)
        q, k, v = (torch.cat([full[i][j][:ctx] for i, ctx in first]) for j in range(3))
        out = backend.forward(q, k, v, cache, batch, **scales)
        want = torch.cat([_dense_reference(full[i][0].float()[:ctx], cached(full[i][1][:ctx], 0), cached(full[i][2][:ctx], 1),
                                           head_dim**-0.5, ctx) for i, ctx in first])
        torch.testing.assert_close(out.float(), want, atol=atol, rtol=atol)

    # Step 2: the mixed batch.
    batch = _metadata(shapes, tables, block_size)
    q, k, v = (torch.cat([full[i][j][seq_len - query_len :] for i, (seq_len, query_len) in enumerate(shapes)]) for j in range(3))
    # The engine hands the backend strided views of one fused qkv tensor: do the same.
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = (qkv[:, a:b].view(-1, n, head_dim) for a, b, n in
               [(0, q_size, num_heads), (q_size, q_size + kv_size, num_kv_heads), (q_size + kv_size, None, num_kv_heads)])
    out = backend.forward(q, k, v, cache, batch, **scales)
    torch.testing.assert_close(out.float(), torch.cat(expected), atol=atol, rtol=atol)
    return backend, cache, batch, k, v


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


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("head_dim,block_size", [(16, 4), (64, 16)])
def test_fp8_cache_matches_attention_over_rounded_kv(backend_cls, cache_dtype, head_dim, block_size):
    """Keys and values of magnitude ~1000 (past e4m3's 448): only a scale that is applied fits them."""
    rng = random.Random(5)
    kv_scales = torch.tensor([1000 * 4 / torch.finfo(cache_dtype).max, 1000 * 3 / torch.finfo(cache_dtype).max])
    _run_case(backend_cls, 6, 2, head_dim, block_size, _mixed_shapes(rng, 7, 120), seed=5, atol=2e-4,
              cache_dtype=cache_dtype, kv_scales=kv_scales, magnitude=1000.0)


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_holds_torch_rounding(backend_cls, dtype):
    """Each new key and value lands in the cache as exactly torch's conversion of x / scale, saturated."""
    kv_scales = torch.tensor([0.01, 0.002])
    backend, cache, batch, k, v = _run_case(backend_cls, 4, 2, 64, 16, [(17, 1), (40, 40), (33, 5)], seed=7, dtype=dtype,
                                            atol=2e-2, cache_dtype=torch.float8_e4m3fn, kv_scales=kv_scales, magnitude=3.0)
    k = k.clone()
    k[0, 0, :4] = torch.tensor([1e6, -1e6, 0.0, 4.4])  # saturates both ways; zero; rounds
    backend.forward(torch.zeros(k.shape[0], 4, 64, dtype=dtype), k, v, cache, batch, kv_scales=kv_scales)
    bs, slots = batch.block_size, batch.slot_mapping
    if backend_cls is CpuAttentionBackend:  # tiles: keys [head_dim][block_size], values [block_size][head_dim]
        key_tiles = cache[0].view(cache.shape[1], 2, 64, bs)[slots // bs, :, :, slots % bs]
        value_tiles = cache[1].view(cache.shape[1], 2, bs, 64)[slots // bs, :, slots % bs, :]
    else:
        key_tiles = cache[0].view(-1, 2, 64)[slots]
        value_tiles = cache[1].view(-1, 2, 64)[slots]
    for got, x, scale in ((key_tiles, k, kv_scales[0]), (value_tiles, v, kv_scales[1])):
        want = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
