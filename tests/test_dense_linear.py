"""Float linear layers packed at load (pagedllm.core.layers.dense: the panel kernel, oneDNN) against F.linear in float64."""

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
    assert dense.is_packed(layer.weight)
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
    assert dense.is_packed(emb.packed_weight)


def test_switch_off_keeps_plain_weights(monkeypatch):
    monkeypatch.setenv(dense.ENV_SWITCH, "0")
    layer = Linear(32, 16, prefix="down_proj")
    layer.load_weight("weight", None, torch.randn(16, 32))
    process_weights_after_loading(layer)
    assert not dense.is_packed(layer.weight)
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def _panel_ops():
    ops = dense._panel_ops()
    if ops is None:
        pytest.skip("the panel kernel is not built here (no C++ tool chain)")
    return ops


@pytest.mark.parametrize("out_features", [1, 47, 100, 193])
@pytest.mark.parametrize("in_features", [1, 3, 517, 1100])
def test_panel_kernel_matches_float64_on_ragged_shapes(out_features, in_features):
    """Output counts that are not a whole number of panels, inputs longer than one k chunk."""
    _panel_ops()
    torch.manual_seed(out_features * 7919 + in_features)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    packed = dense.prepack(weight)
    assert packed.dim() == 3 and not packed.is_mkldnn
    assert torch.equal(dense.unpack(packed, out_features), weight)
    for rows in (1, 5, 9, 17, 200, 401):  # partial micro-blocks; several row blocks past 192 rows
        x = torch.randn(rows, in_features + 3)[:, 2 : 2 + in_features]  # strided rows
        got = dense.linear(x, packed, bias, out_features)
        assert got.shape == (rows, out_features)
        torch.testing.assert_close(got.double(), _reference(x, weight, bias), atol=2e-5 * in_features**0.5, rtol=1e-5)


def test_panel_kernel_row_results_do_not_depend_on_the_batch_or_threads():
    """Each output is one in-order chain over the inputs: a row gets the same bits alone, in any batch, on any thread count."""
    _panel_ops()
    torch.manual_seed(0)
    weight = torch.randn(150, 1300)
    packed = dense.prepack(weight)
    x = torch.randn(300, 1300)
    batched = dense.linear(x, packed, None, 150)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = dense.linear(x, packed, None, 150)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, single_thread)
    for row in (0, 7, 8, 191, 192, 299):
        for size in (1, 3, 64):
            chunk = x[row : row + size]
            assert torch.equal(dense.linear(chunk, packed, None, 150)[0], batched[row])


def test_panel_kernel_takes_leading_dims_and_refuses_bad_operands():
    ops = _panel_ops()
    torch.manual_seed(0)
    weight = torch.randn(20, 12)
    packed = dense.prepack(weight)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(dense.linear(x, packed, None, 20).double(), _reference(x, weight), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out_features"):
        dense.linear(x, packed, None)
    with pytest.raises(RuntimeError, match="features"):
        ops.linear(torch.randn(2, 13), packed, None, 20)
    with pytest.raises(RuntimeError, match="panels"):
        ops.linear(torch.randn(2, 12), packed, None, 200)


def test_panel_switch_packs_float32_for_onednn(monkeypatch):
    monkeypatch.setenv(dense.PANEL_SWITCH, "0")
    layer = Linear(32, 16, prefix="down_proj")
    weight = torch.randn(16, 32)
    layer.load_weight("weight", None, weight)
    process_weights_after_loading(layer)
    assert layer.weight.is_mkldnn
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x).double(), _reference(x, weight), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("intermediate", [96, 40])  # whole panels (fused in the product), and not (separate ops)
@pytest.mark.parametrize("rows", [1, 5, 64, 401])
@pytest.mark.parametrize("in_features", [64, 1100])  # 1100: two chunks of the panel kernel's in_features loop
def test_gate_up_silu_and_mul_matches_the_separate_ops(intermediate, rows, in_features):
    from pagedllm.core.layers.fused import silu_and_mul

    torch.manual_seed(rows + intermediate)
    layer = MergedLinear(in_features, [intermediate] * 2, prefix="mlp.gate_up_proj")
    gate, up = torch.randn(intermediate, in_features) / 8, torch.randn(intermediate, in_features) / 8
    layer.load_weight("weight", 0, gate)
    layer.load_weight("weight", 1, up)
    process_weights_after_loading(layer)
    x = torch.randn(rows, in_features)
    got = layer.silu_and_mul(x)
    assert got.shape == (rows, intermediate)
    assert torch.equal(got, silu_and_mul(layer(x)))  # bit for bit: same tiles, same epilogue arithmetic
    g, u = _reference(x, gate), _reference(x, up)
    torch.testing.assert_close(got.double(), F.silu(g) * u, atol=1e-4, rtol=1e-4)
    fused = dense.can_fuse_silu_and_mul(layer.weight, layer.output_sizes, x)
    width = layer.weight.shape[2] if layer.weight.dim() == 3 else None
    assert fused == (width is not None and intermediate % width == 0)


def test_fused_silu_and_mul_rejects_halves_that_are_not_whole_panels():
    if not dense.can_prepack(torch.zeros(2, 2)) or dense._panel_ops() is None:
        pytest.skip("no panel kernel")
    width = torch.ops.pagedllm_dense.panel_width()
    packed = dense.prepack(torch.randn(2 * width + 2, 8))
    with pytest.raises(RuntimeError, match="whole panels"):
        dense.linear_silu_and_mul(torch.randn(3, 8), packed, 2 * width + 2)
