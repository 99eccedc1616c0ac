"""CUDA-graph capture of MXFP4 layers (issue 16): with `MXFP4Recipe(cuda_graphs=True)` every replay of a
captured forward + backward gives, bit for bit, the gradients of the eager call it stands for (the call
counters live on the GPU, so each replay draws the next call's random bits), and those equal the gradients
keyed by the host's counter. Negative control: with the counters on the host a replay repeats the captured
call's bits and the comparison fails. Run on a CUDA machine: `python -m pytest -q tests/gpu/test_cuda_graphs.py`."""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_mxfp4 import MXFP4Linear, MXFP4Recipe

DEV = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
WARMUP = 3


class MLP(nn.Module):
    def __init__(self, recipe, hidden=256, ffn=512):
        super().__init__()
        kw = dict(bias=True, device=DEV, dtype=torch.bfloat16, recipe=recipe)
        self.fc1 = MXFP4Linear(hidden, ffn, layer_id=1, **kw)
        self.fc2 = MXFP4Linear(ffn, hidden, layer_id=2, **kw)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _set_recipe(model, recipe):
    for m in (model.fc1, model.fc2):
        m.recipe = recipe


def _eager_step(model, x, dy):
    for p in model.parameters():
        p.grad = None
    x.grad = None
    model(x).backward(dy)


def _grads(model, x):
    return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


def _captured(model, x, dy):
    """Warm-up calls on a side stream, then one forward + backward captured (its grads allocated in the graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(WARMUP):
            _eager_step(model, x, dy)
    torch.cuda.current_stream().wait_stream(s)
    for p in model.parameters():
        p.grad = None
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x).backward(dy)
    return graph


def _inputs(tokens):
    g = torch.Generator(device=DEV).manual_seed(tokens)
    x = torch.randn(tokens, 256, generator=g, device=DEV).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(tokens, 256, generator=g, device=DEV).to(torch.bfloat16)
    return x, dy


@pytest.mark.parametrize("forward", ["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [512, 300])
def test_replays_equal_the_eager_calls_bit_for_bit(forward, tokens):
    recipe = MXFP4Recipe(cuda_graphs=True, forward=forward)
    torch.manual_seed(0)
    graphed = MLP(recipe)
    eager, eager_host = copy.deepcopy(graphed), copy.deepcopy(graphed)
    _set_recipe(eager_host, replace(recipe, cuda_graphs=False))
    x, dy = _inputs(tokens)
    xe, xh = (x.detach().clone().requires_grad_(True) for _ in range(2))
    graph = _captured(graphed, x, dy)
    for _ in range(WARMUP):
        _eager_step(eager, xe, dy)
        _eager_step(eager_host, xh, dy)
    assert graphed.fc1._mxfp4_device_calls.calls() == WARMUP  # capturing ran nothing
    previous = None
    for _ in range(3):
        graph.replay()
        _eager_step(eager, xe, dy)
        _eager_step(eager_host, xh, dy)
        got, want, host = _grads(graphed, x), _grads(eager, xe), _grads(eager_host, xh)
        for g, w, h in zip(got, want, host):
            assert torch.equal(g, w) and torch.equal(w, h)
        if previous is not None:  # fresh bits per replay (SR): the weight gradients move
            assert not torch.equal(previous[1], got[1])
        previous = got
    assert graphed.fc1._mxfp4_device_calls.calls() == WARMUP + 3


def test_without_device_counters_a_replay_repeats_the_captured_bits():
    """The control: host counters are frozen into the graph, so replays differ from the eager calls."""
    recipe = MXFP4Recipe(cuda_graphs=False)
    torch.manual_seed(0)
    graphed = MLP(recipe)
    eager = copy.deepcopy(graphed)
    x, dy = _inputs(512)
    xe = x.detach().clone().requires_grad_(True)
    graph = _captured(graphed, x, dy)
    for _ in range(WARMUP + 1):  # the captured call is call WARMUP; the replays repeat it
        _eager_step(eager, xe, dy)
    graph.replay()
    first = _grads(graphed, x)
    assert all(torch.equal(a, b) for a, b in zip(first, _grads(eager, xe)))
    graph.replay()
    _eager_step(eager, xe, dy)
    again = _grads(graphed, x)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(again[1], _grads(eager, xe)[1])


def test_capturing_a_layer_that_never_ran_eagerly_says_what_to_do():
    layer = MXFP4Linear(64, 64, device=DEV, dtype=torch.bfloat16, recipe=MXFP4Recipe(cuda_graphs=True))
    x = torch.randn(32, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as info:
        with torch.cuda.graph(graph):
            layer(x)
    chain, e = [], info.value  # ending the aborted capture may raise in turn: look along the chain
    while e is not None:
        chain.append(str(e))
        e = e.__context__
    assert any("run one eager forward before capturing" in m for m in chain), chain
