"""Native GGUF: weights stay quantized; checked against gguf-py, transformers' GGUF loader and llama.cpp.

Fixtures in tests/data/gguf (see its README): a tiny random Llama with every tensor in
another GGUF type (quantized by llama.cpp's own ggml_quantize_chunk), and llama.cpp's
Q4_K_M / Q4_0 files of the same model, with llama.cpp's logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.core.config import EngineConfig
from pagedllm.core.engine import LLMEngine
from pagedllm.core.loader.gguf_loader import GGUFFile
from pagedllm.core.quantization import UnquantizedLinearMethod
from pagedllm.plugins.quantization import gguf as gguf_method
from pagedllm.plugins.quantization.gguf_dequant import dequantize, int4_groups

DATA = Path(__file__).parent / "data" / "gguf"
REFERENCE = json.loads((DATA / "reference.json").read_text())
PROMPT = REFERENCE["prompt_token_ids"]
MIXED = DATA / "tiny-llama-mixed.gguf"
T = gguf.GGMLQuantizationType
QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def mixed_tensors() -> dict[str, tuple]:
    """GGUF type name -> (raw tensor [rows, bytes], type) of the first tensor of that type in the mixed file."""
    file = GGUFFile(MIXED)
    found = {}
    for info in file.tensors:
        if len(info.shape) == 2 and info.ggml_type.name not in found:
            found[info.ggml_type.name] = (torch.from_numpy(np.array(file.raw(info))), info.ggml_type)
    return found


TENSORS = mixed_tensors()


def test_the_mixed_fixture_covers_every_type():
    assert set(TENSORS) == set(QUANTIZED) | {"F16", "BF16", "F32"}


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_dequantize_is_bit_identical_to_gguf_py(type_name):
    raw, qtype = TENSORS[type_name]
    expected = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).copy())
    assert torch.equal(dequantize(raw, qtype), expected)
    kernels = gguf_method.load_kernels()
    if kernels is not None:
        out = torch.empty_like(expected)
        kernels.gguf_dequantize(raw, int(qtype), out)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_groups_rebuild_the_weights(type_name):
    raw, qtype = TENSORS[type_name]
    q, scale, zero = int4_groups(raw, qtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    rebuilt = ((q.float() - 8).unflatten(1, (-1, 32)) * scale[..., None] + zero[..., None]).flatten(1)
    # zero = m + 8 d rounds once in float32
    torch.testing.assert_close(rebuilt, dequantize(raw, qtype), rtol=0, atol=1e-6)


# kernel -> relative tolerance of a layer's output vs x @ dequantized.T
KERNEL_TOLERANCE = {"blocks": 1e-5, "dequant": 1e-5, "int4pack": 2e-2}


# C++ paths: 1, 5 the decode kernel; 23 (not a multiple of the 4-row tiles) the row-tiled kernel;
# 150 dequantized tiles for the float GEMM
@pytest.mark.parametrize("num_tokens", [1, 5, 23, 150])
@pytest.mark.parametrize("kernel", list(KERNEL_TOLERANCE))
@pytest.mark.parametrize("type_name", QUANTIZED)
def test_layer_output_matches_the_dequantized_weight(type_name, kernel, num_tokens):
    raw, qtype = TENSORS[type_name]
    weight = dequantize(raw, qtype)
    x = torch.randn(num_tokens, weight.shape[1], generator=torch.Generator().manual_seed(0))
    if kernel == "int4pack" and qtype in gguf_method.INT4PACK_TYPES:
        layer_kernel = gguf_method._Int4Pack(raw, qtype)
    elif kernel == "dequant" or gguf_method.load_kernels() is None:
        layer_kernel = gguf_method._Dequant(raw, qtype, weight.shape[1])
    else:  # int4pack falls back to the block kernel for other types, as the method does
        layer_kernel = gguf_method._Blocks(raw, qtype, weight.shape[1], gguf_method.load_kernels())
    expected = x @ weight.T
    scale = expected.abs().max().item()
    torch.testing.assert_close(layer_kernel(x), expected, rtol=0, atol=KERNEL_TOLERANCE[kernel] * scale)


@pytest.mark.skipif(gguf_method.load_kernels() is None, reason="no C++ tool chain")
@pytest.mark.parametrize("type_name", QUANTIZED)
def test_row_tiled_kernel_takes_any_number_of_rows_and_columns(type_name):
    """Weight rows not a multiple of the kernel's 4-row tiles, and x rows left over from its 4-row tiles."""
    raw, qtype = TENSORS[type_name]
    kernels = gguf_method.load_kernels()
    generator = torch.Generator().manual_seed(1)
    for rows in (1, 3, 7, 130):
        weight = dequantize(raw[:rows], qtype)
        for num_tokens in (9, 23, 96):
            x = torch.randn(num_tokens, weight.shape[1], generator=generator)
            expected = x @ weight.T
            got = kernels.gguf_mul_mat_tiled(x, raw[:rows], int(qtype))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.skipif(gguf_method.load_kernels() is None, reason="no C++ tool chain")
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_decode_kernel_takes_long_rows(type_name):
    """Rows of 67 and 131 blocks: past the kernel's 64-block chunks of scales, odd block counts."""
    raw, qtype = TENSORS[type_name]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    kernels = gguf_method.load_kernels()
    generator = torch.Generator().manual_seed(2)
    for num_blocks in (67, 131):
        wide = torch.cat([raw] * (num_blocks * block_bytes // raw.shape[1] + 1), dim=1)[:, : num_blocks * block_bytes]
        weight = dequantize(wide.contiguous(), qtype)
        for num_tokens in (1, 2, 5):
            x = torch.randn(num_tokens, weight.shape[1], generator=generator)
            expected = x.double() @ weight.double().T
            got = kernels.gguf_mul_mat(x, wide, int(qtype))
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def _rounded_to_int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as llama.cpp's Q8_0 activations hold it: per 32 values, d = max|x| / 127 and round(x / d) * d."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / d) * d).reshape(x.shape)


@pytest.mark.parametrize("num_tokens", [1, 3, 8])
@pytest.mark.parametrize("type_name", QUANTIZED)
def test_q8_kernel_is_the_exact_product_with_int8_rounded_activations(type_name, num_tokens):
    kernels = gguf_method.load_kernels()
    if kernels is None:
        pytest.skip("no C++ tool chain")
    raw, qtype = TENSORS[type_name]
    weight = dequantize(raw, qtype)
    x = torch.randn(num_tokens, weight.shape[1], generator=torch.Generator().manual_seed(1))
    y = gguf_method._Blocks(raw, qtype, weight.shape[1], kernels, q8=True)(x)
    # Q4_0 / Q4_1 / Q8_0 take integer dot products of int8-rounded x; the other types the float kernel
    rounded = _rounded_to_int8_blocks(x) if qtype in (T.Q4_0, T.Q4_1, T.Q8_0) else x
    expected = rounded @ weight.T
    scale = expected.abs().max().item()
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5 * scale)
    assert (y - x @ weight.T).abs().max().item() < 3e-2 * scale  # and near the unrounded product


def _engine(path: Path, **options) -> LLMEngine:
    return LLMEngine(EngineConfig.from_options(model=str(path), num_kv_blocks=64, **options))


def _prompt_logits(engine: LLMEngine) -> torch.Tensor:
    """The logits at every prompt position, [len(PROMPT), vocab], through the whole engine."""
    captured = []
    compute_logits = engine.model.compute_logits
    engine.model.compute_logits = lambda hidden: captured.append(compute_logits(hidden)) or captured[-1]
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=0))
    while engine.has_unfinished_requests():
        engine.step()
    prompt_part = next(c for c in captured if c.shape[0] == len(PROMPT) - 1)
    last = next(c for c in captured if c.shape[0] == 1)
    return torch.cat([prompt_part, last])


@pytest.fixture(scope="module")
def float_reference():
    """transformers' own GGUF loader (gguf-py dequantizes every tensor to float32): logits per file."""
    out = {}
    for name in REFERENCE["files"]:
        model = transformers.AutoModelForCausalLM.from_pretrained(DATA, gguf_file=name, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = model(torch.tensor([PROMPT])).logits[0]
    return out


# Max abs logit difference (logits of magnitude ~5): vs the float reference per kernel, and vs llama.cpp,
# which also rounds activations to 8 bits (its Q8_0 / Q8_K dot products; llama.cpp itself is 0.16-0.29
# from the float reference on these files, q8 is 0.14-0.15).
LOGITS_VS_FLOAT = {"auto": 1e-4, "dequant": 1e-4, "q8": 0.25, "int4pack": 0.15}
LOGITS_VS_LLAMA_CPP = 0.4


@pytest.mark.parametrize("kernel", list(LOGITS_VS_FLOAT))
@pytest.mark.parametrize("name", list(REFERENCE["files"]))
def test_logits_match_the_float_reference_and_llama_cpp(name, kernel, float_reference):
    engine = _engine(DATA / name, quantization_kernel=kernel)
    assert engine.quant_method.name == "gguf"
    logits = _prompt_logits(engine)

    expected = float_reference[name]
    assert (logits - expected).abs().max().item() < LOGITS_VS_FLOAT[kernel]
    llama_cpp = torch.tensor(REFERENCE["files"][name]["llama_cpp_logits"])
    assert (logits - llama_cpp).abs().max().item() < LOGITS_VS_LLAMA_CPP
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= (1.0 if kernel in ("auto", "dequant") else 0.75)


def test_weights_stay_quantized_with_types_per_part():
    engine = _engine(MIXED)
    model = engine.model
    layer0 = model.model.layers[0]
    # q, k, v of layer 0 are Q4_0, Q4_1, Q5_0: one part per type, in output order
    assert [kernel.qtype for _, kernel in layer0.self_attn.qkv_proj.gguf_parts] == [T.Q4_0, T.Q4_1, T.Q5_0]
    assert [rows for rows, _ in layer0.self_attn.qkv_proj.gguf_parts] == [256, 128, 128]
    # layer 1: q, k, v all Q6_K -> one part; gate/up BF16 -> one float part
    assert len(model.model.layers[1].self_attn.qkv_proj.gguf_parts) == 1
    assert model.model.layers[1].mlp.gate_up_proj.gguf_parts[0][1].weight.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.model.embed_tokens.gguf_types == {None: T.Q4_K}  # looked up from its raw blocks
    assert [name for name, _ in model.named_parameters() if "proj" in name or "lm_head" in name] == []


def test_quantization_none_loads_float_weights():
    engine = _engine(DATA / "tiny-llama.Q4_0.gguf", quantization="none")
    assert engine.quant_method is None
    layer = engine.model.model.layers[0].mlp.down_proj
    assert isinstance(layer.quant_method, UnquantizedLinearMethod) and layer.weight.dtype == torch.float32


def test_unsupported_type_and_wrong_device_are_named():
    method = gguf_method.GGUFMethod()
    linear = gguf_method.GGUFLinearMethod(method)
    layer = torch.nn.Module()
    layer.prefix = "model.layers.0.mlp.down_proj"
    linear.create_weights(layer, 256, [256], torch.float32)
    with pytest.raises(ValueError, match="down_proj.qweight_type: GGUF type IQ4_NL is not supported.*Q4_K"):
        linear.load_weight(layer, "qweight_type", None, torch.tensor(int(T.IQ4_NL)))
    method.kernel = "int4pack"
    with pytest.raises(ValueError, match="'gguf': kernel 'int4pack' runs on CPU only, not cuda.*dequant"):
        method.check_device(torch.device("cuda"))


def test_plugins_listing_shows_formats_and_devices():
    from pagedllm.core.plugins import build_plugin_manager

    (entry,) = [e for e in build_plugin_manager().entries("quantization") if e.name == "gguf"]
    assert entry.is_builtin and {"Q4_K", "Q6_K", "BF16"} <= set(entry.info["formats"]) and "cpu" in entry.info["devices"]


@pytest.mark.slow
def test_embedded_model_runs_natively_with_the_dequantized_path_greedy_tokens():
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The three primary colors are", "In machine learning, overfitting means"]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    options = {"max_num_batched_tokens": 64, "max_model_len": 512, "kv_cache_memory": "64MiB"}
    native = LLM(**options)
    assert native.engine.quant_method.name == "gguf" and native.engine.quant_method.kernel == "auto"
    assert [n for n, _ in native.engine.model.named_parameters() if "proj" in n or "embed" in n] == []
    native_tokens = [o.outputs[0].token_ids for o in native.generate(prompts, params)]
    del native
    dequantized = LLM(quantization="none", **options)
    assert dequantized.engine.quant_method is None
    assert native_tokens == [o.outputs[0].token_ids for o in dequantized.generate(prompts, params)]
