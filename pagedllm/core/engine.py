"""LLMEngine: add_request / step / abort_request over the scheduler, runner, sampler and detokenizer."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagedllm.core.config import EngineConfig, parse_size
from pagedllm.core.cpu_allocator import keep_freed_memory
from pagedllm.core.detokenizer import IncrementalDetokenizer
from pagedllm.core.guided import GUIDED_KEY, GuidedMaskStage, StructuredOutputs
from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.core.loader import load_model_source
from pagedllm.core.model_runner import ModelRunner
from pagedllm.core.model_spec import KVCacheSpec, ModelContext
from pagedllm.core.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.core.plugins import PluginManager, build_plugin_manager
from pagedllm.core.quantization import process_weights_after_loading, resolve_quantization
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.sampler import Sampler, bad_words_to_token_ids, compute_logprobs
from pagedllm.core.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.core.scheduler import Scheduler

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Parent:
    """A user request: one prompt and its ``n`` samples (child requests)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    arrival_time: float


class LLMEngine:
    """The synchronous engine: callers add requests and call ``step()`` until done."""

    def __init__(self, config: EngineConfig, plugins: PluginManager | None = None) -> None:
        self.config = config
        self.plugins = plugins or build_plugin_manager(config.plugin_config)
        mc, cc = config.model_config, config.cache_config
        if config.device_config.num_threads:
            torch.set_num_threads(config.device_config.num_threads)

        self.source = load_model_source(mc.model, mc.tokenizer)
        self.tokenizer = self.source.load_tokenizer()
        if mc.chat_template:
            self.tokenizer.chat_template = _read_template(mc.chat_template)
        hf_config = self.source.hf_config
        self.hf_config = hf_config
        self.device = _resolve_device(config.device_config.device)
        self.dtype = _resolve_dtype(mc.dtype, self.device, self.source.checkpoint_dtype)
        model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
        self.max_model_len = mc.max_model_len or model_max
        self.vocab_size = hf_config.vocab_size

        architectures = getattr(hf_config, "architectures", None) or []
        if not architectures:
            raise ValueError(f"{self.source.path}: config has no 'architectures' entry to pick a model plugin")
        model_cls = self.plugins.load("model", architectures[0])
        backend_name = config.device_config.attention_backend
        if backend_name == "auto":
            backend_name = "cpu" if self.device.type == "cpu" else "torch"
        self.attention_backend = backend_name
        backend_cls = self.plugins.load("attention_backend", backend_name)
        self.kv_cache_dtype = _resolve_kv_cache_dtype(cc.kv_cache_dtype, self.dtype, backend_name, backend_cls)
        self.quant_method = resolve_quantization(self.source, mc.quantization, mc.quantization_kernel, self.plugins, self.device)
        ctx = ModelContext(self.dtype, self.device, backend_cls, self.max_model_len, self.quant_method)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_cls(hf_config, ctx)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.load_weights(self.source.iter_weights(self.dtype, quantized=self.quant_method is not None))
        process_weights_after_loading(self.model)
        self.model.eval()
        self.model.requires_grad_(False)  # inference only; a traced decode step takes the weights as constants

        spec: KVCacheSpec = self.model.kv_cache_spec()
        num_blocks = self._num_kv_blocks(spec)
        self.kv_cache = KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config, self.kv_cache)
        graph_batch = 0 if mc.enforce_eager else mc.max_graph_batch_size
        self.runner = ModelRunner(self.model, self.kv_cache, spec, self.kv_cache_dtype, self.device, graph_batch)
        self.sampler = Sampler(self._logits_processors() + [GuidedMaskStage()], self.vocab_size)
        self.eos_token_ids = _eos_token_ids(hf_config, self.tokenizer, self.source.path)
        self.structured_outputs = StructuredOutputs(
            self.plugins, config.structured_output_config, self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._parents: dict[str, _Parent] = {}
        torch.manual_seed(mc.seed)  # requests without a seed draw from the global generator
        if self.device.type == "cpu" and config.device_config.keep_freed_memory:
            keep_freed_memory()  # for the steps' activations; after loading, whose buffers are used once
        logger.info(
            "pagedllm engine: model=%s arch=%s dtype=%s device=%s kv_blocks=%d x %d tokens (%s) backend=%s",
            self.source.path, architectures[0], self.dtype, self.device, num_blocks, cc.block_size,
            self.kv_cache_dtype, backend_name,
        )

    # -- set-up helpers -----------------------------------------------------------

    def _num_kv_blocks(self, spec: KVCacheSpec) -> int:
        cc = self.config.cache_config
        need = -(-self.max_model_len // cc.block_size)
        if cc.num_kv_blocks is not None:
            num_blocks = cc.num_kv_blocks
        else:
            budget = parse_size(cc.kv_cache_memory) if cc.kv_cache_memory else int(_available_memory(self.device) * cc.kv_cache_memory_fraction)
            num_blocks = budget // spec.bytes_per_block(cc.block_size, self.kv_cache_dtype)
        if num_blocks < need:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {cc.block_size} tokens, fewer than one request of "
                f"max_model_len={self.max_model_len} needs ({need}); raise kv_cache_memory / num_kv_blocks or lower max_model_len"
            )
        return num_blocks

    def _logits_processors(self) -> list:
        names = list(self.plugins.builtin_names("logits_processor"))
        names += [n for n in self.config.plugin_config.logits_processors if n not in names]
        return [self.plugins.load("logits_processor", n)() for n in names]

    # -- requests -----------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
    ) -> None:
        """Queue a prompt (text or token ids); its ``n`` samples run as separate requests."""
        params = params or SamplingParams()
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer(prompt).input_ids
        else:
            text, token_ids = None, [int(t) for t in prompt]
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids outside the vocabulary (size {self.vocab_size}): {bad[:10]}")
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, which leaves no room to generate")
        params.validate_for_vocab(self.vocab_size)
        params._eos_token_ids = set(self.eos_token_ids)
        params._stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_token_ids))
        params._plain_greedy = params.is_greedy and (params.repetition_penalty, params.frequency_penalty, params.presence_penalty) == (1.0, 0.0, 0.0)
        params._unconstrained = not (params.allowed_token_ids or params.logit_bias or params.bad_words or params.min_tokens
                                     or params.structured_outputs is not None)
        if params.bad_words:
            params._bad_words_token_ids = bad_words_to_token_ids(params.bad_words, self.tokenizer)
        if params.structured_outputs is not None:
            self.structured_outputs.validate(params.structured_outputs)
        max_total = self.max_model_len if params.max_tokens is None else min(self.max_model_len, len(token_ids) + params.max_tokens)

        children = []
        for i in range(params.n):
            child_params = params if params.n == 1 else params.clone()
            if params.n > 1 and params.seed is not None:
                child_params.seed = params.seed + i
            req_id = request_id if params.n == 1 else f"{i}_{request_id}"
            request = Request(
                req_id, list(token_ids), child_params, prompt=text,
                parent_id=request_id if params.n > 1 else None, index=i, max_total_tokens=max_total,
            )
            if child_params.seed is not None:
                request.generator = torch.Generator(device=self.device).manual_seed(child_params.seed)
            if child_params.prompt_logprobs is not None:
                request.prompt_logprobs = [None] * len(token_ids)
            if child_params.detokenize:
                request.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, request.prompt_token_ids,
                    skip_special_tokens=child_params.skip_special_tokens,
                    spaces_between_special_tokens=child_params.spaces_between_special_tokens,
                    stop=child_params.stop, include_stop_str_in_output=child_params.include_stop_str_in_output,
                )
            children.append(request)
        self._parents[request_id] = _Parent(request_id, text, list(token_ids), children, time.monotonic())
        if params.structured_outputs is not None:
            self.structured_outputs.submit(params.structured_outputs, children)  # queued by step() once compiled
            return
        for request in children:
            self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for request in parent.children:
            if not request.is_finished:
                self.scheduler.finish_request(request.req_id, RequestStatus.FINISHED_ABORTED)
                request.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (as vLLM's ``reset_prefix_cache``); False while requests still hold blocks."""
        return self.kv_cache.reset_prefix_cache()

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -- the step -----------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that made progress."""
        failed = self._admit_guided()
        batch = self.scheduler.schedule()
        if batch.is_empty():
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: no request fits the KV cache")
            return failed
        model_output = self.runner.execute(batch)
        self.scheduler.update_after_step(batch)

        for req_id, (logits, targets, first_pos) in model_output.prompt_logits.items():
            request = self.scheduler.requests[req_id]
            num_top = request.sampling_params.prompt_logprobs
            lps = compute_logprobs(logits, targets, num_top)
            request.prompt_logprobs[first_pos : first_pos + len(lps)] = self._decode_logprobs(lps)

        # Parents to report: all that made progress, but FINAL_ONLY ones only once finished.
        final_only = RequestOutputKind.FINAL_ONLY
        touched = {r.parent_id or r.req_id for r in batch.requests if r.sampling_params.output_kind != final_only}
        if model_output.sampling_requests:
            sampled = self.sampler.sample(model_output.logits, model_output.sampling_requests)
            now = time.monotonic()
            check_stop = self._check_stop
            for request, token_id, lp in zip(model_output.sampling_requests, sampled.token_ids, sampled.logprobs):
                request.output_token_ids.append(token_id)
                if request.first_token_time is None:
                    request.first_token_time = now
                if lp is not None:
                    request.output_logprobs.append(self._decode_logprobs([lp])[0])
                if check_stop(request, token_id):
                    touched.add(request.parent_id or request.req_id)
        outputs = failed
        for parent_id in touched:
            parent = self._parents.get(parent_id)
            if parent is not None and (parent.children[0].sampling_params.output_kind != final_only
                                       or all(r.is_finished for r in parent.children)):
                outputs.append(self._make_output(parent))
        return outputs

    def _admit_guided(self) -> list[RequestOutput]:
        """Queue the guided requests whose constraint is compiled; end those whose compile failed."""
        outputs = []
        # With nothing else to run, wait a little for a compile rather than spin.
        for children, error in self.structured_outputs.ready(timeout=0.0 if self.scheduler.has_unfinished() else 0.05):
            parent = self._parents.get(children[0].parent_id or children[0].req_id)
            if parent is None:
                continue  # aborted while compiling
            if error is None:
                for request in children:
                    self.scheduler.add_request(request)
                continue
            logger.error("request %s: structured output failed to compile: %s", parent.request_id, error)
            for request in children:
                request.status, request.finish_reason = RequestStatus.FINISHED_ABORTED, "abort"
            output = self._make_output(parent)
            output.extra["error"] = f"structured output failed to compile: {error}"
            outputs.append(output)
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """Feed the new token to the detokenizer; finish the request if it stops here (return True)."""
        params = request.sampling_params
        detokenizer = request.detokenizer
        may_stop = request.num_output_tokens >= params.min_tokens
        stop_token = may_stop and token_id in params._stop_ids
        # A stop token (EOS or stop_token_ids) ends the text without joining it, as in vLLM, even
        # with skip_special_tokens=False (which tool parsing uses to see call markers).
        stop_str = None
        if detokenizer is not None and (not stop_token or params.include_stop_str_in_output):
            stop_str = detokenizer.append_token(token_id, may_stop)
        reason: str | None = None
        if stop_token:
            reason = "stop"
            if params.ignore_eos or token_id not in params._eos_token_ids:
                request.stop_reason = token_id
        elif stop_str is not None:
            reason, request.stop_reason = "stop", stop_str
        if reason is None and GUIDED_KEY in request.extra and request.extra[GUIDED_KEY].accept(request):
            reason = "stop"  # the constraint is complete (or broken)
        if reason is None and request.num_tokens >= request.max_total_tokens:
            reason = "length"
        if reason is None:
            return False
        request.finish_reason = reason
        if detokenizer is not None:
            detokenizer.finish()
        status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
        self.scheduler.finish_request(request.req_id, status)
        return True

    def _decode_logprobs(self, positions: list) -> list:
        for position in positions:
            for token_id, lp in position.items():
                lp.decoded_token = self.tokenizer.decode([token_id])
        return positions

    def _make_output(self, parent: _Parent) -> RequestOutput:
        completions = []
        for request in parent.children:
            params = request.sampling_params
            delta = params.output_kind == RequestOutputKind.DELTA
            new_text = request.detokenizer.get_delta() if request.detokenizer is not None else ""
            request.text += new_text
            first = request.num_sent_tokens if delta else 0
            lps = request.output_logprobs[first:] if params.logprobs is not None else None
            cumulative = None
            if lps is not None:
                cumulative = sum(pos[t].logprob for pos, t in zip(request.output_logprobs, request.output_token_ids))
            completions.append(CompletionOutput(
                index=request.index, text=new_text if delta else request.text,
                token_ids=request.output_token_ids[first:], cumulative_logprob=cumulative, logprobs=lps,
                finish_reason=request.finish_reason, stop_reason=request.stop_reason,
            ))
            request.num_sent_tokens = len(request.output_token_ids)
        finished = all(c.finished for c in completions)
        first = parent.children[0]
        metrics = RequestMetrics(
            parent.arrival_time, min((r.first_token_time for r in parent.children if r.first_token_time), default=None),
            time.monotonic() if finished else None, first.num_cached_tokens,
        )
        if finished:
            del self._parents[parent.request_id]
        return RequestOutput(
            parent.request_id, parent.prompt, parent.prompt_token_ids, completions, finished,
            prompt_logprobs=list(first.prompt_logprobs) if first.sampling_params.prompt_logprobs is not None else None,
            metrics=metrics, num_cached_tokens=first.num_cached_tokens,
        )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        # CPUs without bf16/fp16 matmul units (AVX2 only) run 16-bit far slower than fp32.
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


_KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _resolve_kv_cache_dtype(name: str, dtype: torch.dtype, backend_name: str, backend_cls: type) -> torch.dtype:
    """The cache's element type; an fp8 cache needs a backend that declares it (``kv_cache_dtypes``)."""
    if name == "auto":
        return dtype
    supported = getattr(backend_cls, "kv_cache_dtypes", ())
    if name not in supported:
        raise ValueError(
            f"kv_cache_dtype={name!r}: attention backend {backend_name!r} does not support it "
            f"(it supports: {', '.join(('auto',) + tuple(supported))}); the built-in 'cpu' and 'torch' backends support fp8"
        )
    return _KV_CACHE_DTYPES[name]


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _eos_token_ids(hf_config, tokenizer, path) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    gen_config = os.path.join(path, "generation_config.json") if os.path.isdir(path) else None
    if gen_config and os.path.exists(gen_config):
        import json

        with open(gen_config) as f:
            value = json.load(f).get("eos_token_id")
        ids.update([value] if isinstance(value, int) else value or [])
    return ids


def _read_template(value: str) -> str:
    return open(value).read() if os.path.isfile(value) else value
