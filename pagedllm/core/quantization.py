"""Quantization methods: how a linear layer's weights are stored, loaded, repacked and multiplied.

A :class:`QuantizationMethod` (a plugin, see ``pagedllm_register_quantization_methods``)
is built once per model from the checkpoint's ``quantization_config`` and hands every
linear layer a :class:`LinearMethod` by the layer's prefix. Layers delegate to it; model
files never branch on a method name.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """Storage and matmul of one linear layer (``y = x @ W.T + b``, W logically ``[out, in]``).

    The layer (:class:`~pagedllm.core.layers.Linear`) owns the bias; everything else is
    the method's. A merged layer (QKV, gate+up) stacks ``layer.output_sizes`` along the
    output dim; checkpoints hold each part separately, so ``load_weight`` gets its shard
    index (``layer.offsets[shard]`` is where its rows start).
    """

    #: ``apply`` / ``embedding`` run only torch ops and branch only on shapes, so a traced
    #: decode step records them (see :mod:`pagedllm.core.graphs`).
    supports_decode_graphs = False

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int], dtype: torch.dtype) -> None:
        """Register the parameters / buffers the checkpoint fills (``layer.register_buffer`` / ``nn.Parameter``).

        Every tensor registered here is expected from the checkpoint for every shard
        (see :meth:`checkpoint_names`).
        """
        raise NotImplementedError

    def checkpoint_names(self, layer: nn.Module) -> list[str]:
        """Names the checkpoint must provide, per shard; default: everything ``create_weights`` registered."""
        return [name for name, _ in layer.named_parameters(recurse=False)] + [
            name for name, _ in layer.named_buffers(recurse=False)
        ]

    def load_weight(self, layer: nn.Module, param_name: str, shard: int | None, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (``<prefix>.<param_name>``) into the layer; ValueError on a bad shape.

        ``shard`` is None for a plain layer, else the index of the merged part.
        """
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack what was loaded into the kernel's layout (called once, after all weights)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``[num_tokens, in] -> [num_tokens, out]`` in ``x.dtype``."""
        raise NotImplementedError

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``silu(gate) * up`` of a merged gate | up layer's output, ``[num_tokens, out / 2]``.

        The default applies the layer, then the fused op; a method whose kernel can apply it
        to each tile of the product as it is computed overrides this.
        """
        from pagedllm.core.layers.fused import silu_and_mul

        return silu_and_mul(self.apply(layer, x, bias))

    def embedding(self, layer: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows ``W[token_ids]`` in the compute dtype (methods used for embeddings only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve an embedding")


class UnquantizedLinearMethod(LinearMethod):
    """A float weight ``[out, in]`` and ``F.linear`` (on CPU, a kernel with the weight packed at load): the default."""

    supports_decode_graphs = True

    def create_weights(self, layer, in_features, output_sizes, dtype):
        layer.weight = nn.Parameter(torch.empty(sum(output_sizes), in_features, dtype=dtype), requires_grad=False)

    def load_weight(self, layer, param_name, shard, tensor):
        target = getattr(layer, param_name)
        rows = target.data if shard is None else target.data.narrow(0, layer.offsets[shard], layer.output_sizes[shard])
        if tensor.shape != rows.shape:
            raise ValueError(f"{layer.prefix}.{param_name}{_shard(shard)}: expected shape {tuple(rows.shape)}, "
                             f"got {tuple(tensor.shape)}")  # fmt: skip
        rows.copy_(tensor)

    def process_weights_after_loading(self, layer):
        """On CPU, pack the weight once for the matmul kernel (see :mod:`pagedllm.core.layers.dense`).

        The packed tensor replaces ``layer.weight``. An embedding table keeps its rows for
        lookups and is packed only if it also serves as the (tied) LM head: on first use.
        """
        from pagedllm.core.layers import dense

        if not hasattr(layer, "num_embeddings") and dense.can_prepack(layer.weight):
            layer.weight = nn.Parameter(dense.prepack(layer.weight), requires_grad=False)

    def apply(self, layer, x, bias):
        from pagedllm.core.layers import dense

        weight = layer.weight
        if hasattr(layer, "num_embeddings"):  # the tied LM head
            if not hasattr(layer, "packed_weight"):
                layer.packed_weight = dense.prepack(weight) if dense.can_prepack(weight) else None
            weight = layer.packed_weight if layer.packed_weight is not None else weight
        return dense.linear(x, weight, bias, layer.out_features) if dense.is_packed(weight) else F.linear(x, weight, bias)

    def apply_silu_and_mul(self, layer, x, bias):
        from pagedllm.core.layers import dense

        if bias is None and dense.can_fuse_silu_and_mul(layer.weight, layer.output_sizes, x):
            return dense.linear_silu_and_mul(x, layer.weight, layer.out_features)
        return super().apply_silu_and_mul(layer, x, bias)

    def embedding(self, layer, token_ids):
        return F.embedding(token_ids, layer.weight)


class QuantizationMethod:
    """A quantization scheme for a whole model; one instance per loaded model.

    Subclasses set ``name`` (the registry name) and, when they have several kernels,
    ``kernels`` (the first is the default the ``quantization_kernel`` option ``auto``
    picks; the chosen one is in ``self.kernel``).
    """

    name: ClassVar[str]
    #: Kernel names the ``quantization_kernel`` option may force; "auto" lets the method choose.
    kernels: ClassVar[tuple[str, ...]] = ()
    kernel: str = "auto"

    @classmethod
    def from_config(cls, quant_config: dict[str, Any], hf_config: Any) -> QuantizationMethod:
        """Build from ``config.json``'s ``quantization_config`` ({} for an on-the-fly method).

        Raises ValueError naming the unsupported key and value.
        """
        return cls()

    def check_device(self, device: torch.device) -> None:
        """ValueError if this method cannot run on ``device``, naming the method, why and what would work."""

    def get_linear_method(self, prefix: str) -> LinearMethod:
        """The LinearMethod of the linear layer at ``prefix`` (Hugging Face module name, e.g.
        ``model.layers.0.self_attn.qkv_proj`` for a merged one, ``lm_head``). Modules the
        checkpoint left in float get :class:`UnquantizedLinearMethod`."""
        raise NotImplementedError

    def get_embedding_method(self, prefix: str) -> LinearMethod:
        """The method of the token embedding at ``prefix``; default: float."""
        return UnquantizedLinearMethod()


def resolve_quantization(source, option: str | None, kernel: str, plugins, device: torch.device) -> QuantizationMethod | None:
    """The model's QuantizationMethod (None: float weights), from the engine options and the checkpoint.

    ``source`` is the :class:`~pagedllm.core.loader.ModelSource` (its ``quantization_config``
    says how the checkpoint is quantized); ``option`` the ``quantization`` engine option:
    None detects, ``"none"`` asks for float weights (only where the source can dequantize,
    i.e. GGUF), a name picks a method (for a float checkpoint: quantize on load).
    """
    quant_config = source.quantization_config
    found = quant_config.get("quant_method") if quant_config else None
    if option == "none":
        if quant_config and not source.can_dequantize:
            raise ValueError(f"engine option quantization='none': this checkpoint is quantized with {found!r} "
                             "and has no float weights; omit the option")  # fmt: skip
        if kernel != "auto":
            raise ValueError(f"engine option quantization_kernel={kernel!r} needs a quantization method, "
                             "but quantization='none'")  # fmt: skip
        return None
    name = option or found
    if name is None:
        if kernel != "auto":
            raise ValueError(f"engine option quantization_kernel={kernel!r}: the model is not quantized")
        return None
    if found is not None and name != found:
        raise ValueError(f"engine option quantization={name!r}, but the checkpoint is quantized with {found!r}; "
                         f"omit the option or pass {found!r}")  # fmt: skip
    cls = plugins.load("quantization", name)
    method = cls.from_config(dict(quant_config or {}), source.hf_config)
    if kernel != "auto":
        if kernel not in cls.kernels:
            raise ValueError(f"engine option quantization_kernel={kernel!r} is not a kernel of quantization method "
                             f"{name!r}; choose one of: auto, {', '.join(cls.kernels) or '(none)'}")  # fmt: skip
        method.kernel = kernel
    method.check_device(device)
    return method


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every quantized layer repack its loaded weights (once, after ``load_weights``)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, LinearMethod):
            method.process_weights_after_loading(module)


def _shard(shard: int | None) -> str:
    return "" if shard is None else f" (shard {shard})"
