"""compressed-tensors (llm-compressor) and bitsandbytes (transformers) fixtures, made on CPU.

Venv: python3 -m venv /tmp/venvs/llmc; pip install -c C torch==2.13.0; pip install -c C llmcompressor==0.14.0.1
compressed-tensors transformers safetensors gguf accelerate; pip install -c C bitsandbytes==0.50.2
(C = a constraints file holding `torch==2.13.0`). Usage (after make_base.py BASE):
    PYTHONPATH=. python make_ct_bnb.py BASE OUT [names...]
External truth written to each reference.safetensors:
- compressed-tensors: weights and logits from transformers' CompressedTensorsConfig(run_compressed=False), i.e.
  compressed-tensors' own decompression to dense Linear layers (weights: bfloat16, logits: float32), which still
  run the scheme's dynamic per-token input-activation fake quantization (FP8 / INT8 W8A8) in forward;
- bitsandbytes: weights from bitsandbytes.functional.dequantize_4bit (4-bit) or int8_vectorwise_dequant(weight, SCB)
  (8-bit) of the reloaded checkpoint; `logits` from transformers' float32 Llama holding those weights, `logits_native` from the
  reloaded bitsandbytes model (bnb's own CPU kernels).
"""

import os
import sys
import time

import torch
from common import (
    calibration_ids,
    cmdline,
    copy_tokenizer,
    dense_model,
    prune,
    reference_outputs,
    save_reference,
    write_provenance,
)

# name -> (base, llm-compressor preset scheme, modifier)
CT = {
    "ct-fp8-dynamic": ("base-s", "FP8_DYNAMIC", "QuantizationModifier"),
    "ct-w8a8-int8": ("base-s", "W8A8", "GPTQModifier"),
    "ct-w4a16": ("base-l", "W4A16", "GPTQModifier"),
}
# name -> (BitsAndBytesConfig kwargs, model dtype)
BNB = {
    "bnb-nf4-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16), torch.bfloat16),
    "bnb-fp4": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32), torch.float32),
    "bnb-int8": (dict(load_in_8bit=True), torch.float32),
}


def make_ct(base_root, out_root, name, base, scheme, modifier):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import quantization as mods
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    base, out = os.path.join(base_root, base), os.path.join(out_root, name)
    if not os.path.exists(os.path.join(out, "model.safetensors")):  # delete OUT/name to quantize again
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)  # scales inherit bf16, as usual
        ids = calibration_ids(model.config.vocab_size)
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        t = time.time()
        oneshot(model=model, recipe=getattr(mods, modifier)(targets="Linear", scheme=scheme, ignore=["lm_head"]),
                dataset=ds, num_calibration_samples=len(ids), max_seq_length=ids.shape[1])
        model.save_pretrained(out, save_compressed=True)
        print(f"== {name}: {modifier} {scheme} in {time.time() - t:.1f}s")
    # Weights as compressed-tensors decompresses them in the checkpoint's dtype (bfloat16: half the bytes of
    # float32 to commit); logits from a float32 decompression.
    dense16 = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False),
                                                   dtype=torch.bfloat16).eval()
    weights = {n: m.weight.data.clone() for n, m in dense16.named_modules()
               if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None}
    dense = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False),
                                                 dtype=torch.float32).eval()
    lin = dense.model.layers[0].mlp.down_proj
    x = torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (lin(x) - torch.nn.functional.linear(x, lin.weight)).abs().max().item()
    note = f"decompressed down_proj(x) - x @ W.T = {diff:.3g} (nonzero: forward fake-quantizes activations)"
    print("  ", note)
    outputs = reference_outputs(dense, AutoTokenizer.from_pretrained(base))
    return out, base, weights, outputs, note


def make_bnb(base_root, out_root, name, kwargs, dtype):
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    base, out = os.path.join(base_root, "base-s"), os.path.join(out_root, name)
    t = time.time()
    m = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(**kwargs), device_map="cpu",
                                             dtype=dtype)
    m.save_pretrained(out)
    print(f"== {name}: {time.time() - t:.1f}s")
    m2 = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    weights = {}
    for n, mod in m2.named_modules():
        w = getattr(mod, "weight", None)
        if hasattr(w, "quant_state"):
            weights[n] = F.dequantize_4bit(w.data, w.quant_state)
        elif getattr(w, "SCB", None) is not None:
            weights[n] = F.int8_vectorwise_dequant(w.data, w.SCB)
    tok = AutoTokenizer.from_pretrained(base)
    outputs = reference_outputs(dense_model(out, weights), tok)
    native = reference_outputs(m2, tok)
    outputs.update(logits_native=native["logits"], greedy_ids_native=native["greedy_ids"])
    return out, base, weights, outputs, f"BitsAndBytesConfig({kwargs}), model dtype {dtype}; kernels: " + ", ".join(
        sorted({type(x).__name__ for x in m2.modules() if "bit" in type(x).__name__.lower()}))


def main(base_root, out_root, only=None):
    for name, spec in CT.items():
        if not only or name in only:
            out, base, weights, outputs, note = make_ct(base_root, out_root, name, *spec)
            finish(out, base, weights, outputs, f"llm-compressor oneshot {spec[2]}(scheme={spec[1]}, ignore=[lm_head])",
                   ["llmcompressor", "compressed-tensors", "torch", "transformers"],
                   ["- model dtype bfloat16 before quantization; calibration: 16 x 64 random token ids (seed 0)",
                    "- weights: transformers CompressedTensorsConfig(run_compressed=False) with dtype bfloat16 (the"
                    " checkpoint's); logits: the same with dtype float32", f"- {note}"])
    for name, spec in BNB.items():
        if not only or name in only:
            out, base, weights, outputs, note = make_bnb(base_root, out_root, name, *spec)
            finish(out, base, weights, outputs, "transformers BitsAndBytesConfig quantize-on-load + save_pretrained",
                   ["bitsandbytes", "torch", "transformers", "accelerate"], [f"- {note}"])


def finish(out, base, weights, outputs, tool, packages, notes):
    copy_tokenizer(base, out)
    save_reference(out, weights, outputs, {"tool": tool})
    prune(out)
    dtypes = sorted({str(w.dtype) for w in weights.values()})
    write_provenance(out, tool, packages, cmdline(), notes + [f"- reference weight dtype: {', '.join(dtypes)}"])
    print(f"   wrote {out}: {len(weights)} weights {dtypes}, greedy {outputs['greedy_ids'].tolist()}"
          + (f" native {outputs['greedy_ids_native'].tolist()}" if "greedy_ids_native" in outputs else ""))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or None)
