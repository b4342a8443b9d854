"""A streaming client for any OpenAI-compatible server: the workload through /v1/completions.

Each request sends its prompt as token ids with ``max_tokens`` = the workload's output
length and ``ignore_eos`` (vLLM's extra field; servers that do not know it may stop
early, which the result records), at most ``concurrency`` requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import time

from pagedllm.bench.report import RunResult
from pagedllm.bench.workloads import Workload


async def _one(client, url: str, model: str, prompt: list[int], output_len: int, start: float, api_key: str | None):
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sent = time.perf_counter()
    times: list[float] = []
    num_tokens = 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError(f"{url}: a request streamed no tokens")
    return sent, times, num_tokens or len(times)


async def run_serve_async(base_url: str, model: str, workload: Workload, concurrency: int,
                          api_key: str | None = None, system: str = "server") -> RunResult:
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    limit = asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def bounded(client, prompt):
        async with limit:
            return await _one(client, url, model, prompt, workload.output_len, start, api_key)

    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        results = await asyncio.gather(*(bounded(client, p) for p in workload.prompts))
    elapsed = time.perf_counter() - start
    ttft = [times[0] - sent for sent, times, _ in results]
    itl = [b - a for _, times, _ in results for a, b in zip(times, times[1:])]
    num_tokens = sum(n for _, _, n in results)
    return RunResult(system, workload.name, elapsed, num_tokens, ttft, itl,
                     {"num_requests": len(workload.prompts), "concurrency": concurrency})


def run_serve(base_url: str, model: str, workload: Workload, concurrency: int, api_key: str | None = None,
              system: str = "server") -> RunResult:
    return asyncio.run(run_serve_async(base_url, model, workload, concurrency, api_key, system))


def first_model(base_url: str, api_key: str | None = None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]
