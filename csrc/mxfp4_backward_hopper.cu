// A linear layer's MXFP4 backward on Hopper in one native call (see mxfp4_backward_hopper.h).
#include <stdexcept>
#include <string>

#include "mxfp4_backward_hopper.h"

namespace mxfp4 {
namespace detail {

constexpr size_t kWsAlign = 256;

inline size_t ws_align(size_t v) { return (v + kWsAlign - 1) / kWsAlign * kWsAlign; }
inline int64_t padded(int64_t k, int g) {  // numerics.quantize.padded_size
  const int64_t step = g > 32 ? g : 32;
  return (k + step - 1) / step * step;
}

// One MXFP4 operand [rows, k] in the workspace: packed codes [rows, k/2], scales [rows, k/32].
struct Packed {
  size_t data = 0, scales = 0;
  int64_t rows = 0, k = 0;
};

struct BackwardLayout {
  size_t signs_d = 0, signs_w = 0;
  Packed dy_row, dy_col, w_col, x_col;
  size_t gemm_d = 0, gemm_d_size = 0, gemm_w = 0, gemm_w_size = 0, total = 0;
};

inline size_t esize(DType t) { return t == kFloat32 ? 4 : 2; }

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("mxfp4 backward_hopper: " + msg);
}

BackwardLayout backward_layout(const BackwardParams& p) {
  BackwardLayout l;
  const int g = p.rht_block;
  const int64_t kd = padded(p.out, g), kw = padded(p.t, g);
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t o = at;
    at = ws_align(at + bytes);
    return o;
  };
  auto packed = [&take](int64_t rows, int64_t k) {
    Packed q;
    q.rows = rows;
    q.k = k;
    q.data = take(static_cast<size_t>(rows * (k / 2)));
    q.scales = take(static_cast<size_t>(rows * (k / 32)));
    return q;
  };
  l.signs_d = take(static_cast<size_t>(g > 0 ? g : 1) * sizeof(float));
  l.signs_w = take(static_cast<size_t>(g > 0 ? g : 1) * sizeof(float));
  l.dy_row = packed(p.t, kd);
  l.dy_col = packed(p.out, kw);
  l.w_col = packed(p.in, kd);
  l.x_col = packed(p.in, kw);
  l.gemm_d_size = gemm_hopper_workspace_size(p.t, p.in, kd, p.dx_type, false, p.dx, p.ldx);
  l.gemm_w_size = gemm_hopper_workspace_size(p.out, p.in, kw, p.dw_type, p.accumulate, p.dw, p.lddw);
  l.gemm_d = take(l.gemm_d_size);
  l.gemm_w = take(l.gemm_w_size);
  l.total = at;
  return l;
}

GemmOperand operand(uint8_t* ws, const Packed& q) {
  GemmOperand o;
  o.data = ws + q.data;
  o.ld_data = q.k / 2;
  o.scales = ws + q.scales;
  o.ld_scales = q.k / 32;
  o.rows = q.rows;
  return o;
}

}  // namespace detail

size_t backward_hopper_workspace_size(const BackwardParams& p) { return detail::backward_layout(p).total; }

Scaling backward_hopper(const BackwardParams& p, cudaStream_t stream) {
  using namespace detail;
  check(p.t > 0 && p.in > 0 && p.out > 0, "T, in and out must be positive (the caller handles empty GEMMs)");
  check(p.dy.ptr && p.x.ptr && p.w.ptr && p.dx && p.dw && p.workspace && p.lt_workspace, "a pointer is null");
  const BackwardLayout l = backward_layout(p);
  check(p.workspace_size >= l.total,
        "workspace of " + std::to_string(p.workspace_size) + " bytes, needs " + std::to_string(l.total));
  check(reinterpret_cast<uintptr_t>(p.workspace) % kWsAlign == 0, "workspace must be 256-byte aligned");
  uint8_t* ws = static_cast<uint8_t*>(p.workspace);
  const int g = p.rht_block;
  float* drawn_d = (g > 0 && !p.signs_dgrad) ? reinterpret_cast<float*>(ws + l.signs_d) : nullptr;
  float* drawn_w = (g > 0 && !p.signs_wgrad) ? reinterpret_cast<float*>(ws + l.signs_w) : nullptr;
  const float* signs_d = g > 0 ? (p.signs_dgrad ? p.signs_dgrad : drawn_d) : nullptr;
  const float* signs_w = g > 0 ? (p.signs_wgrad ? p.signs_wgrad : drawn_w) : nullptr;

  QuantizeParams base;
  base.seed_ptr = p.seed.ptr;
  base.seed = p.seed.value;
  base.prescale = p.prescale;
  base.hadamard_scale = p.hadamard_scale;

  // 1. dY: rows along out (dgrad), columns along T (wgrad)
  QuantizeParams q = base;
  q.x = p.dy.ptr;
  q.rows = p.t;
  q.cols = p.out;
  q.ld = p.dy.ld;
  q.row_data = ws + l.dy_row.data;
  q.row_scales = ws + l.dy_row.scales;
  q.row_k = l.dy_row.k;
  q.row_signs = p.signs_dgrad;
  q.row_signs_out = drawn_d;
  q.row_offset_ptr = p.off_dgrad_dy.ptr;
  q.row_offset = p.off_dgrad_dy.value;
  q.col_data = ws + l.dy_col.data;
  q.col_scales = ws + l.dy_col.scales;
  q.col_k = l.dy_col.k;
  q.col_signs = p.signs_wgrad;
  q.col_signs_out = drawn_w;
  q.col_offset_ptr = p.off_wgrad_dy.ptr;
  q.col_offset = p.off_wgrad_dy.value;
  int tr = 0, tc = 0;
  tile_shape(p.dy.dtype, g, kDual, &tr, &tc);
  if (tr > 0) {
    quantize(p.dy.dtype, g, kDual, p.stochastic, q, stream);
  } else {  // no fused tile (float32 with g = 256): two reads, as the Python path does
    QuantizeParams r = q, c = q;
    r.col_data = r.col_scales = nullptr;
    r.col_k = 0;
    c.row_data = c.row_scales = nullptr;
    c.row_k = 0;
    quantize(p.dy.dtype, g, kRow, p.stochastic, r, stream);
    quantize(p.dy.dtype, g, kCol, p.stochastic, c, stream);
  }

  // 2. W^T along out: the column kernel on W [out, in]; 3. X^T along T: the column kernel on X [T, in]
  const BackwardTensor* src[2] = {&p.w, &p.x};
  const int64_t rows[2] = {p.out, p.t};
  const Packed* dst[2] = {&l.w_col, &l.x_col};
  const float* signs[2] = {signs_d, signs_w};
  const U64Arg* offs[2] = {&p.off_dgrad_w, &p.off_wgrad_x};
  for (int i = 0; i < 2; ++i) {
    QuantizeParams c = base;
    c.x = src[i]->ptr;
    c.rows = rows[i];
    c.cols = p.in;
    c.ld = src[i]->ld;
    c.col_data = ws + dst[i]->data;
    c.col_scales = ws + dst[i]->scales;
    c.col_k = dst[i]->k;
    c.col_signs = signs[i];
    c.col_offset_ptr = offs[i]->ptr;
    c.col_offset = offs[i]->value;
    quantize(src[i]->dtype, g, kCol, p.stochastic, c, stream);
  }

  // 4. the two GEMMs as one batch (with row scaling: one conversion launch and one fix launch for both)
  GemmParams gp;
  gp.lt_workspace = p.lt_workspace;
  gp.lt_workspace_size = p.lt_workspace_size;
  gp.counter = p.counter;
  gp.scaling = p.scaling;
  GemmParams g2[2] = {gp, gp};
  GemmParams& gd = g2[0];
  gd.workspace = ws + l.gemm_d;
  gd.workspace_size = l.gemm_d_size;
  gd.a = operand(ws, l.dy_row);
  gd.b = operand(ws, l.w_col);
  gd.k = l.dy_row.k;
  gd.alpha = p.alpha_dgrad;
  gd.c = p.dx;
  gd.ldc = p.ldx;
  gd.c_type = p.dx_type;
  GemmParams& gw = g2[1];
  gw.workspace = ws + l.gemm_w;
  gw.workspace_size = l.gemm_w_size;
  gw.a = operand(ws, l.dy_col);
  gw.b = operand(ws, l.x_col);
  gw.k = l.dy_col.k;
  gw.alpha = p.alpha_wgrad;
  gw.c = p.dw;
  gw.ldc = p.lddw;
  gw.c_type = p.dw_type;
  gw.accumulate = p.accumulate;
  return gemm_hopper_batch(g2, 2, stream);
}

}  // namespace mxfp4
