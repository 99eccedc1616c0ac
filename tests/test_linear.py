"""The MXFP4-backward linear: exact forward, unbiased backward, bit-exact operand layout, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_mxfp4 import MXFP4Linear, MXFP4Recipe, convert_linears, mxfp4_gemm, mxfp4_linear, quantize_mxfp4
from megatron_mxfp4.backward import StreamKey
from megatron_mxfp4.numerics.streams import Gemm, Operand, derive_seed

RTN = MXFP4Recipe(rounding="rtn", rht_block=0)


def _inputs(t=64, i=96, o=128, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, i, generator=g).to(dtype)
    w = (torch.randn(o, i, generator=g) / i**0.5).to(dtype)
    b = torch.randn(o, generator=g).to(dtype)
    dy = torch.randn(t, o, generator=g).to(dtype)
    return x, w, b, dy


def _grads(fn, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_unquantized_and_grads_keep_dtypes(dtype):
    x, w, b, dy = _inputs(dtype=dtype)
    y, dx, dw, db = _grads(lambda x, w, b: mxfp4_linear(x, w, b, MXFP4Recipe()), x, w, b, dy)
    assert torch.equal(y, F.linear(x, w, b))
    assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    assert torch.equal(db, dy.sum(0))  # bias grad from the unquantized dY


def test_backward_off_equals_nn_linear():
    x, w, b, dy = _inputs()
    off = MXFP4Recipe(dgrad=False, wgrad=False)
    got = _grads(lambda x, w, b: mxfp4_linear(x, w, b, off), x, w, b, dy)
    want = _grads(F.linear, x, w, b, dy)
    for g, h in zip(got, want):
        assert torch.allclose(g, h, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dgrad, wgrad", [(True, True), (True, False), (False, True)])
def test_rtn_backward_is_mxfp4_gemm_of_documented_operands(dgrad, wgrad):
    x, w, b, dy = _inputs()
    recipe = MXFP4Recipe(rounding="rtn", rht_block=0, dgrad=dgrad, wgrad=wgrad)
    _, dx, dw, _ = _grads(lambda x, w, b: mxfp4_linear(x, w, b, recipe), x, w, b, dy)
    q = lambda t: quantize_mxfp4(t, dim=-1, rounding="rtn")  # noqa: E731
    want_dx = mxfp4_gemm(q(dy), q(w.t())) if dgrad else dy @ w  # dgrad: reduce over out
    want_dw = mxfp4_gemm(q(dy.t()), q(x.t())) if wgrad else dy.t() @ x  # wgrad: reduce over tokens
    assert torch.equal(dx, want_dx) and torch.equal(dw, want_dw)


def test_sr_rht_backward_reproduces_its_stream():
    """With SR + RHT, the backward is exactly the GEMM of operands drawn from the documented stream."""
    x, w, b, dy = _inputs()
    recipe = MXFP4Recipe()
    _, dx, dw, _ = _grads(lambda x, w, b: mxfp4_linear(x, w, b, recipe, layer_id=3, call_index=7), x, w, b, dy)
    key = StreamKey(derive_seed(recipe.seed, 0), 3, 7)

    def q(t, gemm, op):
        signs = quantize_mxfp4(torch.zeros(1, 64), rht_block=64, seed=key.seed,
                               offset=key.offset(gemm, Operand.GRAD_OUTPUT)).signs  # per_call: dY's offset
        return quantize_mxfp4(t, rounding="sr", rht_block=64, signs=signs, seed=key.seed, offset=key.offset(gemm, op))

    assert torch.equal(dx, mxfp4_gemm(q(dy, Gemm.DGRAD, Operand.GRAD_OUTPUT), q(w.t(), Gemm.DGRAD, Operand.WEIGHT)))
    assert torch.equal(dw, mxfp4_gemm(q(dy.t(), Gemm.WGRAD, Operand.GRAD_OUTPUT), q(x.t(), Gemm.WGRAD, Operand.INPUT)))


def test_backward_is_unbiased_over_calls():
    x, w, b, dy = _inputs(t=64, i=64, o=64, seed=1)
    _, dx_ref, dw_ref, _ = _grads(F.linear, x, w, b, dy)
    layer = MXFP4Linear(64, 64, recipe=MXFP4Recipe())
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    n = 200
    dxs, dws = [], []
    for _ in range(n):
        xx = x.clone().requires_grad_(True)
        layer.weight.grad = None
        layer(xx).backward(dy)
        dxs.append(xx.grad.double())
        dws.append(layer.weight.grad.double())
    for draws, ref in ((torch.stack(dxs), dx_ref.double()), (torch.stack(dws), dw_ref.double())):
        err = draws - ref
        rms_single = err.pow(2).sum((1, 2)).mean().sqrt()
        # Unbiased → ||mean error|| ≈ rms_single / sqrt(n) over 4096 entries; 2x is far out in the tail.
        assert err.mean(0).norm() < 2 * rms_single / n**0.5
        assert not torch.equal(draws[0], draws[1])  # fresh randomness every call


def test_module_is_a_drop_in_for_nn_linear():
    lin = nn.Linear(64, 128)
    m = MXFP4Linear(64, 128)
    assert list(m.state_dict()) == list(lin.state_dict())
    m.load_state_dict(lin.state_dict())
    x = torch.randn(2, 32, 64)
    assert torch.equal(m(x), lin(x))


def test_recipe_none_is_plain_linear():
    m = MXFP4Linear(64, 96, recipe=None)
    x = torch.randn(32, 64, requires_grad=True)
    m(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, m.weight.detach(), m.bias.detach()).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_convert_linears_with_filter_shares_parameters():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 64))
    weights = [model[0].weight, model[2].weight]
    keys = list(model.state_dict())
    convert_linears(model, MXFP4Recipe(), filter=lambda name, m: name != "3")
    assert isinstance(model[0], MXFP4Linear) and isinstance(model[2], MXFP4Linear)
    assert type(model[3]) is nn.Linear
    assert model[0].weight is weights[0] and model[2].weight is weights[1]
    assert list(model.state_dict()) == keys
    assert model[0].layer_id != model[2].layer_id
    model(torch.randn(64, 64)).sum().backward()
    assert model[0].weight.grad is not None


def test_nan_in_gradient_propagates():
    x, w, b, dy = _inputs()
    dy[3, 5] = float("nan")
    _, dx, dw, _ = _grads(lambda x, w, b: mxfp4_linear(x, w, b, MXFP4Recipe()), x, w, b, dy)
    assert torch.isnan(dx[3]).all() and torch.isfinite(dx[:3]).all()
    assert torch.isnan(dw).any()


def test_fp8_forward_close_to_bf16():
    x, w, b, dy = _inputs()
    y = mxfp4_linear(x, w, b, MXFP4Recipe(forward="fp8"))
    ref = F.linear(x, w, b)
    assert 0 < (y - ref).norm() / ref.norm() < 0.05


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="floating-point"):
        mxfp4_linear(torch.randn(32, 64), torch.ones(64, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="meta"):
        mxfp4_linear(torch.randn(32, 64), torch.randn(64, 64, device="meta"))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4_linear(torch.randn(32, 64), torch.randn(64, 32))
    with pytest.raises(ValueError, match="rht_block"):
        MXFP4Recipe(rht_block=16)
    with pytest.raises(ValueError, match="sign_policy"):
        MXFP4Recipe(sign_policy="random")


@pytest.mark.parametrize("policy", ["per_call", "per_layer", "deterministic", "off"])
def test_sign_policies(policy):
    from megatron_mxfp4.backward import gemm_signs
    r = MXFP4Recipe(sign_policy=policy)
    s = [gemm_signs(r, StreamKey(1, 0, call), Gemm.DGRAD, "cpu") for call in (0, 1)]
    if policy == "off":
        assert s == [None, None]
    elif policy == "deterministic":
        assert torch.equal(s[0], torch.ones(64)) and torch.equal(s[1], torch.ones(64))
    elif policy == "per_layer":
        assert torch.equal(s[0], s[1])
    else:
        assert not torch.equal(s[0], s[1])


@pytest.mark.parametrize("recipe", [MXFP4Recipe(), MXFP4Recipe(wgrad=False), RTN])
def test_wgrad_accumulates_into_fp32_main_grad(recipe):
    from megatron_mxfp4.backward import grad_weight

    x, w, b, dy = _inputs()
    key = StreamKey(5, 1, 2)
    main_grad = torch.randn(w.shape)
    expected = main_grad + grad_weight(dy, x, recipe, key)
    out = grad_weight(dy, x, recipe, key, accumulate_into=main_grad)
    assert out is main_grad and torch.allclose(main_grad, expected, rtol=1e-6, atol=1e-6)
