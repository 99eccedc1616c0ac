// Blackwell's stochastic E2M1 conversion (`cvt.rs.satfinite.e2m1x4.f32`) as an optional SR path, and the feed
// that makes it reproduce the contract's rule (DESIGN §2.2: round up iff r < t, t = (floor(512 f) + 1) >> 1,
// r = byte i % 4 of the element's Philox word).
//
// The instruction converts four float32 values with one 32-bit random operand; which byte serves which value
// and how the bits decide are not documented. So nothing here assumes them: a *feed* says how the kernel hands
// the contract's random word and values to the instruction, and the host picks, by a bit-for-bit self-test at
// first use (megatron_mxfp4/ops/cvt_rs.py), the first feed under which the instruction's codes equal the
// contract's on a table that covers every (interval, floor(512 f), r); with no such feed the software rule
// stays (the kernels' default). Feed bits (a uint32, 0 = software rule):
//   bit 0       on;
//   bit 1       complement the random word (r -> 255 - r per byte);
//   bit 2       bias: v -> v + sign(v) * gap(v) / 512, added toward zero, where gap is the E2M1 grid step at |v|
//               (1/2 below 2, 1 below 4, 2 above). A rule that truncates f to 8 bits (up iff
//               floor(256 f) > 255 - r) then decides as the contract's rounding of 256 f: floor(256 f') =
//               floor(256 f + 1/2) = t, also across a grid point (f >= 511/512 rounds up either way);
//   bits 16-31  the byte_perm selector applied to the word first (0x3210: byte k -> value k).
// The instruction exists on sm_100a / sm_103a (and their family target); elsewhere MXFP4_HAS_CVT_RS is 0, the
// kernels keep only the software rule and the probe reports the instruction missing.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "mxfp4_quantize.h"

#if (defined(__CUDA_ARCH_SPECIFIC__) && (__CUDA_ARCH_SPECIFIC__ == 1000 || __CUDA_ARCH_SPECIFIC__ == 1030)) || \
    (defined(__CUDA_ARCH_FAMILY_SPECIFIC__) && __CUDA_ARCH_FAMILY_SPECIFIC__ == 1000)
#define MXFP4_HAS_CVT_RS 1
#else
#define MXFP4_HAS_CVT_RS 0
#endif

namespace mxfp4 {

namespace detail {

// The random word as the instruction gets it under `feed`.
__device__ __forceinline__ uint32_t hw_sr_bits(uint32_t word, uint32_t feed) {
  return __byte_perm(word, 0u, feed >> 16) ^ (0u - ((feed >> 1) & 1u));
}

// v as the instruction gets it under `feed` (the bias of the file comment; exact but for the final truncation,
// which never crosses a grid point or a multiple of gap/256 upward).
__device__ __forceinline__ float hw_sr_value(float v, uint32_t feed) {
  if (!(feed & kHwSrBias)) return v;
  const uint32_t vb = __float_as_uint(v);
  const uint32_t vc = min(max(vb & 0x7F800000u, 127u << 23), 129u << 23);  // 2^0, 2^1, 2^2: the binade of |v|
  return __fadd_rz(v, __uint_as_float((vb & 0x80000000u) | (vc - (10u << 23))));  // +- 2^-10, 2^-9, 2^-8
}

// Four E2M1 codes (sign | magnitude) of v0..v3 rounded by the instruction with random operand `rbits`; v0 in
// bits 3:0 (the instruction packs its first operand highest). Traps where the instruction does not exist.
__device__ __forceinline__ uint32_t cvt_rs_e2m1x4(float v0, float v1, float v2, float v3, uint32_t rbits) {
#if MXFP4_HAS_CVT_RS
  uint16_t d;
  asm("cvt.rs.satfinite.e2m1x4.f32 %0, {%1, %2, %3, %4}, %5;" : "=h"(d) : "f"(v3), "f"(v2), "f"(v1), "f"(v0), "r"(rbits));
  return d;
#else
  __trap();
  return 0;
#endif
}

}  // namespace detail

}  // namespace mxfp4
