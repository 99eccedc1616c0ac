// Host interface of a linear layer's MXFP4 backward on Hopper in one native call (no PyTorch dependency).
//
// For Y = X W^T with dY [T, out], X [T, in], W [out, in] (row-major, 16-byte aligned rows) the call issues,
// on `stream`, what megatron_mxfp4/backward.py issues through three quantize calls and two GEMM calls:
//   1. dY quantized along out (dgrad operand, offset off_dgrad_dy) and along T (wgrad operand dY^T, offset
//      off_wgrad_dy) from one read (the dual kernel; two launches where no dual tile exists);
//   2. W^T [in, out] quantized along out (the column kernel on W, offset off_dgrad_w) with dgrad's signs;
//   3. X^T [in, T] quantized along T (the column kernel on X, offset off_wgrad_x) with wgrad's signs;
//   4. dX [T, in] = alpha_dgrad * dY W, and dW [out, in] (+)= alpha_wgrad * dY^T X as one gemm_hopper_batch
//      (mxfp4_gemm_hopper.h: with row scaling one conversion launch and one fix launch serve both GEMMs).
// RHT signs: given (signs_dgrad / signs_wgrad, g float32 each) or, when null with g > 0, drawn by the dY
// kernel at dY's offsets and handed on to the W and X quantizers on the device (the `per_call` policy).
// The quantized operands live in the caller's workspace; nothing synchronizes with the host. Each step is the
// kernel the Python path launches with the same arguments, so both give the same bits.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "mxfp4_gemm_hopper.h"
#include "mxfp4_quantize.h"

namespace mxfp4 {

struct BackwardTensor {
  const void* ptr = nullptr;
  int64_t ld = 0;  // row stride in elements
  DType dtype = kBFloat16;
};

struct U64Arg {  // a 64-bit value given on the host, or a device scalar (int64 bits) read by the kernels
  const int64_t* ptr = nullptr;
  uint64_t value = 0;
};

struct BackwardParams {
  BackwardTensor dy, x, w;
  int64_t t = 0, in = 0, out = 0;
  int rht_block = 0;
  bool stochastic = true;
  float prescale = 1.0f, hadamard_scale = 1.0f;
  U64Arg seed, off_dgrad_dy, off_dgrad_w, off_wgrad_dy, off_wgrad_x;
  const float* signs_dgrad = nullptr;  // g float32 or null (drawn)
  const float* signs_wgrad = nullptr;
  float alpha_dgrad = 1.0f, alpha_wgrad = 1.0f;
  void* dx = nullptr;  // [t, in], row stride ldx elements, dx_type
  int64_t ldx = 0;
  OutType dx_type = OutType::kBFloat16;
  void* dw = nullptr;  // [out, in], row stride lddw elements; accumulate: float32 main_grad
  int64_t lddw = 0;
  OutType dw_type = OutType::kBFloat16;
  bool accumulate = false;
  Scaling scaling = Scaling::kTiles;
  void* workspace = nullptr;  // backward_hopper_workspace_size() bytes, 256-byte aligned
  size_t workspace_size = 0;
  void* lt_workspace = nullptr;
  size_t lt_workspace_size = 0;
  int32_t* counter = nullptr;
};

// Bytes of workspace backward_hopper needs for these shapes and outputs.
size_t backward_hopper_workspace_size(const BackwardParams& p);

// Runs the steps above. Returns the scaling the two GEMMs used (see gemm_hopper_batch). Throws std::invalid_argument for bad arguments and
// std::runtime_error for CUDA / cuBLASLt errors.
Scaling backward_hopper(const BackwardParams& p, cudaStream_t stream);

}  // namespace mxfp4
