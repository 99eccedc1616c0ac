// Dispatch of mxfp4::quantize_grouped over the input dtype, and argument checks (each segment as
// mxfp4::quantize checks its matrix).
#include <stdexcept>
#include <string>

#include "mxfp4_quantize.h"

namespace mxfp4 {
namespace detail {
void launch_grouped_f32(int g, bool sr, Mode mode, const GroupedParams& p, cudaStream_t stream);
void launch_grouped_bf16(int g, bool sr, Mode mode, const GroupedParams& p, cudaStream_t stream);
void launch_grouped_f16(int g, bool sr, Mode mode, const GroupedParams& p, cudaStream_t stream);

static void require_g(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("mxfp4 grouped quantize: " + msg);
}
}  // namespace detail

void quantize_grouped(DType dtype, int g, Mode mode, bool stochastic, const GroupedParams& p, cudaStream_t stream) {
  using namespace detail;
  require_g(dtype == kFloat32 || dtype == kBFloat16 || dtype == kFloat16, "unknown dtype code " + std::to_string(dtype));
  require_g(mode == kRow || mode == kCol || mode == kDual, "unknown mode " + std::to_string(mode));
  require_g(g == 0 || g == 32 || g == 64 || g == 128 || g == 256,
            "rht_block must be 0, 32, 64, 128 or 256, got " + std::to_string(g));
  require_g(p.nseg >= 0 && p.nseg <= kMaxGroupSegments,
            "segment count " + std::to_string(p.nseg) + " must be in [0, " + std::to_string(kMaxGroupSegments) + "]");
  const int sz = dtype == kFloat32 ? 4 : 2;
  const int64_t step = g > 32 ? g : 32;
  for (int i = 0; i < p.nseg; ++i) {
    const GroupSegment& s = p.seg[i];
    const std::string at = "segment " + std::to_string(i) + ": ";
    require_g(s.rows >= 0 && s.cols >= 0, at + "negative shape");
    require_g(s.x != nullptr || s.rows == 0 || s.cols == 0, at + "input pointer is null");
    require_g(s.ld >= s.cols && (s.ld * sz) % 16 == 0,
              at + "leading dimension " + std::to_string(s.ld) + " must be >= cols and a multiple of 16 bytes");
    require_g(reinterpret_cast<uintptr_t>(s.x) % 16 == 0, at + "input must be 16-byte aligned");
    if (mode & kRow) {
      require_g(s.row_k >= s.cols && s.row_k % step == 0, at + "row_k " + std::to_string(s.row_k) +
                " must cover cols " + std::to_string(s.cols) + " and be a multiple of " + std::to_string(step));
      require_g((s.row_data && s.row_scales) || s.rows == 0, at + "row outputs are null");
    } else {
      require_g(s.row_k == 0, at + "row_k must be 0 without a row copy");
    }
    if (mode & kCol) {
      require_g(s.col_k >= s.rows && s.col_k % step == 0, at + "col_k " + std::to_string(s.col_k) +
                " must cover rows " + std::to_string(s.rows) + " and be a multiple of " + std::to_string(step));
      require_g((s.col_data && s.col_scales) || s.col_k == 0 || s.cols == 0, at + "column outputs are null");
    } else {
      require_g(s.col_k == 0, at + "col_k must be 0 without a column copy");
    }
  }
  int tr = 0, tc = 0;
  tile_shape(dtype, g, mode, &tr, &tc);
  require_g(tr > 0, "no kernel for this (dtype, rht_block, mode): run the row and column copies separately");
  switch (dtype) {
    case kFloat32: launch_grouped_f32(g, stochastic, mode, p, stream); break;
    case kBFloat16: launch_grouped_bf16(g, stochastic, mode, p, stream); break;
    case kFloat16: launch_grouped_f16(g, stochastic, mode, p, stream); break;
  }
}

void quantize_grouped_table(DType dtype, int g, Mode mode, bool stochastic, const int64_t* table, int nseg,
                            float prescale, float hadamard_scale, cudaStream_t stream) {
  if (nseg < 0 || nseg > kMaxGroupSegments || (nseg > 0 && table == nullptr))
    throw std::invalid_argument("mxfp4 grouped quantize: bad segment table (" + std::to_string(nseg) + " segments)");
  GroupedParams p;
  p.nseg = nseg;
  p.prescale = prescale;
  p.hadamard_scale = hadamard_scale;
  for (int i = 0; i < nseg; ++i) {
    const int64_t* f = table + static_cast<int64_t>(i) * kGroupSegmentFields;
    GroupSegment& s = p.seg[i];
    auto P = [](int64_t v) { return reinterpret_cast<void*>(static_cast<uintptr_t>(v)); };
    s.x = P(f[0]);
    s.rows = f[1];
    s.cols = f[2];
    s.ld = f[3];
    s.row_data = static_cast<uint8_t*>(P(f[4]));
    s.row_scales = static_cast<uint8_t*>(P(f[5]));
    s.row_k = f[6];
    s.col_data = static_cast<uint8_t*>(P(f[7]));
    s.col_scales = static_cast<uint8_t*>(P(f[8]));
    s.col_k = f[9];
    s.row_signs = static_cast<const float*>(P(f[10]));
    s.row_signs_out = static_cast<float*>(P(f[11]));
    s.col_signs = static_cast<const float*>(P(f[12]));
    s.col_signs_out = static_cast<float*>(P(f[13]));
    s.seed_ptr = static_cast<const int64_t*>(P(f[14]));
    s.seed = static_cast<uint64_t>(f[15]);
    s.row_offset_ptr = static_cast<const int64_t*>(P(f[16]));
    s.row_offset = static_cast<uint64_t>(f[17]);
    s.col_offset_ptr = static_cast<const int64_t*>(P(f[18]));
    s.col_offset = static_cast<uint64_t>(f[19]);
    s.row_sign_offset_ptr = static_cast<const int64_t*>(P(f[20]));
    s.row_sign_offset = static_cast<uint64_t>(f[21]);
    s.col_sign_offset_ptr = static_cast<const int64_t*>(P(f[22]));
    s.col_sign_offset = static_cast<uint64_t>(f[23]);
  }
  quantize_grouped(dtype, g, mode, stochastic, p, stream);
}

}  // namespace mxfp4
