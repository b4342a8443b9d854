"""compressed-tensors checkpoints as llm-compressor writes them (``quant_method: "compressed-tensors"``).

``quantization_config.config_groups`` maps schemes to target modules (``"Linear"`` or
``"re:<regex>"``; ``ignore`` lists exceptions). Per linear layer, by the scheme's ``format``:

- ``pack-quantized`` (W4A16, W8A16): ``weight_packed`` int32 ``[out, in * bits / 32]``, signed
  values ``q`` stored as ``q + 2**(bits-1)``, value ``j`` of a word at bits ``j * bits``
  (sequential, least significant first); ``weight_scale`` ``[out, groups]``; ``weight_shape``
  ``[out, in]``; asymmetric schemes add ``weight_zero_point`` packed the same way along dim 0,
  ``actorder: group`` adds ``weight_g_idx`` ``[in]``. ``W = (q - zero) * scale``;
- ``int-quantized`` (W8A8 INT8): ``weight`` int8 ``[out, in]`` and ``weight_scale`` ``[out, 1]``;
- ``float-quantized`` (FP8): ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale``
  ``[out, 1]`` (per channel) or ``[1]`` (per tensor).

Activations (``input_activations``) are quantized per token on the fly exactly as
compressed-tensors does: symmetric, ``scale = absmax / 127.5`` (int8: half the range 255) or
``absmax / 448`` (fp8 e4m3), ``q = round(clamp(x / scale))``.

Kernels: int4pack / int8pack / dequant for weight-only schemes (see ``int_weights``); for INT8
W8A8 ``int_mm`` (``torch._int_mm``: int8 x int8 -> int32, exact) or ``dequant`` (the same
quantized activations times the dequantized weight in float); for FP8 ``dequant`` (the weight
dequantized once at load to the compute dtype: fp8 -> float conversion is slow on CPU, so doing
it per matmul would cost ~40x a float matmul) or ``scaled_mm`` (``torch._scaled_mm`` on fp8
activations and weights with row-wise scales).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.core.quantization import LinearMethod, QuantizationMethod, UnquantizedLinearMethod
from pagedllm.plugins.quantization.int_weights import (
    Dense,
    IntLinearMethod,
    IntWeight,
    check_kernel_device,
    plain_g_idx,
    unpack,
)

FP8_MAX = 448.0  # float8_e4m3fn
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# Our merged layers and the checkpoint modules they hold (for ``ignore`` / ``targets`` lists).
_MERGED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Scheme:
    """One config group: how weights are stored and whether activations are quantized."""

    format: str
    bits: int
    weight_type: str  # "int" | "float"
    symmetric: bool
    strategy: str  # "channel" | "group" | "tensor"
    group_size: int
    actorder: bool  # weight_g_idx present
    act_type: str | None  # None (weight-only), "int" or "float": dynamic per-token, 8-bit


def parse_scheme(group: dict, default_format: str | None, where: str) -> Scheme:
    """A config group -> :class:`Scheme`; ValueError naming the key this method cannot run."""
    w = group.get("weights") or {}
    fmt = group.get("format") or default_format
    bits, wtype = w.get("num_bits", 8), w.get("type", "int")
    strategy, group_size = w.get("strategy", "tensor"), w.get("group_size") or -1
    supported = {("pack-quantized", "int"), ("int-quantized", "int"), ("float-quantized", "float")}
    if (fmt, wtype) not in supported:
        raise ValueError(f"{where}.format={fmt!r} with weights.type={wtype!r}: quantization method 'compressed-tensors' "
                         "reads pack-quantized and int-quantized int weights and float-quantized fp8 weights")  # fmt: skip
    if (wtype == "float" and bits != 8) or (fmt == "int-quantized" and bits != 8) or bits not in (2, 4, 8):
        raise ValueError(f"{where}.weights.num_bits={bits!r}: not supported for format {fmt!r}")
    if strategy not in ("channel", "group", "tensor") or (strategy == "group" and group_size <= 0):
        raise ValueError(f"{where}.weights.strategy={strategy!r}: supported are channel, group (with group_size) "
                         "and tensor")  # fmt: skip
    if w.get("dynamic"):
        raise ValueError(f"{where}.weights.dynamic=true: weights must be stored quantized")
    actorder = w.get("actorder") == "group"
    act = group.get("input_activations")
    act_type = None
    if act:
        if not (act.get("dynamic") is True and act.get("strategy") == "token" and act.get("num_bits") == 8
                and act.get("symmetric", True)):  # fmt: skip
            raise ValueError(f"{where}.input_activations={act}: only dynamic, symmetric, per-token 8-bit activation "
                             "quantization is supported (static input scales are not)")  # fmt: skip
        act_type = act.get("type", "int")
        if act_type != wtype:
            raise ValueError(f"{where}.input_activations.type={act_type!r} differs from weights.type={wtype!r}")
    if group.get("output_activations"):
        raise ValueError(f"{where}.output_activations: output quantization is not supported")
    return Scheme(fmt, bits, wtype, bool(w.get("symmetric", True)), strategy, group_size if strategy == "group" else -1,
                  actorder, act_type)  # fmt: skip


def _scale_to_rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-tensor ([1] or []) or per-row ([rows, 1]) scale -> float32 [rows, 1]."""
    return scale.float().reshape(-1, 1).expand(rows, 1) if scale.numel() == 1 else scale.float().reshape(rows, 1)


def decode_pack_quantized(weight_packed: torch.Tensor, weight_scale: torch.Tensor, bits: int,
                          weight_zero_point: torch.Tensor | None = None,
                          weight_g_idx: torch.Tensor | None = None, in_features: int | None = None) -> IntWeight:  # fmt: skip
    """pack-quantized tensors -> :class:`IntWeight` (codes = stored unsigned values)."""
    rows = weight_packed.shape[0]
    in_features = in_features or weight_packed.shape[1] * 32 // bits
    q = unpack(weight_packed, bits, dim=1)[:, :in_features]
    scale = weight_scale.float().reshape(rows, -1)
    if weight_zero_point is None:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = unpack(weight_zero_point, bits, dim=0)[:rows].float()
    groups = scale.shape[1]
    if weight_g_idx is not None:
        g_idx = weight_g_idx.long()
    else:
        g_idx = plain_g_idx(in_features, in_features // groups if groups > 1 else -1)
    return IntWeight(q.contiguous(), scale.contiguous(), zero.contiguous(), g_idx, bits)


def decode_int8(weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None = None) -> IntWeight:
    """int-quantized int8 ``weight`` -> :class:`IntWeight` (codes ``w + 128``)."""
    rows, in_features = weight.shape
    scale = _scale_to_rows(weight_scale, rows) if weight_scale.numel() in (1, rows) else weight_scale.float()
    zero = torch.full_like(scale, 128.0) if weight_zero_point is None else weight_zero_point.float().reshape(scale.shape) + 128
    groups = scale.shape[1]
    g_idx = plain_g_idx(in_features, in_features // groups if groups > 1 else -1)
    return IntWeight(weight.to(torch.int32) + 128, scale.contiguous(), zero.contiguous(), g_idx, 8)


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float-quantized fp8 ``weight`` ``[out, in]`` -> float32 ``weight * scale``."""
    return weight.float() * _scale_to_rows(weight_scale, weight.shape[0])


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 as compressed-tensors computes it: (int8 [M, K], scale float32 [M, 1])."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127.5  # compressed-tensors: absmax / (range 255 / 2)
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return torch.round(torch.clamp(x / scale, -128, 127)).to(torch.int8), scale


def quantize_tokens_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token float8_e4m3fn as compressed-tensors computes it: (fp8 [M, K], scale float32 [M, 1])."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class Int8Activations:
    """INT8 W8A8: per-token int8 activations times int8 weights with per-row scales.

    ``int_mm`` multiplies the integers with ``torch._int_mm`` (exact int32 sums); ``dequant``
    multiplies the dequantized activations and weights in float32.
    """

    def __init__(self, weight: IntWeight, use_int_mm: bool) -> None:
        if weight.scale.shape[1] != 1 or bool((weight.zero != 128).any()):
            raise ValueError("INT8 W8A8 needs symmetric per-channel weights")
        self.name = "int_mm" if use_int_mm else "dequant"
        self.scale = weight.scale.reshape(1, -1)  # [1, out]
        qweight = (weight.q - 128).to(torch.int8)
        self.qweight_t = qweight.t().contiguous() if use_int_mm else None  # [in, out], as _int_mm wants
        self.weight = None if use_int_mm else qweight.float() * weight.scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_tokens_int8(flat)
        if self.qweight_t is not None:
            y = torch._int_mm(xq, self.qweight_t).float() * xs * self.scale
        else:
            y = F.linear(xq.float() * xs, self.weight)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Fp8Activations:
    """FP8 W8A8: per-token fp8 activations times fp8 weights with per-row scales.

    ``dequant`` keeps the weight dequantized in the compute dtype (converted once at load);
    ``scaled_mm`` keeps fp8 weights and calls ``torch._scaled_mm`` with row-wise scales.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, use_scaled_mm: bool) -> None:
        self.name = "scaled_mm" if use_scaled_mm else "dequant"
        self.scale = scale.reshape(1, -1).float()  # [1, out]
        self.weight_t = weight.t() if use_scaled_mm else None  # fp8 [in, out], column-major as _scaled_mm wants
        self.weight = None if use_scaled_mm else (weight.float() * scale.float()).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_tokens_fp8(flat)
        if self.weight_t is not None:
            y = torch._scaled_mm(xq, self.weight_t, scale_a=xs, scale_b=self.scale, out_dtype=torch.float32)
        else:
            y = F.linear((xq.float() * xs).to(self.weight.dtype), self.weight)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class CompressedTensorsLinearMethod(IntLinearMethod):
    def __init__(self, method: CompressedTensorsMethod, scheme: Scheme) -> None:
        super().__init__(method)
        self.scheme = scheme

    def expected(self, in_features, rows):
        s = self.scheme
        groups = in_features // s.group_size if s.strategy == "group" else 1
        scale_shape = ((1,), ()) if s.strategy == "tensor" else (rows, groups)
        if s.format == "pack-quantized":
            names = {
                "weight_packed": ((rows, -(-in_features * s.bits // 32)), (torch.int32,)),
                "weight_scale": (scale_shape, _FLOAT),
                "weight_shape": ((2,), (torch.int32, torch.int64)),
            }
            if not s.symmetric:
                names["weight_zero_point"] = ((-(-rows * s.bits // 32), groups), (torch.int32,))
        else:
            names = {
                "weight": ((rows, in_features), (torch.int8,) if s.weight_type == "int" else (torch.float8_e4m3fn,)),
                "weight_scale": (scale_shape, _FLOAT),
            }
            if not s.symmetric:
                names["weight_zero_point"] = (scale_shape, (torch.int8, torch.int32) + _FLOAT)
        if s.actorder:
            names["weight_g_idx"] = ((in_features,), (torch.int32, torch.int64))
        return names

    def decode(self, tensors, in_features, rows):
        s = self.scheme
        if s.format == "pack-quantized":
            shape = tuple(int(v) for v in tensors["weight_shape"])
            if shape != (rows, in_features):
                raise ValueError(f"weight_shape {list(shape)} does not match the layer's [{rows}, {in_features}]")
            weight = decode_pack_quantized(tensors["weight_packed"], tensors["weight_scale"], s.bits,
                                           tensors.get("weight_zero_point"), tensors.get("weight_g_idx"),
                                           in_features)  # fmt: skip
        elif s.weight_type == "int":
            weight = decode_int8(tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point"))
        else:
            return tensors["weight"], _scale_to_rows(tensors["weight_scale"], rows)  # fp8 and per-row scales
        if "weight_g_idx" in tensors and s.format != "pack-quantized":
            weight.g_idx = tensors["weight_g_idx"].long()
        return weight

    def build_kernel(self, layer, parts):
        s, kernel, name = self.scheme, self.method.kernel, self.method.name
        if s.weight_type == "float":
            weight, scale = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            if kernel not in ("auto", "dequant", "scaled_mm"):
                raise ValueError(f"{layer.prefix}: quantization method {name!r}: kernel {kernel!r} does not run FP8 "
                                 "weights; use 'dequant' or 'scaled_mm'")  # fmt: skip
            if s.act_type is None:  # FP8 weight-only: dequantize once
                return Dense(dequantize_fp8(weight, scale), layer.compute_dtype)
            return Fp8Activations(weight, scale, layer.compute_dtype, kernel == "scaled_mm")
        if s.act_type == "int":
            if kernel not in ("auto", "dequant", "int_mm"):
                raise ValueError(f"{layer.prefix}: quantization method {name!r}: kernel {kernel!r} does not run INT8 "
                                 "W8A8 (activations are quantized too); use 'int_mm' or 'dequant'")  # fmt: skip
            return Int8Activations(IntWeight.cat(parts), kernel != "dequant" and layer.quant_device.type == "cpu")
        if kernel in ("int_mm", "scaled_mm"):
            raise ValueError(f"{layer.prefix}: quantization method {name!r}: kernel {kernel!r} needs quantized "
                             "activations, this scheme is weight-only; use 'int4pack', 'int8pack' or 'dequant'")  # fmt: skip
        return super().build_kernel(layer, parts)


def checkpoint_modules(prefix: str) -> list[str]:
    """The checkpoint module names our layer at ``prefix`` holds (merged layers hold several)."""
    head, _, last = prefix.rpartition(".")
    parts = _MERGED_PARTS.get(last)
    return [f"{head}.{p}" if head else p for p in parts] if parts else [prefix]


def _matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == "Linear" or name == pattern or name.endswith("." + pattern):
            return True
    return False


class CompressedTensorsMethod(QuantizationMethod):
    """llm-compressor checkpoints: FP8 / INT8 W8A8 with dynamic per-token activations, W4A16 / W8A16."""

    name = "compressed-tensors"
    kernels = ("int4pack", "int8pack", "int_mm", "scaled_mm", "triton", "dequant")

    def __init__(self, groups: list[tuple[list[str], Scheme]], ignore: list[str]) -> None:
        self.groups, self.ignore = groups, ignore

    @classmethod
    def from_config(cls, quant_config, hf_config):
        for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
            if quant_config.get(key):
                raise ValueError(f"quantization_config.{key}: not supported by quantization method 'compressed-tensors'")
        status = quant_config.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"quantization_config.quantization_status={status!r}: only compressed checkpoints "
                             "(save_compressed=True) are supported")  # fmt: skip
        groups = []
        for gname, group in (quant_config.get("config_groups") or {}).items():
            scheme = parse_scheme(group, quant_config.get("format"), f"quantization_config.config_groups.{gname}")
            groups.append((list(group.get("targets") or []), scheme))
        if not groups:
            raise ValueError("quantization_config.config_groups: empty; nothing says how the weights are stored")
        return cls(groups, list(quant_config.get("ignore") or []))

    def check_device(self, device):
        check_kernel_device(self.name, self.kernel, device)

    def scheme_of(self, prefix: str) -> Scheme | None:
        """The scheme of our layer at ``prefix`` (None: left in float); merged parts must agree."""
        found = set()
        for name in checkpoint_modules(prefix):
            scheme = None
            if not _matches(name, self.ignore):
                scheme = next((s for targets, s in self.groups if _matches(name, targets)), None)
            found.add(scheme)
        if len(found) > 1:
            raise ValueError(f"{prefix}: quantization method 'compressed-tensors': the merged parts {checkpoint_modules(prefix)} "
                             "are stored with different schemes, which this layer cannot hold")  # fmt: skip
        return found.pop()

    def get_linear_method(self, prefix: str) -> LinearMethod:
        scheme = self.scheme_of(prefix)
        return UnquantizedLinearMethod() if scheme is None else CompressedTensorsLinearMethod(self, scheme)
