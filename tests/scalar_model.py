"""An independent, slow, scalar model of MXFP4 (pure Python floats, no torch kernels).

Written from the OCP MX v1.0 text rather than from the package's code, so the tests compare two
implementations: exponents come from math.frexp, rounding from explicit distances to the grid.
"""
import math

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def floor_log2(a: float) -> int:
    m, ex = math.frexp(a)  # a = m · 2^ex, m in [0.5, 1)
    return ex - 1


def block_exponent(block):
    """Shared exponent of one block, or None for a non-finite block."""
    if any(math.isnan(v) or math.isinf(v) for v in block):
        return None
    amax = max(abs(v) for v in block)
    if amax == 0.0:
        return -127
    return max(-127, min(127, floor_log2(amax) - 2))


def rtn_code(v: float) -> int:
    """Nearest E2M1 code of v, ties to the even code, saturating at 6."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda c: (abs(GRID[c] - a), c % 2))
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    return best | sign


def quantize_block_rtn(block):
    """(scale byte, codes) of a 32-element block under RTN."""
    e = block_exponent(block)
    if e is None:
        return 0xFF, [0] * len(block)
    return e + 127, [rtn_code(v * 2.0 ** (-e)) for v in block]
