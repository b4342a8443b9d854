"""Registration of the example plugin: names and import strings only, no torch."""

import pagedllm


@pagedllm.hookimpl
def pagedllm_register_logits_processors(register):
    register(
        "no_repeat_ngram",
        "pagedllm_example_plugin.processor:NoRepeatNGramProcessor",
        description="ban tokens that would repeat an n-gram (extra_args['no_repeat_ngram_size'])",
    )
