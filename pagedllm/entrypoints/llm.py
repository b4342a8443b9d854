"""LLM: the offline Python API (generate and chat over one engine)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any

from pagedllm.core.config import EngineConfig
from pagedllm.core.engine import LLMEngine
from pagedllm.core.outputs import RequestOutput
from pagedllm.core.plugins import PluginManager
from pagedllm.core.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | Sequence[int] | dict[str, Any]


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    ``LLM()`` runs the embedded SmolLM2-135M-Instruct model; ``LLM(model=path, **options)``
    takes any engine option (see ``EngineConfig``), e.g. ``max_num_seqs=64``.
    """

    def __init__(self, model: str | None = None, *, plugins: PluginManager | None = None, **options: Any) -> None:
        self.config = EngineConfig.from_options(model=model, **options)
        self.engine = LLMEngine(self.config, plugins)
        self._ids = itertools.count()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, so the next requests compute their prompts afresh."""
        return self.engine.reset_prefix_cache()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; a prompt is text, token ids or ``{"prompt_token_ids": [...]}``.

        Outputs come back in the order of the prompts.
        """
        prompt_list = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompt_list):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompt_list)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)

        # Only finished outputs are returned, so the engine need not build one every step
        # (as vLLM's LLM does). The caller's objects are left as they are.
        final_only: dict[int, SamplingParams] = {}
        for params in params_list:
            if id(params) not in final_only:
                final_only[id(params)] = params.clone()
                final_only[id(params)].output_kind = RequestOutputKind.FINAL_ONLY
        params_list = [final_only[id(params)] for params in params_list]

        request_ids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, _prompt_input(prompt), params)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list, then generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            self.apply_chat_template(
                c, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                chat_template=chat_template, tools=tools,
            )
            for c in conversations
        ]
        return self.generate([{"prompt_token_ids": p} for p in prompts], sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        tokenizer = self.engine.tokenizer
        if kwargs.get("chat_template") is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; pass chat_template=... or use generate()")
        if kwargs.get("continue_final_message"):
            kwargs["add_generation_prompt"] = False
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        # The template already holds any BOS token; don't add another.
        return tokenizer(text, add_special_tokens=False).input_ids

    def _run(self, request_ids: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        if use_tqdm is None:
            use_tqdm = sys.stderr.isatty()
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and request_ids:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", unit="req", dynamic_ncols=True)
        try:
            while pending:
                for output in self.engine.step():
                    if output.finished and output.request_id in pending:
                        finished[output.request_id] = output
                        pending.discard(output.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in pending:
                self.engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    return list(prompts)


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")
