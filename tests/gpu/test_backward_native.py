"""A linear layer's backward in one native call (`backward.fused_backward`, csrc/mxfp4_backward_hopper.cu)
against the same GEMMs issued from Python one call at a time (`grad_output_operands` + `grad_input` +
`grad_weight`): bit for bit over recipes (rounding, g, sign policy), input dtypes, odd token counts, both GEMM
scalings, FP32 main_grad accumulation and device-side offsets; the path is really taken where it applies
(counted) and not taken where it does not (diagnostics sampling, rows the kernels cannot read in place).
Run on an H100/H200: `python -m pytest -q tests/gpu/test_backward_native.py`."""
import pytest
import torch

from megatron_mxfp4 import MXFP4Recipe, mxfp4_linear
from megatron_mxfp4 import backward as bwd

DEV = "cuda"


def _native_or_skip():
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("needs an sm_90 GPU (H100/H200)")
    from megatron_mxfp4.ops import hopper_backward as hb

    reason = hb.native_reason()
    if reason is not None:
        pytest.fail(f"the extension on this GPU machine should run the one-call backward: {reason}")
    from megatron_mxfp4.ops.dispatch import selected_backend

    probe = torch.zeros(1, device=DEV, dtype=torch.bfloat16)
    picked = {k: selected_backend(k, "auto", probe) for k in ("quantize", "dual", "gemm")}
    if picked != {"quantize": "cuda", "dual": "cuda", "gemm": "hopper"}:
        pytest.fail(f"the dispatcher does not pick the backends the one-call backward replaces: {picked}")
    return hb


@pytest.fixture
def calls(monkeypatch):
    """Counts one-call backwards; `calls.off()` makes every backward take the Python steps."""
    hb = _native_or_skip()
    real = hb.backward_gemms

    class Calls:
        n = 0

        def off(self):
            monkeypatch.setattr(bwd, "fused_backward", lambda *a, **k: None)

    c = Calls()

    def counted(*a, **k):
        c.n += 1
        return real(*a, **k)

    monkeypatch.setattr(hb, "backward_gemms", counted)
    return c


def _grads(x, w, b, dy, recipe, call):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = mxfp4_linear(x, w, b, recipe, layer_id=3, call_index=call)
    y.backward(dy)
    return [x.grad, w.grad] + ([] if b is None else [b.grad])


RECIPES = {
    "default": MXFP4Recipe(),
    "rtn_g0": MXFP4Recipe(rounding="rtn", rht_block=0),
    "sr_g32_per_layer": MXFP4Recipe(rht_block=32, sign_policy="per_layer"),
    "sr_g128_det": MXFP4Recipe(rht_block=128, sign_policy="deterministic"),
    "sr_g256": MXFP4Recipe(rht_block=256),
    "rtn_g64": MXFP4Recipe(rounding="rtn"),
}
DTYPES = {"bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16),
          "fp32": (torch.float32, torch.float32), "bf16_x_fp32_w": (torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("t, n_in, n_out", [(256, 256, 512), (300, 136, 200), (1, 64, 32), (2049, 512, 1024)])
def test_one_call_equals_the_python_steps(calls, recipe, dtypes, t, n_in, n_out):
    xd, wd = DTYPES[dtypes]
    g = torch.Generator(device=DEV).manual_seed(t + n_in + n_out)
    x = torch.randn(t, n_in, generator=g, device=DEV).to(xd)
    w = (torch.randn(n_out, n_in, generator=g, device=DEV) * 0.05).to(wd)
    b = torch.randn(n_out, generator=g, device=DEV).to(wd)
    dy = torch.randn(t, n_out, generator=g, device=DEV).to(xd)
    x[:, ::37] *= 50.0
    r = RECIPES[recipe]
    fused = _grads(x, w, b, dy, r, call=5)
    assert calls.n == 1
    calls.off()
    steps = _grads(x, w, b, dy, r, call=5)
    assert calls.n == 1
    for got, want in zip(fused, steps):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("scaling", ["rows", "tiles"])
def test_one_call_equals_the_python_steps_in_both_scalings(calls, scaling, monkeypatch):
    from megatron_mxfp4.ops import hopper_gemm as hg

    monkeypatch.setattr(hg, "SCALING", scaling)
    g = torch.Generator(device=DEV).manual_seed(9)
    x = torch.randn(512, 384, generator=g, device=DEV).to(torch.bfloat16)
    w = (torch.randn(640, 384, generator=g, device=DEV) * 0.05).to(torch.bfloat16)
    dy = torch.randn(512, 640, generator=g, device=DEV).to(torch.bfloat16)
    fused = _grads(x, w, None, dy, MXFP4Recipe(), call=2)
    calls.off()
    assert all(torch.equal(a, b) for a, b in zip(fused, _grads(x, w, None, dy, MXFP4Recipe(), call=2)))


@pytest.mark.parametrize("aligned", [True, False])
def test_main_grad_accumulation_and_device_offsets(calls, aligned):
    """wgrad added into an FP32 main_grad (Megatron's gradient-accumulation fusion), offsets read on the device
    (`recipe.cuda_graphs`): `fused_backward` = `grad_input` + `grad_weight(accumulate_into=...)`."""
    g = torch.Generator(device=DEV).manual_seed(4)
    x = torch.randn(384, 256, generator=g, device=DEV).to(torch.bfloat16)
    w = (torch.randn(512, 256, generator=g, device=DEV) * 0.05).to(torch.bfloat16)
    dy = torch.randn(384, 512, generator=g, device=DEV).to(torch.bfloat16)
    recipe = MXFP4Recipe(cuda_graphs=True)
    dc = bwd.DeviceCalls(layer=7, start=11, device=DEV)
    key = bwd.StreamKey(seed=5, layer=7, call=11, offsets=dc.next_offsets())
    flat = torch.randn(512 * 256 + (0 if aligned else 1), device=DEV)
    flat_want = flat.clone()
    main = flat[flat.numel() - 512 * 256:].view(512, 256)
    want_main = flat_want[flat.numel() - 512 * 256:].view(512, 256)  # the same alignment
    dx, got = bwd.fused_backward(dy, x, w, recipe, key, torch.bfloat16, torch.bfloat16, accumulate_into=main)
    assert calls.n == 1 and got.data_ptr() == main.data_ptr()
    qd, qw = bwd.grad_output_operands(dy, recipe, key)
    want_dx = bwd.grad_input(dy, w, recipe, key, qdy=qd, out_dtype=torch.bfloat16)
    bwd.grad_weight(dy, x, recipe, key, qdy=qw, accumulate_into=want_main)
    assert torch.equal(dx, want_dx) and torch.equal(main, want_main)


def test_not_taken_where_it_does_not_apply(calls):
    """Rows the kernels cannot read in place (bf16 rows of 100 elements: not whole 16-byte chunks) and a
    recipe with only one MXFP4 GEMM take the Python steps, with the gradients they always gave."""
    g = torch.Generator(device=DEV).manual_seed(8)
    x = torch.randn(64, 100, generator=g, device=DEV).to(torch.bfloat16)
    w = (torch.randn(96, 100, generator=g, device=DEV) * 0.05).to(torch.bfloat16)
    dy = torch.randn(64, 96, generator=g, device=DEV).to(torch.bfloat16)
    _grads(x, w, None, dy, MXFP4Recipe(), call=1)
    _grads(x[:, :96].contiguous(), w[:, :96].contiguous(), None, dy, MXFP4Recipe(wgrad=False), call=1)
    assert calls.n == 0
