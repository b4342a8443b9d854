"""ModelRunner: turns a ScheduledBatch into flat tensors and attention metadata, runs the model."""

from __future__ import annotations

import ctypes
import itertools
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagedllm.core.attention import AttentionMetadata
from pagedllm.core.graphs import DecodeGraphs
from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.core.layers import Attention
from pagedllm.core.model_spec import KVCacheSpec
from pagedllm.core.request import Request
from pagedllm.core.scheduler import ScheduledBatch


@dataclass
class ModelOutput:
    """The runner's message to the sampler: logits where tokens are to be chosen."""

    #: Requests that sample a token this step (their step reached the end of known tokens).
    sampling_requests: list[Request]
    #: [len(sampling_requests), vocab_size] float32
    logits: torch.Tensor
    #: req_id -> ([n, vocab_size] logits, the n prompt tokens they predict, the position of
    #: the first of them) for prompt logprobs.
    prompt_logits: dict[str, tuple[torch.Tensor, list[int], int]]


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: KVCacheManager, spec: KVCacheSpec, kv_cache_dtype: torch.dtype,
                 device: torch.device, max_graph_batch_size: int = 0) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        if len(layers) != spec.num_layers:
            raise ValueError(f"model declares {spec.num_layers} KV-cache layers but has {len(layers)} attention layers")
        # One tensor for the whole cache: [num_layers, 2, num_blocks, ...]; the attention
        # backend lays out each block (default [block_size, num_kv_heads, head_dim]).
        shape = _kv_cache_shape(layers[0].backend, kv_cache.num_blocks, self.block_size, spec)
        self.kv_caches = _zeros_on_huge_pages((spec.num_layers, *shape), kv_cache_dtype, device)
        for i, layer in enumerate(layers):
            layer.kv_cache = self.kv_caches[i]
        self._buffers: dict[str, torch.Tensor] = {}
        # (request ids, their table versions, block-table rows) of the last step
        self._tables_cache: tuple[list[str], list[int], np.ndarray] | None = None
        # Decode steps of up to this many requests replay a traced graph (0: always eager).
        self.graphs = DecodeGraphs(model, max_graph_batch_size) if max_graph_batch_size > 0 else None

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> ModelOutput:
        if batch.block_copies:
            src = torch.tensor([s for s, _ in batch.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in batch.block_copies], device=self.device)
            caches = self.kv_caches.view(torch.uint8) if self.kv_caches.element_size() == 1 else self.kv_caches  # fp8: copy bytes
            caches[:, :, dst] = caches[:, :, src]

        input_ids, positions, metadata, sample_rows, prompt_rows = self._prepare(batch)
        hidden = None if self.graphs is None else self.graphs.forward(input_ids, positions, metadata)
        if hidden is None:
            hidden = self.model(input_ids, positions, metadata)  # [num_tokens, hidden_size]

        starts = metadata.query_start_loc_list
        if len(sample_rows) == len(starts) - 1 == starts[-1]:
            sampling_requests, sample_hidden = batch.requests, hidden  # all decodes: every row samples
        else:
            sampling_requests = [batch.requests[i] for i in sample_rows]
            sample_hidden = hidden[[starts[i + 1] - 1 for i in sample_rows]]
        logits = self.model.compute_logits(sample_hidden)
        prompt_logits = {}
        for req_id, (start, end, targets, first_pos) in prompt_rows.items():
            prompt_logits[req_id] = (self.model.compute_logits(hidden[start:end]), targets, first_pos)
        return ModelOutput(sampling_requests, logits, prompt_logits)

    def _prepare(self, batch: ScheduledBatch):
        """The step's flat tensors: token ids, positions and the attention metadata.

        One Python pass reads each request's position and next token; positions, slots and
        block tables are then computed by numpy for the whole batch, into persistent buffers
        rather than new tensors. Prefill chunks (after the single-token steps) add ranges.
        """
        bs = self.block_size
        requests, nums = batch.requests, batch.num_scheduled_tokens
        num_reqs = len(requests)
        req_ids = [r.req_id for r in requests]
        tables = self.kv_cache.block_tables(req_ids)
        computed = [r.num_computed_tokens for r in requests]
        num_single = 0  # single-token steps come first (the scheduler orders them so)
        while num_single < num_reqs and nums[num_single] == 1:
            num_single += 1
        if any(n == 1 for n in nums[num_single:]):
            raise ValueError("the batch must list single-token steps before prefill chunks")

        ids = [_token_at(r, start) for r, start in zip(requests[:num_single], computed)]
        starts = [0, *itertools.accumulate(nums)]
        seq_lens = [start + num for start, num in zip(computed, nums)]
        sample_rows: list[int] = []
        prompt_rows: dict[str, tuple[int, int, list[int], int]] = {}
        for i in range(num_single, num_reqs):
            request, start, end = requests[i], computed[i], seq_lens[i]
            ids.extend(request.prompt_token_ids[start:end] if end <= request.num_prompt_tokens else request.all_token_ids[start:end])
        for i, (request, end) in enumerate(zip(requests, seq_lens)):
            if end >= request.num_tokens:
                sample_rows.append(i)
            # Prompt logprobs: logits at prompt positions predict the next prompt token.
            if request.sampling_params.prompt_logprobs is not None and request.num_output_tokens == 0:
                start, num_prompt = computed[i], request.num_prompt_tokens
                last = min(end, num_prompt - 1)
                if last > start:
                    prompt_rows[request.req_id] = (starts[i], starts[i] + last - start,
                                                   request.prompt_token_ids[start + 1 : last + 1], start + 1)

        num_tokens = starts[-1]
        rows = self._block_table_rows(req_ids, tables)
        block_tables = torch.from_numpy(rows)
        position_buf, slot_buf = self._buffer("positions", num_tokens), self._buffer("slots", num_tokens)
        position_np, slot_np = position_buf.numpy(), slot_buf.numpy()
        p = position_np[:num_single]
        p[:] = computed[:num_single]
        slot_np[:num_single] = rows[np.arange(num_single), p // bs] * bs + p % bs
        for i in range(num_single, num_reqs):
            offset, p = starts[i], np.arange(computed[i], seq_lens[i])
            position_np[offset : offset + len(p)] = p
            slot_np[offset : offset + len(p)] = rows[i, p // bs] * bs + p % bs
        input_ids = self._buffer("input_ids", num_tokens)
        input_ids.numpy()[:] = ids
        seq_len_buf, start_buf = self._buffer("seq_lens", num_reqs), self._buffer("starts", num_reqs + 1)
        seq_len_buf.numpy()[:] = seq_lens
        start_buf.numpy()[:] = starts
        metadata = AttentionMetadata(
            slot_mapping=self._to_device(slot_buf),
            block_tables=self._to_device(block_tables),
            seq_lens=self._to_device(seq_len_buf),
            query_start_loc=self._to_device(start_buf),
            num_decodes=num_single,
            block_size=bs,
            seq_lens_list=seq_lens,
            query_start_loc_list=starts,
        )
        return self._to_device(input_ids), self._to_device(position_buf), metadata, sample_rows, prompt_rows

    def _block_table_rows(self, req_ids: list[str], tables: list) -> np.ndarray:
        """[num_reqs, max_blocks] int64 block ids, padded with 0, in a buffer kept across steps.

        In steady decoding the batch is the same requests in the same order and only a few of
        their tables changed (one gains a block every ``block_size`` steps): just those rows are
        rewritten, instead of converting every id from Python again (~40 us at 64 requests).
        """
        versions = self.kv_cache.table_versions(req_ids)
        max_blocks = max(map(len, tables))
        cached = self._tables_cache
        if cached is not None and cached[0] == req_ids and cached[2].shape[1] == max_blocks:
            rows = cached[2]
            for i, (version, old) in enumerate(zip(versions, cached[1])):
                if version != old:
                    rows[i].fill(0)
                    rows[i, : len(tables[i])] = tables[i]
        else:
            num_reqs = len(req_ids)
            table_lens = np.fromiter(map(len, tables), np.int64, num_reqs)
            rows = np.zeros((num_reqs, max_blocks), np.int64)
            # All rows at once: the tables' ids, flattened, land where a row's column < its length.
            rows[np.arange(max_blocks) < table_lens[:, None]] = np.fromiter(
                itertools.chain.from_iterable(tables), np.int64, int(table_lens.sum()))
        self._tables_cache = (req_ids, versions, rows)
        return rows

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def _buffer(self, name: str, size: int) -> torch.Tensor:
        """The first ``size`` elements of a persistent int64 CPU buffer (grown as needed).

        Safe to reuse every step: a step's tensors are dead once ``execute`` returns.
        """
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size:
            buf = self._buffers[name] = torch.empty(max(size, 2 * (0 if buf is None else buf.numel())), dtype=torch.int64)
        return buf[:size]


def _token_at(request: Request, position: int) -> int:
    """The request's token at ``position`` (prompt, then output)."""
    num_prompt = len(request.prompt_token_ids)
    return request.prompt_token_ids[position] if position < num_prompt else request.output_token_ids[position - num_prompt]


def _zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on Linux CPUs on transparent huge pages where the kernel allows them (``madvise`` mode).

    Decode attention reads scattered 4 KiB tiles of the cache, each of them a TLB miss on 4 KiB
    pages; a 2 MiB page covers 512 of them (cold decode attention: 64 -> 49 us a layer here).
    """
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.device.type == "cpu" and sys.platform == "linux" and tensor.nbytes >= 2 * _HUGE_PAGE:
        start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the whole huge pages inside the buffer
        length = (tensor.data_ptr() + tensor.nbytes - start) // _HUGE_PAGE * _HUGE_PAGE
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)  # a hint: failure is harmless
    return tensor.zero_()


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _kv_cache_shape(backend, num_blocks: int, block_size: int, spec: KVCacheSpec) -> tuple[int, ...]:
    """One layer's cache shape as the backend wants it: [2, num_blocks, ...], sized like the spec."""
    shape_fn = getattr(backend, "kv_cache_shape", None)
    shape = tuple(shape_fn(num_blocks, block_size)) if shape_fn else (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    per_block = block_size * spec.num_kv_heads * spec.head_dim
    if shape[:2] != (2, num_blocks) or math.prod(shape) != 2 * num_blocks * per_block:
        raise ValueError(f"attention backend {type(backend).__name__} asks for a KV cache of shape {shape}, "
                         f"expected [2, {num_blocks}, ...] holding {per_block} elements per block")
    return shape
