// Device helpers shared by the E4M3 conversions of the Hopper GEMM (mxfp4_tiles.cu, mxfp4_rows.cu): an E2M1
// code times a power of two as an E4M3 byte, looked up four codes at a time, without float arithmetic.
//
// Within a block every code maps through one 8-entry table (the E4M3 byte of |E2M1 value| * 2^d), so four
// codes at a time are looked up with PRMT: selector = the four 3-bit magnitudes, table = two 32-bit words.
// A second table holds the negated entries (sign bit set, except +0 for zero), and a third PRMT on the sign
// bits picks between them.
#pragma once

#include <cstdint>

namespace mxfp4 {
namespace detail {

// |E2M1| 0, .5, 1, 1.5 and 2, 3, 4, 6 as E4M3 bytes (the tables of d = 0).
constexpr uint32_t kE4M3BaseLo = 0x3C383000u;
constexpr uint32_t kE4M3BaseHi = 0x4C484440u;

// E4M3 byte of the E2M1 magnitude with base byte `b` (0x00, 0x30 .. 0x4C) times 2^d, d in [-8, 6]: exact,
// down to E4M3's subnormal 2^-9 and up to 6 * 2^6 = 384 (the largest finite E4M3 value is 448).
__device__ __forceinline__ uint32_t fold_byte(uint32_t b, int d) {
  if (b == 0) return 0;
  const int e = static_cast<int>(b >> 3) + d;  // biased E4M3 exponent after the fold
  const uint32_t m = b & 7u;
  return e >= 1 ? (static_cast<uint32_t>(e) << 3) | m : (8u + m) >> (1 - e);  // subnormal: exact shift
}

// The four table words of a block folded by 2^d (pos: |value|, neg: -|value| with +0 kept for zero).
struct FoldTable {
  uint32_t pos_lo, pos_hi, neg_lo, neg_hi;
};

__device__ __forceinline__ FoldTable fold_table(int d) {
  FoldTable t{0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    t.pos_lo |= fold_byte((kE4M3BaseLo >> (8 * i)) & 0xFFu, d) << (8 * i);
    t.pos_hi |= fold_byte((kE4M3BaseHi >> (8 * i)) & 0xFFu, d) << (8 * i);
  }
  t.neg_lo = t.pos_lo | 0x80808000u;  // entry 0 (zero) stays +0
  t.neg_hi = t.pos_hi | 0x80808080u;
  return t;
}

// Four E4M3 bytes for the four codes in the low 16 bits of h (natural order, low nibble first).
__device__ __forceinline__ uint32_t lookup4(uint32_t h, const FoldTable& t) {
  const uint32_t sel = h & 0x7777u;
  const uint32_t pos = __byte_perm(t.pos_lo, t.pos_hi, sel);
  const uint32_t neg = __byte_perm(t.neg_lo, t.neg_hi, sel);
  const uint32_t smask = __byte_perm(0xFF00u, 0u, (h >> 3) & 0x1111u);  // 0xFF where the sign bit is set
  return (pos & ~smask) | (neg & smask);
}

// 16 E4M3 bytes for the 16 codes of two packed words.
__device__ __forceinline__ uint4 lookup16(uint32_t w0, uint32_t w1, const FoldTable& t) {
  return make_uint4(lookup4(w0, t), lookup4(w0 >> 16, t), lookup4(w1, t), lookup4(w1 >> 16, t));
}

__device__ __forceinline__ float pow2(int e) {  // 2^e, e in [-127, 127]; 2^-127 is subnormal
  return __uint_as_float(e >= -126 ? static_cast<uint32_t>(e + 127) << 23 : 0x00400000u);
}

}  // namespace detail
}  // namespace mxfp4
