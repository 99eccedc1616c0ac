// Grouped kernel instantiations for one input dtype (all modes); see mxfp4_quantize_grouped.cuh.
#include "mxfp4_quantize_grouped.cuh"

MXFP4_DEFINE_GROUPED_LAUNCHER(f16, __half)
