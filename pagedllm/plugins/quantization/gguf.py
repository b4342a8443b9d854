"""Native GGUF: weights stay in their GGUF blocks (or a repacked 4-bit form) and are multiplied as such.

The loader yields each 2-D tensor as ``<name>.qweight_type`` (the ggml type) followed by
``<name>.qweight`` (the raw blocks, ``[rows, bytes_per_row]`` uint8). Types may differ
between tensors and even between the parts of a merged layer (llama.cpp's Q4_K_M puts
some v projections in Q6_K), so a layer is a list of row ranges, each with its kernel.
Kernels (``quantization_kernel``; ``auto`` is ``blocks`` on CPU, ``dequant`` elsewhere):

- ``blocks``: a C++ kernel reads the raw blocks and multiplies with float32 activations
  (up to 8 rows; up to 96 rows (32 with AVX2 only) another one decodes each weight row once and
  multiplies it with all of them; larger batches dequantize a tile of rows and use the float GEMM).
  Same numbers as the dequantized float path up to summation order, so greedy tokens match;
- ``q8``: as ``blocks``, but decode-sized batches of Q4_0, Q4_1 and Q8_0 round the activations
  to int8 per 32 values and take integer dot products, as llama.cpp does: 1.4-2x faster
  matmuls, logits move by ~0.15 (as llama.cpp's do), so greedy text can differ;
- ``int4pack``: Q4_0, Q4_1 and Q4_K (32-value sub-blocks with a scale and a min) repacked
  at load for torch's ``_weight_int4pack_mm_for_cpu``: fastest, but its activations, scales
  and outputs are bfloat16, so logits move by ~1e-2 and greedy text can differ; other types
  use ``blocks``;
- ``dequant``: any device; a tile of rows is dequantized in torch and multiplied, so no float
  copy of the whole weight ever exists.

Float types (F32, F16, BF16) become an ordinary float weight. Token embeddings keep their
raw blocks and dequantize only the looked-up rows.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pagedllm.core.layers import dense
from pagedllm.core.quantization import LinearMethod, QuantizationMethod
from pagedllm.plugins.quantization.gguf_dequant import (
    DEQUANTIZERS,
    dequantize,
    int4_groups,
)

GGML = GGMLQuantizationType
FLOAT_TYPES = {GGML.F32: torch.float32, GGML.F16: torch.float16, GGML.BF16: torch.bfloat16}
INT4PACK_TYPES = {GGML.Q4_0, GGML.Q4_1, GGML.Q4_K}
SUPPORTED_TYPES = set(DEQUANTIZERS) | set(FLOAT_TYPES)
_TILE_ELEMENTS = 1 << 20  # float32 values dequantized at a time (4 MiB): stays in cache, bounds memory
_MAX_BLOCK_ROWS = 8  # activation rows the C++ decode kernels take
# From 9 rows up to kernels.gguf_tiled_max_rows() (96 with AVX-512, 32 with AVX2), a C++ kernel decodes
# each weight row once into a small scratch and multiplies it with every row of x (1.2-3x the tile path
# on SmolLM2's shapes); larger batches (prefill) dequantize tiles of rows for the float GEMM.
_SOURCE = Path(__file__).parent / "csrc" / "gguf_kernels.cpp"
logger = logging.getLogger(__name__)


@functools.cache
def load_kernels():
    """Compile (once per machine; cached under ~/.cache/torch_extensions) and load the C++ kernels.

    None, with a warning, where no C++ tool chain is available: ``dequant`` then runs instead.
    """
    try:
        from torch.utils.cpp_extension import load

        return load(name="pagedllm_gguf_kernels", sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"])  # fmt: skip
    except Exception as exc:  # no compiler, no ninja, ...
        logger.warning("pagedllm: GGUF C++ kernels unavailable (%s); dequantizing tiles in torch instead", exc)
        return None


@functools.cache
def _scratch(num_elements: int) -> torch.Tensor:
    """One reused float32 buffer for dequantized tiles (fresh 4 MiB allocations page-fault on every call)."""
    return torch.empty(num_elements)


def _float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a float32 tile: oneDNN where it can (1.1-2x MKL's ``F.linear`` here, unpacked)."""
    if dense.can_prepack(weight) and x.dtype == weight.dtype and torch.backends.mkldnn.is_available():
        return dense.linear(x, weight, None)
    return F.linear(x, weight)


class _Dense:
    """A float weight [rows, in]; on CPU packed once, as the float path's linears are."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        weight = weight.to(dtype)
        self.rows = weight.shape[0]
        self.weight = dense.prepack(weight) if dense.can_prepack(weight) else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not dense.is_packed(self.weight):
            return F.linear(x, self.weight.to(x.dtype))
        if x.dtype == self.weight.dtype:
            return dense.linear(x, self.weight, None, self.rows)
        # activations in another dtype: rare, unpacked per call
        return F.linear(x, dense.unpack(self.weight, self.rows).to(x.dtype))


class _Dequant:
    """Raw blocks, dequantized ``tile_rows`` rows at a time for each matmul."""

    def __init__(self, raw: torch.Tensor, qtype: GGML, in_features: int) -> None:
        self.raw, self.qtype = raw, qtype
        self.tile_rows = max(1, _TILE_ELEMENTS // in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.raw.shape[0]
        if rows <= self.tile_rows:
            return F.linear(x, dequantize(self.raw, self.qtype).to(x.dtype))
        out = x.new_empty(*x.shape[:-1], rows)
        for start in range(0, rows, self.tile_rows):
            tile = dequantize(self.raw[start : start + self.tile_rows], self.qtype).to(x.dtype)
            out[..., start : start + tile.shape[0]] = F.linear(x, tile)
        return out


class _Blocks:
    """Raw blocks multiplied by the C++ kernel (float32); big batches dequantize tiles for the float GEMM.

    ``q8``: small batches round the activations to int8 per 32 values and take integer dot
    products (llama.cpp's arithmetic for these types), 1.4-2x as fast.
    """

    def __init__(self, raw: torch.Tensor, qtype: GGML, in_features: int, kernels, q8: bool = False) -> None:
        self.raw, self.qtype, self.kernels = raw, int(qtype), kernels
        self.tile_rows = max(1, _TILE_ELEMENTS // in_features)
        self.mul_mat = kernels.gguf_mul_mat_q8 if q8 else kernels.gguf_mul_mat
        # The same kernels as torch ops, for a traced step (the Python bindings are not recorded).
        self.mul_mat_op = torch.ops.pagedllm_gguf.mul_mat_q8 if q8 else torch.ops.pagedllm_gguf.mul_mat
        self.tiled_max_rows = kernels.gguf_tiled_max_rows()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tracing = torch._C._get_tracing_state() is not None
        mul_mat = self.mul_mat_op if tracing else self.mul_mat
        if x.dim() == 2 and x.shape[0] <= _MAX_BLOCK_ROWS and x.dtype == torch.float32:
            return mul_mat(x, self.raw, self.qtype)  # decode: no reshapes or casts (~120 calls a token)
        flat = x.reshape(-1, x.shape[-1]).float()
        if flat.shape[0] <= _MAX_BLOCK_ROWS:
            y = mul_mat(flat, self.raw, self.qtype)
        elif flat.shape[0] <= self.tiled_max_rows:
            tiled = torch.ops.pagedllm_gguf.mul_mat_tiled if tracing else self.kernels.gguf_mul_mat_tiled
            y = tiled(flat, self.raw, self.qtype)
        else:
            rows = self.raw.shape[0]
            y = flat.new_empty(flat.shape[0], rows)
            # a tile's product is a temporary [tokens, tile rows] before it is copied into y: bound it too
            tile_rows = min(self.tile_rows, max(64, _TILE_ELEMENTS // flat.shape[0]))
            for start in range(0, rows, tile_rows):
                raw = self.raw[start : start + tile_rows]
                tile = _scratch(_TILE_ELEMENTS)[: raw.shape[0] * flat.shape[1]].view(raw.shape[0], -1)
                self.kernels.gguf_dequantize(raw, self.qtype, tile)
                y[:, start : start + raw.shape[0]] = _float_linear(flat, tile)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class _Int4Pack:
    """4-bit values in torch's CPU int4pack layout; w = (q - 8) * scale + zero per group of 32."""

    GROUP = 32

    def __init__(self, raw: torch.Tensor, qtype: GGML) -> None:
        q, scale, zero = int4_groups(raw, qtype)  # q [rows, in] in 0..15; scale, zero [rows, in / 32]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # [in / 32, rows, 2] as the kernel wants; bfloat16 like its activations
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.GROUP, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class GGUFLinearMethod(LinearMethod):
    """One layer's GGUF tensors: per shard a type and raw blocks until loading ends, then kernels."""

    def __init__(self, method: GGUFMethod, is_embedding: bool = False) -> None:
        self.method = method
        self.is_embedding = is_embedding

    @property
    def supports_decode_graphs(self) -> bool:
        # The C++ kernels are torch ops too. The dequant path's float16 views of raw bytes are
        # not: torch.jit's tracer cannot record ``view(dtype)``.
        return self._cpu_kernels(torch.device("cpu")) is not None  # (the C++ kernels run on CPU only)

    def create_weights(self, layer, in_features, output_sizes, dtype):
        layer.gguf_types, layer.gguf_raw = {}, {}  # shard -> GGML type / raw blocks, until repacked
        # merged layers: type -> [out_features, bytes] buffer the shards of that type are copied into
        # (rows of other types stay untouched, so never resident); no concatenation after loading
        layer.gguf_merged = {}
        layer.gguf_parts = None  # [(num_rows, kernel)] covering the output rows in order
        layer.compute_dtype = dtype
        layer.gguf_device = torch.empty(0).device  # the engine builds the model under torch.device(...)

    def checkpoint_names(self, layer):
        return ["qweight_type", "qweight"]

    def load_weight(self, layer, param_name, shard, tensor):
        where = f"{layer.prefix}.{param_name}" + ("" if shard is None else f" (shard {shard})")
        if param_name == "qweight_type":
            qtype = GGML(int(tensor))
            if qtype not in SUPPORTED_TYPES:
                supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
                raise ValueError(f"{where}: GGUF type {qtype.name} is not supported by quantization method 'gguf' "
                                 f"(supported: {supported}); convert the file, e.g. with llama-quantize")  # fmt: skip
            layer.gguf_types[shard] = qtype
            return
        if shard not in layer.gguf_types:
            raise ValueError(f"{where}: its qweight_type must come before the raw blocks")
        qtype = layer.gguf_types[shard]
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        rows = layer.out_features if shard is None else layer.output_sizes[shard]
        expected = (rows, layer.in_features // block_size * type_size)
        if tuple(tensor.shape) != expected or tensor.dtype != torch.uint8 or layer.in_features % block_size:
            raise ValueError(f"{where}: expected {qtype.name} blocks of shape {expected} (uint8), "
                             f"got {tuple(tensor.shape)} ({tensor.dtype})")  # fmt: skip
        if shard is None:
            layer.gguf_raw[shard] = tensor.to(layer.gguf_device)
            return
        if qtype not in layer.gguf_merged:
            size = (layer.out_features, expected[1])
            layer.gguf_merged[qtype] = torch.empty(size, dtype=torch.uint8, device=layer.gguf_device)
        rows = layer.gguf_merged[qtype].narrow(0, layer.offsets[shard], layer.output_sizes[shard])
        layer.gguf_raw[shard] = rows.copy_(tensor)

    def process_weights_after_loading(self, layer):
        if not self.is_embedding:  # an embedding builds its kernels on first use as an LM head (tied)
            layer.gguf_parts = self._build_parts(layer)
            layer.gguf_raw, layer.gguf_merged = {}, {}
            return
        # A float table's bytes, viewed in its dtype once: a traced decode step cannot record
        # ``view(dtype)`` (torch.jit's tracer), so lookups index this view.
        ((shard, raw),) = layer.gguf_raw.items()
        qtype = layer.gguf_types[shard]
        layer.gguf_float_table = raw.view(FLOAT_TYPES[qtype]) if qtype in FLOAT_TYPES else None

    def _build_parts(self, layer) -> list:
        """One part per run of consecutive shards of one type (rows of one buffer), with its kernel."""
        if None in layer.gguf_raw:
            runs = [(layer.gguf_types[None], layer.gguf_raw[None])]
        else:
            runs = []
            for shard in sorted(layer.gguf_raw):
                qtype = layer.gguf_types[shard]
                if runs and runs[-1][0] == qtype:
                    start = layer.offsets[runs[-1][2]]
                    rows = layer.offsets[shard] + layer.output_sizes[shard] - start
                    runs[-1] = (qtype, layer.gguf_merged[qtype].narrow(0, start, rows), runs[-1][2])
                else:
                    runs.append((qtype, layer.gguf_raw[shard], shard))
        return [(raw.shape[0], self._kernel(layer, qtype, raw)) for qtype, raw, *_ in runs]

    def _kernel(self, layer, qtype: GGML, raw: torch.Tensor):
        if qtype in FLOAT_TYPES:
            return _Dense(raw.view(FLOAT_TYPES[qtype]), layer.compute_dtype)
        kernel = self.method.kernel
        if kernel == "int4pack" and qtype in INT4PACK_TYPES:
            return _Int4Pack(raw, qtype)
        if (kernels := self._cpu_kernels(raw.device)) is not None:
            return _Blocks(raw, qtype, layer.in_features, kernels, q8=kernel == "q8")
        return _Dequant(raw, qtype, layer.in_features)

    def _cpu_kernels(self, device: torch.device):
        """The C++ kernels where they run on ``device``'s tensors: on CPU, unless ``dequant`` is
        forced, with a tool chain to build them. Else None (the torch dequantizer runs)."""
        return load_kernels() if device.type == "cpu" and self.method.kernel != "dequant" else None

    def apply(self, layer, x, bias):
        if layer.gguf_parts is None:
            layer.gguf_parts = self._build_parts(layer)
        parts = layer.gguf_parts
        y = parts[0][1](x) if len(parts) == 1 else torch.cat([kernel(x) for _, kernel in parts], dim=-1)
        return y if bias is None else y + bias

    def embedding(self, layer, token_ids):
        (shard,) = layer.gguf_raw  # an embedding is one tensor
        qtype = layer.gguf_types[shard]
        if qtype in FLOAT_TYPES:
            table = getattr(layer, "gguf_float_table", None)
            table = layer.gguf_raw[shard].view(FLOAT_TYPES[qtype]) if table is None else table
            return table[token_ids.reshape(-1)].to(layer.compute_dtype).reshape(*token_ids.shape, -1)
        rows = layer.gguf_raw[shard][token_ids.reshape(-1)]  # only the looked-up rows are dequantized
        if self._cpu_kernels(rows.device) is not None:
            values = rows.new_empty((rows.shape[0], layer.in_features), dtype=torch.float32)
            torch.ops.pagedllm_gguf.dequantize(rows, int(qtype), values)
        else:
            values = dequantize(rows, qtype)
        return values.to(layer.compute_dtype).reshape(*token_ids.shape, -1)


class GGUFMethod(QuantizationMethod):
    """GGUF files (detected from the tensor types); every linear layer and the embedding stay quantized."""

    name = "gguf"
    kernels = ("blocks", "q8", "int4pack", "dequant")

    def check_device(self, device: torch.device) -> None:
        if self.kernel in ("blocks", "q8", "int4pack") and device.type != "cpu":
            raise ValueError(f"quantization method 'gguf': kernel {self.kernel!r} runs on CPU only, not {device}; "
                             "use quantization_kernel='dequant' or 'auto'")  # fmt: skip

    def get_linear_method(self, prefix: str) -> LinearMethod:
        return GGUFLinearMethod(self)

    def get_embedding_method(self, prefix: str) -> LinearMethod:
        return GGUFLinearMethod(self, is_embedding=True)
