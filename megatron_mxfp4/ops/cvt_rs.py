"""Blackwell's stochastic E2M1 conversion as the SR path of the cuda quantizer, allowed by a self-test.

sm_100a has `cvt.rs.satfinite.e2m1x4.f32`: four float32 values rounded stochastically with one 32-bit random
operand, one instruction where the software rule of DESIGN §2.2 takes about a dozen per element. How it splits
the operand among the four values and how it decides is not documented, so the kernels never assume it: a
*feed* (csrc/mxfp4_cvt_rs.cuh) says how they hand the contract's random word and values to the instruction —
which byte goes to which value (`perm`), whether the bytes are complemented, whether each value gets the bias
v + sign(v)·gap/512 (which turns a rule that truncates f to 8 bits into the contract's rounding of 256·f) — and
the first time a device quantizes with SR, `ensure` runs the self-test:

1. the probe: every feed of `CANDIDATES` converts `probe_table()` (each of the 7 grid intervals × every
   ⌊512 f⌋ at both ends of its bucket × both signs, zeros, tiny and saturating values, each with all 256
   dither bytes); a feed passes when every code equals `format.round_sr` (the contract's rule) bit for bit;
2. end to end: the quantize kernels with the passing feed equal the software rule bit for bit on fixed tensors.

Only then does the device's feed become non-zero (`_mxfp4_cuda.set_hw_sr_feed`); otherwise the software rule
stays, with a one-time warning that says why (instruction not compiled for this GPU, no feed reproduces the
rule — naming the closest and how many codes differ —, or the end-to-end check failed). The result is the same
bits either way; only speed differs. Nothing here has run on a Blackwell GPU yet: on CPUs the feeds are checked
against models of possible hardware rules (tests/test_cvt_rs.py), on Hopper the instruction does not exist.

`ENABLED = False` (or `MXFP4_CVT_RS=0` in the environment) keeps the software rule without testing.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from ..numerics.format import E2M1_VALUES, round_sr

#: Set to False to keep the software rule everywhere (no self-test is run).
ENABLED = os.environ.get("MXFP4_CVT_RS", "1") != "0"

ON, COMPLEMENT, BIAS = 1, 2, 4  # feed bits (csrc/mxfp4_quantize.h)
IDENTITY, REVERSED = 0x3210, 0x0123  # byte_perm selectors: byte k -> value k, byte 3 - k -> value k


def feed(perm: int = IDENTITY, complement: bool = False, bias: bool = False) -> int:
    """The feed word: byte_perm selector in bits 16-31, then the flags."""
    return (perm << 16) | ON | (COMPLEMENT if complement else 0) | (BIAS if bias else 0)


def describe(f: int) -> str:
    if not f & ON:
        return "the software rule"
    perm = {IDENTITY: "byte k -> value k", REVERSED: "byte 3-k -> value k"}.get(f >> 16, f"perm {f >> 16:#06x}")
    return ", ".join([perm] + (["complemented bytes"] if f & COMPLEMENT else [])
                     + (["gap/512 bias"] if f & BIAS else []))


#: Feeds in the order they are tried (cheapest first: the bias costs instructions per element).
CANDIDATES = tuple(feed(p, c, b) for b in (False, True) for c in (False, True) for p in (IDENTITY, REVERSED))


# ------------------------------------------------------------------------------------------------------------
# The probe table and the contract's codes for it

def probe_values() -> torch.Tensor:
    """float32 values whose SR decisions cover the rule: for each grid interval [lo, hi) and each bucket
    b = ⌊512 f⌋, the bucket's first value (f = b/512) and its last (just below (b+1)/512); both signs; ±0, tiny
    values, the grid points, 6 and values in (6, 8) (SR without the 3/4 prescale saturates them)."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    lo, hi = grid[:-1, None], grid[1:, None]
    gap = hi - lo
    b = torch.arange(512, dtype=torch.float32)[None, :]
    first = lo + gap * (b / 512)  # exact: gap is a power of two, b < 512
    nxt = lo + gap * ((b + 1) / 512)
    last = torch.nextafter(nxt, lo.expand_as(nxt))
    special = torch.tensor([0.0, 1e-45, 1e-30, 2.0 ** -12, 6.0, 6.5, 7.0, 7.999999], dtype=torch.float32)
    pos = torch.cat([first.flatten(), last.flatten(), special])
    return torch.cat([pos, -pos])


def probe_table(device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(v float32 [n·256], rbits int64 [n·64] holding uint32 words): every probe value with every dither byte.
    Element e = 256·m + r has value m and byte r, so a word holds four different bytes (a byte order is told
    apart from its reverse)."""
    vals = probe_values()
    v = vals.repeat_interleave(256)
    r = torch.arange(256, dtype=torch.int64).repeat(vals.numel()).view(-1, 4)
    words = r[:, 0] | (r[:, 1] << 8) | (r[:, 2] << 16) | (r[:, 3] << 24)
    return v.to(device), words.to(device)


def word_bytes(words: torch.Tensor) -> torch.Tensor:
    """[n] uint32 words (int64) -> [4n] bytes, byte k of word j at 4j + k (the contract's element order)."""
    return torch.stack([(words >> (8 * k)) & 0xFF for k in range(4)], dim=-1).flatten()


def expected_codes(v: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """The contract's codes (uint8) of `v` with element 4j + k taking byte k of word j."""
    return round_sr(v, word_bytes(words))


def unpack_probe(out: torch.Tensor) -> torch.Tensor:
    """The probe's uint16 groups (int32 holding them) -> codes [4n], value 4j in bits 3:0 of group j."""
    return torch.stack([(out >> (4 * k)) & 0xF for k in range(4)], dim=-1).flatten().to(torch.uint8)


# ------------------------------------------------------------------------------------------------------------
# CPU twin of the kernel's feed (csrc/mxfp4_cvt_rs.cuh: hw_sr_bits, hw_sr_value)

def _fadd_rz(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 a + b rounded toward zero, for a and b of the same sign (the sum in float64 is exact or off by
    less than a float32 ulp of b below the smallest float32 step that matters, so truncating it is exact)."""
    s = a.double() + b.double()
    r = s.float()
    over = r.double().abs() > s.abs()
    return torch.where(over, torch.nextafter(r, torch.zeros_like(r)), r)


def apply_feed(v: torch.Tensor, words: torch.Tensor, f: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values, words) as the instruction gets them under feed `f`."""
    perm = f >> 16
    w = torch.zeros_like(words)
    for k in range(4):  # __byte_perm(word, 0, perm): result byte k = source byte (perm >> 4k) & 7
        w |= ((words >> (8 * ((perm >> (4 * k)) & 7))) & 0xFF) << (8 * k)
    if f & COMPLEMENT:
        w ^= 0xFFFFFFFF
    if f & BIAS:
        bits = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        binade = ((bits & 0x7F800000) >> 23).clamp(127, 129)  # exponent of |v|'s gap: 2^0, 2^1, 2^2 binades
        bias = torch.ldexp(torch.ones_like(v), (binade - 137).to(torch.int32))  # 2^-10, 2^-9, 2^-8
        v = _fadd_rz(v, torch.where(torch.signbit(v), -bias, bias))
    return v, w


# ------------------------------------------------------------------------------------------------------------
# The self-test

Probe = Callable[[torch.Tensor, torch.Tensor, int], Optional[torch.Tensor]]


def calibrate(probe: Probe, device=None) -> Tuple[int, str]:
    """(feed, why): the first of `CANDIDATES` under which `probe(v, words, feed)` — the instruction's codes,
    or None where it is not compiled — equals the contract on the probe table bit for bit; 0 and the reason
    when none does."""
    v, words = probe_table(device)
    want = expected_codes(v, words)
    best = None
    for f in CANDIDATES:
        got = probe(v, words, f)
        if got is None:
            return 0, "the extension's code for this GPU does not contain cvt.rs (build it for sm_100a)"
        bad = int((got != want).sum())
        if bad == 0:
            return f, f"cvt.rs reproduces the contract's SR rule with {describe(f)}"
        if best is None or bad < best[1]:
            best = (f, bad)
    return 0, (f"cvt.rs does not reproduce the contract's SR rule under any feed tried (closest: "
               f"{describe(best[0])}, {best[1]} of {want.numel()} probe codes differ)")


def device_probe(ext, device: torch.device) -> Probe:
    """The probe of the extension on `device`."""
    from .cuda_quantize import current_stream_handle, launch_on

    def run(v, words, f):
        v = v.to(device).contiguous()
        w = words.to(device).to(torch.int32).contiguous()  # the uint32 bits
        out = torch.zeros(w.numel(), dtype=torch.int16, device=device)
        compiled = torch.zeros(1, dtype=torch.int32, device=device)
        launch_on(device, ext.hw_sr_probe, v.data_ptr(), w.data_ptr(), out.data_ptr(), w.numel(), f,
                  compiled.data_ptr(), current_stream_handle(device))
        if not int(compiled.item()):
            return None
        return unpack_probe(out.to(torch.int32) & 0xFFFF)
    return run


def _end_to_end(ext, device: torch.device, f: int) -> Optional[str]:
    """None when the quantize kernels with feed `f` equal the software rule on fixed tensors, else what differs."""
    from .cuda_quantize import quantize_cuda, quantize_dual_cuda

    gen = torch.Generator().manual_seed(20261204)
    x = (torch.randn(384, 320, generator=gen) * torch.logspace(-3, 3, 320)).to(device)
    cases = [("bf16 dual g=64", lambda: quantize_dual_cuda(x.bfloat16(), "sr", rht_block=64, seed=7, offset_row=1,
                                                           offset_col=2)),
             ("fp32 rows g=0, no prescale", lambda: (quantize_cuda(x, -1, "sr", prescale=1.0, seed=9, offset=3),)),
             ("fp16 columns g=128", lambda: (quantize_cuda(x.half(), 0, "sr", rht_block=128, seed=11, offset=5),))]
    idx = device.index if device.index is not None else torch.cuda.current_device()
    for name, run in cases:
        ext.set_hw_sr_feed(idx, 0)
        soft = run()
        ext.set_hw_sr_feed(idx, f)
        hard = run()
        ext.set_hw_sr_feed(idx, 0)
        for a, b in zip(soft, hard):
            if not (torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)):
                return f"the quantize kernel differs from the software rule on {name}"
    return None


_state: Dict[int, int] = {}  # device index -> feed in use (0: the software rule)
_deferred = set()  # device indices whose test a capture deferred (warned once)


def ensure(ext, device: torch.device) -> None:
    """Run the self-test for `device` once (Blackwell only) and set its feed; called by the cuda quantizer the
    first time it rounds stochastically on a device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _state:
        return
    from .dispatch import device_capability

    if not ENABLED or device_capability(device)[0] != 10 or not hasattr(ext, "hw_sr_probe"):
        _state[idx] = 0
        return
    if torch.cuda.is_current_stream_capturing():
        if idx in _deferred:
            return
        _deferred.add(idx)
        warnings.warn("megatron_mxfp4: cvt.rs self-test deferred (first SR quantize inside a CUDA graph capture); "
                      "the software rule is used until an eager call runs it", RuntimeWarning, stacklevel=4)
        return
    _state[idx] = 0  # the test's own quantize calls run with the software rule
    f, why = calibrate(device_probe(ext, device), device)
    if f:
        problem = _end_to_end(ext, device, f)
        if problem is not None:
            f, why = 0, f"{why}, but {problem}"
    if f:
        ext.set_hw_sr_feed(idx, f)
        _state[idx] = f
    else:
        warnings.warn(f"megatron_mxfp4: stochastic rounding on {torch.cuda.get_device_name(device)} uses the software "
                      f"rule (same bits, slower): {why}", RuntimeWarning, stacklevel=4)


def tested(index: int) -> bool:
    """Whether the self-test has decided for device `index`."""
    return index in _state


def feed_in_use(device: torch.device) -> int:
    """The feed the self-test set for `device` (0: the software rule, or not tested yet)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _state.get(idx, 0)
