"""`pagedllm bench compare`: pagedllm, transformers and llama.cpp on W1-W4 in one run.

All systems read the same GGUF file: transformers dequantizes it to float32, llama.cpp
runs it as is, pagedllm runs it both ways (``--weights float32 gguf``; ``gguf-q8`` rounds
decode activations to int8 as llama.cpp does). This machine's
ceilings are measured first and every pagedllm figure is also given as a fraction of its
ceiling: compute-bound runs (W1, W4) as model FLOPs per second over the matmul ceiling,
single-stream decode (W2) as weight + KV bytes per token over the read bandwidth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time

from pagedllm.bench import workloads
from pagedllm.bench.report import RunResult, Summary, print_table, write_json

#: Engine options selecting each pagedllm weight path.
WEIGHT_OPTIONS = {
    "float32": {"dtype": "float32", "quantization": "none"},
    "gguf": {"dtype": "float32"},
    "gguf-q8": {"dtype": "float32", "quantization_kernel": "q8"},  # int8-rounded activations, as llama.cpp
}


def run_compare(args) -> int:
    import torch

    from pagedllm.bench import machine
    from pagedllm.core.loader import load_model_source

    torch.set_num_threads(args.threads)
    source = load_model_source(args.model)
    if source.format != "gguf":
        raise ValueError(f"compare needs a .gguf model (llama.cpp reads only GGUF); got {source.path}")
    vocab = source.hf_config.vocab_size
    scale = lambda n: max(1, round(n * args.scale))  # noqa: E731
    wl = {
        "W1": workloads.offline(vocab, scale(64), 64, 512, 128, args.workload_seed),
        "W2": workloads.single_stream(vocab, 256, 256, args.workload_seed),
        "W3": workloads.offline(vocab, scale(64), 64, 512, 128, args.workload_seed, name="W3"),
        "W4": workloads.shared_prefix(vocab, scale(32), 1024, 32, 32, args.workload_seed),
    }
    wl = {k: v for k, v in wl.items() if k in args.workloads}
    print(f"model: {source.path}\nthreads: {args.threads}, repeats: {args.repeats}", flush=True)
    ceilings = machine.measure()
    print(f"machine ceilings: fp32 matmul {ceilings['matmul_gflops']:.1f} GFLOP/s, read bandwidth {ceilings['read_gbs']:.1f} GB/s", flush=True)
    costs = machine.model_costs(source.hf_config)
    results: list[Summary] = []
    fractions: dict[str, float] = {}

    def record(runs: list[RunResult]) -> Summary:
        s = Summary.of(runs)
        results.append(s)
        print(f"  {s.workload} {s.system}: {s.output_tok_s:.1f} out tok/s {s.runs_output_tok_s}", flush=True)
        return s

    rep = lambda fn: [fn() for _ in range(args.repeats)]  # noqa: E731
    if "pagedllm" in args.systems:
        from pagedllm import LLM
        from pagedllm.bench.offline import run_pagedllm

        for weights in args.weights:
            name = f"pagedllm ({weights} weights)"
            options = dict(WEIGHT_OPTIONS[weights], model=str(source.path), num_threads=args.threads,
                           max_model_len=2048, max_num_seqs=256)
            for key in ("W1", "W2", "W4"):
                if key not in wl:
                    continue
                variants = [(name, {})]
                if key == "W4":
                    variants = [(f"{name}, prefix caching", {"enable_prefix_caching": True}),
                                (f"{name}, no prefix caching", {"enable_prefix_caching": False})]
                for label, extra in variants:
                    llm = LLM(**options, **extra)
                    run_pagedllm(llm.engine, workloads.offline(vocab, 2, 8, 16, 4, 1))  # warm-up
                    s = record(rep(lambda: run_pagedllm(llm.engine, wl[key], label)))
                    weight_bytes = _model_bytes(llm.engine.model)
                    del llm
                    _ceiling_fraction(s, wl[key], costs, ceilings, weight_bytes, fractions)
            if "W3" in wl:
                # W3's prompts are distinct, so prefix caching only matters across repetitions
                # (a repeat would find the last one's prompts cached): off, so each run is cold.
                with _server(source.path, dict(options, enable_prefix_caching=False)) as url:
                    from pagedllm.bench.serve import first_model, run_serve

                    model_name = first_model(url)
                    run_serve(url, model_name, workloads.offline(vocab, 2, 8, 16, 4, 1, name="W3"), 2)  # warm-up
                    record(rep(lambda: run_serve(url, model_name, wl["W3"], 16, system=f"{name}, server, 16 clients")))
    if "transformers" in args.systems:
        # In a fresh process: pagedllm's engine changes process-wide settings (the C allocator's,
        # pagedllm.core.cpu_allocator) that transformers' own users do not have.
        import concurrent.futures
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            runs = pool.submit(run_transformers_workloads, source, wl, args.hf_batch_sizes, args.repeats, args.threads).result()
        for key in ("W1", "W3", "W2"):
            if key in runs:
                record(runs[key])
    if "llama.cpp" in args.systems:
        from pagedllm.bench.llamacpp import LlamaCpp

        for key, w in wl.items():
            parallel = 1 if key == "W2" else (16 if key == "W3" else min(args.llamacpp_parallel, len(w.prompts)))
            lc = LlamaCpp(str(source.path), n_ctx=parallel * w.max_len + 16, parallel=parallel, n_threads=args.threads)
            label = f"llama.cpp (gguf, {parallel} parallel)" + (", offline" if key == "W3" else "")
            lc.run(workloads.offline(vocab, 2, 8, 16, 4, 1))  # warm-up
            record(rep(lambda: lc.run(w, label)))
            lc.close()

    results.sort(key=lambda s: (s.workload, s.system))
    print_table(results, "pagedllm bench compare (medians)")
    ratios = _ratios(results)
    print("\nratios (same run):")
    for line in ratios:
        print("  " + line)
    print("\nfraction of this machine's ceiling:")
    for key, value in fractions.items():
        print(f"  {key}: {value:.1%}")
    if args.json_path:
        write_json(args.json_path, {"ceilings": ceilings, "results": results, "ratios": ratios, "fractions": fractions})
    return 0


def run_transformers_workloads(source, wl: dict, batch_sizes: list[int], repeats: int, threads: int) -> dict:
    """transformers' runs of W1-W3 (those in ``wl``): workload name -> its runs."""
    import torch

    from pagedllm.bench.cli import _transformers_best
    from pagedllm.bench.offline import load_transformers, run_transformers

    torch.set_num_threads(threads)
    model = load_transformers(source)
    runs: dict[str, list[RunResult]] = {}
    # W3's transformers figure is static batching of W1's requests offline: W1's runs, relabelled.
    offline_runs = None
    for key in ("W1", "W3"):
        if key in wl:
            offline_runs = offline_runs or _transformers_best(model, wl[key], batch_sizes, repeats)
            runs[key] = [dataclasses.replace(run, workload=key) for run in offline_runs]
    if "W2" in wl:
        runs["W2"] = [run_transformers(model, wl["W2"], 1) for _ in range(repeats)]
    return runs


def _model_bytes(model) -> int:
    """Bytes read per decode step for the weights: every parameter, buffer and GGUF block tensor, once."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():  # quantized layers keep their weights outside parameters (GGUF blocks)
        for part in getattr(module, "gguf_parts", None) or []:
            tensors += [v for v in vars(part[1]).values() if isinstance(v, torch.Tensor)]
        tensors += list((getattr(module, "gguf_raw", None) or {}).values())
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN-packed weights have no storage pointer
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _ceiling_fraction(s: Summary, w, costs: dict, ceilings: dict, weight_bytes: int, out: dict) -> None:
    from pagedllm.bench.machine import workload_flops

    if w.name in ("W1", "W4"):
        flops = workload_flops(costs, [len(p) for p in w.prompts], w.output_len)
        out[f"{w.name} {s.system}: model FLOP/s vs fp32 matmul ceiling"] = flops / s.elapsed_s / (ceilings["matmul_gflops"] * 1e9)
    elif w.name == "W2" and s.decode_tok_s:
        mean_ctx = len(w.prompts[0]) + w.output_len / 2
        bytes_per_token = weight_bytes + mean_ctx * costs["kv_bytes_per_ctx_token_fp32"]
        floor = bytes_per_token / (ceilings["read_gbs"] * 1e9)
        out[f"W2 {s.system}: decode time floor (bytes/token / bandwidth) vs measured"] = floor * s.decode_tok_s


def _ratios(results: list[Summary]) -> list[str]:
    by = {(s.workload, s.system): s for s in results}
    lines = []

    def best(workload: str, prefix: str) -> Summary | None:
        cands = [s for (w, name), s in by.items() if w == workload and name.startswith(prefix)]
        return max(cands, key=lambda s: s.output_tok_s) if cands else None

    for workload in ("W1", "W3"):
        hf = best(workload, "transformers")
        lc = best(workload, "llama.cpp")
        for (w, name), s in sorted(by.items()):
            if w != workload or not name.startswith("pagedllm"):
                continue
            if hf:
                lines.append(f"{workload} {name} / {hf.system}: {s.output_tok_s / hf.output_tok_s:.2f}x output tok/s")
            if lc:
                lines.append(f"{workload} {name} / {lc.system}: {s.output_tok_s / lc.output_tok_s:.2f}x output tok/s")
    lc = best("W2", "llama.cpp")
    for (w, name), s in sorted(by.items()):
        if w == "W2" and name.startswith("pagedllm") and lc and s.decode_tok_s and lc.decode_tok_s:
            lines.append(f"W2 {name} / {lc.system}: {s.decode_tok_s / lc.decode_tok_s:.2f}x decode tok/s")
    for (w, name), s in sorted(by.items()):
        if w == "W4" and name.endswith(", prefix caching"):
            off = by.get(("W4", name.replace(", prefix caching", ", no prefix caching")))
            if off:
                lines.append(f"W4 {name.rsplit(',', 1)[0]}: prefix caching on / off = {s.output_tok_s / off.output_tok_s:.2f}x")
    return lines


@contextlib.contextmanager
def _server(model_path, options: dict):
    """`pagedllm serve` in a child process on a free port; yields its base URL."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", str(model_path), "--port", str(port)]
    for key, value in options.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(f"--{flag}" if value else f"--no-{flag}")
        elif key != "model":
            cmd += [f"--{flag}", str(value)]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pagedllm serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("pagedllm serve did not become healthy in 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
