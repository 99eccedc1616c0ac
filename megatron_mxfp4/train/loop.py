"""Training of one (arm, seed): the step loop, evaluation, checkpoints and final results.

Data order: step s uses samples [s·G, (s+1)·G) of the train GPTDataset (G = global batch), whose
order is fixed by the seed alone; data-parallel rank r takes rows [r·G/dp, (r+1)·G/dp) in micro
batches. Validation always uses the same first samples of the validation split. So every arm of a
seed sees the same batches in the same order, from the same initial weights, with the same
dropout masks (the MXFP4 randomness comes from its own Philox streams, never from PyTorch's).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time
from typing import Optional

import torch

from .. import diagnostics
from . import checkpoint as ckpt
from .metrics import peak_flops
from .errors import UsageError
from .metrics import MetricsWriter, trim_logs
from .model import build_model
from .optim import MasterAdamW, lr_at


def finalize_model_grads(models):
    from megatron.core.distributed import finalize_model_grads as _finalize

    _finalize(models)


class SimulatedKill(SystemExit):
    pass


class TimeLimitReached(Exception):
    """Raised after a checkpoint when --time-limit is reached; the same command continues."""


def _past(deadline: Optional[float], dist) -> bool:
    if deadline is None:
        return False
    flag = torch.tensor([1.0 if time.time() > deadline else 0.0], device=dist.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank stops together
    return bool(flag.item())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _micro_batches(dataset, step: int, cfg, dist):
    from ..data.indexed import sample_batch

    per_rank = cfg.global_batch // dist.dp
    base = step * cfg.global_batch + dist.dp_rank * per_rank
    for i in range(0, per_rank, cfg.micro_batch):
        yield sample_batch(dataset, base + i, cfg.micro_batch)


def _forward_loss(model, batch, causal_only: bool = False):
    """(sum of token losses, number of loss tokens) of one micro batch. `causal_only`: pass no attention mask
    (the batches' masks are plain causal ones: the fused attention of "local_sdpa" then takes its causal flag
    and its flash kernels, which an explicit mask would rule out)."""
    attention_mask = None if causal_only else batch["attention_mask"]
    losses = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"])
    mask = batch["loss_mask"].to(losses.dtype)
    return (losses.float() * mask).sum(), mask.sum()


def _dp_sum(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return t


def _eval_samples(valid, cfg, dist) -> int:
    """How many validation samples an evaluation reads: whole micro batches on every data-parallel rank."""
    per = dist.dp * cfg.micro_batch
    n = min(cfg.eval_samples, len(valid))
    return n - n % per


def check_data(cfg, dist, data) -> None:
    """Refuse (UsageError) a batch layout or datasets the run cannot use, before it trains."""
    train_ds, valid_ds = data
    if cfg.global_batch % (dist.dp * cfg.micro_batch):
        raise UsageError(f"--global-batch {cfg.global_batch} is not a multiple of --micro-batch {cfg.micro_batch} × "
                         f"data-parallel size {dist.dp}")
    if len(train_ds) < cfg.steps * cfg.global_batch:
        raise UsageError(f"the train dataset has {len(train_ds)} samples, {cfg.steps * cfg.global_batch} needed")
    if _eval_samples(valid_ds, cfg, dist) == 0:
        raise UsageError(f"an evaluation needs --eval-samples and the validation split ({len(valid_ds)} samples) to "
                         f"hold at least --micro-batch × data-parallel size = {dist.dp * cfg.micro_batch} samples")


def evaluate(model, valid, cfg, dist, causal_only: bool = False) -> float:
    """Token-weighted mean loss over the first validation samples (the same ones every time)."""
    from ..data.indexed import sample_batch

    per = dist.dp * cfg.micro_batch
    n = _eval_samples(valid, cfg, dist)
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=dist.device)
    with torch.no_grad():
        for start in range(dist.dp_rank * cfg.micro_batch, n, per):
            s, c = _forward_loss(model, _to(sample_batch(valid, start, cfg.micro_batch), dist.device), causal_only)
            tot[0] += s.double()
            tot[1] += c.double()
    model.train()
    _dp_sum(tot)
    return float(tot[0] / tot[1])


def _sync(dist):
    if dist.device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(dist) -> float:
    if dist.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_arm(arm, seed: int, cfg, dist, run_dir: str, data, *, dtype, impl: str, vocab_size: int,
              progress: bool = True, exit_after_step: Optional[int] = None, deadline: Optional[float] = None,
              diagnostics_cfg: Optional[dict] = None, log=print) -> dict:
    """Train one arm with one seed in `run_dir` (resuming from its latest checkpoint); returns the
    final results (also written to ``run_dir/done.json``).

    `diagnostics_cfg`: `MXFP4Monitor` options (interval, snr_threshold, patience, unquantized_tail) for
    the MXFP4 arms; statistics go to ``run_dir/diagnostics.jsonl``."""
    train_ds, valid_ds = data
    done_path = os.path.join(run_dir, "done.json")
    if os.path.exists(done_path):
        with open(done_path) as f:
            return json.load(f)
    check_data(cfg, dist, data)
    os.makedirs(run_dir, exist_ok=True)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, gpt = build_model(cfg, arm, dist, dtype, impl, vocab_size, seed)
    optimizer = MasterAdamW(model, cfg)
    is_main = dist.rank == 0
    monitor = None
    if diagnostics_cfg and arm.recipe is not None and arm.recipe.backward_format == "mxfp4":
        monitor = diagnostics.MXFP4Monitor(total_steps=cfg.steps, **diagnostics_cfg,
                                           jsonl_path=os.path.join(run_dir, "diagnostics.jsonl") if is_main else None)
    start = 0
    resume = ckpt.latest_step(run_dir)
    if resume is not None:
        state = ckpt.load(run_dir, resume, gpt, optimizer, dist)
        start = resume + 1
        if monitor is not None and "monitor" in state:
            monitor.load_state_dict(state["monitor"])
    if is_main:
        trim_logs(run_dir, resume)  # what an interrupted run logged after its checkpoint is logged again
    writer = MetricsWriter(run_dir, resume, enabled=is_main)
    tokens_per_step = cfg.global_batch * cfg.seq_length
    if is_main:
        log(f"[{arm.name} seed {seed}] {'resuming at step ' + str(start) if start else 'start'}; "
            f"{cfg.steps} steps × {tokens_per_step:,} tokens; run folder {run_dir}")
    bar = None
    if progress and is_main:
        try:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=f"{arm.name} s{seed}", dynamic_ncols=True, leave=True)
        except ImportError:
            bar = None
    step_times, last_val = [], None
    t_arm = time.time()
    model.train()
    diagnostics.set_active_monitor(monitor)
    try:
        for step in range(start, cfg.steps):
            _sync(dist)
            t0 = time.time()
            lr = lr_at(step, cfg)
            model.zero_grad_buffer()
            tot = torch.zeros(2, dtype=torch.float64, device=dist.device)
            n_micro = cfg.global_batch // (dist.dp * cfg.micro_batch)
            for i, batch in enumerate(_micro_batches(train_ds, step, cfg, dist)):
                if monitor is not None:
                    monitor.micro_batch(i)
                s, c = _forward_loss(model, _to(batch, dist.device), impl == "local_sdpa")
                (s / c / n_micro).backward()
                tot[0] += s.detach().double()
                tot[1] += c.detach().double()
            finalize_model_grads([model])  # DP reduction, SP LayerNorm and tied-embedding grads
            gnorm, applied = optimizer.step(lr)
            if monitor is not None:
                monitor.end_step()  # reduces the sampled statistics over ranks; may switch GEMMs
            _dp_sum(tot)
            loss = float(tot[0] / tot[1])
            _sync(dist)
            dt = time.time() - t0
            step_times.append(dt)
            rec = {"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "step_time": dt,
                   "tokens_per_s": tokens_per_step / dt, "tokens": (step + 1) * tokens_per_step}
            if not applied:
                rec["skipped"] = True
            writer.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
            elif is_main and (step % cfg.log_interval == 0 or step == cfg.steps - 1):
                log(f"  {arm.name} s{seed} step {step:5d}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_step / dt:,.0f} tok/s")
            last = step == cfg.steps - 1
            if (step + 1) % cfg.eval_interval == 0 or last:
                last_val = evaluate(model, valid_ds, cfg, dist, impl == "local_sdpa")
                writer.write({"kind": "valid", "step": step, "loss": last_val, "tokens": (step + 1) * tokens_per_step})
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", val=f"{last_val:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            stop = not last and _past(deadline, dist)
            if (step + 1) % cfg.save_interval == 0 or last or stop:
                extra = {"arm": arm.name, "seed": seed}
                if monitor is not None:
                    extra["monitor"] = monitor.state_dict()
                ckpt.save(run_dir, step, gpt, optimizer, dist, extra)
            if stop:
                raise TimeLimitReached(f"{arm.name} seed {seed}: time limit reached after step {step} (checkpoint saved)")
            if exit_after_step is not None and step == exit_after_step:
                raise SimulatedKill(f"stopped after step {step} (--exit-after-step)")
    finally:  # also on Ctrl-C: the progress bar ends its line before the message
        diagnostics.set_active_monitor(None)
        if bar is not None:
            bar.close()
        writer.close()
    result = summarize_arm(run_dir, arm.name, seed, cfg, dist, dtype, impl, gpt, step_times, time.time() - t_arm)
    if is_main:
        with open(done_path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(done_path + ".tmp", done_path)
        ckpt.keep_only_latest(run_dir)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    del model, gpt, optimizer
    return result


def summarize_arm(run_dir, arm_name, seed, cfg, dist, dtype, impl, gpt, step_times, wall) -> dict:
    from .metrics import read_jsonl

    recs = read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if dist.rank == 0 else []
    train = [r for r in recs if r["kind"] == "train"]
    valid = [r for r in recs if r["kind"] == "valid"]
    tail = train[-max(1, len(train) // 10):]
    times = [r["step_time"] for r in train[min(len(train) - 1, 3):]] if train else []
    tps = cfg.global_batch * cfg.seq_length / statistics.median(times) if times else float("nan")
    n_params = sum(p.numel() for p in gpt.parameters())
    flops = cfg.model_flops_per_token(gpt.vocab_size)
    peak = peak_flops(_device_name(dist), dtype)
    return {
        "arm": arm_name, "seed": seed, "steps": cfg.steps, "tokens": cfg.steps * cfg.global_batch * cfg.seq_length,
        "final_val_loss": valid[-1]["loss"] if valid else None,
        "final_train_loss": sum(r["loss"] for r in tail) / len(tail) if tail else None,
        "tokens_per_s": tps, "peak_memory_mb": _peak_memory_mb(dist), "model_flops_per_token": flops,
        "mfu": tps * flops / (peak * dist.world) if peak else None,
        "memory_kind": "cuda max allocated" if dist.device.type == "cuda" else "process peak RSS",
        "params_per_tp_rank": n_params, "dtype": str(dtype).replace("torch.", ""), "device": _device_name(dist),
        "transformer_impl": impl, "tp": dist.tp, "dp": dist.dp, "wall_s_this_process": wall,
        "skipped_steps": sum(1 for r in train if r.get("skipped")),
    }


def _device_name(dist) -> str:
    if dist.device.type == "cuda":
        return torch.cuda.get_device_name(dist.device)
    return f"cpu ({os.cpu_count()} cores)"
