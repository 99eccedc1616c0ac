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
// Both are clamped to 7 (|v| >= 6 saturates); `code_sr_at` drops the clamps where |v| <= 6 (SR with the 3/4
// prescale: the block maximum scales into [3, 6], 6 only where the product rounds up to it) and writes the code
// straight into its nibble.
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

// `code_sr` of |x| <= 6 (NaN and Inf excepted: their blocks are zeroed) at nibble K of the result, other bits 0;
// r2 = 2r. Up to 6 the exponent is at most 129 and W + 511 - 2r < 4096, so neither clamp is needed and bits
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

// The SR codes of x[0..7] (|x| <= 6), low nibble first; their dither bytes are bytes 0..3 of ra, then of rb.
MXFP4_HD uint32_t pack8_sr(const float (&x)[8], uint32_t ra, uint32_t rb) {
  return code_sr_at<0>(x[0], dither2<0>(ra)) | code_sr_at<1>(x[1], dither2<1>(ra)) |
         code_sr_at<2>(x[2], dither2<2>(ra)) | code_sr_at<3>(x[3], dither2<3>(ra)) |
         code_sr_at<4>(x[4], dither2<0>(rb)) | code_sr_at<5>(x[5], dither2<1>(rb)) |
         code_sr_at<6>(x[6], dither2<2>(rb)) | code_sr_at<7>(x[7], dither2<3>(rb));
}

// ---- Two elements per instruction (16-bit lanes), for |x| <= 6 ------------------------------------------------
// FP16 truncated toward zero keeps exactly what the rule reads: with a = |v| in [1, 8) and h its FP16 bits
// (exponent E, 10-bit mantissa m), W = floor(512 g(a)) = h - 14336 (1024 + m, 2048 + m, 3072 + m in the three
// binades); below 1, W = floor(1024 a) = bits(FP16(a + 1)) - 15360 with a + 1 truncated in float32 first. Each
// formula is below the other outside its range, so W = max(both): a max of 16-bit lanes. With 0x8000 added to
// every lane the lanes never borrow from each other, and bits 9..11 of W + 511 - 2r are the code's magnitude.

// The FP16 bits of x rounded toward zero (finite x; the device's cvt.rz), in the low 16 bits.
MXFP4_HD uint32_t f16_rz_bits(float x) {
  const uint32_t u = f2u(x), s = (u >> 16) & 0x8000u;
  const int e = static_cast<int>((u >> 23) & 0xFFu) - 127;
  const uint32_t m = u & 0x7FFFFFu;
  if (e > 15) return s | 0x7BFFu;                  // beyond 65504: the largest finite value
  if (e >= -14) return s | (static_cast<uint32_t>(e + 15) << 10) | (m >> 13);
  const int shift = -14 - e + 13;                  // subnormal: 10 fraction bits of 2^-14
  return shift > 24 ? s : s | ((m | 0x800000u) >> shift);
}

// The FP16 pair (hi in bits 16..31, lo in bits 0..15) of two floats rounded toward zero.
MXFP4_HD uint32_t f16x2_rz(float hi, float lo) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("cvt.rz.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#else
  return (f16_rz_bits(hi) << 16) | f16_rz_bits(lo);
#endif
}

MXFP4_HD uint32_t max_u16x2(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __vmaxu2(a, b);
#else
  const uint32_t lo = umax(a & 0xFFFFu, b & 0xFFFFu), hi = umax(a >> 16, b >> 16);
  return (hi << 16) | lo;
#endif
}

MXFP4_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, sel);
#else
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) r |= static_cast<uint32_t>((v >> (8 * ((sel >> (4 * k)) & 7u))) & 0xFFu) << (8 * k);
  return r;
#endif
}

// The SR codes of x[k] and x[k + 4] (|x| <= 6) in bits 0..3 and 16..19 (other bits 0), dither bytes k of ra, rb.
template <int K>
MXFP4_HD uint32_t code_sr_pair(const float (&x)[8], uint32_t ra, uint32_t rb) {
  const uint32_t h = f16x2_rz(x[K + 4], x[K]);
  const uint32_t h1 = f16x2_rz(add_rz(absf(x[K + 4]), 1.0f), add_rz(absf(x[K]), 1.0f));
  const uint32_t w = max_u16x2((h & 0x7FFF7FFFu) + 0x48004800u, h1 + 0x44004400u);  // W + 0x8000 per lane
  const uint32_t r = byte_perm(ra, rb, K | (K << 4) | ((K + 4) << 8) | ((K + 4) << 12)) & 0x00FF00FFu;
  const uint32_t t = w + 0x01FF01FFu - r - r;                                        // W + 511 - 2r + 0x8000
  return ((t >> 9) & 0x00070007u) | ((h >> 12) & 0x00080008u);
}

// `pack8_sr` two elements per instruction (the same codes).
MXFP4_HD uint32_t pack8_sr_pairs(const float (&x)[8], uint32_t ra, uint32_t rb) {
  return code_sr_pair<0>(x, ra, rb) | (code_sr_pair<1>(x, ra, rb) << 4) | (code_sr_pair<2>(x, ra, rb) << 8) |
         (code_sr_pair<3>(x, ra, rb) << 12);
}

}  // namespace detail
}  // namespace mxfp4
