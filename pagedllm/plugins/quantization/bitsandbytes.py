"""bitsandbytes: pre-quantized checkpoints (``quant_method: "bitsandbytes"``, as transformers'
``save_pretrained`` writes them) and on-the-fly quantization of a float model
(``quantization="bitsandbytes"``: NF4; ``bitsandbytes-fp4``, ``bitsandbytes-int8`` pick the others).

Checkpoint tensors per linear layer:

- 4-bit: ``weight`` uint8 ``[out * in / 2, 1]``: the row-major ``[out, in]`` codes, two per byte,
  the FIRST in the HIGH nibble; blocks of ``blocksize`` consecutive codes share ``absmax``:
  ``w = quant_map[code] * absmax[block]``. ``weight.quant_map`` float32 [16] (the NF4 or FP4 code
  book), ``weight.absmax`` (float32, or uint8 with double quantization: then
  ``absmax = nested_quant_map[absmax] * nested_absmax[block / nested_blocksize] + nested_offset``),
  ``weight.quant_state.bitsandbytes__<nf4|fp4>``: the JSON of blocksize, shape, dtype, nested_*.
- 8-bit (LLM.int8): ``weight`` int8 ``[out, in]``, ``SCB`` float32 ``[out]`` (row absmax):
  ``w = weight * SCB / 127``; ``weight_format`` (uint8, 0 = row-major).

Kernels: ``bnb`` (4-bit: the bitsandbytes package's own ``matmul_4bit``; the weight stays 4-bit
in memory), ``int8pack`` (8-bit: torch's ``_weight_int8pack_mm``, exact int8 weights with bf16
activations; LLM.int8's activation quantization and fp16 outlier columns are not emulated),
``dequant`` (the weight dequantized once at load by :func:`dequantize_4bit` / ``int8``; fastest on
CPU, float memory).
"""

from __future__ import annotations

import importlib.util
import json

import torch

from pagedllm.core.quantization import LinearMethod, QuantizationMethod, UnquantizedLinearMethod
from pagedllm.plugins.quantization.compressed_tensors import checkpoint_modules
from pagedllm.plugins.quantization.int_weights import Dense, Int8Pack, IntWeight

_STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape")


def dequantize_4bit(weight: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, blocksize: int,
                    shape: tuple[int, int], nested_absmax: torch.Tensor | None = None,
                    nested_quant_map: torch.Tensor | None = None, nested_offset: float = 0.0,
                    nested_blocksize: int = 256) -> torch.Tensor:  # fmt: skip
    """bitsandbytes 4-bit (NF4 / FP4) -> float32 ``shape``, as ``bitsandbytes.functional.dequantize_4bit``."""
    numel = shape[0] * shape[1]
    packed = weight.reshape(-1).to(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:numel].long()
    if nested_absmax is not None:  # double quantization: absmax is itself 8-bit blockwise
        blocks = absmax.numel()
        outer = nested_absmax.float().repeat_interleave(nested_blocksize)[:blocks]
        absmax = nested_quant_map.float()[absmax.long()] * outer + nested_offset
    scale = absmax.float().repeat_interleave(blocksize)[:numel]
    return (quant_map.float()[codes] * scale).reshape(shape)


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 ``weight * SCB / 127`` in float32 (bitsandbytes multiplies by 1/127 as float32)."""
    return weight.float() * scb.float().reshape(-1, 1) * torch.tensor(1 / 127, dtype=torch.float32)


def parse_quant_state(blob: torch.Tensor) -> dict:
    """The ``weight.quant_state.bitsandbytes__*`` tensor: uint8 bytes of a JSON dict."""
    state = json.loads(bytes(blob.to(torch.uint8).tolist()).decode())
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"bitsandbytes quant_state lacks {', '.join(missing)}")
    return state


def have_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


class _Bnb4bit:
    """One shard's 4-bit weight multiplied by bitsandbytes' ``matmul_4bit`` (stays 4-bit)."""

    def __init__(self, packed: torch.Tensor, quant_state) -> None:
        self.packed, self.quant_state = packed, quant_state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        dtype = self.quant_state.dtype
        return bnb.matmul_4bit(x.to(dtype), self.packed.t(), quant_state=self.quant_state).to(x.dtype)


class _Parts:
    """bitsandbytes' 4-bit matmul per shard (each has its own quant state), outputs concatenated."""

    name = "bnb"

    def __init__(self, kernels: list) -> None:
        self.kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.kernels) == 1:
            return self.kernels[0](x)
        return torch.cat([k(x) for k in self.kernels], dim=-1)


class BitsAndBytesLinearMethod(LinearMethod):
    """Pre-quantized tensors (``method.prequantized``) or a float weight quantized at load."""

    def __init__(self, method: BitsAndBytesMethod) -> None:
        self.method = method

    def create_weights(self, layer, in_features, output_sizes, dtype):
        layer.quant_tensors = {}  # shard -> {name: tensor}
        layer.compute_dtype = dtype
        layer.kernel = None

    def checkpoint_names(self, layer):
        m = self.method
        if not m.prequantized:
            return ["weight"]
        if m.quant_type == "int8":
            return ["weight", "SCB", "weight_format"]
        names = ["weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{m.quant_type}"]
        return names + (["weight.nested_absmax", "weight.nested_quant_map"] if m.double_quant else [])

    def load_weight(self, layer, param_name, shard, tensor):
        rows = layer.out_features if shard is None else layer.output_sizes[shard]
        where = f"{layer.prefix}.{param_name}" + ("" if shard is None else f" (shard {shard})")
        m = self.method
        expected = {  # what the tensors must look like: (shape, dtypes)
            "weight": ((rows, layer.in_features), (torch.float32, torch.bfloat16, torch.float16)) if not m.prequantized
            else ((rows, layer.in_features), (torch.int8,)) if m.quant_type == "int8"
            else ((rows * layer.in_features // 2, 1), (torch.uint8,)),
            "SCB": ((rows,), (torch.float32, torch.bfloat16, torch.float16)),
        }.get(param_name)  # fmt: skip
        if expected is not None and (tuple(tensor.shape) != expected[0] or tensor.dtype not in expected[1]):
            raise ValueError(f"{where}: quantization method {m.name!r} expects shape {expected[0]} "
                             f"({'/'.join(str(d).removeprefix('torch.') for d in expected[1])}), "
                             f"got {tuple(tensor.shape)} ({str(tensor.dtype).removeprefix('torch.')})")  # fmt: skip
        layer.quant_tensors.setdefault(shard, {})[param_name] = tensor

    def process_weights_after_loading(self, layer):
        parts = []
        for shard in layer.shards:
            rows = layer.out_features if shard is None else layer.output_sizes[shard]
            parts.append(self._decode(layer, layer.quant_tensors[shard], (rows, layer.in_features)))
        if all(isinstance(p, torch.Tensor) for p in parts):
            layer.kernel = Dense(torch.cat(parts), layer.compute_dtype)
        elif all(isinstance(p, IntWeight) for p in parts):
            layer.kernel = Int8Pack(IntWeight.cat(parts))
        else:
            layer.kernel = _Parts(parts)
        layer.quant_tensors = {}

    def _decode(self, layer, t: dict, shape: tuple[int, int]):
        """One shard -> a float32 weight (dequant), an IntWeight (int8pack) or a _Bnb4bit (bnb)."""
        m, kernel = self.method, self.method.kernel
        if not m.prequantized:  # quantize the float weight now, with bitsandbytes itself
            import bitsandbytes.functional as bnbF

            if m.quant_type == "int8":
                cb, scb, _ = bnbF.int8_vectorwise_quant(t["weight"].to(torch.float16))  # as bnb's Linear8bitLt does
                t = {"weight": cb, "SCB": scb}
            else:
                packed, state = bnbF.quantize_4bit(t["weight"].to(layer.compute_dtype), blocksize=64, quant_type=m.quant_type)
                return _Bnb4bit(packed, state) if kernel == "bnb" else bnbF.dequantize_4bit(packed, state).float()
        if m.quant_type == "int8":
            if kernel == "dequant":
                return dequantize_int8(t["weight"], t["SCB"])
            scale = t["SCB"].float().reshape(-1, 1) * torch.tensor(1 / 127, dtype=torch.float32)
            return IntWeight(t["weight"].to(torch.int32) + 128, scale, torch.full_like(scale, 128.0),
                             torch.zeros(shape[1], dtype=torch.int64), 8)  # fmt: skip
        state_key = f"weight.quant_state.bitsandbytes__{m.quant_type}"
        state = parse_quant_state(t[state_key])
        if tuple(state["shape"]) != shape:
            raise ValueError(f"{layer.prefix}: bitsandbytes quant_state shape {state['shape']} is not {list(shape)}")
        if kernel == "dequant":
            nested = {}
            if "weight.nested_absmax" in t:
                nested = dict(nested_absmax=t["weight.nested_absmax"], nested_quant_map=t["weight.nested_quant_map"],
                              nested_offset=float(state["nested_offset"]),
                              nested_blocksize=int(state["nested_blocksize"]))  # fmt: skip
            blocksize = int(state["blocksize"])
            return dequantize_4bit(t["weight"], t["weight.absmax"], t["weight.quant_map"], blocksize, shape, **nested)
        from bitsandbytes.functional import QuantState

        qs = {k.removeprefix("weight."): v for k, v in t.items() if k != "weight"}
        return _Bnb4bit(t["weight"], QuantState.from_dict(qs, device=t["weight"].device))

    def apply(self, layer, x, bias):
        flat = x.reshape(-1, x.shape[-1])
        y = layer.kernel(flat).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias


class BitsAndBytesMethod(QuantizationMethod):
    """bitsandbytes NF4 / FP4 / LLM.int8: pre-quantized checkpoints or quantized at load (NF4 by default)."""

    name = "bitsandbytes"
    kernels = ("bnb", "int8pack", "dequant")
    default_type = "nf4"

    def __init__(self, quant_type: str, prequantized: bool, double_quant: bool = False, skip: tuple[str, ...] = ()) -> None:
        self.quant_type, self.prequantized, self.double_quant, self.skip = quant_type, prequantized, double_quant, skip

    @classmethod
    def from_config(cls, quant_config, hf_config):
        if not quant_config:  # a float checkpoint, quantized on load
            return cls(cls.default_type, prequantized=False)
        if quant_config.get("load_in_8bit"):
            if quant_config.get("llm_int8_has_fp16_weight"):
                raise ValueError("quantization_config.llm_int8_has_fp16_weight=true: the checkpoint holds float weights")
            quant_type = "int8"
        elif quant_config.get("load_in_4bit"):
            quant_type = quant_config.get("bnb_4bit_quant_type", "fp4")
            if quant_type not in ("nf4", "fp4"):
                raise ValueError(f"quantization_config.bnb_4bit_quant_type={quant_type!r}: expected nf4 or fp4")
            storage = quant_config.get("bnb_4bit_quant_storage", "uint8")
            if storage != "uint8":
                raise ValueError(f"quantization_config.bnb_4bit_quant_storage={storage!r}: only uint8 is supported")
        else:
            raise ValueError("quantization_config: neither load_in_4bit nor load_in_8bit is set")
        skip = tuple(quant_config.get("llm_int8_skip_modules") or ())
        return cls(quant_type, True, bool(quant_config.get("bnb_4bit_use_double_quant")), skip)

    def check_device(self, device):
        if self.kernel == "auto":
            self.kernel = "int8pack" if self.quant_type == "int8" and device.type == "cpu" else (
                "bnb" if have_bitsandbytes() and self.quant_type != "int8" else "dequant")  # fmt: skip
        needs_bnb = not self.prequantized or self.kernel == "bnb"
        if needs_bnb and not have_bitsandbytes():
            why = "quantizes the float weights at load" if not self.prequantized else "kernel 'bnb' multiplies"
            also = "" if not self.prequantized else ", or quantization_kernel='dequant' (no package needed)"
            raise ValueError(f"quantization method 'bitsandbytes' {why} with the bitsandbytes package, which is not "
                             f"installed; pip install 'pagedllm[bitsandbytes]'{also}")  # fmt: skip
        if self.kernel == "bnb" and self.quant_type == "int8":
            raise ValueError("quantization method 'bitsandbytes': kernel 'bnb' runs the 4-bit types here; LLM.int8 "
                             "weights use quantization_kernel='int8pack' or 'dequant'")  # fmt: skip
        if self.kernel == "int8pack" and (self.quant_type != "int8" or device.type != "cpu"):
            raise ValueError(f"quantization method 'bitsandbytes': kernel 'int8pack' (torch's CPU _weight_int8pack_mm) "
                             f"needs int8 weights on CPU, not {self.quant_type} on {device}; use 'bnb' or 'dequant'")  # fmt: skip

    def get_linear_method(self, prefix: str) -> LinearMethod:
        # transformers skips a module when any llm_int8_skip_modules entry is a substring of its name
        skipped = {prefix == "lm_head" or any(key in name for key in self.skip) for name in checkpoint_modules(prefix)}
        if len(skipped) > 1:
            raise ValueError(f"{prefix}: quantization_config.llm_int8_skip_modules={list(self.skip)} leaves only some of "
                             f"{checkpoint_modules(prefix)} in float; this merged layer needs all or none")  # fmt: skip
        return UnquantizedLinearMethod() if skipped.pop() else BitsAndBytesLinearMethod(self)


class BitsAndBytesFP4Method(BitsAndBytesMethod):
    """On-the-fly FP4 (a pre-quantized checkpoint says its own type)."""

    name = "bitsandbytes-fp4"
    default_type = "fp4"


class BitsAndBytesInt8Method(BitsAndBytesMethod):
    """On-the-fly LLM.int8 weights (row-wise absmax int8)."""

    name = "bitsandbytes-int8"
    default_type = "int8"
