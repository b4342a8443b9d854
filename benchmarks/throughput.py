"""Offline throughput (issue 6's W1): pagedllm vs transformers' best static-batched generate(), same run.

Workload (fixed seed): NUM_REQUESTS prompts of random token ids, lengths uniform in
[MIN_PROMPT, MAX_PROMPT], OUTPUT_LEN output tokens each, EOS ignored, greedy. Both sides
run the embedded SmolLM2-135M-Instruct GGUF dequantized to float32 (or --model).

The run also measures this machine's ceilings (a large float32 matmul's GFLOP/s and memory
read bandwidth) and reports pagedllm's useful FLOP/s (the model's matmuls and attention
over the workload's tokens, no padding) as a fraction of the matmul ceiling.

The machine may be shared, so the two systems alternate: round 1 times every transformers
batch size and picks the best; each further round times pagedllm and that batch size again.
The ratio is taken per round; the report gives medians.

    python benchmarks/throughput.py                 # W1, 3 rounds (takes ~15 minutes on 2 cores)
    python benchmarks/throughput.py --num-requests 16 --hf-batch-sizes 8 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def make_workload(num_requests: int, min_prompt: int, max_prompt: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(min_prompt, max_prompt))] for _ in range(num_requests)]


def run_pagedllm(llm, prompts, output_len: int) -> float:
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


def run_transformers(model, prompts, output_len: int, batch_size: int) -> float:
    """Static batching: sort by length, left-pad each batch, generate() it to the end."""
    order = sorted(prompts, key=len)
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == width + output_len
    return time.perf_counter() - start


def workload_flops(hf_config, prompts, output_len: int) -> float:
    """Useful FLOPs: 2 x (linear weights) per token, attention (QK and PV) over each token's
    context, and the LM head where a token is sampled (last prompt token and each output but the last)."""
    c = hf_config
    hidden, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * c.intermediate_size
    linear = 2 * layers * per_layer
    lm_head = 2 * hidden * c.vocab_size
    total = 0.0
    for prompt in prompts:
        num_tokens = len(prompt) + output_len - 1  # the last output token is never fed back
        context_sum = num_tokens * (num_tokens + 1) / 2  # token at position p attends to p + 1 keys
        total += linear * num_tokens + 4 * layers * heads * head_dim * context_sum + lm_head * output_len
    return total


def machine_ceilings(seconds: float = 3.0) -> tuple[float, float]:
    """(large float32 matmul GFLOP/s, memory read GB/s): medians over a few seconds each."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(flops) < 5:
        start = time.perf_counter()
        a @ b
        flops.append(2 * 2048**3 / (time.perf_counter() - start) / 1e9)
    big = torch.ones(256 * 2**20)  # 1 GiB, far beyond the caches
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 5:
        start = time.perf_counter()
        big.sum()
        rates.append(big.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return statistics.median(flops), statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir or .gguf (default: embedded SmolLM2 GGUF)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of pagedllm vs the best transformers batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="pagedllm's per-step token budget")
    parser.add_argument("--skip-transformers", action="store_true", help="measure pagedllm only (quick iterations)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    from pagedllm import LLM

    # No prefix caching: every round repeats the same prompts, and W1 measures computing them.
    llm = LLM(args.model, dtype="float32", quantization="none", max_num_seqs=args.num_requests, enable_prefix_caching=False,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_prompt + args.output_len + 16)
    prompts = make_workload(args.num_requests, args.min_prompt, args.max_prompt, llm.engine.vocab_size, args.seed)
    total_out = args.num_requests * args.output_len
    flops = workload_flops(llm.engine.hf_config, prompts, args.output_len)
    run_pagedllm(llm, prompts[:2], 4)  # warm-up (and kernel builds)

    model = None
    if not args.skip_transformers:
        import transformers

        from pagedllm.core.loader import load_model_source

        source = load_model_source(args.model)
        if source.format == "gguf":
            model = transformers.AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name, dtype=torch.float32)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        model.eval()

    gflops_ceiling, bandwidth = machine_ceilings()
    print(f"machine: {torch.get_num_threads()} threads, float32 matmul {gflops_ceiling:.0f} GFLOP/s, memory read {bandwidth:.1f} GB/s")
    ours: list[float] = []
    hf: dict[int, list[float]] = {bs: [] for bs in args.hf_batch_sizes}
    ratios: list[float] = []
    best_bs = None
    for round_index in range(args.rounds):
        ours.append(run_pagedllm(llm, prompts, args.output_len))
        print(f"round {round_index + 1}: pagedllm {ours[-1]:.1f} s", end="", flush=True)
        if model is not None:
            for bs in args.hf_batch_sizes if best_bs is None else [best_bs]:
                hf[bs].append(run_transformers(model, prompts, args.output_len, bs))
                print(f", transformers batch {bs} {hf[bs][-1]:.1f} s", end="", flush=True)
            if best_bs is None:
                best_bs = min(args.hf_batch_sizes, key=lambda bs: hf[bs][0])
            ratios.append(hf[best_bs][-1] / ours[-1])
            print(f", ratio {ratios[-1]:.2f}x", end="")
        print(flush=True)

    ours_s = statistics.median(ours)
    print(f"\nworkload: {args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.output_len} output tokens, float32, {torch.get_num_threads()} threads; medians of {args.rounds} round(s)")
    print(f"{'system':42s} {'seconds':>8s} {'output tok/s':>13s} {'GFLOP/s':>8s} {'of ceiling':>10s}")
    rows = [("pagedllm (continuous batching)", ours_s)]
    rows += [(f"transformers generate(), batch {bs}" + (" (best)" if bs == best_bs else ""), statistics.median(t))
             for bs, t in hf.items() if t]
    for name, seconds in rows:
        rate = flops / seconds / 1e9
        print(f"{name:42s} {seconds:8.1f} {total_out / seconds:13.1f} {rate:8.1f} {rate / gflops_ceiling:10.0%}")
    result = {"pagedllm_s": ours, "transformers_s": hf, "output_tokens": total_out, "workload_gflop": flops / 1e9,
              "matmul_gflops_ceiling": gflops_ceiling, "read_gbps": bandwidth}
    if ratios:
        ratio = statistics.median(ratios)
        print(f"\npagedllm / best transformers (batch {best_bs}): {ratio:.2f}x output tokens/s "
              f"(median of per-round ratios {', '.join(f'{r:.2f}' for r in ratios)})")
        result.update(ratio=ratio, ratios=ratios, best_batch_size=best_bs)
    print(f"pagedllm useful compute: {flops / ours_s / 1e9:.1f} GFLOP/s = {flops / ours_s / 1e9 / gflops_ceiling:.0%} "
          f"of the {gflops_ceiling:.0f} GFLOP/s matmul ceiling ({flops / 1e12:.2f} TFLOP of work)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
