// pybind11 module megatron_mxfp4._mxfp4_cuda: the quantize and E4M3-tile kernels behind a torch-free interface
// (device pointers and the CUDA stream are passed as integers; the Python side owns the tensors).
#include <cstdint>

#include <pybind11/pybind11.h>

#include "mxfp4_backward_hopper.h"
#include "mxfp4_fp8_cast.h"
#include "mxfp4_gemm_hopper.h"
#include "mxfp4_quantize.h"
#include "mxfp4_rows.h"
#include "mxfp4_tiles.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

void quantize(int dtype, int rht_block, int mode, bool stochastic, uintptr_t x, int64_t rows, int64_t cols, int64_t ld,
              uintptr_t row_data, uintptr_t row_scales, int64_t row_k, uintptr_t row_signs,
              uintptr_t row_signs_out, uintptr_t row_offset_ptr, uint64_t row_offset, uintptr_t col_data,
              uintptr_t col_scales, int64_t col_k, uintptr_t col_signs, uintptr_t col_signs_out,
              uintptr_t col_offset_ptr, uint64_t col_offset, uintptr_t seed_ptr, uint64_t seed, float prescale,
              float hadamard_scale, uintptr_t stream, uintptr_t row_scales_swizzled, uintptr_t col_scales_swizzled,
              bool tensor_core_transform) {
  mxfp4::QuantizeParams p;
  p.x = ptr<const void>(x);
  p.rows = rows;
  p.cols = cols;
  p.ld = ld;
  p.row_data = ptr<uint8_t>(row_data);
  p.row_scales = ptr<uint8_t>(row_scales);
  p.row_k = row_k;
  p.row_signs = ptr<const float>(row_signs);
  p.row_signs_out = ptr<float>(row_signs_out);
  p.row_offset_ptr = ptr<const int64_t>(row_offset_ptr);
  p.row_offset = row_offset;
  p.col_data = ptr<uint8_t>(col_data);
  p.col_scales = ptr<uint8_t>(col_scales);
  p.col_k = col_k;
  p.col_signs = ptr<const float>(col_signs);
  p.col_signs_out = ptr<float>(col_signs_out);
  p.col_offset_ptr = ptr<const int64_t>(col_offset_ptr);
  p.col_offset = col_offset;
  p.seed_ptr = ptr<const int64_t>(seed_ptr);
  p.seed = seed;
  p.prescale = prescale;
  p.hadamard_scale = hadamard_scale;
  p.row_scales_swizzled = ptr<uint8_t>(row_scales_swizzled);
  p.col_scales_swizzled = ptr<uint8_t>(col_scales_swizzled);
  const auto dt = static_cast<mxfp4::DType>(dtype);
  const auto md = static_cast<mxfp4::Mode>(mode);
  if (tensor_core_transform)
    mxfp4::quantize_tc(dt, rht_block, md, stochastic, p, reinterpret_cast<cudaStream_t>(stream));
  else
    mxfp4::quantize(dt, rht_block, md, stochastic, p, reinterpret_cast<cudaStream_t>(stream));
}

py::tuple tile_shape(int dtype, int rht_block, int mode) {
  int tr = 0, tc = 0;
  mxfp4::tile_shape(static_cast<mxfp4::DType>(dtype), rht_block, static_cast<mxfp4::Mode>(mode), &tr, &tc);
  return py::make_tuple(tr, tc);
}

void to_e4m3_tiles(uintptr_t data, int64_t ld_data, uintptr_t scales, int64_t ld_scales, int64_t rows, int64_t k,
                   uintptr_t codes, uintptr_t tile_scales, uintptr_t flags, float mult, int64_t rows_out,
                   uintptr_t stream) {
  mxfp4::TileParams p;
  p.data = ptr<const uint8_t>(data);
  p.ld_data = ld_data;
  p.scales = ptr<const uint8_t>(scales);
  p.ld_scales = ld_scales;
  p.rows = rows;
  p.k = k;
  p.rows_out = rows_out;
  p.codes = ptr<uint8_t>(codes);
  p.tile_scales = ptr<float>(tile_scales);
  p.flags = ptr<int32_t>(flags);
  p.mult = mult;
  mxfp4::to_e4m3_tiles(p, reinterpret_cast<cudaStream_t>(stream));
}

void mask_flagged_slabs(uintptr_t flags_a, uintptr_t flags_b, uintptr_t tile_scales_a, int64_t rows_a, int64_t nt,
                        uintptr_t stream) {
  mxfp4::mask_flagged_slabs(ptr<int32_t>(flags_a), ptr<const int32_t>(flags_b), ptr<float>(tile_scales_a), rows_a, nt,
                            reinterpret_cast<cudaStream_t>(stream));
}

mxfp4::GemmOperand operand(uintptr_t data, int64_t ld_data, uintptr_t scales, int64_t ld_scales, int64_t rows) {
  mxfp4::GemmOperand o;
  o.data = ptr<const uint8_t>(data);
  o.ld_data = ld_data;
  o.scales = ptr<const uint8_t>(scales);
  o.ld_scales = ld_scales;
  o.rows = rows;
  return o;
}

int gemm_hopper(uintptr_t a_data, int64_t a_ld, uintptr_t a_scales, int64_t a_lds, int64_t m, uintptr_t b_data,
                int64_t b_ld, uintptr_t b_scales, int64_t b_lds, int64_t n, int64_t k, float alpha, uintptr_t c,
                int64_t ldc, int c_type, bool accumulate, uintptr_t workspace, uint64_t workspace_size,
                uintptr_t lt_workspace, uint64_t lt_workspace_size, uintptr_t counter, int scaling, uintptr_t stream) {
  mxfp4::GemmParams p;
  p.a = operand(a_data, a_ld, a_scales, a_lds, m);
  p.b = operand(b_data, b_ld, b_scales, b_lds, n);
  p.k = k;
  p.alpha = alpha;
  p.c = ptr<void>(c);
  p.ldc = ldc;
  p.c_type = static_cast<mxfp4::OutType>(c_type);
  p.accumulate = accumulate;
  p.workspace = ptr<void>(workspace);
  p.workspace_size = workspace_size;
  p.lt_workspace = ptr<void>(lt_workspace);
  p.lt_workspace_size = lt_workspace_size;
  p.counter = ptr<int32_t>(counter);
  p.scaling = static_cast<mxfp4::Scaling>(scaling);
  return static_cast<int>(mxfp4::gemm_hopper(p, reinterpret_cast<cudaStream_t>(stream)));
}

void to_e4m3_rows(uintptr_t data, int64_t ld_data, uintptr_t scales, int64_t ld_scales, int64_t rows, int64_t k,
                  uintptr_t codes, uintptr_t row_scales, uintptr_t row_flags, uintptr_t list, uintptr_t count,
                  float mult, int64_t rows_out, uintptr_t stream) {
  mxfp4::RowConvOperand o;
  o.data = ptr<const uint8_t>(data);
  o.ld_data = ld_data;
  o.scales = ptr<const uint8_t>(scales);
  o.ld_scales = ld_scales;
  o.rows = rows;
  o.k = k;
  o.rows_out = rows_out;
  o.codes = ptr<uint8_t>(codes);
  o.row_scales = ptr<float>(row_scales);
  o.row_flags = ptr<int32_t>(row_flags);
  o.list = ptr<int32_t>(list);
  o.count = ptr<int32_t>(count);
  o.mult = mult;
  mxfp4::to_e4m3_rows(&o, 1, reinterpret_cast<cudaStream_t>(stream));
}

uint64_t gemm_hopper_workspace_size(int64_t m, int64_t n, int64_t k, int c_type, bool accumulate, uintptr_t c,
                                    int64_t ldc) {
  return mxfp4::gemm_hopper_workspace_size(m, n, k, static_cast<mxfp4::OutType>(c_type), accumulate, ptr<const void>(c),
                                           ldc);
}

void fp8_cast(uintptr_t x_a, int dtype_a, int64_t n_a, uintptr_t codes_a, uintptr_t scale_a, uintptr_t x_b, int dtype_b,
              int64_t n_b, uintptr_t codes_b, uintptr_t scale_b, int count, float inv_max, uintptr_t work,
              uintptr_t stream) {
  mxfp4::Fp8CastOperand ops[2];
  ops[0] = {ptr<const void>(x_a), dtype_a, n_a, ptr<uint8_t>(codes_a), ptr<float>(scale_a)};
  ops[1] = {ptr<const void>(x_b), dtype_b, n_b, ptr<uint8_t>(codes_b), ptr<float>(scale_b)};
  mxfp4::fp8_cast(ops, count, inv_max, ptr<int32_t>(work), reinterpret_cast<cudaStream_t>(stream));
}

int backward_hopper(uintptr_t dy, int dy_dtype, int64_t ld_dy, uintptr_t x, int x_dtype, int64_t ld_x, uintptr_t w,
                    int w_dtype, int64_t ld_w, int64_t t, int64_t in, int64_t out, int rht_block, bool stochastic,
                    float prescale, float hadamard_scale, uintptr_t seed_ptr, uint64_t seed, uintptr_t off_dd_ptr,
                    uint64_t off_dd, uintptr_t off_dw_ptr, uint64_t off_dw, uintptr_t off_wd_ptr, uint64_t off_wd,
                    uintptr_t off_wx_ptr, uint64_t off_wx, uintptr_t signs_dgrad, uintptr_t signs_wgrad,
                    float alpha_dgrad, float alpha_wgrad, uintptr_t dx, int64_t ldx, int dx_type, uintptr_t dw,
                    int64_t lddw, int dw_type, bool accumulate, int scaling, uintptr_t workspace,
                    uint64_t workspace_size, uintptr_t lt_workspace, uint64_t lt_workspace_size, uintptr_t counter,
                    uintptr_t stream) {
  mxfp4::BackwardParams p;
  p.dy = {ptr<const void>(dy), ld_dy, static_cast<mxfp4::DType>(dy_dtype)};
  p.x = {ptr<const void>(x), ld_x, static_cast<mxfp4::DType>(x_dtype)};
  p.w = {ptr<const void>(w), ld_w, static_cast<mxfp4::DType>(w_dtype)};
  p.t = t;
  p.in = in;
  p.out = out;
  p.rht_block = rht_block;
  p.stochastic = stochastic;
  p.prescale = prescale;
  p.hadamard_scale = hadamard_scale;
  p.seed = {ptr<const int64_t>(seed_ptr), seed};
  p.off_dgrad_dy = {ptr<const int64_t>(off_dd_ptr), off_dd};
  p.off_dgrad_w = {ptr<const int64_t>(off_dw_ptr), off_dw};
  p.off_wgrad_dy = {ptr<const int64_t>(off_wd_ptr), off_wd};
  p.off_wgrad_x = {ptr<const int64_t>(off_wx_ptr), off_wx};
  p.signs_dgrad = ptr<const float>(signs_dgrad);
  p.signs_wgrad = ptr<const float>(signs_wgrad);
  p.alpha_dgrad = alpha_dgrad;
  p.alpha_wgrad = alpha_wgrad;
  p.dx = ptr<void>(dx);
  p.ldx = ldx;
  p.dx_type = static_cast<mxfp4::OutType>(dx_type);
  p.dw = ptr<void>(dw);
  p.lddw = lddw;
  p.dw_type = static_cast<mxfp4::OutType>(dw_type);
  p.accumulate = accumulate;
  p.scaling = static_cast<mxfp4::Scaling>(scaling);
  p.workspace = ptr<void>(workspace);
  p.workspace_size = workspace_size;
  p.lt_workspace = ptr<void>(lt_workspace);
  p.lt_workspace_size = lt_workspace_size;
  p.counter = ptr<int32_t>(counter);
  return static_cast<int>(mxfp4::backward_hopper(p, reinterpret_cast<cudaStream_t>(stream)));
}

uint64_t backward_hopper_workspace_size(int64_t t, int64_t in, int64_t out, int rht_block, uintptr_t dx, int64_t ldx,
                                        int dx_type, uintptr_t dw, int64_t lddw, int dw_type, bool accumulate) {
  mxfp4::BackwardParams p;
  p.t = t;
  p.in = in;
  p.out = out;
  p.rht_block = rht_block;
  p.dx = ptr<void>(dx);
  p.ldx = ldx;
  p.dx_type = static_cast<mxfp4::OutType>(dx_type);
  p.dw = ptr<void>(dw);
  p.lddw = lddw;
  p.dw_type = static_cast<mxfp4::OutType>(dw_type);
  p.accumulate = accumulate;
  return mxfp4::backward_hopper_workspace_size(p);
}

// Grouped quantize (csrc/mxfp4_quantize.h): `table` is the address of a host int64 array of nseg x
// kGroupSegmentFields values, read before this returns.
void quantize_grouped(int dtype, int rht_block, int mode, bool stochastic, uintptr_t table, int nseg, float prescale,
                      float hadamard_scale, uintptr_t stream) {
  mxfp4::quantize_grouped_table(static_cast<mxfp4::DType>(dtype), rht_block, static_cast<mxfp4::Mode>(mode), stochastic,
                                ptr<const int64_t>(table), nseg, prescale, hadamard_scale,
                                reinterpret_cast<cudaStream_t>(stream));
}

void hw_sr_probe(uintptr_t v, uintptr_t rbits, uintptr_t out, int64_t n4, uint32_t feed, uintptr_t compiled,
                 uintptr_t stream) {
  mxfp4::hw_sr_probe(ptr<const float>(v), ptr<const uint32_t>(rbits), ptr<uint16_t>(out), n4, feed,
                     ptr<int32_t>(compiled), reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_mxfp4_cuda, m) {
  m.doc() = "Fused MXFP4 quantize kernels (RHT + E8M0 scale + SR/RTN + packing), see csrc/mxfp4_quantize.h";
  m.attr("ROW") = static_cast<int>(mxfp4::kRow);
  m.attr("COL") = static_cast<int>(mxfp4::kCol);
  m.attr("DUAL") = static_cast<int>(mxfp4::kDual);
  m.def("quantize", &quantize, py::call_guard<py::gil_scoped_release>(), py::arg("dtype"), py::arg("rht_block"),
        py::arg("mode"), py::arg("stochastic"), py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("ld"),
        py::arg("row_data") = 0, py::arg("row_scales") = 0, py::arg("row_k") = 0, py::arg("row_signs") = 0,
        py::arg("row_signs_out") = 0, py::arg("row_offset_ptr") = 0, py::arg("row_offset") = 0,
        py::arg("col_data") = 0, py::arg("col_scales") = 0, py::arg("col_k") = 0, py::arg("col_signs") = 0,
        py::arg("col_signs_out") = 0, py::arg("col_offset_ptr") = 0, py::arg("col_offset") = 0,
        py::arg("seed_ptr") = 0, py::arg("seed") = 0, py::arg("prescale") = 1.0f, py::arg("hadamard_scale") = 1.0f,
        py::arg("stream") = 0, py::arg("row_scales_swizzled") = 0, py::arg("col_scales_swizzled") = 0,
        py::arg("tensor_core_transform") = false,
        "Launch one quantize kernel on `stream` (all pointers are device addresses as integers; 0 = none); "
        "tensor_core_transform: the experimental dual kernel with the RHT on tensor cores (BF16, g = 64).");
  m.def("tile_shape", &tile_shape, py::arg("dtype"), py::arg("rht_block"), py::arg("mode"),
        "(tile_rows, tile_cols) of the kernel for (dtype, rht_block, mode); (0, 0) if there is none.");
  // positional (no keyword parsing): these run twice per backward GEMM
  m.def("to_e4m3_tiles", &to_e4m3_tiles, py::call_guard<py::gil_scoped_release>(),
        "to_e4m3_tiles(data, ld_data, scales, ld_scales, rows, k, codes, tile_scales, flags, mult, rows_out, stream): "
        "packed MXFP4 [rows, k] -> E4M3 codes with 1x128 tile scales, rows_out rows (csrc/mxfp4_tiles.h).");
  m.def("mask_flagged_slabs", &mask_flagged_slabs, py::call_guard<py::gil_scoped_release>(),
        "mask_flagged_slabs(flags_a, flags_b, tile_scales_a, rows_a, nt, stream): flags_a |= flags_b and zero "
        "A's tile scales on the flagged slabs.");
  m.def("gemm_hopper", &gemm_hopper, py::call_guard<py::gil_scoped_release>(),
        "gemm_hopper(a_data, a_ld, a_scales, a_lds, m, b_data, b_ld, b_scales, b_lds, n, k, alpha, c, ldc, c_type, "
        "accumulate, workspace, workspace_size, lt_workspace, lt_workspace_size, counter, scaling, stream): "
        "C (+)= alpha A B^T on the FP8 tensor cores in one call (csrc/mxfp4_gemm_hopper.h); c_type 0/1/2 = "
        "float32/bfloat16/float16; scaling 0/1 = 1x128 tiles / rows. Returns the scaling used.");
  m.def("to_e4m3_rows", &to_e4m3_rows, py::call_guard<py::gil_scoped_release>(),
        "to_e4m3_rows(data, ld_data, scales, ld_scales, rows, k, codes, row_scales, row_flags, list, count, mult, "
        "rows_out, stream): packed MXFP4 [rows, k] -> E4M3 codes with one float32 scale per row (csrc/mxfp4_rows.h).");
  m.def("gemm_hopper_workspace_size", &gemm_hopper_workspace_size,
        "gemm_hopper_workspace_size(m, n, k, c_type, accumulate, c, ldc): bytes of workspace gemm_hopper needs.");
  m.def("fp8_cast", &fp8_cast, py::call_guard<py::gil_scoped_release>(),
        "fp8_cast(x_a, dtype_a, n_a, codes_a, scale_a, x_b, dtype_b, n_b, codes_b, scale_b, count, inv_max, work, "
        "stream): per-tensor current-scaling E4M3 cast of 1 or 2 contiguous operands in two launches "
        "(csrc/mxfp4_fp8_cast.h).");
  m.def("backward_hopper", &backward_hopper, py::call_guard<py::gil_scoped_release>(),
        "backward_hopper(dy, dy_dtype, ld_dy, x, x_dtype, ld_x, w, w_dtype, ld_w, t, in, out, rht_block, stochastic, "
        "prescale, hadamard_scale, seed_ptr, seed, [ptr, value] x 4 offsets (dgrad dY, dgrad W, wgrad dY, wgrad X), "
        "signs_dgrad, signs_wgrad, alpha_dgrad, alpha_wgrad, dx, ldx, dx_type, dw, lddw, dw_type, accumulate, "
        "scaling, workspace, workspace_size, lt_workspace, lt_workspace_size, counter, stream): a linear layer's "
        "MXFP4 backward (three quantizers, two Hopper GEMMs) in one call (csrc/mxfp4_backward_hopper.h). Returns "
        "the scaling the GEMMs used.");
  m.def("backward_hopper_workspace_size", &backward_hopper_workspace_size,
        "backward_hopper_workspace_size(t, in, out, rht_block, dx, ldx, dx_type, dw, lddw, dw_type, accumulate): "
        "bytes of workspace backward_hopper needs.");
  m.def("gemm_hopper_available", &mxfp4::gemm_hopper_available,
        "True when the extension links cuBLASLt (gemm_hopper can run).");
  m.def("quantize_grouped", &quantize_grouped,
        "quantize_grouped(dtype, rht_block, mode, stochastic, table, nseg, prescale, hadamard_scale, stream): one "
        "launch over nseg segments described by a host int64 table (csrc/mxfp4_quantize.h, GroupSegment).");
  m.def("set_hw_sr_feed", &mxfp4::set_hw_sr_feed, py::arg("device"), py::arg("feed"),
        "The feed of Blackwell's stochastic E2M1 conversion that the SR kernels use on `device` (0: the software "
        "rule, the default; csrc/mxfp4_cvt_rs.cuh). Set only after the self-test passed.");
  m.def("hw_sr_feed", &mxfp4::hw_sr_feed, py::arg("device"), "The feed set for `device` (0: the software rule).");
  m.def("hw_sr_probe", &hw_sr_probe, py::call_guard<py::gil_scoped_release>(),
        "hw_sr_probe(v, rbits, out, n4, feed, compiled, stream): the instruction's codes of n4 groups of four float32 "
        "values under `feed` (out: uint16 per group; *compiled: int32, 1 where this device's code has the "
        "instruction).");
  m.attr("GROUP_MAX_SEGMENTS") = mxfp4::kMaxGroupSegments;
  m.attr("GROUP_SEGMENT_FIELDS") = mxfp4::kGroupSegmentFields;
}
