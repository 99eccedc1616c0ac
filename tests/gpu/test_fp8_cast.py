"""The fused FP8 cast (ops/fp8_cast.py) against the reference `numerics.fp8.quantize_fp8`, bit for bit."""
import pytest
import torch

from megatron_mxfp4.numerics.fp8 import quantize_fp8
from megatron_mxfp4.ops import fp8_matmul
from megatron_mxfp4.ops.fp8_cast import quantize_fp8_fused, supports

DEV = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or supports(torch.zeros(1, device=DEV)) is not None,
                                reason="needs a GPU with E4M3 and Triton")


def _same(x):
    q, s = quantize_fp8_fused(x)
    rq, rs = quantize_fp8(x)
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn and s.shape == rs.shape
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32)), (s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (4096, 1000), (3, 8192, 129)])
def test_fused_cast_is_the_reference(dtype, shape):
    g = torch.Generator(device=DEV).manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, device=DEV) * torch.exp2(torch.randint(-30, 30, shape[-1:], generator=g,
                                                                                device=DEV).float())
    _same(x.to(dtype))


def test_special_values():
    _same(torch.zeros(1000, device=DEV))
    _same(torch.tensor([1e-40, -3e-39, 0.0], device=DEV))
    x = torch.randn(5000, device=DEV) * 1e3
    for v in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y[17] = v
        _same(y)
    _same(x[::3])  # a strided view is copied first


def test_fp8_matmul_uses_it_and_matches_the_reference():
    from megatron_mxfp4.numerics.fp8 import fp8_matmul_reference

    a, b = torch.randn(256, 512, device=DEV, dtype=torch.bfloat16), torch.randn(128, 512, device=DEV, dtype=torch.bfloat16)
    c = fp8_matmul(a, b, out_dtype=torch.float32)
    ref = fp8_matmul_reference(a, b, torch.float32)
    # the same E4M3 operands; the FP8 tensor core accumulates with fewer bits than float32 (DESIGN §2.5)
    assert ((c - ref).norm() / ref.norm()).item() < 5e-4


def test_both_routes_and_the_pair_call_are_the_reference():
    """The extension's cast of a GEMM's two operands in one call, and the Triton route, bit for bit."""
    from megatron_mxfp4.ops import fp8_cast

    g = torch.Generator(device=DEV).manual_seed(5)
    a = (torch.randn(300, 257, generator=g, device=DEV) * 1e4).to(torch.bfloat16)
    b = torch.randn(129, 257, generator=g, device=DEV, dtype=torch.float16)
    b[3, 4] = float("nan")
    refs = [quantize_fp8(a), quantize_fp8(b)]
    routes = [[fp8_cast.triton_cast(a), fp8_cast.triton_cast(b)]]
    if fp8_cast._native():
        routes.append(list(fp8_cast.quantize_fp8_pair(a, b)))
        routes.append([fp8_cast.quantize_fp8_pair(a)[0], fp8_cast.quantize_fp8_pair(b)[0]])
    for route in routes:
        for (q, s), (rq, rs) in zip(route, refs):
            assert torch.equal(s.view(torch.int32), rs.view(torch.int32))
            assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    _same(a[:, 1:])  # an unaligned start: copied, then cast
