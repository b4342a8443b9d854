"""Built-in quantization methods (registration only: names, lazy import strings and what they support)."""

from pagedllm.core.hookspecs import hookimpl

_GGUF_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"]


@hookimpl
def pagedllm_register_quantization_methods(register):
    register(
        "gguf", "pagedllm.plugins.quantization.gguf:GGUFMethod",
        formats=_GGUF_TYPES, devices=["cpu", "cuda"],
        description="GGUF files kept quantized: on CPU a C++ kernel multiplies the raw blocks (float32, exact); "
                    "kernel int4pack: Q4_0/Q4_1/Q4_K on torch int4pack (bf16); dequant: tiles in torch (any device)",
    )  # fmt: skip
    register(
        "gptq", "pagedllm.plugins.quantization.gptq:GPTQMethod",
        formats=["gptq v1/v2: 2/4/8-bit, group size any or -1, desc_act (g_idx), sym/asym"], devices=["cpu", "cuda"],
        description="GPTQModel / AutoGPTQ checkpoints: 4-bit on int4pack (act-order: permuted inputs), "
                    "8-bit per-channel on int8pack, else dequantized at load; cuda: triton (4-bit) or dequant",
    )  # fmt: skip
    register(
        "awq", "pagedllm.plugins.quantization.awq:AWQMethod",
        formats=["awq gemm: 4-bit, zero points, group 32-256"], devices=["cpu", "cuda"],
        description="AutoAWQ / GPTQModel GEMM checkpoints on int4pack, else dequantized at load",
    )  # fmt: skip
    register(
        "compressed-tensors", "pagedllm.plugins.quantization.compressed_tensors:CompressedTensorsMethod",
        formats=["FP8 W8A8 (dynamic per-token)", "INT8 W8A8 (dynamic per-token)", "W4A16 / W8A16 pack-quantized"],
        devices=["cpu", "cuda"],
        description="llm-compressor checkpoints: FP8 dequantized at load (or torch._scaled_mm), "
                    "INT8 via torch._int_mm, W4A16 on int4pack",
    )  # fmt: skip
    register(
        "bitsandbytes", "pagedllm.plugins.quantization.bitsandbytes:BitsAndBytesMethod",
        formats=["bnb nf4/fp4 (double quant)", "bnb LLM.int8"], devices=["cpu", "cuda"],
        description="pre-quantized bitsandbytes checkpoints, or a float model quantized to NF4 at load",
    )  # fmt: skip
    register(
        "bitsandbytes-fp4", "pagedllm.plugins.quantization.bitsandbytes:BitsAndBytesFP4Method",
        formats=["bnb fp4"], devices=["cpu", "cuda"], description="a float model quantized to FP4 at load by bitsandbytes",
    )  # fmt: skip
    register(
        "bitsandbytes-int8", "pagedllm.plugins.quantization.bitsandbytes:BitsAndBytesInt8Method",
        formats=["bnb LLM.int8"], devices=["cpu", "cuda"], description="a float model quantized to LLM.int8 at load by bitsandbytes",
    )  # fmt: skip
