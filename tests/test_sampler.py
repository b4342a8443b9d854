"""Tests of the sampler and the built-in logits processors, on fabricated requests and logits."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.core.request import Request
from pagedllm.core.sampler import Sampler, SamplingState, compute_logprobs
from pagedllm.core.sampling_params import SamplingParams
from pagedllm.plugins import samplers as samplers_plugin

VOCAB = 8
EXPECTED_NAMES = [
    "allowed_token_ids",
    "logit_bias",
    "bad_words",
    "min_tokens",
    "penalties",
    "temperature",
    "min_p",
    "top_k",
    "top_p",
]


def registered_processors() -> dict[str, type]:
    """Name -> class, through the plugin's own registration hook."""
    targets: dict[str, str] = {}
    samplers_plugin.pagedllm_register_logits_processors(lambda name, target, **info: targets.__setitem__(name, target))
    classes = {}
    for name, target in targets.items():
        module, attr = target.split(":")
        classes[name] = getattr(importlib.import_module(module), attr)
    return classes


PROCESSORS = registered_processors()


def make_sampler(vocab_size: int = VOCAB) -> Sampler:
    return Sampler([cls() for cls in PROCESSORS.values()], vocab_size)


def make_request(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
    eos: set[int] | None = None,
    bad_words_token_ids: list[list[int]] | None = None,
    **params,
) -> Request:
    sampling_params = SamplingParams(seed=seed, **params)
    sampling_params._eos_token_ids = eos or set()
    sampling_params._bad_words_token_ids = bad_words_token_ids or []
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return Request(
        req_id="r",
        prompt_token_ids=list(prompt or [0]),
        sampling_params=sampling_params,
        output_token_ids=list(output or []),
        generator=generator,
    )


def apply_one(name: str, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    state = SamplingState.from_requests(requests, logits.shape[1], logits.device)
    return PROCESSORS[name]().apply(logits, state)


def draw(logits_row: list[float], num_draws: int = 4000, seed: int = 0, **params) -> Counter:
    """Sample ``num_draws`` tokens from one row of logits, as a batch of identical requests."""
    torch.manual_seed(seed)
    logits = torch.tensor([logits_row] * num_draws)
    requests = [make_request(**params) for _ in range(num_draws)]
    return Counter(make_sampler(len(logits_row)).sample(logits, requests).token_ids)


def random_logits(num_reqs: int, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_reqs, vocab_size, generator=torch.Generator().manual_seed(seed))


# -- registration ---------------------------------------------------------------------


def test_builtins_registered_by_name_in_pipeline_order():
    assert list(PROCESSORS) == EXPECTED_NAMES
    orders = [cls.order for cls in PROCESSORS.values()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)


def test_registration_module_imports_no_torch():
    code = "import sys, pagedllm.plugins.samplers; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sampler_sorts_processors_by_order():
    sampler = Sampler([cls() for cls in reversed(PROCESSORS.values())], VOCAB)
    assert [type(p) for p in sampler.processors] == list(PROCESSORS.values())


def test_sampler_rejects_mismatched_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        make_sampler(VOCAB).sample(torch.zeros(1, VOCAB + 1), [make_request()])


# -- greedy and temperature -----------------------------------------------------------


def test_greedy_is_argmax_and_builds_no_tensors():
    logits = random_logits(6)
    requests = [make_request(temperature=0.0) for _ in range(6)]
    state = SamplingState.from_requests(requests, VOCAB, logits.device)
    assert state.all_greedy
    assert all(t is None for t in (state.temperature, state.top_k, state.top_p, state.min_p, state.repetition_penalty))
    assert make_sampler().sample(logits, requests).token_ids == logits.argmax(-1).tolist()


def test_greedy_row_ignores_truncation_params():
    requests = [make_request(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9)]
    state = SamplingState.from_requests(requests, VOCAB, torch.device("cpu"))
    assert state.top_k is None and state.top_p is None and state.min_p is None and state.temperature is None


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_matches_softmax_of_scaled_logits(temperature):
    row = [1.0, 0.5, 0.0, -1.0]
    counts = draw(row, num_draws=10000, temperature=temperature)
    expected = torch.softmax(torch.tensor(row) / temperature, dim=-1)
    unscaled = torch.softmax(torch.tensor(row), dim=-1)
    for token_id in range(len(row)):
        assert counts[token_id] / 10000 == pytest.approx(expected[token_id].item(), abs=0.02)  # ~4 sigma
    # The temperature really matters at this tolerance.
    assert (expected - unscaled).abs().max() > 0.05


# -- truncation -----------------------------------------------------------------------


def test_top_k_never_leaves_the_top_k():
    row = [0.0, 3.0, 1.0, 2.9, 0.5, 2.0, -1.0, 0.2]
    counts = draw(row, top_k=2)
    assert set(counts) == {1, 3}


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    row = probs.log().tolist()
    # 0.5 < 0.75 <= 0.5 + 0.3: the nucleus is {1, 3}.
    processed = apply_one("top_p", torch.tensor([row]), [make_request(top_p=0.75)])
    assert torch.isfinite(processed[0]).nonzero().flatten().tolist() == [1, 3]
    assert set(draw(row, top_p=0.75)) == {1, 3}
    assert set(draw(row, top_p=0.85)) == {1, 2, 3}


def test_min_p_drops_tokens_below_the_scaled_top_probability():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    row = probs.log().tolist()
    # Threshold 0.2 * 0.5 = 0.1 drops only token 0.
    processed = apply_one("min_p", torch.tensor([row]), [make_request(min_p=0.2)])
    assert torch.isfinite(processed[0]).nonzero().flatten().tolist() == [1, 2, 3]
    assert set(draw(row, min_p=0.2)) == {1, 2, 3}
    assert set(draw(row, min_p=0.0)) == {0, 1, 2, 3}


def test_truncation_acts_on_temperature_scaled_logits():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    row = probs.log().tolist()
    # At temperature 2 the probabilities flatten to ~[.12, .38, .21, .29]: min_p 0.5
    # keeps {1, 2, 3} where the unscaled distribution would keep only {1, 3}.
    assert set(draw(row, temperature=2.0, min_p=0.5)) == {1, 2, 3}
    assert set(draw(row, temperature=1.0, min_p=0.5)) == {1, 3}


# -- constraints ----------------------------------------------------------------------


def test_logit_bias_flips_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0]])
    sampler = make_sampler(4)
    assert sampler.sample(logits, [make_request(temperature=0.0)]).token_ids == [1]
    biased = make_request(temperature=0.0, logit_bias={2: 10.0})
    assert sampler.sample(logits, [biased]).token_ids == [2]
    processed = apply_one("logit_bias", logits, [make_request(logit_bias={2: 10.0, 0: -500.0})])
    assert processed.tolist() == [[-100.0, 5.0, 11.0, 0.0]]  # biases clamped to [-100, 100]


def test_allowed_token_ids_restrict_greedy_and_random_choice():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.5, 2.0]])
    greedy = make_request(temperature=0.0, allowed_token_ids=[2, 3])
    assert make_sampler(5).sample(logits, [greedy]).token_ids == [2]
    assert set(draw(logits[0].tolist(), allowed_token_ids=[0, 3])) == {0, 3}


def test_bad_words_ban_single_tokens_always_and_last_token_after_prefix():
    logits = torch.zeros(1, VOCAB)
    bad = [[4], [5, 6, 7]]
    no_prefix = apply_one("bad_words", logits, [make_request(output=[1, 5], bad_words_token_ids=bad)])
    assert torch.isinf(no_prefix[0]).nonzero().flatten().tolist() == [4]
    after_prefix = apply_one("bad_words", logits, [make_request(output=[1, 5, 6], bad_words_token_ids=bad)])
    assert torch.isinf(after_prefix[0]).nonzero().flatten().tolist() == [4, 7]
    # The prefix in the prompt does not count: only generated text is checked.
    prompt_only = apply_one("bad_words", logits, [make_request(prompt=[5, 6], bad_words_token_ids=bad)])
    assert torch.isinf(prompt_only[0]).nonzero().flatten().tolist() == [4]


def test_bad_words_change_the_greedy_token():
    logits = torch.tensor([[0.0, 1.0, 0.0, 3.0]])
    request = make_request(temperature=0.0, output=[1, 2], bad_words_token_ids=[[1, 2, 3]])
    assert make_sampler(4).sample(logits, [request]).token_ids == [1]


@pytest.mark.parametrize(
    ("num_output", "ignore_eos", "expected"),
    [(2, False, 1), (3, False, 3), (2, True, 3)],
)
def test_min_tokens_masks_eos_until_reached(num_output, ignore_eos, expected):
    logits = torch.tensor([[0.0, 1.0, 0.0, 3.0]])
    request = make_request(temperature=0.0, output=[0] * num_output, eos={3}, min_tokens=3, ignore_eos=ignore_eos)
    assert make_sampler(4).sample(logits, [request]).token_ids == [expected]


def test_min_tokens_masks_stop_token_ids_even_with_ignore_eos():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    request = make_request(temperature=0.0, output=[0], eos={3}, stop_token_ids=[2], min_tokens=2, ignore_eos=True)
    assert make_sampler(4).sample(logits, [request]).token_ids == [3]
    request = make_request(temperature=0.0, output=[0], eos={3}, stop_token_ids=[2], min_tokens=2)
    assert make_sampler(4).sample(logits, [request]).token_ids == [1]


# -- penalties ------------------------------------------------------------------------


def expected_penalised(logits: list[float], prompt: list[int], output: list[int], rep: float, freq: float, pres: float):
    result = []
    for token_id, logit in enumerate(logits):
        if token_id in prompt or token_id in output:
            logit = logit / rep if logit > 0 else logit * rep
        count = output.count(token_id)
        result.append(logit - freq * count - pres * (count > 0))
    return result


@pytest.mark.parametrize(
    ("rep", "freq", "pres"),
    [(1.5, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 0.9), (0.8, -0.5, 1.2)],
)
def test_penalties_follow_the_exact_formula(rep, freq, pres):
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.25, 3.0, 1.0, -2.0, 0.0]])
    prompt, output = [0, 1, 1], [2, 3, 3, 3, 1]
    request = make_request(prompt=prompt, output=output, repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    processed = apply_one("penalties", logits, [request])
    expected = expected_penalised(logits[0].tolist(), prompt, output, rep, freq, pres)
    assert processed[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert processed[0].tolist() != logits[0].tolist()


def test_repetition_penalty_moves_the_greedy_choice_off_a_repeat():
    logits = torch.tensor([[0.0, 2.0, 1.5, 0.0]])
    request = make_request(temperature=0.0, prompt=[1], repetition_penalty=2.0)
    assert make_sampler(4).sample(logits, [request]).token_ids == [2]


# -- every processor leaves other rows alone ------------------------------------------

ROW_PARAMS = {
    "allowed_token_ids": dict(allowed_token_ids=[1, 2]),
    "logit_bias": dict(logit_bias={3: 4.0}),
    "bad_words": dict(bad_words_token_ids=[[2], [0, 5]], output=[0]),
    "min_tokens": dict(min_tokens=4, eos={1}, stop_token_ids=[6]),
    "penalties": dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, output=[1, 2, 2]),
    "temperature": dict(temperature=0.7),
    "min_p": dict(min_p=0.3),
    "top_k": dict(top_k=3),
    "top_p": dict(top_p=0.5),
}


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_processor_changes_only_the_rows_that_use_it(name):
    logits = random_logits(3)
    plain = dict(prompt=[1, 2, 3], output=[0, 1, 4])
    requests = [make_request(**plain), make_request(**ROW_PARAMS[name]), make_request(temperature=0.0, **plain)]
    processed = apply_one(name, logits, requests)
    assert torch.equal(processed[0], logits[0]) and torch.equal(processed[2], logits[2])
    assert not torch.equal(processed[1], logits[1])
    assert torch.equal(logits, random_logits(3)), "the input logits were modified in place"


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries({
            "temperature": st.sampled_from([0.0, 0.5, 1.0, 1.7]),
            "top_k": st.integers(0, VOCAB + 2),
            "top_p": st.sampled_from([0.3, 0.9, 1.0]),
            "min_p": st.sampled_from([0.0, 0.1]),
            "seed": st.one_of(st.none(), st.integers(0, 1000)),
        }),
        min_size=1,
        max_size=6,
    ),
    logits_seed=st.integers(0, 1000),
)
def test_sampled_token_is_always_a_kept_token(rows, logits_seed):
    logits = random_logits(len(rows), seed=logits_seed)
    requests = [make_request(**row) for row in rows]
    sampler = make_sampler()
    state = SamplingState.from_requests(requests, VOCAB, logits.device)
    processed = logits
    for processor in sampler.processors:
        processed = processor.apply(processed, state)
    token_ids = sampler.sample(logits, requests).token_ids
    for i, (row, token_id) in enumerate(zip(rows, token_ids)):
        assert torch.isfinite(processed[i, token_id])
        if row["temperature"] == 0.0:
            assert token_id == logits[i].argmax().item()
            assert torch.equal(processed[i], logits[i])  # truncation skips greedy rows
        elif row["top_k"]:
            assert torch.isfinite(processed[i]).sum() <= row["top_k"]


# -- seeded reproducibility -----------------------------------------------------------


def generate(rows: list[dict], target: int, num_steps: int = 12, vocab_size: int = 50) -> list[int]:
    """Run ``num_steps`` of sampling over a batch and return row ``target``'s tokens."""
    torch.manual_seed(1234 + len(rows) + target)  # the unseeded rows differ by scenario
    requests = [make_request(prompt=[1, 2], **row) for row in rows]
    sampler = make_sampler(vocab_size)
    step_logits = torch.randn(num_steps, vocab_size, generator=torch.Generator().manual_seed(7))
    for logits_row in step_logits:
        token_ids = sampler.sample(logits_row.expand(len(rows), -1).clone(), requests).token_ids
        for request, token_id in zip(requests, token_ids):
            request.output_token_ids.append(token_id)
    return requests[target].output_token_ids


def test_seeded_request_is_reproducible_wherever_it_sits_in_the_batch():
    seeded = dict(seed=42, temperature=1.5, top_k=30, presence_penalty=0.3)
    alone = generate([seeded], target=0)
    first_of_five = generate([seeded] + [dict(temperature=1.0)] * 4, target=0)
    neighbours = [dict(seed=7), dict(temperature=0.0), dict(temperature=0.8, top_p=0.9)]
    fourth = generate(neighbours + [seeded, dict(seed=3, top_k=5)], target=3)
    assert alone == first_of_five == fourth
    assert len(set(alone)) > 3  # it really sampled
    assert generate([dict(seeded, seed=43)], target=0) != alone


def test_unseeded_rows_follow_the_global_rng():
    rows = [dict(temperature=1.0)] * 4
    assert generate(rows, target=2) == generate(rows, target=2)
    assert generate(rows, target=1) != generate(rows, target=2)


# -- logprobs -------------------------------------------------------------------------


def test_compute_logprobs_matches_log_softmax_with_ranks():
    logits = random_logits(4, vocab_size=10, seed=3)
    reference = torch.log_softmax(logits, dim=-1)
    order = reference.argsort(dim=-1, descending=True)
    token_ids = [order[0, 0].item(), order[1, 5].item(), order[2, 9].item(), order[3, 1].item()]
    positions = compute_logprobs(logits, token_ids, num_top=2)
    for i, (position, token_id) in enumerate(zip(positions, token_ids)):
        expected_ids = {token_id, order[i, 0].item(), order[i, 1].item()}
        assert set(position) == expected_ids
        for tid, logprob in position.items():
            assert logprob.logprob == pytest.approx(reference[i, tid].item(), abs=1e-6)
            assert logprob.rank == (order[i] == tid).nonzero().item() + 1
    assert list(positions[1])[0] == token_ids[1]  # the given token comes first
    assert compute_logprobs(logits, torch.tensor(token_ids), num_top=0)[2] == {token_ids[2]: positions[2][token_ids[2]]}


def test_sampler_logprobs_are_of_the_raw_logits():
    logits = random_logits(3, seed=5)
    requests = [
        make_request(temperature=0.5, top_k=2, logprobs=3, presence_penalty=1.0, output=[0, 1]),
        make_request(),
        make_request(temperature=0.0, logprobs=0),
    ]
    output = make_sampler().sample(logits, requests)
    raw = torch.log_softmax(logits, dim=-1)
    assert output.logprobs[1] is None
    assert len(output.logprobs[0]) in (3, 4) and output.token_ids[0] in output.logprobs[0]
    assert list(output.logprobs[2]) == [output.token_ids[2]]
    for i in (0, 2):
        for token_id, logprob in output.logprobs[i].items():
            assert logprob.logprob == pytest.approx(raw[i, token_id].item(), abs=1e-6)
    assert math.isclose(sum(lp.logprob for lp in output.logprobs[2].values()), raw[2].max().item(), abs_tol=1e-6)


# -- bad words to token ids -----------------------------------------------------------


def byte_level_tokenizer(add_prefix_space: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(["hello world", "the cat sat on the mat", "hello there"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>")


def test_bad_words_to_token_ids_encodes_each_word_bare_and_after_a_space():
    from pagedllm.core.sampler import bad_words_to_token_ids

    tokenizer = byte_level_tokenizer(add_prefix_space=False)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert encode("hello") != encode(" hello")
    result = bad_words_to_token_ids(["hello", "cat sat"], tokenizer)
    assert result == [encode("hello"), encode(" hello"), encode("cat sat"), encode(" cat sat")]
    assert len(encode(" cat sat")) > 1  # a multi-token sequence
    # With a prefix-space tokenizer both forms coincide and are kept once.
    prefixed = byte_level_tokenizer(add_prefix_space=True)
    assert bad_words_to_token_ids(["hello"], prefixed) == [prefixed.encode(" hello", add_special_tokens=False)]
