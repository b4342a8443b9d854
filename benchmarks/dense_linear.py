"""Float linear kernels side by side, same run: F.linear (MKL), oneDNN with a prepacked weight, and pagedllm's panel kernel.

Shapes are SmolLM2-135M's 30 decoder layers (hidden 576, intermediate 1536; fused QKV and
gate-up), so a pass reads a whole model's worth of weights (425 MB in float32) and they
come from memory, as in a real decode step; ``--hot`` times one layer's weights over and
over instead (they then stay in cache). Prints the median GFLOP/s of each kernel, the ratio
panel / oneDNN, and each kernel's largest relative difference from float64.

    python benchmarks/dense_linear.py [--threads 2] [--rows 1 8 16 32 64 128 512 2048] [--hot]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pagedllm.core.layers import dense

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
NUM_LAYERS = 30


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hot", action="store_true", help="one layer's weights, repeated (in cache)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if dense._panel_ops() is None or not torch.backends.mkldnn.is_available():
        raise SystemExit("needs both the panel kernel (a C++ tool chain) and oneDNN")
    torch.manual_seed(0)
    layers = 1 if args.hot else NUM_LAYERS
    weights = [[torch.randn(o, i) * 0.05 for o, i in SHAPES.values()] for _ in range(layers)]
    onednn = [[_onednn_pack(w) for w in layer] for layer in weights]
    panels = [[dense.prepack(w) for w in layer] for layer in weights]
    passes = NUM_LAYERS if args.hot else 1
    flops_per_row = 2 * NUM_LAYERS * sum(o * i for o, i in SHAPES.values())
    print(f"{args.threads} threads, float32, {'hot' if args.hot else 'cold'} weights; "
          f"median GFLOP/s of {args.repeats} interleaved passes over {NUM_LAYERS} layers")  # fmt: skip
    print(f"{'rows':>5s} {'F.linear':>9s} {'oneDNN':>9s} {'panels':>9s} {'panels/oneDNN':>14s}  max rel diff (MKL, oneDNN, panels)")
    for rows in args.rows:
        xs = {i: torch.randn(rows, i) for _, i in SHAPES.values()}
        kernels = {
            "mkl": lambda w, o, i: F.linear(xs[i], w),
            "onednn": lambda w, o, i: dense.linear(xs[i], w, None),
            "panels": lambda w, o, i: dense.linear(xs[i], w, None, o),
        }
        packs = {"mkl": weights, "onednn": onednn, "panels": panels}

        def one_pass(name):
            start = time.perf_counter()
            for _ in range(passes):
                for layer in packs[name]:
                    for w, (o, i) in zip(layer, SHAPES.values()):
                        kernels[name](w, o, i)
            return time.perf_counter() - start

        for name in kernels:  # warm up
            one_pass(name)
        times = {name: [] for name in kernels}
        for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
            for name in kernels:
                times[name].append(one_pass(name))
        gflops = {name: rows * flops_per_row / statistics.median(t) / 1e9 for name, t in times.items()}
        diffs = []
        for name in kernels:
            worst = 0.0
            for w, (o, i), packed in zip(weights[0], SHAPES.values(), (packs[name][0])):
                ref = xs[i].double() @ w.double().T
                worst = max(worst, ((kernels[name](packed, o, i).double() - ref).abs().max() / ref.abs().max()).item())
            diffs.append(f"{worst:.1e}")
        print(f"{rows:5d} {gflops['mkl']:9.1f} {gflops['onednn']:9.1f} {gflops['panels']:9.1f} "
              f"{gflops['panels'] / gflops['onednn']:14.2f}  {', '.join(diffs)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
