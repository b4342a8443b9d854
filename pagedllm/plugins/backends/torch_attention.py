"""The reference attention backend: paged KV cache read and written with plain torch ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.core.attention import AttentionMetadata


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` saturated at the fp8 format's largest value, in that format."""
    fp8_max = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fp8_max, fp8_max).to(dtype)


class _CacheView:
    """One layer's keys or values as the backend reads them: gathered blocks in the compute
    dtype, fp8 blocks gathered as bytes (torch has no fp8 index ops on CPU) and rescaled."""

    def __init__(self, cache: torch.Tensor, scale: torch.Tensor | None) -> None:
        self.cache, self.scale = cache, scale
        self.raw = cache if scale is None else cache.view(torch.uint8)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        # x: [num_tokens, num_kv_heads, head_dim]
        x = x.to(self.cache.dtype) if self.scale is None else quantize_fp8(x, self.scale, self.cache.dtype).view(torch.uint8)
        self.raw.view(-1, *x.shape[1:]).index_copy_(0, slots, x)

    def gather(self, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # [len(block_ids), block_size, num_kv_heads, head_dim]
        blocks = self.raw.index_select(0, block_ids)  # index_select, not advanced indexing: several times faster on CPU
        if self.scale is None:
            return blocks.to(dtype)
        return (blocks.view(self.cache.dtype).float() * self.scale).to(dtype)


class TorchAttentionBackend:
    """Decodes run as one padded batch; each prefill chunk runs on its own.

    The padded decode batch reads every decode request's blocks with one gather, so the
    hot path has no per-request Python loop; prefill chunks are few per step and large,
    so a loop over them costs little. An fp8 cache holds ``k / k_scale`` and ``v / v_scale``
    (``kv_scales``), saturated, converted as torch converts.
    """

    #: Cache dtypes beyond the compute dtype that this backend can run (option ``kv_cache_dtype``).
    kv_cache_dtypes = ("fp8", "fp8_e4m3", "fp8_e5m2")

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache: keys then values, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionMetadata,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        # kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]; kv_scales: float32 [2] (fp8 only)
        key_cache = _CacheView(kv_cache[0], None if kv_scales is None else kv_scales[0])
        value_cache = _CacheView(kv_cache[1], None if kv_scales is None else kv_scales[1])
        key_cache.write(batch.slot_mapping, k)
        value_cache.write(batch.slot_mapping, v)

        out = torch.empty_like(q)
        num_decodes = batch.num_decodes
        if num_decodes:
            out[:num_decodes] = self._decode(q[:num_decodes], key_cache, value_cache, batch)
        starts, seq_lens = batch.query_start_loc_list, batch.seq_lens_list
        for i in range(num_decodes, batch.num_reqs):
            start, end = starts[i], starts[i + 1]
            out[start:end] = self._prefill(q[start:end], key_cache, value_cache, batch.block_tables[i], seq_lens[i], batch.block_size)
        return out

    #: Decodes are attended in groups of similar length, each padded only to its own maximum.
    decode_group_size = 16

    def _decode(self, q, key_cache, value_cache, batch: AttentionMetadata) -> torch.Tensor:
        num_decodes = q.shape[0]
        seq_lens = batch.seq_lens_list[:num_decodes]
        order = sorted(range(num_decodes), key=seq_lens.__getitem__)
        if order == list(range(num_decodes)) and num_decodes <= self.decode_group_size:
            return self._decode_group(q, key_cache, value_cache, batch, None, max(seq_lens))
        out = torch.empty_like(q)
        for start in range(0, num_decodes, self.decode_group_size):
            rows = order[start : start + self.decode_group_size]
            index = torch.tensor(rows, device=q.device)
            out[index] = self._decode_group(q[index], key_cache, value_cache, batch, index, seq_lens[rows[-1]])
        return out

    def _decode_group(self, q, key_cache, value_cache, batch: AttentionMetadata, rows, max_len: int) -> torch.Tensor:
        num_rows = q.shape[0]
        num_blocks = -(-max_len // batch.block_size)
        block_tables = batch.block_tables[: batch.num_decodes] if rows is None else batch.block_tables[rows]
        block_ids = block_tables[:, :num_blocks].reshape(-1)
        seq_lens = batch.seq_lens[: batch.num_decodes] if rows is None else batch.seq_lens[rows]
        # [num_rows, kv_len, num_kv_heads, head_dim] -> viewed as [num_rows, num_kv_heads, kv_len, head_dim]
        keys = key_cache.gather(block_ids, q.dtype).view(num_rows, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = value_cache.gather(block_ids, q.dtype).view(num_rows, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        kv_len = keys.shape[2]
        # [num_rows, 1, 1, kv_len]
        mask = (torch.arange(kv_len, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]
        # The query heads sharing a KV head form that head's "query length": no GQA expansion.
        group = self.num_heads // self.num_kv_heads
        queries = q.view(num_rows, self.num_kv_heads, group, self.head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scale)
        return out.reshape(num_rows, self.num_heads, self.head_dim)

    def _prefill(self, q, key_cache, value_cache, block_table, seq_len: int, block_size: int) -> torch.Tensor:
        query_len = q.shape[0]
        blocks = block_table[: -(-seq_len // block_size)]
        # [1, num_kv_heads, seq_len, head_dim]; 4-D inputs reach the fused CPU kernel.
        keys = key_cache.gather(blocks, q.dtype).flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        values = value_cache.gather(blocks, q.dtype).flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        queries = q.transpose(0, 1)[None]  # [1, num_heads, query_len, head_dim]
        gqa = self.num_heads != self.num_kv_heads
        if query_len == seq_len:
            out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            # Query j sits at position seq_len - query_len + j and sees keys up to it.
            query_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)
