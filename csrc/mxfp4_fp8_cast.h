// Host interface of the per-tensor current-scaling E4M3 cast (no PyTorch dependency: raw pointers + stream).
//
// For each operand x (contiguous, float32 / bfloat16 / float16, n elements): amax = max |x| (NaN if any
// element is NaN), s = amax * float32(1/448) (1 when amax is 0 or NaN), codes = E4M3(x / s) rounded to
// nearest-even, NaN (sign kept) for NaN and for |x / s| > 464 -- bit for bit what PyTorch on CUDA gives for
// `amax = x.abs().amax(); s = amax / 448; (x / s).to(float8_e4m3fn)` (megatron_mxfp4.numerics.fp8).
// Up to two operands (a GEMM's two) are cast in two launches: every amax, then every cast.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mxfp4 {

struct Fp8CastOperand {
  const void* x = nullptr;   // n contiguous elements
  int dtype = 0;             // 0 float32, 1 bfloat16, 2 float16 (mxfp4::DType)
  int64_t n = 0;
  uint8_t* codes = nullptr;  // n E4M3 bytes
  float* scale = nullptr;    // 1 float32: the dequantization scale s
};

// `inv_max`: float32(1/448), what PyTorch on CUDA multiplies by for `amax / 448`. `work`: 4 * count bytes of
// device memory for the amax bits (zeroed here). Throws on bad arguments or a CUDA error.
void fp8_cast(const Fp8CastOperand* ops, int count, float inv_max, int32_t* work, cudaStream_t stream);

}  // namespace mxfp4
