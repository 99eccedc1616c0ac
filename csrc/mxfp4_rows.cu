// E4M3-row conversion for the Hopper GEMM with per-row scales (see mxfp4_rows.h for the layout contract).
//
// Work split: one warp per row, lane l owning blocks l, l + 32, ... (16 packed bytes and one scale each).
// Pass 1 reads the row's codes and scales and reduces the live exponent range over the warp; pass 2 reads
// them again (from L1/L2) and writes 32 E4M3 bytes per block, so a warp writes 1 KiB contiguous per step.
// Up to four operands (both of a linear's two GEMMs) are converted by one launch, one after the other.
#include <stdexcept>
#include <string>

#include "mxfp4_e4m3_fold.cuh"
#include "mxfp4_rows.h"

namespace mxfp4 {
namespace detail {

constexpr int kRowConvThreads = 256;
constexpr int kRowConvWarps = kRowConvThreads / 32;
constexpr int kRowHeadroom = 6;   // layouts.ROW_HEADROOM: 6 * 2^6 = 384 <= 448
constexpr int kRowSpan = 8;       // a live block may lie this far below the row exponent
constexpr int kRowExpMin = -126;
constexpr int kNoExp = 1000;

struct RowConvSet {
  RowConvOperand op[kMaxRowConvOperands];
};

__device__ __forceinline__ uint4 load_block(const uint8_t* p) {  // 16 packed bytes at an 8-byte aligned address
  const uint2 lo = *reinterpret_cast<const uint2*>(p);
  const uint2 hi = *reinterpret_cast<const uint2*>(p + 8);
  return make_uint4(lo.x, lo.y, hi.x, hi.y);
}

__device__ __forceinline__ bool nonzero_codes(const uint4& w) { return ((w.x | w.y | w.z | w.w) & 0x77777777u) != 0u; }

__global__ void __launch_bounds__(kRowConvThreads) to_e4m3_rows_kernel(const RowConvSet set, int n) {
  const int lane = threadIdx.x & 31;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kRowConvWarps + (threadIdx.x >> 5);
  int which = 0;
  while (row >= set.op[which].rows_out) {  // warp-uniform
    row -= set.op[which].rows_out;
    if (++which >= n) return;
  }
  const RowConvOperand& op = set.op[which];
  const int64_t k = op.k, nb = k / 32, kt = (k + 127) / 128 * 128, nbt = kt / 32;
  uint8_t* out = op.codes + row * kt;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  if (row >= op.rows) {  // padding rows of the GEMM: zero codes
    for (int64_t kb = lane; kb < nbt; kb += 32) {
      reinterpret_cast<uint4*>(out + kb * 32)[0] = zero;
      reinterpret_cast<uint4*>(out + kb * 32)[1] = zero;
    }
    if (lane == 0) {
      op.row_scales[row] = 0.0f;
      op.row_flags[row] = 0;
    }
    return;
  }
  const uint8_t* data = op.data + row * op.ld_data;
  const uint8_t* scales = op.scales + row * op.ld_scales;

  int emax = -kNoExp, emin = kNoExp;
  bool nan = false;
  for (int64_t kb = lane; kb < nb; kb += 32) {
    const uint4 w = load_block(data + kb * 16);
    const uint32_t s = scales[kb];
    nan |= s == 255u;
    if (nonzero_codes(w) && s != 255u) {
      emax = max(emax, static_cast<int>(s) - 127);
      emin = min(emin, static_cast<int>(s) - 127);
    }
  }
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    emax = max(emax, __shfl_xor_sync(0xFFFFFFFFu, emax, m));
    emin = min(emin, __shfl_xor_sync(0xFFFFFFFFu, emin, m));
  }
  nan = __any_sync(0xFFFFFFFFu, nan);
  const bool has = emax > -kNoExp;
  const int erow = has ? max(emax - kRowHeadroom, kRowExpMin) : 0;
  const bool flagged = !nan && has && emin - erow < -kRowSpan;
  if (lane == 0) {
    op.row_flags[row] = flagged ? 1 : 0;
    op.row_scales[row] = nan ? __uint_as_float(0x7FC00000u) : flagged ? 0.0f : __fmul_rn(pow2(erow), op.mult);
    if (flagged) op.list[atomicAdd(op.count, 1)] = static_cast<int32_t>(row);
  }

  for (int64_t kb = lane; kb < nbt; kb += 32) {
    uint4 lo = zero, hi = zero;
    if (!flagged && kb < nb) {
      const uint4 w = load_block(data + kb * 16);
      const uint32_t s = scales[kb];
      const int d = static_cast<int>(s) - 127 - erow;  // <= 6; >= -8 in a kept row without NaN
      // d < -8 only in a NaN row (never flagged): such a block is zero codes, as in the reference
      if (s != 255u && d >= -kRowSpan && nonzero_codes(w)) {
        const FoldTable table = fold_table(d);
        lo = lookup16(w.x, w.y, table);
        hi = lookup16(w.z, w.w, table);
      }
    }
    reinterpret_cast<uint4*>(out + kb * 32)[0] = lo;
    reinterpret_cast<uint4*>(out + kb * 32)[1] = hi;
  }
}

static void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("mxfp4 to_e4m3_rows: " + msg);
}

}  // namespace detail

void to_e4m3_rows(const RowConvOperand* ops, int n, cudaStream_t stream) {
  using namespace detail;
  require(ops && n >= 1 && n <= kMaxRowConvOperands, "needs 1 to 4 operands");
  RowConvSet set;
  int64_t rows_total = 0;
  for (int i = 0; i < n; ++i) {
    const RowConvOperand& o = ops[i];
    const int64_t k = o.k;
    require(k > 0 && k % 32 == 0, "k = " + std::to_string(k) + " must be a positive multiple of 32");
    require(o.data && o.scales && o.codes && o.row_scales && o.row_flags && o.list && o.count, "a pointer is null");
    require(o.rows >= 0 && o.rows_out >= o.rows, "rows_out must be >= rows >= 0");
    require(o.ld_data >= k / 2 && o.ld_data % 8 == 0,
            "packed row stride " + std::to_string(o.ld_data) + " must be >= k/2 and a multiple of 8 bytes");
    require(reinterpret_cast<uintptr_t>(o.data) % 8 == 0, "packed data must be 8-byte aligned");
    require(reinterpret_cast<uintptr_t>(o.codes) % 16 == 0, "codes must be 16-byte aligned");
    require(o.ld_scales >= k / 32, "scale row stride " + std::to_string(o.ld_scales) + " must be >= k/32");
    set.op[i] = o;
    rows_total += o.rows_out;
  }
  if (rows_total == 0) return;
  const int64_t grid = (rows_total + kRowConvWarps - 1) / kRowConvWarps;
  require(grid < (int64_t(1) << 31), "operands too large for the launch grid");
  to_e4m3_rows_kernel<<<static_cast<unsigned>(grid), kRowConvThreads, 0, stream>>>(set, n);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("to_e4m3_rows: ") + cudaGetErrorString(err));
}

}  // namespace mxfp4
