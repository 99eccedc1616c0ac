"""One rank of the DeepSpeed tests (launched by test_deepspeed.py with 2 processes, gloo, CPU).

    python worker.py zero   # ZeRO stages 0, 1, 2, 3 (data parallel, 2 ranks)
    python worker.py autotp # AutoTP at tp=2 on a tiny Llama (needs transformers)

Every check raises on failure; rank 0 prints "PASS <check>" lines and a final "RESULT <json>".
"""
from __future__ import annotations

import copy
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from torch import nn  # noqa: E402

from megatron_mxfp4 import MXFP4Recipe  # noqa: E402
from megatron_mxfp4 import deepspeed as mds  # noqa: E402
from megatron_mxfp4.linear import MXFP4LinearFunction  # noqa: E402

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # the Conv1D path is then covered only where transformers is installed
    Conv1D = None

OFF = MXFP4Recipe(dgrad=False, wgrad=False)  # converted layers, unquantized backward
RESULTS = {}


def rank() -> int:
    return torch.distributed.get_rank()


def log(msg: str) -> None:
    if rank() == 0:
        print(msg, flush=True)


def check(name: str, ok: bool, detail: str = "") -> None:
    if not ok:
        raise AssertionError(f"[rank {rank()}] {name} failed: {detail}")
    log(f"PASS {name} {detail}")


# ---------------------------------------------------------------------------------------------
# a small model holding the converted classes (nn.Linear, HF Conv1D) plus an unconverted head
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(96, 128)
        self.fc2 = Conv1D(64, 128) if Conv1D is not None else nn.Linear(128, 64)
        self.lm_head = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.lm_head(self.fc2(F.gelu(self.fc1(x))))


def make_net(stage: int, zero_init: bool = False, mem_efficient_linear: bool = False):
    """Net, built under `deepspeed.zero.Init` when asked. `mem_efficient_linear=True` (DeepSpeed's
    default) replaces F.linear process-wide with DeepSpeed's ZeRO-3 linear: used last. The dtype comes
    from the config (deepspeed 0.19.8 ignores `dtype=` on a CPU accelerator and picks bf16)."""
    torch.manual_seed(0)
    if zero_init:
        with deepspeed.zero.Init(mem_efficient_linear=mem_efficient_linear, config_dict_or_path=ds_config(3)):
            return Net()
    return Net()


def batches(n: int, seed: int = 0):
    """Per-rank batches [4, 16, 96] (64 tokens) and targets of a fixed teacher."""
    g = torch.Generator().manual_seed(1000 * seed + rank())
    teacher = torch.Generator().manual_seed(7)
    w_t = torch.randn(96, 32, generator=teacher) / 96 ** 0.5
    out = []
    for _ in range(n):
        x = torch.randn(4, 16, 96, generator=g)
        out.append((x, torch.tanh(x @ w_t) * 3))
    return out


def ds_config(stage: int, lr: float = 1e-2, gas: int = 1, mxfp4=None) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:  # release every parameter after use (tiny params would otherwise persist)
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0,
                                        stage3_model_persistence_threshold=0)
    if mxfp4 is not None:
        cfg["mxfp4"] = mds.config_section(mxfp4)
    return cfg


def engine(model, cfg, **kw):
    init = kw.pop("init", deepspeed.initialize)
    eng, *_ = init(model=model, model_parameters=model.parameters(), config=cfg, **kw)
    return eng


def loss_of(eng, x, y):
    return F.mse_loss(eng(x).float(), y)


def full_grads(eng):
    return {n: safe_get_full_grad(p).detach().clone().float() for n, p in eng.module.named_parameters()}


def train(eng, data, gas: int = 1, grads_at=None):
    """Steps over `data` (gas micro-batches per step); returns the micro-batch losses and the full
    grads of step `grads_at` (read after its last backward, before the optimizer step)."""
    losses, grads = [], None
    for i, (x, y) in enumerate(data):
        loss = loss_of(eng, x, y)
        eng.backward(loss)
        losses.append(loss.item())
        if eng.is_gradient_accumulation_boundary() and grads_at is not None and i // gas == grads_at:
            grads = full_grads(eng)
        eng.step()
    return losses, grads


def unbiased_ratio(samples, ref):
    """N·‖mean − ref‖² / mean‖g_i − ref‖²: about 1 when E[g] = ref, about N when g is biased."""
    g = torch.stack(samples)
    n = g.shape[0]
    num = (g.mean(0) - ref).square().sum()
    den = (g - ref).square().flatten(1).sum(1).mean()
    return float(n * num / den) if den > 0 else float("inf")


def gather_seeds(model):
    """Every rank's list of the Philox seeds of its converted layers."""
    mine = [m._mxfp4_seed for _, m in mds.converted_modules(model)]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, mine)
    return out


def quantized_weights(model):
    return [f"{n}.weight" for n, _ in mds.converted_modules(model)]


# ---------------------------------------------------------------------------------------------
def check_saved_tensors(eng, x, y, name):
    """ZeRO-3: nothing the forward saves for backward holds a gathered parameter's storage."""
    params = {id(p): n for n, p in eng.module.named_parameters()}
    full_shapes = {tuple(p.ds_shape) for p in eng.module.parameters()}
    full_shapes |= {s[::-1] for s in full_shapes}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(eng, x, y)
    bad = []
    for t in saved:
        if id(t) in params:
            if t.numel() != 0:  # released after the forward: ZeRO-3 owns it again
                bad.append(f"{params[id(t)]} still gathered ({tuple(t.shape)})")
        elif t._base is not None and hasattr(t._base, "ds_id"):
            bad.append(f"a view {tuple(t.shape)} of a parameter")
        elif tuple(t.shape) in full_shapes:
            bad.append(f"a weight-shaped tensor {tuple(t.shape)}")
    eng.backward(loss)
    eng.step()
    return bad


class NaiveTransposedLinear(nn.Module):
    """A wrong way to wrap a transposed weight: it saves `weight.t()` (a view of gathered storage)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(96, 64) / 10)  # [in, out]
        self.head = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        key = mds.layers.bwd.StreamKey(1, 0, 0)
        return self.head(MXFP4LinearFunction.apply(x, self.weight.t(), None, OFF, key))


def zero_stage(stage: int) -> None:
    gas = 2
    data = batches(3 * gas)
    # 1. quantization off: identical losses and grads to the unconverted model
    ref = engine(make_net(stage, zero_init=stage == 3), ds_config(stage, gas=gas))
    ref_losses, ref_grads = train(ref, data, gas, grads_at=0)
    model = make_net(stage, zero_init=stage == 3)
    keys_before = list(model.state_dict())
    mds.convert(model, OFF)  # before initialize (under zero.Init at stage 3)
    if stage == 0:  # an engine is accepted too (its module is converted)
        eng0 = engine(make_net(0), ds_config(0))
        check("z0.convert_engine", mds.convert(eng0, OFF) is eng0.module and len(mds.converted_modules(eng0)) == 2)
    check(f"z{stage}.state_dict_keys", list(model.state_dict()) == keys_before)
    names = [n for n, _ in mds.converted_modules(model)]
    check(f"z{stage}.converted", names == ["fc1", "fc2"], str(names))
    off = engine(model, ds_config(stage, gas=gas))
    off_losses, off_grads = train(off, data, gas, grads_at=0)
    check(f"z{stage}.off_losses_identical", off_losses == ref_losses, f"{off_losses} vs {ref_losses}")
    diff = {n: float((off_grads[n] - ref_grads[n]).abs().max()) for n in ref_grads}
    check(f"z{stage}.off_grads_identical", all(v == 0 for v in diff.values()), str(diff))

    # 2. quantization on (recipe from the config key, converted after initialize): training works
    recipe = MXFP4Recipe(seed=11)
    train_data = batches(30, seed=1)
    base = engine(make_net(stage), ds_config(stage))
    base_losses, _ = train(base, train_data)
    eng = engine(make_net(stage), ds_config(stage, mxfp4=recipe), init=mds.initialize)
    check(f"z{stage}.config_recipe", all(m.recipe == recipe for _, m in mds.converted_modules(eng.module)))
    losses, _ = train(eng, train_data)
    seeds = gather_seeds(eng.module)
    check(f"z{stage}.replicas_decorrelated", seeds[0] != seeds[1], str(seeds))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    base_last = sum(base_losses[-3:]) / 3
    check(f"z{stage}.sr_trains", last < 0.5 * first and last < 1.5 * base_last,
          f"loss {first:.4f} -> {last:.4f} (unquantized {base_last:.4f})")
    RESULTS[f"zero{stage}_loss"] = {"first": first, "last": last, "unquantized_last": base_last}

    # 3. unbiased: the mean of many SR gradients of one batch approaches the unquantized gradient
    x, y = batches(1, seed=2)[0]
    probe = engine(make_net(stage), ds_config(stage, lr=0.0))
    _, g_ref = train(probe, [(x, y)], grads_at=0)
    eng = engine(mds.convert(make_net(stage), MXFP4Recipe(seed=5)), ds_config(stage, lr=0.0))
    samples = []
    for _ in range(24):
        _, g = train(eng, [(x, y)], grads_at=0)
        samples.append(g)
    ratios = {n: unbiased_ratio([s[n] for s in samples], g_ref[n]) for n in quantized_weights(eng.module)}
    check(f"z{stage}.sr_unbiased", all(r < 3.0 for r in ratios.values()),
          " ".join(f"{n}={r:.2f}" for n, r in ratios.items()))
    RESULTS[f"zero{stage}_unbiased_ratio"] = ratios
    if stage == 0:  # the check can fail: a biased (round-to-nearest, no RHT) recipe is caught
        eng = engine(mds.convert(make_net(stage), MXFP4Recipe(rounding="rtn", rht_block=0)), ds_config(0, lr=0.0))
        samples = [train(eng, [(x, y)], grads_at=0)[1] for _ in range(4)]
        ratios = {n: unbiased_ratio([s[n] for s in samples], g_ref[n]) for n in quantized_weights(eng.module)}
        check("z0.rtn_flagged_biased", all(r > 3.0 for r in ratios.values()), str(ratios))

    if stage == 3:
        # 4. nothing saved that ZeRO-3 releases; the check flags a view of the weight
        eng = engine(mds.convert(make_net(3, zero_init=True, mem_efficient_linear=True), MXFP4Recipe()),
                     ds_config(3))
        bad = check_saved_tensors(eng, x, y, "converted")
        check("z3.saved_tensors_released", not bad, str(bad))
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=ds_config(3)):
            naive = NaiveTransposedLinear()
        bad = check_saved_tensors(engine(naive, ds_config(3)), x, y, "naive")
        check("z3.naive_view_flagged", bool(bad), str(bad))


def main_zero() -> None:
    stages = [int(s) for s in os.environ.get("ZERO_STAGES", "0,1,2,3").split(",")]
    for stage in stages:
        zero_stage(stage)


# ---------------------------------------------------------------------------------------------
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, attention_dropout=0.0)
    return LlamaForCausalLM(cfg)


def tp_config(lr=1e-2, overlap=False, mxfp4=None):
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
        "tensor_parallel": {"autotp_size": 2, "tp_overlap_comm": overlap},
        "steps_per_print": 10 ** 9,
    }
    if mxfp4 is not None:
        cfg["mxfp4"] = mds.config_section(mxfp4)
    return cfg


def tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)  # the same on both TP ranks (dp = 1)
    text = torch.randint(0, 64, (64,), generator=g)  # a short repeated "text": learnable
    out = []
    for _ in range(n):
        i = torch.randint(0, 32, (2,), generator=g)
        out.append(torch.stack([text.roll(-int(j))[:32] for j in i]))
    return out


def tp_train(eng, data, grads_at=None):
    losses, grads = [], None
    for i, ids in enumerate(data):
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss)
        losses.append(loss.item())
        if i == grads_at:
            grads = {n: p.grad.detach().clone() for n, p in eng.module.named_parameters()}
        eng.step()
    return losses, grads


def main_autotp() -> None:
    from megatron_mxfp4.deepspeed.autotp import MXFP4LinearAllreduce, MXFP4LinearLayer

    data = tokens(3)
    for overlap in (False, True):
        tag = "overlap" if overlap else "sync"
        ref = engine(tiny_llama(), tp_config(overlap=overlap))
        ref_losses, ref_grads = tp_train(ref, data, grads_at=0)
        eng = engine(tiny_llama(), tp_config(overlap=overlap, mxfp4=OFF), init=mds.initialize)
        kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in eng.module.named_modules()
                 if n.endswith(("proj", "lm_head"))}
        check(f"tp.{tag}.layer_types",
              all(isinstance(m, MXFP4LinearLayer) for n, m in eng.module.named_modules()
                  if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")))
              and all(isinstance(m, MXFP4LinearAllreduce) for n, m in eng.module.named_modules()
                      if n.endswith(("o_proj", "down_proj")))
              and not isinstance(eng.module.lm_head, mds.layers._StreamMixin), str(kinds))
        check(f"tp.{tag}.mode", MXFP4LinearLayer.tp_overlap_comm == overlap)
        losses, grads = tp_train(eng, data, grads_at=0)
        check(f"tp.{tag}.off_losses_identical", losses == ref_losses, f"{losses} vs {ref_losses}")
        diff = {n: float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads}
        check(f"tp.{tag}.off_grads_identical", all(v == 0 for v in diff.values()),
              str({k: v for k, v in diff.items() if v}))

    # a conversion made before initialize (which AutoTP discards) is restored by mds.initialize
    model = mds.convert(tiny_llama(), MXFP4Recipe(rht_block=32, seed=8), filter=lambda n, m: ".mlp." in n)
    eng = engine(model, tp_config(), init=mds.initialize)
    got = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in mds.converted_modules(eng.module)}
    check("tp.pre_initialize_conversion_restored",
          got == {"gate_proj": "MXFP4LinearLayer", "up_proj": "MXFP4LinearLayer", "down_proj": "MXFP4LinearAllreduce"}
          and all(m.recipe.seed == 8 for _, m in mds.converted_modules(eng.module)), str(got))

    # SR on: trains; replicated parameters stay identical on the two TP ranks
    train_data = tokens(25, seed=1)
    base_losses, _ = tp_train(engine(tiny_llama(), tp_config(lr=3e-3)), train_data)
    eng = engine(tiny_llama(), tp_config(lr=3e-3, mxfp4=MXFP4Recipe(rht_block=32)), init=mds.initialize)
    losses, _ = tp_train(eng, train_data)
    first, last, base_last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3, sum(base_losses[-3:]) / 3
    check("tp.sr_trains", last < 0.7 * first and last < 1.2 * base_last,
          f"loss {first:.3f} -> {last:.3f} (unquantized {base_last:.3f})")
    RESULTS["autotp_loss"] = {"first": first, "last": last, "unquantized_last": base_last}
    seeds = gather_seeds(eng.module)
    check("tp.seeds_shared_by_tp_ranks", seeds[0] == seeds[1] and None not in seeds[0], str(seeds))
    norm = eng.module.model.norm.weight.detach().clone()
    gathered = [torch.empty_like(norm) for _ in range(2)]
    torch.distributed.all_gather(gathered, norm)
    check("tp.replicated_params_consistent", torch.equal(gathered[0], gathered[1]))

    # unbiased under TP
    ids = tokens(1, seed=2)[0]
    _, g_ref = tp_train(engine(tiny_llama(), tp_config(lr=0.0)), [ids], grads_at=0)
    eng = engine(tiny_llama(), tp_config(lr=0.0, mxfp4=MXFP4Recipe(rht_block=32, seed=3)), init=mds.initialize)
    samples = [tp_train(eng, [ids], grads_at=0)[1] for _ in range(16)]
    ratios = {n: unbiased_ratio([s[n] for s in samples], g_ref[n]) for n in quantized_weights(eng.module)}
    check("tp.sr_unbiased", all(r < 3.0 for r in ratios.values()),
          " ".join(f"{n.split('.', 3)[-1]}={r:.2f}" for n, r in ratios.items()))


if __name__ == "__main__":
    # gloo only: skip DeepSpeed's JIT-compiled shared-memory all-reduce kernel (about a minute of
    # C++ compilation on a fresh machine; DeepSpeed falls back to torch.distributed without it)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(1)
    {"zero": main_zero, "autotp": main_autotp}[sys.argv[1]]()
    log("RESULT " + json.dumps(RESULTS))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Every check has run and both ranks passed the barrier. A rank was once seen to abort in the
    # interpreter's teardown ("terminate called without an active exception", a C++ thread of the
    # distributed stack), after all of this: leave without that teardown.
    sys.stdout.flush()
    os._exit(0)
