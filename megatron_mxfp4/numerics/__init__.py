"""Numerics layer: the MXFP4 format, Philox stream, RHT and the reference quantizer/GEMM.

Nothing here imports from a higher layer; every kernel is tested against these functions.
"""
from .format import BLOCK, E2M1_VALUES, SR_PRESCALE, e2m1_table, shared_exponent
from .philox import dither_bytes, philox4x32_10, random_signs, random_words
from .quantize import MXFP4Tensor, gemm_alpha, gemm_reference, quantize_reference
from .rht import RHT_BLOCKS, SIGN_POLICIES, apply_rht, draw_signs, hadamard_matrix
from .streams import Gemm, Operand, derive_seed, stream_offset

__all__ = [
    "BLOCK", "E2M1_VALUES", "SR_PRESCALE", "e2m1_table", "shared_exponent",
    "dither_bytes", "philox4x32_10", "random_signs", "random_words",
    "MXFP4Tensor", "gemm_alpha", "gemm_reference", "quantize_reference",
    "RHT_BLOCKS", "SIGN_POLICIES", "apply_rht", "draw_signs", "hadamard_matrix",
    "Gemm", "Operand", "derive_seed", "stream_offset",
]
