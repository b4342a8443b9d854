"""GPTQ (v1 'gptq' format) and AWQ (GEMM) fixtures, quantized on CPU by GPTQModel 7.6.0.

Venv: python3 -m venv /tmp/venvs/gptq; pip install -c C torch==2.13.0 gptqmodel==7.6.0 optimum
(C = a constraints file holding `torch==2.13.0`). Usage (after make_base.py BASE):
    PYTHONPATH=. python make_gptq_awq.py BASE OUT
External truth written to each reference.safetensors:
- weights: gptqmodel's own TorchLinear.dequantize_weight() (GPTQ; the checkpoint loaded by GPTQModel.load with
  BACKEND.TORCH, i.e. after gptqmodel's v1 -> v2 zero conversion) or gptqmodel's awq `dequantize_gemm` on the
  checkpoint tensors (AWQ), both transposed to [out, in];
- logits / greedy tokens: transformers AutoModelForCausalLM.from_pretrained(OUT) with gptqmodel's kernels.
"""

import glob
import os
import sys
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel 7.6 crashes on <= 2 cores otherwise

import torch  # noqa: E402
from common import (  # noqa: E402
    calibration_ids,
    cmdline,
    copy_tokenizer,
    dense_model,
    prune,
    reference_outputs,
    save_reference,
    write_provenance,
)

# name -> (base, bits, group_size, desc_act, sym)
GPTQ = {
    "gptq-4bit-g128-actorder-sym": ("base-l", 4, 128, True, True),
    "gptq-4bit-g32-actorder-asym": ("base-s", 4, 32, True, False),
    "gptq-4bit-gchannel-sym": ("base-s", 4, -1, False, True),
    "gptq-8bit-gchannel-sym": ("base-s", 8, -1, False, True),
    "gptq-8bit-g32-asym": ("base-s", 8, 32, False, False),
}


def quant_linears(model):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {n.removeprefix("model.model.").removeprefix("model."): m for n, m in model.named_modules()
            if isinstance(m, BaseQuantLinear)}


def make_gptq(base_root, out_root, name, base, bits, group, desc_act, sym):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, out = os.path.join(base_root, base), os.path.join(out_root, name)
    vocab = AutoModelForCausalLM.from_pretrained(base).config.vocab_size
    calib = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calibration_ids(vocab)]
    if not os.path.exists(os.path.join(out, "model.safetensors")):  # delete OUT/name to quantize again
        t = time.time()
        config = QuantizeConfig(bits=bits, group_size=group, desc_act=desc_act, sym=sym,
                                act_group_aware=group > 0)  # GAR needs groups; gptqmodel refuses it with -1
        model = GPTQModel.load(base, config, device="cpu")
        model.quantize(calib, batch_size=1)
        model.save(out)
        print(f"== {name}: quantized in {time.time() - t:.1f}s")
        del model
    # TorchLinear refuses float32; its dequant is (q - z) * scale in the fp16 of the stored scales.
    loaded = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    weights = {}
    for mod_name, lin in quant_linears(loaded.model).items():
        lin.eval()
        with torch.no_grad():
            weights["model." + mod_name.split("model.", 1)[-1] if not mod_name.startswith("model.") else mod_name] = \
                lin.dequantize_weight().t().contiguous()
    kind = {type(m).__name__ for m in quant_linears(loaded.model).values()}
    del loaded
    tok = AutoTokenizer.from_pretrained(base)
    outputs = reference_outputs(dense_model(out, weights), tok)
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    kernels = {type(m).__name__ for m in hf.modules() if type(m).__name__ != "Linear" and "Linear" in type(m).__name__}
    native = reference_outputs(hf, tok)
    outputs.update(logits_native=native["logits"], greedy_ids_native=native["greedy_ids"])
    return out, base, weights, outputs, kind, kernels


def make_awq(base_root, out_root):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "awq-gemm-4bit-g128"
    base, out = os.path.join(base_root, "base-l"), os.path.join(out_root, name)
    vocab = AutoModelForCausalLM.from_pretrained(base).config.vocab_size
    calib = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calibration_ids(vocab)]
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        t = time.time()
        model = GPTQModel.load(base, QuantizeConfig(bits=4, group_size=128, sym=False, method="awq", format="gemm"), device="cpu")
        model.quantize(calib, batch_size=1, backend=BACKEND.AWQ_TORCH)
        model.save(out)
        print(f"== {name}: quantized in {time.time() - t:.1f}s")
        del model
    sd = {}
    for f in glob.glob(os.path.join(out, "*.safetensors")):
        sd.update(load_file(f))
    weights = {}
    for key in sd:
        if key.endswith(".qweight"):
            p = key.removesuffix("qweight")
            w = dequantize_gemm(sd[p + "qweight"], sd[p + "qzeros"], sd[p + "scales"], 4, 128)
            weights[p[:-1]] = w.t().contiguous()
    tok = AutoTokenizer.from_pretrained(base)
    outputs = reference_outputs(dense_model(out, weights), tok)
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    kernels = {type(m).__name__ for m in hf.modules() if "Awq" in type(m).__name__ or "AWQ" in type(m).__name__}
    native = reference_outputs(hf, tok)
    outputs.update(logits_native=native["logits"], greedy_ids_native=native["greedy_ids"])
    return out, base, weights, outputs, {"dequantize_gemm"}, kernels | {f"dtype {hf.dtype}"}


def main(base_root, out_root, only=None):
    from transformers import set_seed

    for name, spec in GPTQ.items():
        if only and name not in only:
            continue
        set_seed(0)
        out, base, weights, outputs, deq, kernels = make_gptq(base_root, out_root, name, *spec)
        finish(out, base, weights, outputs, "GPTQModel (GPTQModel.load + quantize + save, CPU)", deq, kernels, spec)
    if not only or "awq-gemm-4bit-g128" in only:
        set_seed(0)
        out, base, weights, outputs, deq, kernels = make_awq(base_root, out_root)
        finish(out, base, weights, outputs, "GPTQModel AWQ method (format gemm, backend AWQ_TORCH, CPU)", deq, kernels,
               ("base-l", 4, 128, False, False))


def finish(out, base, weights, outputs, tool, deq, kernels, spec):
    copy_tokenizer(base, out)
    dtypes = {str(w.dtype) for w in weights.values()}
    save_reference(out, weights, outputs, {"weights_by": ",".join(sorted(deq)), "logits_by": ",".join(sorted(kernels))})
    prune(out)
    write_provenance(out, tool, ["gptqmodel", "torch", "transformers", "optimum"], cmdline(), [
        f"- spec (base, bits, group_size, desc_act, sym): {spec}",
        f"- reference weights from: {', '.join(sorted(deq))} ({', '.join(sorted(dtypes))}); logits_native from transformers "
        f"with: {', '.join(sorted(kernels))}",
        "- calibration: 16 x 64 random token ids (torch.Generator seed 0)",
    ])
    print(f"   wrote {out}: {len(weights)} weights ({dtypes}), logits {tuple(outputs['logits'].shape)}, "
          f"greedy {outputs['greedy_ids'].tolist()}, kernels {kernels}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or None)
