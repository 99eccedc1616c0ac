"""Model and training presets. Every field can be overridden on the command line."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Config:
    # model (GPT: learned absolute positions, LayerNorm, GeLU, tied embeddings, biases)
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq_length: int
    dropout: float
    init_std: float
    # optimization (AdamW, linear warmup then cosine decay to min_lr)
    steps: int
    global_batch: int
    micro_batch: int
    lr: float
    min_lr: float
    warmup: int
    weight_decay: float
    clip_grad: float
    beta2: float
    # data, evaluation, checkpoints
    corpus: str
    split: str
    eval_interval: int
    eval_samples: int
    save_interval: int
    log_interval: int
    # Mixture-of-Experts MLPs (0 = dense): `experts` routed experts of width `ffn`, `topk` per token
    experts: int = 0
    topk: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **kw) -> "Config":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def params_estimate(self, vocab: int) -> int:
        """Parameter count of the GPT (tied embeddings, two LayerNorms per layer, biases in the dense
        model; with experts every expert's MLP and the router, no linear biases)."""
        h, f, b = self.hidden, self.ffn, 0 if self.experts else 1
        mlp = (2 * h * f + b * (f + h)) * max(1, self.experts) + self.experts * h
        per_layer = 4 * h * h + b * 4 * h + mlp + 4 * h
        return self.layers * per_layer + vocab * h + self.seq_length * h + 2 * h

    def model_flops_per_token(self, vocab: int) -> int:
        """Training FLOPs per token of the model, for MFU: 6 × the multiply-adds' weights a token meets (QKV,
        projection, the MLP — the top-k experts' with experts — and the LM head) + 12 · layers · hidden · seq
        for the attention scores and their weighted sum (counted whole, as PaLM's appendix B counts them)."""
        h, f = self.hidden, self.ffn
        mlp = 2 * h * f * (self.topk if self.experts else 1)
        weights = self.layers * (4 * h * h + mlp) + vocab * h
        return 6 * weights + 12 * self.layers * h * self.seq_length


FIELDS = tuple(f.name for f in fields(Config))

PRESETS = {
    # CPU, minutes: the quick start (3 arms in well under 10 minutes on 2 cores)
    "tiny": Config(layers=2, hidden=128, heads=4, ffn=512, seq_length=128, dropout=0.0, init_std=0.02,
                   steps=250, global_batch=8, micro_batch=8, lr=2e-3, min_lr=2e-4, warmup=25, weight_decay=0.1,
                   clip_grad=1.0, beta2=0.99, corpus="stdlib", split="97,3,0", eval_interval=50, eval_samples=48,
                   save_interval=50, log_interval=10),
    # GPU: a GPT-2-small-shaped model (12 x 768; ~92M parameters with the 8k vocabulary) on the Wikipedia
    # corpus, several epochs (the corpus is 1.35M tokens): the H200 study
    "small": Config(layers=12, hidden=768, heads=12, ffn=3072, seq_length=1024, dropout=0.1, init_std=0.02,
                    steps=600, global_batch=32, micro_batch=16, lr=6e-4, min_lr=6e-5, warmup=30, weight_decay=0.1,
                    clip_grad=1.0, beta2=0.95, corpus="wiki", split="95,5,0", eval_interval=50, eval_samples=64,
                    save_interval=100, log_interval=10),
    # GPU: the paper's GPT-345M (24 x 1024, 16 heads, sequence 1024, batch 64, LR 1.5e-4 -> 1e-5, wd 0.01);
    # the paper trained 500k iterations on 3.3B Wikipedia tokens, the default here is a short run
    "gpt-345m": Config(layers=24, hidden=1024, heads=16, ffn=4096, seq_length=1024, dropout=0.1, init_std=0.02,
                       steps=5000, global_batch=64, micro_batch=8, lr=1.5e-4, min_lr=1e-5, warmup=50,
                       weight_decay=0.01, clip_grad=1.0, beta2=0.999, corpus="wiki", split="95,5,0",
                       eval_interval=250, eval_samples=64, save_interval=500, log_interval=10),
    # GPU: the second study (docs/convergence.md): ~123M parameters (12 x 896, 14 heads of 64) on the
    # site-packages corpus, split by package, 1100 steps x 96 sequences of 1024 = 108M tokens read once
    # (the corpus must hold that many train tokens: mxfp4-preprocess reports its count); no dropout, so that
    # the arms see identical activations
    "study": Config(layers=12, hidden=896, heads=14, ffn=3584, seq_length=1024, dropout=0.0, init_std=0.02,
                    steps=1100, global_batch=96, micro_batch=16, lr=6e-4, min_lr=6e-5, warmup=100,
                    weight_decay=0.1, clip_grad=1.0, beta2=0.95, corpus="site-packages", split="99,1,0",
                    eval_interval=50, eval_samples=256, save_interval=100, log_interval=10),
}
# MoE: the dense presets with 8 experts, top-2, each expert as wide as the dense MLP divided by 4
PRESETS["tiny-moe"] = replace(PRESETS["tiny"], ffn=128, experts=8, topk=2)  # CPU, minutes
PRESETS["small-moe"] = replace(PRESETS["small"], ffn=768, experts=8, topk=2)  # GPU
