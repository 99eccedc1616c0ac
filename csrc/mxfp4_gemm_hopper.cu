// The Hopper MXFP4 GEMM in one native call (see mxfp4_gemm_hopper.h for the contract).
//
// cuBLASLt is row-major-agnostic: it sees column-major matrices. Our row-major C [M, N] is a column-major
// [N, M], so cuBLASLt computes D = op(A') * op(B') with A' = our B's E4M3 codes (stored [Np, Kt] row-major =
// [Kt, Np] column-major, transposed: the "T" of the TN layout FP8 needs) and B' = our A's codes ([Kt, Mp]
// column-major, not transposed). The 1x128 tile scales are [Kt/128, rows] with the rows contiguous, the
// layout cuBLASLt's VEC128_32F mode reads; the per-row scales are the M- and N-vectors of its OUTER_VEC_32F
// mode. Handles are created once per device, heuristics cached per shape and scaling.
#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mxfp4_gemm_hopper.h"
#include "mxfp4_rows.h"
#include "mxfp4_tiles.h"

#if defined(MXFP4_WITH_CUBLASLT)
#include <cublasLt.h>
#endif

namespace mxfp4 {
namespace detail {

constexpr int64_t kTile = 128;
constexpr int64_t kRowAlign = 16;  // cuBLASLt's FP8 kernels want M and N in multiples of 16
constexpr size_t kAlign = 256;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline size_t align(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

inline size_t out_size(OutType t) { return t == OutType::kFloat32 ? 4 : 2; }

struct Layout {  // byte offsets into the workspace (the per-row arrays serve Scaling::kRows)
  int64_t mp, np, nt, kt;
  size_t flags, counts, codes_a, codes_b, scales_a, scales_b, rflags_a, rflags_b, list_a, list_b, staging, total;
};

// The product goes straight into C when cuBLASLt can write it there: no row padding, 16-byte aligned C
// and leading dimension. Otherwise it is staged in the workspace and copied / added into C.
inline bool direct(int64_t m, int64_t n, OutType t, const void* c, int64_t ldc) {
  return m % kRowAlign == 0 && n % kRowAlign == 0 && reinterpret_cast<uintptr_t>(c) % 16 == 0 &&
         (ldc * static_cast<int64_t>(out_size(t))) % 16 == 0;
}

inline Layout layout(int64_t m, int64_t n, int64_t k, OutType t, bool accumulate, bool staged) {
  Layout l{};
  l.mp = round_up(m, kRowAlign);
  l.np = round_up(n, kRowAlign);
  l.nt = (k + kTile - 1) / kTile;
  l.kt = l.nt * kTile;
  size_t at = 0;
  l.flags = at;    at += 2 * l.nt * sizeof(int32_t);
  l.counts = at;   at = align(at + 2 * sizeof(int32_t));  // zeroed together with the flags
  l.codes_a = at;  at = align(at + l.mp * l.kt);
  l.codes_b = at;  at = align(at + l.np * l.kt);
  l.scales_a = at; at = align(at + l.nt * l.mp * sizeof(float));
  l.scales_b = at; at = align(at + l.nt * l.np * sizeof(float));
  l.rflags_a = at; at = align(at + l.mp * sizeof(int32_t));
  l.rflags_b = at; at = align(at + l.np * sizeof(int32_t));
  l.list_a = at;   at = align(at + l.mp * sizeof(int32_t));
  l.list_b = at;   at = align(at + l.np * sizeof(int32_t));
  l.staging = at;
  if (staged) at = align(at + l.mp * l.np * (accumulate ? 4 : out_size(t)));
  l.total = at;
  return l;
}

__device__ __forceinline__ float e2m1(uint32_t code) {
  const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = mag[code & 7u];
  return (code & 8u) ? -v : v;
}

__device__ __forceinline__ float e8m0(uint32_t s) {  // 2^(s-127); 0xFF is NaN; 2^-127 is subnormal
  if (s == 255u) return __uint_as_float(0x7FC00000u);
  const int e = static_cast<int>(s) - 127;
  return __uint_as_float(e >= -126 ? static_cast<uint32_t>(e + 127) << 23 : 0x00400000u);
}

__device__ __forceinline__ float to_float(OutType t, const void* c, int64_t i) {
  if (t == OutType::kFloat32) return static_cast<const float*>(c)[i];
  const uint16_t h = static_cast<const uint16_t*>(c)[i];
  if (t == OutType::kBFloat16) return __uint_as_float(static_cast<uint32_t>(h) << 16);
  return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ void store(OutType t, void* c, int64_t i, float v) {  // round to nearest even
  if (t == OutType::kFloat32) {
    static_cast<float*>(c)[i] = v;
  } else if (t == OutType::kBFloat16) {
    static_cast<uint16_t*>(c)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    static_cast<uint16_t*>(c)[i] = __half_as_ushort(__float2half_rn(v));
  }
}

// C += alpha * A[:, S] * B[:, S]^T over the flagged slabs S, one output element per thread, every 32-K block
// summed exactly in float32 (E2M1 products are multiples of 1/4 up to 36) and then scaled by its two block
// scales, in slab order: the arithmetic of the Triton fix kernel (ops/triton_gemm.py), so both give the same bits.
__global__ void __launch_bounds__(256) fix_slabs_kernel(GemmOperand a, GemmOperand b, int64_t nb, const int32_t* flags,
                                                        int64_t nt, float alpha, void* c, int64_t ldc, OutType c_type,
                                                        int32_t* counter) {
  __shared__ int any;
  if (threadIdx.x == 0) any = 0;
  __syncthreads();
  int mine = 0;
  for (int64_t t = threadIdx.x; t < nt; t += blockDim.x) mine |= flags[t];
  if (mine) any = 1;  // benign race: every writer stores 1
  __syncthreads();
  if (!any) return;
  if (blockIdx.x == 0 && threadIdx.x == 0 && counter) atomicAdd(counter, 1);
  const int64_t tiles_n = (b.rows + 15) / 16, tiles = (a.rows + 15) / 16 * tiles_n;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t r = tile / tiles_n * 16 + threadIdx.x / 16, col = tile % tiles_n * 16 + threadIdx.x % 16;
    if (r >= a.rows || col >= b.rows) continue;
    float acc = 0.0f;
    for (int64_t t = 0; t < nt; ++t) {
      if (!flags[t]) continue;
      for (int64_t kb = t * 4; kb < t * 4 + 4 && kb < nb; ++kb) {
        const uint8_t* pa = a.data + r * a.ld_data + kb * 16;
        const uint8_t* pb = b.data + col * b.ld_data + kb * 16;
        float p = 0.0f;
        for (int i = 0; i < 16; ++i) {
          p += e2m1(pa[i] & 15u) * e2m1(pb[i] & 15u);
          p += e2m1(pa[i] >> 4) * e2m1(pb[i] >> 4);
        }
        acc += p * (e8m0(a.scales[r * a.ld_scales + kb]) * e8m0(b.scales[col * b.ld_scales + kb]));
      }
    }
    acc = acc * alpha;
    const int64_t i = r * ldc + col;
    store(c_type, c, i, to_float(c_type, c, i) + acc);
  }
}

// The exact product of row r of A and row col of B over all K, scaled by alpha: every 32-K block summed exactly
// in float32 and scaled by its two block scales, in block order (the arithmetic of fix_slabs_kernel).
__device__ __forceinline__ float exact_dot(const GemmOperand& a, const GemmOperand& b, int64_t r, int64_t col,
                                           int64_t nb, float alpha) {
  float acc = 0.0f;
  const uint8_t* pa = a.data + r * a.ld_data;
  const uint8_t* pb = b.data + col * b.ld_data;
  for (int64_t kb = 0; kb < nb; ++kb) {
    float p = 0.0f;
    for (int i = 0; i < 16; ++i) {
      const uint32_t x = pa[kb * 16 + i], y = pb[kb * 16 + i];
      p += e2m1(x & 15u) * e2m1(y & 15u);
      p += e2m1(x >> 4) * e2m1(y >> 4);
    }
    acc += p * (e8m0(a.scales[r * a.ld_scales + kb]) * e8m0(b.scales[col * b.ld_scales + kb]));
  }
  return acc * alpha;
}

// The per-row fix of one GEMM: rows of A and of B flagged by the row conversion (their GEMM rows / columns
// excluded by a zero scale), listed with their counts.
struct RowFix {
  GemmOperand a, b;
  int64_t nb = 0;
  const int32_t* counts = nullptr;  // [2]: flagged rows of A, of B
  const int32_t* list_a = nullptr;
  const int32_t* list_b = nullptr;
  const int32_t* flags_a = nullptr;
  float alpha = 1.0f;
  void* c = nullptr;
  int64_t ldc = 0;
  OutType c_type = OutType::kFloat32;
};

struct RowFixes {
  RowFix fix[2];
};

// C[r, :] += the exact product for every listed row r of A, then C[:, r] for every listed row r of B, skipping
// A's flagged rows (already done), for each of the `n` GEMMs. Work items of 256 outputs, grid-strided; returns
// after reading the counts when nothing is listed; `counter` counts the GEMMs that needed a fix.
__global__ void __launch_bounds__(256) fix_rows_kernel(const RowFixes fixes, int n, int32_t* counter) {
  int64_t items[2] = {0, 0}, chunks_n[2] = {0, 0}, chunks_m[2] = {0, 0}, ca[2] = {0, 0};
  for (int i = 0; i < n; ++i) {
    const RowFix& f = fixes.fix[i];
    ca[i] = f.counts[0];
    chunks_n[i] = (f.b.rows + 255) / 256;
    chunks_m[i] = (f.a.rows + 255) / 256;
    items[i] = ca[i] * chunks_n[i] + static_cast<int64_t>(f.counts[1]) * chunks_m[i];
    if (items[i] && blockIdx.x == 0 && threadIdx.x == 0 && counter) atomicAdd(counter, 1);
  }
  for (int64_t item = blockIdx.x; item < items[0] + items[1]; item += gridDim.x) {
    const int which = item < items[0] ? 0 : 1;
    const RowFix& f = fixes.fix[which];
    const int64_t j = which ? item - items[0] : item;
    int64_t r, col;
    if (j < ca[which] * chunks_n[which]) {
      r = f.list_a[j / chunks_n[which]];
      col = j % chunks_n[which] * 256 + threadIdx.x;
      if (col >= f.b.rows) continue;
    } else {
      const int64_t jb = j - ca[which] * chunks_n[which];
      col = f.list_b[jb / chunks_m[which]];
      r = jb % chunks_m[which] * 256 + threadIdx.x;
      if (r >= f.a.rows || f.flags_a[r]) continue;
    }
    const int64_t i = r * f.ldc + col;
    store(f.c_type, f.c, i, to_float(f.c_type, f.c, i) + exact_dot(f.a, f.b, r, col, f.nb, f.alpha));
  }
}

// C[M, N] (+)= staged[Mp, Np]: the padded product cut back into C.
__global__ void unstage_kernel(const void* staged, int64_t ldst, void* c, int64_t ldc, int64_t m, int64_t n,
                               OutType t, bool accumulate) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, col = i % n;
    if (accumulate) {
      static_cast<float*>(c)[r * ldc + col] += static_cast<const float*>(staged)[r * ldst + col];
    } else {
      store(t, c, r * ldc + col, to_float(t, staged, r * ldst + col));
    }
  }
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("mxfp4 gemm_hopper: " + msg);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("mxfp4 gemm_hopper: ") + what + ": " + cudaGetErrorString(err));
}

#if defined(MXFP4_WITH_CUBLASLT)

void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("mxfp4 gemm_hopper: ") + what + " failed (cuBLAS status " + std::to_string(s) + ")");
}

cudaDataType_t cuda_type(OutType t) {
  return t == OutType::kFloat32 ? CUDA_R_32F : t == OutType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
}

// One cuBLASLt handle per device, and the heuristic's first algorithm per problem (or that it has none), kept
// for the process.
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int, int, size_t, int>;
struct LtState {
  std::mutex mu;
  std::map<int, cublasLtHandle_t> handles;
  std::map<AlgoKey, std::pair<bool, cublasLtMatmulAlgo_t>> algos;
};

LtState& lt_state() {
  static LtState* s = new LtState();  // never destroyed: handles outlive every static destructor
  return *s;
}

struct Desc {  // RAII for the descriptors of one call
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  ~Desc() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// One FP8 GEMM D[m', n'] = A' * B' (+ C) in cuBLASLt's column-major terms (see the file comment), described and
// matched to an algorithm; run() issues it.
struct LtCall {
  cublasLtHandle_t handle = nullptr;
  Desc desc;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;

  LtCall(const Layout& l, uint8_t* ws, const GemmParams& p, Scaling scaling, const void* d, int64_t ldd,
         OutType d_type, bool beta_one) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) throw std::runtime_error("mxfp4 gemm_hopper: cudaGetDevice failed");
    LtState& st = lt_state();
    {
      std::lock_guard<std::mutex> lock(st.mu);
      auto it = st.handles.find(dev);
      if (it == st.handles.end()) {
        cublasLtHandle_t h;
        check_lt(cublasLtCreate(&h), "cublasLtCreate");
        it = st.handles.emplace(dev, h).first;
      }
      handle = it->second;
    }
    check_lt(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    check_lt(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "TRANSA");
    check_lt(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "TRANSB");
    const void* scale_a = ws + l.scales_b;  // A' is our B
    const void* scale_b = ws + l.scales_a;
    check_lt(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scale_a, sizeof(scale_a)),
             "A_SCALE_POINTER");
    check_lt(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scale_b, sizeof(scale_b)),
             "B_SCALE_POINTER");
    const int32_t mode = scaling == Scaling::kRows ? CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
                                                   : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    check_lt(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)),
             "A_SCALE_MODE");
    check_lt(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)),
             "B_SCALE_MODE");
    const int64_t m = l.np, n = l.mp, k = l.kt;
    check_lt(cublasLtMatrixLayoutCreate(&desc.a, CUDA_R_8F_E4M3, k, m, k), "layout A");
    check_lt(cublasLtMatrixLayoutCreate(&desc.b, CUDA_R_8F_E4M3, k, n, k), "layout B");
    check_lt(cublasLtMatrixLayoutCreate(&desc.c, cuda_type(d_type), m, n, ldd), "layout C");

    // the heuristic assumes 256-byte aligned matrices unless told otherwise; the workspace's are, C may not be
    uint32_t align_d = 256;
    while (align_d > 16 && reinterpret_cast<uintptr_t>(d) % align_d) align_d /= 2;
    const AlgoKey key(dev, m, n, k, ldd, static_cast<int>(d_type) * 2 + static_cast<int>(beta_one),
                      static_cast<int>(align_d), p.lt_workspace_size, static_cast<int>(scaling));
    {
      std::lock_guard<std::mutex> lock(st.mu);
      auto it = st.algos.find(key);
      if (it != st.algos.end()) {
        found = it->second.first;
        algo = it->second.second;
        return;
      }
    }
    cublasLtMatmulPreference_t pref;
    check_lt(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    const uint64_t wsz = p.lt_workspace_size;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz, sizeof(wsz));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d));
    cublasLtMatmulHeuristicResult_t res{};
    int count = 0;
    const cublasStatus_t s =
        cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.c, desc.c, pref, 1, &res, &count);
    cublasLtMatmulPreferenceDestroy(pref);
    // an unsupported scale mode is "no algorithm" (the caller may fall back); other failures are errors, except
    // that row scaling refused as an invalid value also falls back (to the tiles, which cuBLASLt has run here)
    const bool refused = s == CUBLAS_STATUS_NOT_SUPPORTED || (scaling == Scaling::kRows && s == CUBLAS_STATUS_INVALID_VALUE);
    if (!refused) check_lt(s, "cublasLtMatmulAlgoGetHeuristic");
    found = s == CUBLAS_STATUS_SUCCESS && count > 0;
    algo = res.algo;
    std::lock_guard<std::mutex> lock(st.mu);
    st.algos.emplace(key, std::make_pair(found, algo));
  }

  void run(uint8_t* ws, const Layout& l, const GemmParams& p, void* d, bool beta_one, cudaStream_t stream) {
    const float one = 1.0f, zero = 0.0f;
    check_lt(cublasLtMatmul(handle, desc.op, &one, ws + l.codes_b, desc.a, ws + l.codes_a, desc.b,
                            beta_one ? &one : &zero, d, desc.c, d, desc.c, &algo, p.lt_workspace, p.lt_workspace_size,
                            stream),
             "cublasLtMatmul");
  }
};

#endif  // MXFP4_WITH_CUBLASLT

}  // namespace detail

bool gemm_hopper_available() {
#if defined(MXFP4_WITH_CUBLASLT)
  return true;
#else
  return false;
#endif
}

size_t gemm_hopper_workspace_size(int64_t m, int64_t n, int64_t k, OutType c_type, bool accumulate, const void* c,
                                  int64_t ldc) {
  using namespace detail;
  return layout(m, n, k, c_type, accumulate, !direct(m, n, c_type, c, ldc)).total;
}

#if defined(MXFP4_WITH_CUBLASLT)
namespace detail {

// One GEMM of a batch: its checked arguments, workspace layout and output (staged or C itself).
struct Problem {
  const GemmParams* p = nullptr;
  Layout l{};
  uint8_t* ws = nullptr;
  bool staged = false;
  void* d = nullptr;
  int64_t ldd = 0;
  OutType d_type = OutType::kFloat32;
  bool beta_one = false;
  std::unique_ptr<LtCall> call;
};

void prepare(Problem& q, const GemmParams& p) {
  const int64_t m = p.a.rows, n = p.b.rows, k = p.k;
  require(p.c && p.workspace && p.lt_workspace, "a pointer is null");
  require(m > 0 && n > 0 && k > 0 && k % 32 == 0, "M, N and K must be positive, K a multiple of 32");
  require(p.ldc >= n, "ldc must be >= N");
  require(!p.accumulate || p.c_type == OutType::kFloat32, "accumulating needs a float32 C");
  q.p = &p;
  q.staged = !direct(m, n, p.c_type, p.c, p.ldc);
  q.l = layout(m, n, k, p.c_type, p.accumulate, q.staged);
  require(p.workspace_size >= q.l.total, "workspace of " + std::to_string(p.workspace_size) + " bytes, needs " +
                                            std::to_string(q.l.total));
  require(reinterpret_cast<uintptr_t>(p.workspace) % kAlign == 0, "workspace must be 256-byte aligned");
  q.ws = static_cast<uint8_t*>(p.workspace);
  q.d = q.staged ? static_cast<void*>(q.ws + q.l.staging) : p.c;
  q.ldd = q.staged ? q.l.np : p.ldc;
  q.d_type = q.staged && p.accumulate ? OutType::kFloat32 : p.c_type;
  q.beta_one = !q.staged && p.accumulate;
}

void zero_flags(const Problem& q, cudaStream_t stream) {
  if (cudaMemsetAsync(q.ws + q.l.flags, 0, q.l.counts + 2 * sizeof(int32_t) - q.l.flags, stream) != cudaSuccess)
    check_launch("memset");
}

void unstage(const Problem& q, cudaStream_t stream) {
  if (!q.staged) return;
  const GemmParams& p = *q.p;
  const int64_t total = p.a.rows * p.b.rows;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
  unstage_kernel<<<grid, 256, 0, stream>>>(q.ws + q.l.staging, q.l.np, p.c, p.ldc, p.a.rows, p.b.rows, p.c_type,
                                          p.accumulate);
  check_launch("unstage");
}

// Tile scaling, one GEMM: flags, both tile conversions, the slab mask, cuBLASLt, the slab fix.
void run_tiles(Problem& q, cudaStream_t stream) {
  const GemmParams& p = *q.p;
  const Layout& l = q.l;
  uint8_t* ws = q.ws;
  int32_t* flags = reinterpret_cast<int32_t*>(ws + l.flags);
  zero_flags(q, stream);
  TileParams ta;
  ta.data = p.a.data;
  ta.ld_data = p.a.ld_data;
  ta.scales = p.a.scales;
  ta.ld_scales = p.a.ld_scales;
  ta.rows = p.a.rows;
  ta.k = p.k;
  ta.rows_out = l.mp;
  ta.codes = ws + l.codes_a;
  ta.tile_scales = reinterpret_cast<float*>(ws + l.scales_a);
  ta.flags = flags;
  TileParams tb = ta;
  tb.data = p.b.data;
  tb.ld_data = p.b.ld_data;
  tb.scales = p.b.scales;
  tb.ld_scales = p.b.ld_scales;
  tb.rows = p.b.rows;
  tb.rows_out = l.np;
  tb.codes = ws + l.codes_b;
  tb.tile_scales = reinterpret_cast<float*>(ws + l.scales_b);
  tb.flags = flags + l.nt;
  tb.mult = p.alpha;
  to_e4m3_tiles(ta, stream);
  to_e4m3_tiles(tb, stream);
  mask_flagged_slabs(flags, flags + l.nt, ta.tile_scales, l.mp, l.nt, stream);
  LtCall call(l, ws, p, Scaling::kTiles, q.d, q.ldd, q.d_type, q.beta_one);
  if (!call.found)
    throw std::runtime_error("mxfp4 gemm_hopper: cuBLASLt has no FP8 1x128-block-scaled GEMM for M=" +
                             std::to_string(p.a.rows) + " N=" + std::to_string(p.b.rows) + " K=" + std::to_string(l.kt));
  call.run(ws, l, p, q.d, q.beta_one, stream);
  unstage(q, stream);
  const int64_t tiles = (p.a.rows + 15) / 16 * ((p.b.rows + 15) / 16);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, 528));
  fix_slabs_kernel<<<grid, 256, 0, stream>>>(p.a, p.b, p.k / 32, flags, l.nt, p.alpha, p.c, p.ldc, p.c_type,
                                             p.counter);
  check_launch("fix_slabs");
}

// Row scaling, n GEMMs together (sharing one counter): their flag counts zeroed, every operand converted in one
// launch, the cuBLASLt GEMMs, then one fix launch for all.
void run_rows(Problem* const* qs, int n, cudaStream_t stream) {
  RowConvOperand ops[kMaxRowConvOperands];
  RowFixes fixes;
  for (int i = 0; i < n; ++i) {
    const Problem& q = *qs[i];
    const GemmParams& p = *q.p;
    const Layout& l = q.l;
    int32_t* counts = reinterpret_cast<int32_t*>(q.ws + l.counts);
    zero_flags(q, stream);
    const GemmOperand* src[2] = {&p.a, &p.b};
    const int64_t rows_out[2] = {l.mp, l.np};
    const size_t codes[2] = {l.codes_a, l.codes_b}, scales[2] = {l.scales_a, l.scales_b};
    const size_t rflags[2] = {l.rflags_a, l.rflags_b}, lists[2] = {l.list_a, l.list_b};
    for (int j = 0; j < 2; ++j) {
      RowConvOperand& o = ops[2 * i + j];
      o = RowConvOperand{};
      o.data = src[j]->data;
      o.ld_data = src[j]->ld_data;
      o.scales = src[j]->scales;
      o.ld_scales = src[j]->ld_scales;
      o.rows = src[j]->rows;
      o.k = p.k;
      o.rows_out = rows_out[j];
      o.codes = q.ws + codes[j];
      o.row_scales = reinterpret_cast<float*>(q.ws + scales[j]);
      o.row_flags = reinterpret_cast<int32_t*>(q.ws + rflags[j]);
      o.list = reinterpret_cast<int32_t*>(q.ws + lists[j]);
      o.count = counts + j;
    }
    ops[2 * i + 1].mult = p.alpha;
    RowFix& f = fixes.fix[i];
    f.a = p.a;
    f.b = p.b;
    f.nb = p.k / 32;
    f.counts = counts;
    f.list_a = reinterpret_cast<const int32_t*>(q.ws + l.list_a);
    f.list_b = reinterpret_cast<const int32_t*>(q.ws + l.list_b);
    f.flags_a = reinterpret_cast<const int32_t*>(q.ws + l.rflags_a);
    f.alpha = p.alpha;
    f.c = p.c;
    f.ldc = p.ldc;
    f.c_type = p.c_type;
  }
  to_e4m3_rows(ops, 2 * n, stream);
  for (int i = 0; i < n; ++i) {
    qs[i]->call->run(qs[i]->ws, qs[i]->l, *qs[i]->p, qs[i]->d, qs[i]->beta_one, stream);
    unstage(*qs[i], stream);
  }
  fix_rows_kernel<<<528, 256, 0, stream>>>(fixes, n, qs[0]->p->counter);
  check_launch("fix_rows");
}

}  // namespace detail
#endif  // MXFP4_WITH_CUBLASLT

Scaling gemm_hopper_batch(const GemmParams* ps, int n, cudaStream_t stream) {
  using namespace detail;
#if !defined(MXFP4_WITH_CUBLASLT)
  (void)ps;
  (void)n;
  (void)stream;
  throw std::runtime_error("mxfp4 gemm_hopper: this build of the extension does not link cuBLASLt "
                           "(rebuild where the CUDA toolkit's cublasLt.h is found)");
#else
  require(ps && (n == 1 || n == 2), "a batch holds 1 or 2 GEMMs");
  Problem qs[2];
  for (int i = 0; i < n; ++i) prepare(qs[i], ps[i]);
  // Each GEMM takes the scaling that gemm_hopper would give it on its own (row scaling where asked for and
  // cuBLASLt has a row-scaled kernel for it, else the tiles), so a batch gives the bits of separate calls.
  Problem* rows[2];
  int nr = 0;
  for (int i = 0; i < n; ++i) {
    if (ps[i].scaling != Scaling::kRows) continue;
    qs[i].call.reset(new LtCall(qs[i].l, qs[i].ws, ps[i], Scaling::kRows, qs[i].d, qs[i].ldd, qs[i].d_type,
                                qs[i].beta_one));
    if (qs[i].call->found) rows[nr++] = &qs[i];
  }
  if (nr == 2 && ps[0].counter != ps[1].counter) {  // one fix launch bumps one counter: two launches
    run_rows(rows, 1, stream);
    run_rows(rows + 1, 1, stream);
  } else if (nr > 0) {
    run_rows(rows, nr, stream);
  }
  for (int i = 0; i < n; ++i)
    if (!(ps[i].scaling == Scaling::kRows && qs[i].call && qs[i].call->found)) run_tiles(qs[i], stream);
  return nr == n ? Scaling::kRows : Scaling::kTiles;
#endif
}

Scaling gemm_hopper(const GemmParams& p, cudaStream_t stream) { return gemm_hopper_batch(&p, 1, stream); }

}  // namespace mxfp4
