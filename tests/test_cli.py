"""The `pagedllm` command: config files vs flags, plugins listing, generate on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedllm.entrypoints.cli import _engine_options, build_parser
from pagedllm.testing.tiny import make_tiny_model

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", *args], capture_output=True, text=True, env=ENV, timeout=300)


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "launch.yaml"
    config.write_text("max_num_seqs: 4\nblock-size: 32\nenable_prefix_caching: false\n")
    args = build_parser().parse_args(["generate", "hi", "--config", str(config), "--max-num-seqs", "8", "--model", "m"])
    assert _engine_options(args) == {"max_num_seqs": 8, "block_size": 32, "enable_prefix_caching": False, "model": "m"}


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    config = tmp_path / "launch.yaml"
    config.write_text("max_num_seqs: 4\nmax_num_sequences: 8\n")
    result = _run("generate", "hi", "--config", str(config))
    assert result.returncode == 2
    assert "max_num_sequences" in result.stderr


def test_plugins_lists_builtins_and_the_third_party_plugin():
    result = _run("plugins")
    assert result.returncode == 0, result.stderr
    for text in ("LlamaForCausalLM", "Qwen2ForCausalLM", "torch", "top_p", "quantization", "tool_parser"):
        assert text in result.stdout
    if "pagedllm-example-plugin" not in result.stdout:
        pytest.skip("the example plugin package is not installed")
    assert "no_repeat_ngram" in result.stdout


def test_generate_on_a_tiny_model(tmp_path):
    path = make_tiny_model(tmp_path / "tiny", "llama")
    result = _run("generate", "The quick brown fox", "--model", str(path), "--raw", "--max-tokens", "5",
                  "--num-kv-blocks", "64", "--max-model-len", "128")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_bad_model_path_is_a_clear_error(tmp_path):
    result = _run("generate", "hi", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "missing" in result.stderr


def test_chat_reads_turns_from_stdin(tmp_path):
    path = make_tiny_model(tmp_path / "tiny", "llama")
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "chat", "--model", str(path), "--max-tokens", "4",
         "--num-kv-blocks", "64", "--max-model-len", "256"],
        input="Hello there\nAnd again\n/exit\n", capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") >= 2  # each of the two turns ends its answer with a newline
