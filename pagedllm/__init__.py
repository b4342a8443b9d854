"""pagedllm: a paged, continuously batched LLM inference engine with a plugin core.

Importing this package is cheap: it loads no torch and no plugin code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedllm.core.hookspecs import hookimpl
from pagedllm.core.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutputKind", "SamplingParams", "hookimpl", "__version__"]

if TYPE_CHECKING:
    from pagedllm.entrypoints.llm import LLM


def __getattr__(name: str) -> Any:
    # LLM pulls in torch; load it on first use, not at import.
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
