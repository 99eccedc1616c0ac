// Host run of the quantize kernels' element encoders (csrc/mxfp4_element.cuh) for tests/test_kernel_elements.py:
// reads n records (float32 v, uint8 r) from the input file and writes four bytes per record: code_rtn(v),
// code_sr(v, r), code_sr_at<i % 8>(v, 2r) moved back to the low nibble, then (after all records) the record's
// nibble of pack8_sr and of pack8_sr_pairs over its group of eight records (records 8j .. 8j+7); 0xFF where
// |v| >= 6 or v is not finite (outside those functions' domain; for the packers, anywhere in the group).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "mxfp4_element.cuh"

using namespace mxfp4::detail;

template <int K>
static uint32_t at(float v, uint32_t r) {
  return code_sr_at<K>(v, 2u * r) >> (4 * K);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  std::vector<float> vals;
  std::vector<unsigned char> rs;
  std::vector<unsigned char> out;  // three bytes per record, then the pack8_sr nibbles
  float v;
  unsigned char r;
  size_t i = 0;
  while (std::fread(&v, 4, 1, in) == 1 && std::fread(&r, 1, 1, in) == 1) {
    uint32_t sat = 0xFF;
    if (std::isfinite(v) && std::fabs(v) <= 6.0f) {
      switch (i % 8) {
        case 0: sat = at<0>(v, r); break;
        case 1: sat = at<1>(v, r); break;
        case 2: sat = at<2>(v, r); break;
        case 3: sat = at<3>(v, r); break;
        case 4: sat = at<4>(v, r); break;
        case 5: sat = at<5>(v, r); break;
        case 6: sat = at<6>(v, r); break;
        default: sat = at<7>(v, r); break;
      }
    }
    vals.push_back(v);
    rs.push_back(r);
    out.push_back(static_cast<unsigned char>(code_rtn(v)));
    out.push_back(static_cast<unsigned char>(code_sr(v, r)));
    out.push_back(static_cast<unsigned char>(sat));
    ++i;
  }
  std::fclose(in);
  // pack8_sr per group of eight records: a second pass over the inputs kept in `vals`/`rs`
  const size_t n = vals.size();
  for (size_t j = 0; j < 2 * n; ++j) out.push_back(0xFF);  // placeholders, filled below
  for (size_t g = 0; g + 8 <= n; g += 8) {
    float x[8];
    uint32_t ra = 0, rb = 0;
    bool ok = true;
    for (int k = 0; k < 8; ++k) {
      x[k] = vals[g + k];
      ok = ok && std::isfinite(x[k]) && std::fabs(x[k]) <= 6.0f;
      (k < 4 ? ra : rb) |= static_cast<uint32_t>(rs[g + k]) << (8 * (k % 4));
    }
    if (!ok) continue;
    const uint32_t word = pack8_sr(x, ra, rb), pairs = pack8_sr_pairs(x, ra, rb);
    for (int k = 0; k < 8; ++k) {
      out[3 * n + g + k] = static_cast<unsigned char>((word >> (4 * k)) & 15u);
      out[4 * n + g + k] = static_cast<unsigned char>((pairs >> (4 * k)) & 15u);
    }
  }
  FILE* o = std::fopen(argv[2], "wb");
  if (!o || std::fwrite(out.data(), 1, out.size(), o) != out.size()) return 2;
  std::fclose(o);
  return 0;
}
