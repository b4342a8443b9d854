"""Decode graphs (pagedllm.core.graphs): a traced decode step gives the eager step's results bit for bit,
and whatever cannot be traced runs eagerly."""

from __future__ import annotations

import gc
import logging
import os
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.testing.tiny import make_tiny_model

DATA = Path(__file__).parent / "data"
GGUF_MIXED = DATA / "gguf" / "tiny-llama-mixed.gguf"  # every tensor in another GGUF type
# Checkpoints written by GPTQModel (GPTQ and its AWQ method) and llm-compressor (tests/data/quant), with
# the kernel each runs on CPU: aten's int4pack / int8pack matmuls, _int_mm, _scaled_mm.
QUANTIZED = {"gptq-4bit-g128-actorder-sym": "auto", "gptq-8bit-gchannel-sym": "auto", "awq-gemm-4bit-g128": "auto",
             "ct-w4a16": "auto", "ct-w8a8-int8": "auto", "ct-fp8-dynamic": "scaled_mm"}  # fmt: skip
# Batches of 1, 3 and 10 requests with prompts of different lengths. Each batch's prompts are
# prefilled in one step, and then every step decodes the whole batch: 1 and 3 go through
# graphs, 10 is over the default max_graph_batch_size of 8.
BATCHES = [[list(range(10, 31))], [list(range(10 + i, 30 + 7 * i)) for i in range(3)],
           [list(range(5 + i, 20 + 3 * i)) for i in range(10)]]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-graphs"), "llama")


def _llm(model, **options) -> LLM:
    return LLM(str(model), block_size=4, num_kv_blocks=256, max_model_len=128, **options)


def _generate(llm: LLM) -> list:
    """Per batch, per request: the greedy tokens and every position's top-3 logprobs."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3)
    results = []
    for prompts in BATCHES:
        for out in llm.generate(prompts, params, use_tqdm=False):
            sample = out.outputs[0]
            results.append((sample.token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in sample.logprobs]))
    return results


@pytest.mark.parametrize(
    "model, options",
    [("float", {}), ("float", {"kv_cache_dtype": "fp8"}), ("gguf", {}), ("gguf", {"quantization_kernel": "q8"})],
    ids=["float32", "fp8-cache", "gguf-blocks", "gguf-q8"],
)
def test_graph_steps_give_the_eager_steps_results(model_dir, model, options):
    path = model_dir if model == "float" else GGUF_MIXED
    graphs, eager = _llm(path, **options), _llm(path, enforce_eager=True, **options)
    got = _generate(graphs)
    assert got == _generate(eager)  # tokens and logprobs, exactly
    traced = graphs.engine.runner.graphs
    assert traced.disabled is None
    assert sorted(traced.graphs) == [1, 3]  # the batch of 10 ran eagerly
    assert eager.engine.runner.graphs is None


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_graph_steps_of_integer_and_fp8_checkpoints_give_the_eager_steps_results(name):
    path, kernel = DATA / "quant" / name, QUANTIZED[name]
    graphs = _llm(path, quantization_kernel=kernel)
    assert _generate(graphs) == _generate(_llm(path, quantization_kernel=kernel, enforce_eager=True))
    assert graphs.engine.runner.graphs.disabled is None and sorted(graphs.engine.runner.graphs.graphs) == [1, 3]


def test_larger_graph_batches_can_be_allowed(model_dir):
    llm = _llm(model_dir, max_graph_batch_size=16)
    assert _generate(llm) == _generate(_llm(model_dir, enforce_eager=True))
    assert sorted(llm.engine.runner.graphs.graphs) == [1, 3, 10]


def test_max_graph_batch_size_is_checked(model_dir):
    with pytest.raises(ValueError, match="max_graph_batch_size must be >= 0"):
        _llm(model_dir, max_graph_batch_size=-1)
    assert _llm(model_dir, max_graph_batch_size=0).engine.runner.graphs is None


def test_parts_that_do_not_declare_support_run_eagerly(model_dir):
    llm = _llm(model_dir, attention_backend="torch")  # its decode loops read Python lists
    eager = _llm(model_dir, attention_backend="torch", enforce_eager=True)
    assert _generate(llm) == _generate(eager)
    graphs = llm.engine.runner.graphs
    assert graphs.disabled == "not declared by attention backend TorchAttentionBackend" and not graphs.graphs

    gguf_dequant = _llm(GGUF_MIXED, quantization_kernel="dequant").engine.runner.graphs
    assert gguf_dequant.disabled == "not declared by linear method GGUFLinearMethod"


def test_a_step_that_cannot_be_traced_runs_eagerly(model_dir, monkeypatch, caplog):
    expected = _generate(_llm(model_dir, enforce_eager=True))
    llm = _llm(model_dir)

    def failing_trace(*args, **kwargs):
        raise RuntimeError("an op the tracer cannot record")

    monkeypatch.setattr(torch._C, "_create_graph_by_tracing", failing_trace)
    with caplog.at_level(logging.WARNING, logger="pagedllm.core.graphs"):
        assert _generate(llm) == expected
    graphs = llm.engine.runner.graphs
    assert "an op the tracer cannot record" in graphs.disabled and not graphs.graphs
    assert sum("decode graphs off" in r.getMessage() for r in caplog.records) == 1  # said once, not every step


def test_an_engines_graphs_do_not_outlive_it(model_dir):
    # torch.jit.trace keeps every traced function, with its constants (weights, KV cache), for
    # the life of the process: the graphs live in a compilation unit of their own.
    llm = _llm(model_dir)
    _generate(llm)
    assert llm.engine.runner.graphs.graphs
    kv_cache, weight = weakref.ref(llm.engine.runner.kv_caches), weakref.ref(next(llm.engine.model.parameters()))
    del llm
    gc.collect()
    assert kv_cache() is None and weight() is None


def test_the_engines_first_step_runs_eagerly(model_dir):
    # A one-token prompt makes the very first step a decode. The fp8 cache's scales come from
    # the first batch a layer sees: traced, that computation would be replayed every step.
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    llms = [_llm(model_dir, kv_cache_dtype="fp8"), _llm(model_dir, kv_cache_dtype="fp8", enforce_eager=True)]
    outputs = []
    for llm in llms:
        out = llm.generate([[7]], params, use_tqdm=False)[0].outputs[0]
        outputs.append((out.token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in out.logprobs]))
    assert outputs[0] == outputs[1]
    assert list(llms[0].engine.runner.graphs.graphs) == [1]  # the steps after the first


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_gguf_float_embedding_is_traced(dtype):
    from pagedllm.core.graphs import trace
    from pagedllm.core.layers import VocabEmbedding
    from pagedllm.plugins.quantization import gguf as gguf_method

    qtype = next(t for t, d in gguf_method.FLOAT_TYPES.items() if d == dtype)
    table = torch.randn(50, 64).to(dtype)
    layer = VocabEmbedding(50, 64, gguf_method.GGUFMethod(), "token_embd")
    layer.load_weight("qweight_type", None, torch.tensor(int(qtype)))
    layer.load_weight("qweight", None, table.view(torch.uint8))  # the file's bytes: [rows, 64 x element size]
    layer.quant_method.process_weights_after_loading(layer)
    graph, rows = trace(layer, (torch.tensor([3, 7, 49]),))
    assert torch.equal(rows, table[[3, 7, 49]].float())
    assert torch.equal(graph(torch.tensor([1, 0, 12])), table[[1, 0, 12]].float())  # the lookup, not a constant
