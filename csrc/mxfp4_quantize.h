// Host interface of the fused MXFP4 quantize kernels (no PyTorch dependency: raw pointers + stream).
//
// A kernel reads a row-major matrix X [rows, cols] (leading dimension `ld` elements, 16-byte aligned
// rows) once and writes up to two MXFP4 copies of it:
//   * the "row" copy, quantized along cols:  data [rows, cols/2], scales [rows, cols/32];
//     element (r, c) draws its dither from index r * row_idx_stride + c;
//   * the "col" copy, quantized along rows and stored transposed:  data [cols, rows/2],
//     scales [cols, rows/32]; element (r, c) draws its dither from index c * col_idx_stride + r.
// Each copy has its own RHT signs and Philox offset. The numerics are those of the PyTorch reference
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
  int64_t row_idx_stride = 0;
  const float* row_signs = nullptr;   // g float32 signs (only the sign bit is used); null: draw them
  float* row_signs_out = nullptr;     // optional: the g signs used, as float32 +-1
  const int64_t* row_offset_ptr = nullptr;  // optional device scalar (bits of a uint64)
  uint64_t row_offset = 0;
  // col copy (modes kCol, kDual)
  uint8_t* col_data = nullptr;
  uint8_t* col_scales = nullptr;
  int64_t col_idx_stride = 0;
  const float* col_signs = nullptr;
  float* col_signs_out = nullptr;
  const int64_t* col_offset_ptr = nullptr;
  uint64_t col_offset = 0;
  // shared
  const int64_t* seed_ptr = nullptr;  // optional device scalar (bits of a uint64)
  uint64_t seed = 0;
  float prescale = 1.0f;
  float hadamard_scale = 1.0f;  // float32(1/sqrt(g))
};

// Launches the kernel for (dtype, g, mode, stochastic) on `stream`. Throws std::invalid_argument for
// bad arguments and std::runtime_error for CUDA errors.
void quantize(DType dtype, int g, Mode mode, bool stochastic, const QuantizeParams& p, cudaStream_t stream);

// Shared-memory tile (rows x cols) the kernel uses for (dtype, g, mode); 0 x 0 when that combination
// does not exist (float32 dual with g = 256 does not fit in shared memory: run kRow and kCol).
void tile_shape(DType dtype, int g, Mode mode, int* tile_rows, int* tile_cols);

}  // namespace mxfp4
