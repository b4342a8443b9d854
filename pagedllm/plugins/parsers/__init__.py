"""Built-in tool and reasoning parsers: registration only (names and lazy import strings)."""

from __future__ import annotations

from pagedllm.core.hookspecs import hookimpl

_TOOL_PARSERS = {
    "hermes": ("hermes:HermesToolParser", "<tool_call>{json}</tool_call> (Qwen 2.5/3, Hermes)"),
    "llama3_json": ("llama3_json:Llama3JsonToolParser", "<|python_tag|>{json}; ... (Llama 3.1/3.2)"),
    "mistral": ("mistral:MistralToolParser", "[TOOL_CALLS][{...}] and [TOOL_CALLS]name{args} (Mistral)"),
    "pythonic": ("pythonic:PythonicToolParser", "[f(a=1), g()] (Llama 3.2/4, ToolACE)"),
}
_REASONING_PARSERS = {
    "deepseek_r1": ("reasoning:DeepSeekR1ReasoningParser", "output starts inside <think>...</think>"),
    "qwen3": ("reasoning:Qwen3ReasoningParser", "an optional leading <think>...</think> block"),
}


@hookimpl
def pagedllm_register_tool_parsers(register):
    for name, (target, description) in _TOOL_PARSERS.items():
        register(name, f"{__name__}.{target}", description=description)


@hookimpl
def pagedllm_register_reasoning_parsers(register):
    for name, (target, description) in _REASONING_PARSERS.items():
        register(name, f"{__name__}.{target}", description=description)
