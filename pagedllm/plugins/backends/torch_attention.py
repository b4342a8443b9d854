"""The reference attention backend: paged KV cache read and written with plain torch ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.core.attention import AttentionMetadata


class TorchAttentionBackend:
    """Decodes run as one padded batch; each prefill chunk runs on its own.

    The padded decode batch reads every decode request's blocks with one gather, so the
    hot path has no per-request Python loop; prefill chunks are few per step and large,
    so a loop over them costs little.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionMetadata
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        # kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        flat_keys = key_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_values = value_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_keys.index_copy_(0, batch.slot_mapping, k.to(flat_keys.dtype))
        flat_values.index_copy_(0, batch.slot_mapping, v.to(flat_values.dtype))

        out = torch.empty_like(q)
        num_decodes = batch.num_decodes
        if num_decodes:
            out[:num_decodes] = self._decode(q[:num_decodes], key_cache, value_cache, batch)
        starts, seq_lens = batch.query_start_loc_list, batch.seq_lens_list
        for i in range(num_decodes, batch.num_reqs):
            start, end = starts[i], starts[i + 1]
            out[start:end] = self._prefill(q[start:end], key_cache, value_cache, batch.block_tables[i], seq_lens[i], batch.block_size)
        return out

    def _decode(self, q, key_cache, value_cache, batch: AttentionMetadata) -> torch.Tensor:
        num_decodes = q.shape[0]
        max_len = max(batch.seq_lens_list[:num_decodes])
        num_blocks = -(-max_len // batch.block_size)
        block_tables = batch.block_tables[:num_decodes, :num_blocks]
        # [num_decodes, num_blocks * block_size, num_kv_heads, head_dim]
        keys = key_cache[block_tables].flatten(1, 2)
        values = value_cache[block_tables].flatten(1, 2)
        positions = torch.arange(keys.shape[1], device=q.device)
        # [num_decodes, 1, 1, kv_len]
        mask = (positions[None, :] < batch.seq_lens[:num_decodes, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [num_decodes, num_heads, 1, head_dim]
            keys.transpose(1, 2).to(q.dtype),
            values.transpose(1, 2).to(q.dtype),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.squeeze(2)

    def _prefill(self, q, key_cache, value_cache, block_table, seq_len: int, block_size: int) -> torch.Tensor:
        query_len = q.shape[0]
        num_blocks = -(-seq_len // block_size)
        blocks = block_table[:num_blocks]
        # [num_kv_heads, seq_len, head_dim]
        keys = key_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1).to(q.dtype)
        values = value_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1).to(q.dtype)
        queries = q.transpose(0, 1)  # [num_heads, query_len, head_dim]
        gqa = self.num_heads != self.num_kv_heads
        if query_len == seq_len:
            out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            # Query j sits at position seq_len - query_len + j and sees keys up to it.
            query_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return out.transpose(0, 1)
