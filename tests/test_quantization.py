"""The quantization-method interface: a throwaway method registered inline drives the whole engine."""

from __future__ import annotations

import json
import types
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from pagedllm import SamplingParams
from pagedllm.core.config import EngineConfig
from pagedllm.core.engine import LLMEngine
from pagedllm.core.hookspecs import hookimpl
from pagedllm.core.loader import load_model_source
from pagedllm.core.quantization import (
    LinearMethod,
    QuantizationMethod,
    UnquantizedLinearMethod,
    resolve_quantization,
)
from pagedllm.testing.plugin import make_plugin_manager
from pagedllm.testing.tiny import make_tiny_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ToyInt8LinearMethod(LinearMethod):
    """int8 weight [out, in] with a per-row scale, as a third-party method would write it."""

    def create_weights(self, layer, in_features, output_sizes, dtype):
        layer.register_buffer("weight", torch.empty(sum(output_sizes), in_features, dtype=torch.int8))
        layer.register_buffer("weight_scale", torch.empty(sum(output_sizes), 1, dtype=dtype))

    def load_weight(self, layer, param_name, shard, tensor):
        target = getattr(layer, param_name)
        if shard is not None:
            target = target.narrow(0, layer.offsets[shard], layer.output_sizes[shard])
        if target.shape != tensor.shape:
            raise ValueError(f"{layer.prefix}.{param_name}: expected {tuple(target.shape)}, got {tuple(tensor.shape)}")
        target.copy_(tensor)

    def process_weights_after_loading(self, layer):
        layer.dequantized = layer.weight.to(layer.weight_scale.dtype) * layer.weight_scale

    def apply(self, layer, x, bias):
        return F.linear(x, layer.dequantized, bias)


class ToyInt8Method(QuantizationMethod):
    name = "toy-int8"
    kernels = ("dequant",)
    prefixes: ClassVar[list[str]] = []  # every prefix asked for, across instances

    @classmethod
    def from_config(cls, quant_config, hf_config):
        method = cls()
        method.quant_config = quant_config
        return method

    def check_device(self, device):
        if device.type != "cpu":
            raise ValueError(f"quantization method 'toy-int8' cannot run on {device}: it has CPU kernels only; use device='cpu'")

    def get_linear_method(self, prefix):
        self.prefixes.append(prefix)
        return UnquantizedLinearMethod() if prefix == "lm_head" else ToyInt8LinearMethod()


@hookimpl
def pagedllm_register_quantization_methods(register):
    register("toy-int8", ToyInt8Method, formats=["toy int8"], devices=["cpu"])


TOY_PLUGIN = types.SimpleNamespace(pagedllm_register_quantization_methods=pagedllm_register_quantization_methods)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(quantized dir, the same weights dequantized as a plain float dir) of a tiny Llama."""
    root = tmp_path_factory.mktemp("toy")
    float_dir = make_tiny_model(root / "float", "llama")
    state = load_file(float_dir / "model.safetensors")
    quantized, dequantized = {}, dict(state)
    for name, tensor in state.items():
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            scale = tensor.abs().amax(dim=1, keepdim=True) / 127
            q = torch.round(tensor / scale).to(torch.int8)
            quantized[name] = q
            quantized[name + "_scale"] = scale
            dequantized[name] = q.float() * scale
        else:
            quantized[name] = tensor
    for name, tensors in (("quantized", quantized), ("dequantized", dequantized)):
        out = root / name
        out.mkdir()
        for file in float_dir.iterdir():
            if file.name != "model.safetensors":
                (out / file.name).write_bytes(file.read_bytes())
        save_file(tensors, out / "model.safetensors")
    config = json.loads((root / "quantized" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "toy-int8", "bits": 8}
    (root / "quantized" / "config.json").write_text(json.dumps(config))
    return root / "quantized", root / "dequantized"


def _engine(model, **options) -> LLMEngine:
    config = EngineConfig.from_options(model=str(model), num_kv_blocks=64, **options)
    return LLMEngine(config, make_plugin_manager([("toy", TOY_PLUGIN)], include_entry_points=True))


def _greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


def test_method_from_quantization_config_runs_the_model(checkpoints):
    quantized, dequantized = checkpoints
    engine = _engine(quantized)

    assert isinstance(engine.quant_method, ToyInt8Method)
    assert engine.quant_method.quant_config == {"quant_method": "toy-int8", "bits": 8}
    layer = engine.model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.int8 and layer.prefix == "model.layers.0.self_attn.qkv_proj"
    assert "model.layers.1.mlp.gate_up_proj" in ToyInt8Method.prefixes and "lm_head" in ToyInt8Method.prefixes
    assert isinstance(engine.model.lm_head.quant_method, UnquantizedLinearMethod)

    prompts = [[5, 17, 99, 250, 3], [300, 301, 302]]
    reference = transformers.AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    expected = []
    for prompt in prompts:
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected.append(out[0, len(prompt):].tolist())
    assert _greedy(engine, prompts) == expected


def test_kernel_option_is_checked_against_the_method(checkpoints):
    quantized, dequantized = checkpoints
    assert _engine(quantized, quantization_kernel="dequant").quant_method.kernel == "dequant"
    with pytest.raises(ValueError, match="quantization_kernel='int4pack'.*toy-int8.*auto, dequant"):
        _engine(quantized, quantization_kernel="int4pack")
    with pytest.raises(ValueError, match="quantization_kernel='dequant'.*not quantized"):
        _engine(dequantized, quantization_kernel="dequant")


def test_quantization_option_conflicts_are_named(checkpoints):
    quantized, dequantized = checkpoints
    with pytest.raises(ValueError, match="quantization='none'.*quantized with 'toy-int8'"):
        _engine(quantized, quantization="none")
    with pytest.raises(ValueError, match="quantization='gguf'.*quantized with 'toy-int8'"):
        _engine(quantized, quantization="gguf")
    with pytest.raises(ValueError, match="quantization 'nope' is not available; available: awq, bitsandbytes, bitsandbytes-fp4, "
                       "bitsandbytes-int8, compressed-tensors, gguf, gptq, toy-int8"):
        _engine(dequantized, quantization="nope")


def test_on_the_fly_method_gets_an_empty_config_and_missing_tensors_are_named(checkpoints):
    _, dequantized = checkpoints
    # The float checkpoint has no weight_scale: the toy method cannot load it, and says what is missing.
    with pytest.raises(ValueError, match=r"missing .*weight_scale"):
        _engine(dequantized, quantization="toy-int8")


def test_check_device_refuses_at_load(checkpoints):
    quantized, _ = checkpoints
    pm = make_plugin_manager([("toy", TOY_PLUGIN)])
    with pytest.raises(ValueError, match="toy-int8.*cannot run on cuda.*device='cpu'"):
        resolve_quantization(load_model_source(quantized), None, "auto", pm, torch.device("cuda"))
