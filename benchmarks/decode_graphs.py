"""Decode graphs against eager steps, side by side: the embedded SmolLM2 (GGUF Q4_1, or float32 with
--float32), 2 threads, a 256-token prompt per request and greedy decoding.

For each batch size, one engine with decode graphs and one with ``enforce_eager=True`` take
turns (three rounds each), and the median decode step of each is printed with their ratio.
The two must produce the same tokens; the script checks it.

    HF_HUB_OFFLINE=1 python benchmarks/decode_graphs.py [--float32] [--batch-sizes 1 4 8] [--tokens 128]
"""

import argparse
import random
import statistics
import time

from pagedllm import LLM, SamplingParams


def decode_steps(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[list[float], list[list[int]]]:
    """Step times of the decode steps (after the prefill step) and the tokens produced."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    times, outputs = [], {}
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        for out in engine.step():
            outputs[out.request_id] = list(out.outputs[0].token_ids)
        times.append(time.perf_counter() - start)
    return times[1:], [outputs[f"r{i}"] for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--float32", action="store_true", help="dequantize the GGUF to float32 weights")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    options = dict(num_threads=2, max_model_len=2048, **({"quantization": "none"} if args.float32 else {}))
    engines = {"graphs": LLM(**options), "eager": LLM(enforce_eager=True, **options)}
    rng = random.Random(0)
    print(f"{'float32' if args.float32 else 'GGUF Q4_1'}, 2 threads, 256-token prompts, {args.tokens} tokens each; median decode step")
    print(f"{'batch':>5} {'eager ms':>9} {'graphs ms':>10} {'speed-up':>9}")
    for batch_size in args.batch_sizes:
        prompts = [[rng.randrange(100, 40000) for _ in range(256)] for _ in range(batch_size)]
        times: dict[str, list[float]] = {name: [] for name in engines}
        tokens = {}
        for _ in range(args.rounds):
            for name, llm in engines.items():
                step_times, tokens[name] = decode_steps(llm, prompts, args.tokens)
                times[name].append(statistics.median(step_times))
        if tokens["graphs"] != tokens["eager"]:
            raise SystemExit(f"batch {batch_size}: graphs and eager steps produced different tokens")
        eager, graphs = statistics.median(times["eager"]), statistics.median(times["graphs"])
        print(f"{batch_size:>5} {eager * 1e3:>9.2f} {graphs * 1e3:>10.2f} {eager / graphs:>8.2f}x")


if __name__ == "__main__":
    main()
