"""Fused CPU kernels of the layer helpers (RMSNorm + residual, SiLU-and-mul, RoPE) and the sampler (argmax), with torch fallbacks.

On CPU each runs as one C++ op (``csrc/fused_ops.cpp``, built on first use together with
``csrc/dense_gemm.cpp`` and cached by torch under ``~/.cache/torch_extensions``) instead of
3-9 torch ops with temporaries: at decode batch sizes those ops are tiny and their dispatch
was most of their cost. Elsewhere (CUDA, no C++ tool chain) the same functions run the torch
ops they replace.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("fused_ops.cpp", "dense_gemm.cpp")]


@functools.cache
def load_cpu_ops() -> bool:
    """Build (once per machine) and load the C++ ops ``torch.ops.pagedllm_ops`` and ``torch.ops.pagedllm_dense``.

    False, with a warning, without a tool chain; callers then run the torch ops instead.
    """
    try:
        from torch.utils.cpp_extension import load

        load(
            name="pagedllm_cpu_ops",
            sources=[str(path) for path in _SOURCES],
            # -fopenmp: without it ATen's parallel_for (an inline template) compiles to a serial loop.
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as exc:  # no compiler, no ninja, ...
        logger.warning("pagedllm: C++ CPU kernels unavailable (%s); using torch ops", exc)
        return False


@functools.cache
def _load_ops():
    """The op namespace ``torch.ops.pagedllm_ops``, or None without a tool chain."""
    return torch.ops.pagedllm_ops if load_cpu_ops() else None


def _cpu_ops(x: torch.Tensor):
    return _load_ops() if x.device.type == "cpu" else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, in float32 like Hugging Face; x: [rows, hidden]."""
    ops = _cpu_ops(x)
    if ops is not None and x.dim() == 2 and x.stride(1) == 1:
        return ops.rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = residual + x``, then ``(rms_norm(residual), residual)``; may reuse both inputs' memory."""
    ops = _cpu_ops(x)
    if ops is not None and x.dim() == 2 and x.stride(1) == 1 and residual.stride(1) == 1:
        ops.add_rms_norm_(x, residual, weight, eps)
        return x, residual
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` [rows, 2 * d] -> [rows, d]."""
    ops = _cpu_ops(x)
    if ops is not None and x.dim() == 2 and x.stride(1) == 1:
        return ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_(x: torch.Tensor, num_heads: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE, in place, on heads ``[0, num_heads)`` of each row of ``x`` [tokens, width].

    ``cos``/``sin``: [max_positions, head_dim // 2] float32 tables, looked up at ``positions``.
    """
    ops = _cpu_ops(x)
    if ops is not None and x.dim() == 2 and x.stride(1) == 1:
        ops.rotary_(x, positions, cos, sin, num_heads)
        return
    head_dim = 2 * cos.shape[1]
    heads = x[:, : num_heads * head_dim].view(x.shape[0], num_heads, head_dim)
    c = cos[positions].unsqueeze(1).to(x.dtype)  # [tokens, 1, head_dim // 2]
    s = sin[positions].unsqueeze(1).to(x.dtype)
    x1, x2 = heads.chunk(2, dim=-1)
    heads.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of float32 [rows, vocab] (first maximum on ties), ~10x faster on CPU."""
    ops = _cpu_ops(logits)
    if ops is not None and logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1 and logits.shape[1]:
        return ops.argmax_rows(logits)
    return logits.argmax(dim=-1)
