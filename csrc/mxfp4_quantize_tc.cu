// Experimental dual quantize with the Hadamard transform on tensor cores (BF16 input, g = 64; Hopper and newer).
//
// Why: the butterfly kernel (mxfp4_quantize_kernel.cuh) is instruction-bound at ~41 SASS instructions per element
// and copy (dual, g = 64, SR), 7 of them the float32 transform and more the column copy's shared-memory reads.
// DESIGN §2.3 (v2) lets the transform run on tensor cores: BF16 x (+-1) products are exact and float32 accumulation
// is exact wherever the exact result is representable, faithful elsewhere. Here one CTA (4 warps) reads a 64 x 64
// BF16 tile once (cp.async, double-buffered, zero-filled past the edges) and
//   * row copy:    Y = X . B,  B = diag(s_row) H_64 P   (warp w: rows 16w .. 16w+15; 32 mma.m16n8k16 per warp);
//   * column copy: Y = A . X,  A = P' H_64 diag(s_col)  (warp w: columns 16w .. 16w+15);
// where P / P' permute the transform's outputs so that what one lane's accumulators hold is contiguous in the
// quantized tensor's logical order: in the row copy lane (g, t) = (lane / 4, lane % 4) holds logical columns
// 16t .. 16t+15 of rows g and g+8 (one Philox call's 16 elements per row, half an MX block: amax needs one
// shuffle), in the column copy 8 consecutive logical rows 8g .. 8g+7 of four columns (a Philox call is split
// between lanes g and g^1, which exchange the words they computed for each other; an MX block spans 4 lanes).
// The epilogue is the butterfly kernel's: amax, E8M0, v = y (2^-e p), RTN / SR with the contract's dither
// (mxfp4_quantize_kernel.cuh `code_rtn`, `code_sr`, `philox_block`), two codes per byte.
// Bit-identical to the reference wherever the transform is exact; elsewhere the float32 sums may round
// differently from the butterflies (DESIGN §2.3 tolerance). Selected only on request (ops.cuda_quantize.TC_DUAL).
#include <stdexcept>
#include <string>

#include "mxfp4_quantize_launch.cuh"

namespace mxfp4 {
namespace detail {

constexpr int kTcThreads = 128;
constexpr int kTcTile = 64;                        // rows = columns = g
constexpr int kTcTileBytes = kTcTile * kTcTile * 2;  // BF16
// shared memory: the two transform matrices, the row and column sign masks, two tile stages
constexpr int kTcSmem = 2 * kTcTileBytes + 2 * kTcTile * 4 + 2 * kTcTileBytes;

// Element (r, c) of a 64 x 64 BF16 matrix in shared memory: 16-byte chunk c / 8 of row r sits at chunk
// (c / 8) ^ (r % 8), so the eight row addresses of an ldmatrix hit eight different bank groups.
__device__ __forceinline__ int tc_offset(int r, int c) { return r * kTcTile + (((c >> 3) ^ (r & 7)) << 3) + (c & 7); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
// d += a . b on the tensor cores: a 16 x 16 (row), b 16 x 8 (col), BF16 in, float32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Logical transform output of physical accumulator column n (row copy) and row q (column copy).
__device__ __forceinline__ int row_copy_logical(int n) { return 16 * ((n & 7) >> 1) + 2 * (n >> 3) + (n & 1); }
__device__ __forceinline__ int col_copy_logical(int q) { return 8 * (q & 7) + 2 * (q >> 4) + ((q >> 3) & 1); }

__device__ __forceinline__ unsigned short pm_one(bool negative) { return negative ? 0xBF80u : 0x3F80u; }

// Bt[n][k] = s_k H[k][L(n)] (the row copy's B, stored n-major for ldmatrix) and A[q][k] = H[L'(q)][k] s'_k.
__device__ __forceinline__ void build_transforms(unsigned short* bt, unsigned short* a, const uint32_t* srow,
                                                 const uint32_t* scol) {
  for (int e = threadIdx.x; e < kTcTile * kTcTile; e += kTcThreads) {
    const int r = e >> 6, k = e & 63;
    bt[tc_offset(r, k)] = pm_one(((__popc(k & row_copy_logical(r)) & 1) != 0) != (srow[k] != 0u));
    a[tc_offset(r, k)] = pm_one(((__popc(k & col_copy_logical(r)) & 1) != 0) != (scol[k] != 0u));
  }
}

__device__ __forceinline__ void load_tc_tile(const QuantizeParams& p, int64_t tile, int64_t ntc, unsigned char* dst) {
  const int64_t row0 = (tile / ntc) * kTcTile, col0 = (tile % ntc) * kTcTile;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
#pragma unroll
  for (int i = 0; i < (kTcTile * 8) / kTcThreads; ++i) {
    const int q = threadIdx.x + i * kTcThreads;
    const int r = q >> 3, c = q & 7;
    const int64_t gr = row0 + r, gc = col0 + c * 8;
    const bool ok = gr < p.rows && gc < p.cols;
    const int64_t left = p.cols - gc;
    const int n = !ok ? 0 : (left >= 8 ? 16 : static_cast<int>(left) * 2);
    cp_async16(dst + 2 * tc_offset(r, c * 8), ok ? x + gr * p.ld + gc : x, n);
  }
}

// SR / RTN codes of `n` (8 or 16) values at consecutive logical positions, 8 codes per word; `r4` the dither
// words of those positions (word i / 4 holds position i's byte i % 4).
template <int N, bool SR>
__device__ __forceinline__ void encode(const float (&v)[N], float mul, float prescale, const uint32_t* r4,
                                       uint32_t (&words)[N / 8]) {
  if (SR && prescale <= 0.75f) {  // |v| <= 6: the unclamped encoder
#pragma unroll
    for (int q = 0; q < N / 8; ++q) {
      float x[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] = __fmul_rn(v[8 * q + k], mul);
      words[q] = pack8_sr_pairs(x, r4[2 * q], r4[2 * q + 1]);
    }
    return;
  }
#pragma unroll
  for (int q = 0; q < N / 8; ++q) {
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int i = 8 * q + k;
      const float x = __fmul_rn(v[i], mul);
      const uint32_t c = SR ? code_sr(x, (r4[i / 4] >> (8 * (i % 4))) & 0xFFu) : code_rtn(x);
      word |= c << (4 * k);
    }
    words[q] = word;
  }
}

template <bool SR>
__global__ void __launch_bounds__(kTcThreads) quantize_dual_tc_kernel(const QuantizeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned short* bt = reinterpret_cast<unsigned short*>(smem);
  unsigned short* at = bt + kTcTile * kTcTile;
  uint32_t* srow = reinterpret_cast<uint32_t*>(at + kTcTile * kTcTile);
  uint32_t* scol = srow + kTcTile;
  unsigned char* tiles = reinterpret_cast<unsigned char*>(scol + kTcTile);

  const uint64_t seed = read_u64(p.seed_ptr, p.seed);
  const uint64_t off_row = read_u64(p.row_offset_ptr, p.row_offset);
  const uint64_t off_col = read_u64(p.col_offset_ptr, p.col_offset);
  const PhiloxKey key = philox_key(seed);
  init_signs<kTcTile>(srow, p.row_signs, p.row_signs_out, off_row, key);
  init_signs<kTcTile>(scol, p.col_signs, p.col_signs_out, off_col, key);
  __syncthreads();
  build_transforms(bt, at, srow, scol);

  const int64_t ntc = (tiled_cols(p) + kTcTile - 1) / kTcTile;
  const int64_t ntiles = ((tiled_rows(p) + kTcTile - 1) / kTcTile) * ntc;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int m8 = lane & 7, mi = lane >> 3;  // ldmatrix: row within an 8 x 8 matrix, matrix index
  int64_t tile = blockIdx.x;
  if (tile < ntiles) load_tc_tile(p, tile, ntc, tiles);
  cp_async_commit();
  int stage = 0;

  for (; tile < ntiles; tile += gridDim.x) {
    const int64_t next = tile + gridDim.x;
    if (next < ntiles) load_tc_tile(p, next, ntc, tiles + (stage ^ 1) * kTcTileBytes);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const unsigned short* x = reinterpret_cast<const unsigned short*>(tiles + stage * kTcTileBytes);
    const int64_t row0 = (tile / ntc) * kTcTile, col0 = (tile % ntc) * kTcTile;

    {  // ---- row copy: rows 16 warp .. +15, quantized along the tile's 64 columns
      float acc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        const int ar = 16 * warp + m8 + 8 * (mi & 1), ac = 16 * kk + 8 * (mi >> 1);
        ldsm_x4(a, x + tc_offset(ar, ac));
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {  // n-tiles 2jj, 2jj + 1
          uint32_t b[4];
          const int bn = 16 * jj + m8 + 8 * (mi >> 1), bk = 16 * kk + 8 * (mi & 1);
          ldsm_x4(b, bt + tc_offset(bn, bk));
          mma_bf16(acc[2 * jj], a, b[0], b[1]);
          mma_bf16(acc[2 * jj + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of the warp's 16
        float v[16];
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            v[2 * j + b] = __fmul_rn(acc[j][2 * h + b], p.hadamard_scale);
            amax = max_nan_abs(amax, v[2 * j + b]);
          }
        }
        amax = max_nan_abs(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));  // the MX block: lanes t and t ^ 1
        uint32_t sbyte;
        float mul;
        const bool bad = block_scale(amax, p.prescale, sbyte, mul);
        const int64_t gr = row0 + 16 * warp + g + 8 * h, gc = col0 + 16 * t;
        uint4 rnd = make_uint4(0, 0, 0, 0);
        if (SR) rnd = philox_block(static_cast<uint64_t>(gr * p.row_k + gc) >> 4, off_row, kDomainDither, key);
        const uint32_t r4[4] = {rnd.x, rnd.y, rnd.z, rnd.w};
        uint32_t words[2];
        encode<16, SR>(v, mul, p.prescale, r4, words);
        if (gr < p.rows && gc < p.row_k) {
          *reinterpret_cast<uint2*>(p.row_data + gr * (p.row_k / 2) + gc / 2) =
              bad ? make_uint2(0u, 0u) : make_uint2(words[0], words[1]);
          if ((t & 1) == 0) p.row_scales[gr * (p.row_k / 32) + gc / 32] = bad ? 0xFFu : static_cast<uint8_t>(sbyte);
        }
      }
    }

    {  // ---- column copy: columns 16 warp .. +15, quantized along the tile's 64 rows
      float acc[4][2][4];
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int n = 0; n < 2; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t b[4];  // X rows 16kk .., columns 16 warp ..: (b0, b1) of n-tile 0, then of n-tile 1
        const int br = 16 * kk + m8 + 8 * (mi & 1), bc = 16 * warp + 8 * (mi >> 1);
        ldsm_x4_trans(b, x + tc_offset(br, bc));
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          uint32_t a[4];
          const int ar = 16 * m + m8 + 8 * (mi & 1), ac = 16 * kk + 8 * (mi >> 1);
          ldsm_x4(a, at + tc_offset(ar, ac));
          mma_bf16(acc[m][0], a, b[0], b[1]);
          mma_bf16(acc[m][1], a, b[2], b[3]);
        }
      }
      // lane (g, t) holds logical rows 8g + (2m + h) of columns 16 warp + 8n + 2t + b (acc[m][n][b + 2h])
      const int64_t pos0 = row0 + 8 * g;                       // first logical row (position) of this lane
      const int64_t grp = (row0 + 16 * (g >> 1));              // first position of its Philox group
      uint4 mine[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
      if (SR) {  // lane g even: the calls of columns (n = 0, b = 0, 1); g odd: (n = 1, b = 0, 1)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const int64_t gc = col0 + 16 * warp + 8 * (g & 1) + 2 * t + b;
          mine[b] = philox_block(static_cast<uint64_t>(gc * p.col_k + grp) >> 4, off_col, kDomainDither, key);
        }
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          float v[8];
          float amax = 0.0f;
#pragma unroll
          for (int m = 0; m < 4; ++m) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              v[2 * m + h] = __fmul_rn(acc[m][n][b + 2 * h], p.hadamard_scale);
              amax = max_nan_abs(amax, v[2 * m + h]);
            }
          }
#pragma unroll
          for (int s = 4; s <= 8; s <<= 1)  // the MX block: lanes with g ^ 1, g ^ 2
            amax = max_nan_abs(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, s));
          uint32_t sbyte;
          float mul;
          const bool bad = block_scale(amax, p.prescale, sbyte, mul);
          uint32_t r4[2] = {0u, 0u};
          if (SR) {
            // positions 8g .. 8g+7 are words 0, 1 (g even) or 2, 3 (g odd) of the group's call, which the
            // lane of parity n computed: take them from it (a shuffle both lanes make, each sending the
            // words the other needs of the call it computed)
            const uint4 w = mine[b];
            const uint32_t send0 = (g & 1) ? w.x : w.z, send1 = (g & 1) ? w.y : w.w;
            const uint32_t got0 = __shfl_xor_sync(0xFFFFFFFFu, send0, 4);
            const uint32_t got1 = __shfl_xor_sync(0xFFFFFFFFu, send1, 4);
            const bool own = (g & 1) == n;  // this column's call is the lane's own
            r4[0] = own ? ((g & 1) ? w.z : w.x) : got0;
            r4[1] = own ? ((g & 1) ? w.w : w.y) : got1;
          }
          uint32_t words[1];
          encode<8, SR>(v, mul, p.prescale, r4, words);
          const int64_t gc = col0 + 16 * warp + 8 * n + 2 * t + b;
          if (gc < p.cols && pos0 < p.col_k) {
            *reinterpret_cast<uint32_t*>(p.col_data + gc * (p.col_k / 2) + pos0 / 2) = bad ? 0u : words[0];
            if ((g & 3) == 0) p.col_scales[gc * (p.col_k / 32) + pos0 / 32] = bad ? 0xFFu : static_cast<uint8_t>(sbyte);
          }
        }
      }
    }
    __syncthreads();
    stage ^= 1;
  }
  cp_async_wait<0>();
}

}  // namespace detail

bool quantize_tc_supported(DType dtype, int g, Mode mode, const QuantizeParams& p) {
  return dtype == kBFloat16 && g == 64 && mode == kDual && !p.row_scales_swizzled && !p.col_scales_swizzled;
}

void quantize_tc(DType dtype, int g, Mode mode, bool stochastic, const QuantizeParams& p, cudaStream_t stream) {
  using namespace detail;
  if (!quantize_tc_supported(dtype, g, mode, p))
    throw std::invalid_argument("mxfp4 quantize_tc: only BF16, rht_block 64, dual copies, no swizzled scales");
  if (p.rows < 0 || p.cols < 0 || p.ld < p.cols || (p.ld * 2) % 16 != 0 || reinterpret_cast<uintptr_t>(p.x) % 16 != 0)
    throw std::invalid_argument("mxfp4 quantize_tc: the input must be row-major with 16-byte aligned rows");
  if (p.row_k < p.cols || p.row_k % 64 || p.col_k < p.rows || p.col_k % 64 || !p.row_data || !p.row_scales ||
      !p.col_data || !p.col_scales)
    throw std::invalid_argument("mxfp4 quantize_tc: both copies need outputs and padded lengths (multiples of 64)");
  const int64_t ntiles = ((tiled_rows(p) + kTcTile - 1) / kTcTile) * ((tiled_cols(p) + kTcTile - 1) / kTcTile);
  if (ntiles == 0) return;
  auto kern = stochastic ? quantize_dual_tc_kernel<true> : quantize_dual_tc_kernel<false>;
  int dev = 0, sms = 0, nb = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, kTcSmem), "cudaFuncSetAttribute");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kern, kTcThreads, kTcSmem), "occupancy");
  const int64_t cap = static_cast<int64_t>(sms) * (nb > 0 ? nb : 1);
  kern<<<static_cast<unsigned>(ntiles < cap ? ntiles : cap), kTcThreads, kTcSmem, stream>>>(p);
  check_cuda(cudaGetLastError(), "quantize_tc launch");
}

}  // namespace mxfp4
