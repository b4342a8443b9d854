"""ModelRunner: turns a ScheduledBatch into flat tensors and attention metadata, runs the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagedllm.core.attention import AttentionMetadata
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
    def __init__(self, model: nn.Module, kv_cache: KVCacheManager, spec: KVCacheSpec, dtype: torch.dtype, device: torch.device) -> None:
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
        self.kv_caches = torch.zeros(spec.num_layers, *shape, dtype=dtype, device=device)
        for i, layer in enumerate(layers):
            layer.kv_cache = self.kv_caches[i]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> ModelOutput:
        if batch.block_copies:
            src = torch.tensor([s for s, _ in batch.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in batch.block_copies], device=self.device)
            self.kv_caches[:, :, dst] = self.kv_caches[:, :, src]

        input_ids, positions, metadata, sample_rows, prompt_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, metadata)  # [num_tokens, hidden_size]

        sampling_requests = [batch.requests[i] for i in sample_rows]
        sample_index = [metadata.query_start_loc_list[i + 1] - 1 for i in sample_rows]
        logits = self.model.compute_logits(hidden[sample_index])
        prompt_logits = {}
        for req_id, (start, end, targets, first_pos) in prompt_rows.items():
            prompt_logits[req_id] = (self.model.compute_logits(hidden[start:end]), targets, first_pos)
        return ModelOutput(sampling_requests, logits, prompt_logits)

    def _prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        ids: list[list[int]] = []
        pos: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        seq_lens: list[int] = []
        starts = [0]
        tables = [self.kv_cache.block_table(r.req_id) for r in batch.requests]
        sample_rows: list[int] = []
        prompt_rows: dict[str, tuple[int, int, list[int], int]] = {}
        for i, (request, num) in enumerate(zip(batch.requests, batch.num_scheduled_tokens)):
            start = request.num_computed_tokens
            end = start + num
            tokens = request.all_token_ids
            ids.append(tokens[start:end])
            p = np.arange(start, end)
            table = np.asarray(tables[i])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            seq_lens.append(end)
            if end >= request.num_tokens:
                sample_rows.append(i)
            # Prompt logprobs: logits at prompt positions predict the next prompt token.
            num_wanted = request.sampling_params.prompt_logprobs
            if num_wanted is not None and request.num_output_tokens == 0:
                last = min(end, request.num_prompt_tokens - 1)
                if last > start:
                    prompt_rows[request.req_id] = (starts[-1], starts[-1] + last - start, tokens[start + 1 : last + 1], start + 1)
            starts.append(starts[-1] + num)

        max_blocks = max(len(t) for t in tables)
        block_tables = np.zeros((len(tables), max_blocks), dtype=np.int64)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        dev = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            seq_lens=torch.tensor(seq_lens, device=dev),
            query_start_loc=torch.tensor(starts, device=dev),
            num_decodes=batch.num_decodes,
            block_size=bs,
            seq_lens_list=seq_lens,
            query_start_loc_list=starts,
        )
        input_ids = torch.tensor([t for chunk in ids for t in chunk], dtype=torch.long, device=dev)
        positions = torch.from_numpy(np.concatenate(pos)).to(dev)
        return input_ids, positions, metadata, sample_rows, prompt_rows


def _kv_cache_shape(backend, num_blocks: int, block_size: int, spec: KVCacheSpec) -> tuple[int, ...]:
    """One layer's cache shape as the backend wants it: [2, num_blocks, ...], sized like the spec."""
    shape_fn = getattr(backend, "kv_cache_shape", None)
    shape = tuple(shape_fn(num_blocks, block_size)) if shape_fn else (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    per_block = block_size * spec.num_kv_heads * spec.head_dim
    if shape[:2] != (2, num_blocks) or math.prod(shape) != 2 * num_blocks * per_block:
        raise ValueError(f"attention backend {type(backend).__name__} asks for a KV cache of shape {shape}, "
                         f"expected [2, {num_blocks}, ...] holding {per_block} elements per block")
    return shape
