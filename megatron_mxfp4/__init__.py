"""megatron-mxfp4: MXFP4 backward GEMMs (stochastic rounding + random Hadamard transform) for
Megatron-Core and DeepSpeed linear layers. Public API: DESIGN §6."""
from .linear import MXFP4Linear, convert_linears, mxfp4_linear
from .numerics.quantize import MXFP4Tensor
from .ops import mxfp4_gemm, quantize_mxfp4
from .recipe import MXFP4Recipe

__version__ = "0.1.0"

__all__ = ["MXFP4Recipe", "MXFP4Tensor", "MXFP4Linear", "convert_linears", "mxfp4_gemm", "mxfp4_linear",
           "quantize_mxfp4"]
