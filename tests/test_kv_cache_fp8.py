"""The fp8 KV cache (kv_cache_dtype=fp8 / fp8_e4m3 / fp8_e5m2) through the whole engine on a tiny Llama."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.core.engine import _resolve_kv_cache_dtype
from pagedllm.core.layers import Attention
from pagedllm.testing.tiny import make_tiny_model

PROMPTS = [list(range(20, 20 + n)) for n in (37, 64, 90)]
BACKENDS = ["cpu", "torch"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-fp8"), "llama")


def _llm(path, **options):
    return LLM(str(path), block_size=16, num_kv_blocks=64, max_model_len=256, **options)


def _prompt_logprobs(llm) -> torch.Tensor:
    """Teacher-forced log-probabilities of every prompt token: one prefill each, no sampling drift."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate([list(p) for p in PROMPTS], params, use_tqdm=False)
    return torch.tensor([lp[tok].logprob for o in out for tok, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])])


def _attention_layers(llm) -> list[Attention]:
    return [m for m in llm.engine.model.modules() if isinstance(m, Attention)]


@pytest.fixture(scope="module")
def reference(model_dir):
    return {b: _prompt_logprobs(_llm(model_dir, attention_backend=b)) for b in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_is_close_to_float_and_e4m3_closer_than_e5m2(model_dir, reference, backend):
    errors = {}
    for kv_dtype, torch_dtype in (("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        llm = _llm(model_dir, attention_backend=backend, kv_cache_dtype=kv_dtype)
        assert llm.engine.runner.kv_caches.dtype == torch_dtype
        errors[kv_dtype] = (_prompt_logprobs(llm) - reference[backend]).abs().mean().item()
        assert all(layer.kv_scales_known and (layer.kv_scales > 0).all() for layer in _attention_layers(llm))
    # 3 mantissa bits (e4m3) round to ~3 %, 2 bits (e5m2) to ~6 %: both move the log-probabilities
    # a little (this sharp random model: mean ~0.06 and ~0.16; bfloat16 compute throughout: ~0.016),
    # e5m2 more. An fp8 cache that was not used would give errors of 0.
    assert 0 < errors["fp8"] < 0.12 and errors["fp8"] < errors["fp8_e5m2"] < 0.3, errors


def test_cpu_kernel_and_torch_reference_agree_on_fp8(model_dir):
    got = [_prompt_logprobs(_llm(model_dir, attention_backend=b, kv_cache_dtype="fp8")) for b in BACKENDS]
    torch.testing.assert_close(got[0], got[1], atol=1e-4, rtol=0)


def test_same_budget_holds_twice_the_blocks_of_16_bit(model_dir):
    def blocks(**options):
        llm = LLM(str(model_dir), block_size=16, kv_cache_memory="8MiB", max_model_len=256, **options)
        return llm.engine.kv_cache.num_blocks, llm.engine.runner.kv_caches.nbytes

    fp32, bf16, fp8 = blocks(), blocks(dtype="bfloat16"), blocks(kv_cache_dtype="fp8")
    assert fp8[0] == 2 * bf16[0] == 4 * fp32[0]
    assert fp8[1] == bf16[1] == fp32[1] == 8 * 2**20  # the whole budget, whatever the element size


def test_scales_computed_on_the_fly_fit_the_first_batch(model_dir):
    llm = _llm(model_dir, kv_cache_dtype="fp8")
    layers = _attention_layers(llm)
    assert not any(layer.kv_scales_known for layer in layers)
    captured = {}
    def capture(i):
        def hook(module, args):  # Attention.forward(q, k, v, batch)
            captured.setdefault(i, (args[1].clone(), args[2].clone()))

        return hook

    hooks = [layer.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2), use_tqdm=False)
    for hook in hooks:
        hook.remove()
    for i, layer in enumerate(layers):
        k, v = captured[i]  # the first batch's keys (after RoPE) and values
        want = torch.stack([k.abs().amax(), v.abs().amax()]) * 4 / 448
        torch.testing.assert_close(layer.kv_scales, want)


def test_checkpoint_scales_are_loaded_and_used(model_dir, tmp_path):
    # Scales the engine computed, written into the checkpoint as k_scale / v_scale: the same
    # results; ten times larger ones: different results (coarser rounding).
    computed = _llm(model_dir, kv_cache_dtype="fp8")
    want = _prompt_logprobs(computed)
    scales = [layer.kv_scales.clone() for layer in _attention_layers(computed)]
    for factor, same in ((1.0, True), (10.0, False)):
        path = tmp_path / f"scaled-{factor}"
        shutil.copytree(model_dir, path)
        weights = load_file(path / "model.safetensors")
        for i, s in enumerate(scales):
            weights[f"model.layers.{i}.self_attn.k_scale"] = s[0] * factor
            weights[f"model.layers.{i}.self_attn.v_scale"] = s[1] * factor
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        llm = _llm(path, kv_cache_dtype="fp8")
        for layer, s in zip(_attention_layers(llm), scales):
            assert layer.kv_scales_known
            torch.testing.assert_close(layer.kv_scales, s * factor)
        got = _prompt_logprobs(llm)
        assert torch.equal(got, want) == same
    # The same checkpoint with the default cache dtype ignores the scales.
    torch.testing.assert_close(_prompt_logprobs(_llm(path)), _prompt_logprobs(_llm(model_dir)))


def test_greedy_generation_runs_with_preemption_and_prefix_hits(model_dir):
    """A cache too small for the batch (preemption) and shared prefixes (cached fp8 blocks) give the
    same greedy tokens as a roomy fp8 cache with the same scales."""
    prompts = [list(range(30, 80)) + [100 + i] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = _llm(model_dir, kv_cache_dtype="fp8", enable_prefix_caching=False)
    roomy.generate([prompts[0]], params, use_tqdm=False)  # fixes the scales on one request
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(str(model_dir), block_size=16, num_kv_blocks=8, max_model_len=96, kv_cache_dtype="fp8")
    for layer, ref in zip(_attention_layers(tight), _attention_layers(roomy)):
        layer.load_kv_scale("k_scale", ref.kv_scales[0:1])
        layer.load_kv_scale("v_scale", ref.kv_scales[1:2])
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert tight.engine.scheduler.num_preemptions > 0 and tight.engine.kv_cache.num_prefix_hits > 0


def test_bad_kv_cache_dtype_is_a_value_error_naming_it(model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        _llm(model_dir, kv_cache_dtype="int4")

    class PlainBackend:  # a backend that declares no fp8 support
        pass

    with pytest.raises(ValueError, match="attention backend 'plain' does not support"):
        _resolve_kv_cache_dtype("fp8", torch.float32, "plain", PlainBackend)
    assert _resolve_kv_cache_dtype("auto", torch.bfloat16, "plain", PlainBackend) is torch.bfloat16
