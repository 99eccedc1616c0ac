"""Call counters on the device (`MXFP4Recipe(cuda_graphs=True)`, backward.DeviceCalls): the offsets the GPU
computes are the documented ones (numerics/streams.py), and a backward keyed by them is bit for bit the
backward keyed by the host's counter. Replays of a captured CUDA graph: tests/gpu/test_cuda_graphs.py."""
import pytest
import torch

from megatron_mxfp4 import MXFP4Linear, MXFP4Recipe
from megatron_mxfp4 import backward as bwd
from megatron_mxfp4.numerics.streams import Gemm, Operand, stream_offset


@pytest.mark.parametrize("layer, start", [(0, 0), (7, 12345), (40000, 2**39 - 2), (65535, 3)])
def test_device_offsets_are_the_documented_offsets(layer, start):
    dc = bwd.DeviceCalls(layer, start, "cpu")
    for call in (start, start + 1):
        key = bwd.StreamKey(99, layer, -1, offsets=dc.next_offsets())
        for gemm, operand in bwd.DEVICE_SLOTS:
            assert key.offset(gemm, operand) == stream_offset(layer, call, gemm, operand)
        # the per_layer signs are not a per-call offset: always the host's call-0 slot
        assert key.offset(Gemm.DGRAD, Operand.SIGNS) == stream_offset(layer, -1, Gemm.DGRAD, Operand.SIGNS)
    assert dc.calls() == start + 2


RECIPES = [MXFP4Recipe(backend="reference"), MXFP4Recipe(backend="reference", sign_policy="per_layer"),
           MXFP4Recipe(backend="reference", sign_policy="deterministic"),
           MXFP4Recipe(backend="reference", rht_block=0), MXFP4Recipe(backend="reference", rounding="rtn"),
           MXFP4Recipe(backend="reference", wgrad=False), MXFP4Recipe(backend="reference", dgrad=False)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.sign_policy}-{r.rht_block}-{r.rounding}-{r.dgrad}{r.wgrad}")
def test_backward_keyed_on_the_device_is_the_backward_keyed_on_the_host(recipe):
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(100, 72, generator=g), torch.randn(40, 72, generator=g), torch.randn(100, 40, generator=g)
    dc = bwd.DeviceCalls(5, 17, "cpu")
    for call in (17, 18):
        host = bwd.StreamKey(11, 5, call)
        dev = bwd.StreamKey(11, 5, -1, offsets=dc.next_offsets())
        out = []
        for key in (host, dev):
            qd, qw = bwd.grad_output_operands(dy, recipe, key)
            out.append((bwd.grad_input(dy, w, recipe, key, qdy=qd), bwd.grad_weight(dy, x, recipe, key, qdy=qw)))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_a_dy_quantizer_draws_the_per_call_signs_itself():
    """Without the dual kernel (dgrad only), dY's quantizer draws the GEMM's per_call signs and hands them to W's:
    the signs are `gemm_signs` (the sign-domain words at dY's offset), so no host draw is needed per call."""
    recipe = MXFP4Recipe(backend="reference", wgrad=False)
    key = bwd.StreamKey(11, 5, 4)
    dy, w = torch.randn(64, 96), torch.randn(96, 32)
    qd, _ = bwd.grad_output_operands(dy, recipe, key)
    assert qd is None
    want = bwd.gemm_signs(recipe, key, Gemm.DGRAD, "cpu")
    from megatron_mxfp4.numerics.quantize import quantize_reference

    a = quantize_reference(dy, -1, "sr", None, 64, None, key.seed, key.offset(Gemm.DGRAD, Operand.GRAD_OUTPUT))
    assert torch.equal(a.signs, want)


def test_layers_keep_the_host_counter_off_the_gpu_and_checkpoint_it():
    layer = MXFP4Linear(16, 8, recipe=MXFP4Recipe(backend="reference", cuda_graphs=True))
    x = torch.randn(4, 16, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()
    assert layer._mxfp4_calls == 3 and getattr(layer, "_mxfp4_device_calls", None) is None  # a CPU layer
    assert bwd.calls_made(layer) == 3
    layer._mxfp4_device_calls = bwd.DeviceCalls(layer.layer_id, 3, "cpu")
    layer._mxfp4_device_calls.next_offsets()  # a graph replay: only the device counter moves
    assert bwd.calls_made(layer) == 4
    bwd.set_calls(layer, 9)
    assert layer._mxfp4_calls == 9 and layer._mxfp4_device_calls is None


def test_the_recipe_flag_is_a_bool():
    with pytest.raises(ValueError, match="cuda_graphs"):
        MXFP4Recipe(cuda_graphs=1)
