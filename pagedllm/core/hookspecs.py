"""The plugin contract: one ``pagedllm_register_<kind>(register)`` hook per plugin kind.

A plugin is a module (or object) named by an entry point in the group
``pagedllm.plugins``. It implements any of the hooks below with
``@pagedllm.hookimpl``. Each hook receives a ``register`` callback; the plugin calls
it once per thing it provides::

    register(name, target, **info)

``name``
    The registry name users select (``"LlamaForCausalLM"``, ``"torch"``, ``"hermes"``).
``target``
    Either a lazy import string ``"package.module:attr"`` (preferred: nothing is
    imported until the engine needs that name, so listing plugins stays cheap), or the
    object itself (handy for plugins defined inline in tests).
``info``
    Optional keyword metadata shown by ``pagedllm plugins`` (for example
    ``description="..."``, ``formats=[...]``, ``devices=[...]``).

Registration must be cheap and free of side effects: the hook module should import
neither torch nor its own implementation. A hook that raises is reported by plugin name
with its error and that plugin is left out; the engine fails only if a run needs it.

Example: a complete third-party plugin module::

    import pagedllm

    @pagedllm.hookimpl
    def pagedllm_register_logits_processors(register):
        register("no_repeat_ngram", "my_package.processors:NoRepeatNGramProcessor")

with, in the package's ``pyproject.toml``::

    [project.entry-points."pagedllm.plugins"]
    my_plugin = "my_package.plugin"

The hooks, grouped by the phase of a run that uses them: loading a model (models,
quantization methods), running it (attention backends), choosing tokens (logits
processors, guided decoding), and reading the output (tool and reasoning parsers).
"""

from __future__ import annotations

from typing import Protocol

import pluggy

PROJECT_NAME = "pagedllm"
ENTRY_POINT_GROUP = "pagedllm.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The callback handed to every registration hook."""

    def __call__(self, name: str, target: object, **info: object) -> None: ...


# -- loading a model ------------------------------------------------------------------


@hookspec
def pagedllm_register_models(register: Register) -> None:
    """Register model architectures.

    ``name`` is a Hugging Face ``architectures`` entry from ``config.json``
    (``"LlamaForCausalLM"``). ``target`` is an ``nn.Module`` class constructed as
    ``cls(hf_config, model_config)`` that provides:

    - ``forward(input_ids, positions, batch) -> hidden_states``: ``input_ids`` and
      ``positions`` are ``[num_tokens]``; ``batch`` is the
      :class:`~pagedllm.core.attention.AttentionMetadata` of the step, passed down to
      every attention layer;
    - ``compute_logits(hidden_states) -> logits``: ``[n, vocab_size]`` in float32;
    - ``load_weights(weights)``: consumes ``(hf_name, tensor)`` pairs;
    - ``kv_cache_spec() -> KVCacheSpec``: number of layers, KV heads and head size,
      declared as data so the core can size the cache without model-specific code.

    Example::

        @hookimpl
        def pagedllm_register_models(register):
            register("LlamaForCausalLM", "pagedllm.plugins.models.llama:LlamaForCausalLM")
    """


@hookspec
def pagedllm_register_quantization_methods(register: Register) -> None:
    """Register quantization methods: how linear layers store, load and multiply weights.

    ``name`` is the ``quant_method`` of ``config.json``'s ``quantization_config``
    (``"gptq"``, ``"awq"``, ``"compressed-tensors"``), ``"gguf"`` for a GGUF file with
    quantized tensors, or a name given by the ``quantization`` engine option
    (``--quantization bitsandbytes`` quantizes a float checkpoint on load). The option
    ``quantization="none"`` loads a GGUF dequantized to float instead.

    ``target`` is a subclass of :class:`pagedllm.core.quantization.QuantizationMethod`:

    - ``from_config(quant_config: dict, hf_config) -> method`` (classmethod): built once
      per model from the ``quantization_config`` dict (``{}`` for an on-the-fly method);
      raise ValueError naming an unsupported key and value;
    - ``check_device(device)``: raise ValueError naming the method, the reason and what
      would work when it cannot run on this device;
    - ``get_linear_method(prefix) -> LinearMethod`` for each linear layer, by its Hugging
      Face module name (``model.layers.0.self_attn.qkv_proj`` for the merged q/k/v,
      ``model.layers.0.mlp.gate_up_proj`` for gate/up, ``lm_head``); return
      ``UnquantizedLinearMethod()`` for modules the checkpoint keeps in float;
    - ``get_embedding_method(prefix) -> LinearMethod`` for ``model.embed_tokens``
      (default float); a quantized one also implements ``embedding(layer, token_ids)``;
    - class attribute ``kernels``: names the ``quantization_kernel`` option may force
      (``self.kernel`` holds the choice, ``"auto"`` by default).

    A :class:`~pagedllm.core.quantization.LinearMethod` does the per-layer work (the
    layer ``pagedllm.core.layers.Linear`` / ``MergedLinear`` / ``VocabEmbedding`` owns the
    float bias and delegates the rest):

    - ``create_weights(layer, in_features, output_sizes, dtype)``: register the
      parameters / buffers on ``layer`` under the checkpoint's own tensor names
      (``qweight``, ``scales``, ``qzeros``, ``g_idx``, ``weight_scale``, ...);
      ``output_sizes`` has one entry per merged part. Every name registered is then
      required from the checkpoint for every part (override ``checkpoint_names(layer)``
      to say otherwise);
    - ``load_weight(layer, param_name, shard, tensor)``: place checkpoint tensor
      ``<prefix>.<param_name>``; ``shard`` is None for a plain layer, else the index of the
      merged part (its rows start at ``layer.offsets[shard]``, it has
      ``layer.output_sizes[shard]`` of them). The model maps Hugging Face names: for
      ``model.layers.0.self_attn.k_proj.qweight`` the method sees layer
      ``...self_attn.qkv_proj``, ``param_name="qweight"``, ``shard=1``. Names with dots
      after the layer (``weight.absmax``) arrive whole;
    - ``process_weights_after_loading(layer)``: repack for the kernel, once, after all
      weights are in;
    - ``apply(layer, x, bias) -> y``: ``x`` is ``[num_tokens, in_features]`` in the
      compute dtype, ``y`` ``[num_tokens, out_features]`` in the same dtype;
    - optionally ``apply_silu_and_mul(layer, x, bias)``: for a gate | up layer, ``silu(gate) *
      up`` (``[num_tokens, out_features / 2]``); the default is ``apply``, then the fused op.

    Models never branch on a method: they pass ``ctx.quant_method`` and a prefix to each
    layer. Useful ``info`` keys: ``formats`` and ``devices`` (shown by
    ``pagedllm plugins``), ``description``.

    Example::

        @hookimpl
        def pagedllm_register_quantization_methods(register):
            register("gptq", "my_quant.gptq:GPTQMethod", formats=["gptq 4/8-bit"], devices=["cpu", "cuda"])

    with ``my_quant/gptq.py``::

        class GPTQLinearMethod(LinearMethod):
            def create_weights(self, layer, in_features, output_sizes, dtype):
                out = sum(output_sizes)
                layer.register_buffer("qweight", torch.empty(in_features // 8, out, dtype=torch.int32))
                ...

            def load_weight(self, layer, param_name, shard, tensor):
                dim = 0 if param_name == "g_idx" else -1  # output columns of this part
                ...

            def apply(self, layer, x, bias):
                return F.linear(x, dequantize(layer), bias)

        class GPTQMethod(QuantizationMethod):
            name = "gptq"

            @classmethod
            def from_config(cls, quant_config, hf_config):
                return cls(bits=quant_config["bits"], group_size=quant_config["group_size"])

            def get_linear_method(self, prefix):
                return UnquantizedLinearMethod() if prefix == "lm_head" else GPTQLinearMethod(self)
    """


# -- running a model ------------------------------------------------------------------


@hookspec
def pagedllm_register_attention_backends(register: Register) -> None:
    """Register attention backends.

    ``target`` is a class constructed as
    ``cls(num_heads, head_dim, num_kv_heads, scale)``, with
    ``forward(q, k, v, kv_cache, batch) -> out`` where ``q`` is
    ``[num_tokens, num_heads, head_dim]``, ``k``/``v`` are
    ``[num_tokens, num_kv_heads, head_dim]``, ``kv_cache`` is the layer's
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` tensor and ``batch`` the
    step's :class:`~pagedllm.core.attention.AttentionMetadata`. It writes the new keys
    and values into the cache at ``batch.slot_mapping`` and returns
    ``[num_tokens, num_heads, head_dim]``. The engine picks one by the
    ``attention_backend`` option. Optional members:

    - ``kv_cache_shape(num_blocks, block_size)``: another layout of the same elements,
      ``[2, num_blocks, ...]``;
    - ``kv_cache_dtypes``: the ``kv_cache_dtype`` values it runs beyond ``"auto"``
      (``("fp8", "fp8_e4m3", "fp8_e5m2")``). With an fp8 cache, ``forward`` gets the
      keyword ``kv_scales``, a float32 ``[2]`` tensor ``(k_scale, v_scale)``: the cache
      holds ``k / k_scale`` and ``v / v_scale``, saturated at the format's largest value.
      An fp8 ``kv_cache_dtype`` with a backend that does not list it is a ValueError.

    Example::

        @hookimpl
        def pagedllm_register_attention_backends(register):
            register("torch", "pagedllm.plugins.backends.torch_attention:TorchAttentionBackend")
    """


# -- choosing tokens ------------------------------------------------------------------


@hookspec
def pagedllm_register_logits_processors(register: Register) -> None:
    """Register logits processors: the steps of the sampler's pipeline.

    ``target`` is a class with a class attribute ``order`` (int, lower runs first),
    constructed once per engine as ``cls()``, and called every step as
    ``processor.apply(logits, state) -> logits`` on the ``[num_requests, vocab_size]``
    float32 logits of the step with the batched
    :class:`~pagedllm.core.sampler.SamplingState` (per-request parameters as tensors,
    prompt and output token ids, the :class:`SamplingParams` list). A processor must
    leave rows whose requests do not use it unchanged, and must be batched: no Python
    loop over the vocabulary. Per-request options a third-party processor needs come
    from ``SamplingParams.extra_args``. ``apply`` returns new logits (or its input when
    no row uses it) and never modifies its input in place: the raw logits also feed the
    returned logprobs. Built-in processors are always on; others are
    enabled by the ``logits_processors`` engine option.

    Example::

        @hookimpl
        def pagedllm_register_logits_processors(register):
            register("no_repeat_ngram", "my_pkg.proc:NoRepeatNGramProcessor")
    """


@hookspec
def pagedllm_register_guided_decoding_backends(register: Register) -> None:
    """Register guided-decoding (structured output) backends.

    The engine picks one by the ``guided_decoding_backend`` option; a request may name
    another in ``SamplingParams.structured_outputs.backend``. ``target`` is a class
    constructed once per engine, on first use, as
    ``cls(tokenizer, vocab_size, stop_token_ids=[...])`` (``vocab_size`` is the model's,
    which may exceed the tokenizer's: ids the tokenizer lacks must stay masked), with:

    - ``validate(spec)``: raise ``ValueError`` naming the problem if the
      :class:`~pagedllm.core.sampling_params.StructuredOutputsParams` ``spec`` (JSON
      schema, any JSON object, regex, choice, EBNF grammar, structural tag) cannot be
      compiled. Called by ``add_request``, so it must be quick;
    - ``compile(spec) -> compiled``: the slow part, run in a worker thread while the
      engine keeps stepping; cache it (the same constraint twice compiles once);
    - ``new_matcher(compiled) -> matcher``: one per sequence (``n > 1`` gets ``n``),
      with ``accept_token(token_id) -> bool`` and ``is_terminated() -> bool``. It lives
      on the request, so it survives preemption (recompute never re-feeds tokens);
    - ``apply_masks(logits, rows, matchers)``: set to ``-inf``, in place, every token of
      ``logits[rows[i]]`` (``[num_reqs, vocab_size]`` float32) that ``matchers[i]`` does
      not allow next, for all guided rows of the step at once.

    The engine feeds each sampled token to the matcher and ends the request when it
    is terminated (the constraint is complete and a stop token was sampled).

    Example::

        @hookimpl
        def pagedllm_register_guided_decoding_backends(register):
            register("xgrammar", "pagedllm.plugins.guided.xgrammar_backend:XGrammarBackend")
    """


# -- reading the output ---------------------------------------------------------------


@hookspec
def pagedllm_register_tool_parsers(register: Register) -> None:
    """Register tool-call parsers (``--tool-call-parser NAME``).

    ``target`` is a class constructed as ``cls(tokenizer)``, one instance per streamed
    request (it keeps what it has sent), with:

    - ``extract_tool_calls(text, request) -> ExtractedToolCalls`` for finished text:
      ``tools_called``, ``tool_calls`` (:class:`~pagedllm.core.parsers.ToolCall`: id
      in OpenAI's ``call_...`` form, type ``"function"``, name, arguments as JSON text)
      and ``content`` (the text outside the calls, None if blank);
    - ``extract_tool_calls_streaming(previous_text, current_text, delta_text,
      previous_token_ids, current_token_ids, delta_token_ids, request, *,
      finished=False) -> DeltaMessage | None``: what the text so far adds, as content
      and :class:`~pagedllm.core.parsers.DeltaToolCall` parts (index, and on a call's
      first part its id, type and name; then argument fragments). Called for every
      chunk and once more with ``finished=True`` at the end of the stream.

    Malformed or truncated calls are returned as content, never raised. The
    accumulated stream must equal the finished result. ``request`` is the server's
    request (its ``tools``), which a parser may ignore. Subclassing
    :class:`pagedllm.core.tool_parser.ToolParser` gives all of this from two
    methods (where a call region starts, what it holds).

    Example::

        @hookimpl
        def pagedllm_register_tool_parsers(register):
            register("hermes", "pagedllm.plugins.parsers.hermes:HermesToolParser")
    """


@hookspec
def pagedllm_register_reasoning_parsers(register: Register) -> None:
    """Register reasoning parsers (``--reasoning-parser NAME``).

    The engine option ``reasoning_parser`` names one. ``target`` is a class
    constructed as ``cls(tokenizer)``, one instance per streamed request, with:

    - ``extract_reasoning_content(text, request) -> (reasoning_content, content)`` for
      finished text (each None when blank);
    - ``extract_reasoning_content_streaming(previous_text, current_text, delta_text,
      previous_token_ids, current_token_ids, delta_token_ids, request, *,
      finished=False) -> DeltaMessage | None`` for streams (``reasoning_content`` and
      ``content`` deltas), called once more with ``finished=True`` at the end;
    - ``is_reasoning_end(output) -> bool`` on output token ids (or text): whether the
      reasoning is over. The engine asks it for guided requests, whose constraint
      applies only from then on.

    Example::

        @hookimpl
        def pagedllm_register_reasoning_parsers(register):
            register("deepseek_r1", "pagedllm.plugins.parsers.reasoning:DeepSeekR1ReasoningParser")
    """


#: Plugin kind -> the hook that registers it. The single source for kind names.
KIND_HOOKS: dict[str, str] = {
    "model": "pagedllm_register_models",
    "quantization": "pagedllm_register_quantization_methods",
    "attention_backend": "pagedllm_register_attention_backends",
    "logits_processor": "pagedllm_register_logits_processors",
    "guided_decoding": "pagedllm_register_guided_decoding_backends",
    "tool_parser": "pagedllm_register_tool_parsers",
    "reasoning_parser": "pagedllm_register_reasoning_parsers",
}
