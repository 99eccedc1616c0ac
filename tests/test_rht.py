"""Blockwise random Hadamard transform: orthogonality and exact cancellation in products."""
import pytest
import torch

from megatron_mxfp4.numerics.rht import (
    RHT_BLOCKS, apply_rht, draw_signs, fwht, hadamard_matrix, hadamard_scale, invert_rht,
)


@pytest.mark.parametrize("g", RHT_BLOCKS)
def test_hadamard_is_orthogonal(g):
    h = hadamard_matrix(g, dtype=torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(g, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.t())


@pytest.mark.parametrize("g", RHT_BLOCKS)
def test_fwht_equals_dense_sylvester(g):
    x = torch.randn(5, 2 * g, dtype=torch.float64)
    dense = (x.reshape(5, 2, g) @ hadamard_matrix(g, dtype=torch.float64).t()).reshape(5, 2 * g)
    assert torch.allclose(fwht(x, g) / g**0.5, dense, atol=1e-12)


@pytest.mark.parametrize("g", RHT_BLOCKS)
def test_rht_cancels_in_products(g):
    gen = torch.Generator().manual_seed(g)
    a = torch.randn(48, 4 * g, generator=gen)
    b = torch.randn(40, 4 * g, generator=gen)
    a[:, 3] *= 100.0  # an outlier column
    s = draw_signs(g, seed=9, offset=g)
    ra, rb = apply_rht(a, s), apply_rht(b, s)
    exact = a.double() @ b.double().t()
    rel = (ra.double() @ rb.double().t() - exact).norm() / exact.norm()
    assert rel <= 1e-6
    # Norm preserved per block (orthogonal transform).
    assert torch.allclose(ra.norm(dim=1), a.norm(dim=1), rtol=1e-5)
    # Different signs: still cancels only when both operands share them.
    other = draw_signs(g, seed=9, offset=g + 1)
    assert not torch.equal(s, other)
    mixed = (apply_rht(a, s).double() @ apply_rht(b, other).double().t() - exact).norm() / exact.norm()
    assert mixed > 0.1


def test_rht_spreads_outliers():
    x = torch.zeros(1, 64)
    x[0, 5] = 64.0
    y = apply_rht(x, draw_signs(64, 1, 1))
    assert torch.allclose(y.abs(), torch.full_like(y, 8.0))


def test_scale_is_float32_rounded_once():
    assert hadamard_scale(64) == 0.125 and hadamard_scale(256) == 0.0625
    assert hadamard_scale(32) == torch.tensor(32**-0.5, dtype=torch.float32).item()


def test_rht_rejects_indivisible_dims():
    with pytest.raises(ValueError, match="does not divide"):
        apply_rht(torch.randn(2, 96), torch.ones(64))


@pytest.mark.parametrize("g", RHT_BLOCKS)
def test_invert_rht_round_trips(g):
    x = torch.randn(3, 2 * g)
    s = draw_signs(g, 2, 3)
    assert ((invert_rht(apply_rht(x, s), s) - x).norm() / x.norm()) <= 1e-6
