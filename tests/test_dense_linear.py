"""Float linear layers prepacked for oneDNN (pagedllm.core.layers.dense) against F.linear in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.core.layers import Linear, MergedLinear, VocabEmbedding, dense
from pagedllm.core.quantization import process_weights_after_loading


@pytest.fixture(autouse=True)
def _onednn():
    if not dense.can_prepack(torch.zeros(2, 2)):
        pytest.skip("oneDNN is not available in this torch build")


def _reference(x, weight, bias=None):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


@pytest.mark.parametrize("rows", [1, 7, 64, 600])
def test_merged_linear_with_bias_matches_float64(rows):
    torch.manual_seed(rows)
    layer = MergedLinear(96, [64, 32, 32], bias=True, prefix="qkv")
    parts = [torch.randn(n, 96) for n in (64, 32, 32)]
    for shard, part in enumerate(parts):
        layer.load_weight("weight", shard, part)
    bias = torch.randn(128)
    for shard, piece in enumerate(bias.split([64, 32, 32])):
        layer.load_weight("bias", shard, piece)
    process_weights_after_loading(layer)
    assert layer.weight.is_mkldnn and layer.weight.shape == (128, 96)
    x = torch.randn(rows, 160)[:, 32:128]  # a strided view, as attention outputs and splits are
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 128)
    torch.testing.assert_close(got.double(), _reference(x, torch.cat(parts), bias), atol=1e-4, rtol=1e-5)


def test_bfloat16_weights_pack_only_where_the_cpu_has_bf16():
    torch.manual_seed(0)
    weight = torch.randn(48, 64).bfloat16()
    layer = Linear(64, 48, prefix="o_proj")
    layer.weight.data = weight.clone()
    process_weights_after_loading(layer)
    assert layer.weight.is_mkldnn == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    x = torch.randn(5, 64).bfloat16()
    # bf16 inputs, float accumulation: within a few bf16 roundings of the float64 product
    torch.testing.assert_close(layer(x).double(), _reference(x, weight), atol=0.05, rtol=0.02)


def test_tied_embedding_keeps_rows_and_packs_for_logits():
    torch.manual_seed(0)
    table = torch.randn(300, 32)
    emb = VocabEmbedding(300, 32, prefix="model.embed_tokens")
    emb.load_weight("weight", None, table)
    process_weights_after_loading(emb)
    assert not emb.weight.is_mkldnn  # lookups still read rows
    ids = torch.tensor([0, 17, 299])
    assert torch.equal(emb(ids), table[ids])
    hidden = torch.randn(4, 32)
    torch.testing.assert_close(emb.logits(hidden).double(), _reference(hidden, table), atol=1e-4, rtol=1e-5)
    assert emb.packed_weight.is_mkldnn


def test_switch_off_keeps_plain_weights(monkeypatch):
    monkeypatch.setenv(dense.ENV_SWITCH, "0")
    layer = Linear(32, 16, prefix="down_proj")
    layer.load_weight("weight", None, torch.randn(16, 32))
    process_weights_after_loading(layer)
    assert not layer.weight.is_mkldnn
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
