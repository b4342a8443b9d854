#!/usr/bin/env python3
"""Make the GGUF test fixtures in this directory (run once; the outputs are committed).

A tiny random Llama (hidden 256, intermediate 256, 2 layers, 4 heads, 2 KV heads, a 512-token
byte-level BPE tokenizer) is written as GGUF files by the tools that define the format:

- ``tiny-llama-mixed.gguf``: every tensor in another type, quantized by llama.cpp's own
  ``ggml_quantize_chunk`` (from llama-cpp-python's libggml) and written with gguf-py's
  GGUFWriter, llama.cpp's q/k row permutation applied. Covers Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
  Q4_K, Q5_K, Q6_K, F16, BF16, F32, including three types inside one merged q/k/v layer.
- ``tiny-llama.Q4_K_M.gguf``: llama.cpp's ``llama_model_quantize`` (LLAMA_FTYPE_MOSTLY_Q4_K_M)
  of an F32 file of the same model, exactly as ``llama-quantize`` writes it.
- ``tiny-llama.Q4_0.gguf``: the same with LLAMA_FTYPE_MOSTLY_Q4_0 (embedding / output Q4_0 / Q6_K).
- ``reference.json``: llama.cpp's logits (its C API, all positions) for ``PROMPT`` on
  each file, the tensor types, and the tool versions.

Needs: torch, transformers, tokenizers, gguf==0.19.0, llama-cpp-python==0.3.36.
Usage: python tests/data/gguf/make_fixtures.py
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
PROMPT = [1, 45, 300, 7, 99, 250, 3, 511]  # token ids: the tests feed the same ones
CONFIG = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
          "tie_word_embeddings": False}  # fmt: skip
MIXED_TYPES = {
    "token_embd.weight": "Q4_K", "output.weight": "Q6_K",
    "blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "Q5_0",
    "blk.0.attn_output.weight": "Q5_1", "blk.0.ffn_gate.weight": "Q8_0", "blk.0.ffn_up.weight": "Q4_K",
    "blk.0.ffn_down.weight": "Q5_K",
    "blk.1.attn_q.weight": "Q6_K", "blk.1.attn_k.weight": "Q6_K", "blk.1.attn_v.weight": "Q6_K",
    "blk.1.attn_output.weight": "F16", "blk.1.ffn_gate.weight": "BF16", "blk.1.ffn_up.weight": "BF16",
    "blk.1.ffn_down.weight": "F32",
}  # fmt: skip
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip


def tiny_model():
    """(state dict as float32 numpy, tokenizer) of a random tiny Llama; seeded."""
    import torch
    import transformers

    from pagedllm.testing.tiny import make_tokenizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, bos_token_id=0, eos_token_id=1))
    with torch.no_grad():  # larger than default weights: less flat logits, robust greedy choices
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.1)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}, make_tokenizer()


def ggml_quantize(array: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk) on a float32 [rows, cols] array: raw rows as uint8."""
    import gguf
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = array.shape
    src = np.ascontiguousarray(array, dtype=np.float32)
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    assert written == out.nbytes, (type_name, written, out.nbytes)
    return out


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: Hugging Face rotate-half rows -> GGML's interleaved rope rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, state: dict, tokenizer, types: dict[str, str] | None) -> Path:
    """A llama GGUF with tokenizer metadata; 2-D tensors in `types[name]` (None: all F32)."""
    import gguf

    c = CONFIG
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(c["vocab_size"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_file_type(0)
    vocab = tokenizer.get_vocab()
    inverse = {i: s for s, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([inverse.get(i, f"[PAD{i}]") for i in range(c["vocab_size"])])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in inverse
                       else gguf.TokenType.UNUSED for i in range(c["vocab_size"])])  # fmt: skip
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name: str, array: np.ndarray) -> None:
        type_name = (types or {}).get(name, "F32")
        if array.ndim == 1 or type_name == "F32":
            w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        else:
            w.add_tensor(name, ggml_quantize(array, type_name), raw_dtype=gguf.GGMLQuantizationType[type_name])

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    heads = {"self_attn.q_proj": c["num_attention_heads"], "self_attn.k_proj": c["num_key_value_heads"]}
    for i in range(c["num_hidden_layers"]):
        for hf, name in HF_TO_GGUF.items():
            array = state[f"model.layers.{i}.{hf}.weight"]
            add(f"blk.{i}.{name}.weight", permute(array, heads[hf]) if hf in heads else array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def llama_cpp_logits(path: Path) -> list[list[float]]:
    """llama.cpp's logits at every position of PROMPT (its C API: llama_cpp.Llama.eval crashes in 0.3.36 here)."""
    import llama_cpp as L

    L.llama_backend_init()
    model_params = L.llama_model_default_params()
    model_params.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(path).encode(), model_params)
    context_params = L.llama_context_default_params()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = 64
    context_params.n_threads = context_params.n_threads_batch = 2
    ctx = L.llama_init_from_model(model, context_params)
    batch = L.llama_batch_init(len(PROMPT), 0, 1)
    batch.n_tokens = len(PROMPT)
    for i, token in enumerate(PROMPT):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
        batch.seq_id[i][0] = 0
    assert L.llama_decode(ctx, batch) == 0
    vocab = CONFIG["vocab_size"]
    logits = [np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)).copy() for i in range(len(PROMPT))]
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return np.asarray(logits, dtype=np.float32).round(5).tolist()


def main() -> None:
    import gguf

    state, tokenizer = tiny_model()
    files = {"tiny-llama-mixed.gguf": write_gguf(HERE / "tiny-llama-mixed.gguf", state, tokenizer, MIXED_TYPES)}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_gguf(Path(tmp) / "tiny-llama-F32.gguf", state, tokenizer, None)
        for ftype in ("Q4_K_M", "Q4_0"):
            name = f"tiny-llama.{ftype}.gguf"
            files[name] = llama_cpp_quantize(f32, HERE / name, ftype)
    versions = {p: importlib.metadata.version(p) for p in ("llama_cpp_python", "gguf", "torch", "transformers")}
    reference = {"prompt_token_ids": PROMPT, "versions": versions, "files": {}}
    for name, path in files.items():
        reader = gguf.GGUFReader(str(path))
        reference["files"][name] = {
            "tensor_types": {t.name: t.tensor_type.name for t in reader.tensors},
            "llama_cpp_logits": llama_cpp_logits(path),
        }
        print(name, path.stat().st_size, sorted({t.tensor_type.name for t in reader.tensors}))
    (HERE / "reference.json").write_text(json.dumps(reference) + "\n")


if __name__ == "__main__":
    main()
