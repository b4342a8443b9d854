"""The fused CPU kernels of pagedllm.core.layers.fused against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.core.layers import fused


@pytest.fixture(autouse=True)
def _kernels():
    if fused._load_ops() is None:
        pytest.skip("no C++ tool chain for the fused kernels")


def _reference_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


TOLERANCES = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64, 700])  # 700 rows: split across threads
def test_norms_match_reference(dtype, rows):
    torch.manual_seed(rows)
    x = (torch.randn(rows, 576) * 3).to(dtype)
    residual = torch.randn(rows, 576).to(dtype)
    weight = torch.randn(576).to(dtype)
    torch.testing.assert_close(fused.rms_norm(x, weight, 1e-5), _reference_norm(x, weight, 1e-5), **TOLERANCES[dtype])
    want_residual = residual + x
    want = _reference_norm(want_residual, weight, 1e-5)
    got, got_residual = fused.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    torch.testing.assert_close(got_residual, want_residual, atol=0, rtol=0)  # the add itself is exact
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(65, 2 * 1536) * 6).to(dtype)
    x[0, :8] = torch.tensor([-100.0, -88.0, -20.0, 0.0, 20.0, 88.0, 100.0, -0.0])  # exp's clamped range
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(x), F.silu(gate) * up, **TOLERANCES[dtype])
    strided = torch.randn(10, 2 * 1536 + 5)[:, : 2 * 1536]  # rows not contiguous with each other
    gate, up = strided.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(strided), F.silu(gate) * up, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_matches_reference(dtype):
    torch.manual_seed(0)
    num_q, num_kv, head_dim, tokens = 9, 3, 64, 37
    positions = torch.randint(0, 100, (tokens,))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(100, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    qkv = torch.randn(tokens, (num_q + 2 * num_kv) * head_dim).to(dtype)
    heads = qkv[:, : (num_q + num_kv) * head_dim].view(tokens, -1, head_dim)
    c, s = cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)
    x1, x2 = heads.chunk(2, dim=-1)
    want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    untouched = qkv[:, (num_q + num_kv) * head_dim :].clone()
    fused.rotary_(qkv, num_q + num_kv, positions, cos, sin)
    torch.testing.assert_close(heads, want, atol=0, rtol=0)  # op for op the same arithmetic
    assert torch.equal(qkv[:, (num_q + num_kv) * head_dim :], untouched)  # the value heads are left alone


def test_argmax_matches_torch_including_ties_and_nan():
    torch.manual_seed(0)
    logits = torch.randn(70, 5000)
    logits[1, [10, 4000]] = 1e6  # tie: the first wins
    logits[2] = float("-inf")
    logits[3, [7, 900]] = float("nan")  # NaN counts as the maximum
    logits[4] = 0.0
    ties = torch.randint(0, 3, (16, 1037)).float()  # many equal maxima in every vector lane
    ties[5, -1] = float("inf")  # a maximum in the row's tail past the last full vector
    for x in (logits, logits[:, 1:], torch.randn(1, 1), ties, ties[:, 3:]):
        assert torch.equal(fused.argmax(x), x.argmax(dim=-1))
