"""pagedllm's test kit, shipped in the wheel for built-in and third-party plugin tests.

- ``pagedllm.testing.plugin``: the pytest plugin (fixture ``plugin_manager_factory``) and
  ``make_plugin_manager``, the same thing as a plain function.
- ``pagedllm.testing.tiny``: tiny random Hugging Face checkpoints.
"""
