"""A Triton kernel for 4-bit weights on GPUs: ``y = x @ W.T`` with W dequantized tile by tile.

The weight stays packed (8 codes per int32 along the input dim, as GPTQ stores it) with
per-group float scales and zeros; each program dequantizes a ``[BLOCK_K, BLOCK_N]`` tile in
registers and accumulates ``tl.dot`` in float32. Act-order weights run on permuted inputs, as
with int4pack. It needs a CUDA device, or ``TRITON_INTERPRET=1`` set before triton is first
imported (how CPU-only CI checks it against the torch reference; no speed to be had there).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagedllm.plugins.quantization.int_weights import IntWeight

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


def available(device: torch.device) -> bool:
    """Whether the kernel can launch for tensors on ``device``."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _int4_matmul(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, group_size,
                 stride_xm, stride_qk, stride_sg, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        kn_mask = (rk[:, None] < K) & (rn[None, :] < N)
        words = tl.load(q_ptr + (rk[:, None] // 8) * stride_qk + rn[None, :], mask=kn_mask, other=0)
        q = (words >> ((rk[:, None] % 8) * 4)) & 0xF  # [BLOCK_K, BLOCK_N] codes
        g = rk[:, None] // group_size
        s = tl.load(s_ptr + g * stride_sg + rn[None, :], mask=kn_mask, other=0.0)
        z = tl.load(z_ptr + g * stride_sg + rn[None, :], mask=kn_mask, other=0.0)
        acc += tl.dot(x.to(tl.float32), (q.to(tl.float32) - z) * s)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


class TritonInt4:
    """4-bit weight for :func:`_int4_matmul`: codes packed ``[in / 8, out]``, scales / zeros ``[groups, out]``."""

    name = "triton"

    def __init__(self, weight: IntWeight, group_size: int, perm: torch.Tensor | None) -> None:
        q = weight.q if perm is None else weight.q[:, perm]  # [out, in], groups contiguous
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        codes = q.t().contiguous().view(q.shape[1] // 8, 8, q.shape[0])  # [in / 8, 8, out]
        self.packed = (codes.to(torch.int32) << shifts.view(1, 8, 1)).sum(1, dtype=torch.int32).contiguous()
        self.scale = weight.scale.t().contiguous()  # [groups, out]
        self.zero = weight.zero.t().contiguous()
        self.group_size, self.perm = group_size, perm

    def to(self, device: torch.device) -> TritonInt4:
        self.packed, self.scale, self.zero = self.packed.to(device), self.scale.to(device), self.zero.to(device)
        if self.perm is not None:
            self.perm = self.perm.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            flat = flat[:, self.perm]
        flat = flat.float().contiguous()
        m, k = flat.shape
        n = self.packed.shape[1]
        y = torch.empty(m, n, dtype=torch.float32, device=flat.device)
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _int4_matmul[grid](flat, self.packed, self.scale, self.zero, y, m, n, k, self.group_size,
                           flat.stride(0), self.packed.stride(0), self.scale.stride(0), y.stride(0),
                           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)  # fmt: skip
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
