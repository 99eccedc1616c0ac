// Host interface of the Hopper MXFP4 GEMM in one native call (no PyTorch dependency: raw pointers + stream).
//
// C[M, N] (+)= alpha * A[M, K] * B[N, K]^T for two packed MXFP4 operands quantized along K (megatron_mxfp4
// `MXFP4Tensor` layout: codes [rows, k/2], E8M0 scales [rows, k/32]). Two scalings of the FP8 GEMM:
//
// Scaling::kRows (one float32 scale per row of each operand, cuBLASLt's outer-vector mode, its fastest scaled
// FP8 GEMM on Hopper):
//   1. the flagged-row counts zeroed (a memset),
//   2. both operands converted to the E4M3-row layout in one launch (mxfp4_rows.h), B's row scales times alpha
//      (the rows of the layout past M or N, padding for cuBLASLt, are zero codes),
//   3. cuBLASLt's FP8 GEMM with per-row scales on both operands (float32 accumulation),
//   4. the exact per-row fix: C[r, :] += alpha * A[r, :] * B^T for every row r of A flagged by the conversion
//      (a row whose blocks span more than 14 binades) and C[:, r] likewise for B's flagged rows, promoting every
//      32-K block (returns at once when no row is flagged; bumps `counter` otherwise).
//
// Scaling::kTiles (one float32 scale per 1x128 tile):
//   1. the slab flags zeroed (a memset),
//   2. both operands converted to the E4M3-tile layout (mxfp4_tiles.h), B's tile scales times alpha,
//   3. A's tile scales zeroed on every K-slab flagged in either operand,
//   4. cuBLASLt's FP8 GEMM with 1x128 block scaling on both operands (float32 accumulation),
//   5. the exact per-slab fix: C += alpha * A[:, S] * B[:, S]^T over the flagged 128-column slabs S,
//      promoting every 32-K block (returns at once when no slab is flagged; bumps `counter` otherwise).
// M and N are padded to multiples of 16 inside the workspace where cuBLASLt needs it; the product is
// then copied (or, accumulating, added) into C. Nothing synchronizes with the host.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace mxfp4 {

enum class OutType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class Scaling : int { kTiles = 0, kRows = 1 };

struct GemmOperand {
  const uint8_t* data = nullptr;    // packed codes [rows, k/2], row stride ld_data bytes (multiple of 8)
  int64_t ld_data = 0;
  const uint8_t* scales = nullptr;  // E8M0 block scales [rows, k/32], row stride ld_scales bytes
  int64_t ld_scales = 0;
  int64_t rows = 0;
};

struct GemmParams {
  GemmOperand a, b;       // A [M, K], B [N, K] (M = a.rows, N = b.rows)
  int64_t k = 0;          // the padded K of both operands (a multiple of 32)
  float alpha = 1.0f;     // output scale (the prescales' inverse), folded into B's tile scales
  void* c = nullptr;      // C [M, N], row stride ldc elements
  int64_t ldc = 0;
  OutType c_type = OutType::kFloat32;
  bool accumulate = false;  // C += product (C float32), else C = product
  void* workspace = nullptr;   // gemm_hopper_workspace_size() bytes, 256-byte aligned
  size_t workspace_size = 0;
  void* lt_workspace = nullptr;  // cuBLASLt's own workspace
  size_t lt_workspace_size = 0;
  int32_t* counter = nullptr;    // int32 [1]: calls that needed the per-slab / per-row fix (may be null)
  Scaling scaling = Scaling::kRows;
};

// Bytes of `workspace` that gemm_hopper needs for operands of M, N rows and padded K, writing C at `c`
// (row stride ldc): more when the product must be staged (M or N not a multiple of 16, C not 16-byte aligned).
size_t gemm_hopper_workspace_size(int64_t m, int64_t n, int64_t k, OutType c_type, bool accumulate, const void* c,
                                  int64_t ldc);

// True when this build links cuBLASLt (else gemm_hopper throws).
bool gemm_hopper_available();

// Runs the steps above on `stream` and returns the scaling used: kRows falls back to kTiles for a problem
// that cuBLASLt has no outer-vector-scaled FP8 kernel for. Throws std::invalid_argument for bad arguments
// and std::runtime_error for CUDA / cuBLASLt errors.
Scaling gemm_hopper(const GemmParams& p, cudaStream_t stream);

// Two independent GEMMs (a linear's dgrad and wgrad; each its own workspace) in one go, each with the scaling
// (and so the bits) that gemm_hopper gives it alone; those with row scaling have their operands converted in one
// launch and their row fixes run in one launch (two where their counters differ). Returns kRows when every
// GEMM used row scaling, else kTiles.
Scaling gemm_hopper_batch(const GemmParams* ps, int n, cudaStream_t stream);

}  // namespace mxfp4
