"""Offline runners: pagedllm's engine, and transformers' generate() with static batches."""

from __future__ import annotations

import time

import torch

from pagedllm.bench.report import RunResult
from pagedllm.bench.workloads import Workload


def run_pagedllm(engine, workload: Workload, system: str = "pagedllm") -> RunResult:
    """Submit the whole workload at once and step the engine to the end, timing every token."""
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
    if not engine.reset_prefix_cache():  # every repetition starts cold: no prompt left cached by the last one
        raise RuntimeError("the engine still has requests running; a benchmark run needs an idle engine")
    seen: dict[str, int] = {}
    last: dict[str, float] = {}
    ttft: list[float] = []
    itl: list[float] = []
    start = time.perf_counter()
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    num_tokens = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            n = len(out.outputs[0].token_ids)
            if n == seen.get(out.request_id, 0):
                continue
            if out.request_id not in last:
                ttft.append(now - start)
            else:
                itl.append(now - last[out.request_id])
            num_tokens += n - seen.get(out.request_id, 0)
            seen[out.request_id], last[out.request_id] = n, now
    elapsed = time.perf_counter() - start
    if num_tokens != workload.num_output_tokens:
        raise RuntimeError(f"pagedllm produced {num_tokens} tokens, the workload asks for {workload.num_output_tokens}")
    return RunResult(system, workload.name, elapsed, num_tokens, ttft, itl, {"num_requests": len(workload.prompts)})


def load_transformers(source, dtype: torch.dtype = torch.float32):
    """The same weights through transformers (a GGUF is dequantized by transformers itself)."""
    import transformers

    if source.format == "gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return model.eval()


def run_transformers(model, workload: Workload, batch_size: int) -> RunResult:
    """Static batching: sort by length, left-pad each batch, generate() it to the end."""
    order = sorted(workload.prompts, key=len)
    ttft: list[float] = []
    itl: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        streamer = _TokenClock()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=workload.output_len,
                                 min_new_tokens=workload.output_len, do_sample=False, pad_token_id=0, streamer=streamer)
        if out.shape[1] != width + workload.output_len:
            raise RuntimeError("transformers stopped early")
        # Every request of a static batch gets its tokens at the batch's step times.
        ttft += [streamer.times[1] - start] * len(chunk)
        itl += [b - a for a, b in zip(streamer.times[1:], streamer.times[2:])] * len(chunk)
    elapsed = time.perf_counter() - start
    return RunResult(f"transformers generate() batch {batch_size}", workload.name, elapsed, workload.num_output_tokens,
                     ttft, itl, {"num_requests": len(workload.prompts), "batch_size": batch_size})


class _TokenClock:
    """A generate() streamer that only records when each step's tokens arrive (first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass
