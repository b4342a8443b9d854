"""End to end on the real embedded model: SmolLM2-135M-Instruct (Q4_1 GGUF).

pagedllm runs it natively (weights stay Q4_1 in memory; the default ``blocks`` kernel
computes with float32 activations); transformers loading the same GGUF file, which it
dequantizes to float32, is the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.loader import embedded_model_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In machine learning, overfitting means",
    "The largest planet in our solar system is",
    "A haiku about autumn:",
]
MAX_NEW = 32


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_batched_tokens=64, max_model_len=1024, kv_cache_memory="256MiB")


@pytest.fixture(scope="module")
def hf_reference(llm):
    import transformers

    path = embedded_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    results = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        results.append(out[0, len(ids):].tolist())
    return results


def test_greedy_matches_transformers_on_the_same_gguf(llm, hf_reference):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    for output, expected in zip(outputs, hf_reference):
        assert output.outputs[0].token_ids == expected, output.prompt
    # Text is the detokenized token ids.
    tokenizer = llm.get_tokenizer()
    assert outputs[0].outputs[0].text == tokenizer.decode(outputs[0].outputs[0].token_ids, skip_special_tokens=True)


def test_chat_answers_and_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                   SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.engine.eos_token_ids


def test_cli_generate_uses_the_embedded_model():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "generate", "What is the capital of France?", "--max-tokens", "24"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
