"""Weight paths side by side on the embedded SmolLM2-135M: decode speed, batched throughput, memory.

Each path runs in its own process (so resident memory is its own), one after the other:

| path | how |
| --- | --- |
| float32 | the GGUF dequantized at load (`quantization="none"`) |
| bfloat16 | the same, `dtype="bfloat16"` |
| int8 | the model requantized to Q8_0 by gguf-py (a temporary GGUF), run natively (kernel `blocks`) |
| int4 | the shipped Q4_1 GGUF run natively: the default (kernel `blocks`, float32 activations) |
| int4 int4pack | the same through torch's `_weight_int4pack_mm_for_cpu` (bfloat16 activations) |

Measured per path: single-stream decode tokens/s (one request; 1 / the median time of its decode steps),
batched output tokens/s (NUM_BATCH requests at once, prefill included), resident memory
(VmRSS after the runs, median of the rounds; "model" = RSS after building the engine minus RSS before it, once
torch, transformers and the tokenizer are loaded), and the load time. Greedy, EOS ignored.

    python benchmarks/quant_bench.py                    # all paths (several minutes)
    python benchmarks/quant_bench.py --paths float32 int4 --decode-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = {
    "float32": {"quantization": "none"},
    "bfloat16": {"quantization": "none", "dtype": "bfloat16"},
    "int8": {},  # model: the Q8_0 file
    "int4": {},
    "int4 int4pack": {"quantization_kernel": "int4pack"},
}


def rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def write_q8_0(src: Path, dst: Path) -> Path:
    """`src` GGUF with every quantized 2-D tensor requantized to Q8_0 by gguf-py (metadata copied)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if len(tensor.shape) >= 2 and tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def worker(spec: dict) -> dict:
    """Run one path in this process; returns its measurements."""
    import torch

    from pagedllm import LLM, SamplingParams
    from pagedllm.core.loader import load_model_source

    load_model_source(spec["model"]).load_tokenizer()  # imports and tokenizer cache: not the weights' memory
    rss_before, _ = rss_mib()
    start = time.perf_counter()
    threads = {"num_threads": spec["threads"]} if spec["threads"] else {}
    llm = LLM(spec["model"], max_model_len=1024, kv_cache_memory="64MiB", **threads, **spec["options"])
    load_seconds = time.perf_counter() - start
    rss_loaded, _ = rss_mib()
    engine = llm.engine
    rng = random.Random(0)
    vocab = engine.vocab_size

    # single stream: the median time of the steps after the prefill step (robust to a busy machine)
    params = SamplingParams(temperature=0.0, max_tokens=spec["decode_tokens"], ignore_eos=True)
    engine.add_request("single", [rng.randrange(100, vocab - 100) for _ in range(32)], params)
    engine.step()
    step_seconds = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        step_seconds.append(time.perf_counter() - start)
    decode_tps = 1 / statistics.median(step_seconds)

    prompts = [[rng.randrange(100, vocab - 100) for _ in range(64)] for _ in range(spec["num_batch"])]
    params = SamplingParams(temperature=0.0, max_tokens=spec["batch_tokens"], ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    batch_tps = spec["num_batch"] * spec["batch_tokens"] / (time.perf_counter() - start)
    rss_end, hwm = rss_mib()
    method = engine.quant_method
    return {
        "kernel": "-" if method is None else method.kernel, "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "load_s": load_seconds, "decode_tps": decode_tps,
        "batch_tps": batch_tps, "rss_mib": rss_end, "hwm_mib": hwm, "model_mib": rss_loaded - rss_before,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens generated by the single stream")
    parser.add_argument("--num-batch", type=int, default=32, help="requests in the batched run")
    parser.add_argument("--batch-tokens", type=int, default=64, help="output tokens per batched request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds over all paths; the best speed of each is kept")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from pagedllm.core.loader import embedded_model_path

    embedded = embedded_model_path()
    results: dict[str, dict] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        models = {path: embedded for path in args.paths}
        if "int8" in models:
            models["int8"] = write_q8_0(embedded, Path(tmp) / "SmolLM2-135M-Instruct.Q8_0.gguf")
        for _ in range(args.repeat):  # round-robin, so a busy spell of the machine hits every path alike
            for path in args.paths:
                spec = {"model": str(models[path]), "options": PATHS[path], "decode_tokens": args.decode_tokens,
                        "num_batch": args.num_batch, "batch_tokens": args.batch_tokens, "threads": args.threads}  # fmt: skip
                env = dict(os.environ, HF_HUB_OFFLINE="1")
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                     text=True, env=env, check=False)  # fmt: skip
                if out.returncode != 0:
                    sys.exit(f"{path} failed:\n{out.stderr[-3000:]}")
                run = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{path}: {run}", file=sys.stderr)
                best = results.setdefault(path, run | {"rss_runs": []})
                best["rss_runs"].append(run["rss_mib"])
                for key in ("decode_tps", "batch_tps"):
                    best[key] = max(best[key], run[key])
    for r in results.values():  # resident memory moves by ~30 MiB from run to run: the median of the rounds
        r["rss_mib"] = statistics.median(r["rss_runs"])

    base = results.get("float32")
    header = (f"{'path':<14} {'kernel':<9} {'dtype':<9} {'decode tok/s':>12} {'x fp32':>7} {'batch tok/s':>12} "
              f"{'x fp32':>7} {'RSS MiB':>8} {'x fp32':>7} {'model MiB':>10} {'load s':>7}")  # fmt: skip
    print(header)
    for path, r in results.items():

        def ratio(key: str, r: dict = r) -> str:
            return f"{r[key] / base[key]:.2f}" if base else "-"

        print(f"{path:<14} {r['kernel']:<9} {r['dtype']:<9} {r['decode_tps']:>12.1f} {ratio('decode_tps'):>7} "
              f"{r['batch_tps']:>12.1f} {ratio('batch_tps'):>7} {r['rss_mib']:>8.0f} {ratio('rss_mib'):>7} "
              f"{r['model_mib']:>10.0f} {r['load_s']:>7.1f}")  # fmt: skip
    print(f"single stream: {args.decode_tokens} tokens after a 32-token prompt; batched: {args.num_batch} requests x "
          f"64-token prompts x {args.batch_tokens} output tokens; threads {next(iter(results.values()))['threads']}; "
          f"speeds: best of {args.repeat} rounds, RSS: median; "
          f"machine load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
