"""Built-in quantization methods (registration only: names, lazy import strings and what they support)."""

from pagedllm.core.hookspecs import hookimpl

_GGUF_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"]


@hookimpl
def pagedllm_register_quantization_methods(register):
    register(
        "gguf", "pagedllm.plugins.quantization.gguf:GGUFMethod",
        formats=_GGUF_TYPES, devices=["cpu", "cuda"],
        description="GGUF files, kept quantized: Q4_0/Q4_1 (and 32-aligned Q4_K) on int4pack, Q8_0 blockwise, the rest dequantized a tile at a time",
    )  # fmt: skip
