"""GGUF files: metadata -> transformers config, tensors -> dequantized Hugging Face weights."""

from __future__ import annotations

import logging
import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from pagedllm.core.loader.source import ModelSource, load_gguf_tokenizer

logger = logging.getLogger(__name__)

# GGUF metadata value types (gguf.GGUFValueType): fixed-size scalars as numpy dtypes; 8 = string, 9 = array
_SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                  10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_MAX_KEPT_ARRAY = 1024  # longer arrays (vocabulary, merges, token types) are skipped; only lengths are kept
_FLOAT_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
                GGMLQuantizationType.BF16: torch.bfloat16}  # fmt: skip

# architecture -> (transformers model_type, architectures entry, q/k rows permuted by llama.cpp)
SUPPORTED_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}
_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_IGNORED = {"rope_freqs.weight"}  # llama3 rope scaling factors: not a parameter (see build_hf_config)


class GGUFTensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order: GGUF's `ne` dims reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    num_bytes: int


class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed without reading tensor data.

    gguf.GGUFReader builds a numpy view per vocabulary entry (~4 s on the embedded model); this
    parser walks string arrays without keeping them (~0.05 s). Tensors are memory-mapped and
    dequantized one at a time with gguf.quants.dequantize.
    """

    def __init__(self, path: Path):
        self.path = path
        self._blob = np.memmap(path, mode="r", dtype=np.uint8)
        if bytes(self._blob[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes).")
        version, num_tensors, num_fields = struct.unpack_from("<IQQ", self._blob, 4)
        if version not in (2, 3):
            raise ValueError(f"{path} is GGUF version {version}; only little-endian versions 2 and 3 are supported.")
        self.metadata: dict[str, Any] = {}  # long arrays (vocabulary, merges) are left out ...
        self.array_lengths: dict[str, int] = {}  # ... but every array's length is kept here
        try:
            self.tensors = self._parse(num_tensors, num_fields)
        except (struct.error, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{path} is a truncated or corrupt GGUF file: {error}") from error
        if self.tensors and max(t.offset + t.num_bytes for t in self.tensors) > len(self._blob):
            raise ValueError(f"{path} is a truncated GGUF file: its tensor data runs past the end of the file.")

    def _parse(self, num_tensors: int, num_fields: int) -> list[GGUFTensorInfo]:
        self._pos = 24
        for _ in range(num_fields):
            key = self._read_string()
            (value_type,) = self._unpack("<I")
            value = self._read_value(key, value_type)
            if value is not None:
                self.metadata[key] = value
        if self.metadata.get("split.count", 1) > 1:
            raise ValueError("it is one part of a split GGUF; merge the parts with llama-gguf-split --merge first")
        entries = []
        for _ in range(num_tensors):
            name = self._read_string()
            (num_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{num_dims}Q")
            ggml_type, offset = self._unpack("<IQ")
            entries.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = self.metadata.get("general.alignment", 32)
        data_start = (self._pos + alignment - 1) // alignment * alignment
        return [self._tensor_info(*entry, data_start) for entry in entries]

    def __getstate__(self) -> dict:  # pickled for a worker process: send the path, not the mapped bytes
        return {**self.__dict__, "_blob": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._blob = np.memmap(self.path, mode="r", dtype=np.uint8)

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._blob, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _read_string(self) -> str:
        (length,) = self._unpack("<Q")
        self._pos += length
        return bytes(self._blob[self._pos - length : self._pos]).decode("utf-8")

    def _read_value(self, key: str, value_type: int) -> Any:
        if value_type in _SCALAR_DTYPES:
            value = np.frombuffer(self._blob, _SCALAR_DTYPES[value_type], 1, self._pos)[0].item()
            self._pos += np.dtype(_SCALAR_DTYPES[value_type]).itemsize
            return value
        if value_type == _STRING:
            return self._read_string()
        if value_type != _ARRAY:
            raise ValueError(f"metadata {key!r} has unknown value type {value_type}")
        element_type, count = self._unpack("<IQ")
        self.array_lengths[key] = count
        keep = count <= _MAX_KEPT_ARRAY
        if element_type in _SCALAR_DTYPES:
            dtype = np.dtype(_SCALAR_DTYPES[element_type])
            values = np.frombuffer(self._blob, dtype, count, self._pos).tolist() if keep else None
            self._pos += count * dtype.itemsize
            return values
        if element_type != _STRING:
            raise ValueError(f"metadata {key!r} is an array of type {element_type}, which is not supported")
        if keep:
            return [self._read_string() for _ in range(count)]
        for _ in range(count):
            (length,) = self._unpack("<Q")
            self._pos += length
        return None

    def _tensor_info(self, name, shape, ggml_type, offset, data_start) -> GGUFTensorInfo:
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise ValueError(f"tensor {name} has unknown ggml type {ggml_type}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        num_bytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
        return GGUFTensorInfo(name, shape, qtype, data_start + offset, num_bytes)

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The stored bytes, shaped `[*shape[:-1], bytes_per_row]` as gguf.quants expects."""
        data = self._blob[info.offset : info.offset + info.num_bytes]
        return data.reshape(*info.shape[:-1], -1)

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory once weights are loaded (re-read on demand)."""
        self._blob._mmap.madvise(mmap.MADV_DONTNEED)

    def dequantize(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor as float32 (a fresh, writable array) in torch shape order."""
        values = dequantize(self.raw(info), info.ggml_type)
        if values.dtype != np.float32 or not values.flags.writeable:
            values = values.astype(np.float32)  # F32 comes back as a read-only view of the map
        return values.reshape(info.shape)

    def stored_dtype(self) -> torch.dtype:
        """float16/bfloat16 for an unquantized half-precision file, else float32 (dequantized)."""
        types = {t.ggml_type for t in self.tensors if len(t.shape) >= 2}
        if types and types <= _FLOAT_TYPES.keys() and len(types - {GGMLQuantizationType.F32}) == 1:
            return _FLOAT_TYPES[(types - {GGMLQuantizationType.F32}).pop()]
        return torch.float32


def build_hf_config(gguf: GGUFFile):
    """A transformers config from GGUF metadata, with the same values transformers derives."""
    from pagedllm.core.loader.gguf_config import make_config

    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}."
        )
    model_type, architecture, _ = SUPPORTED_ARCHITECTURES[arch]

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    required = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
                "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
                "max_position_embeddings": "context_length"}  # fmt: skip
    missing = [f"{arch}.{name}" for name in required.values() if key(name) is None]
    if missing:
        raise ValueError(f"{gguf.path}: GGUF metadata lacks {missing}, needed for the model config.")
    fields: dict[str, Any] = {field: key(name) for field, name in required.items()}
    num_heads = fields["num_attention_heads"]
    # transformers takes llama's head_dim from rope.dimension_count; key_length is the explicit form
    head_dim = key("attention.key_length") or (key("rope.dimension_count") if arch == "llama" else None)
    tensors = {t.name: t for t in gguf.tensors}
    embedding = tensors.get("token_embd.weight")
    fields |= {
        "architectures": [architecture],
        "num_key_value_heads": key("attention.head_count_kv", num_heads),
        "head_dim": head_dim or fields["hidden_size"] // num_heads,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": embedding.shape[0] if embedding is not None else key("vocab_size"),
        # llama.cpp writes `output.weight` only when it differs from the embedding
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama":
        fields["attention_bias"] = "blk.0.attn_q.bias" in tensors
    scaling = key("rope.scaling.type")
    rope = {"rope_type": "default"}
    if scaling in ("linear", "yarn"):
        rope = {"rope_type": scaling, "factor": key("rope.scaling.factor", 1.0)}
        if original := key("rope.scaling.original_context_length"):
            rope["original_max_position_embeddings"] = original
    elif scaling not in (None, "none") or "rope_freqs.weight" in tensors:
        logger.warning("%s: GGUF rope scaling (%s) is not carried over; long contexts may differ.", gguf.path,
                       scaling or "rope_freqs")  # fmt: skip
    fields["rope_parameters"] = rope | {"rope_theta": key("rope.freq_base", 10000.0)}
    config = make_config(model_type, fields)
    config.name_or_path = str(gguf.path)
    return config


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor, None if it is not a parameter."""
    if name in _IGNORED:
        return None
    if match := _LAYER_TENSOR.fullmatch(name):
        layer, part, suffix = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    else:
        stem, _, suffix = name.rpartition(".")
        if stem in _TOP_LEVEL_NAMES and suffix in ("weight", "bias"):
            return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face name; this architecture is not supported.")


def reverse_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs rows (i, i+d/2) as (2i, 2i+1)).

    llama.cpp: w.reshape(num_heads, 2, head_dim // 2, ...).swapaxes(1, 2); this is the inverse.
    """
    shape = weight.shape
    # [num_heads, head_dim // 2, 2, *rest] -> [num_heads, 2, head_dim // 2, *rest]
    return weight.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


class GGUFModelSource(ModelSource):
    """A single .gguf file: config and tokenizer from its metadata, weights raw or dequantized to float."""

    format = "gguf"
    can_dequantize = True

    def __init__(self, path: Path, tokenizer_path: Path | None = None, cache_dir: Path | None = None):
        super().__init__(path, tokenizer_path, cache_dir)
        self.gguf = GGUFFile(path)
        self.hf_config = build_hf_config(self.gguf)
        self.checkpoint_dtype = self.gguf.stored_dtype()
        self._hf_names = [gguf_to_hf_name(info.name) for info in self.gguf.tensors]  # fail early on unknowns
        if any(len(t.shape) >= 2 and t.ggml_type not in _FLOAT_TYPES for t in self.gguf.tensors):
            self.quantization_config = {"quant_method": "gguf"}  # the `gguf` quantization method runs it natively

    def _load_own_tokenizer(self):
        return load_gguf_tokenizer(self.path, self.cache_dir, self.gguf.metadata.get("tokenizer.chat_template"))

    def iter_weights(self, dtype: torch.dtype, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Weights by Hugging Face name; no `lm_head.*` when the embedding is tied.

        Dequantized (float32, then `dtype`) unless `quantized`: then every 2-D tensor comes as
        `<module>.qweight_type` (its ggml type, a 0-d integer tensor) followed by
        `<module>.qweight` (its raw blocks, `[rows, bytes_per_row]` uint8) for the `gguf`
        quantization method; 1-D tensors (norms, biases) stay float.
        """
        config = self.hf_config
        permuted = SUPPORTED_ARCHITECTURES[self.gguf.metadata["general.architecture"]][2]
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        for info, name in zip(self.gguf.tensors, self._hf_names):
            if name is None:
                continue
            module = name.rsplit(".", 2)[-2]
            if quantized and len(info.shape) == 2:
                raw = self.gguf.raw(info)
                if permuted and module in heads:  # rows hold whole blocks: undo the permutation on rows
                    rows, num_heads = raw.shape[0], heads[module]
                    raw = raw.reshape(num_heads, rows // num_heads // 2, 2, -1).swapaxes(1, 2)
                raw = torch.from_numpy(np.array(raw, order="C").reshape(info.shape[0], -1))  # copied: see release_pages
                stem = name.removesuffix("weight")
                yield stem + "qweight_type", torch.tensor(int(info.ggml_type))
                yield stem + "qweight", raw
                continue
            weight = torch.from_numpy(self.gguf.dequantize(info))
            if permuted and module in heads:
                weight = reverse_permute(weight, heads[module])
            yield name, weight.to(dtype)
        self.gguf.release_pages()
