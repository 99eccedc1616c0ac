// Dispatch of mxfp4::quantize over (dtype, mode) to the per-file launchers, and argument checks; the per-device
// feed of Blackwell's stochastic conversion and its probe (mxfp4_cvt_rs.cuh).
#include <atomic>
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

constexpr int kMaxFeedDevices = 64;
static std::atomic<uint32_t> g_hw_sr_feed[kMaxFeedDevices];  // zero-initialized (static storage): the software rule

__global__ void hw_sr_probe_kernel(const float4* v, const uint32_t* rbits, uint16_t* out, int64_t n4, uint32_t feed,
                                   int32_t* compiled) {
#if MXFP4_HAS_CVT_RS
  if (blockIdx.x == 0 && threadIdx.x == 0) *compiled = 1;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n4;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 x = v[j];
    out[j] = static_cast<uint16_t>(cvt_rs_e2m1x4(hw_sr_value(x.x, feed), hw_sr_value(x.y, feed), hw_sr_value(x.z, feed),
                                                 hw_sr_value(x.w, feed), hw_sr_bits(rbits[j], feed)));
  }
#else
  if (blockIdx.x == 0 && threadIdx.x == 0) *compiled = 0;
#endif
}

}  // namespace detail

void set_hw_sr_feed(int device, uint32_t feed) {
  detail::require(device >= 0 && device < detail::kMaxFeedDevices, "device index " + std::to_string(device) + " out of range");
  detail::g_hw_sr_feed[device].store(feed, std::memory_order_relaxed);
}

uint32_t hw_sr_feed(int device) {
  return device >= 0 && device < detail::kMaxFeedDevices ? detail::g_hw_sr_feed[device].load(std::memory_order_relaxed) : 0u;
}

void hw_sr_probe(const float* v, const uint32_t* rbits, uint16_t* out, int64_t n4, uint32_t feed, int32_t* compiled,
                 cudaStream_t stream) {
  using namespace detail;
  require(n4 >= 0, "negative probe size");
  require(reinterpret_cast<uintptr_t>(v) % 16 == 0, "probe values must be 16-byte aligned");
  const int64_t blocks = n4 > 0 ? (n4 + 255) / 256 : 1;
  hw_sr_probe_kernel<<<static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 256, 0, stream>>>(
      reinterpret_cast<const float4*>(v), rbits, out, n4, feed, compiled);
  check_cuda(cudaGetLastError(), "probe launch");
}

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
