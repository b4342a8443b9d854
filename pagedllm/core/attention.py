"""AttentionMetadata: what an attention backend needs to know about one step's batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """The layout of one flattened step, shared by every attention layer.

    Requests are ordered decodes first, then prefill chunks. Request ``i`` owns the
    tokens ``query_start_loc[i]:query_start_loc[i + 1]`` of the flattened batch.
    """

    #: [num_tokens] cache slot (block_id * block_size + offset) each new token's K/V goes to.
    slot_mapping: torch.Tensor
    #: [num_reqs, max_num_blocks] block ids of each request (padded with 0).
    block_tables: torch.Tensor
    #: [num_reqs] total tokens in the cache for each request after this step.
    seq_lens: torch.Tensor
    #: [num_reqs + 1] offsets of each request's tokens in the flattened batch.
    query_start_loc: torch.Tensor
    #: Number of leading requests that are decodes (exactly one query token).
    num_decodes: int
    block_size: int
    #: Python copies of ``seq_lens`` and ``query_start_loc``, so backends avoid syncs.
    seq_lens_list: list[int]
    query_start_loc_list: list[int]

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_list[-1]
