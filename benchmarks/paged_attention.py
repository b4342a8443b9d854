"""The CPU paged-attention kernel alone, on SmolLM2-135M's attention shapes (9 query heads, 3 kv heads,
head_dim 64, block size 16): decode batches and prefill chunks, one layer's call.

Prints the best of 21 calls, the KV bytes read per second (decode is bound by them) and the
attention GFLOP/s. Those calls find the cache warm; the last line is the decode step of a
model instead: 64 requests of 128-640 positions over 30 layers' caches (1.1 GB) with the
blocks scattered, each layer called once in turn, the median of 5 passes. For comparison, `python -c "from pagedllm.bench import machine; print(machine.measure())"`
gives this machine's read bandwidth.

    python benchmarks/paged_attention.py
"""

import time

import torch

from pagedllm.plugins.backends.cpu_attention import load_kernel

torch.set_num_threads(2)
op = load_kernel().paged_attention
H, KV, D, BS = 9, 3, 64, 16
REP = 21
def bench(kind, n, ctx):
    # n requests; decode: 1 token each with ctx; prefill: one chunk per request of ctx tokens (from 0)
    blocks_per = (ctx + BS) // BS + 1
    nb = n * blocks_per + 1
    cache = torch.empty(2, nb, KV, BS * D)
    cache.normal_()
    tables = torch.arange(n * blocks_per).view(n, blocks_per)
    if kind == "decode":
        T = n; seq = torch.full((n,), ctx, dtype=torch.long); qsl = torch.arange(n + 1); nd = n
        slots = torch.tensor([tables[i, (ctx - 1) // BS].item() * BS + (ctx - 1) % BS for i in range(n)])
    else:
        T = n * ctx; seq = torch.full((n,), ctx, dtype=torch.long); qsl = torch.arange(n + 1) * ctx; nd = 0
        slots = torch.cat([tables[i].repeat_interleave(BS)[:ctx] * BS + torch.arange(ctx) % BS for i in range(n)])
    qkv = torch.randn(T, (H + 2 * KV) * D)
    q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
    q, k, v = q.view(T, H, D), k.view(T, KV, D), v.view(T, KV, D)
    sc = torch.ones(2)
    f = lambda: op(q, k, v, cache, sc, slots, tables, seq, qsl, nd, BS, 0.125)
    f(); ts = []
    for _ in range(REP):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    t = min(ts)
    kvbytes = n * ctx * KV * D * 2 * 4
    flops = 4 * H * D * (n * ctx if kind == "decode" else n * ctx * (ctx + 1) / 2)
    print(f"{kind:7s} n={n:3d} ctx={ctx:4d}: {t*1e3:7.2f} ms  {kvbytes/t/1e9:6.1f} GB/s  {flops/t/1e9:6.1f} GFLOP/s")
for ctx in (128, 350, 600):
    bench("decode", 64, ctx)
for n, ctx in ((4, 512), (8, 256), (1, 2048)):
    bench("prefill", n, ctx)
print("---")
for n, ctx in ((64, 16), (64, 32), (64, 64), (256, 128), (16, 1024), (1, 2048)):
    bench("decode", n, ctx)


def bench_cold(n=64, layers=30, seed=0):
    """Decode as in a model: each layer's cache is cold when its turn comes, blocks scattered."""
    import statistics

    from pagedllm.core.model_runner import _zeros_on_huge_pages

    g = torch.Generator().manual_seed(seed)
    ctxs = torch.randint(128, 640, (n,), generator=g)
    blocks_per = [(int(c) + BS - 1) // BS for c in ctxs]
    nb = sum(blocks_per)
    perm = torch.randperm(nb, generator=g)
    tables = torch.zeros(n, max(blocks_per), dtype=torch.long)
    start = 0
    for r, count in enumerate(blocks_per):
        tables[r, :count] = perm[start : start + count]
        start += count
    caches = [_zeros_on_huge_pages((2, nb, KV, BS * D), torch.float32, torch.device("cpu")).normal_() for _ in range(layers)]
    slots = torch.tensor([int(tables[r, (int(c) - 1) // BS]) * BS + (int(c) - 1) % BS for r, c in enumerate(ctxs)])
    qkv = torch.randn(n, (H + 2 * KV) * D)
    q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
    q, k, v = q.view(n, H, D), k.view(n, KV, D), v.view(n, KV, D)
    sc, qsl = torch.ones(2), torch.arange(n + 1)
    ts = []
    for _ in range(5):
        for cache in caches:
            s = time.perf_counter()
            op(q, k, v, cache, sc, slots, tables, ctxs, qsl, n, BS, 0.125)
            ts.append(time.perf_counter() - s)
    t = statistics.median(ts)
    kvbytes = int(ctxs.sum()) * KV * D * 2 * 4
    print(f"cold decode n={n} avg ctx={float(ctxs.float().mean()):.0f}, {layers} layers: {t*1e3:.2f} ms a layer  {kvbytes/t/1e9:6.1f} GB/s")


print("---")
bench_cold()
