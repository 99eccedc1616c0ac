// Host interface of the fused MXFP4 quantize kernels (no PyTorch dependency: raw pointers + stream).
//
// A kernel reads a row-major matrix X [rows, cols] (leading dimension `ld` elements, 16-byte aligned
// rows; everything past rows x cols reads as zero) once and writes up to two MXFP4 copies of it:
//   * the "row" copy, quantized along cols zero-padded to row_k:  data [rows, row_k/2], scales
//     [rows, row_k/32]; element (r, c) draws its dither from logical index r * row_k + c;
//   * the "col" copy, quantized along rows zero-padded to col_k and stored transposed:  data
//     [cols, col_k/2], scales [cols, col_k/32]; element (r, c) draws its dither from index c * col_k + r.
// row_k / col_k are multiples of max(32, g) (DESIGN §3). Optionally each copy's scales are also written in
// the 128x4-swizzled layout of Blackwell's block-scaled GEMMs (`*_scales_swizzled`, [ceil(rows/128) * 128,
// ceil(k/128) * 4] bytes; the kernel writes the entries of real scales only). Each copy has its own RHT signs and Philox
// offset. The numerics are those of the PyTorch reference
// `megatron_mxfp4.numerics.quantize.quantize_reference`, bit for bit.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mxfp4 {

enum Mode : int { kRow = 1, kCol = 2, kDual = 3 };
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct QuantizeParams {
  const void* x = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
  // row copy (modes kRow, kDual)
  uint8_t* row_data = nullptr;
  uint8_t* row_scales = nullptr;
  int64_t row_k = 0;                  // padded length of the quantized dimension (0: no row copy)
  uint8_t* row_scales_swizzled = nullptr;  // optional: the scales again, 128x4-swizzled
  const float* row_signs = nullptr;   // g float32 signs (only the sign bit is used); null: draw them
  float* row_signs_out = nullptr;     // optional: the g signs used, as float32 +-1
  const int64_t* row_offset_ptr = nullptr;  // optional device scalar (bits of a uint64)
  uint64_t row_offset = 0;
  // col copy (modes kCol, kDual)
  uint8_t* col_data = nullptr;
  uint8_t* col_scales = nullptr;
  int64_t col_k = 0;                  // padded length of the quantized dimension (0: no col copy)
  uint8_t* col_scales_swizzled = nullptr;
  const float* col_signs = nullptr;
  float* col_signs_out = nullptr;
  const int64_t* col_offset_ptr = nullptr;
  uint64_t col_offset = 0;
  // shared
  const int64_t* seed_ptr = nullptr;  // optional device scalar (bits of a uint64)
  uint64_t seed = 0;
  float prescale = 1.0f;
  float hadamard_scale = 1.0f;  // float32(1/sqrt(g))
  uint32_t hw_sr = 0;  // set by `quantize` from the device's feed (mxfp4_cvt_rs.cuh); callers leave it 0
};

// ------------------------------------------------------------------------------------------------
// Blackwell's stochastic E2M1 conversion as the SR path (mxfp4_cvt_rs.cuh): a per-device *feed* says how the
// kernels hand the contract's random words and values to `cvt.rs.satfinite.e2m1x4.f32`; 0 (the default) keeps
// the software rule. The host sets a feed only after a bit-for-bit self-test (megatron_mxfp4/ops/cvt_rs.py).
constexpr uint32_t kHwSrOn = 1u;          // use the instruction
constexpr uint32_t kHwSrComplement = 2u;  // random bytes r -> 255 - r
constexpr uint32_t kHwSrBias = 4u;        // values v -> v + sign(v) gap(v) / 512, toward zero
// bits 16-31: the byte_perm selector applied to the random word first (0x3210 = byte k to value k)

void set_hw_sr_feed(int device, uint32_t feed);
uint32_t hw_sr_feed(int device);

// The self-test's probe: out[j] = the instruction's four codes of v[4j .. 4j+3] (v[4j] in bits 3:0) with random
// word rbits[j], both passed through `feed`; *compiled = 1 where this device's code has the instruction (else 0,
// and out is not written). n4 groups of four; v 16-byte aligned.
void hw_sr_probe(const float* v, const uint32_t* rbits, uint16_t* out, int64_t n4, uint32_t feed, int32_t* compiled,
                 cudaStream_t stream);

// Launches the kernel for (dtype, g, mode, stochastic) on `stream`. Throws std::invalid_argument for
// bad arguments and std::runtime_error for CUDA errors.
void quantize(DType dtype, int g, Mode mode, bool stochastic, const QuantizeParams& p, cudaStream_t stream);

// Experimental: the dual quantize with the Hadamard transform on tensor cores (mxfp4_quantize_tc.cu), for BF16
// input, g = 64, both copies, no swizzled scales (`quantize_tc_supported`); same contract as `quantize` where
// the transform is exact (DESIGN §2.3), sm_80 or newer.
bool quantize_tc_supported(DType dtype, int g, Mode mode, const QuantizeParams& p);
void quantize_tc(DType dtype, int g, Mode mode, bool stochastic, const QuantizeParams& p, cudaStream_t stream);

// Shared-memory tile (rows x cols) the kernel uses for (dtype, g, mode); 0 x 0 when that combination
// does not exist (float32 dual with g = 256 does not fit in shared memory: run kRow and kCol).
void tile_shape(DType dtype, int g, Mode mode, int* tile_rows, int* tile_cols);

// ------------------------------------------------------------------------------------------------
// Grouped quantize: many independent matrices ("segments": the local experts of an MoE layer) in one
// launch. Segment s is quantized exactly as `quantize` would quantize it on its own with the same fields
// (its own seed, offsets, signs, outputs and padded lengths; the Philox index restarts in every segment):
// the kernel covers each segment with its own tiles (a tile never straddles two segments), and a small
// prefix table (`tile_start`) maps a tile to its segment. Signs that are drawn (signs null) come from the
// sign stream at (seed, *_sign_offset), which the caller sets to the copy's offset for `quantize`'s
// behaviour, or to another operand's offset to draw that operand's signs. Drawn signs are written to
// *_signs_out even for a segment without rows.
struct GroupSegment {
  const void* x = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
  uint8_t* row_data = nullptr;
  uint8_t* row_scales = nullptr;
  int64_t row_k = 0;
  uint8_t* col_data = nullptr;
  uint8_t* col_scales = nullptr;
  int64_t col_k = 0;
  const float* row_signs = nullptr;
  float* row_signs_out = nullptr;
  const float* col_signs = nullptr;
  float* col_signs_out = nullptr;
  const int64_t* seed_ptr = nullptr;
  uint64_t seed = 0;
  const int64_t* row_offset_ptr = nullptr;
  uint64_t row_offset = 0;
  const int64_t* col_offset_ptr = nullptr;
  uint64_t col_offset = 0;
  const int64_t* row_sign_offset_ptr = nullptr;
  uint64_t row_sign_offset = 0;
  const int64_t* col_sign_offset_ptr = nullptr;
  uint64_t col_sign_offset = 0;
  int64_t tile_start = 0;  // first tile of the segment (filled in by the launcher)
};

// Segments per launch (the table travels in the kernel's parameters, so a captured CUDA graph replays it).
constexpr int kMaxGroupSegments = 32;
// int64 fields per segment in the flat host table that `quantize_grouped_table` reads (GroupSegment's
// fields in order, without tile_start).
constexpr int kGroupSegmentFields = 24;

struct GroupedParams {
  GroupSegment seg[kMaxGroupSegments];
  int nseg = 0;
  int64_t ntiles = 0;  // total over all segments (filled in by the launcher)
  float prescale = 1.0f;
  float hadamard_scale = 1.0f;
  uint32_t hw_sr = 0;  // as QuantizeParams::hw_sr
};

// One launch for segments seg[0 .. nseg) (nseg <= kMaxGroupSegments), modes and dtypes as `quantize`
// (one dtype for all segments). Throws std::invalid_argument / std::runtime_error as `quantize`.
void quantize_grouped(DType dtype, int g, Mode mode, bool stochastic, const GroupedParams& p, cudaStream_t stream);

// The same from a host table of nseg x kGroupSegmentFields int64 values (pointers and the bits of unsigned
// values as int64).
void quantize_grouped_table(DType dtype, int g, Mode mode, bool stochastic, const int64_t* table, int nseg,
                            float prescale, float hadamard_scale, cudaStream_t stream);

}  // namespace mxfp4
