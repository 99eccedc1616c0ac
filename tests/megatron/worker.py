"""Distributed scenarios for the Megatron tests, run in 2 processes (gloo on CPU, NCCL on GPUs).

    python tests/megatron/worker.py OUT_DIR [scenario ...]     (with torchrun-style env variables)

Every scenario runs on every rank; rank 0 writes OUT_DIR/results.json: {scenario: metrics or
{"error": traceback}}. The pytest files assert on those metrics.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import dist_helpers as H  # noqa: E402

H.install_cpu_shims()  # before megatron is imported; the process group starts in main()

import megatron_mxfp4.megatron as mm  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron_mxfp4 import MXFP4Recipe  # noqa: E402

DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
IDENTITY = MXFP4Recipe(dgrad=False, wgrad=False)  # quantization off: the plugin's Function, unquantized
ON = MXFP4Recipe(backend="reference") if DEVICE.type == "cpu" else MXFP4Recipe()
RANK = int(os.environ.get("RANK", 0))
SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def maxdiff(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return (a.detach().double() - b.detach().double()).abs().max().item()


def equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def tp_gather(t, dim):
    g = ps.get_tensor_model_parallel_group()
    if g.size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(g.size())]
    torch.distributed.all_gather(parts, t.contiguous(), group=g)
    return torch.cat(parts, dim)


# ---------------------------------------------------------------- layer-level parity (identity)

def _mlp_pair(config, recipe, plugin, hidden=64, ffn=256):
    init = torch.nn.init.normal_
    col_cls = mm.MXFP4ColumnParallelLinear if plugin else ColumnParallelLinear
    row_cls = mm.MXFP4RowParallelLinear if plugin else RowParallelLinear
    extra = {"recipe": recipe} if plugin else {}
    torch.manual_seed(11)
    col = col_cls(hidden, ffn, config=config, init_method=init, bias=True, gather_output=False, **extra)
    row = row_cls(ffn, hidden, config=config, init_method=init, bias=True, input_is_parallel=True,
                  skip_bias_add=False, **extra)
    return col.to(DEVICE), row.to(DEVICE)


def _probe(shape, sp):
    """The output weighting of the test loss: defined on the full output, sharded like y under SP."""
    full = torch.linspace(-1, 1, math.prod(shape)).view(shape).to(DEVICE)
    if sp:
        return full.chunk(ps.get_tensor_model_parallel_world_size(), 0)[ps.get_tensor_model_parallel_rank()]
    return full


def _run_mlp(col, row, x, frozen=False, main_grad=False, sp=False):
    params = [col.weight, col.bias, row.weight, row.bias]
    if frozen:
        for p in params:
            p.requires_grad_(False)
    if main_grad:
        for p in (col.weight, row.weight):
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            p.grad_added_to_main_grad = False
    x = x.detach().clone().requires_grad_(True)
    h, _ = col(x)
    y, _ = row(torch.nn.functional.gelu(h))
    full_shape = (y.shape[0] * (ps.get_tensor_model_parallel_world_size() if sp else 1), *y.shape[1:])
    (y.float() * _probe(full_shape, sp).to(y.dtype).float()).sum().backward()
    out = {"y": y.detach(), "dx": x.grad, "calls": getattr(col, "_mxfp4_calls", 0) + getattr(row, "_mxfp4_calls", 0)}
    for name, p in (("col_w", col.weight), ("col_b", col.bias), ("row_w", row.weight), ("row_b", row.bias)):
        out[name] = p.grad
        if main_grad and hasattr(p, "main_grad"):
            out[name + "_main"] = p.main_grad.clone()
            out[name + "_added"] = bool(p.grad_added_to_main_grad)
    return out


@scenario
def layer_parity():
    """Identity recipe vs stock: TP 1/2, ±SP, ±fusion (main_grad), frozen weights; bf16."""
    res = {}
    for tp, sp, fusion, frozen in [(1, False, False, False), (1, False, True, False), (2, False, False, False),
                                   (2, False, True, False), (2, True, False, False), (2, True, True, False),
                                   (2, False, False, True), (2, True, False, True)]:
        with H.model_parallel(tp):
            seq, batch = 16, 4
            torch.manual_seed(3)
            full = torch.randn(seq, batch, 64, dtype=torch.bfloat16, device=DEVICE)
            x = full.chunk(tp, 0)[ps.get_tensor_model_parallel_rank()] if sp else full
            cfg_stock = H.tiny_config(tp=tp, sp=sp, fusion=False, dtype=torch.bfloat16)
            cfg_plug = H.tiny_config(tp=tp, sp=sp, fusion=fusion, dtype=torch.bfloat16)
            s = _run_mlp(*_mlp_pair(cfg_stock, None, False), x, frozen=frozen, sp=sp)
            p = _run_mlp(*_mlp_pair(cfg_plug, IDENTITY, True), x, frozen=frozen, main_grad=fusion, sp=sp)
            case = {"y": equal(s["y"], p["y"]), "dx": equal(s["dx"], p["dx"]), "plugin_calls": p["calls"]}
            for k in ("col_w", "row_w"):
                if fusion:  # stock without fusion + DDP's add into an FP32 main_grad
                    case[k] = equal(s[k].float(), p[k + "_main"]) and p[k + "_added"] and p[k] is not None
                else:
                    case[k] = equal(s[k], p[k])
            for k in ("col_b", "row_b"):
                case[k] = equal(s[k], p[k])
            res[f"tp{tp}{'_sp' if sp else ''}{'_fusion' if fusion else ''}{'_frozen' if frozen else ''}"] = case
    return res


# ---------------------------------------------------------------- GPTModel parity (identity)

def _gpt(config, plugin, recipe=IDENTITY, layers_spec=None, seed=5):
    torch.manual_seed(seed)
    spec = mm.get_gpt_layer_spec(recipe) if plugin else get_gpt_layer_local_spec()
    if layers_spec is not None:
        spec = layers_spec
    if plugin and config.gradient_accumulation_fusion:
        with mm.fusion_without_apex():
            model = H.tiny_gpt(config, spec)
        mm.convert_output_layer(model, recipe)
        mm.check_fusion_covered(model)
    else:
        model = H.tiny_gpt(config, spec)
    return model.to(DEVICE)


def _gpt_step(model, ddp, overlap, seed_data=0, microbatches=2):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if ddp:
        model = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                                        use_distributed_optimizer=False), module=model)
        model.zero_grad_buffer()
    losses = []
    for mb in range(microbatches):
        batch = [t.to(DEVICE) for t in H.gpt_batch(seed=seed_data + 100 * mb + RANK * (ps.get_tensor_model_parallel_world_size() == 1))]
        ctx = model.no_sync() if (ddp and mb < microbatches - 1) else _null()
        with ctx:
            loss = H.gpt_loss(model, batch)
            loss.backward()
        losses.append(loss.detach())
    if ddp:
        model.finish_grad_sync()
    inner = model.module if ddp else model
    grads = {}
    for n, p in inner.named_parameters():
        grads[n] = p.main_grad.clone() if ddp else (None if p.grad is None else p.grad.clone())
    return losses, grads


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


@scenario
def gpt_parity():
    """Tiny GPTModel: stock local spec vs plugin spec with the identity recipe; TP 1/2, ±DDP
    (main_grad, overlap on/off), ±fusion. Loss and every gradient must be bit-identical."""
    res = {}
    for tp in (1, 2):
        for ddp, overlap, fusion in [(False, False, False), (True, False, False), (True, True, False),
                                     (True, False, True), (True, True, True)]:
            with H.model_parallel(tp):
                stock = _gpt(H.tiny_config(tp=tp), plugin=False)
                plug = _gpt(H.tiny_config(tp=tp, fusion=fusion), plugin=True)
                n_mx = sum(isinstance(m, (mm.MXFP4ColumnParallelLinear, mm.MXFP4RowParallelLinear))
                           for m in plug.modules())
                ls, gs = _gpt_step(stock, ddp, overlap)
                lp, gp = _gpt_step(plug, ddp, overlap)
                bad = [n for n in gs if not equal(gs[n], gp.get(n))]
                missing = [n for n, g in gs.items() if g is None]
                res[f"tp{tp}{'_ddp' if ddp else ''}{'_overlap' if overlap else ''}{'_fusion' if fusion else ''}"] = {
                    "loss_equal": all(equal(a, b) for a, b in zip(ls, lp)),
                    "loss": ls[-1].item(), "grads_differ": bad, "n_params": len(gs), "no_grad": missing,
                    "n_mxfp4_linears": n_mx,
                }
    return res


@scenario
def sdpa_attention():
    """The local spec with `use_sdpa` (PyTorch's fused attention) against megatron-core's DotProductAttention:
    same loss and gradients up to float32 rounding, TP 1/2, multi-head and grouped-query attention, with the
    plugin's layers too; with dropout it still trains (the pattern is the fused kernel's)."""
    from megatron_mxfp4.megatron.attention import SDPAttention, use_sdpa

    res = {}
    for tp in (1, 2):
        for groups in (None, 2):
            kw = {} if groups is None else {"num_query_groups": groups}
            with H.model_parallel(tp):
                stock = _gpt(H.tiny_config(tp=tp, **kw), plugin=False)
                sdpa = _gpt(H.tiny_config(tp=tp, **kw), plugin=False, layers_spec=use_sdpa(get_gpt_layer_local_spec()))
                plug = _gpt(H.tiny_config(tp=tp, **kw), plugin=True,
                            layers_spec=use_sdpa(mm.get_gpt_layer_spec(IDENTITY)))
                n_sdpa = sum(isinstance(m, SDPAttention) for m in sdpa.modules())
                ls, gs = _gpt_step(stock, False, False)
                lq, gq = _gpt_step(sdpa, False, False)
                lp, gp = _gpt_step(plug, False, False)
                rel = lambda a, b: (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)  # noqa: E731
                res[f"tp{tp}_groups{groups}"] = {
                    "n_sdpa": n_sdpa, "loss_rel": max(rel(a, b) for a, b in zip(lq, ls)),
                    "grad_rel": max(rel(gq[n], gs[n]) for n in gs if gs[n] is not None),
                    "plugin_grad_rel": max(rel(gp[n], gs[n]) for n in gs if gs[n] is not None),
                }
    with H.model_parallel(1):
        drop = _gpt(H.tiny_config(dropout=0.5), plugin=False, layers_spec=use_sdpa(get_gpt_layer_local_spec()))
        nodrop = _gpt(H.tiny_config(), plugin=False, layers_spec=use_sdpa(get_gpt_layer_local_spec()))
        ld, _ = _gpt_step(drop, False, False)
        ln, _ = _gpt_step(nodrop, False, False)
        res["dropout"] = {"finite": bool(torch.isfinite(ld[-1])), "differs": not equal(ld[-1], ln[-1])}
    return res


# ---------------------------------------------------------------- randomness

@scenario
def rng_independence():
    """MXFP4 on vs stock with dropout 0.1: same loss (same dropout masks), same PyTorch RNG state
    after forward+backward, MXFP4 gradients close to (but not equal to) stock ones."""
    with H.model_parallel(1):
        cfg = H.tiny_config(dropout=0.1)
        stock = _gpt(cfg, plugin=False)
        plug = _gpt(H.tiny_config(dropout=0.1), plugin=True, recipe=ON)
        batch = [t.to(DEVICE) for t in H.gpt_batch(seed=1)]
        out = {}
        for name, model in (("stock", stock), ("plug", plug)):
            torch.manual_seed(123)
            loss = H.gpt_loss(model, batch)
            loss.backward()
            loss2 = H.gpt_loss(model, batch)  # a second draw of dropout masks
            rng = torch.cuda.get_rng_state() if DEVICE.type == "cuda" else torch.get_rng_state()
            out[name] = (loss.detach(), loss2.detach(), rng,
                         {n: p.grad.clone() for n, p in model.named_parameters()})
        s, p = out["stock"], out["plug"]
        names = [n for n in s[3] if "linear_" in n and n.endswith("weight")]
        cos = {n: torch.nn.functional.cosine_similarity(s[3][n].flatten().double(), p[3][n].flatten().double(),
                                                        dim=0).item() for n in names}
        return {"loss_equal": equal(s[0], p[0]), "loss2_equal": equal(s[1], p[1]),
                "rng_equal": torch.equal(s[2], p[2]), "min_cos": min(cos.values()),
                "n_linear_grads_equal": sum(equal(s[3][n], p[3][n]) for n in names), "n_linear": len(names)}


@scenario
def tp_statistics():
    """MXFP4 on: gradients at TP=2 (±SP) agree with TP=1 in the mean over seeds; both converge to
    the exact gradient like 1/sqrt(seeds). At aligned sizes and at sizes the backward zero-pads
    (hidden 12, FFN 100 = 2 x 50, 14 x 3 = 42 tokens)."""
    return {name: _tp_statistics(*shape) for name, shape in (("aligned", (64, 128, 16, 4)), ("odd", (12, 100, 14, 3)))}


def _tp_statistics(hidden, ffn, seq, batch):
    K = 16
    torch.manual_seed(0)
    w1 = torch.randn(ffn, hidden) * 0.1
    b1 = torch.randn(ffn) * 0.1
    w2 = torch.randn(hidden, ffn) * 0.1
    b2 = torch.randn(hidden) * 0.1
    x_full = torch.randn(seq, batch, hidden)

    def run(tp, sp, recipe):
        rank = ps.get_tensor_model_parallel_rank()
        col, row = _mlp_pair(H.tiny_config(tp=tp, sp=sp), recipe, True, hidden, ffn)
        with torch.no_grad():
            col.weight.copy_(w1.chunk(tp, 0)[rank])
            col.bias.copy_(b1.chunk(tp, 0)[rank])
            row.weight.copy_(w2.chunk(tp, 1)[rank])
            row.bias.copy_(b2)
        x = (x_full.chunk(tp, 0)[rank] if sp else x_full).to(DEVICE)
        o = _run_mlp(col, row, x, sp=sp)
        dx = tp_gather(o["dx"], 0) if sp else o["dx"]
        return torch.cat([tp_gather(o["col_w"], 0).flatten(), tp_gather(o["row_w"], 1).flatten(),
                          dx.flatten()]).double().cpu()

    res = {}
    with H.model_parallel(1):
        exact = run(1, False, IDENTITY)
        norm = exact.norm().item()
        means = {}
        single = {}
        samples = [run(1, False, MXFP4Recipe(seed=s, backend=ON.backend)) for s in range(K)]
        means["tp1"] = torch.stack(samples).mean(0)
        single["tp1"] = (samples[0] - exact).norm().item() / norm
    for key, sp in (("tp2", False), ("tp2_sp", True)):
        with H.model_parallel(2):
            samples = [run(2, sp, MXFP4Recipe(seed=s, backend=ON.backend)) for s in range(K)]
            means[key] = torch.stack(samples).mean(0)
            single[key] = (samples[0] - exact).norm().item() / norm
    for k in means:
        res[k] = {"single_err": single[k], "mean_err": (means[k] - exact).norm().item() / norm}
    res["tp1_vs_tp2"] = (means["tp1"] - means["tp2"]).norm().item() / norm
    res["tp1_vs_tp2_sp"] = (means["tp1"] - means["tp2_sp"]).norm().item() / norm
    res["K"] = K
    return res


# ---------------------------------------------------------------- spec coverage, LM head, BF16 layers

@scenario
def spec_coverage():
    res = {}
    recipe = MXFP4Recipe(bf16_first_layers=1, bf16_last_layers=1, lm_head=True, backend=ON.backend)
    with H.model_parallel(2):
        model = _gpt(H.tiny_config(tp=2, layers=4), plugin=True, recipe=recipe)
        layers = model.decoder.layers
        res["layer_class"] = [type(l).__name__ for l in layers]
        per_layer = []
        for l in layers:
            lin = {n: m for n, m in l.named_modules() if isinstance(m, (mm.MXFP4ColumnParallelLinear,
                                                                        mm.MXFP4RowParallelLinear))}
            per_layer.append({
                "number": l.layer_number,
                "linears": sorted(f"{n}:{type(m).__name__}" for n, m in lin.items()),
                "ids": sorted(m.mxfp4_layer_id for m in lin.values()),
                "names": sorted(m.mxfp4_name for m in lin.values()),
                "quantized": sorted({bool(m.recipe.dgrad and m.recipe.wgrad) for m in lin.values()}),
                "norms": [type(l.input_layernorm).__name__, type(l.pre_mlp_layernorm).__name__],
            })
        res["layers"] = per_layer
        res["head_before"] = type(model.output_layer).__name__
        mm.convert_output_layer(model, recipe)
        res["head_after"] = type(model.output_layer).__name__
        res["head_id"] = model.output_layer.mxfp4_layer_id
        loss = H.gpt_loss(model, [t.to(DEVICE) for t in H.gpt_batch()])
        loss.backward()
        res["all_grads_finite"] = all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                                      for p in model.parameters())
        calls = {}
        for n, m in model.named_modules():
            if hasattr(m, "_mxfp4_calls"):
                calls[n] = m._mxfp4_calls
        res["calls"] = sorted(set(calls.values()))
        res["n_mxfp4"] = len(calls)
    return res


# ---------------------------------------------------------------- state dict / checkpoints

@scenario
def state_dict():
    res = {}
    with H.model_parallel(2):
        cfg = H.tiny_config(tp=2)
        plug = _gpt(cfg, plugin=True, recipe=ON, seed=21)
        stock = _gpt(H.tiny_config(tp=2), plugin=False, seed=99)
        ks, kp = sorted(stock.state_dict().keys()), sorted(plug.state_dict().keys())
        res["keys_equal"] = ks == kp
        res["keys_only_plugin"] = sorted(set(kp) - set(ks))
        res["keys_only_stock"] = sorted(set(ks) - set(kp))
        meta = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
        sks = sorted(stock.sharded_state_dict(metadata=meta).keys())
        skp = sorted(plug.sharded_state_dict(metadata=meta).keys())
        res["sharded_keys_equal"] = sks == skp
        # plain checkpoint: saved from the plugin model, loaded strictly into a stock model
        buf = io.BytesIO()
        torch.save(plug.state_dict(), buf)
        buf.seek(0)
        missing, unexpected = stock.load_state_dict(torch.load(buf, weights_only=False), strict=True)
        batch = [t.to(DEVICE) for t in H.gpt_batch(seed=4)]
        with torch.no_grad():
            res["load_outputs_equal"] = equal(H.gpt_loss(stock, batch), H.gpt_loss(plug, batch))
        # distributed checkpoint (torch_dist; megatron-core needs CUDA for it): plugin -> fresh stock model
        if DEVICE.type == "cpu":
            return res
        try:
            from megatron.core import dist_checkpointing

            d = os.environ["MXFP4_TEST_CKPT_DIR"]
            os.makedirs(d, exist_ok=True)
            torch.distributed.barrier()
            plug2 = _gpt(H.tiny_config(tp=2), plugin=True, recipe=ON, seed=31)
            dist_checkpointing.save(plug2.sharded_state_dict(metadata=meta), d)
            stock2 = _gpt(H.tiny_config(tp=2), plugin=False, seed=77)
            loaded = dist_checkpointing.load(stock2.sharded_state_dict(metadata=meta), d)
            stock2.load_state_dict(loaded, strict=True)
            with torch.no_grad():
                res["dist_ckpt_outputs_equal"] = equal(H.gpt_loss(stock2, batch), H.gpt_loss(plug2, batch))
        except Exception as e:  # reported, asserted by the test
            res["dist_ckpt_error"] = f"{type(e).__name__}: {e}"
            print(f"rank {RANK}: dist checkpoint failed:", traceback.format_exc(), flush=True)
    return res


# ---------------------------------------------------------------- errors, fallbacks, FP8 forward

def _expect(exc_type, fn):
    try:
        fn()
    except exc_type as e:
        return str(e)
    except Exception as e:  # wrong type
        return f"WRONG {type(e).__name__}: {e}"
    return "NO ERROR"


@scenario
def errors_and_fallbacks():
    res = {}
    init = torch.nn.init.normal_
    with H.model_parallel(2):
        cfg = H.tiny_config(tp=2)
        res["bad_recipe"] = _expect(TypeError, lambda: mm.MXFP4ColumnParallelLinear(
            64, 128, config=cfg, init_method=init, bias=False, recipe="sr"))
        cfg_delay = H.tiny_config(tp=2)
        cfg_delay.delay_wgrad_compute = True
        res["delay_wgrad"] = _expect(ValueError, lambda: mm.MXFP4RowParallelLinear(
            128, 64, config=cfg_delay, init_method=init, bias=False, input_is_parallel=True,
            skip_bias_add=False, recipe=ON))
        col = mm.MXFP4ColumnParallelLinear(64, 128, config=cfg, init_method=init, bias=False, recipe=ON).to(DEVICE)
        x = torch.randn(16, 4, 64, device=DEVICE)
        common = dict(input=x, weight=col.weight, bias=None, gradient_accumulation_fusion=False,
                      allreduce_dgrad=True, sequence_parallel=False, grad_output_buffer=None,
                      wgrad_deferral_limit=None, tp_group=col.tp_group, gtp_remat_size=1)
        res["unknown_kwarg"] = _expect(TypeError, lambda: col._forward_impl(**common, some_new_option=3))
        res["future_default_ok"] = _expect(TypeError, lambda: col._forward_impl(**common, output_dtype=None))
        res["future_nondefault"] = _expect(TypeError, lambda: col._forward_impl(**common, output_dtype=torch.float32))
        res["positional"] = _expect(TypeError, lambda: col._forward_impl(x, col.weight, None))
        # embedding-wgrad deferral: stock path, one warning
        buf = []
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y1 = col._forward_impl(**dict(common, grad_output_buffer=buf, wgrad_deferral_limit=0))
            col._forward_impl(**dict(common, grad_output_buffer=buf, wgrad_deferral_limit=0))  # a second call must not warn again
        res["fallback_warnings"] = sum("embedding-wgrad deferral" in str(i.message) for i in w)
        res["fallback_is_stock"] = y1.grad_fn is not None and "LinearWithGradAccumulation" in type(y1.grad_fn).__name__
        # FP8 forward
        torch.manual_seed(0)
        col8 = mm.MXFP4ColumnParallelLinear(64, 128, config=cfg, init_method=init, bias=True,
                                            recipe=MXFP4Recipe(forward="fp8", backend=ON.backend)).to(DEVICE)
        ref = mm.MXFP4ColumnParallelLinear(64, 128, config=cfg, init_method=init, bias=True,
                                           recipe=IDENTITY).to(DEVICE)
        with torch.no_grad():
            ref.weight.copy_(col8.weight)
        xr = torch.randn(16, 4, 64, device=DEVICE, requires_grad=True)
        y8, _ = col8(xr)
        yr, _ = ref(xr)
        res["fp8_rel_err"] = ((y8 - yr).norm() / yr.norm()).item()
        y8.sum().backward()
        res["fp8_backward_finite"] = bool(torch.isfinite(col8.weight.grad).all() and torch.isfinite(xr.grad).all())
    return res


# ---------------------------------------------------------------- any size (DESIGN §3)

@scenario
def any_size():
    """Megatron's unit-test sizes (hidden 12, 36 = 2 x 18 local output features at TP=2): built without
    complaint; a no_grad / eval forward at 1, 7 and 8 tokens equals stock; 0 tokens give zero weight
    gradients of the right shapes (into main_grad); float64 is refused at the forward, before
    the sequence-parallel gather, in one line."""
    res = {}
    with H.model_parallel(2):
        for sp in (False, True):
            cfg = H.tiny_config(tp=2, sp=sp)
            stock, plug = _mlp_pair(cfg, None, False, 12, 36), _mlp_pair(cfg, ON, True, 12, 36)
            tp = ps.get_tensor_model_parallel_world_size()
            for seq in (2, 8, 14) if sp else (1, 7, 8):  # tokens per rank: 1, 4, 7 under SP
                x = torch.randn(seq, 1, 12, device=DEVICE)
                x = x.chunk(tp, 0)[ps.get_tensor_model_parallel_rank()] if sp else x
                for mode in ("no_grad", "eval"):
                    outs = []
                    for col, row in (stock, plug):
                        for m in (col, row):
                            m.train(mode != "eval")
                        with torch.no_grad() if mode == "no_grad" else _null():
                            h, _ = col(x.clone().requires_grad_(mode == "eval"))
                            outs.append(row(torch.nn.functional.gelu(h))[0])
                    res[f"{mode}_sp{int(sp)}_seq{seq}_equal"] = equal(*outs)
            if not sp:  # 0 tokens, wgrad accumulated into main_grad (gradient-accumulation fusion)
                fused = _mlp_pair(H.tiny_config(tp=2, fusion=True), ON, True, 12, 36)
                o = _run_mlp(*fused, torch.randn(0, 2, 12, device=DEVICE), main_grad=True)
                res["zero_tokens"] = {k: [list(o[k].shape), bool(o[k].count_nonzero() == 0)]
                                      for k in ("dx", "col_w_main", "row_w_main", "col_b", "row_b")}
            res[f"float64_sp{int(sp)}"] = _expect(TypeError, lambda: plug[0](torch.randn(4, 2, 12, dtype=torch.float64,
                                                                                           device=DEVICE)))
    return res


@scenario
def gpt_unit_test_sizes():
    """GPTModel at the sizes of megatron-core's own GPT unit test (2 layers, hidden 12, 4 heads, vocabulary 100,
    sequence 4, micro-batch 2: 8 tokens), MXFP4 spec vs stock local spec, TP 1 and 2: same logits, and
    every parameter gets a finite gradient aligned with stock's."""
    res = {}
    for tp in (1, 2):
        with H.model_parallel(tp):
            batch = [t.to(DEVICE) for t in H.gpt_batch(batch=2, seq=4, vocab=100)]
            out = []
            for plugin in (False, True):
                cfg = H.tiny_config(tp=tp, hidden=12, ffn=48, heads=4)
                torch.manual_seed(5)
                spec = mm.get_gpt_layer_spec(ON) if plugin else get_gpt_layer_local_spec()
                model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=100,
                                 max_sequence_length=4).to(DEVICE)  # learned positions (head dim 3: no RoPE)
                tokens, pos, mask, _ = batch
                logits = model(tokens, pos, mask)
                logits.float().square().mean().backward()
                grads = torch.cat([p.grad.flatten().double() for p in model.parameters()])
                out.append((logits.detach(), grads))
            (ls, gs), (lp, gp) = out
            res[f"tp{tp}"] = {"logits_equal": equal(ls, lp), "grads_finite": bool(torch.isfinite(gp).all()),
                              "cosine": torch.nn.functional.cosine_similarity(gs, gp, dim=0).item()}
    return res


# ---------------------------------------------------------------- argv -> config -> model

@scenario
def argv_flow():
    """The entry point's argument handling: Megatron's parser + --mxfp4-* flags -> recipe ->
    GPTModelConfig with the MXFP4 spec -> model (built as pretrain() would) -> forward/backward."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.gpt import GPTModelBuilder

    from megatron_mxfp4 import pretrain_gpt as entry

    argv = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-4", "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--transformer-impl", "local",
            "--tensor-model-parallel-size", "2", "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
            "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
            "--no-rope-fusion", "--no-persist-layer-norm",
            "--mxfp4-backward", "--mxfp4-rht-block", "32", "--mxfp4-forward", "fp8", "--mxfp4-gemms", "both",
            "--mxfp4-sign-policy", "per_layer", "--mxfp4-seed", "77", "--mxfp4-bf16-last-layers", "1",
            "--mxfp4-lm-head", "--mxfp4-backend", ON.backend]
    if DEVICE.type == "cpu":  # validate_args reads the GPU architecture when TP > 1
        import megatron.training.arguments as margs

        margs.get_device_arch_version = lambda: 9
    args = H.parse_entry_args(entry, argv)
    recipe, model_cfg = entry.build_model_config(args)
    res = {"recipe": None if recipe is None else {k: getattr(recipe, k) for k in recipe.__dataclass_fields__},
           "spec": type(model_cfg.transformer_layer_spec).__name__,
           "hooks": len(model_cfg.pre_wrap_hooks)}
    with H.model_parallel(2):
        model = GPTModelBuilder(model_cfg).build_model(pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        for hook in model_cfg.pre_wrap_hooks:
            hook([model])
        model = model.to(DEVICE)
        res["classes"] = sorted({f"{n.split('.')[-1]}:{type(m).__name__}" for n, m in model.named_modules()
                                 if n.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
                                                "output_layer"))})
        res["quantized_layers"] = [bool(l.mlp.linear_fc1.recipe.wgrad) for l in model.decoder.layers]
        res["forward"] = sorted({m.recipe.forward for m in model.modules() if getattr(m, "recipe", None)})
        loss = H.gpt_loss(model, [t.to(DEVICE) for t in H.gpt_batch()])
        loss.backward()
        res["loss_finite"] = bool(torch.isfinite(loss))
        res["grads_finite"] = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        # the entry point's data path and forward step, as pretrain() drives them (mock data)
        if DEVICE.type == "cpu":
            torch.Tensor.cuda = lambda self, *a, **k: self
        train_ds, _, _ = entry.train_valid_test_datasets_provider([8, 0, 0])
        it = iter(torch.utils.data.DataLoader(train_ds, batch_size=2)) if train_ds is not None else None
        res["dataset_on_rank"] = train_ds is not None
        output, loss_fn = entry.forward_step(it, model)
        loss_sum, n_tok, report = loss_fn(output)
        loss_sum.backward()
        res["step_tokens"] = int(n_tok)
        res["step_loss"] = (loss_sum / n_tok).item()
        res["report_keys"] = sorted(report)
    return res


def main(scenarios=None):
    """Run `scenarios` (name -> function; default: this file's) named on the command line, or all."""
    import faulthandler

    scenarios = SCENARIOS if scenarios is None else scenarios

    faulthandler.dump_traceback_later(float(os.environ.get("MXFP4_TEST_HANG_DUMP_S", "240")), exit=True)
    H.init_process_group()
    out_dir = sys.argv[1]
    names = sys.argv[2:] or list(scenarios)
    results = {}
    for name in names:
        try:
            results[name] = scenarios[name]()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        torch.distributed.barrier()
    if RANK == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
