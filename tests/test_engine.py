"""Engine behaviour on a tiny random Llama: n>1 with copy-on-write, seeds, stops, aborts, errors."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.config import EngineConfig
from pagedllm.testing.tiny import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), block_size=4, num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=64)


PROMPT = list(range(10, 32))  # 22 tokens: the last block (of 4) holds 2, so samples share it


def _sampled(llm, params, prompts=(PROMPT,)):
    return [[c.token_ids for c in o.outputs] for o in llm.generate([list(p) for p in prompts], params)]


def test_n_samples_share_prompt_blocks_with_copy_on_write(llm, monkeypatch):
    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    schedule = engine.scheduler.schedule
    seen = {"copies": 0, "shared": False}

    def recording_schedule():
        batch = schedule()
        seen["copies"] += len(batch.block_copies)
        tables = [engine.kv_cache.block_table(r.req_id) for r in engine.scheduler.running]
        if len(tables) == 4 and len({t[0] for t in tables}) == 1:
            seen["shared"] = True  # all four samples point at the same first prompt block
        return batch

    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([PROMPT], params)[0].outputs
    assert [len(o.token_ids) for o in outputs] == [8] * 4
    assert seen["shared"]
    assert seen["copies"] >= 1, "writing into the shared, partly filled last prompt block must copy it"
    assert engine.kv_cache.usage == 0.0


def test_n_samples_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=12, ignore_eos=True)
    first = _sampled(llm, params)[0]
    assert len(first) == 3 and len({tuple(t) for t in first}) == 3
    assert _sampled(llm, params)[0] == first


def test_seeded_request_is_independent_of_batch_composition(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded)[0].outputs[0].token_ids
    others = [list(range(40, 40 + n)) for n in (5, 60, 17)]
    mixed = llm.generate(
        [others[0], others[1], PROMPT, others[2]],
        [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True), SamplingParams(temperature=0.0, max_tokens=5),
         seeded, SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True)],
    )
    assert mixed[2].outputs[0].token_ids == alone


def test_max_tokens_and_length_finish(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ids_and_eos(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    stop_at = greedy[4]
    first_index = greedy.index(stop_at)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == greedy[: first_index + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # The model's EOS ends generation unless ignore_eos; min_tokens holds it back.
    eos_biased = SamplingParams(temperature=0.0, max_tokens=12, logit_bias={1: 100.0})
    assert llm.generate([PROMPT], eos_biased)[0].outputs[0].token_ids == [1]
    held = SamplingParams(temperature=0.0, max_tokens=12, logit_bias={1: 100.0}, min_tokens=3)
    out = llm.generate([PROMPT], held)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == 1
    ignored = SamplingParams(temperature=0.0, max_tokens=6, logit_bias={1: 100.0}, ignore_eos=True)
    assert llm.generate([PROMPT], ignored)[0].outputs[0].token_ids == [1] * 6


def test_stop_string_truncates_text(llm):
    full = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    kept = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert llm.generate([PROMPT], kept)[0].outputs[0].text == full[: full.index(stop) + len(stop)]


def test_stop_string_before_min_tokens_does_not_stop_or_truncate(llm):
    full = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    stop = full.text[1:3]  # ends inside the first few tokens
    texts = [llm.engine.tokenizer.decode(full.token_ids[:i]) for i in range(17)]
    first_token_with_stop = next(i for i, t in enumerate(texts) if stop in t)
    held = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop], min_tokens=first_token_with_stop + 2)
    out = llm.generate([PROMPT], held)[0].outputs[0]
    # min_tokens hides the early match; a later complete occurrence (if any) may stop it.
    later = full.text.find(stop, len(texts[first_token_with_stop + 1]) - len(stop) + 1)
    if later < 0:
        assert (out.text, out.finish_reason) == (full.text, "length")
    else:
        assert out.text == full.text[:later] and out.finish_reason == "stop"


def _stream_outputs(engine, request_id, params):
    engine.add_request(request_id, PROMPT, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def test_output_kinds_cumulative_delta_and_final_only(llm):
    from pagedllm import RequestOutputKind

    base = dict(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2, n=2)
    engine = llm.engine
    cumulative = _stream_outputs(engine, "cum", SamplingParams(**base))
    delta = _stream_outputs(engine, "delta", SamplingParams(**base, output_kind=RequestOutputKind.DELTA))
    final = _stream_outputs(engine, "final", SamplingParams(**base, output_kind="final_only"))
    assert len(cumulative) == len(delta) >= 9 and len(final) == 1 and final[0].finished
    last = cumulative[-1]
    for i in range(2):
        assert final[0].outputs[i].token_ids == last.outputs[i].token_ids
        assert final[0].outputs[i].text == last.outputs[i].text
        # Deltas add up to the cumulative output, token ids, text and logprobs alike.
        assert [t for o in delta for t in o.outputs[i].token_ids] == last.outputs[i].token_ids
        assert "".join(o.outputs[i].text for o in delta) == last.outputs[i].text
        assert [p for o in delta for p in o.outputs[i].logprobs] == last.outputs[i].logprobs
        assert delta[-1].outputs[i].cumulative_logprob == pytest.approx(last.outputs[i].cumulative_logprob)
    assert max(len(o.outputs[0].token_ids) for o in delta) == 1
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="partial")


def test_detokenize_false_gives_token_ids_only(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.generate([PROMPT], params)[0].outputs[0]
    bare = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, detokenize=False))[0].outputs[0]
    assert bare.token_ids == out.token_ids and out.text and bare.text == ""
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


def test_prompt_logprobs_and_logprobs_have_ranks(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=3, logprobs=5, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for position, token_id in zip(out.prompt_logprobs[1:], PROMPT[1:]):
        assert token_id in position and len(position) in (2, 3)
        assert sorted(lp.rank for t, lp in position.items() if t != token_id or lp.rank <= 2)[:2] == [1, 2]
    for position, token_id in zip(out.outputs[0].logprobs, out.outputs[0].token_ids):
        assert position[token_id].rank == 1  # greedy picks the top token
        assert len(position) == 5


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("to-abort", PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv_cache.usage > 0
    engine.abort_request("to-abort")
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.usage == 0.0


def test_bad_input_raises_value_error_naming_the_problem(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(300))], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[10, 99999]], SamplingParams())
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([PROMPT], SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="unknown engine option"):
        EngineConfig.from_options(max_num_seq=3)
    assert not llm.engine.has_unfinished_requests()
    # The engine still works after bad requests.
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids


def test_unknown_architecture_lists_supported(tmp_path):
    path = make_tiny_model(tmp_path / "m", "llama")
    config = (path / "config.json").read_text().replace('"LlamaForCausalLM"', '"NoSuchForCausalLM"')
    (path / "config.json").write_text(config)
    with pytest.raises(ValueError, match="NoSuchForCausalLM.*LlamaForCausalLM"):
        LLM(str(path))


def test_third_party_logits_processor_is_used(llm, model_dir):
    pytest.importorskip("pagedllm_example_plugin")
    with_plugin = LLM(str(model_dir), max_model_len=256, num_kv_blocks=128, logits_processors=["no_repeat_ngram"])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, extra_args={"no_repeat_ngram_size": 2})
    tokens = with_plugin.generate([PROMPT], params)[0].outputs[0].token_ids
    seq = PROMPT + tokens
    bigrams = [tuple(seq[i : i + 2]) for i in range(len(seq) - 1)]
    assert len(bigrams) == len(set(bigrams))
    plain = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0].outputs[0].token_ids
    assert plain != tokens  # a random model repeats itself within 40 greedy tokens


def test_reset_prefix_cache_makes_a_repeated_prompt_compute_again(llm):
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.reset_prefix_cache()
    first = llm.generate([list(PROMPT)], params, use_tqdm=False)[0]
    again = llm.generate([list(PROMPT)], params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens > 0  # the cache works...
    assert llm.reset_prefix_cache() is True  # ...and an idle engine can drop it
    cold = llm.generate([list(PROMPT)], params, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0
    assert [o.outputs[0].token_ids for o in (first, again, cold)] == [first.outputs[0].token_ids] * 3
