"""The paged KV-cache block manager: block tables, reference counts, prefix caching, copy-on-write."""

from pagedllm.core.kv_cache.block_pool import ROOT_HASH, Block, BlockHash, BlockPool, hash_block
from pagedllm.core.kv_cache.manager import KVCacheManager

__all__ = ["ROOT_HASH", "Block", "BlockHash", "BlockPool", "KVCacheManager", "hash_block"]
