// A 16 x 16 float transpose in AVX-512 registers, for packing K^T (load_transposed_panels): the element
// loop it replaces (16 scalar loads from 16 rows and 16 stores per feature) cost about 1.2 cycles per
// element, 8.5% of a 128-token float32 forward on one thread. Written with GCC's vector shuffles, which
// lower to vunpck*ps, vshufps and vshuff32x4 (the intrinsics' undefined pass-through operands made GCC 12
// warn). Included by attention_pack.h in the AVX-512 variants only, inside their namespace: <cstdint>,
// <cstring> and c10::BFloat16 come from attention_prelude.h.
#pragma once

#include "cpu/attention_simd.h"

using Float16x = simd::Vec<float>;  // a zmm register in the AVX-512 variants
static_assert(simd::Traits<float>::width == 16, "transpose16.h is for 16-float vectors");
typedef uint16_t Half16x __attribute__((vector_size(32)));
typedef uint32_t Word16x __attribute__((vector_size(64)));

// Per 128-bit lane L (elements 4L .. 4L + 3): vunpcklps / vunpckhps, vshufps 0x44 / 0xEE.
#define FA_LANES(a, b, c, d) a, b, c, d, 4 + a, 4 + b, 4 + c, 4 + d, 8 + a, 8 + b, 8 + c, 8 + d, 12 + a, 12 + b, 12 + c, 12 + d
// Whole lanes (vshuff32x4 0x88 / 0xDD): lanes 0 and 2 (or 1 and 3) of x, then of y.
#define FA_EVEN_LANES 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define FA_ODD_LANES 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31

// dst[f * ld + r] = rows[r][f] for r, f < 16: three shuffle stages, 64 shuffles for 256 elements.
inline void transpose16x16(const Float16x (&rows)[16], float* dst, int64_t ld) {
  Float16x t[16], u[16];
  for (int k = 0; k < 8; ++k) {  // lane L of t[2k]: rows 2k, 2k + 1 at features 4L, 4L + 1 (t[2k + 1]: + 2, + 3)
    t[2 * k] = __builtin_shufflevector(rows[2 * k], rows[2 * k + 1], FA_LANES(0, 16, 1, 17));
    t[2 * k + 1] = __builtin_shufflevector(rows[2 * k], rows[2 * k + 1], FA_LANES(2, 18, 3, 19));
  }
  for (int k = 0; k < 4; ++k) {  // lane L of u[4k + m]: feature 4L + m of rows 4k .. 4k + 3
    u[4 * k] = __builtin_shufflevector(t[4 * k], t[4 * k + 2], FA_LANES(0, 1, 16, 17));
    u[4 * k + 1] = __builtin_shufflevector(t[4 * k], t[4 * k + 2], FA_LANES(2, 3, 18, 19));
    u[4 * k + 2] = __builtin_shufflevector(t[4 * k + 1], t[4 * k + 3], FA_LANES(0, 1, 16, 17));
    u[4 * k + 3] = __builtin_shufflevector(t[4 * k + 1], t[4 * k + 3], FA_LANES(2, 3, 18, 19));
  }
  for (int m = 0; m < 4; ++m) {  // feature 4L + m: lane L of u[m], u[4 + m], u[8 + m], u[12 + m]
    const Float16x even_a = __builtin_shufflevector(u[m], u[4 + m], FA_EVEN_LANES);
    const Float16x odd_a = __builtin_shufflevector(u[m], u[4 + m], FA_ODD_LANES);
    const Float16x even_b = __builtin_shufflevector(u[8 + m], u[12 + m], FA_EVEN_LANES);
    const Float16x odd_b = __builtin_shufflevector(u[8 + m], u[12 + m], FA_ODD_LANES);
    const Float16x out[4] = {__builtin_shufflevector(even_a, even_b, FA_EVEN_LANES),
                             __builtin_shufflevector(odd_a, odd_b, FA_EVEN_LANES),
                             __builtin_shufflevector(even_a, even_b, FA_ODD_LANES),
                             __builtin_shufflevector(odd_a, odd_b, FA_ODD_LANES)};
    for (int l = 0; l < 4; ++l) std::memcpy(dst + (4 * l + m) * ld, &out[l], sizeof(Float16x));
  }
}

#undef FA_LANES
#undef FA_EVEN_LANES
#undef FA_ODD_LANES

// 16 features from f of a float or bfloat16 row (unit feature stride), as float.
inline Float16x load16_as_float(const float* row, int64_t f) {
  Float16x x;
  std::memcpy(&x, row + f, sizeof(x));
  return x;
}
inline Float16x load16_as_float(const c10::BFloat16* row, int64_t f) {
  Half16x bits;
  std::memcpy(&bits, row + f, sizeof(bits));
  return (Float16x)(__builtin_convertvector(bits, Word16x) << 16);  // a bfloat16 is the top half of a float
}
