"""Train a small HF GPT-2 with DeepSpeed: BF16 backward vs MXFP4 backward (SR + RHT).

The model is `transformers.GPT2LMHeadModel` built from a `GPT2Config` (nothing downloaded); the
data is the Python standard library's own source as bytes (vocabulary 256), the corpus of
`megatron_mxfp4.demo`. Both arms start from the same initialization and see the same batches; the
MXFP4 arm converts the decoder linears (GPT-2's `Conv1D`s; the tied LM head stays unquantized) with
`megatron_mxfp4.deepspeed.initialize`, which reads the recipe from the config's "mxfp4" section.

    # GPU (one node)
    deepspeed --num_gpus 8 examples/deepspeed/train_gpt2.py \\
        --deepspeed_config examples/deepspeed/ds_config.json --steps 300
    # CPU (gloo)
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 examples/deepspeed/train_gpt2.py \\
        --deepspeed_config examples/deepspeed/ds_config.json --steps 100 --n-embd 128 --n-layer 2

Prints a loss table (mean of a 10-step window at a few steps, then the validation loss) and, with
`--out`, writes the losses, the config and the command as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from megatron_mxfp4 import MXFP4Recipe
from megatron_mxfp4 import deepspeed as mds
from megatron_mxfp4.demo import stdlib_corpus

ARMS = ("bf16", "mxfp4")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default="bf16,mxfp4", help="comma list of: " + ", ".join(ARMS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per rank and micro-step (default: the config's train_micro_batch_size_per_gpu)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--zero-stage", type=int, default=None, help="override zero_optimization.stage")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.add_config_arguments(ap)
    args = ap.parse_args(argv)
    for arm in args.arms.split(","):
        if arm not in ARMS:
            ap.error(f"unknown arm {arm!r}; choose from {ARMS}")
    if not args.deepspeed_config:
        ap.error("--deepspeed_config is required (e.g. examples/deepspeed/ds_config.json)")
    return args


def build_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(cfg)


def batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int, rank: int):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    for _ in range(n):
        i = torch.randint(0, data.numel() - seq, (batch,), generator=g)
        yield torch.stack([data[j:j + seq] for j in i.tolist()])


def arm_config(base: dict, arm: str, args) -> dict:
    cfg = copy.deepcopy(base)
    if args.micro_batch is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = args.lr
    cfg["scheduler"] = {"type": "WarmupCosineLR",
                        "params": {"total_num_steps": args.steps, "warmup_num_steps": args.warmup,
                                   "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}}
    section = dict(cfg.get(mds.CONFIG_KEY) or {})
    if arm == "bf16":
        section["enabled"] = False
    elif not section.get("enabled"):  # the mxfp4 arm without a section: the default recipe
        section = mds.config_section(MXFP4Recipe())
    cfg[mds.CONFIG_KEY] = section
    return cfg


def train_arm(arm: str, base_cfg: dict, data, val, args, device):
    cfg = arm_config(base_cfg, arm, args)
    model = build_model(args)
    engine, _, _, _ = mds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    rank = torch.distributed.get_rank()
    mb = engine.train_micro_batch_size_per_gpu()
    gas = engine.gradient_accumulation_steps()
    converted = mds.converted_modules(engine.module)
    if rank == 0:
        print(f"[{arm}] {len(converted)} linears with an MXFP4 backward"
              f"{': ' + str(converted[0][1].recipe) if converted else ''}; ZeRO stage "
              f"{engine.zero_optimization_stage()}, micro-batch {mb}, grad accumulation {gas}", flush=True)
    losses, t0 = [], time.time()
    stream = batches(data, args.steps * gas, mb, args.seq, args.seed, rank)
    for step in range(args.steps):
        total = 0.0
        for _ in range(gas):
            ids = next(stream).to(device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            total += loss.item() / gas
        t = torch.tensor([total], device=device)
        torch.distributed.all_reduce(t)
        losses.append(t.item() / torch.distributed.get_world_size())
        if rank == 0 and (step + 1) % max(1, args.steps // 10) == 0:
            print(f"[{arm}] step {step + 1:5d} loss {losses[-1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
    engine.eval()
    with torch.no_grad():
        vl = [engine(input_ids=ids.to(device), labels=ids.to(device)).loss.item()
              for ids in batches(val, args.eval_batches, mb, args.seq, seed=999, rank=rank)]
    v = torch.tensor([sum(vl) / len(vl)], device=device)
    torch.distributed.all_reduce(v)
    return {"losses": losses, "val": v.item() / torch.distributed.get_world_size(),
            "seconds": time.time() - t0, "converted": len(converted)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(results: dict, steps: int) -> str:
    arms = list(results)
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    lines = ["| step | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for s in marks:  # mean of a 10-step window ending at s smooths batch noise
        cells = []
        for a in arms:
            w = results[a]["losses"][max(0, s - 9):s + 1]
            cells.append(f"{sum(w) / len(w):.4f}")
        lines.append(f"| {s + 1} | " + " | ".join(cells) + " |")
    lines.append("| val | " + " | ".join(f"{results[a]['val']:.4f}" for a in arms) + " |")
    lines.append("| time (s) | " + " | ".join(f"{results[a]['seconds']:.0f}" for a in arms) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, verbose=False)
    if on_cpu:
        device = torch.device("cpu")
    else:
        accel.set_device(args.local_rank)
        device = torch.device(accel.device_name(), args.local_rank)
    base_cfg = mds.load_config(args.deepspeed_config)
    corpus = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    split = int(0.95 * corpus.numel())
    data, val = corpus[:split], corpus[split:]
    rank = torch.distributed.get_rank()
    if rank == 0:
        print(f"corpus: {corpus.numel():,} bytes; GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} "
              f"seq={args.seq}; {args.steps} steps on {torch.distributed.get_world_size()} ranks "
              f"({accel.device_name()})", flush=True)
    results = {arm: train_arm(arm, base_cfg, data, val, args, device) for arm in args.arms.split(",")}
    if rank == 0:
        text = table(results, args.steps)
        print("\n" + text, flush=True)
        if args.out:
            device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not on_cpu \
                else cpu_name()
            with open(args.out, "w") as f:
                json.dump({"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
                           "world_size": torch.distributed.get_world_size(), "device": str(device_name),
                           "accelerator": accel.device_name(), "torch": torch.__version__,
                           "deepspeed": deepspeed.__version__, "args": vars(args),
                           "config": arm_config(base_cfg, "mxfp4", args), "table": text, "results": results},
                          f, indent=1)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
