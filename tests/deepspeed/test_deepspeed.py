"""DeepSpeed integration tests (CPU).

Single-process tests of `convert` and the config key run without deepspeed. The distributed tests
launch `worker.py` in 2 processes (gloo, `DS_ACCELERATOR=cpu`): ZeRO stages 0-3 and AutoTP at
tp=2; they are skipped when deepspeed (or, for AutoTP, transformers) is not installed.
"""
from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_mxfp4 import MXFP4Recipe
from megatron_mxfp4 import deepspeed as mds

HERE = os.path.dirname(os.path.abspath(__file__))
OFF = MXFP4Recipe(dgrad=False, wgrad=False)

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:
    Conv1D = None


# ------------------------------------------------------------------------------ config key
def test_config_absent_or_disabled_gives_none():
    assert mds.recipe_from_config({"train_batch_size": 8}) is None
    assert mds.recipe_from_config({"mxfp4": {"enabled": False, "rht_block": 32}}) is None
    assert mds.recipe_from_config({"mxfp4": {"rht_block": 32}}) is None  # DeepSpeed convention: off by default
    assert mds.recipe_from_config(None) is None


def test_config_fields_and_roundtrip(tmp_path):
    r = mds.recipe_from_config({"mxfp4": {"enabled": True, "rht_block": 128, "rounding": "rtn", "seed": 9}})
    assert r == MXFP4Recipe(rht_block=128, rounding="rtn", seed=9)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"mxfp4": mds.config_section(r)}))
    assert mds.recipe_from_config(str(path)) == r
    assert mds.recipe_from_config({"mxfp4": mds.config_section(None)}) is None


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="rht_blok"):
        mds.recipe_from_config({"mxfp4": {"enabled": True, "rht_blok": 64}})
    with pytest.raises(ValueError, match="enabled"):
        mds.recipe_from_config({"mxfp4": {"enabled": "yes"}})
    with pytest.raises(ValueError, match="rht_block"):
        mds.recipe_from_config({"mxfp4": {"enabled": True, "rht_block": 48}})
    with pytest.raises(TypeError, match="mxfp4"):
        mds.recipe_from_config({"mxfp4": True})


# ------------------------------------------------------------------------------ convert
class Block(nn.Module):
    def __init__(self, d=64, conv1d=False):
        super().__init__()
        self.up = Conv1D(2 * d, d) if conv1d else nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class LM(nn.Module):
    def __init__(self, layers=3, d=64, vocab=64, tied=True, conv1d=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, conv1d) for _ in range(layers))
        self.out = nn.Linear(d, vocab, bias=False)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def _loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(1, -1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _idx(seed=0):
    return torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("conv1d", [False, True])
def test_off_recipe_is_bit_identical_and_keeps_state_dict(conv1d):
    if conv1d and Conv1D is None:
        pytest.skip("transformers not installed")
    torch.manual_seed(0)
    ref = LM(conv1d=conv1d)
    model = copy.deepcopy(ref)
    params = [id(p) for p in model.parameters()]
    mds.convert(model, OFF)
    assert [id(p) for p in model.parameters()] == params  # same Parameter objects
    assert list(model.state_dict()) == list(ref.state_dict())
    assert not list(model.buffers())
    assert len(mds.converted_modules(model)) == 6
    if conv1d:
        assert isinstance(model.blocks[0].up, Conv1D) and type(model.blocks[0].up).__name__ == "MXFP4Conv1D"
    l0, g0 = _loss_and_grads(ref, _idx())
    l1, g1 = _loss_and_grads(model, _idx())
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


@pytest.mark.parametrize("conv1d", [False, True])
def test_sr_gradients_unbiased(conv1d):
    if conv1d and Conv1D is None:
        pytest.skip("transformers not installed")
    torch.manual_seed(0)
    ref = LM(layers=1, conv1d=conv1d)
    model = mds.convert(copy.deepcopy(ref), MXFP4Recipe(seed=3))
    idx = _idx(1)
    _, g_ref = _loss_and_grads(ref, idx)
    n = 16
    samples = [_loss_and_grads(model, idx)[1] for _ in range(n)]
    for name in ("blocks.0.up.weight", "blocks.0.down.weight"):
        g = torch.stack([s[name] for s in samples])
        ratio = n * (g.mean(0) - g_ref[name]).square().sum() / (g - g_ref[name]).square().flatten(1).sum(1).mean()
        assert ratio < 3.0, (name, float(ratio))  # ~1 when unbiased, ~n when biased
        assert not torch.equal(g[0], g[1])  # fresh random bits on every call


def test_lm_head_excluded_unless_asked():
    model = mds.convert(LM(), MXFP4Recipe())
    assert "out" not in dict(mds.converted_modules(model))  # tied to the embedding
    model = mds.convert(LM(tied=False), MXFP4Recipe())
    assert "out" in dict(mds.converted_modules(model))  # an untied linear named "out" is a plain linear

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 32)

    assert [n for n, _ in mds.converted_modules(mds.convert(Named(), MXFP4Recipe()))] == ["body"]

    class HF(LM):
        def get_output_embeddings(self):
            return self.out

    assert "out" not in dict(mds.converted_modules(mds.convert(HF(tied=False), MXFP4Recipe())))
    assert "out" in dict(mds.converted_modules(mds.convert(HF(tied=False), MXFP4Recipe(lm_head=True))))


def test_filter_and_bf16_first_last_layers():
    model = mds.convert(LM(layers=4), MXFP4Recipe(), filter=lambda name, m: name.endswith("up"))
    assert [n for n, _ in mds.converted_modules(model)] == [f"blocks.{i}.up" for i in range(4)]
    model = mds.convert(LM(layers=4), MXFP4Recipe(bf16_first_layers=1, bf16_last_layers=2))
    assert [n for n, _ in mds.converted_modules(model)] == ["blocks.1.up", "blocks.1.down"]
    with pytest.raises(ValueError, match="block stack"):
        mds.convert(nn.Sequential(nn.Linear(64, 64)), MXFP4Recipe(bf16_first_layers=1))


def test_layer_ids_stable_and_reconvert_updates_recipe():
    model = mds.convert(LM(layers=2), MXFP4Recipe(), filter=lambda n, m: n.startswith("blocks.1"))
    ids = {n: m.layer_id for n, m in mds.converted_modules(model)}
    assert ids == {"blocks.1.up": 2, "blocks.1.down": 3}  # position among all linears, filtered or not
    model(_idx()).sum().backward()
    calls = model.blocks[1].up._mxfp4_calls
    new = MXFP4Recipe(seed=99)
    mds.convert(model, new)
    assert all(m.recipe == new for _, m in mds.converted_modules(model))
    assert model.blocks[1].up._mxfp4_calls == calls and model.blocks[0].up.layer_id == 0


def test_layers_of_any_size_convert_and_train():
    """48 and 12 output features, 5 tokens: converted, and the backward zero-pads (DESIGN §3)."""
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 12), nn.Linear(12, 64))
    mds.convert(model, MXFP4Recipe())
    assert [n for n, _ in mds.converted_modules(model)] == ["0", "1", "2"]
    model(torch.randn(5, 64)).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    with pytest.raises(TypeError, match="float64"):
        model.double()(torch.randn(5, 64, dtype=torch.float64))


def test_none_recipe_and_bad_arguments():
    model = LM()
    assert mds.convert(model, None) is model and not mds.converted_modules(model)
    with pytest.raises(TypeError, match="MXFP4Recipe"):
        mds.convert(model, {"enabled": True})
    with pytest.raises(TypeError, match="bare linear"):
        mds.convert(nn.Linear(64, 64), MXFP4Recipe())


def test_unconvert_and_pickle():
    ref = LM(conv1d=Conv1D is not None)
    model = mds.convert(copy.deepcopy(ref), MXFP4Recipe())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert len(mds.converted_modules(loaded)) == 6
    mds.unconvert(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert not hasattr(model.blocks[0].down, "recipe")


def test_replica_rank_without_process_group():
    assert mds.replica_rank() == 0


# ------------------------------------------------------------------------------ distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, tmp_path, nproc: int = 2, timeout: float = 600):
    """Run worker.py `mode` in `nproc` processes (output to files: a full pipe would stall a rank)."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        logs.append(tmp_path / f"{mode}.rank{rank}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), mode], env=env,
                                          stdout=f, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"worker {mode} failed:\n{out[-6000:]}"
    passed = [line.split()[1] for line in outs[0].splitlines() if line.startswith("PASS ")]
    return passed, outs[0]


def _require(name: str) -> None:
    """Skip unless package `name` is installed (a directory of the same name on sys.path, such as
    this one, would otherwise pass for a namespace package)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        pytest.skip(f"{name} is not installed")


def test_zero_stages_0_to_3(tmp_path):
    _require("deepspeed")
    passed, out = _launch("zero", tmp_path)
    for stage in range(4):
        for name in ("off_losses_identical", "off_grads_identical", "state_dict_keys", "config_recipe",
                     "replicas_decorrelated", "sr_trains", "sr_unbiased"):
            assert f"z{stage}.{name}" in passed, out[-4000:]
    for name in ("z0.rtn_flagged_biased", "z0.convert_engine", "z3.saved_tensors_released", "z3.naive_view_flagged"):
        assert name in passed, out[-4000:]


def test_autotp_tp2(tmp_path):
    _require("deepspeed")
    _require("transformers")
    passed, out = _launch("autotp", tmp_path)
    for name in ("tp.sync.off_losses_identical", "tp.sync.off_grads_identical", "tp.overlap.mode",
                 "tp.overlap.off_losses_identical", "tp.overlap.off_grads_identical", "tp.sr_trains",
                 "tp.pre_initialize_conversion_restored", "tp.seeds_shared_by_tp_ranks",
                 "tp.replicated_params_consistent", "tp.sr_unbiased"):
        assert name in passed, out[-4000:]
