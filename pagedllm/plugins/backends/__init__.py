"""Built-in attention backends (registration only: nothing heavy is imported here)."""

from pagedllm.core.hookspecs import hookimpl


@hookimpl
def pagedllm_register_attention_backends(register):
    register(
        "torch",
        "pagedllm.plugins.backends.torch_attention:TorchAttentionBackend",
        description="reference backend on torch scaled_dot_product_attention; CPU and CUDA",
    )
    register(
        "cpu",
        "pagedllm.plugins.backends.cpu_attention:CpuAttentionBackend",
        description="CPU: decodes read the paged cache in place (C++ kernel, float32), prefill as torch",
    )
