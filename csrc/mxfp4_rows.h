// Host interface of the E4M3-row conversion for the Hopper GEMM with per-row scales (no PyTorch dependency).
//
// Converts up to four packed MXFP4 operands [rows, k] (quantized along k) for FP8 GEMMs whose scales are
// one float32 per row (cuBLASLt's outer-vector scaling): every block exponent e_j of a row is folded into its
// codes relative to the row exponent E = max(e_top - 6, -126), e_top the largest exponent among the row's live
// blocks (a non-zero code, a finite scale; E = 0 without any):
//   codes [rows_out, kt] E4M3 (kt = k rounded up to 128, zero-padded): value * 2^(e_j - E), e_j - E in [-8, 6]
//         (zero codes for a block with the NaN scale, and in a NaN row for a block with e_j - E < -8);
//   row_scales [rows_out] float32: 2^E * mult; NaN if a block has the NaN scale (0xFF); 0 for a flagged row
//         and for the padding rows rows .. rows_out - 1 (zero codes);
//   row_flags [rows_out] int32: 1 where a live block lies more than 14 binades below e_top (the row cannot be
//         folded exactly: zero codes, scale 0; the GEMM must add that row's product exactly), else 0;
//   list / count: the flagged rows' indices, appended (count must be zero before the first launch).
// Bit-exact twin of megatron_mxfp4.ops.layouts.to_e4m3_rows_reference (codes, scales, flags).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mxfp4 {

struct RowConvOperand {
  const uint8_t* data = nullptr;    // packed codes [rows, k/2], row stride ld_data bytes (multiple of 8)
  int64_t ld_data = 0;
  const uint8_t* scales = nullptr;  // E8M0 block scales [rows, k/32], row stride ld_scales bytes
  int64_t ld_scales = 0;
  int64_t rows = 0, k = 0;          // k: a positive multiple of 32
  int64_t rows_out = 0;             // rows written (>= rows)
  uint8_t* codes = nullptr;         // [rows_out, kt] E4M3, contiguous, 16-byte aligned
  float* row_scales = nullptr;      // [rows_out]
  int32_t* row_flags = nullptr;     // [rows_out]
  int32_t* list = nullptr;          // [rows]: flagged row indices (first *count entries)
  int32_t* count = nullptr;         // int32 [1]
  float mult = 1.0f;
};

constexpr int kMaxRowConvOperands = 4;  // both operands of two GEMMs (a linear's dgrad and wgrad)

// Converts `n` (1 .. 4) operands in one launch on `stream`. Throws std::invalid_argument for bad arguments
// and std::runtime_error for CUDA errors.
void to_e4m3_rows(const RowConvOperand* ops, int n, cudaStream_t stream);

}  // namespace mxfp4
