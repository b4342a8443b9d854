"""Engine overhead per decode step: everything a step does except the model's layers.

The embedded SmolLM2 (its tokenizer, 49,152-token vocabulary and embedding) with its
decoder layers removed and its LM head replaced by fixed random logits, so a decode step
is only: the scheduler, the runner's batch preparation, embedding + final norm, the
sampler (greedy: argmax over the vocabulary), the detokenizer and the output building.
The target (issue 6) is at most 1 ms per step at batch 64. Each batch size is timed with
LLM.generate's output kind (final_only: an output only for a finished request) and a
streaming server's (cumulative: an output for every request every step). For scale, the same run first
times real decode steps of the full model at the same batch.

    python benchmarks/engine_overhead.py                    # batch 64
    python benchmarks/engine_overhead.py --batch-sizes 1 16 64 --skip-real
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from collections import defaultdict

import torch

TARGET_MS = 1.0


class _Timers:
    """Wraps bound methods to accumulate their wall time per name."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - start

        setattr(obj, attr, timed)


def _start_decoding(engine, batch_size: int, prompt_len: int, seed: int, output_kind: str = "final_only") -> None:
    from pagedllm import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True, output_kind=output_kind)
    for i in range(batch_size):
        engine.add_request(f"r{i}", [rng.randrange(100, engine.vocab_size - 100) for _ in range(prompt_len)], params)
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()


def _time_steps(engine, num_steps: int) -> list[float]:
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def _abort_all(engine) -> None:
    for request_id in list(engine._parents):
        engine.abort_request(request_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300, help="timed decode steps per batch size")
    parser.add_argument("--skip-real", action="store_true", help="do not time the full model for reference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's, one per core)")
    parser.add_argument("--output-kinds", nargs="+", default=["final_only", "cumulative"],
                        help="SamplingParams.output_kind to time: final_only is LLM.generate's, cumulative a streaming server's")
    args = parser.parse_args()

    from pagedllm import LLM

    max_len = args.prompt_len + args.steps + 64
    llm = LLM(None, dtype="float32", quantization="none", max_num_seqs=max(args.batch_sizes),
              max_num_batched_tokens=max(2048, args.prompt_len), max_model_len=max_len, num_threads=args.threads)
    engine = llm.engine
    print(f"{torch.get_num_threads()} threads, prompts of {args.prompt_len} tokens, greedy; medians of {args.steps} steps")

    real_ms = {}
    if not args.skip_real:
        for batch_size in args.batch_sizes:
            _start_decoding(engine, batch_size, args.prompt_len, seed=1)
            real_ms[batch_size] = statistics.median(_time_steps(engine, 10)) * 1e3
            _abort_all(engine)

    # Empty the model: no decoder layers, and logits from a fixed random table.
    model = engine.model
    model.model.layers = torch.nn.ModuleList()
    tables = [torch.randn(max(args.batch_sizes), engine.vocab_size) for _ in range(7)]
    counter = iter(range(10**12))
    model.compute_logits = lambda hidden: tables[next(counter) % len(tables)][: hidden.shape[0]]

    timers = _Timers()
    timers.wrap(engine.scheduler, "schedule", "scheduler")
    timers.wrap(engine.runner, "_prepare", "runner prep")
    timers.wrap(model, "forward", "embedding + norm")
    timers.wrap(engine.sampler, "sample", "sampler")
    print(f"\n{'batch':>5s} {'outputs':>11s} {'step ms':>8s} {'vs 1 ms':>8s}  {'real step ms':>12s} {'overhead share':>14s}  breakdown (ms per step)")
    for batch_size, output_kind in itertools.product(args.batch_sizes, args.output_kinds):
        _start_decoding(engine, batch_size, args.prompt_len, seed=2, output_kind=output_kind)
        _time_steps(engine, 20)  # warm-up
        timers.totals.clear()
        times = _time_steps(engine, args.steps)
        _abort_all(engine)
        step_ms = statistics.median(times) * 1e3
        parts = {name: total / args.steps * 1e3 for name, total in timers.totals.items()}
        parts["the rest (detokenizer, outputs, ...)"] = statistics.mean(times) * 1e3 - sum(parts.values())
        real = real_ms.get(batch_size)
        share = f"{step_ms / real:14.1%}" if real else f"{'-':>14s}"
        real_text = f"{real:12.1f}" if real else f"{'-':>12s}"
        breakdown = ", ".join(f"{name} {ms:.3f}" for name, ms in parts.items())
        print(f"{batch_size:5d} {output_kind:>11s} {step_ms:8.3f} {step_ms / TARGET_MS:7.2f}x  {real_text} {share}  {breakdown}", flush=True)


if __name__ == "__main__":
    main()
