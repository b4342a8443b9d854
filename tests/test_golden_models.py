"""pagedllm vs Hugging Face transformers on tiny random Llama / Mistral / Qwen2 models, float32.

The whole engine path is exercised: paged cache, chunked prefill (tiny token budget),
prefix-cache hits (shared prefixes, and a second pass over the same prompts) and forced
preemption (a KV cache too small for every request at once).
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.testing.tiny import make_tiny_model

MAX_NEW = 20


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(5, 400) for _ in range(37)]
    prompts = [[rng.randrange(5, 400) for _ in range(n)] for n in (3, 11, 29, 64, 150, 90)]
    prompts += [shared + [rng.randrange(5, 400) for _ in range(n)] for n in (1, 9, 30)]  # shared prefix
    return prompts


def _hf_greedy(model_dir, prompts):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True,
            )
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
        results.append((tokens, logprobs))
    return results


VARIANTS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    # An MLP of whole kernel panels (96 = 2 x 48 = 6 x 16): the CPU's gate | up product applies silu-and-mul itself.
    "llama-mlp-96": ("llama", {"intermediate_size": 96}),
    # RoPE scaling variants as Llama 3.1 and long-context Qwen2 configs declare them.
    "llama-rope-llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    "qwen2-rope-yarn": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 256}}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)
    prompts = _prompts()
    return path, prompts, _hf_greedy(path, prompts)


def _check(outputs, expected):
    for output, (tokens, logprobs) in zip(outputs, expected):
        completion = output.outputs[0]
        assert completion.token_ids == tokens
        ours = [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids)]
        assert ours == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_greedy_matches_transformers_with_chunked_prefill_and_prefix_hits(tiny, backend):
    path, prompts, expected = tiny
    llm = LLM(str(path), block_size=8, max_num_batched_tokens=48, max_num_seqs=8, num_kv_blocks=256, max_model_len=512,
              attention_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    first = llm.generate(prompts, params)
    _check(first, expected)
    assert any(o.num_cached_tokens > 0 for o in first[-3:]), "shared prefixes should hit the prefix cache"
    again = llm.generate(prompts, params)
    _check(again, expected)
    assert sum(o.num_cached_tokens for o in again) > sum(o.num_cached_tokens for o in first)
    assert llm.engine.kv_cache.usage == 0.0


def test_greedy_matches_transformers_under_preemption(tiny):
    path, prompts, expected = tiny
    # 30 blocks of 8 tokens: the longest request alone needs 22, so requests must be preempted.
    llm = LLM(str(path), block_size=8, max_num_batched_tokens=512, num_kv_blocks=30, max_model_len=240,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    _check(llm.generate(prompts, params), expected)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_cache.usage == 0.0
