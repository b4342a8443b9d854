"""F.linear (MKL) against the oneDNN-prepacked weight pagedllm uses (pagedllm.core.layers.dense), same run.

Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, vocab 49152; fused QKV and
gate-up), at single-stream, decode-batch and prefill row counts. Prints the median GFLOP/s
of each path, their ratio, and the largest relative difference of the results.

    python benchmarks/dense_linear.py [--threads 2] [--rows 1 16 64 256 2048] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pagedllm.core.layers import dense

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def timed(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if not dense.can_prepack(torch.zeros(2, 2, dtype=dtype)):
        raise SystemExit(f"oneDNN cannot take {args.dtype} weights on this machine/torch build")
    print(f"{args.threads} threads, {args.dtype}; median GFLOP/s of {args.repeats} repeats, interleaved")
    print(f"{'layer':8s} {'rows':>5s} {'F.linear':>9s} {'oneDNN':>9s} {'ratio':>6s}  max rel diff")
    for rows in args.rows:
        for name, (out_features, in_features) in SHAPES.items():
            weight = torch.randn(out_features, in_features, dtype=dtype)
            packed = dense.prepack(weight)
            x = torch.randn(rows, in_features, dtype=dtype)
            flops = 2 * rows * out_features * in_features
            inner = max(1, int(3e8 / flops))
            plain, onednn = [], []
            F.linear(x, weight), dense.linear(x, packed, None)  # warm up
            for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
                plain.append(timed(lambda: F.linear(x, weight), inner))
                onednn.append(timed(lambda: dense.linear(x, packed, None), inner))
            a, b = statistics.median(plain), statistics.median(onednn)
            ref = F.linear(x, weight).float()
            diff = ((dense.linear(x, packed, None).float() - ref).abs().max() / ref.abs().max()).item()
            print(f"{name:8s} {rows:5d} {flops / a / 1e9:9.1f} {flops / b / 1e9:9.1f} {a / b:6.2f}  {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
