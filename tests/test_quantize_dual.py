"""The dual quantizer entry point (reference backend) and its use in the backward (CPU)."""
import pytest
import torch

from megatron_mxfp4 import MXFP4Recipe
from megatron_mxfp4 import backward as bwd
from megatron_mxfp4.numerics.quantize import quantize_reference
from megatron_mxfp4.numerics.streams import Gemm, Operand
from megatron_mxfp4.ops import quantize_mxfp4_dual


def _same(a, b):
    return torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales) and a.shape == b.shape and a.dim == b.dim


def test_dual_reference_is_two_reference_calls():
    x = torch.randn(96, 128, dtype=torch.bfloat16)
    s1, s2 = torch.ones(32), -torch.ones(32)
    row, col = quantize_mxfp4_dual(x, rounding="sr", rht_block=32, signs_row=s1, signs_col=s2, seed=5,
                                   offset_row=1, offset_col=2)
    assert _same(row, quantize_reference(x, -1, "sr", None, 32, s1, 5, 1))
    assert _same(col, quantize_reference(x.t(), -1, "sr", None, 32, s2, 5, 2))
    assert col.shape == (128, 96) and col.data.shape == (128, 48)


def test_dual_rejects_bad_shapes_and_pads_any_size():
    with pytest.raises(ValueError, match="2-d"):
        quantize_mxfp4_dual(torch.randn(64))
    x = torch.randn(96, 100)
    row, col = quantize_mxfp4_dual(x, rounding="sr", rht_block=64, seed=2, offset_row=3, offset_col=4)
    assert row.padded_shape == (96, 128) and col.padded_shape == (100, 128)
    assert _same(col, quantize_reference(x.t(), -1, "sr", None, 64, col.signs, 2, 4))


def test_backward_operands_match_the_per_gemm_quantization():
    recipe = MXFP4Recipe(backend="reference")
    key = bwd.StreamKey(seed=123, layer=2, call=7)
    dy = torch.randn(128, 64)
    qd, qw = bwd.grad_output_operands(dy, recipe, key)
    sd = bwd.gemm_signs(recipe, key, Gemm.DGRAD, dy.device)
    sw = bwd.gemm_signs(recipe, key, Gemm.WGRAD, dy.device)
    assert _same(qd, bwd._quantize(dy, recipe, key, Gemm.DGRAD, Operand.GRAD_OUTPUT, sd))
    assert _same(qw, bwd._quantize(dy.t(), recipe, key, Gemm.WGRAD, Operand.GRAD_OUTPUT, sw))
    w, x = torch.randn(64, 32), torch.randn(128, 32)
    assert torch.equal(bwd.dgrad(dy, w, recipe, key, qdy=qd), bwd.dgrad(dy, w, recipe, key))
    assert torch.equal(bwd.wgrad(dy, x, recipe, key, qdy=qw), bwd.wgrad(dy, x, recipe, key))
    assert bwd.grad_output_operands(dy, MXFP4Recipe(wgrad=False), key) == (None, None)
