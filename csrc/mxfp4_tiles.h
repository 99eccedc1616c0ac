// Host interface of the E4M3-tile conversion (no PyTorch dependency: raw pointers + stream).
//
// The Hopper GEMM multiplies MXFP4 operands on the FP8 tensor cores with one float32 scale per 1x128
// tile (cuBLASLt's 1x128 block scaling). This converts a packed MXFP4 operand [rows, k] (quantized
// along k) into that layout in one pass:
//   codes [rows, kp] E4M3 (kp = k rounded up to 128, zero-padded): element value * 2^(e_j - e_top),
//         the block exponent e_j folded in relative to the tile's largest live exponent e_top;
//   tile_scales [kp/128, rows] float32: 2^e_top * mult (NaN if a block of the tile has the NaN scale);
//   flags [kp/128] int32: set to 1 where some row-tile's live blocks span more than 8 binades (its
//         codes are zero; the GEMM must exclude that K-slab and add it exactly).
// Bit-exact twin of megatron_mxfp4.ops.layouts.to_e4m3_reference(t, 128, "natural") for mult = 1
// (with mult, the tile scales are multiplied by it in float32).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mxfp4 {

struct TileParams {
  const uint8_t* data = nullptr;    // packed codes [rows, k/2], row stride ld_data bytes (multiple of 8)
  int64_t ld_data = 0;
  const uint8_t* scales = nullptr;  // E8M0 block scales [rows, k/32], row stride ld_scales bytes
  int64_t ld_scales = 0;
  int64_t rows = 0, k = 0;          // k: a multiple of 32
  int64_t rows_out = 0;             // rows written (>= rows; 0: rows): the rest are zero codes, scale mult
  uint8_t* codes = nullptr;         // [rows_out, kp] E4M3, contiguous
  float* tile_scales = nullptr;     // [kp/128, rows_out]
  int32_t* flags = nullptr;         // [kp/128], zero on entry (flags are only ever set)
  float mult = 1.0f;
};

// Launches the conversion on `stream`. Throws std::invalid_argument for bad arguments and
// std::runtime_error for CUDA errors.
void to_e4m3_tiles(const TileParams& p, cudaStream_t stream);

// After both operands of a GEMM are converted: flags_a[t] |= flags_b[t], and A's tile scales of every
// flagged slab t are zeroed (tile_scales_a [nt, rows_a]), so the GEMM skips those slabs entirely.
void mask_flagged_slabs(int32_t* flags_a, const int32_t* flags_b, float* tile_scales_a, int64_t rows_a, int64_t nt,
                        cudaStream_t stream);

}  // namespace mxfp4
