"""The cost of guided decoding: output tok/s of JSON-schema requests vs free ones, same run, same lengths.

Workload: NUM_REQUESTS chat prompts asking for a person as JSON, sampled (temperature
0.8, a seed per request) on the embedded SmolLM2-135M-Instruct (or --model). First the
guided run: every request constrained by one JSON schema. Then the free run: the same
prompts and seeds, unconstrained, each with ``max_tokens`` set to its guided twin's
output length and EOS ignored, so both runs decode the same number of tokens per
request with the same batch shapes and the ratio isolates what the masks cost. The
schema is compiled once in a warm-up (its compile time is printed on its own). The
two runs alternate ``--repeats`` times and the best of each is reported (the machine
is shared and noisy); the time spent inside the mask stage itself is printed too.

    python benchmarks/guided_bench.py                  # 32 + 32 requests (takes a minute or two)
    python benchmarks/guided_bench.py --num-requests 8 # a quick look
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 4},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
}
PEOPLE = ["a retired sailor", "a young painter", "a chess champion", "a baker from Lyon", "a software engineer",
          "a marathon runner", "a beekeeper", "a jazz pianist"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir or .gguf (default: embedded SmolLM2 GGUF)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jsonschema
    import torch

    from pagedllm import LLM, SamplingParams
    from pagedllm.core.guided import GuidedMaskStage

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, max_num_seqs=max(64, args.num_requests), max_model_len=1024, kv_cache_memory="512MiB")
    conversations = [[{"role": "user", "content": f"Invent {PEOPLE[i % len(PEOPLE)]} (#{i}) and describe them as JSON "
                                                 "with name, age, city, hobbies and employed."}]
                     for i in range(args.num_requests)]

    start = time.perf_counter()
    llm.chat(conversations[:1], SamplingParams(max_tokens=2, structured_outputs={"json": SCHEMA}), use_tqdm=False)
    llm.chat(conversations[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up the free path too
    warmup = time.perf_counter() - start

    stage = next(p for p in llm.engine.sampler.processors if isinstance(p, GuidedMaskStage))
    mask_seconds = []
    apply = stage.apply

    def timed_apply(logits, state):
        start = time.perf_counter()
        out = apply(logits, state)
        mask_seconds.append(time.perf_counter() - start)
        return out

    stage.apply = timed_apply

    guided = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, structured_outputs={"json": SCHEMA})
              for i in range(args.num_requests)]
    guided_tps_runs, free_tps_runs = [], []
    for _ in range(args.repeats):
        mask_seconds.clear()
        start = time.perf_counter()
        guided_out = llm.chat(conversations, guided, use_tqdm=False)
        guided_s = time.perf_counter() - start
        guided_mask_s, guided_steps = sum(mask_seconds), len(mask_seconds)
        lengths = [len(o.outputs[0].token_ids) for o in guided_out]
        free = [SamplingParams(temperature=0.8, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
        start = time.perf_counter()
        free_out = llm.chat(conversations, free, use_tqdm=False)
        free_s = time.perf_counter() - start
        assert [len(o.outputs[0].token_ids) for o in free_out] == lengths
        guided_tps_runs.append(sum(lengths) / guided_s)
        free_tps_runs.append(sum(lengths) / free_s)

    num_valid = 0
    for output in guided_out:
        if output.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)
            num_valid += 1
    num_tokens = sum(lengths)
    guided_tps, free_tps = max(guided_tps_runs), max(free_tps_runs)
    print(f"warm-up (xgrammar set-up + one schema compile + two short requests): {warmup:.2f} s")
    print(f"{args.num_requests} requests, {num_tokens} output tokens in the last pair of runs "
          f"({min(lengths)}-{max(lengths)} per request; {num_valid} complete JSON objects, all schema-valid)")
    print(f"guided (JSON schema): {guided_tps:7.1f} output tok/s (best; runs: "
          + ", ".join(f"{t:.1f}" for t in guided_tps_runs) + ")")
    print(f"free:                 {free_tps:7.1f} output tok/s (best; runs: "
          + ", ".join(f"{t:.1f}" for t in free_tps_runs) + ")")
    print(f"guided / free: {guided_tps / free_tps:.2f}x (target >= 0.8x)")
    print(f"time in the mask stage (fill + apply bitmasks), last guided run: {guided_mask_s:.2f} s "
          f"over {guided_steps} steps ({1000 * guided_mask_s / max(1, guided_steps):.1f} ms/step)")
    print("example:", guided_out[0].outputs[0].text)


if __name__ == "__main__":
    main()
