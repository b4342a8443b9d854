"""Step 1 of the quantization fixtures: the float tiny Llamas every quantizer starts from.

Runs in the engine's own environment (it uses ``pagedllm.testing.tiny``), writes
``OUT/base-s`` (hidden 64, intermediate 128: every in_features is a multiple of 32 and 64)
and ``OUT/base-l`` (hidden 128, intermediate 256: multiples of 128, for group-128 formats).
Both: 2 layers, 4 heads, 2 KV heads, vocab 512, tied embeddings (no separate lm_head keeps
the committed checkpoints small), weights N(0, 0.15) so greedy choices are not knife-edge.

Usage: python make_base.py OUT
"""

import sys
from pathlib import Path

from pagedllm.testing.tiny import make_tiny_model

SIZES = {"base-s": dict(hidden_size=64, intermediate_size=128), "base-l": dict(hidden_size=128, intermediate_size=256)}


def main(out: Path) -> None:
    for name, sizes in SIZES.items():
        make_tiny_model(out / name, "llama", seed=0, tie_word_embeddings=True, **sizes)
        print("wrote", out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
