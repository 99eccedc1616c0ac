// Host-side launch of one kernel instantiation, and the per-(dtype, mode) switch over (g, SR).
// Each mxfp4_quantize_<dtype>_<mode>.cu defines one such switch so that the instantiations
// compile in parallel.
#pragma once

#include <stdexcept>
#include <string>

#include "mxfp4_quantize_kernel.cuh"

namespace mxfp4 {
namespace detail {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("mxfp4 quantize: ") + what + ": " + cudaGetErrorString(err));
}

// The persistent grid's capacity for kernel K with `smem` bytes of dynamic shared memory on device `dev`: SMs x
// resident blocks per SM, looked up (and K's shared-memory limit set) once per kernel and device.
template <auto K>
int64_t resident_capacity(int dev, int smem) {
  constexpr int kMaxDevices = 64;
  static int blocks_per_sm[kMaxDevices] = {0};
  static int sm_count[kMaxDevices] = {0};
  if (dev < 0 || dev >= kMaxDevices) throw std::invalid_argument("mxfp4 quantize: device index out of range");
  if (blocks_per_sm[dev] == 0) {
    check_cuda(cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
    int nb = 0, sms = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, K, kThreads, smem),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    if (nb < 1) throw std::runtime_error("mxfp4 quantize: kernel cannot be resident on this device");
    sm_count[dev] = sms;
    blocks_per_sm[dev] = nb;
  }
  return static_cast<int64_t>(sm_count[dev]) * blocks_per_sm[dev];
}

template <typename T, int G, int MODE, bool SR>
void launch(const QuantizeParams& p, cudaStream_t stream) {
  using Geo = Geometry<G, MODE, sizeof(T)>;
  if constexpr (!Geo::kFits) {
    throw std::invalid_argument("mxfp4 quantize: this (dtype, g, mode) tile does not fit in shared memory");
  } else {
    const int64_t ntiles = ((tiled_rows(p) + Geo::TR - 1) / Geo::TR) * ((tiled_cols(p) + Geo::TC - 1) / Geo::TC);
    if (ntiles == 0) return;
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    const int64_t cap = resident_capacity<quantize_kernel<T, G, MODE, SR>>(dev, Geo::SMEM_BYTES);
    const unsigned grid = static_cast<unsigned>(ntiles < cap ? ntiles : cap);
    QuantizeParams q = p;
    q.hw_sr = SR ? hw_sr_feed(dev) : 0u;
    quantize_kernel<T, G, MODE, SR><<<grid, kThreads, Geo::SMEM_BYTES, stream>>>(q);
    check_cuda(cudaGetLastError(), "kernel launch");
  }
}

template <typename T, int MODE>
void launch_g(int g, bool sr, const QuantizeParams& p, cudaStream_t stream) {
#define MXFP4_CASE(G)                                                   \
  case G:                                                               \
    if (sr) launch<T, G, MODE, true>(p, stream);                        \
    else launch<T, G, MODE, false>(p, stream);                          \
    return;
  switch (g) {
    MXFP4_CASE(0)
    MXFP4_CASE(32)
    MXFP4_CASE(64)
    MXFP4_CASE(128)
    MXFP4_CASE(256)
    default:
      throw std::invalid_argument("mxfp4 quantize: rht_block must be 0, 32, 64, 128 or 256, got " + std::to_string(g));
  }
#undef MXFP4_CASE
}

template <typename T, int MODE>
void shape_g(int g, int* tr, int* tc) {
#define MXFP4_SHAPE(G)                                                                 \
  case G: {                                                                            \
    using Geo = Geometry<G, MODE, sizeof(T)>;                                          \
    *tr = Geo::kFits ? Geo::TR : 0;                                                    \
    *tc = Geo::kFits ? Geo::TC : 0;                                                    \
    return;                                                                            \
  }
  switch (g) {
    MXFP4_SHAPE(0)
    MXFP4_SHAPE(32)
    MXFP4_SHAPE(64)
    MXFP4_SHAPE(128)
    MXFP4_SHAPE(256)
    default:
      *tr = *tc = 0;
  }
#undef MXFP4_SHAPE
}

}  // namespace detail
}  // namespace mxfp4

// Defines mxfp4::detail::launch_<NAME>(g, sr, params, stream) for one (dtype, mode).
#define MXFP4_DEFINE_LAUNCHER(NAME, T, MODE)                                                   \
  namespace mxfp4 {                                                                           \
  namespace detail {                                                                          \
  void launch_##NAME(int g, bool sr, const QuantizeParams& p, cudaStream_t stream) {           \
    launch_g<T, MODE>(g, sr, p, stream);                                                      \
  }                                                                                           \
  }                                                                                           \
  }
