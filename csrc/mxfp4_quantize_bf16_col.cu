// Kernel instantiations for one (dtype, mode); see mxfp4_quantize_kernel.cuh.
#include "mxfp4_quantize_launch.cuh"

MXFP4_DEFINE_LAUNCHER(bf16_col, __nv_bfloat16, mxfp4::kCol)
