"""Hugging Face model directories: config.json, tokenizer files, and safetensors (or .bin) weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from pagedllm.core.loader.source import ModelSource, load_tokenizer_from

# dtypes that iter_weights casts; integer tensors (GPTQ/AWQ packs, zero points) and float8
# scales are returned as stored, since casting them would destroy them.
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class HFModelSource(ModelSource):
    """A directory with config.json and `model*.safetensors` (sharded or not) or `pytorch_model*.bin`."""

    format = "hf"

    def __init__(self, path: Path, tokenizer_path: Path | None = None, cache_dir: Path | None = None):
        super().__init__(path, tokenizer_path, cache_dir)
        from transformers import AutoConfig

        try:
            self.hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"could not read {path / 'config.json'}: {error}") from error
        self.checkpoint_files = find_checkpoint_files(path)
        self.checkpoint_dtype = _config_dtype(self.hf_config) or _stored_dtype(self.checkpoint_files[0])
        quant_config = getattr(self.hf_config, "quantization_config", None)
        if quant_config is not None and not isinstance(quant_config, dict):
            quant_config = quant_config.to_dict()
        self.quantization_config = quant_config

    def _load_own_tokenizer(self):
        return load_tokenizer_from(self.path, self.cache_dir)

    def iter_weights(self, dtype: torch.dtype, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.checkpoint_files:
            for name, tensor in _iter_file(file):
                # A quantization method gets its scales / code books as stored (a bfloat16 cast
                # would round fp16 GPTQ scales and bnb's fp32 quant maps); parameters cast on copy.
                yield name, tensor if quantized else cast_weight(tensor, dtype)


def cast_weight(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype` if it holds ordinary floats, else unchanged."""
    if tensor.dtype in _CASTABLE and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def find_checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a model directory, in load order; ValueError if there are none."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{index} names shards that are missing: {', '.join(missing)}")
            return files
    for pattern in ("model.safetensors", "model*.safetensors", "*.safetensors", "pytorch_model.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise ValueError(
        f"model directory {path} has config.json but no weights: expected model.safetensors, "
        f"sharded model-*-of-*.safetensors with model.safetensors.index.json, or pytorch_model.bin."
    )


def _iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        # memory-mapped: one tensor is read at a time
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)
        return
    state_dict = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    for name in list(state_dict):
        yield name, state_dict.pop(name)


def _config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _stored_dtype(file: Path) -> torch.dtype:
    """The dtype of the first ordinary floating tensor in `file` (float32 if it has none)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                dtype = names.get(reader.get_slice(name).get_dtype())  # header only, no tensor data
                if dtype is not None:
                    return dtype
        return torch.float32
    for _, tensor in _iter_file(file):  # mmap-loaded: only the header is touched
        if tensor.dtype in _CASTABLE:
            return tensor.dtype
    return torch.float32
