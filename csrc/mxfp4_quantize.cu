// Dispatch of mxfp4::quantize over (dtype, mode) to the per-file launchers, and argument checks.
#include <stdexcept>
#include <string>

#include "mxfp4_quantize_launch.cuh"

namespace mxfp4 {
namespace detail {
#define MXFP4_DECLARE(NAME) void launch_##NAME(int g, bool sr, const QuantizeParams& p, cudaStream_t stream);
MXFP4_DECLARE(f32_row)
MXFP4_DECLARE(f32_col)
MXFP4_DECLARE(f32_dual)
MXFP4_DECLARE(bf16_row)
MXFP4_DECLARE(bf16_col)
MXFP4_DECLARE(bf16_dual)
MXFP4_DECLARE(f16_row)
MXFP4_DECLARE(f16_col)
MXFP4_DECLARE(f16_dual)
#undef MXFP4_DECLARE

static void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("mxfp4 quantize: " + msg);
}

static int element_size(DType d) { return d == kFloat32 ? 4 : 2; }

}  // namespace detail

void tile_shape(DType dtype, int g, Mode mode, int* tile_rows, int* tile_cols) {
  using namespace detail;
  *tile_rows = *tile_cols = 0;
#define MXFP4_SHAPES(T)                                     \
  switch (mode) {                                           \
    case kRow: shape_g<T, kRow>(g, tile_rows, tile_cols); break;   \
    case kCol: shape_g<T, kCol>(g, tile_rows, tile_cols); break;   \
    case kDual: shape_g<T, kDual>(g, tile_rows, tile_cols); break; \
  }
  switch (dtype) {
    case kFloat32: MXFP4_SHAPES(float) break;
    case kBFloat16: MXFP4_SHAPES(__nv_bfloat16) break;
    case kFloat16: MXFP4_SHAPES(__half) break;
  }
#undef MXFP4_SHAPES
}

void quantize(DType dtype, int g, Mode mode, bool stochastic, const QuantizeParams& p, cudaStream_t stream) {
  using namespace detail;
  require(dtype == kFloat32 || dtype == kBFloat16 || dtype == kFloat16, "unknown dtype code " + std::to_string(dtype));
  require(mode == kRow || mode == kCol || mode == kDual, "unknown mode " + std::to_string(mode));
  require(g == 0 || g == 32 || g == 64 || g == 128 || g == 256,
          "rht_block must be 0, 32, 64, 128 or 256, got " + std::to_string(g));
  require(p.rows >= 0 && p.cols >= 0, "negative shape");
  require(p.x != nullptr || p.rows == 0 || p.cols == 0, "input pointer is null");
  const int sz = element_size(dtype);
  const int64_t step = g > 32 ? g : 32;
  require(p.ld >= p.cols && (p.ld * sz) % 16 == 0,
          "leading dimension " + std::to_string(p.ld) + " must be >= cols and a multiple of 16 bytes");
  require(reinterpret_cast<uintptr_t>(p.x) % 16 == 0, "input must be 16-byte aligned");
  if (mode & kRow) {
    require(p.row_k >= p.cols && p.row_k % step == 0, "row_k " + std::to_string(p.row_k) + " must cover cols " +
                                                          std::to_string(p.cols) + " and be a multiple of " + std::to_string(step));
    require(p.row_data && p.row_scales, "row outputs are null");
  }
  if (mode & kCol) {
    require(p.col_k >= p.rows && p.col_k % step == 0, "col_k " + std::to_string(p.col_k) + " must cover rows " +
                                                          std::to_string(p.rows) + " and be a multiple of " + std::to_string(step));
    require(p.col_data && p.col_scales, "column outputs are null");
  }
  int tr = 0, tc = 0;
  tile_shape(dtype, g, mode, &tr, &tc);
  require(tr > 0, "no kernel for this (dtype, rht_block, mode): run the row and column copies separately");
  switch (dtype) {
    case kFloat32:
      if (mode == kRow) launch_f32_row(g, stochastic, p, stream);
      else if (mode == kCol) launch_f32_col(g, stochastic, p, stream);
      else launch_f32_dual(g, stochastic, p, stream);
      break;
    case kBFloat16:
      if (mode == kRow) launch_bf16_row(g, stochastic, p, stream);
      else if (mode == kCol) launch_bf16_col(g, stochastic, p, stream);
      else launch_bf16_dual(g, stochastic, p, stream);
      break;
    case kFloat16:
      if (mode == kRow) launch_f16_row(g, stochastic, p, stream);
      else if (mode == kCol) launch_f16_col(g, stochastic, p, stream);
      else launch_f16_dual(g, stochastic, p, stream);
      break;
  }
}

}  // namespace mxfp4
