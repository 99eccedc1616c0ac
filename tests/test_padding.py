"""Any size (DESIGN §3): the backward zero-pads its reduction dimensions; the forward refuses only dtypes.

The padded backward is compared bit for bit with the backward of the same tensors zero-padded by hand
(aligned sizes, where the existing tests pin the backward to its documented operands): the dither
indices count the padded size, so both draw the same random bits.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_mxfp4 import MXFP4Linear, MXFP4Recipe, mxfp4_linear
from megatron_mxfp4.backward import StreamKey, grad_weight
from megatron_mxfp4.diagnostics import MXFP4Monitor, set_active_monitor
from megatron_mxfp4.numerics import format as fmt
from megatron_mxfp4.numerics.quantize import padded_size

SIZES = (1, 12, 31, 33, 100, 2047)
RECIPES = {"rtn": MXFP4Recipe(rounding="rtn", rht_block=0), "rtn_rht": MXFP4Recipe(rounding="rtn"),
           "sr": MXFP4Recipe(rht_block=0), "sr_rht": MXFP4Recipe()}


def _inputs(t, i, o, seed=0, outliers=False):
    g = torch.Generator().manual_seed(seed)
    x, w, dy = torch.randn(t, i, generator=g), torch.randn(o, i, generator=g) / i**0.5, torch.randn(t, o, generator=g)
    if outliers:  # entries of magnitude 7 set their block's scale to 1; without the 3/4 prescale they clip to 6
        dy[torch.rand(t, o, generator=g) < 0.05] = 7.0
    return x, w, dy


def _grads(x, w, dy, recipe, call=0):
    x, w = (t.detach().clone().requires_grad_(True) for t in (x, w))
    mxfp4_linear(x, w, recipe=recipe, layer_id=5, call_index=call).backward(dy)
    return x.grad, w.grad


def _pad(a, rows, cols):
    return F.pad(a, (0, cols - a.shape[1], 0, rows - a.shape[0]))


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES)
@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("gemm", ["dgrad", "wgrad"])
def test_padded_backward_equals_explicitly_padded(gemm, k, recipe):
    """Reduction size k (output features for dgrad, tokens for wgrad; the other one 16): dX and dW are
    those of the tensors zero-padded by hand, bit for bit (dual dY quantizer, SR and RTN, ± RHT)."""
    t, o = (8, k) if gemm == "dgrad" else (k, 16)
    x, w, dy = _inputs(t, 24, o, seed=k)
    g = recipe.effective_rht_block
    tp, op = padded_size(t, g), padded_size(o, g)
    dx, dw = _grads(x, w, dy, recipe)
    dx_p, dw_p = _grads(_pad(x, tp, 24), _pad(w, op, 24), _pad(dy, tp, op), recipe)
    assert torch.equal(dx, dx_p[:t]) and torch.equal(dw, dw_p[:o])


def test_diagnostics_sample_padded_operands():
    """The sampled statistics of a padded GEMM are those of the explicitly padded one."""
    x, w, dy = _inputs(33, 24, 100)
    records = []
    for args in ((x, w, dy), (_pad(x, 64, 24), _pad(w, 128, 24), _pad(dy, 64, 128))):
        mon = MXFP4Monitor(interval=1)
        set_active_monitor(mon)
        try:
            _grads(*args, MXFP4Recipe())
            records.append(mon.end_step())
        finally:
            set_active_monitor(None)
    for a, b in zip(*records):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a if k != "step"), (a, b)


def _bias_ratio(recipe, n=128):
    """||mean error|| / (rms single-draw error / sqrt(n)) of dX and dW over n calls at 33 tokens, 12 in,
    100 out (both reductions padded). Unbiased: ≈ 1 (a norm over 1,600 / 3,300 entries concentrates: 2 is
    far in the tail); a biased estimator stays near sqrt(n) ≈ 11."""
    x, w, dy = _inputs(33, 12, 100, seed=3, outliers=True)
    exact = (dy.double() @ w.double(), dy.double().t() @ x.double())
    draws = [_grads(x, w, dy, recipe, call) for call in range(n)]
    ratios = []
    for i, ref in enumerate(exact):
        err = torch.stack([d[i].double() for d in draws]) - ref
        ratios.append((err.mean(0).norm() / (err.pow(2).sum((1, 2)).mean().sqrt() / n**0.5)).item())
    return ratios


@pytest.mark.parametrize("rht_block", [0, 64])
def test_padded_sr_backward_is_unbiased(rht_block):
    assert max(_bias_ratio(MXFP4Recipe(rht_block=rht_block))) < 2.0


def test_padded_bias_is_detected_negative_control(monkeypatch):
    """The same statistic flags RTN and SR without the 3/4 prescale (clipping of (6, 8)·2^e)."""
    assert min(_bias_ratio(MXFP4Recipe(rounding="rtn", rht_block=0))) > 5.0
    monkeypatch.setattr(fmt, "SR_PRESCALE", 1.0)
    assert min(_bias_ratio(MXFP4Recipe(rht_block=0))) > 5.0


@pytest.mark.parametrize("tokens", [1, 7, 8])
def test_no_grad_and_eval_forward_at_any_token_count(tokens):
    layer = MXFP4Linear(12, 100)  # neither a multiple of 32
    x = torch.randn(tokens, 12)
    want = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
    layer.eval()
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert torch.equal(y, want)
    y.sum().backward()  # and the backward of that size runs
    assert xg.grad.shape == x.shape and layer.weight.grad.shape == (100, 12)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("recipe", [MXFP4Recipe(), MXFP4Recipe(backward_format="fp8"),
                                    MXFP4Recipe(dgrad=False, wgrad=False)], ids=["mxfp4", "fp8", "off"])
@pytest.mark.parametrize("shape", [(0, 2, 12, 100), (3, 2, 12, 0), (3, 2, 0, 100)], ids=["tokens", "out", "in"])
def test_empty_tokens_and_layers_give_zero_gradients(shape, recipe):
    """0 tokens, 0 output or 0 input features: dX and dW are zeros of the right shapes (db: stock's)."""
    t, b, i, o = shape
    layer = MXFP4Linear(i, o, recipe=recipe)
    x = torch.randn(t, b, i, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()
    assert layer.weight.grad.shape == (o, i) and not layer.weight.grad.any()
    assert torch.equal(layer.bias.grad, torch.full((o,), float(t * b)))
    main_grad = torch.ones(o, i)
    dy, x2d = torch.zeros(t * b, o), torch.zeros(t * b, i)
    assert grad_weight(dy, x2d, recipe, StreamKey(1, 0, 0), accumulate_into=main_grad) is main_grad
    assert torch.equal(main_grad, torch.ones(o, i))


def test_unsupported_dtype_is_refused_at_the_forward_in_one_line():
    layer = MXFP4Linear(12, 100).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    for ctx in (torch.no_grad, torch.enable_grad):
        with ctx(), pytest.raises(TypeError) as e:
            layer(x)
        msg = str(e.value)
        assert "\n" not in msg and "float64" in msg and all(d in msg for d in ("float32", "bfloat16", "float16")), msg
    with pytest.raises(TypeError, match="weight is float64"):
        mxfp4_linear(x.float(), layer.weight)
    assert MXFP4Linear(12, 100, recipe=None).double()(x).dtype == torch.float64  # stock: any dtype
