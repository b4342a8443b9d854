"""Config classes for GGUF models: plain ``PretrainedConfig`` subclasses holding transformers' defaults.

transformers' own classes (``LlamaConfig`` ...) import its model-loading stack with them
(torch.distributed.tensor, sympy, the kernels hub: about 70 MiB resident and 0.9 s) for
nothing but their defaults, which ``DEFAULTS`` holds instead. ``tests/test_loader.py``
checks the configs built from them against ``AutoConfig.for_model``, field for field.
"""

from __future__ import annotations

from transformers import PretrainedConfig

_COMMON = {"hidden_act": "silu", "initializer_range": 0.02, "use_cache": True, "attention_dropout": 0.0}
#: what transformers' config class of each model type adds to the fields a GGUF states
DEFAULTS = {
    "llama": _COMMON | {"pretraining_tp": 1, "attention_bias": False, "mlp_bias": False},
    "qwen2": _COMMON | {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 28},
    "qwen3": _COMMON | {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                        "max_window_layers": 28},
}  # fmt: skip


class GGUFLlamaConfig(PretrainedConfig):
    model_type = "llama"


class GGUFQwen2Config(PretrainedConfig):
    model_type = "qwen2"


class GGUFQwen3Config(PretrainedConfig):
    model_type = "qwen3"


CLASSES = {cls.model_type: cls for cls in (GGUFLlamaConfig, GGUFQwen2Config, GGUFQwen3Config)}


def make_config(model_type: str, fields: dict) -> PretrainedConfig:
    """The config of `model_type` with `fields` over the class defaults."""
    fields = DEFAULTS[model_type] | fields
    if "max_window_layers" in fields:  # qwen2 / qwen3: a GGUF states no sliding window
        fields["layer_types"] = ["full_attention"] * fields["num_hidden_layers"]
    config = CLASSES[model_type](**fields)
    config.use_cache = fields["use_cache"]  # PretrainedConfig drops it from kwargs, as a generation parameter
    return config
