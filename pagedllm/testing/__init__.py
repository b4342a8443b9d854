"""pagedllm's test kit for plugin authors: a pytest plugin (``pagedllm.testing.plugin``) and helpers."""

from pagedllm.testing.plugin import make_plugin_manager

__all__ = ["make_plugin_manager"]
