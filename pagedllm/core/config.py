"""EngineConfig: the one tree of engine options behind the API, CLI flags and config files.

Every option is a dataclass field documented where it is declared (``metadata["help"]``).
Field names are unique across sections, so ``LLM(max_num_seqs=8)``, ``--max-num-seqs 8``
and ``max_num_seqs: 8`` in a YAML file all name the same thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model: str | None = _opt(None, "Hugging Face model directory or .gguf file; default: the embedded SmolLM2-135M-Instruct GGUF.")
    tokenizer: str | None = _opt(None, "Tokenizer directory, if not the model's own.")
    dtype: str = _opt("auto", "Compute dtype: auto (float32 on CPU, the checkpoint's 16-bit type on CUDA), float32, bfloat16, float16.")
    max_model_len: int | None = _opt(None, "Maximum prompt + output length; default: the model's context length.")
    seed: int = _opt(0, "Seed of the engine's shared random generator (requests without their own seed).")
    chat_template: str | None = _opt(None, "Chat template (a Jinja string or a file path) replacing the model's.")
    quantization: str | None = _opt(None, "Quantization method plugin. Default: detected from config.json's quantization_config or the GGUF tensor types; a name (e.g. bitsandbytes) quantizes a float checkpoint on load; 'none' dequantizes a GGUF to float.")
    quantization_kernel: str = _opt("auto", "Kernel the quantization method uses (GGUF: blocks, int4pack, dequant); auto lets the method choose. For tests and benchmarks.")
    enforce_eager: bool = _opt(False, "Run every step's Python eagerly: no decode graphs (steps of only decodes, traced once per batch size and replayed in C++; models, attention backends and linear methods that declare support).")
    max_graph_batch_size: int = _opt(8, "Largest decode batch that runs as a traced graph (each batch size is traced once, on first use: ~0.1 s for a 30-layer model); larger batches run eagerly. 0: none.")
    served_model_name: list[str] | None = _opt(None, "Name(s) the server accepts for the model; the first is the one reported. Default: the model path.")


#: Values of the kv_cache_dtype option.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass
class CacheConfig:
    block_size: int = _opt(16, "Tokens per KV-cache block.")
    num_kv_blocks: int | None = _opt(None, "Number of KV-cache blocks; overrides the memory budget.")
    kv_cache_memory: str | None = _opt(None, "KV-cache memory budget, e.g. '2GiB' or '512MB'.")
    kv_cache_memory_fraction: float = _opt(0.1, "KV-cache budget as a fraction of available memory (after loading the model), when no size is given.")
    enable_prefix_caching: bool = _opt(True, "Reuse cached KV blocks of identical prompt prefixes.")
    kv_cache_dtype: str = _opt("auto", "KV-cache element type: auto (the compute dtype), fp8 (= fp8_e4m3), fp8_e4m3 or fp8_e5m2. fp8 stores keys and values with per-tensor scales (the checkpoint's k_scale / v_scale, else computed from the first batch): half the memory of a 16-bit cache, a quarter of float32.")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = _opt(256, "Maximum number of requests in one step.")
    max_num_batched_tokens: int = _opt(2048, "Maximum number of tokens (prefill + decode) in one step.")
    enable_chunked_prefill: bool = _opt(True, "Split long prompts across steps so decodes keep flowing.")
    max_waiting_requests: int | None = _opt(None, "Reject new requests past this queue length (None: unbounded).")


@dataclass
class DeviceConfig:
    device: str = _opt("auto", "cpu, cuda or auto.")
    attention_backend: str = _opt("auto", "Attention backend plugin name; auto: 'cpu' on CPU, 'torch' elsewhere.")
    num_threads: int | None = _opt(None, "Torch intra-op threads on CPU; default: the number of cores.")
    keep_freed_memory: bool = _opt(True, "On CPU (Linux, glibc): keep freed activation memory in the process for reuse instead of returning it to the OS after every step (fewer page faults; resident memory stays at the step's peak).")


@dataclass
class PluginConfig:
    plugins_allow: list[str] | None = _opt(None, "Load only these plugins (entry-point names); default: all.")
    plugins_deny: list[str] = _opt([], "Never load these plugins (entry-point names).")
    plugins_allow_override: list[str] = _opt([], "Registry names ('kind:name' or 'name') a later plugin may take over from an earlier one.")
    logits_processors: list[str] = _opt([], "Extra (non built-in) logits-processor plugins to enable.")


@dataclass
class StructuredOutputConfig:
    guided_decoding_backend: str = _opt("xgrammar", "Guided-decoding (structured output) backend plugin; a request may name another in structured_outputs.backend.")
    reasoning_parser: str | None = _opt(None, "Reasoning parser plugin (deepseek_r1, qwen3): guided decoding constrains only the answer after the reasoning, and the server splits reasoning_content from content.")


@dataclass
class ServerConfig:
    host: str = _opt("127.0.0.1", "Address the OpenAI-compatible server binds to.")
    port: int = _opt(8000, "Port the OpenAI-compatible server listens on.")
    api_key: str | None = _opt(None, "Require 'Authorization: Bearer <key>' on every /v1 route (also read from PAGEDLLM_API_KEY).")
    allowed_origins: list[str] = _opt([], "CORS origins allowed to call the server from a browser ('*' for any); default: none.")
    uvicorn_log_level: str = _opt("info", "Log level of uvicorn (the HTTP server): critical, error, warning, info, debug, trace.")
    max_log_len: int = _opt(0, "Characters of each prompt shown in its request log line (0: none).")
    shutdown_timeout: float = _opt(10.0, "Seconds in-flight requests may run on after SIGINT/SIGTERM before they are aborted.")
    enable_auto_tool_choice: bool = _opt(False, "Let chat requests with tools use tool_choice 'auto': the model decides, and --tool-call-parser reads its calls.")
    tool_call_parser: str | None = _opt(None, "Tool parser plugin reading tool calls from model output (hermes, llama3_json, mistral, pythonic); needed by --enable-auto-tool-choice.")


@dataclass
class EngineConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    plugin_config: PluginConfig = field(default_factory=PluginConfig)
    structured_output_config: StructuredOutputConfig = field(default_factory=StructuredOutputConfig)
    server_config: ServerConfig = field(default_factory=ServerConfig)

    @staticmethod
    def sections() -> dict[str, type]:
        return {f.name: f.default_factory for f in dataclasses.fields(EngineConfig)}  # type: ignore[misc]

    @staticmethod
    def option_fields() -> dict[str, tuple[str, dataclasses.Field]]:
        """Option name -> (section name, field), for every option in the tree."""
        out: dict[str, tuple[str, dataclasses.Field]] = {}
        for section, cls in EngineConfig.sections().items():
            for f in dataclasses.fields(cls):
                out[f.name] = (section, f)
        return out

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build a config from flat option names; unknown names are a ValueError."""
        known = cls.option_fields()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        per_section: dict[str, dict[str, Any]] = {s: {} for s in cls.sections()}
        for name, value in options.items():
            per_section[known[name][0]][name] = value
        config = cls(**{s: cls.sections()[s](**kw) for s, kw in per_section.items()})
        config.validate()
        return config

    def to_options(self) -> dict[str, Any]:
        return {name: getattr(getattr(self, s), name) for name, (s, _) in self.option_fields().items()}

    def validate(self) -> None:
        c, s = self.cache_config, self.scheduler_config

        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"engine option {name} {why}, got {self.to_options()[name]!r}")

        check(c.block_size >= 1, "block_size", "must be >= 1")
        check(c.num_kv_blocks is None or c.num_kv_blocks >= 1, "num_kv_blocks", "must be >= 1")
        check(0.0 < c.kv_cache_memory_fraction <= 1.0, "kv_cache_memory_fraction", "must be in (0, 1]")
        if c.kv_cache_memory is not None:
            parse_size(c.kv_cache_memory)
        check(c.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}")
        check(s.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(s.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        check(self.model_config.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "must be auto, float32, bfloat16 or float16")
        check(self.device_config.device in ("auto", "cpu", "cuda") or self.device_config.device.startswith("cuda:"), "device", "must be auto, cpu or cuda")
        mml = self.model_config.max_model_len
        check(mml is None or mml >= 1, "max_model_len", "must be >= 1")
        check(self.model_config.max_graph_batch_size >= 0, "max_graph_batch_size", "must be >= 0 (0: no decode graphs)")
        check(0 <= self.server_config.port <= 65535, "port", "must be in [0, 65535]")
        check(self.server_config.shutdown_timeout >= 0, "shutdown_timeout", "must be >= 0")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML launch file of flat option names; unknown keys are a ValueError naming them."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = EngineConfig.option_fields()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return data


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648; a plain integer is bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"engine option kv_cache_memory: cannot read size {text!r} (try '2GiB' or '512MB')")
    return int(float(num) * _UNITS[unit])
