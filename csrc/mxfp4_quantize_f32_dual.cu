// Kernel instantiations for one (dtype, mode); see mxfp4_quantize_kernel.cuh.
#include "mxfp4_quantize_launch.cuh"

MXFP4_DEFINE_LAUNCHER(f32_dual, float, mxfp4::kDual)
