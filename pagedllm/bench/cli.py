"""`pagedllm bench throughput | latency | serve | compare`.

Every subcommand runs fixed, seeded workloads (token ids of exact lengths, EOS ignored,
greedy), repeats them (median reported), prints a table and optionally writes JSON.
Nothing heavy is imported until a subcommand runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_parser(sub, add_engine_options) -> None:
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve, compare")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repeats", type=int, default=3, help="repetitions of each measurement (median reported)")
        p.add_argument("--workload-seed", dest="workload_seed", type=int, default=0, help="seed of the workload's random prompts")
        p.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")

    def offline_shape(p: argparse.ArgumentParser, n: int, lo: int, hi: int, out: int) -> None:
        p.add_argument("--num-requests", type=int, default=n)
        p.add_argument("--min-prompt", type=int, default=lo)
        p.add_argument("--max-prompt", type=int, default=hi)
        p.add_argument("--output-len", type=int, default=out)

    tp = bsub.add_parser("throughput", help="offline throughput of one batch of requests (W1 by default)")
    tp.add_argument("--model", "-m", default=None)
    offline_shape(tp, 64, 64, 512, 128)
    tp.add_argument("--with-transformers", action="store_true", help="also run transformers' static batching in the same run")
    tp.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    common(tp)
    add_engine_options(tp)
    tp.set_defaults(func=cmd_throughput)

    lat = bsub.add_parser("latency", help="single-stream latency: TTFT and decode tok/s (W2 by default)")
    lat.add_argument("--model", "-m", default=None)
    lat.add_argument("--prompt-len", type=int, default=256)
    lat.add_argument("--output-len", type=int, default=256)
    common(lat)
    add_engine_options(lat)
    lat.set_defaults(func=cmd_latency)

    sv = bsub.add_parser("serve", help="an OpenAI-compatible server under concurrent streaming clients (W3)")
    sv.add_argument("--base-url", default="http://127.0.0.1:8000")
    sv.add_argument("--served-model", default=None, help="model name to request; default: the server's first model")
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--concurrency", type=int, default=16)
    sv.add_argument("--vocab-size", type=int, default=None, help="token-id range of the prompts (default: the local model's)")
    sv.add_argument("--model", "-m", default=None, help="local copy of the served model, for --with-transformers and the vocabulary")
    sv.add_argument("--with-transformers", action="store_true", help="also run transformers' static batching on the same workload")
    sv.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    offline_shape(sv, 64, 64, 512, 128)
    common(sv)
    sv.set_defaults(func=cmd_serve)

    cmp_ = bsub.add_parser("compare", help="pagedllm vs transformers vs llama.cpp on W1-W4, with this machine's ceilings")
    cmp_.add_argument("--model", "-m", default=None, help="a .gguf file (default: the embedded SmolLM2 Q4_1)")
    cmp_.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3", "W4"], choices=["W1", "W2", "W3", "W4"])
    cmp_.add_argument("--systems", nargs="+", default=["pagedllm", "transformers", "llama.cpp"],
                      choices=["pagedllm", "transformers", "llama.cpp"])
    cmp_.add_argument("--weights", nargs="+", default=["float32", "gguf"], choices=["float32", "gguf", "gguf-q8"],
                      help="pagedllm weight paths: float32 (dequantized) and/or the GGUF's own quantized weights")
    cmp_.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    cmp_.add_argument("--llamacpp-parallel", type=int, default=64, help="llama.cpp sequences decoded together (llama-server --parallel)")
    cmp_.add_argument("--threads", type=int, default=2)
    cmp_.add_argument("--scale", type=float, default=1.0, help="shrink every workload's request count (quick looks)")
    common(cmp_)
    cmp_.set_defaults(func=cmd_compare)


# -- helpers -------------------------------------------------------------------------

def _llm(args, **overrides: Any):
    from pagedllm import LLM
    from pagedllm.entrypoints.cli import _engine_options

    options = _engine_options(args)
    options.update(overrides)
    return LLM(**options)


def _repeat(fn, repeats: int) -> list:
    return [fn() for _ in range(repeats)]


def _finish(summaries, args, title: str, extra: dict | None = None) -> None:
    from pagedllm.bench.report import print_table, write_json

    print_table(summaries, title)
    if args.json_path:
        write_json(args.json_path, {"title": title, "results": summaries, **(extra or {})})


def _transformers_best(model, workload, batch_sizes: list[int], repeats: int):
    """Try each batch size once, then repeat the best one; returns all runs of the best."""
    from pagedllm.bench.offline import run_transformers

    first = {bs: run_transformers(model, workload, bs) for bs in batch_sizes}
    best = max(first, key=lambda bs: first[bs].output_tok_s)
    return [first[best]] + _repeat(lambda: run_transformers(model, workload, best), repeats - 1)


# -- subcommands ---------------------------------------------------------------------

def cmd_throughput(args) -> int:
    from pagedllm.bench import workloads
    from pagedllm.bench.offline import load_transformers, run_pagedllm
    from pagedllm.bench.report import Summary

    llm = _llm(args)
    engine = llm.engine
    w = workloads.offline(engine.vocab_size, args.num_requests, args.min_prompt, args.max_prompt, args.output_len, args.workload_seed)
    run_pagedllm(engine, workloads.offline(engine.vocab_size, 2, 8, 16, 4, 1))  # warm-up (kernel compile, caches)
    summaries = [Summary.of(_repeat(lambda: run_pagedllm(engine, w), args.repeats))]
    if args.with_transformers:
        model = load_transformers(engine.source)
        summaries.append(Summary.of(_transformers_best(model, w, args.hf_batch_sizes, args.repeats)))
    _finish(summaries, args, f"offline throughput: {w.description}")
    return 0


def cmd_latency(args) -> int:
    from pagedllm.bench import workloads
    from pagedllm.bench.offline import run_pagedllm
    from pagedllm.bench.report import Summary

    llm = _llm(args)
    engine = llm.engine
    w = workloads.single_stream(engine.vocab_size, args.prompt_len, args.output_len, args.workload_seed)
    run_pagedllm(engine, workloads.single_stream(engine.vocab_size, 8, 4, 1))
    _finish([Summary.of(_repeat(lambda: run_pagedllm(engine, w), args.repeats))], args, f"latency: {w.description}")
    return 0


def cmd_serve(args) -> int:
    from pagedllm.bench import workloads
    from pagedllm.bench.report import Summary
    from pagedllm.bench.serve import first_model, run_serve

    model_name = args.served_model or first_model(args.base_url, args.api_key)
    vocab = args.vocab_size
    source = None
    if vocab is None or args.with_transformers:
        from pagedllm.core.loader import load_model_source

        source = load_model_source(args.model)
        vocab = vocab or source.hf_config.vocab_size
    w = workloads.offline(vocab, args.num_requests, args.min_prompt, args.max_prompt, args.output_len, args.workload_seed, name="W3")
    run = lambda: run_serve(args.base_url, model_name, w, args.concurrency, args.api_key, f"server {args.base_url}")  # noqa: E731
    summaries = [Summary.of(_repeat(run, args.repeats))]
    if args.with_transformers:
        from pagedllm.bench.offline import load_transformers

        summaries.append(Summary.of(_transformers_best(load_transformers(source), w, args.hf_batch_sizes, args.repeats)))
    _finish(summaries, args, f"serving: {w.description}, {args.concurrency} concurrent streaming clients")
    return 0


def cmd_compare(args) -> int:
    from pagedllm.bench.compare import run_compare

    return run_compare(args)
