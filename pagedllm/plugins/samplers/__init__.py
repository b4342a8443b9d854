"""Built-in logits processors: registration only (names and lazy import strings, no torch)."""

from __future__ import annotations

import pagedllm

_MODULE = "pagedllm.plugins.samplers.processors"

#: Registry name -> (class in ``processors``, description), in pipeline order.
_PROCESSORS = {
    "allowed_token_ids": ("AllowedTokenIdsProcessor", "restrict sampling to allowed_token_ids"),
    "logit_bias": ("LogitBiasProcessor", "add logit_bias to the logits"),
    "bad_words": ("BadWordsProcessor", "never complete a bad word"),
    "min_tokens": ("MinTokensProcessor", "hold back EOS and stop tokens until min_tokens"),
    "penalties": ("PenaltiesProcessor", "repetition, frequency and presence penalties"),
    "temperature": ("TemperatureProcessor", "scale logits by 1 / temperature"),
    "min_p": ("MinPProcessor", "drop tokens below min_p times the top probability"),
    "top_k": ("TopKProcessor", "keep the top_k most likely tokens"),
    "top_p": ("TopPProcessor", "keep the top_p nucleus"),
}


@pagedllm.hookimpl
def pagedllm_register_logits_processors(register):
    for name, (class_name, description) in _PROCESSORS.items():
        register(name, f"{_MODULE}:{class_name}", description=description)
