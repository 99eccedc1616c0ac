"""MoE scenarios for the Megatron tests, run in 2 processes like worker.py (which provides the
process setup, the helpers and `main`):

    python tests/megatron/moe_worker.py OUT_DIR [scenario ...]
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import worker as W  # noqa: E402  (CPU shims, megatron imports, recipes, helpers)
from worker import DEVICE, IDENTITY, ON, RANK, equal  # noqa: E402

import dist_helpers as H  # noqa: E402
import megatron_mxfp4.megatron as mm  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron_mxfp4 import MXFP4Recipe  # noqa: E402

SCENARIOS = {}
EXPERTS = 4
# tokens per expert in the direct SequentialMLP scenarios: none, one, and counts off the 32/64 grid
TOKENS = (0, 1, 7, 24)
MXFP4_LINEARS = (mm.MXFP4ColumnParallelLinear, mm.MXFP4RowParallelLinear)


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _moe_gpt(config, recipe=None, layers=None, seed=5):
    """A tiny MoE GPTModel: megatron-core's local spec (recipe None) or the plugin's spec."""
    torch.manual_seed(seed)
    if recipe is None:
        spec = get_gpt_layer_local_spec(num_experts=EXPERTS)
    else:
        spec = mm.get_gpt_layer_spec(recipe, num_experts=EXPERTS)
    return H.tiny_gpt(config, spec).to(DEVICE)


def _seeds_shared(experts) -> list:
    """For each (layer id, expert) held by both ranks: whether their Philox keys are equal."""
    a, b = gather_objects({(m.mxfp4_layer_id, m.mxfp4_expert): m._mxfp4_seed for m in experts})
    return [a[k] == b[k] for k in sorted(set(a) & set(b))]


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


# ---------------------------------------------------------------- parity with stock megatron-core

@scenario
def moe_parity():
    """Tiny MoE GPT (4 experts, top-2, a shared expert): stock local spec vs the plugin spec with
    quantization off. Loss and every gradient bit-identical (EP 1, EP 2, expert TP 2; MoE with TP > 1
    needs sequence parallelism, which megatron-core's local LayerNorm lacks); the plugin's
    state_dict keys are stock's, and its state_dict loads into a stock model that then computes the
    same loss as the MXFP4 model."""
    res = {}
    for name, ep, etp in [("ep1", 1, None), ("ep2", 2, None), ("etp2", 1, 2)]:
        with H.model_parallel(1, ep, etp):
            batch = [t.to(DEVICE) for t in H.gpt_batch(seed=RANK)]  # ranks of an EP group see other tokens
            stock = _moe_gpt(H.tiny_moe_config(ep=ep, etp=etp))
            plug = _moe_gpt(H.tiny_moe_config(ep=ep, etp=etp), IDENTITY)
            ls = H.gpt_loss(stock, batch)
            ls.backward()
            lp = H.gpt_loss(plug, batch)
            lp.backward()
            gs, gp = _grads(stock), _grads(plug)
            experts = [m for n, m in plug.named_modules()
                       if ".experts.local_experts." in n and isinstance(m, MXFP4_LINEARS)]
            r = {
                "loss_equal": all_ranks(equal(ls, lp)),
                "grads_equal": all_ranks(all(equal(gs[n], gp[n]) for n in gs)),
                "no_grad": [n for n, g in gs.items() if g is None],
                "n_expert_linears": len(experts),
                "expert_calls": sorted({m._mxfp4_calls for m in experts}),
                "expert_ids": sorted(set().union(*gather_objects({(m.mxfp4_layer_id, m.mxfp4_expert)
                                                                  for m in experts}))),
                "is_expert": all(m.is_expert for m in experts),
                "seeds_shared": _seeds_shared(experts),
                "router_stock": all(type(l.mlp.router).__name__ == "TopKRouter" for l in plug.decoder.layers),
                "keys_equal": all_ranks(list(stock.state_dict()) == list(plug.state_dict())),
            }
            # a checkpoint of the MXFP4 model loads into plain megatron-core (forward unquantized: same loss)
            on = _moe_gpt(H.tiny_moe_config(ep=ep, etp=etp), ON, seed=9)
            with torch.no_grad():
                lo = H.gpt_loss(on, batch)
                stock.load_state_dict(on.state_dict(), strict=True)
                r["load_loss_equal"] = all_ranks(equal(H.gpt_loss(stock, batch), lo))
            res[name] = r
    return res


# ---------------------------------------------------------------- experts with forced token counts

def _experts(recipe, seed=5):
    """The SequentialMLP of a one-layer MoE GPT built from the plugin spec."""
    model = _moe_gpt(H.tiny_moe_config(layers=1, shared=0), recipe, seed=seed)
    return model.decoder.layers[0].mlp.experts


def _run_experts(experts, x, tokens):
    """Forward + backward of the experts on x split by `tokens`; returns (dX, {param: grad})."""
    for p in experts.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    counts = torch.tensor(tokens)
    out, _ = experts(x, counts, torch.ones(x.shape[0], device=DEVICE))
    probe = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
    (out * probe).sum().backward()
    return x.grad, {n: p.grad for n, p in experts.named_parameters()}


def _rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _tokens_input(tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(tokens), 64, generator=g).to(DEVICE)


@scenario
def moe_token_counts():
    """Experts receiving 0, 1, 7 and 24 tokens (counts forced): with quantization off equal to stock
    megatron-core bit for bit; with SR + RHT finite gradients of the right shapes, exactly zero for
    the expert without tokens, close to the exact ones for the others."""
    res = {}
    with H.model_parallel(1):
        x = _tokens_input(TOKENS)
        dx_s, g_s = _run_experts(_experts(None), x, TOKENS)
        dx_i, g_i = _run_experts(_experts(IDENTITY), x, TOKENS)
        res["identity_equal"] = equal(dx_s, dx_i) and all(equal(g_s[n], g_i[n]) for n in g_s)
        dx_q, g_q = _run_experts(_experts(ON), x, TOKENS)
        res["shapes"] = dx_q.shape == x.shape and all(g_q[n].shape == g_s[n].shape for n in g_s)
        res["finite"] = bool(torch.isfinite(dx_q).all()) and all(bool(torch.isfinite(g).all()) for g in g_q.values())
        res["empty_expert_zero"] = all(bool((g_q[n] == 0).all()) for n in g_q if n.startswith("local_experts.0."))
        res["rel_err"] = {n: _rel(g_q[n], g_s[n]) for n in g_q if not n.startswith("local_experts.0.")}
        res["dx_rel_err"] = _rel(dx_q, dx_s)
    return res


@scenario
def moe_grouped_quantize():
    """The FC2 backward quantizers of all local experts in one grouped launch (`grouped_experts`): dX and
    every gradient equal the per-expert quantizers' bit for bit (SR + RHT per_call, per_layer signs with
    g = 32, RTN), with experts of 0, 1, 7, 24 tokens; the experts took the grouped operands."""
    from megatron_mxfp4.megatron import grouped_experts as ge

    res = {}
    recipes = {"sr_rht_per_call": ON, "per_layer_g32": dataclasses.replace(ON, sign_policy="per_layer", rht_block=32),
               "rtn": dataclasses.replace(ON, rounding="rtn", rht_block=0)}
    with H.model_parallel(1):
        x = _tokens_input(TOKENS, seed=3)
        for name, recipe in recipes.items():
            r = {}
            before = dict(ge.STATS)
            ge.ENABLED = True
            try:
                dx_g, g_g = _run_experts(_experts(recipe), x, TOKENS)
                used = {k: ge.STATS[k] - before[k] for k in before}
                ge.ENABLED = False
                dx_s, g_s = _run_experts(_experts(recipe), x, TOKENS)
            finally:
                ge.ENABLED = True
            r["equal"] = equal(dx_g, dx_s) and all(equal(g_g[n], g_s[n]) for n in g_s)
            # 4 experts, one with 0 tokens (its GEMMs are skipped): 3 dY and 3 X operands taken from the group
            r["used"] = used
            res[name] = r
    return res


@scenario
def moe_unbiased():
    """SR + RHT expert gradients (dW of FC1/FC2 per expert, dX) averaged over N draws approach the
    exact ones as 1/sqrt(N); RTN without RHT (deterministic: its error is all bias) is the negative
    control. Returns, per recipe and gradient, the relative error of one draw and of the mean."""
    n_draws = 32
    res = {"n_draws": n_draws}
    with H.model_parallel(1):
        tokens = (5, 27, 0, 32)
        x = _tokens_input(tokens, seed=1)
        exact_dx, exact = _run_experts(_experts(IDENTITY), x, tokens)
        exact["dx"] = exact_dx
        for name, recipe in (("sr", ON), ("rtn", MXFP4Recipe(rounding="rtn", rht_block=0, backend=ON.backend))):
            experts = _experts(recipe)
            total, first = None, None
            for _ in range(n_draws):  # every forward advances the layers' call counters: fresh bits
                dx, g = _run_experts(experts, x, tokens)
                g = dict(g, dx=dx)
                first = first or {n: t.clone() for n, t in g.items()}
                total = {n: t.double() for n, t in g.items()} if total is None else \
                    {n: total[n] + g[n].double() for n in g}
            res[name] = {n: {"single": _rel(first[n], exact[n]), "mean": _rel(total[n] / n_draws, exact[n])}
                         for n in exact if not n.startswith("local_experts.2.")}  # expert 2 has no tokens
    return res


# ---------------------------------------------------------------- expert parallelism

def _expert_grads(model):
    """{global expert index: {role: dW}} of the first layer's routed experts."""
    seq = model.decoder.layers[0].mlp.experts
    first = seq.ep_group.rank() * seq.num_local_experts
    return {first + i: {r: getattr(e, r).weight.grad.double() for r in ("linear_fc1", "linear_fc2")}
            for i, e in enumerate(seq.local_experts)}


def _ep_model(ep, recipe, ep1_state):
    """A one-layer MoE GPT at expert-parallel size `ep` with the weights of the EP = 1 model."""
    import re

    model = _moe_gpt(H.tiny_moe_config(layers=1, ep=ep, shared=0), recipe)
    first = ps.get_expert_model_parallel_rank() * (EXPERTS // ep)
    state = {k: ep1_state[re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{first + int(m.group(1))}.", k)]
             for k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model


def _ep_draws(ep, recipe, ep1_state, batch, n):
    """Expert dW summed over the ranks' losses, averaged over n draws: {expert: {role: dW}} for the
    experts held here, and the first draw."""
    model = _ep_model(ep, recipe, ep1_state)
    total = first = None
    for _ in range(n):
        model.zero_grad()
        H.gpt_loss(model, batch).backward()
        g = _expert_grads(model)
        if ep == 1:  # each rank's experts saw its own tokens only: the sum over ranks is the EP = 2 gradient
            for d in g.values():
                for t in d.values():
                    torch.distributed.all_reduce(t)
        first = first or g
        total = g if total is None else {e: {r: total[e][r] + g[e][r] for r in g[e]} for e in g}
    return {e: {r: t / n for r, t in d.items()} for e, d in total.items()}, first


@scenario
def moe_expert_parallel():
    """One MoE layer with the same weights at EP = 1 and EP = 2 (2 ranks, other tokens per rank; at
    EP = 1 the expert gradients are summed over the ranks). Quantization off: the same gradients up to
    float32 summation order. SR + RHT: both means over N draws approach the exact gradient as
    1/sqrt(N), and so does their difference (EP = 2 equals EP = 1 statistically)."""
    n = 16
    res = {"n_draws": n}
    with H.model_parallel(1):
        ep1_state = _moe_gpt(H.tiny_moe_config(layers=1, shared=0), IDENTITY, seed=3).state_dict()
    batch = [t.to(DEVICE) for t in H.gpt_batch(seed=RANK)]
    exact = {}
    for ep in (1, 2):
        with H.model_parallel(1, ep):
            exact[ep], _ = _ep_draws(ep, IDENTITY, ep1_state, batch, 1)
    res["exact_max_rel_diff"] = max(_rel(exact[2][e][r], exact[1][e][r]) for e in exact[2] for r in exact[2][e])
    mean, single = {}, {}
    for ep in (1, 2):
        with H.model_parallel(1, ep):
            mean[ep], single[ep] = _ep_draws(ep, ON, ep1_state, batch, n)

    res["experts"] = {f"{e}.{r}": {"single": _rel(single[2][e][r], exact[1][e][r]),
                                   "mean_ep1": _rel(mean[1][e][r], exact[1][e][r]),
                                   "mean_ep2": _rel(mean[2][e][r], exact[1][e][r]),
                                   "ep2_vs_ep1": _rel(mean[2][e][r], mean[1][e][r])}
                      for e in mean[2] for r in mean[2][e]}
    res["experts"] = {k: v for d in gather_objects(res["experts"]) for k, v in d.items()}
    return res


# ---------------------------------------------------------------- launch flags

@scenario
def moe_argv():
    """`--mxfp4-backward` with `--num-experts` (and EP 2) through the entry point's argument handling
    and megatron.training's model builder: MXFP4 experts, a stock router, forward and backward."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.gpt import GPTModelBuilder

    from megatron_mxfp4 import pretrain_gpt as entry

    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-4", "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--transformer-impl", "local",
            "--use-cpu-initialization", "--no-gradient-accumulation-fusion", "--disable-bias-linear",
            "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion", "--no-rope-fusion",
            "--no-persist-layer-norm", "--num-experts", str(EXPERTS), "--moe-router-topk", "2",
            "--moe-token-dispatcher-type", "allgather", "--expert-model-parallel-size", "2",
            "--mxfp4-backward", "--mxfp4-moe", "experts", "--mxfp4-backend", ON.backend]
    args = H.parse_entry_args(entry, argv)
    recipe, model_cfg = entry.build_model_config(args)
    res = {"moe": recipe.moe}
    with H.model_parallel(1, 2):
        model = GPTModelBuilder(model_cfg).build_model(pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        for hook in model_cfg.pre_wrap_hooks:
            hook([model])
        model = model.to(DEVICE)
        res["classes"] = sorted({f"{n.split('.', 3)[-1].split('.', 1)[-1]}:{type(m).__name__}"
                                 for n, m in model.named_modules()
                                 if n.endswith(("linear_fc1", "linear_fc2", "router"))})
        res["local_experts"] = len(model.decoder.layers[0].mlp.experts.local_experts)
        loss = H.gpt_loss(model, [t.to(DEVICE) for t in H.gpt_batch(seed=RANK)])
        loss.backward()
        res["grads_finite"] = all_ranks(all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                                            for p in model.parameters()))
    return res


if __name__ == "__main__":
    W.main(SCENARIOS)
