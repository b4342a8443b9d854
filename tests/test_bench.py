"""The benchmark harness measures what it says: exact workloads, per-token timings, percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm.bench import workloads
from pagedllm.bench.report import RunResult, Summary, percentile


def test_workloads_are_exact_and_seeded():
    w1 = workloads.offline(1000, 64, 64, 512, 128, seed=3)
    assert len(w1.prompts) == 64 and all(64 <= len(p) <= 512 for p in w1.prompts)
    assert w1.num_output_tokens == 64 * 128
    assert w1.prompts == workloads.offline(1000, 64, 64, 512, 128, seed=3).prompts
    assert w1.prompts != workloads.offline(1000, 64, 64, 512, 128, seed=4).prompts
    w4 = workloads.shared_prefix(1000, 32, 1024, 32, 32)
    assert all(p[:1024] == w4.prompts[0][:1024] and len(p) == 1056 for p in w4.prompts)
    assert len({tuple(p[1024:]) for p in w4.prompts}) == 32
    w2 = workloads.single_stream(1000, 256, 256)
    assert [len(p) for p in w2.prompts] == [256]


@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = list(np.random.default_rng(0).exponential(size=37))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summary_takes_medians_over_repeats():
    runs = [RunResult("s", "W", t, 100, [0.1 * t], [0.01 * t] * 3, {"num_requests": 4}) for t in (1.0, 3.0, 2.0)]
    s = Summary.of(runs)
    assert s.elapsed_s == 2.0 and s.output_tok_s == 50.0 and s.request_s == 2.0
    assert s.ttft_p50_ms == pytest.approx(200.0) and s.decode_tok_s == pytest.approx(50.0)


def test_pagedllm_runner_times_every_token(tmp_path):
    from pagedllm import LLM
    from pagedllm.bench.offline import run_pagedllm
    from pagedllm.testing.tiny import make_tiny_model

    llm = LLM(str(make_tiny_model(tmp_path / "m", "llama")), num_kv_blocks=64, max_num_seqs=4)
    w = workloads.offline(llm.engine.vocab_size, 6, 5, 20, 7, seed=1)
    r = run_pagedllm(llm.engine, w)
    assert r.num_output_tokens == 6 * 7
    assert len(r.ttft_s) == 6 and len(r.itl_s) == 6 * 6
    assert all(t > 0 for t in r.ttft_s + r.itl_s) and max(r.ttft_s) <= r.elapsed_s
