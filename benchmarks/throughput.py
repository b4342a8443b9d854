"""Offline throughput: pagedllm vs transformers' best static-batched generate(), same run, same workload.

Workload (fixed seed): NUM_REQUESTS prompts of random token ids, lengths uniform in
[MIN_PROMPT, MAX_PROMPT], OUTPUT_LEN output tokens each, EOS ignored, greedy. Both sides
run the embedded SmolLM2-135M-Instruct GGUF dequantized to float32 (or --model).

    python benchmarks/throughput.py                 # the issue's workload (takes minutes)
    python benchmarks/throughput.py --num-requests 16 --hf-batch-sizes 8   # a quick look
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir or .gguf (default: embedded SmolLM2 GGUF)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--repeats", type=int, default=1, help="repetitions of the pagedllm run (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="pagedllm's per-step token budget")
    parser.add_argument("--skip-transformers", action="store_true", help="measure pagedllm only (quick iterations)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    from pagedllm import LLM

    llm = LLM(args.model, dtype="float32", max_num_seqs=args.num_requests, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_prompt + args.output_len + 16)
    prompts = make_workload(args.num_requests, args.min_prompt, args.max_prompt, llm.engine.vocab_size, args.seed)
    total_out = args.num_requests * args.output_len
    run_pagedllm(llm, prompts[:2], 4)  # warm-up
    ours = [run_pagedllm(llm, prompts, args.output_len) for _ in range(args.repeats)]
    ours_s = statistics.median(ours)
    print(f"pagedllm: {ours_s:.1f} s, {total_out / ours_s:.1f} output tok/s (backend {llm.engine.attention_backend})", flush=True)
    del llm
    if args.skip_transformers:
        return

    import transformers

    from pagedllm.core.loader import load_model_source

    source = load_model_source(args.model)
    if source.format == "gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    model.eval()
    hf = {bs: run_transformers(model, prompts, args.output_len, bs) for bs in args.hf_batch_sizes}
    best_bs = min(hf, key=hf.get)

    rows = [("pagedllm (continuous batching)", ours_s)] + [(f"transformers generate(), batch {bs}", s) for bs, s in hf.items()]
    print(f"\nworkload: {args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.output_len} output tokens, float32, {torch.get_num_threads()} threads")
    print(f"{'system':40s} {'seconds':>9s} {'output tok/s':>13s}")
    for name, seconds in rows:
        print(f"{name:40s} {seconds:9.1f} {total_out / seconds:13.1f}")
    ratio = hf[best_bs] / ours_s
    print(f"\npagedllm / best transformers (batch {best_bs}): {ratio:.2f}x output tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pagedllm_s": ours, "transformers_s": hf, "output_tokens": total_out, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
