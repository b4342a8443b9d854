"""Model sources: resolve a model argument and read its config, tokenizer and weights."""

from pagedllm.core.loader.source import ModelSource, default_cache_dir, embedded_model_path, load_model_source

__all__ = ["ModelSource", "default_cache_dir", "embedded_model_path", "load_model_source"]
