"""Philox4x32-10 (Salmon et al., SC'11) in plain PyTorch integer ops, plus the project's stream.

The stream contract (DESIGN §2.4, v2), identical in every backend. A stream (seed, offset, domain) is a
sequence of 32-bit words; word j is output[j % 4] of the Philox call

* key     = (seed & 0xFFFFFFFF, seed >> 32)                        -- 64-bit seed
* counter = (blk & 0xFFFFFFFF, (blk >> 32) | domain << 31, offset & 0xFFFFFFFF, offset >> 32),  blk = j // 4

Domain 0 is the SR dither stream, domain 1 the RHT sign stream.

* Dither (v2): element i of the quantized tensor's logical order (`quantize` defines it) takes the 8-bit
  r = byte i % 4 (little-endian) of word i // 4, i.e. one Philox call feeds 16 consecutive elements
  (block counter i // 16, word (i // 4) % 4).
* Signs: sign j of a g-block is -1 iff the top bit of word j of the sign stream is set.

All arithmetic is done in int64 with 16-bit limbs so that nothing overflows.
"""
from __future__ import annotations

import numpy as np
import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

DOMAIN_DITHER = 0
DOMAIN_SIGNS = 1


def _mulhilo(m: int, x: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product m * x, for a 32-bit constant m and int64 x < 2^32."""
    xl = x & 0xFFFF
    xh = x >> 16
    a = m * xl  # < 2^48
    b = m * xh  # < 2^48
    lo = a + ((b & 0xFFFF) << 16)  # < 2^49
    hi = (b >> 16) + (lo >> 32)
    return hi & MASK32, lo & MASK32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32 with 10 rounds. Counter words are int64 tensors (values < 2^32), key words ints.

    Returns the four output words as int64 tensors with values in [0, 2^32).
    """
    k0 &= MASK32
    k1 &= MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _check_u64(name: str, value: int) -> int:
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be an unsigned 64-bit integer, got {value}")
    return value


#: Streams up to this many words are generated on the host with NumPy (a few hundred µs) and copied:
#: on a GPU the ~200 tiny element-wise ops of Philox would each be a kernel launch.
HOST_WORDS_MAX = 1024


def random_words(seed: int, offset: int, n: int, domain: int = DOMAIN_DITHER, device=None) -> torch.Tensor:
    """The first `n` 32-bit words (int64 tensor, indices 0..n-1) of the stream (seed, offset, domain)."""
    seed = _check_u64("seed", seed)
    offset = _check_u64("offset", offset)
    if n <= HOST_WORDS_MAX:
        return _from_host(_host_words(seed, offset, n, domain), device)
    blk = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    c1 = (blk >> 32) | (domain << 31)
    c2 = torch.full_like(blk, offset & MASK32)
    c3 = torch.full_like(blk, offset >> 32)
    words = philox4x32_10(blk & MASK32, c1, c2, c3, seed & MASK32, seed >> 32)
    return torch.stack(words, dim=-1).flatten()[:n]


def _from_host(arr: np.ndarray, device) -> torch.Tensor:
    """A host array as a tensor on `device`. To a GPU through pinned memory and without blocking: a copy
    from pageable memory first waits for everything queued on the stream, which would stall the host
    once per RHT draw in every backward."""
    t = torch.from_numpy(arr)
    if device is None or torch.device(device).type != "cuda":
        return t if device is None else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _host_words(seed: int, offset: int, n: int, domain: int) -> np.ndarray:
    """`random_words` computed with NumPy uint64 arrays (the same function, the same bits)."""
    blk = np.arange((n + 3) // 4, dtype=np.uint64)
    c1 = (blk >> np.uint64(32)) | np.uint64(domain << 31)
    c2 = np.full_like(blk, offset & MASK32)
    c3 = np.full_like(blk, offset >> 32)
    words = philox4x32_10(blk & np.uint64(MASK32), c1, c2, c3, seed & MASK32, seed >> 32)
    return np.stack(words, axis=-1).reshape(-1)[:n].astype(np.int64)


#: Random bits per element of the SR dither (DESIGN §2.2, contract v2); elements fed by one Philox call.
DITHER_BITS = 8
ELEMENTS_PER_CALL = 4 * 32 // DITHER_BITS


def bytes_from_words(words: torch.Tensor) -> torch.Tensor:
    """The four bytes of each 32-bit word, little-endian (int64 tensor [..., 4 * n], values 0..255)."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).flatten(-2)


def dither_bytes(seed: int, offset: int, shape, device=None) -> torch.Tensor:
    """The 8-bit dither r of a tensor of `shape` (int64, 0..255): element i of the row-major order gets
    byte i % 4 of word i // 4 of the dither stream."""
    n = 1
    for s in shape:
        n *= int(s)
    words = random_words(seed, offset, -(-n // 4), DOMAIN_DITHER, device)
    return bytes_from_words(words)[:n].reshape(shape)


def random_signs(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """n float32 Rademacher signs from the sign stream: word j's top bit set gives -1."""
    if n <= HOST_WORDS_MAX:  # finished on the host: one copy, no element-wise launches
        w = _host_words(_check_u64("seed", seed), _check_u64("offset", offset), n, DOMAIN_SIGNS)
        return _from_host((1 - 2 * (w >> 31)).astype(np.float32), device)
    words = random_words(seed, offset, n, DOMAIN_SIGNS, device)
    return 1.0 - 2.0 * (words >> 31).to(torch.float32)
