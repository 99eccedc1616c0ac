"""AdamW on FP32 master weights, reading the FP32 `main_grad` buffers of megatron-core's DDP.

megatron-core's own optimizer allocates on CUDA unconditionally; this one runs on CPU and GPU with
the same semantics as Megatron's mixed-precision path: BF16 model weights, FP32 gradients
(`grad_reduce_in_fp32`) and FP32 master weights + Adam moments, global gradient-norm clipping
over the tensor-parallel group (a parameter replicated on every TP rank counts once), no weight
decay on biases and norm weights, and a skipped step when the gradient norm is not finite.
"""
from __future__ import annotations

import math
from typing import List

import torch


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr over cfg.warmup steps, cosine decay to cfg.min_lr at cfg.steps."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


class MasterAdamW:
    def __init__(self, model: torch.nn.Module, cfg):
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        self.params: List[torch.nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().clone().float() if p.dtype != torch.float32 else p for p in self.params]
        self.counted = [bool(param_is_not_tensor_parallel_duplicate(p)) for p in self.params]
        decay = [m for p, m in zip(self.params, self.master) if p.dim() >= 2]
        no_decay = [m for p, m in zip(self.params, self.master) if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        try:  # one fused kernel per step (CPU and CUDA); the same update rule as the per-tensor loop
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, foreach=True)
        self.clip = cfg.clip_grad
        self.skipped = 0

    def grad_norm(self) -> float:
        from megatron.core import parallel_state as ps

        grads = [self._grad(p).float() for p, counted in zip(self.params, self.counted) if counted]
        sq = torch.stack(torch._foreach_norm(grads)).pow(2).sum() if grads else \
            torch.zeros((), device=self.params[0].device)
        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
        return float(sq.sqrt())

    @staticmethod
    def _grad(p):
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        return g

    def step(self, lr: float):
        """Clip, update, copy to the model weights. Returns (grad norm, applied)."""
        norm = self.grad_norm()
        if not math.isfinite(norm):
            self.skipped += 1
            return norm, False
        scale = min(1.0, self.clip / (norm + 1e-6)) if self.clip > 0 else 1.0
        for p, m in zip(self.params, self.master):
            g = self._grad(p)
            m.grad = g if scale == 1.0 else g * scale
            if m.grad.dtype != torch.float32:
                m.grad = m.grad.float()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                m.grad = None  # never leave the DDP buffer aliased as .grad
                if m is not p:
                    p.copy_(m.to(p.dtype))
        return norm, True

    def state_dict(self) -> dict:
        return {"adam": self.opt.state_dict(), "skipped": self.skipped,
                "master": [m.detach().clone() if m is not p else None for p, m in zip(self.params, self.master)]}

    def load_state_dict(self, sd: dict) -> None:
        self.opt.load_state_dict(sd["adam"])
        self.skipped = int(sd.get("skipped", 0))
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.master, sd["master"]):
                if m is not p and saved is not None:
                    m.copy_(saved)
