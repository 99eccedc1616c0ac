// E4M3-tile conversion for the Hopper MXFP4 GEMM (see mxfp4_tiles.h for the layout contract).
//
// Work split: eight lanes own one row-tile (128 elements = 64 packed bytes): lane l reads 8 bytes
// (16 codes, half of block l/2) and writes 16 E4M3 bytes, so a warp reads 4 x 64 and writes 4 x 128
// contiguous bytes per row-tile. A CTA of 8 warps covers 32 rows; each thread converts kTilesPerThread
// consecutive tiles of its row, all loads issued before any conversion.
//
// The fold needs no float arithmetic: inside a block every code maps through one 8-entry table (the E4M3
// byte of |E2M1 value| * 2^d, d = e_j - e_top in [-8, 0]), looked up four codes at a time
// (mxfp4_e4m3_fold.cuh).
#include <stdexcept>
#include <string>

#include "mxfp4_e4m3_fold.cuh"
#include "mxfp4_tiles.h"

namespace mxfp4 {
namespace detail {

constexpr int kTileThreads = 256;
constexpr int kTileRowsPerCta = kTileThreads / 8;  // eight lanes per row-tile
constexpr int kTilesPerThread = 4;
constexpr int kMaxSpan = 8;                          // layouts.MAX_TILE_SPAN
constexpr int kNoExp = 1000;                         // "no live block" sentinel

__global__ void __launch_bounds__(kTileThreads) to_e4m3_tiles_kernel(const TileParams p) {
  const int lane = threadIdx.x & 31;
  const int l = lane & 7;                       // lane within the row-tile
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTileRowsPerCta + (threadIdx.x >> 3);
  const int64_t nb = p.k / 32, nt = (p.k + 127) / 128, kp = nt * 128;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTilesPerThread;
  const bool row_ok = row < p.rows;
  const int64_t rows_out = p.rows_out > p.rows ? p.rows_out : p.rows;  // rows past p.rows: zero codes (GEMM padding)

  uint2 w[kTilesPerThread];
  uint32_t s[kTilesPerThread];
#pragma unroll
  for (int j = 0; j < kTilesPerThread; ++j) {
    const int64_t kb = (t0 + j) * 4 + (l >> 1);  // this lane's block
    w[j] = make_uint2(0u, 0u);
    s[j] = 127u;                                  // padding: 2^0, no codes
    if (row_ok && kb < nb) {
      w[j] = *reinterpret_cast<const uint2*>(p.data + row * p.ld_data + kb * 16 + (l & 1) * 8);
      s[j] = p.scales[row * p.ld_scales + kb];
    }
  }

#pragma unroll
  for (int j = 0; j < kTilesPerThread; ++j) {
    const int64_t t = t0 + j;
    if (t >= nt) break;  // uniform across the CTA
    // live block: a non-zero code and a finite scale
    const bool nz = __shfl_xor_sync(0xFFFFFFFFu, ((w[j].x | w[j].y) & 0x77777777u) != 0u, 1) ||
                    (((w[j].x | w[j].y) & 0x77777777u) != 0u);
    const bool isnan = s[j] == 255u;
    const int e = static_cast<int>(s[j]) - 127;
    const bool live = nz && !isnan;
    int emax = live ? e : -kNoExp, emin = live ? e : kNoExp;
    bool tnan = isnan;
#pragma unroll
    for (int m = 2; m <= 4; m <<= 1) {  // the four blocks of the tile sit at lanes l ^ 2, l ^ 4, l ^ 6
      emax = max(emax, __shfl_xor_sync(0xFFFFFFFFu, emax, m));
      emin = min(emin, __shfl_xor_sync(0xFFFFFFFFu, emin, m));
      tnan = __shfl_xor_sync(0xFFFFFFFFu, tnan, m) || tnan;
    }
    const bool has = emax > -kNoExp;
    const int etop = has ? emax : 0;
    const bool bad = has && emax - emin > kMaxSpan;
    const bool keep = !isnan && !bad;
    const int d = min(max(e - etop, -kMaxSpan), 0);  // live blocks of a kept tile: already in [-8, 0]

    const FoldTable table = keep ? fold_table(d) : FoldTable{0u, 0u, 0u, 0u};
    if (row >= rows_out) continue;
    const uint4 out = lookup16(w[j].x, w[j].y, table);
    *reinterpret_cast<uint4*>(p.codes + row * kp + t * 128 + l * 16) = out;
    if (l == 0) {
      p.tile_scales[t * rows_out + row] = tnan ? __uint_as_float(0x7FC00000u) : __fmul_rn(pow2(etop), p.mult);
      if (bad) atomicOr(p.flags + t, 1);
    }
  }
}

__global__ void mask_flagged_kernel(int32_t* flags_a, const int32_t* flags_b, float* scales_a, int64_t rows,
                                    int64_t nt) {
  for (int64_t t = blockIdx.x; t < nt; t += gridDim.x) {
    const int32_t f = flags_a[t] | flags_b[t];
    if (f == 0) continue;
    __syncthreads();  // every thread has read flags_a[t] before it is rewritten
    if (threadIdx.x == 0) flags_a[t] = f;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) scales_a[t * rows + r] = 0.0f;
  }
}

static void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("mxfp4 to_e4m3_tiles: " + msg);
}

static void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace detail

void to_e4m3_tiles(const TileParams& p, cudaStream_t stream) {
  using namespace detail;
  require(p.data && p.scales && p.codes && p.tile_scales && p.flags, "a pointer is null");
  require(p.rows >= 0 && p.k >= 0, "negative shape");
  require(p.k % 32 == 0, "k = " + std::to_string(p.k) + " must be a multiple of 32");
  require(p.ld_data >= p.k / 2 && p.ld_data % 8 == 0,
          "packed row stride " + std::to_string(p.ld_data) + " must be >= k/2 and a multiple of 8 bytes");
  require(reinterpret_cast<uintptr_t>(p.data) % 8 == 0, "packed data must be 8-byte aligned");
  require(reinterpret_cast<uintptr_t>(p.codes) % 16 == 0, "codes must be 16-byte aligned");
  require(p.ld_scales >= p.k / 32, "scale row stride " + std::to_string(p.ld_scales) + " must be >= k/32");
  const int64_t rows_out = p.rows_out > p.rows ? p.rows_out : p.rows;
  if (rows_out == 0 || p.k == 0) return;
  const int64_t nt = (p.k + 127) / 128;
  const int64_t gx = (rows_out + kTileRowsPerCta - 1) / kTileRowsPerCta;
  const int64_t gy = (nt + kTilesPerThread - 1) / kTilesPerThread;
  require(gx < (int64_t(1) << 31) && gy < 65536, "operand too large for the launch grid");
  to_e4m3_tiles_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kTileThreads, 0, stream>>>(p);
  check_launch("to_e4m3_tiles");
}

void mask_flagged_slabs(int32_t* flags_a, const int32_t* flags_b, float* tile_scales_a, int64_t rows_a, int64_t nt,
                        cudaStream_t stream) {
  using namespace detail;
  require(flags_a && flags_b && tile_scales_a, "a pointer is null");
  if (nt <= 0) return;
  const unsigned grid = static_cast<unsigned>(nt < 1024 ? nt : 1024);
  mask_flagged_kernel<<<grid, 256, 0, stream>>>(flags_a, flags_b, tile_scales_a, rows_a, nt);
  check_launch("mask_flagged_slabs");
}

}  // namespace mxfp4
