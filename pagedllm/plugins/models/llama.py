"""The Llama family (Llama, Mistral, Qwen2, SmolLM): decoder-only, RoPE, GQA, SwiGLU."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.core.attention import AttentionMetadata
from pagedllm.core.layers import Attention, Linear, MergedLinear, RMSNorm, RotaryEmbedding, VocabEmbedding
from pagedllm.core.layers.attention import KV_SCALE_NAMES
from pagedllm.core.layers.linear import find_layer
from pagedllm.core.model_spec import KVCacheSpec, ModelContext


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary_emb: RotaryEmbedding, prefix: str = "") -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = _head_dim(config)
        # Qwen2 has q/k/v biases; Llama's are optional (attention_bias).
        qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q_size, kv_size = self.q_size, self.kv_size
        quant = ctx.quant_method
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], qkv_bias, quant, f"{prefix}.qkv_proj")
        self.o_proj = Linear(q_size, config.hidden_size, getattr(config, "attention_bias", False), quant, f"{prefix}.o_proj")
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5, ctx.attention_backend)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        # Queries and keys (the leading heads of each row) rotate in place, in one go.
        self.rotary_emb.rotate_(positions, qkv, self.num_heads + self.num_kv_heads)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = self.attn(q, k, v, batch)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext, prefix: str = "") -> None:
        super().__init__()
        bias, quant = getattr(config, "mlp_bias", False), ctx.quant_method
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2, bias, quant, f"{prefix}.gate_up_proj")
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias, quant, f"{prefix}.down_proj")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported by the Llama plugin (only silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))  # silu(gate) * up: [num_tokens, intermediate]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary_emb: RotaryEmbedding, prefix: str = "") -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, ctx, rotary_emb, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, ctx, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, batch: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the next layer's
        norm adds them, fused (the first layer gets residual None)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, ctx: ModelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, ctx.quant_method, "model.embed_tokens")
        rotary_emb = RotaryEmbedding(config, _head_dim(config), ctx.max_model_len)  # shared by all layers
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ctx, rotary_emb, f"model.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, batch)
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    supports_decode_graphs = True  # the forward branches on shapes only (pagedllm.core.graphs)
    # Hugging Face name fragment -> (our merged parameter, shard index).
    stacked_params = {
        ".q_proj.": (".qkv_proj.", 0),
        ".k_proj.": (".qkv_proj.", 1),
        ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, config, ctx: ModelContext) -> None:
        super().__init__()
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and window < ctx.max_model_len:
            raise ValueError(
                f"this model uses sliding-window attention (window {window}); pass max_model_len <= {window} "
                "(sliding-window attention is not implemented yet)"
            )
        self.config = config
        self.model = LlamaModel(config, ctx)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, quant_method=ctx.quant_method, prefix="lm_head"
        )

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec(c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, _head_dim(c))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens.logits if self.lm_head is None else self.lm_head
        return head(hidden).float()  # [n, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Linear layers take their tensors (float or quantized) through ``load_weight``; the rest are copied."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name or (self.tie_word_embeddings and hf_name.startswith("lm_head.")):
                continue
            name, shard = hf_name, None
            for hf_part, (ours, index) in self.stacked_params.items():
                if hf_part in name:
                    name, shard = name.replace(hf_part, ours), index
                    break
            prefix, _, leaf = name.rpartition(".")
            if leaf in KV_SCALE_NAMES and isinstance(attn := modules.get(f"{prefix}.attn"), Attention):
                attn.load_kv_scale(leaf, tensor)  # self_attn.k_scale / v_scale of an fp8-KV checkpoint
                continue
            if (found := find_layer(modules, name)) is not None:
                layer, param_name = found
                layer.load_weight(param_name, shard, tensor)
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name} has no place in the model")
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
            param.data.copy_(tensor)
            loaded.add(name)
        expected = {p for p in params if not isinstance(modules[p.rsplit(".", 1)[0]], Linear)}
        missing = sorted(expected - loaded) + [w for m in modules.values() if isinstance(m, Linear) for w in m.missing_weights()]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
