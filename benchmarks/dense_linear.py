"""F.linear with row-major vs column-major float32 weights (pagedllm.core.layers.dense), same run.

Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, vocab 49152; fused QKV and
gate-up), at single-stream, decode-batch and prefill row counts. Prints the median GFLOP/s
of each layout and their ratio; it also checks the results are identical.

    python benchmarks/dense_linear.py [--threads 2] [--rows 1 16 64 256 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pagedllm.core.layers.dense import to_column_major

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def timed(fn, repeats: int, inner: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; median GFLOP/s of {args.repeats} repeats, interleaved")
    print(f"{'layer':8s} {'rows':>5s} {'row-major':>10s} {'col-major':>10s} {'ratio':>6s}  identical")
    for rows in args.rows:
        for name, (out_features, in_features) in SHAPES.items():
            weight = torch.randn(out_features, in_features)
            column = to_column_major(weight)
            x = torch.randn(rows, in_features)
            flops = 2 * rows * out_features * in_features
            inner = max(1, int(3e8 / flops))
            row_major, col_major = [], []
            for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
                row_major.append(timed(lambda: F.linear(x, weight), 1, inner))
                col_major.append(timed(lambda: F.linear(x, column), 1, inner))
            a, b = statistics.median(row_major), statistics.median(col_major)
            same = torch.equal(F.linear(x, weight), F.linear(x, column))
            print(f"{name:8s} {rows:5d} {flops / a / 1e9:10.1f} {flops / b / 1e9:10.1f} {a / b:6.2f}  {same}", flush=True)


if __name__ == "__main__":
    main()
