"""AsyncLLMEngine: many asyncio callers over one engine thread; errors reach only their caller."""

from __future__ import annotations

import asyncio

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    EngineStepError,
)
from pagedllm.testing.tiny import make_tiny_model

OPTIONS = dict(block_size=4, num_kv_blocks=256, max_model_len=128)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [list(range(10, 10 + n)) for n in (3, 9, 17, 30)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = AsyncLLMEngine.from_options(model=str(model_dir), **OPTIONS)
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params, request_id):
    last = None
    async for output in engine.generate(prompt, params, request_id):
        last = output
    return last


def _idle(engine) -> bool:
    stats = engine.stats()
    return stats.num_unfinished == 0 and stats.kv_cache_usage == 0


async def _until(predicate, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_concurrent_requests_match_the_offline_engine(engine, model_dir):
    expected = [o.outputs[0].token_ids for o in LLM(str(model_dir), **OPTIONS).generate(PROMPTS, GREEDY)]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))

    outputs = asyncio.run(main())
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.finished for o in outputs) and _idle(engine)


def test_delta_outputs_of_a_slow_consumer_are_merged_not_dropped(engine, model_dir):
    expected = LLM(str(model_dir), **OPTIONS).generate(PROMPTS[:1], GREEDY)[0].outputs[0]
    delta = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind="delta")

    async def main():
        received = []
        async for output in engine.generate(PROMPTS[0], delta, "slow-delta"):
            received.append(output.outputs[0])
            await asyncio.sleep(0.05)  # let the engine queue several steps
        return received

    received = asyncio.run(main())
    assert [t for c in received for t in c.token_ids] == expected.token_ids
    assert "".join(c.text for c in received) == expected.text
    assert len(received) < len(expected.token_ids)  # some deltas arrived merged


def test_bad_input_reaches_only_its_caller(engine):
    async def main():
        good = asyncio.create_task(_collect(engine, PROMPTS[1], GREEDY, "good"))
        with pytest.raises(ValueError, match="vocabulary"):
            await _collect(engine, [1, 10**6], GREEDY, "bad")
        with pytest.raises(ValueError, match="already in use"):
            await asyncio.gather(_collect(engine, [5, 6], GREEDY, "same"), _collect(engine, [5, 6], GREEDY, "same"))
        return await good

    assert len(asyncio.run(main()).outputs[0].token_ids) == 12
    assert asyncio.run(_until(lambda: _idle(engine))) is None


def test_cancelling_the_consumer_aborts_and_frees_blocks(engine):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        started = asyncio.Event()

        async def consume():
            async for output in engine.generate(PROMPTS[3], params, "cancelled"):
                if output.outputs[0].token_ids:
                    started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.stats().kv_cache_usage > 0
        task.cancel()
        await _until(lambda: _idle(engine))
        return engine.stats()

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.kv_cache_usage == 0


def test_a_failing_step_fails_requests_in_flight_and_the_engine_recovers(engine, monkeypatch):
    real_step = engine.engine.step

    def failing_step():
        raise RuntimeError("boom")

    async def main():
        monkeypatch.setattr(engine.engine, "step", failing_step)
        with pytest.raises(EngineStepError, match="boom"):
            await _collect(engine, PROMPTS[0], GREEDY, "doomed")
        monkeypatch.setattr(engine.engine, "step", real_step)
        return await _collect(engine, PROMPTS[0], GREEDY, "after")

    assert asyncio.run(main()).finished
    assert _idle(engine)


def test_queue_limit_and_shutdown(model_dir):
    engine = AsyncLLMEngine.from_options(model=str(model_dir), max_waiting_requests=0, **OPTIONS)

    async def main():
        with pytest.raises(EngineOverloadedError):
            await _collect(engine, PROMPTS[0], GREEDY, "rejected")
        engine.max_waiting_requests = None
        long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        stream = await engine.add_request("in-flight", PROMPTS[0], long)
        await anext(stream)
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await _collect(engine, PROMPTS[0], GREEDY, "too-late")

    asyncio.run(main())
    assert not engine.is_running
