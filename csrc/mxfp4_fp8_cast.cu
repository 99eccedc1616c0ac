// Per-tensor current-scaling E4M3 cast (see mxfp4_fp8_cast.h for the contract).
//
// Both launches cover every operand: block b belongs to the first operand while b < blocks(0). A thread
// handles 8 consecutive elements (one 16-byte load for 16-bit types, when aligned), so a launch reads each
// input once. amax is reduced on the float bits as integers: |x| >= 0 (a NaN's absolute value is a positive
// quiet NaN, whose bits exceed every finite value's), so the integer order is the float order and NaN wins.
#include <algorithm>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "mxfp4_fp8_cast.h"

namespace mxfp4 {
namespace detail {

constexpr int kCastThreads = 256;
constexpr int kPerThread = 8;
constexpr int64_t kPerBlock = kCastThreads * kPerThread;
constexpr int kMaxOps = 2;

struct CastBatch {
  Fp8CastOperand op[kMaxOps];
  int64_t first_block[kMaxOps + 1];
  int32_t* amax_bits;
};

__device__ __forceinline__ float load(const void* x, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(x)[i];
  const uint16_t h = static_cast<const uint16_t*>(x)[i];
  if (dtype == 1) return __uint_as_float(static_cast<uint32_t>(h) << 16);
  return __half2float(__ushort_as_half(h));
}

// The 8 elements of this thread (zeros past n; `ok` = how many are real).
__device__ __forceinline__ int load8(const Fp8CastOperand& o, int64_t start, float v[kPerThread]) {
  const int64_t left = o.n - start;
  const int ok = left >= kPerThread ? kPerThread : left > 0 ? static_cast<int>(left) : 0;
  const int esize = o.dtype == 0 ? 4 : 2;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(o.x) + start * esize;
  if (ok == kPerThread && esize == 2 && addr % 16 == 0) {
    const uint4 w = *reinterpret_cast<const uint4*>(addr);
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = u[i] & 0xFFFFu, hi = u[i] >> 16;
      v[2 * i] = o.dtype == 1 ? __uint_as_float(static_cast<uint32_t>(lo) << 16) : __half2float(__ushort_as_half(lo));
      v[2 * i + 1] = o.dtype == 1 ? __uint_as_float(static_cast<uint32_t>(hi) << 16) : __half2float(__ushort_as_half(hi));
    }
    return ok;
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) v[i] = i < ok ? load(o.x, o.dtype, start + i) : 0.0f;
  return ok;
}

__device__ __forceinline__ int which(const CastBatch& b, int64_t block) { return block >= b.first_block[1] ? 1 : 0; }

__global__ void __launch_bounds__(kCastThreads) amax_kernel(const CastBatch b) {
  const int k = which(b, blockIdx.x);
  const Fp8CastOperand& o = b.op[k];
  const int64_t start = ((blockIdx.x - b.first_block[k]) * kCastThreads + threadIdx.x) * kPerThread;
  float v[kPerThread];
  load8(o, start, v);
  int32_t m = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) m = max(m, static_cast<int32_t>(__float_as_uint(fabsf(v[i]))));
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, s));
  __shared__ int32_t warp_max[kCastThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kCastThreads / 32; ++w) m = max(m, warp_max[w]);
    atomicMax(b.amax_bits + k, m);
  }
}

__global__ void __launch_bounds__(kCastThreads) cast_kernel(const CastBatch b, float inv_max) {
  const int k = which(b, blockIdx.x);
  const Fp8CastOperand& o = b.op[k];
  const float amax = __int_as_float(b.amax_bits[k]);
  const float s = amax > 0.0f ? __fmul_rn(amax, inv_max) : 1.0f;  // 0 or NaN: 1, as the reference
  if (blockIdx.x == b.first_block[k] && threadIdx.x == 0) *o.scale = s;
  const int64_t start = ((blockIdx.x - b.first_block[k]) * kCastThreads + threadIdx.x) * kPerThread;
  float v[kPerThread];
  const int ok = load8(o, start, v);
  uint8_t c[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const float y = __fdiv_rn(v[i], s);
    // torch's cast gives NaN (0x7F with y's sign) above 464 (the 480 pattern is NaN in e4m3fn) and for NaN;
    // the saturating cvt gives 448 there
    const uint8_t sign = static_cast<uint8_t>((__float_as_uint(y) >> 24) & 0x80u);
    c[i] = (fabsf(y) > 464.0f || y != y) ? static_cast<uint8_t>(sign | 0x7F)
                                         : static_cast<uint8_t>(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3));
  }
  uint8_t* dst = o.codes + start;
  if (ok == kPerThread && reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
    uint2 w;
    w.x = c[0] | (c[1] << 8) | (c[2] << 16) | (static_cast<uint32_t>(c[3]) << 24);
    w.y = c[4] | (c[5] << 8) | (c[6] << 16) | (static_cast<uint32_t>(c[7]) << 24);
    *reinterpret_cast<uint2*>(dst) = w;
  } else {
    for (int i = 0; i < ok; ++i) dst[i] = c[i];
  }
}

}  // namespace detail

void fp8_cast(const Fp8CastOperand* ops, int count, float inv_max, int32_t* work, cudaStream_t stream) {
  using namespace detail;
  if (count < 1 || count > kMaxOps) throw std::invalid_argument("mxfp4 fp8_cast: 1 or 2 operands");
  if (!work) throw std::invalid_argument("mxfp4 fp8_cast: work is null");
  CastBatch b{};
  b.amax_bits = work;
  for (int k = 0; k < count; ++k) {
    const Fp8CastOperand& o = ops[k];
    if ((!o.x && o.n) || (!o.codes && o.n) || !o.scale || o.n < 0 || o.dtype < 0 || o.dtype > 2)
      throw std::invalid_argument("mxfp4 fp8_cast: bad operand " + std::to_string(k));
    b.op[k] = o;
  }
  if (cudaMemsetAsync(work, 0, sizeof(int32_t) * count, stream) != cudaSuccess)
    throw std::runtime_error("mxfp4 fp8_cast: memset failed");
  // an empty operand still needs its scale (1): give every operand at least one block
  int64_t total = 0;
  for (int k = 0; k < kMaxOps; ++k) {
    const int64_t blocks = k < count ? std::max<int64_t>(1, (b.op[k].n + kPerBlock - 1) / kPerBlock) : 0;
    b.first_block[k] = total;
    total += blocks;
  }
  b.first_block[kMaxOps] = total;
  if (count == 1) b.first_block[1] = total;
  if (total >= (int64_t(1) << 31)) throw std::invalid_argument("mxfp4 fp8_cast: tensor too large");
  amax_kernel<<<static_cast<unsigned>(total), kCastThreads, 0, stream>>>(b);
  cast_kernel<<<static_cast<unsigned>(total), kCastThreads, 0, stream>>>(b, inv_max);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("mxfp4 fp8_cast: ") + cudaGetErrorString(err));
}

}  // namespace mxfp4
