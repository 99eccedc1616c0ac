"""Grouped quantize launches for the backward operands of all local experts of an MoE layer.

megatron-core's `SequentialMLP` runs its local experts one after another on `torch.split` row slices of the
permuted token buffer and concatenates their outputs. `install(seq)` adds module hooks to a `SequentialMLP`
whose experts are MXFP4 linears. During the forward each expert linear registers its call (its `StreamKey`,
input X_e and weight W_e) with the layer's `ExpertGroup`, which is attached to the key (`StreamKey.group`).
In the backward, for the experts that received tokens (the others skip their GEMMs):

* FC2, before any expert's backward (an identity autograd node on the concatenated output, whose gradient
  holds every dY_e as a row slice): one dual launch for the dY_e (dgrad rowwise, wgrad dY_eᵀ along tokens),
  then one column launch for the X_eᵀ (wgrad, with the wgrad dY copy's signs) and the W_eᵀ (dgrad, with the
  dgrad dY copy's signs);
* FC1, at the first FC1 expert backward: one column launch for the X_eᵀ (wgrad) and the W_eᵀ (dgrad), with
  the signs of FC1's GEMMs drawn in the launch at the dY operands' offsets (`sign_offset_col`; per_call) or
  given by the policy. FC1's dY_e stays a per-expert dual quantize: it comes out of each expert's activation
  backward one expert at a time. The group hands it the signs the launch used (the values it would draw).

Launches per layer backward, E local experts with tokens and one dtype: 3 grouped + E per-expert (FC1's dY),
where the FC2 grouping alone took 2 + 4E and per-expert quantizers 6E (a dual quantize is one launch). A
launch takes at most 32 segments (`ops.grouped`), so a column launch of more than 16 experts is split.

Every operand is bit-identical to what the expert's own quantizer computes (same key, offsets and signs:
`ops.grouped`'s contract). An expert takes one only after checking that it was quantized from exactly its
tensor: dY and X the same storage, offset, shape and strides; W the same too, and the same `_version` (an
in-place update after the launch, e.g. under saved-tensor hooks, which skip autograd's version check;
updates through `.data` are invisible to both); X and W also with the signs of the expert's dY operand.
Anything else falls back to the expert's own quantizers, with the same bits — by design, not an error: a
diagnostics sample, a guard that runs a GEMM unquantized, a gradient other than the group's, a changed weight,
a frozen weight, differing recipes, and FC1 under `recipe.cuda_graphs` (its offsets live on the device, so
its signs cannot be drawn ahead on the host; those linears keep their per-expert path, and on Hopper the
one-call backward, which a grouped key turns off: `backward.fused_backward`).

Memory: the quantized FC2 operands of all experts are held from the start of the layer's backward, FC1's from
its first FC1 expert backward (not earlier: the FC2 backward of the other experts runs in between), each
~0.53 bytes per element (4-bit codes, one byte of scale per 32). Each is freed when its expert takes or declines
it; whatever is left (experts that fell back) when the gradient of the experts' input is computed, after every
expert's backward (an identity node on the input). Until then the group also references the registered
X_e and W_e, which the experts' Functions save anyway.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import torch

from .. import diagnostics
from ..backward import StreamKey, _dual_signs, quantize_grad_output
from ..numerics.streams import Gemm, Operand
from ..ops.grouped import quantize_mxfp4_grouped
from ..recipe import MXFP4Recipe

_active: List["ExpertGroup"] = []  # the group whose experts are running their forward (innermost last)
#: Turns the grouping off (each expert then quantizes its own operands, with the same bits).
ENABLED = True
#: Counters since import (tests and benchmarks read them): grouped launches and, per kind, the operands that
#: experts took from a group.
STATS = {"launches": 0, "grad_output_hits": 0, "input_hits": 0, "weight_hits": 0, "fc1_input_hits": 0,
         "fc1_weight_hits": 0}

FC1, FC2 = "fc1", "fc2"
_HITS = {(FC2, "x"): "input_hits", (FC2, "w"): "weight_hits", (FC1, "x"): "fc1_input_hits",
         (FC1, "w"): "fc1_weight_hits"}


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b view the same elements (the group's operands belong to exactly this tensor)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


class _Call(NamedTuple):
    key: StreamKey
    x: torch.Tensor
    weight: torch.Tensor
    recipe: MXFP4Recipe


class _Ready(NamedTuple):
    """An operand quantized ahead: the tensor it was quantized from, that tensor's `_version` then, the result."""
    source: torch.Tensor
    version: int
    q: object


class _Column(NamedTuple):
    """One column copy to quantize: tᵀ along t's rows, the operand of `gemm` with `signs` (None: drawn at the
    GEMM's dY offset, as the dY quantizer draws them)."""
    t: torch.Tensor
    key: StreamKey
    gemm: Gemm
    operand: Operand
    signs: Optional[torch.Tensor]


class ExpertGroup:
    """The expert calls of one forward of one `SequentialMLP` and, after the grouped launches, their operands."""

    def __init__(self, experts):
        self.n = len(experts)
        self.roles = {}
        for i, mlp in enumerate(experts):
            for role, name in ((FC1, "linear_fc1"), (FC2, "linear_fc2")):
                if getattr(mlp, name, None) is not None:
                    self.roles[id(getattr(mlp, name))] = (role, i)
        self.calls: Dict[str, Dict[int, _Call]] = {FC1: {}, FC2: {}}
        self.owner: Dict[int, tuple] = {}  # id(key) -> (role, local expert); the keys live in the Functions
        self.ready: Dict[tuple, object] = {}  # (role, expert, "dy" | "x" | "w") -> operands quantized ahead
        self.fc1_signs: Dict[int, tuple] = {}  # expert -> (dgrad, wgrad) signs of FC1's launch
        self.fc1_recipe: Optional[MXFP4Recipe] = None
        self.fc1_tried = False
        self.launches = 0  # grouped launches made (tests and benchmarks read it)

    def register(self, linear, key: StreamKey, x: torch.Tensor, weight: torch.Tensor) -> StreamKey:
        owner = self.roles.get(id(linear))
        if owner is None:
            return key
        role, i = owner
        recipe = linear.recipe
        if not (recipe.dgrad and recipe.wgrad and recipe.backward_format == "mxfp4" and weight.requires_grad):
            return key  # nothing to quantize ahead: hold no reference to X
        if role == FC1 and key.offsets is not None:  # device offsets: FC1's signs are not known on the host
            return key
        key = StreamKey(key.seed, key.layer, key.call, key.name, key.offsets, group=self)
        self.calls[role][i] = _Call(key, x, weight, recipe)
        self.owner[id(key)] = owner
        return key

    def complete(self) -> bool:
        return len(self.calls[FC2]) == self.n > 1

    def _recipe(self, role: str) -> Optional[MXFP4Recipe]:
        """The recipe of every expert's `role` linear when all run both GEMMs in MXFP4 (quantized, not sampled)
        with a trainable weight and a 2-d input; else None (each expert quantizes its own)."""
        calls = self.calls[role]
        if len(calls) != self.n or diagnostics.sampling():
            return None
        recipe = calls[0].recipe
        if not (recipe.dgrad and recipe.wgrad and recipe.backward_format == "mxfp4"):
            return None
        for c in calls.values():
            if c.recipe != recipe or c.x.dim() != 2 or not c.weight.requires_grad:
                return None
            if not all(diagnostics.gemm_quantized(c.key.name, gemm) for gemm in ("dgrad", "wgrad")):
                return None
        return recipe

    def _launch(self, recipe: MXFP4Recipe, segments, mode: str, **kw):
        self.launches += 1
        STATS["launches"] += 1
        backend = "reference" if recipe.quantize_backend == "reference" else "auto"
        return quantize_mxfp4_grouped(segments, mode, rounding=recipe.rounding, rht_block=recipe.effective_rht_block,
                                      backend=backend, **kw)

    def _columns(self, recipe: MXFP4Recipe, cols: List[_Column]) -> list:
        """The column copies, one grouped launch per dtype (activations and weights usually share one)."""
        out = [None] * len(cols)
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for j, c in enumerate(cols):
            by_dtype.setdefault(c.t.dtype, []).append(j)
        for idx in by_dtype.values():
            part = [cols[j] for j in idx]
            drawn_at = [None if c.signs is not None else c.key.offset(c.gemm, Operand.GRAD_OUTPUT) for c in part]
            qs = self._launch(recipe, [c.t for c in part], "col", seeds=[c.key.seed for c in part],
                              offset_col=[c.key.offset(c.gemm, c.operand) for c in part],
                              signs_col=[c.signs for c in part], sign_offset_col=drawn_at)
            for j, q in zip(idx, qs):
                out[j] = q
        return out

    def _hold(self, role: str, i: int, what: str, source: torch.Tensor, q) -> None:
        self.ready[(role, i, what)] = _Ready(source, source._version, q)

    def prepare(self, grad: torch.Tensor) -> None:
        """FC2: quantize every expert's dY (dual), X and W (columnwise) from `grad`, the gradient of the experts'
        concatenated outputs."""
        recipe = self._recipe(FC2)
        calls, self.calls[FC2] = self.calls[FC2], {}  # what is needed is held in `ready` from here on
        if recipe is None:
            return
        counts = [calls[i].x.shape[0] for i in range(self.n)]
        if grad.dim() != 2 or grad.shape[0] != sum(counts):
            return
        dys = torch.split(grad, counts)
        live = [i for i in range(self.n) if counts[i]]
        if not live:
            return
        keys, dev = [calls[i].key for i in live], grad.device
        duals = self._launch(recipe, [dys[i] for i in live], "dual", seeds=[k.seed for k in keys],
                             offset_row=[k.offset(Gemm.DGRAD, Operand.GRAD_OUTPUT) for k in keys],
                             offset_col=[k.offset(Gemm.WGRAD, Operand.GRAD_OUTPUT) for k in keys],
                             signs_row=[_dual_signs(recipe, k, Gemm.DGRAD, dev) for k in keys],
                             signs_col=[_dual_signs(recipe, k, Gemm.WGRAD, dev) for k in keys])
        cols = [_Column(calls[i].x, calls[i].key, Gemm.WGRAD, Operand.INPUT, qw.signs)
                for i, (_, qw) in zip(live, duals)]
        cols += [_Column(calls[i].weight, calls[i].key, Gemm.DGRAD, Operand.WEIGHT, qd.signs)
                 for i, (qd, _) in zip(live, duals)]
        qs = self._columns(recipe, cols)
        for j, i in enumerate(live):
            self._hold(FC2, i, "dy", dys[i], duals[j])
            self._hold(FC2, i, "x", calls[i].x, qs[j])
            self._hold(FC2, i, "w", calls[i].weight, qs[len(live) + j])

    def _prepare_fc1(self) -> None:
        """FC1: quantize every expert's X and W (columnwise), drawing the signs of FC1's GEMMs."""
        self.fc1_tried = True
        recipe = self._recipe(FC1)
        calls, self.calls[FC1] = self.calls[FC1], {}
        if recipe is None:
            return
        live = [i for i in range(self.n) if calls[i].x.shape[0]]
        if not live:
            return
        dev = calls[live[0]].x.device
        cols = [_Column(calls[i].x, calls[i].key, Gemm.WGRAD, Operand.INPUT,
                        _dual_signs(recipe, calls[i].key, Gemm.WGRAD, dev)) for i in live]
        cols += [_Column(calls[i].weight, calls[i].key, Gemm.DGRAD, Operand.WEIGHT,
                         _dual_signs(recipe, calls[i].key, Gemm.DGRAD, dev)) for i in live]
        qs = self._columns(recipe, cols)
        self.fc1_recipe = recipe
        for j, i in enumerate(live):
            qx, qw = qs[j], qs[len(live) + j]
            self._hold(FC1, i, "x", calls[i].x, qx)
            self._hold(FC1, i, "w", calls[i].weight, qw)
            self.fc1_signs[i] = (qw.signs, qx.signs)

    def _take(self, key: StreamKey, what: str):
        """(role, the operand quantized ahead for key's expert) or None; offered once: taken or declined, the
        group lets go of it."""
        owner = self.owner.get(id(key))
        if owner is None:
            return None
        r = self.ready.pop((*owner, what), None)
        return None if r is None else (owner[0], r)

    def grad_output_operands(self, key: StreamKey, dy: torch.Tensor):
        """(qdy for dgrad, qdy for wgrad) of the expert whose key this is: FC2's if the group quantized exactly
        `dy`; FC1's quantized now with the signs of the group's FC1 launch (made at the first FC1 call)."""
        owner = self.owner.get(id(key))
        if owner is None:
            return None
        role, i = owner
        if role == FC1:
            if not self.fc1_tried:
                self._prepare_fc1()
            signs = self.fc1_signs.pop(i, None)
            return None if signs is None else quantize_grad_output(dy, self.fc1_recipe, key, signs=signs)
        taken = self._take(key, "dy")
        if taken is None or not _same_tensor(taken[1].source, dy):
            return None
        STATS["grad_output_hits"] += 1
        return taken[1].q  # (dgrad copy, wgrad copy)

    def _operand(self, key: StreamKey, what: str, t: torch.Tensor, signs):
        taken = self._take(key, what)
        if taken is None:
            return None
        role, r = taken
        if not (_same_tensor(r.source, t) and r.source._version == r.version and r.q.signs is signs):
            return None
        STATS[_HITS[(role, what)]] += 1
        return r.q

    def input_operand(self, key: StreamKey, x: torch.Tensor, signs):
        """The wgrad operand Xᵀ of the expert whose key this is, if the group quantized exactly `x` with `signs`
        (the wgrad dY operand's)."""
        return self._operand(key, "x", x, signs)

    def weight_operand(self, key: StreamKey, weight: torch.Tensor, signs):
        """The dgrad operand Wᵀ of the expert whose key this is, if the group quantized exactly `weight` (same
        storage and `_version`) with `signs` (the dgrad dY operand's)."""
        return self._operand(key, "w", weight, signs)

    def release(self) -> None:
        """Let go of everything still held (the layer's backward is over)."""
        self.ready.clear()
        self.fc1_signs.clear()
        self.calls = {FC1: {}, FC2: {}}
        self.fc1_tried = True


class _GroupedBackward(torch.autograd.Function):
    """Identity on the experts' concatenated output; its backward runs the group's FC2 launches."""

    @staticmethod
    def forward(ctx, out, group):
        ctx.group = group
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.group.prepare(grad)
        return grad, None


class _ReleaseAfterBackward(torch.autograd.Function):
    """Identity on the experts' input; its backward, which runs after every expert's, frees what the group
    still holds."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.group.release()
        return grad, None


def _pre_hook(module, args):
    group = ExpertGroup(module.local_experts)
    _active.append(group)
    x = args[0] if args else None
    if ENABLED and torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        return (_ReleaseAfterBackward.apply(x, group), *args[1:])
    return None


def _post_hook(module, args, output):
    group = _active.pop()
    if not (torch.is_grad_enabled() and group.complete()):
        return output
    out, bias = output
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return output
    return _GroupedBackward.apply(out, group), bias


def register(linear, key: StreamKey, x: torch.Tensor, weight: torch.Tensor) -> StreamKey:
    """Called by an expert linear's forward: attaches the running layer's group to its key."""
    if not (ENABLED and _active) or x.dim() != 2:
        return key
    return _active[-1].register(linear, key, x, weight)


def install(seq) -> bool:
    """Add the grouping hooks to a `SequentialMLP` whose every local expert's FC2 is an MXFP4 linear (more than
    one local expert; FC1 is grouped where it is an MXFP4 linear too). Returns whether it did (once per module)."""
    from .layers import _MXFP4ParallelMixin

    if getattr(seq, "_mxfp4_grouped", False) or len(seq.local_experts) < 2:
        return False
    if not all(isinstance(getattr(m, "linear_fc2", None), _MXFP4ParallelMixin) for m in seq.local_experts):
        return False
    seq.register_forward_pre_hook(_pre_hook)
    seq.register_forward_hook(_post_hook)
    seq._mxfp4_grouped = True
    return True
