"""A CPU demo: train a tiny GPT on embedded text with an unquantized vs an MXFP4 backward.

The text is the Python standard library's own source (on every machine, nothing to download),
tokenized as bytes. Every arm starts from the same initialization and sees the same batches; only
the backward GEMMs of the decoder linears differ. Prints a loss table.

    python -m megatron_mxfp4.demo [--steps 150] [--arms baseline,mxfp4,mxfp4-rht-sr]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from .data.corpus import stdlib_corpus
from .linear import convert_linears
from .recipe import MXFP4Recipe

ARMS = {
    "baseline": None,
    "mxfp4": MXFP4Recipe(rounding="rtn", rht_block=0),
    "mxfp4-sr": MXFP4Recipe(rounding="sr", rht_block=0),
    "mxfp4-rht": MXFP4Recipe(rounding="rtn"),
    "mxfp4-rht-sr": MXFP4Recipe(),
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=256, d=128, heads=4, layers=2, seq=128):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        idx = torch.stack([data[j:j + seq + 1] for j in i.tolist()])
        yield idx[:, :-1], idx[:, 1:]


def train_arm(recipe, data, val, args):
    torch.manual_seed(args.seed)
    model = TinyGPT(d=args.hidden, layers=args.layers, seq=args.seq)
    if recipe is not None:  # the decoder linears only; the LM head stays unquantized
        convert_linears(model, recipe, filter=lambda name, m: name.startswith("blocks."))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    losses = []
    for step, (x, y) in enumerate(batches(data, args.steps, args.batch, args.seq, args.seed)):
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        vl = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
              for x, y in batches(val, 8, args.batch, args.seq, seed=999)]
    return losses, sum(vl) / len(vl)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Tiny GPT on CPU: unquantized vs MXFP4 backward")
    ap.add_argument("--arms", default="baseline,mxfp4,mxfp4-rht-sr", help=f"comma list of {sorted(ARMS)}")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    for a in arms:
        if a not in ARMS:
            ap.error(f"unknown arm {a!r}; choose from {sorted(ARMS)}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    corpus = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    split = int(0.95 * corpus.numel())
    data, val = corpus[:split], corpus[split:]
    print(f"corpus: {corpus.numel():,} bytes of Python stdlib source; tiny GPT d={args.hidden} "
          f"layers={args.layers}; {args.steps} steps of {args.batch}x{args.seq} tokens")
    results = {}
    for arm in arms:
        t0 = time.time()
        results[arm] = train_arm(ARMS[arm], data, val, args)
        print(f"  {arm:14s} done in {time.time() - t0:5.1f} s")
    marks = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    print("\n| step | " + " | ".join(arms) + " |")
    print("|---|" + "---|" * len(arms))
    for s in marks:  # mean of a 10-step window ending at s smooths batch noise
        cells = [sum(results[a][0][max(0, s - 9):s + 1]) / len(results[a][0][max(0, s - 9):s + 1]) for a in arms]
        print(f"| {s + 1} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    print("| val | " + " | ".join(f"{results[a][1]:.3f}" for a in arms) + " |")
    return results


if __name__ == "__main__":
    main()
