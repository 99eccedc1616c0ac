// Grouped variant of the fused quantize kernel (mxfp4_quantize_kernel.cuh): all segments of a
// GroupedParams table in one launch. The per-element numerics are the same device functions (load ->
// RHT -> amax -> E8M0 -> RTN/SR -> pack) with each segment's own fields, so segment s is bit-identical to
// `quantize` on that segment alone:
//   * tiles: segment s is tiled as `quantize` tiles it (TR x TC tiles over max(rows, col_k) x max(cols,
//     row_k)); the launch's tile t belongs to the segment with tile_start[s] <= t < tile_start[s + 1], so a
//     tile never straddles two segments and a segment's tile (r0, c0) is the one `quantize` would process;
//   * Philox: key = the segment's seed; indices row * row_k + col (row copy) and col * col_k + row (column
//     copy) count from the segment's own first row; offsets are the segment's;
//   * RHT signs: loaded into shared memory whenever a block moves to another segment (the previous tile's
//     closing __syncthreads() guarantees no thread still reads the old ones);
//   * drawn signs are written to *_signs_out by the block s % gridDim.x in a prologue (also for segments
//     without tiles: 0 tokens), never by the tile loop.
// The grid is persistent (min(tiles, resident blocks)), each block walking the tiles with the same
// double-buffered cp.async pipeline as the single kernel.
#pragma once

#include "mxfp4_quantize_launch.cuh"

namespace mxfp4 {
namespace detail {

__host__ __device__ __forceinline__ int64_t seg_tiled_rows(const GroupSegment& s) {
  return s.rows > s.col_k ? s.rows : s.col_k;
}
__host__ __device__ __forceinline__ int64_t seg_tiled_cols(const GroupSegment& s) {
  return s.cols > s.row_k ? s.cols : s.row_k;
}

template <class Geo>
__host__ __device__ __forceinline__ int64_t seg_tile_cols(const GroupSegment& s) {
  return (seg_tiled_cols(s) + Geo::TC - 1) / Geo::TC;
}

template <class Geo>
__host__ __device__ __forceinline__ int64_t seg_tiles(const GroupSegment& s) {
  return ((seg_tiled_rows(s) + Geo::TR - 1) / Geo::TR) * seg_tile_cols<Geo>(s);
}

// The segment of tile t, searching forward from `s` (a block's tiles only increase). Segments without
// tiles share their tile_start with the next one and are skipped.
__device__ __forceinline__ int segment_of(const GroupedParams& p, int64_t t, int s) {
  while (s + 1 < p.nseg && t >= p.seg[s + 1].tile_start) ++s;
  return s;
}

// Local tile `lt` of segment `s` into shared memory (the single kernel's load_tile on the segment's input).
template <typename T, class Geo>
__device__ __forceinline__ void load_seg_tile(const GroupSegment& s, int64_t lt, int64_t ntc, unsigned char* dst) {
  constexpr int CPR = Geo::TC / Geo::CH;
  const int64_t row0 = (lt / ntc) * Geo::TR, col0 = (lt % ntc) * Geo::TC;
  const T* x = static_cast<const T*>(s.x);
#pragma unroll 4
  for (int q = threadIdx.x; q < Geo::TR * CPR; q += kThreads) {
    const int r = q / CPR, c = q % CPR;
    const int64_t gr = row0 + r, gc = col0 + static_cast<int64_t>(c) * Geo::CH;
    const bool ok = gr < s.rows && gc < s.cols;
    const T* src = ok ? x + gr * s.ld + gc : x;
    const int64_t left = s.cols - gc;
    const int n = !ok ? 0 : (left >= Geo::CH ? 16 : static_cast<int>(left) * static_cast<int>(sizeof(T)));
    cp_async16(dst + (r * Geo::TC * static_cast<int>(sizeof(T))) + ((c ^ swizzle<Geo>(r)) * 16), src, n);
  }
}

// Global tile t (< p.ntiles) of segment s.
template <typename T, class Geo>
__device__ __forceinline__ void load_group_tile(const GroupedParams& p, int s, int64_t t, unsigned char* dst) {
  const GroupSegment& sg = p.seg[s];
  load_seg_tile<T, Geo>(sg, t - sg.tile_start, seg_tile_cols<Geo>(sg), dst);
}

// The g drawn signs of one copy of a segment as float32 +-1 (global memory only).
template <int GB>
__device__ __forceinline__ void write_drawn_signs(float* out, uint64_t offset, const PhiloxKey& key) {
  for (int j = threadIdx.x; j < GB; j += kThreads) {
    const uint4 w = philox_block(static_cast<uint64_t>(j >> 2), offset, kDomainSigns, key);
    const uint32_t r4[4] = {w.x, w.y, w.z, w.w};
    out[j] = (r4[j & 3] & 0x80000000u) ? -1.0f : 1.0f;
  }
}

template <typename T, int G, int MODE, bool SR>
__global__ void __launch_bounds__(kThreads, 2) quantize_grouped_kernel(const __grid_constant__ GroupedParams p) {
  using Geo = Geometry<G, MODE, sizeof(T)>;
  constexpr int TR = Geo::TR, TC = Geo::TC, GB = Geo::GB;
  constexpr bool DO_ROW = (MODE & kRow) != 0, DO_COL = (MODE & kCol) != 0, RHT = G > 0;

  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* sgn_row = reinterpret_cast<uint32_t*>(smem);
  uint32_t* sgn_col = sgn_row + GB;
  unsigned char* tiles = smem + Geo::SIGN_BYTES;

  if (RHT) {  // drawn signs out, once per segment
    for (int s = blockIdx.x; s < p.nseg; s += gridDim.x) {
      const GroupSegment& sg = p.seg[s];
      const PhiloxKey k = philox_key(read_u64(sg.seed_ptr, sg.seed));
      if (DO_ROW && !sg.row_signs && sg.row_signs_out)
        write_drawn_signs<GB>(sg.row_signs_out, read_u64(sg.row_sign_offset_ptr, sg.row_sign_offset), k);
      if (DO_COL && !sg.col_signs && sg.col_signs_out)
        write_drawn_signs<GB>(sg.col_signs_out, read_u64(sg.col_sign_offset_ptr, sg.col_sign_offset), k);
    }
  }

  const int64_t ntiles = p.ntiles;
  int64_t tile = blockIdx.x;
  int cur = -1;        // segment whose key, offsets and signs are loaded
  int seg = 0;         // segment of `tile`
  int lseg = 0;        // segment of the tile being prefetched
  PhiloxKey key = philox_key(0);
  uint64_t off_row = 0, off_col = 0;
  if (tile < ntiles) {
    lseg = segment_of(p, tile, lseg);
    load_group_tile<T, Geo>(p, lseg, tile, tiles);
  }
  cp_async_commit();
  int stage = 0;

  for (; tile < ntiles; tile += gridDim.x) {
    const int64_t next = tile + gridDim.x;
    seg = segment_of(p, tile, seg);
    const GroupSegment& sg = p.seg[seg];
    if (seg != cur) {  // the previous tile ended with __syncthreads(): nobody reads the old signs
      cur = seg;
      key = philox_key(read_u64(sg.seed_ptr, sg.seed));
      off_row = read_u64(sg.row_offset_ptr, sg.row_offset);
      off_col = read_u64(sg.col_offset_ptr, sg.col_offset);
      if (RHT) {
        if (DO_ROW)
          init_signs<GB>(sgn_row, sg.row_signs, nullptr, read_u64(sg.row_sign_offset_ptr, sg.row_sign_offset), key);
        if (DO_COL)
          init_signs<GB>(sgn_col, sg.col_signs, nullptr, read_u64(sg.col_sign_offset_ptr, sg.col_sign_offset), key);
      }
    }
    if (Geo::STAGES == 2) {
      if (next < ntiles) {
        lseg = segment_of(p, next, lseg);
        load_group_tile<T, Geo>(p, lseg, next, tiles + (stage ^ 1) * Geo::TILE_BYTES);
      }
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // the tile and the signs are in shared memory
    const unsigned char* t = tiles + stage * Geo::TILE_BYTES;
    const int64_t ntc = seg_tile_cols<Geo>(sg);
    const int64_t lt = tile - sg.tile_start;
    const int64_t row0 = (lt / ntc) * TR, col0 = (lt % ntc) * TC;

    if (DO_ROW)
      quantize_tile_rows<T, Geo, RHT, SR>(t, sgn_row, p.hadamard_scale, p.prescale, row0, col0, sg.rows, sg.row_k,
                                          sg.row_data, sg.row_scales, nullptr, off_row, key, p.hw_sr);
    if (DO_COL)
      quantize_tile_cols<T, Geo, RHT, SR>(t, sgn_col, p.hadamard_scale, p.prescale, row0, col0, sg.cols, sg.col_k,
                                          sg.col_data, sg.col_scales, nullptr, off_col, key, p.hw_sr);
    __syncthreads();
    if (Geo::STAGES == 1) {
      if (next < ntiles) {
        lseg = segment_of(p, next, lseg);
        load_group_tile<T, Geo>(p, lseg, next, tiles);
      }
      cp_async_commit();
    } else {
      stage ^= 1;
    }
  }
  cp_async_wait<0>();
}

// Host launch of one instantiation: fills in tile_start / ntiles, sizes the persistent grid.
template <typename T, int G, int MODE, bool SR>
void launch_grouped(const GroupedParams& in, cudaStream_t stream) {
  using Geo = Geometry<G, MODE, sizeof(T)>;
  if constexpr (!Geo::kFits) {
    throw std::invalid_argument("mxfp4 quantize: this (dtype, g, mode) tile does not fit in shared memory");
  } else {
    GroupedParams p = in;
    int64_t total = 0;
    for (int s = 0; s < p.nseg; ++s) {
      p.seg[s].tile_start = total;
      total += seg_tiles<Geo>(p.seg[s]);
    }
    p.ntiles = total;
    bool drawn = false;  // signs to write out even without tiles
    for (int s = 0; s < p.nseg && G > 0; ++s)
      drawn |= ((MODE & kRow) && !p.seg[s].row_signs && p.seg[s].row_signs_out) ||
               ((MODE & kCol) && !p.seg[s].col_signs && p.seg[s].col_signs_out);
    if (total == 0 && !drawn) return;
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    const int64_t cap = resident_capacity<quantize_grouped_kernel<T, G, MODE, SR>>(dev, Geo::SMEM_BYTES);
    const int64_t want = total > 0 ? total : 1;  // the signs prologue strides over all segments
    const unsigned grid = static_cast<unsigned>(want < cap ? want : cap);
    p.hw_sr = SR ? hw_sr_feed(dev) : 0u;
    quantize_grouped_kernel<T, G, MODE, SR><<<grid, kThreads, Geo::SMEM_BYTES, stream>>>(p);
    check_cuda(cudaGetLastError(), "grouped kernel launch");
  }
}

template <typename T, int MODE>
void launch_grouped_g(int g, bool sr, const GroupedParams& p, cudaStream_t stream) {
#define MXFP4_GCASE(G)                                                  \
  case G:                                                               \
    if (sr) launch_grouped<T, G, MODE, true>(p, stream);                \
    else launch_grouped<T, G, MODE, false>(p, stream);                  \
    return;
  switch (g) {
    MXFP4_GCASE(0)
    MXFP4_GCASE(32)
    MXFP4_GCASE(64)
    MXFP4_GCASE(128)
    MXFP4_GCASE(256)
    default:
      throw std::invalid_argument("mxfp4 quantize: rht_block must be 0, 32, 64, 128 or 256, got " + std::to_string(g));
  }
#undef MXFP4_GCASE
}

}  // namespace detail
}  // namespace mxfp4

// Defines mxfp4::detail::launch_grouped_<NAME>(g, sr, mode, params, stream) for one dtype (all three modes).
#define MXFP4_DEFINE_GROUPED_LAUNCHER(NAME, T)                                                          \
  namespace mxfp4 {                                                                                    \
  namespace detail {                                                                                   \
  void launch_grouped_##NAME(int g, bool sr, Mode mode, const GroupedParams& p, cudaStream_t stream) {  \
    if (mode == kRow) launch_grouped_g<T, kRow>(g, sr, p, stream);                                     \
    else if (mode == kCol) launch_grouped_g<T, kCol>(g, sr, p, stream);                                \
    else launch_grouped_g<T, kDual>(g, sr, p, stream);                                                 \
  }                                                                                                    \
  }                                                                                                    \
  }
