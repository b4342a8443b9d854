"""Helpers shared by the fixture generators (run inside the producers' venvs, not by tests)."""

import datetime
import json
import os
import platform
import shutil
import sys
from importlib.metadata import version

PROMPT = "The quick brown fox jumps over the lazy dog."
NEW_TOKENS = 8


def calibration_ids(vocab_size, n=16, seq=64, seed=0):
    """Random token ids as calibration data (the model is random anyway; nothing is downloaded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seq), generator=g)


def reference_outputs(model, tokenizer):
    """Reference logits of PROMPT (all positions, float32) and greedy continuation by transformers."""
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return {"prompt_ids": ids[0].to(torch.int64), "logits": logits.contiguous(),
            "greedy_ids": gen[0, ids.shape[1]:].to(torch.int64)}


def dense_model(ckpt_dir, weights):
    """transformers' float32 Llama with the checkpoint's float tensors and the external decoder's weights.

    Its logits are the decoded checkpoint run without any kernel rounding: the reference our
    float (dequantize) path must match tightly, and our fast kernels within their rounding.
    """
    import glob

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = model.state_dict()
    for f in glob.glob(os.path.join(ckpt_dir, "*.safetensors")):
        for key, tensor in load_file(f).items():
            if key in state and key.rsplit(".", 1)[0] not in weights:
                state[key].copy_(tensor.float())
    for module, weight in weights.items():
        state[module + ".weight"].copy_(weight.float())
    model.tie_weights()
    return model


def save_reference(out, weights, outputs, meta):
    """reference.safetensors: '<module>.weight' = external dequantized [out, in] weight, plus outputs."""
    from safetensors.torch import save_file

    tensors = {f"{k}.weight": v.contiguous() for k, v in weights.items()}
    tensors.update(outputs)
    save_file(tensors, os.path.join(out, "reference.safetensors"), metadata={k: str(v) for k, v in meta.items()})


def write_provenance(out, tool, packages, command, notes):
    lines = [f"# {os.path.basename(out)}", "",
             f"- tool: {tool}",
             "- versions: " + ", ".join(f"{p} {version(p)}" for p in packages),
             f"- python {platform.python_version()}, {platform.machine()}, date {datetime.date.today().isoformat()}",
             f"- command (in tests/data/quant/make_fixtures, BASE from make_base.py): `{command}`",
             "- base model: `make_base.py` (tiny random Llama, vocab 512, 2 layers, tied embeddings)",
             "- reference.safetensors: `<module>.weight` = the external decoder's dequantized weight of each quantized"
             " linear ([out, in], in the dtype the decoder returns); `prompt_ids` = tokens of " + json.dumps(PROMPT)
             + "; `logits` [prompt, vocab] and `greedy_ids` (" + str(NEW_TOKENS) + " tokens): transformers in float32"
             " on the decoded checkpoint (the dequantized weights in a plain Llama, or the tool's own dense"
             " decompression: see below); `logits_native` / `greedy_ids_native` (where present): transformers"
             " running the checkpoint through the tool's own kernels",
             ""] + [f"{n}" for n in notes]
    with open(os.path.join(out, "PROVENANCE.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def copy_tokenizer(base, out):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(base, name)):
            shutil.copy(os.path.join(base, name), out)


def prune(out, keep=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", "generation_config.json", "reference.safetensors", "PROVENANCE.md",
                     "quantize_config.json")):
    """Drop logs and extra files the tools write (quant_log.csv, recipe.yaml, ...)."""
    for name in os.listdir(out):
        if name not in keep:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def cmdline():
    return "python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
