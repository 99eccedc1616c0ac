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


#: grouped vs per-expert quantizers: RTN and SR, RHT g = 64 and off, the three sign policies
GROUPED_RECIPES = {
    "sr_g64_per_call": ON,
    "rtn_g64_per_call": dataclasses.replace(ON, rounding="rtn"),
    "sr_g0": dataclasses.replace(ON, rht_block=0),
    "rtn_g0": dataclasses.replace(ON, rounding="rtn", rht_block=0),
    "sr_g32_per_layer": dataclasses.replace(ON, sign_policy="per_layer", rht_block=32),
    "sr_g64_deterministic": dataclasses.replace(ON, sign_policy="deterministic"),
}


def _grouping(enabled: bool, run):
    """run() with the grouping on or off; returns (its result, the `grouped_experts.STATS` it added and
    "released": whether the layer groups it made hold nothing after the backward)."""
    from megatron_mxfp4.megatron import grouped_experts as ge

    groups, init = [], ge.ExpertGroup.__init__

    def recording_init(self, experts):
        init(self, experts)
        groups.append(self)

    before = dict(ge.STATS)
    ge.ENABLED, ge.ExpertGroup.__init__ = enabled, recording_init
    try:
        out = run()
    finally:
        ge.ENABLED, ge.ExpertGroup.__init__ = True, init
    used = {k: ge.STATS[k] - before[k] for k in before}
    used["released"] = all(not (g.ready or g.fc1_signs or any(g.calls.values())) for g in groups)
    return out, used


def _same_grads(a, b) -> bool:
    """(dX, {param: grad}) pairs equal bit for bit."""
    return equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(equal(a[1][n], b[1][n]) for n in a[1])


@scenario
def moe_grouped_quantize():
    """The backward quantizers of all local experts in grouped launches (`grouped_experts`: FC2's dY, X, W and
    FC1's X, W): dX and every gradient equal the per-expert quantizers' bit for bit, for every recipe of
    GROUPED_RECIPES, with experts of 0, 1, 7, 24 tokens (float32, and bfloat16 experts for SR g = 64); the
    experts took the grouped operands (hit counts)."""
    res = {}
    with H.model_parallel(1):
        x = _tokens_input(TOKENS, seed=3)
        cases = [(name, recipe, torch.float32) for name, recipe in GROUPED_RECIPES.items()]
        cases.append(("sr_g64_per_call_bf16", ON, torch.bfloat16))
        for name, recipe, dtype in cases:
            xd = x.to(dtype)
            grouped, used = _grouping(True, lambda: _run_experts(_experts(recipe).to(dtype), xd, TOKENS))
            alone, unused = _grouping(False, lambda: _run_experts(_experts(recipe).to(dtype), xd, TOKENS))
            res[name] = {"equal": _same_grads(grouped, alone), "used": used, "off_used": unused}
    return res


@scenario
def moe_grouped_fallback():
    """Where the grouping does not apply, each expert quantizes its own operands (or runs its GEMMs exactly) with
    the grouping on: a diagnostics-sampled step (exact GEMMs beside the MXFP4 ones) and an unquantized tail
    (every GEMM exact). Gradients equal the grouping-off ones bit for bit, no grouped launch, and nothing held
    after the backward (the FC1 inputs registered at the forward are let go at the end of the layer's backward)."""
    from megatron_mxfp4 import diagnostics

    res = {}
    monitors = {"sampled": lambda: diagnostics.MXFP4Monitor(interval=1),
                "unquantized_tail": lambda: diagnostics.MXFP4Monitor(interval=0, unquantized_tail=0.5, total_steps=2,
                                                                     step=1)}
    with H.model_parallel(1):
        x = _tokens_input(TOKENS, seed=5)
        for name, monitor in monitors.items():
            diagnostics.set_active_monitor(monitor())
            try:
                grouped, used = _grouping(True, lambda: _run_experts(_experts(ON), x, TOKENS))
                alone, _ = _grouping(False, lambda: _run_experts(_experts(ON), x, TOKENS))
            finally:
                diagnostics.set_active_monitor(None)
            res[name] = {"equal": _same_grads(grouped, alone), "used": used}
    return res


def _run_changing_weights(experts, x, tokens, when: str, changed):
    """`_run_experts` with the weights of `changed` (local experts) updated in place (+0.125), where `when`:
    "before_backward" (between forward and backward, under identity saved-tensor hooks, which skip autograd's
    version check: the backward sees the updated weights); "during_backward" (the same, from a gradient hook that
    runs just before the first changed expert's backward, after the layer's grouped launches); "saved_copy"
    (between forward and backward under `allow_mutation_on_saved_tensors`: the backward sees copies of the
    weights as they were at the forward)."""
    weights = [getattr(experts.local_experts[e], r).weight for e in changed for r in ("linear_fc1", "linear_fc2")]

    def update(*_):
        with torch.no_grad():
            for w in weights:
                w.add_(0.125)

    for p in experts.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    def on_gradient(module, args, out):
        out[0].register_hook(update)

    handle = None
    if when == "during_backward":  # autograd runs the experts' backward last expert first
        handle = experts.local_experts[max(changed)].linear_fc2.register_forward_hook(on_gradient)
    ctx = (torch.autograd.graph.allow_mutation_on_saved_tensors() if when == "saved_copy"
           else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    with ctx:
        out, _ = experts(x, torch.tensor(tokens), torch.ones(x.shape[0], device=DEVICE))
        if when != "during_backward":
            update()
        probe = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        (out * probe).sum().backward()
    if handle is not None:
        handle.remove()
    return x.grad, {n: p.grad for n, p in experts.named_parameters()}


@scenario
def moe_grouped_weight_changed():
    """A weight updated in place after the forward is never served a stale grouped operand: the gradients equal
    the per-expert quantizers' (which see the weight the backward sees) bit for bit, whether the update comes
    before the grouped launches (they quantize the updated weight), after them (the version check declines),
    or autograd hands the backward a saved copy (the storage check declines). Experts of 0, 1, 7, 24 tokens;
    experts 2 (7 tokens) and, where updated, 1 change."""
    res = {}
    with H.model_parallel(1):
        x = _tokens_input(TOKENS, seed=4)
        fixed = _run_experts(_experts(ON), x, TOKENS)
        for when, changed in (("before_backward", [2]), ("during_backward", [2]), ("saved_copy", [1, 2])):
            grouped, used = _grouping(True, lambda: _run_changing_weights(_experts(ON), x, TOKENS, when, changed))
            alone, _ = _grouping(False, lambda: _run_changing_weights(_experts(ON), x, TOKENS, when, changed))
            res[when] = {"equal": _same_grads(grouped, alone), "used": used,
                         "as_not_updated": _same_grads(grouped, fixed)}
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
