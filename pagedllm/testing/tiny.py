"""Tiny random Hugging Face checkpoints (with a real byte-level BPE tokenizer) for fast tests."""

from __future__ import annotations

from pathlib import Path

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the key and value cache in fixed-size blocks.",
    "Continuous batching lets requests join and leave every step.",
    "Héllo wörld, naïve café, crème brûlée. 你好，世界。こんにちは 🙂🚀",
    "def add(a, b):\n    return a + b\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. {\"key\": [\"value\", 42, true]}",
]
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_VOCAB = 400


def make_tokenizer():
    """A deterministic byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=None, chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str = "llama", **overrides):
    """A 2-layer, hidden-64 config of the given family (llama, mistral, qwen2)."""
    import transformers

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    if arch == "llama":
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        cls = transformers.MistralConfig
        common["sliding_window"] = None
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
        common["tie_word_embeddings"] = True
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    common.update(overrides)
    return cls(**common)


def make_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny model + tokenizer to ``path``; returns the directory."""
    import torch
    import transformers

    path = Path(path)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Larger-than-default weights make the random model's distributions less flat,
        # so greedy choices are robust to float rounding.
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
            elif "bias" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
