// The per-element E2M1 encoders of the quantize kernels, compiled for the device and (for the CPU tests,
// tests/test_kernel_elements.py) for the host: the same source, so the host run checks the device's arithmetic
// against the reference without a GPU. Only float operations that are IEEE-exact on both sides are used (a
// product rounded to nearest, a sum rounded to nearest or toward zero); the host versions of the intrinsics are
// written out below.
//
// How a code is formed without a table: with xc = clamp(exponent(|v|), 127, 129) the map
// g(|v|) = |v| * 2^(128 - xc) + 2 (xc - 127) sends the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} onto the integers
// 0..7 and is linear (slope 1/gap) between grid points, so
//   RTN: code = rint(|v| * 2^(128 - xc)) + 2 (xc - 127)     (ties to even <=> even code)
//   SR : with W = floor(512 g) and f = frac(g), the contract rounds up iff r < t = (floor(512 f) + 1) >> 1,
//        i.e. iff floor(512 f) >= 2r + 1, so code = (W + 511 - 2r) >> 9. W comes from one float add rounded
//        toward zero: |v| * 2^(137 - xc) < 2048 is exact, and adding the integer 2^23 + 511 - 2r + 1024 (xc - 127)
//        leaves W + 511 - 2r in the low mantissa bits.
// Both are clamped to 7 (|v| >= 6 saturates); `code_sr_at` drops the clamps where |v| < 6 (SR with the 3/4
// prescale: the block maximum scales into [3, 6)) and writes the code straight into its nibble.
#pragma once

#include <cstdint>
#ifndef __CUDA_ARCH__
#include <cmath>
#include <cstring>
#endif

#define MXFP4_HD __host__ __device__ __forceinline__

namespace mxfp4 {
namespace detail {

MXFP4_HD uint32_t f2u(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

MXFP4_HD float u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

MXFP4_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;  // IEEE binary32, round to nearest (SSE arithmetic)
#endif
}

MXFP4_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// a + b rounded toward zero. Host: the double sum is exact for the operands used here (both below 2^24 in
// magnitude with no bits below 2^-30), then truncated to float.
MXFP4_HD float add_rz(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rz(a, b);
#else
  const double s = static_cast<double>(a) + static_cast<double>(b);
  float f = static_cast<float>(s);
  if (std::fabs(static_cast<double>(f)) > std::fabs(s)) f = std::nextafter(f, 0.0f);
  return f;
#endif
}

MXFP4_HD float absf(float x) {
#ifdef __CUDA_ARCH__
  return fabsf(x);  // an operand modifier
#else
  return std::fabs(x);
#endif
}

MXFP4_HD uint32_t umin(uint32_t a, uint32_t b) { return a < b ? a : b; }
MXFP4_HD uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

// x = v, the prescaled value; returns sign | magnitude.
MXFP4_HD uint32_t code_rtn(float x) {
  const uint32_t xb = f2u(x);
  const uint32_t xc = umin(umax(xb & 0x7F800000u, 127u << 23), 129u << 23);
  const float s = u2f((255u << 23) - xc);                          // 2^(128 - xc): 2, 1, 1/2
  const float a = mul_rn(absf(x), s);                // < 4: exact
  const uint32_t n = f2u(add_rn(a, 8388608.0f)) - 0x4B000000u;      // rint(a)
  const uint32_t mag = umin(n + (xc >> 22) - 254u, 7u);
  return mag | ((xb >> 28) & 8u);
}

MXFP4_HD uint32_t code_sr(float x, uint32_t r) {
  const uint32_t xb = f2u(x);
  const uint32_t xc = umin(umax(xb & 0x7F800000u, 127u << 23), 129u << 23);
  const float w = mul_rn(absf(x), u2f((264u << 23) - xc));  // |v| 2^(137 - xc) < 2048: exact
  // float bits of 2^23 + 511 - 2r + 1024 (xc - 127), an integer in [2^23, 2^24)
  const uint32_t c = (0x4B0001FFu - (127u << 10)) + (xc >> 13) - 2u * r;
  const uint32_t z = f2u(add_rz(w, u2f(c)));                       // mantissa: W + 511 - 2r + ...
  const uint32_t mag = umin((z >> 9) & 15u, 7u);
  return mag | ((xb >> 28) & 8u);
}

// `code_sr` of |x| < 6 (NaN and Inf excepted: their blocks are zeroed) at nibble K of the result, other bits 0;
// r2 = 2r. Below 6 the exponent is at most 129 and W + 511 - 2r < 4096, so neither clamp is needed and bits
// 9..11 of the sum hold the magnitude.
template <int K>
MXFP4_HD uint32_t code_sr_at(float x, uint32_t r2) {
  const uint32_t xb = f2u(x);
  const uint32_t xc = umax(xb & 0x7F800000u, 127u << 23);
  const float w = mul_rn(absf(x), u2f((264u << 23) - xc));
  const uint32_t z = f2u(add_rz(w, u2f((0x4B0001FFu - (127u << 10)) + (xc >> 13) - r2)));
  const uint32_t mag = 4 * K >= 9 ? z << (4 * K - 9) : z >> (9 - 4 * K);
  const uint32_t sgn = 4 * K + 3 >= 31 ? xb : xb >> (28 - 4 * K);
  return (mag & (7u << (4 * K))) | (sgn & (8u << (4 * K)));
}

// 2r for the dither byte B (0..3) of a Philox word, in place for `code_sr_at` (the byte's value times two).
template <int B>
MXFP4_HD uint32_t dither2(uint32_t w) {
  return (B == 0 ? w << 1 : w >> (8 * B - 1)) & 0x1FEu;
}

// The SR codes of x[0..7] (|x| < 6), low nibble first; their dither bytes are bytes 0..3 of ra, then of rb.
MXFP4_HD uint32_t pack8_sr(const float (&x)[8], uint32_t ra, uint32_t rb) {
  return code_sr_at<0>(x[0], dither2<0>(ra)) | code_sr_at<1>(x[1], dither2<1>(ra)) |
         code_sr_at<2>(x[2], dither2<2>(ra)) | code_sr_at<3>(x[3], dither2<3>(ra)) |
         code_sr_at<4>(x[4], dither2<0>(rb)) | code_sr_at<5>(x[5], dither2<1>(rb)) |
         code_sr_at<6>(x[6], dither2<2>(rb)) | code_sr_at<7>(x[7], dither2<3>(rb));
}

}  // namespace detail
}  // namespace mxfp4
