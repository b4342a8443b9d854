"""What the integer weight formats (GPTQ, AWQ, compressed-tensors) share: bit unpacking, one
canonical form of a quantized weight, and the CPU kernels it is repacked into at load.

Every format's decoder turns its checkpoint tensors into an :class:`IntWeight`: unsigned codes
``q`` ``[out, in]``, and per (output row, group) a ``scale`` and a ``zero`` in code units, so that
``W[o, i] = (q[o, i] - zero[o, g(i)]) * scale[o, g(i)]`` with ``g = g_idx``. The kernels then
only need that form:

- :class:`Int4Pack`: torch's ``_weight_int4pack_mm_for_cpu`` (groups of 32/64/128/256 contiguous
  input columns; ``w = (q - 8) * s + z``). Act-order weights whose groups are a permutation of
  contiguous ones run with the input columns permuted the same way;
- :class:`Int8Pack`: torch's ``_weight_int8pack_mm`` (one scale per output row) for 8-bit;
- :class:`Dense`: the weight dequantized once to the compute dtype (any bits, any grouping);
- ``TritonInt4`` (``triton_int4``): 4-bit on GPUs, the default there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.core.quantization import LinearMethod

INT4PACK_GROUPS = (256, 128, 64, 32)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned ``bits``-wide values (int32), ``32 // bits`` per word along ``dim``.

    Value ``j`` of a word sits at bits ``j * bits`` (least significant first), the layout GPTQ
    and compressed-tensors' pack-quantized share (AWQ adds its own column order on top).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits}: only 2, 4 and 8-bit values pack evenly into int32 words")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    words = packed.to(torch.int32).movedim(dim, -1)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift; the mask drops sign bits
    return values.flatten(-2).movedim(-1, dim)


@dataclass
class IntWeight:
    """A quantized weight in one form for every integer format (see the module docstring)."""

    q: torch.Tensor  # int32 [out, in], codes 0 .. 2**bits - 1
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor  # float32 [out, groups], in code units
    g_idx: torch.Tensor  # int64 [in], group of each input column
    bits: int

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]."""
        return (self.q.float() - self.zero[:, self.g_idx]) * self.scale[:, self.g_idx]

    @staticmethod
    def cat(parts: list[IntWeight]) -> IntWeight:
        """Stack the parts of a merged layer along the output dim (they must share g_idx)."""
        if len(parts) == 1:
            return parts[0]
        if any(not torch.equal(p.g_idx, parts[0].g_idx) for p in parts):
            raise ValueError("the merged parts have different g_idx")
        return IntWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                         torch.cat([p.zero for p in parts]), parts[0].g_idx, parts[0].bits)  # fmt: skip

    def contiguous_groups(self) -> tuple[int, torch.Tensor | None] | None:
        """(group size, input permutation or None) when every group is a block of equal size
        once the input columns are permuted (act-order); None for any other g_idx."""
        num_groups = self.scale.shape[1]
        counts = torch.bincount(self.g_idx, minlength=num_groups)
        size = self.q.shape[1] // num_groups
        if num_groups * size != self.q.shape[1] or bool((counts != size).any()):
            return None
        plain = torch.arange(self.q.shape[1], device=self.g_idx.device) // size
        if torch.equal(self.g_idx, plain):
            return size, None
        return size, torch.argsort(self.g_idx, stable=True)


def plain_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """``i // group_size`` (all zeros for a per-channel weight, group_size -1)."""
    if group_size <= 0:
        return torch.zeros(in_features, dtype=torch.int64)
    return torch.arange(in_features) // group_size


class Dense:
    """The weight dequantized once at load: works for every format and device."""

    name = "dequant"

    def __init__(self, weight: IntWeight | torch.Tensor, dtype: torch.dtype) -> None:
        w = weight.dequantize() if isinstance(weight, IntWeight) else weight
        self.weight = w.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Int4Pack:
    """4-bit codes in torch's CPU int4pack layout; ``w = (q - 8) * s + z`` per group.

    Activations, scales and zeros go in as bfloat16: the kernel also takes float32, exactly,
    but runs 30-170x slower that way on CPU (AVX2), while bfloat16 beats a float32 matmul.
    """

    name = "int4pack"

    def __init__(self, weight: IntWeight, group_size: int, perm: torch.Tensor | None) -> None:
        q, scale, zero = weight.q, weight.scale, weight.zero
        if perm is not None:
            q = q[:, perm]  # groups become contiguous blocks; x is permuted alike in __call__
        if scale.shape[1] == 1:  # one group per row: any int4pack group size that divides in_features
            group_size = next(g for g in INT4PACK_GROUPS if q.shape[1] % g == 0)
            reps = q.shape[1] // group_size
            scale, zero = scale.repeat(1, reps), zero.repeat(1, reps)
        self.group_size, self.perm = group_size, perm
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # (q - zero) * s == (q - 8) * s + (8 - zero) * s ; the kernel wants [groups, out, 2]
        self.scales_and_zeros = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).to(torch.bfloat16)

    @staticmethod
    def supports(weight: IntWeight) -> tuple[int, torch.Tensor | None] | None:
        """(group size, permutation) when the kernel can run ``weight``, else None."""
        if weight.bits != 4:
            return None
        layout = weight.contiguous_groups()
        if layout is None:
            return None
        size, perm = layout
        if weight.scale.shape[1] == 1:
            return (size, perm) if any(weight.q.shape[1] % g == 0 for g in INT4PACK_GROUPS) else None
        return (size, perm) if size in INT4PACK_GROUPS else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            flat = flat[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros.contiguous()
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int8Pack:
    """8-bit codes as int8 with one scale per output row: torch's ``_weight_int8pack_mm``.

    ``(q - zero) * s == (q - 128) * s + (128 - zero) * s``: the second term, non-zero only for
    asymmetric weights, is added as ``sum(x) * ((128 - zero) * s)``, so it stays exact.
    Activations go in as bfloat16 (the kernel's fast path on CPU).
    """

    name = "int8pack"

    def __init__(self, weight: IntWeight) -> None:
        self.qweight = (weight.q - 128).to(torch.int8).contiguous()
        self.scale = weight.scale[:, 0].contiguous()
        offset = (128 - weight.zero[:, 0]) * self.scale
        self.offset = offset if bool(offset.any()) else None

    @staticmethod
    def supports(weight: IntWeight) -> bool:
        return weight.bits == 8 and weight.scale.shape[1] == 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.qweight, self.scale.to(torch.bfloat16)).to(x.dtype)
        if self.offset is not None:
            y = y + x.reshape(-1, x.shape[-1]).sum(-1, keepdim=True) * self.offset.to(x.dtype)
        return y.reshape(*x.shape[:-1], -1)


def _triton_layout(weight: IntWeight, device: torch.device):
    """(group size, permutation) when the Triton 4-bit kernel can run ``weight`` on ``device``, else None."""
    if weight.bits != 4 or weight.q.shape[1] % 8:
        return None
    try:
        from pagedllm.plugins.quantization import triton_int4
    except ImportError:  # no triton installed
        return None
    return weight.contiguous_groups() if triton_int4.available(device) else None


def check_kernel_device(method_name: str, kernel: str, device: torch.device) -> None:
    """ValueError at load when the forced ``kernel`` cannot run on ``device`` at all."""
    if kernel in ("int4pack", "int8pack", "int_mm") and device.type != "cpu":
        raise ValueError(f"quantization method {method_name!r}: kernel {kernel!r} is one of torch's CPU kernels and "
                         f"cannot run on {device}; use quantization_kernel='dequant' or 'auto'")  # fmt: skip
    if kernel == "triton" and not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"quantization method {method_name!r}: kernel 'triton' needs a CUDA device (on CPU only "
                         "under TRITON_INTERPRET=1, for testing); use quantization_kernel='auto' or 'dequant'")  # fmt: skip


def choose_kernel(method_name: str, kernel: str, weight: IntWeight, dtype: torch.dtype, device: torch.device):
    """The kernel for ``weight``: forced by ``kernel`` or, for "auto", the fastest that fits
    (CPU: int4pack, int8pack; CUDA: triton for 4-bit; else the dequantized weight).

    A forced kernel that cannot run this weight is a ValueError naming the method, why, and
    what works instead.
    """
    on_cpu = device.type == "cpu"
    int4 = Int4Pack.supports(weight) if on_cpu else None
    int8 = on_cpu and Int8Pack.supports(weight)
    if kernel == "auto":
        if device.type == "cuda" and _triton_layout(weight, device):
            kernel = "triton"
        else:
            kernel = "int4pack" if int4 else "int8pack" if int8 else "dequant"
    if kernel == "triton":
        layout = _triton_layout(weight, device)
        if not layout:
            raise ValueError(
                f"quantization method {method_name!r}: kernel 'triton' needs the triton package, a CUDA device (or "
                f"TRITON_INTERPRET=1 on CPU) and 4-bit weights whose groups are contiguous blocks of input columns; this "
                f"layer has {weight.bits}-bit weights on {device}; use quantization_kernel='dequant' or 'auto'"
            )
        from pagedllm.plugins.quantization.triton_int4 import TritonInt4

        return TritonInt4(weight, *layout).to(device)
    if kernel == "int4pack":
        if not int4:
            raise ValueError(
                f"quantization method {method_name!r}: kernel 'int4pack' (torch's _weight_int4pack_mm_for_cpu) needs "
                f"4-bit weights in groups of {'/'.join(map(str, INT4PACK_GROUPS))} input columns on CPU; this layer has "
                f"{weight.bits}-bit weights, {weight.scale.shape[1]} groups over {weight.q.shape[1]} inputs on {device}; "
                "use quantization_kernel='dequant' or 'auto'"
            )
        return Int4Pack(weight, *int4)
    if kernel == "int8pack":
        if not int8:
            raise ValueError(
                f"quantization method {method_name!r}: kernel 'int8pack' (torch's _weight_int8pack_mm) needs 8-bit "
                f"weights with one scale per output row on CPU; this layer has {weight.bits}-bit weights in "
                f"{weight.scale.shape[1]} groups on {device}; use quantization_kernel='dequant' or 'auto'"
            )
        return Int8Pack(weight)
    return Dense(weight, dtype)


class IntLinearMethod(LinearMethod):
    """A linear layer of an integer format: keeps each shard's checkpoint tensors until loading
    ends, then decodes them to one :class:`IntWeight` and builds its kernel.

    Subclasses say which tensors a shard has (:meth:`expected`, keyed by name: shape and
    dtypes) and how they decode (:meth:`decode`).
    """

    def __init__(self, method) -> None:
        self.method = method  # the QuantizationMethod: name, kernel option, format settings

    @property
    def supports_decode_graphs(self) -> bool:
        # torch ops only (aten's int4pack / int8pack matmuls, _int_mm, _scaled_mm, F.linear); the
        # Triton kernel is launched from Python, which a trace does not record.
        return self.method.kernel != "triton"

    def expected(self, in_features: int, rows: int) -> dict[str, tuple[tuple, tuple[torch.dtype, ...]]]:
        """name -> (shape or tuple of allowed shapes, allowed dtypes) of one shard's tensors."""
        raise NotImplementedError

    def decode(self, tensors: dict[str, torch.Tensor], in_features: int, rows: int):
        """One shard's tensors -> what :meth:`build_kernel` takes (an :class:`IntWeight` by default)."""
        raise NotImplementedError

    def create_weights(self, layer, in_features, output_sizes, dtype):
        layer.quant_tensors = {}  # shard -> {name: tensor}, until process_weights_after_loading
        layer.compute_dtype = dtype
        layer.quant_device = torch.empty(0).device  # the engine builds the model under torch.device(...)
        layer.kernel = None

    def checkpoint_names(self, layer):
        return list(self.expected(layer.in_features, layer.output_sizes[0]))

    def load_weight(self, layer, param_name, shard, tensor):
        rows = layer.out_features if shard is None else layer.output_sizes[shard]
        shape, dtypes = self.expected(layer.in_features, rows)[param_name]
        shapes = shape if shape and isinstance(shape[0], tuple) else (shape,)  # a tuple of allowed shapes
        if tuple(tensor.shape) not in shapes or tensor.dtype not in dtypes:
            where = f"{layer.prefix}.{param_name}" + ("" if shard is None else f" (shard {shard})")
            raise ValueError(f"{where}: quantization method {self.method.name!r} expects shape {shape} "
                             f"({'/'.join(str(d).removeprefix('torch.') for d in dtypes)}), "
                             f"got {tuple(tensor.shape)} ({str(tensor.dtype).removeprefix('torch.')})")  # fmt: skip
        layer.quant_tensors.setdefault(shard, {})[param_name] = tensor

    def process_weights_after_loading(self, layer):
        parts = []
        for shard in layer.shards:
            rows = layer.out_features if shard is None else layer.output_sizes[shard]
            parts.append(self.decode(layer.quant_tensors[shard], layer.in_features, rows))
        layer.kernel = self.build_kernel(layer, parts)
        layer.quant_tensors = {}

    def build_kernel(self, layer, parts: list):
        """The kernel of the decoded parts (one per shard); default: an :class:`IntWeight` kernel."""
        try:
            weight = IntWeight.cat(parts)
        except ValueError as e:  # act-order parts with different column orders: no shared permutation
            if self.method.kernel not in ("auto", "dequant"):
                raise ValueError(f"{layer.prefix}: quantization method {self.method.name!r}: {e}; "
                                 "use quantization_kernel='dequant' or 'auto'") from None  # fmt: skip
            return Dense(torch.cat([p.dequantize() for p in parts]), layer.compute_dtype)
        return choose_kernel(self.method.name, self.method.kernel, weight, layer.compute_dtype, layer.quant_device)

    def apply(self, layer, x, bias):
        y = layer.kernel(x)
        return y if bias is None else y + bias
