"""`pagedllm bench`: fixed, seeded workloads measured on pagedllm and, in the same run, its references.

Modules: ``workloads`` (W1-W4 as token ids), ``machine`` (this machine's matmul and
memory-bandwidth ceilings), ``offline`` (pagedllm's engine and transformers' static
batching), ``llamacpp`` (llama.cpp through llama-cpp-python's C API, continuous
batching over parallel sequences), ``serve`` (an OpenAI-API streaming client), ``report``
(tables and JSON) and ``cli`` (the subcommands).
"""
