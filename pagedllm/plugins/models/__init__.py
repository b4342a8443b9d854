"""Built-in model architectures (registration only: nothing heavy is imported here)."""

from pagedllm.core.hookspecs import hookimpl

_LLAMA = "pagedllm.plugins.models.llama:LlamaForCausalLM"


@hookimpl
def pagedllm_register_models(register):
    for architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        register(architecture, _LLAMA, description="Llama family: RoPE (+scaling), GQA, tied embeddings, Qwen2 biases")
