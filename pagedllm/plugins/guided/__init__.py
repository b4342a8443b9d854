"""Built-in guided-decoding backends: registration only (names and lazy import strings)."""

from __future__ import annotations

from pagedllm.core.hookspecs import hookimpl


@hookimpl
def pagedllm_register_guided_decoding_backends(register):
    register("xgrammar", "pagedllm.plugins.guided.xgrammar_backend:XGrammarBackend",
             description="JSON schema, any JSON, regex, choice, EBNF grammar and structural tags via xgrammar")
