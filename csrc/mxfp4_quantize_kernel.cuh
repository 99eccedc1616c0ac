// Fused MXFP4 quantize kernel: load -> RHT (float32 FWHT) -> per-32 amax -> E8M0 scale ->
// RTN or SR (Philox4x32-10) -> nibble packing, for a row copy, a transposed column copy, or both
// from one read of the input ("dual").
//
// Bit-exact twin of megatron_mxfp4/numerics/quantize.py (contract v2, see its module docstring):
//   0. the quantized dimension is zero-padded to K (a multiple of max(32, g)): the tile loads zero-fill
//      everything past the input's edge, and the copies are written up to K;
//   1. y = x (float32) with the sign bit of s_j flipped in (== x * s_j for s_j = +-1), butterflies
//      h = 1, 2, 4, ... (pairs (i, i+h) -> (a+b, a-b)), then y *= float32(1/sqrt(g));
//   2. amax of |y| over 32 elements; any NaN/Inf -> scale 0xFF and zero codes; otherwise
//      e = max(exponent bits, 2) - 129 (== floor(log2 amax) - 2 clamped to [-127, 127]);
//   3. v = y * (2^-e * p): one rounded product (2^-e * p is exact, and y * 2^-e is exact, so this is
//      the reference's (y * 2^-e) * p);
//   4. RTN (ties to even, saturating) or SR with the 8-bit dither r of the element's logical index i
//      (row copy: row * K + col; column copy: col * K + row): byte i % 4 of word (i / 4) % 4 of the
//      Philox4x32-10 call with block counter i / 16 (key = seed, counter words 2..3 = offset), so one
//      call serves 16 consecutive elements of a thread;
//   5. two codes per byte, first element in the low nibble.
//
// The element encoders (RTN, SR: one float add, no table) are in mxfp4_element.cuh.
//
// Blackwell: where sm_100a's stochastic conversion (cvt.rs.satfinite.e2m1x4.f32) is compiled in and the
// host's self-test found a feed under which it reproduces the rule above bit for bit (p.hw_sr != 0, see
// mxfp4_cvt_rs.cuh), SR codes come from it, four per instruction, from the same random words; everywhere
// else (and by default) from the software rule.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "mxfp4_cvt_rs.cuh"
#include "mxfp4_element.cuh"
#include "mxfp4_quantize.h"

namespace mxfp4 {
namespace detail {

constexpr int kThreads = 256;
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint32_t kDomainDither = 0u;
constexpr uint32_t kDomainSigns = 1u;

template <typename T> struct InType;
template <> struct InType<float> { static constexpr DType kCode = kFloat32; };
template <> struct InType<__nv_bfloat16> { static constexpr DType kCode = kBFloat16; };
template <> struct InType<__half> { static constexpr DType kCode = kFloat16; };

// Tile geometry of one (g, mode, element size). E = elements one thread owns along the quantized
// dimension (one or two MX blocks), NSEG = threads (lanes of one warp) sharing one g-block.
template <int G, int MODE, int SZ>
struct Geometry {
  static constexpr int E = G >= 64 ? 64 : 32;
  static constexpr int GB = G > 0 ? G : E;
  static constexpr int NSEG = GB / E;
  static constexpr int TR = MODE == kRow ? 64 : (GB > 64 ? GB : 64);
  static constexpr int TC = MODE == kRow ? 256 : (MODE == kCol ? 16384 / TR : (GB > 128 ? GB : 16384 / TR));
  static constexpr int CH = 16 / SZ;                       // elements per 16-byte chunk
  static constexpr int TILE_BYTES = TR * TC * SZ;
  static constexpr int STAGES = TILE_BYTES <= 48 * 1024 ? 2 : 1;
  static constexpr int SIGN_BYTES = 2 * GB * 4;
  static constexpr int SMEM_BYTES = SIGN_BYTES + STAGES * TILE_BYTES;
  static constexpr bool kFits = SMEM_BYTES <= 227 * 1024;
  // column reads: CW columns per warp for each of the NSEG segments of a g-block
  static constexpr int CW = 32 / NSEG;
  static constexpr int KSWZ = (CW * SZ) / 16;              // 16-byte chunks one segment's lanes read
  static_assert((TR % GB == 0 && TC % GB == 0) || MODE != kDual, "dual tile must hold whole g-blocks");
  static_assert(TC * SZ >= 128, "tile rows must span at least 128 bytes (swizzle)");
};

// ------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011), the stream of megatron_mxfp4/numerics/philox.py.
struct PhiloxKey {
  uint32_t k0[10];
  uint32_t k1[10];
};

__device__ __forceinline__ PhiloxKey philox_key(uint64_t seed) {
  PhiloxKey k;
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    k.k0[r] = a;
    k.k1[r] = b;
    a += kPhiloxW0;
    b += kPhiloxW1;
  }
  return k;
}

__device__ __forceinline__ uint4 philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, const PhiloxKey& k) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t lo0 = c0 * kPhiloxM0, hi0 = __umulhi(c0, kPhiloxM0);
    const uint32_t lo1 = c2 * kPhiloxM1, hi1 = __umulhi(c2, kPhiloxM1);
    const uint32_t n0 = hi1 ^ c1 ^ k.k0[r];
    const uint32_t n2 = hi0 ^ c3 ^ k.k1[r];
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return make_uint4(c0, c1, c2, c3);
}

// The 4 words of the stream (key, offset, domain) at element indices 4*blk .. 4*blk+3.
__device__ __forceinline__ uint4 philox_block(uint64_t blk, uint64_t offset, uint32_t domain, const PhiloxKey& k) {
  return philox(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32) | (domain << 31),
                static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), k);
}

// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float max_nan_abs(float m, float y) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(m), "f"(fabsf(y)));
  return r;
}

// ------------------------------------------------------------------------------------------------
// Input conversion: 16-byte chunk -> float32 with sign bits flipped by masks (0 or 0x80000000).
template <typename T, bool SIGNS>
__device__ __forceinline__ void convert_chunk(const uint4 d, const uint32_t* m, float* out);

template <>
__device__ __forceinline__ void convert_chunk<__nv_bfloat16, true>(const uint4 d, const uint32_t* m, float* out) {
  const uint4 m0 = *reinterpret_cast<const uint4*>(m);
  const uint4 m1 = *reinterpret_cast<const uint4*>(m + 4);
  out[0] = __uint_as_float((d.x << 16) ^ m0.x);
  out[1] = __uint_as_float((d.x & 0xFFFF0000u) ^ m0.y);
  out[2] = __uint_as_float((d.y << 16) ^ m0.z);
  out[3] = __uint_as_float((d.y & 0xFFFF0000u) ^ m0.w);
  out[4] = __uint_as_float((d.z << 16) ^ m1.x);
  out[5] = __uint_as_float((d.z & 0xFFFF0000u) ^ m1.y);
  out[6] = __uint_as_float((d.w << 16) ^ m1.z);
  out[7] = __uint_as_float((d.w & 0xFFFF0000u) ^ m1.w);
}
template <>
__device__ __forceinline__ void convert_chunk<__nv_bfloat16, false>(const uint4 d, const uint32_t*, float* out) {
  out[0] = __uint_as_float(d.x << 16);
  out[1] = __uint_as_float(d.x & 0xFFFF0000u);
  out[2] = __uint_as_float(d.y << 16);
  out[3] = __uint_as_float(d.y & 0xFFFF0000u);
  out[4] = __uint_as_float(d.z << 16);
  out[5] = __uint_as_float(d.z & 0xFFFF0000u);
  out[6] = __uint_as_float(d.w << 16);
  out[7] = __uint_as_float(d.w & 0xFFFF0000u);
}
template <bool SIGNS>
__device__ __forceinline__ void convert_half_chunk(const uint4 d, const uint32_t* m, float* out) {
  const uint32_t w[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
    const float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
  if (SIGNS) {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = __uint_as_float(__float_as_uint(out[i]) ^ m[i]);
  }
}
template <>
__device__ __forceinline__ void convert_chunk<__half, true>(const uint4 d, const uint32_t* m, float* out) {
  convert_half_chunk<true>(d, m, out);
}
template <>
__device__ __forceinline__ void convert_chunk<__half, false>(const uint4 d, const uint32_t* m, float* out) {
  convert_half_chunk<false>(d, m, out);
}
template <>
__device__ __forceinline__ void convert_chunk<float, true>(const uint4 d, const uint32_t* m, float* out) {
  const uint4 m0 = *reinterpret_cast<const uint4*>(m);
  out[0] = __uint_as_float(d.x ^ m0.x);
  out[1] = __uint_as_float(d.y ^ m0.y);
  out[2] = __uint_as_float(d.z ^ m0.z);
  out[3] = __uint_as_float(d.w ^ m0.w);
}
template <>
__device__ __forceinline__ void convert_chunk<float, false>(const uint4 d, const uint32_t*, float* out) {
  out[0] = __uint_as_float(d.x);
  out[1] = __uint_as_float(d.y);
  out[2] = __uint_as_float(d.z);
  out[3] = __uint_as_float(d.w);
}

// One element from shared memory -> float32 bits (no sign applied).
__device__ __forceinline__ uint32_t load_bits(const unsigned char* p, float*) {
  return *reinterpret_cast<const uint32_t*>(p);
}
__device__ __forceinline__ uint32_t load_bits(const unsigned char* p, __nv_bfloat16*) {
  return static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(p)) << 16;
}
__device__ __forceinline__ uint32_t load_bits(const unsigned char* p, __half*) {
  return __float_as_uint(__half2float(*reinterpret_cast<const __half*>(p)));
}

// ------------------------------------------------------------------------------------------------
// Shared-memory swizzle: 16-byte chunk `c` of tile row `r` lives at chunk c ^ f(r) (f < 8, so a
// chunk stays inside its 128-byte group). Row reads (8 lanes = 8 rows) and column reads (lanes of
// the NSEG segments sit E rows apart) are then free of bank conflicts.
template <class Geo>
__device__ __forceinline__ int swizzle(int r) {
  return (r & 7) ^ (((r / Geo::E) % Geo::NSEG) * Geo::KSWZ);
}

// FWHT of a g-block held as E consecutive elements by each of NSEG lanes (lane distance `step`).
template <int E, int NSEG>
__device__ __forceinline__ void fwht(float (&v)[E], int seg, int step, float hscale) {
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = __fadd_rn(a, b);
        v[i + h] = __fsub_rn(a, b);
      }
    }
  }
#pragma unroll
  for (int m = 1; m < NSEG; m <<= 1) {
    const float sg = (seg & m) ? -1.0f : 1.0f;  // upper lane: partner - mine; lower: mine + partner
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float o = __shfl_xor_sync(0xFFFFFFFFu, v[i], m * step);
      v[i] = __fmaf_rn(v[i], sg, o);
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) v[i] = __fmul_rn(v[i], hscale);
  __syncwarp();  // keeps the scheduler from interleaving the transform with the quantization (registers)
}

// A block's E8M0 scale byte (e + 127, e = floor(log2 amax) - 2 clamped to [-127, 127]) and its multiplier
// 2^-e p (exact), from the block's NaN-propagating amax; returns whether the block holds NaN or Inf.
__device__ __forceinline__ bool block_scale(float amax, float prescale, uint32_t& sbyte, float& mul) {
  sbyte = max(__float_as_uint(amax) >> 23, 2u) - 2u;
  mul = __fmul_rn(__uint_as_float((254u - sbyte) << 23), prescale);
  return !(amax <= 3.402823466e38f);
}

// Byte offset of scale (r, c) in the 128x4-swizzled E8M0 layout that Blackwell's block-scaled GEMMs read
// (twin of `layouts.blackwell_scale_offset`): 512-byte blocks of 128 rows x 4 scale columns in row-major
// block order, (r, c) at (r % 32) * 16 + (r % 128 / 32) * 4 + c % 4 inside its block; `padded_cols` is the
// scale-column count rounded up to 4.
__device__ __forceinline__ int64_t swizzled_scale_offset(int64_t r, int64_t c, int64_t padded_cols) {
  return ((r >> 7) * (padded_cols >> 2) + (c >> 2)) * 512 + (r & 31) * 16 + ((r >> 5) & 3) * 4 + (c & 3);
}

// Quantize E values (E/32 MX blocks) whose first element has logical index idx0 (a multiple of 32), and
// store E/2 code bytes and E/32 scale bytes; with `swz` also the scales at their places in the swizzled
// layout of row `srow` (scale columns scol, scol + 1, ...; `spc` padded scale columns).
// `hw_sr`: the feed of Blackwell's stochastic conversion (0: the software rule).
template <int E, bool SR>
__device__ __forceinline__ void quantize_store(const float (&v)[E], float prescale, uint64_t idx0, uint64_t offset,
                                               const PhiloxKey& key, uint8_t* data, uint8_t* scales, bool valid,
                                               uint8_t* swz, int64_t srow, int64_t scol, int64_t spc, uint32_t hw_sr) {
  uint32_t words[E / 8];
#pragma unroll
  for (int b = 0; b < E / 32; ++b) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; ++i) amax = max_nan_abs(amax, v[32 * b + i]);
    uint32_t sbyte;
    float mul;
    const bool bad = block_scale(amax, prescale, sbyte, mul);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // 16 elements per Philox call
      uint4 rnd = make_uint4(0, 0, 0, 0);
      if (SR) rnd = philox_block((idx0 + 32 * b + 16 * h) >> 4, offset, kDomainDither, key);
      const uint32_t r4[4] = {rnd.x, rnd.y, rnd.z, rnd.w};
#if MXFP4_HAS_CVT_RS
      if (SR && (hw_sr & kHwSrOn)) {  // warp-uniform: one feed per launch
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          uint32_t word = 0;
#pragma unroll
          for (int w = 0; w < 2; ++w) {  // elements 16h + 8q + 4w + (0..3) take the bytes of word 2q + w
            float x[4];
#pragma unroll
            for (int k = 0; k < 4; ++k)
              x[k] = hw_sr_value(__fmul_rn(v[32 * b + 16 * h + 8 * q + 4 * w + k], mul), hw_sr);
            word |= cvt_rs_e2m1x4(x[0], x[1], x[2], x[3], hw_sr_bits(r4[2 * q + w], hw_sr)) << (16 * w);
          }
          words[4 * b + 2 * h + q] = bad ? 0u : word;
        }
        continue;
      }
#endif
      if (SR && prescale <= 0.75f) {  // |v| <= 6: the unclamped encoder (warp-uniform: one prescale per launch)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float x[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) x[k] = __fmul_rn(v[32 * b + 16 * h + 8 * q + k], mul);
          const uint32_t word = pack8_sr_pairs(x, r4[2 * q], r4[2 * q + 1]);
          words[4 * b + 2 * h + q] = bad ? 0u : word;
        }
        continue;
      }
#pragma unroll
      for (int q = 0; q < 2; ++q) {  // one output word: 8 codes
        uint32_t word = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int i = 16 * h + 8 * q + k;  // element in the block
          const float x = __fmul_rn(v[32 * b + i], mul);
          const uint32_t c = SR ? code_sr(x, (r4[i / 4 % 4] >> (8 * (i % 4))) & 0xFFu) : code_rtn(x);
          word |= c << (4 * k);
        }
        words[4 * b + 2 * h + q] = bad ? 0u : word;
      }
    }
    const uint8_t sb = bad ? 0xFFu : static_cast<uint8_t>(sbyte);
    if (valid) scales[b] = sb;
    if (valid && swz) swz[swizzled_scale_offset(srow, scol + b, spc)] = sb;
  }
  if (valid) {
#pragma unroll
    for (int j = 0; j < E / 32; ++j)
      reinterpret_cast<uint4*>(data)[j] = make_uint4(words[4 * j], words[4 * j + 1], words[4 * j + 2], words[4 * j + 3]);
  }
}

// The extents the tiles cover: the input, and the padded quantized dimension of each copy written.
__host__ __device__ __forceinline__ int64_t tiled_rows(const QuantizeParams& p) { return p.rows > p.col_k ? p.rows : p.col_k; }
__host__ __device__ __forceinline__ int64_t tiled_cols(const QuantizeParams& p) { return p.cols > p.row_k ? p.cols : p.row_k; }

__device__ __forceinline__ uint64_t read_u64(const int64_t* ptr, uint64_t value) {
  return ptr ? static_cast<uint64_t>(*ptr) : value;
}

// The g sign masks of one copy into shared memory (0 or 0x80000000 per position).
template <int GB>
__device__ __forceinline__ void init_signs(uint32_t* dst, const float* given, float* out, uint64_t offset,
                                           const PhiloxKey& key) {
  for (int j = threadIdx.x; j < GB; j += kThreads) {
    uint32_t m;
    if (given) {
      m = __float_as_uint(given[j]) & 0x80000000u;
    } else {
      const uint4 w = philox_block(static_cast<uint64_t>(j >> 2), offset, kDomainSigns, key);
      const uint32_t r4[4] = {w.x, w.y, w.z, w.w};
      m = r4[j & 3] & 0x80000000u;
    }
    dst[j] = m;
    if (out && blockIdx.x == 0) out[j] = m ? -1.0f : 1.0f;
  }
}

// 16 bytes to shared memory of which the first `n` (0..16) come from `gmem`, the rest are zero.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int n) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T, class Geo>
__device__ __forceinline__ void load_tile(const QuantizeParams& p, int64_t tile, int64_t ntc, unsigned char* dst) {
  constexpr int CPR = Geo::TC / Geo::CH;  // chunks per tile row
  const int64_t row0 = (tile / ntc) * Geo::TR, col0 = (tile % ntc) * Geo::TC;
  const T* x = static_cast<const T*>(p.x);
#pragma unroll 4
  for (int q = threadIdx.x; q < Geo::TR * CPR; q += kThreads) {
    const int r = q / CPR, c = q % CPR;
    const int64_t gr = row0 + r, gc = col0 + static_cast<int64_t>(c) * Geo::CH;
    const bool ok = gr < p.rows && gc < p.cols;  // past the edge: zeros (the padding of DESIGN §3)
    const T* src = ok ? x + gr * p.ld + gc : x;
    const int64_t left = p.cols - gc;  // elements of this chunk inside the row
    const int n = !ok ? 0 : (left >= Geo::CH ? 16 : static_cast<int>(left) * static_cast<int>(sizeof(T)));
    cp_async16(dst + (r * Geo::TC * static_cast<int>(sizeof(T))) + ((c ^ swizzle<Geo>(r)) * 16), src, n);
  }
}

// The row copy of one shared-memory tile (t, rows row0.., columns col0..): every E elements of a row along the
// quantized dimension, through the RHT, quantized and stored at row r of `data` / `scales` (row length k).
template <typename T, class Geo, bool RHT, bool SR>
__device__ __forceinline__ void quantize_tile_rows(const unsigned char* t, const uint32_t* signs, float hadamard_scale,
                                                   float prescale, int64_t row0, int64_t col0, int64_t rows, int64_t k,
                                                   uint8_t* data, uint8_t* scales, uint8_t* swz, uint64_t offset,
                                                   const PhiloxKey& key, uint32_t hw_sr) {
  constexpr int E = Geo::E, NSEG = Geo::NSEG, TR = Geo::TR, TC = Geo::TC, CH = Geo::CH, SZ = sizeof(T);
  constexpr int SEGROW = TC / E;
#pragma unroll 1
  for (int u = threadIdx.x; u < TR * SEGROW; u += kThreads) {
    const int rest = u >> 3, seg = rest % SEGROW, r = (rest / SEGROW) * 8 + (u & 7);
    const int sig = seg % NSEG;
    float v[E];
    const unsigned char* rowp = t + r * TC * SZ;
    const int f = swizzle<Geo>(r);
#pragma unroll
    for (int j = 0; j < E / CH; ++j) {
      const int c = seg * (E / CH) + j;
      const uint4 d = *reinterpret_cast<const uint4*>(rowp + ((c ^ f) * 16));
      convert_chunk<T, RHT>(d, signs + sig * E + j * CH, v + j * CH);
    }
    if (RHT) fwht<E, NSEG>(v, sig, 8, hadamard_scale);
    const int64_t gr = row0 + r, gc = col0 + seg * E;
    const bool valid = gr < rows && gc < k;
    quantize_store<E, SR>(v, prescale, static_cast<uint64_t>(gr * k + gc), offset, key, data + gr * (k / 2) + gc / 2,
                          scales + gr * (k / 32) + gc / 32, valid, swz, gr, gc / 32, (k / 32 + 3) / 4 * 4, hw_sr);
  }
}

// The column copy of one shared-memory tile: every E elements of a column along the quantized dimension (the
// tile's rows), through the RHT, quantized and stored transposed at row c of `data` / `scales` (row length k).
template <typename T, class Geo, bool RHT, bool SR>
__device__ __forceinline__ void quantize_tile_cols(const unsigned char* t, const uint32_t* signs, float hadamard_scale,
                                                   float prescale, int64_t row0, int64_t col0, int64_t cols, int64_t k,
                                                   uint8_t* data, uint8_t* scales, uint8_t* swz, uint64_t offset,
                                                   const PhiloxKey& key, uint32_t hw_sr) {
  constexpr int E = Geo::E, NSEG = Geo::NSEG, TR = Geo::TR, TC = Geo::TC, CH = Geo::CH, SZ = sizeof(T);
  constexpr int CW = Geo::CW;
  constexpr int SEGCOL = TR / E;
#pragma unroll 1
  for (int u = threadIdx.x; u < TC * SEGCOL; u += kThreads) {
    const int col_lo = u % CW, t1 = u / CW, s = t1 % NSEG, t2 = t1 / NSEG;
    const int c = (t2 % (TC / CW)) * CW + col_lo, rs = (t2 / (TC / CW)) * NSEG + s;
    float v[E];
    // row rs*E + i, column c: chunk (c / CH) ^ swizzle(row) = cx ^ (i & 7), cx = (c / CH) ^ s*KSWZ
    const int cx = (c / CH) ^ (s * Geo::KSWZ);
    const unsigned char* base = t + rs * E * TC * SZ + (c % CH) * SZ;
    const unsigned char* addr[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) addr[j] = base + ((cx ^ j) * 16);
#pragma unroll
    for (int i0 = 0; i0 < E; i0 += 4) {
      uint4 m = make_uint4(0, 0, 0, 0);
      if (RHT) m = *reinterpret_cast<const uint4*>(signs + s * E + i0);
      const uint32_t m4[4] = {m.x, m.y, m.z, m.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = i0 + j;
        v[i] = __uint_as_float(load_bits(addr[i & 7] + i * TC * SZ, static_cast<T*>(nullptr)) ^ m4[j]);
      }
    }
    if (RHT) fwht<E, NSEG>(v, s, CW, hadamard_scale);
    const int64_t gc = col0 + c, gr = row0 + rs * E;
    const bool valid = gc < cols && gr < k;
    quantize_store<E, SR>(v, prescale, static_cast<uint64_t>(gc * k + gr), offset, key, data + gc * (k / 2) + gr / 2,
                          scales + gc * (k / 32) + gr / 32, valid, swz, gc, gr / 32, (k / 32 + 3) / 4 * 4, hw_sr);
  }
}

template <typename T, int G, int MODE, bool SR>
__global__ void __launch_bounds__(kThreads, 2) quantize_kernel(const QuantizeParams p) {
  using Geo = Geometry<G, MODE, sizeof(T)>;
  constexpr int TR = Geo::TR, TC = Geo::TC, GB = Geo::GB;
  constexpr bool DO_ROW = (MODE & kRow) != 0, DO_COL = (MODE & kCol) != 0, RHT = G > 0;

  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* sgn_row = reinterpret_cast<uint32_t*>(smem);
  uint32_t* sgn_col = sgn_row + GB;
  unsigned char* tiles = smem + Geo::SIGN_BYTES;

  const uint64_t seed = read_u64(p.seed_ptr, p.seed);
  const uint64_t off_row = read_u64(p.row_offset_ptr, p.row_offset);
  const uint64_t off_col = read_u64(p.col_offset_ptr, p.col_offset);
  const PhiloxKey key = philox_key(seed);
  if (RHT) {
    if (DO_ROW) init_signs<GB>(sgn_row, p.row_signs, p.row_signs_out, off_row, key);
    if (DO_COL) init_signs<GB>(sgn_col, p.col_signs, p.col_signs_out, off_col, key);
  }

  const int64_t ntc = (tiled_cols(p) + TC - 1) / TC;
  const int64_t ntiles = ((tiled_rows(p) + TR - 1) / TR) * ntc;
  int64_t tile = blockIdx.x;
  if (tile < ntiles) load_tile<T, Geo>(p, tile, ntc, tiles);
  cp_async_commit();
  int stage = 0;

  for (; tile < ntiles; tile += gridDim.x) {
    const int64_t next = tile + gridDim.x;
    if (Geo::STAGES == 2) {
      if (next < ntiles) load_tile<T, Geo>(p, next, ntc, tiles + (stage ^ 1) * Geo::TILE_BYTES);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const unsigned char* t = tiles + stage * Geo::TILE_BYTES;
    const int64_t row0 = (tile / ntc) * TR, col0 = (tile % ntc) * TC;

    if (DO_ROW)
      quantize_tile_rows<T, Geo, RHT, SR>(t, sgn_row, p.hadamard_scale, p.prescale, row0, col0, p.rows, p.row_k,
                                          p.row_data, p.row_scales, p.row_scales_swizzled, off_row, key, p.hw_sr);
    if (DO_COL)
      quantize_tile_cols<T, Geo, RHT, SR>(t, sgn_col, p.hadamard_scale, p.prescale, row0, col0, p.cols, p.col_k,
                                          p.col_data, p.col_scales, p.col_scales_swizzled, off_col, key, p.hw_sr);
    __syncthreads();
    if (Geo::STAGES == 1) {
      if (next < ntiles) load_tile<T, Geo>(p, next, ntc, tiles);
      cp_async_commit();
    } else {
      stage ^= 1;
    }
  }
  cp_async_wait<0>();
}

}  // namespace detail
}  // namespace mxfp4
