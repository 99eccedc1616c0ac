"""Run-time diagnostics of the MXFP4 backward: how much gradient signal survives quantization.

Every `interval` steps (on one micro-batch), each MXFP4 GEMM also computes its exact product and
records, per layer and GEMM:

* rel_err = ‖g_q − g‖ / ‖g‖, cosine(g_q, g), snr = ‖g‖ / ‖g_q − g‖ (g: the exact GEMM output);
* clip_frac: fraction of 32-blocks of an operand whose max would have clipped at 6 without the 3/4
  prescale (max · 2^-e in (6, 8)); zero_frac: fraction of nonzero operand entries flushed to zero.

A guard (off by default) switches a GEMM of a layer to the unquantized backward when its SNR stays
below a threshold for `patience` consecutive checks, and a schedule can run the last fraction of
steps unquantized. Statistics are averaged over all ranks before any decision, so every rank of a
tensor-/data-parallel job takes the same decision at the same step.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .numerics import format as fmt
from .numerics.rht import apply_rht

STAT_NAMES = ("rel_err", "cosine", "snr", "clip_frac_a", "clip_frac_b", "zero_frac_a", "zero_frac_b")
#: Operand statistics are estimated on at most this many evenly strided rows: they need the operand's
#: rotated values again, which on a large operand costs more than everything else a check does.
OPERAND_STAT_ROWS = 1024
_warned = set()


def exact_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 from the unquantized operands (the reference a check compares against, and the
    backward of a GEMM the guard switched off). On a GPU with two BF16 (or two FP16) operands it is one
    16-bit tensor-core GEMM with float32 output: the same products, summed in float32, an order of
    magnitude faster than a float32 GEMM."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError) as e:  # torch without mm(..., out_dtype)
            if "mm" not in _warned:
                _warned.add("mm")
                warnings.warn(f"megatron_mxfp4 diagnostics: 16-bit GEMM with float32 output unavailable ({e}); "
                              "the exact products run in float32", RuntimeWarning, stacklevel=2)
    return a.float() @ b.float()


def _error_stats(exact: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """[rel_err, cosine, snr] as a float64 tensor on the operands' device (no host synchronization).
    Norms accumulate in float64 without float64 copies of the outputs; g·q = (‖g‖² + ‖q‖² − ‖q − g‖²)/2."""
    g, q = exact.float().flatten(), approx.float().flatten()
    norm = lambda t: torch.linalg.vector_norm(t, dtype=torch.float64)  # noqa: E731
    err, gn, qn = norm(q - g), norm(g), norm(q)
    cos = (gn * gn + qn * qn - err * err) / (2 * gn * qn).clamp_min(1e-300)
    return torch.stack((err / gn.clamp_min(1e-300), cos, gn / err.clamp_min(1e-300)))


def _operand_stats(x: torch.Tensor, signs: Optional[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """[clip_frac, zero_frac] as a float64 tensor on x's device (see `operand_stats`)."""
    y = x.to(torch.float32)
    if codes.shape[-1] != y.shape[-1]:  # K was zero-padded by the quantizer: rotate the same padded rows
        y = torch.nn.functional.pad(y, (0, codes.shape[-1] - y.shape[-1]))
    if signs is not None:
        y = apply_rht(y, signs)
    blocks = y.reshape(y.shape[0], -1, fmt.BLOCK)
    finite = torch.isfinite(blocks).all(-1)
    amax = torch.where(finite.unsqueeze(-1), blocks.abs(), torch.zeros_like(blocks)).amax(-1)
    scaled_max = amax * fmt.exp2_int(-fmt.shared_exponent(amax))
    clip = ((scaled_max > fmt.E2M1_MAX) & finite).double().mean()
    nonzero = y != 0
    flushed = nonzero & ((codes & 0x7) == 0)
    zero = flushed.sum().double() / nonzero.sum().clamp_min(1).double()
    return torch.stack((clip, zero))


def _strided_rows(x: torch.Tensor, q) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, codes of its MXFP4Tensor q) on at most OPERAND_STAT_ROWS evenly strided rows of x [M, K]."""
    stride = -(-x.shape[0] // OPERAND_STAT_ROWS)
    if q.dim % x.dim() == x.dim() - 1:  # quantized along K: unpack only the rows kept
        return x[::stride], fmt.unpack_nibbles(q.data[::stride])
    return x[::stride], q.codes()[::stride]


def gemm_error_stats(exact: torch.Tensor, approx: torch.Tensor) -> Dict[str, float]:
    """rel_err, cosine and snr of an approximate GEMM output against the exact one (float64 math)."""
    return dict(zip(("rel_err", "cosine", "snr"), _error_stats(exact, approx).tolist()))


def operand_stats(x: torch.Tensor, signs: Optional[torch.Tensor], codes: torch.Tensor) -> Tuple[float, float]:
    """(clip_frac, zero_frac) of operand `x` [M, K] quantized along K into `codes` [M, Kp] (K zero-padded
    to Kp by the quantizer: the statistics are those of the padded operand the GEMM reads).

    clip_frac counts blocks whose scaled max lies in (6, 8), i.e. that round-to-nearest without the
    3/4 prescale would clip; zero_frac counts nonzero (rotated) entries whose code is ±0.
    """
    clip, zero = _operand_stats(x, signs, codes).tolist()
    return clip, zero


@dataclass
class _GuardState:
    low_checks: int = 0
    switched_at: Optional[int] = None


@dataclass
class MXFP4Monitor:
    """Samples GEMM statistics, logs them, and (optionally) guards against low-SNR GEMMs.

    interval: sample every `interval` steps (0 = never). snr_threshold/patience: the guard (None = off).
    unquantized_tail: run the last fraction of `total_steps` with an unquantized backward.
    jsonl_path: append one JSON record per sampled (step, layer, GEMM) and one per guard switch.
    group: the process group whose ranks must agree (None = the default group when initialized).
    """

    interval: int = 100
    snr_threshold: Optional[float] = None
    patience: int = 3
    unquantized_tail: float = 0.0
    total_steps: Optional[int] = None
    jsonl_path: Optional[str] = None
    group: Optional[object] = None
    step: int = 0
    _micro: int = 0
    _pending: Dict[Tuple[str, str], Dict[str, float]] = field(default_factory=dict)
    _guards: Dict[Tuple[str, str], _GuardState] = field(default_factory=dict)
    history: List[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.interval < 0:
            raise ValueError(f"interval must be >= 0, got {self.interval}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not 0.0 <= self.unquantized_tail < 1.0:
            raise ValueError(f"unquantized_tail must be in [0, 1), got {self.unquantized_tail}")
        if self.unquantized_tail and not self.total_steps:
            raise ValueError("unquantized_tail needs total_steps")

    # --- asked by the backward -------------------------------------------------------------
    @property
    def sampling(self) -> bool:
        """Whether this is a sampled step's first micro-batch (exact GEMMs are computed beside MXFP4)."""
        return self.interval > 0 and self.step % self.interval == 0 and self._micro == 0 and not self.in_tail

    @property
    def in_tail(self) -> bool:
        return bool(self.unquantized_tail) and self.step >= round(self.total_steps * (1 - self.unquantized_tail))

    def quantized(self, layer: str, gemm: str) -> bool:
        """False when this GEMM of this layer runs unquantized (guard switch or tail schedule)."""
        if self.in_tail:
            return False
        state = self._guards.get((layer, gemm))
        return state is None or state.switched_at is None

    def record(self, layer: str, gemm: str, stats) -> None:
        """Keep the statistics of one GEMM of one layer for this step (the first micro-batch wins):
        a dict {name: float} (names of STAT_NAMES; missing ones are NaN) or a float64 tensor of
        len(STAT_NAMES) values, which may stay on the GPU until `end_step`."""
        self._pending.setdefault((layer, gemm), stats)

    # --- called by the training loop ----------------------------------------------------------
    def micro_batch(self, index: int) -> None:
        """Tell the monitor which micro-batch of the step runs next (only the first is sampled)."""
        self._micro = index

    def state_dict(self) -> dict:
        """What a checkpoint must keep so that a resumed run takes the same decisions."""
        return {"step": self.step, "guards": {f"{k[0]}\t{k[1]}": (v.low_checks, v.switched_at)
                                               for k, v in self._guards.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self._guards = {tuple(k.split("\t")): _GuardState(*v) for k, v in state["guards"].items()}

    def end_step(self) -> List[dict]:
        """Reduce this step's statistics over ranks, update the guard, log, and advance the step."""
        records = []
        if self._pending:
            keys = sorted(self._pending)
            rows = [self._pending[k] for k in keys]
            dev = next((r.device for r in rows if isinstance(r, torch.Tensor)), torch.device("cpu"))
            vals = torch.stack([r.to(dev, torch.float64) if isinstance(r, torch.Tensor) else
                                torch.tensor([r.get(s, float("nan")) for s in STAT_NAMES], dtype=torch.float64,
                                             device=dev) for r in rows])
            vals = self._mean_over_ranks(vals).cpu()  # the step's one device-to-host copy
            for (layer, gemm), row in zip(keys, vals.tolist()):
                rec = dict(step=self.step, layer=layer, gemm=gemm, **dict(zip(STAT_NAMES, row)))
                records.append(rec)
                self._update_guard(layer, gemm, rec, records)
            self._pending.clear()
        self.history.extend(records)
        if self.jsonl_path and records:
            with open(self.jsonl_path, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        self.step += 1
        self._micro = 0
        return records

    def switched(self) -> Dict[Tuple[str, str], int]:
        """{(layer, gemm): step} of every GEMM the guard switched to the unquantized backward."""
        return {k: v.switched_at for k, v in self._guards.items() if v.switched_at is not None}

    def _update_guard(self, layer, gemm, rec, records) -> None:
        if self.snr_threshold is None:
            return
        state = self._guards.setdefault((layer, gemm), _GuardState())
        if state.switched_at is not None:
            return
        state.low_checks = state.low_checks + 1 if rec["snr"] < self.snr_threshold else 0
        if state.low_checks >= self.patience:
            state.switched_at = self.step
            records.append(dict(step=self.step, layer=layer, gemm=gemm, event="switched_to_unquantized",
                                snr=rec["snr"], threshold=self.snr_threshold, patience=self.patience))

    def _mean_over_ranks(self, vals: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return vals
        backend = dist.get_backend(self.group)
        t = vals.to("cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(t, group=self.group)
        return t / dist.get_world_size(self.group)


_active: Optional[MXFP4Monitor] = None


def set_active_monitor(monitor: Optional[MXFP4Monitor]) -> None:
    """Install the monitor every MXFP4 backward of this process reports to (None: no diagnostics)."""
    global _active
    _active = monitor


def active_monitor() -> Optional[MXFP4Monitor]:
    return _active


def sampling() -> bool:
    """Whether the active monitor samples the current micro-batch (never inside a CUDA-graph capture: the
    statistics synchronize, so captured calls are not sampled)."""
    return _active is not None and _active.sampling and not _capturing()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def gemm_quantized(layer: str, gemm: str) -> bool:
    """False when the active monitor's guard or tail schedule runs this GEMM unquantized."""
    return _active is None or not layer or _active.quantized(layer, gemm)


def measure_gemm(layer: str, gemm: str, exact_fn, approx: torch.Tensor, a: torch.Tensor, qa, b: torch.Tensor, qb,
                 signs: Optional[torch.Tensor]) -> None:
    """Record one GEMM's statistics when the active monitor samples this step (the operand fractions
    on at most OPERAND_STAT_ROWS evenly strided rows of each operand).

    `exact_fn()` computes the exact product (only when sampling); a, b are the unquantized operands
    [M, K], [N, K] and qa, qb their MXFP4Tensors.
    """
    if _active is None or not layer or not _active.sampling:
        return
    (xa, ca), (xb, cb) = _strided_rows(a, qa), _strided_rows(b, qb)
    sa, sb = _operand_stats(xa, signs, ca), _operand_stats(xb, signs, cb)
    # in STAT_NAMES order, kept on the device: the host reads all GEMMs' statistics once, at end_step
    _active.record(layer, gemm, torch.cat((_error_stats(exact_fn(), approx), sa[:1], sb[:1], sa[1:], sb[1:])))
