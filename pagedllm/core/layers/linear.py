"""Linear layers (plain, merged, vocabulary embedding); a LinearMethod stores and multiplies the weight."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.core.quantization import (
    LinearMethod,
    QuantizationMethod,
    UnquantizedLinearMethod,
)


class Linear(nn.Module):
    """y = x @ W.T + b, W logically [out_features, in_features] as in Hugging Face.

    How W is stored and multiplied is the LinearMethod's (``quant_method``); the layer
    keeps the float bias and knows which checkpoint tensors it still waits for.
    ``prefix`` is the layer's Hugging Face module name, by which the quantization method
    chooses (``lm_head`` and modules a checkpoint skipped stay float).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_method: QuantizationMethod | None = None, prefix: str = "") -> None:  # fmt: skip
        self._init(in_features, [out_features], bias, quant_method.get_linear_method(prefix) if quant_method else None, prefix)

    def _init(self, in_features: int, output_sizes: list[int], bias: bool, method: LinearMethod | None, prefix: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(output_sizes)
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.prefix = prefix
        self.quant_method = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, self.output_sizes, torch.get_default_dtype())
        self.checkpoint_names = self.quant_method.checkpoint_names(self)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        if bias:
            self.checkpoint_names.append("bias")
        self._loaded: set[tuple[str, int | None]] = set()

    @property
    def shards(self) -> list[int | None]:
        return [None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def load_weight(self, param_name: str, shard: int | None, tensor: torch.Tensor) -> None:
        """Load checkpoint tensor ``<prefix>.<param_name>`` (of merged part ``shard``)."""
        if shard not in self.shards:
            raise ValueError(f"{self.prefix}.{param_name}: shard {shard} does not exist (shards {self.shards})")
        if param_name not in self.checkpoint_names:
            raise ValueError(f"checkpoint tensor {self.prefix}.{param_name} has no place in the model "
                             f"(the layer takes {', '.join(self.checkpoint_names)})")  # fmt: skip
        if param_name == "bias":
            UnquantizedLinearMethod().load_weight(self, "bias", shard, tensor)
        else:
            self.quant_method.load_weight(self, param_name, shard, tensor)
        self._loaded.add((param_name, shard))

    def missing_weights(self) -> list[str]:
        """Checkpoint tensors not loaded yet, as ``prefix.name`` (``#shard`` for merged parts)."""
        return [f"{self.prefix}.{name}" + ("" if shard is None else f"#{shard}")
                for name in self.checkpoint_names for shard in self.shards
                if (name, shard) not in self._loaded]  # fmt: skip


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (QKV, gate+up).

    Checkpoints keep them separate; ``load_weight`` takes each with its shard index.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 quant_method: QuantizationMethod | None = None, prefix: str = "") -> None:  # fmt: skip
        self._init(in_features, output_sizes, bias, quant_method.get_linear_method(prefix) if quant_method else None, prefix)

    @property
    def shards(self) -> list[int | None]:
        return list(range(len(self.output_sizes)))

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split(self.output_sizes, dim=-1))

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of this (gate | up) layer's output, ``[num_tokens, out / 2]``:
        fused into the product where the method's kernel can."""
        return self.quant_method.apply_silu_and_mul(self, x, self.bias)


class VocabEmbedding(Linear):
    """Token embedding [vocab_size, hidden_size]; also the LM head when the embedding is tied.

    Its method may keep the table quantized: lookups dequantize only the gathered rows.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, quant_method: QuantizationMethod | None = None,
                 prefix: str = "") -> None:  # fmt: skip
        method = quant_method.get_embedding_method(prefix) if quant_method else None
        self._init(embedding_dim, [num_embeddings], False, method, prefix)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.quant_method.embedding(self, token_ids)  # [num_tokens, embedding_dim]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ W.T: the tied LM head."""
        return self.quant_method.apply(self, hidden, None)  # [num_tokens, num_embeddings]


def find_layer(modules: dict[str, nn.Module], name: str) -> tuple[Linear, str] | None:
    """The Linear that checkpoint tensor ``name`` belongs to and the tensor's name inside it.

    The longest module prefix wins, so names with dots after the layer
    (``...down_proj.weight.absmax``) resolve too.
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = modules.get(".".join(parts[:i]))
        if isinstance(module, Linear):
            return module, ".".join(parts[i:])
        if module is not None:
            return None
    return None
