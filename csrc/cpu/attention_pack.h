// Copies between the user's tensors (any dtype, any strides) and the kernel's float (or double) tiles,
// rows padded with zeros to the tile's leading dimension so vector loads never read garbage.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/attention_problem.h"
#if FUSED_ATTENTION_ISA_AVX512
#include "cpu/transpose16.h"
#endif


// dst[r * ld + f] = x[token0 + r, f] for r < rows, f < features; zero for features <= f < ld.
template <typename scalar_t, typename acc_t>
inline void load_rows(const Operand<scalar_t>& x, int64_t batch, int64_t head, int64_t token0,
                                 int64_t rows, int64_t features, acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = x.row(batch, head, token0 + r);
    acc_t* out = dst + r * ld;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      // a copy: GCC copied c10::BFloat16 element by element (18% of an AMX forward at 128 tokens)
      if (x.feature_stride == 1) {
        std::memcpy(out, src, features * sizeof(acc_t));
        for (int64_t f = features; f < ld; ++f) out[f] = acc_t(0);
        continue;
      }
    }
    if (x.feature_stride == 1) {
      for (int64_t f = 0; f < features; ++f) out[f] = static_cast<acc_t>(src[f]);
    } else {
      for (int64_t f = 0; f < features; ++f) out[f] = static_cast<acc_t>(src[f * x.feature_stride]);
    }
    for (int64_t f = features; f < ld; ++f) out[f] = acc_t(0);
  }
}

// Rows as panels of `panel` features: dst[(f / panel) * rows * panel + r * panel + f % panel] = x[token0 + r, f]
// (the padding of the last panel is left as it is: zero).
template <typename scalar_t, typename acc_t>
inline void load_row_panels(const Operand<scalar_t>& x, int64_t batch, int64_t head, int64_t token0, int64_t rows,
                            int64_t features, acc_t* dst, int64_t panel) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = x.row(batch, head, token0 + r);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (x.feature_stride == 1) {  // a panel's part of the row is one copy
        for (int64_t f0 = 0; f0 < features; f0 += panel) {
          std::memcpy(dst + (f0 / panel) * rows * panel + r * panel, src + f0, std::min(panel, features - f0) * sizeof(acc_t));
        }
        continue;
      }
    }
    for (int64_t f = 0; f < features; ++f) {
      dst[(f / panel) * rows * panel + r * panel + f % panel] = static_cast<acc_t>(src[f * x.feature_stride]);
    }
  }
}

// The transpose as panels of `panel` rows (keys): dst[(r / panel) * features * panel + f * panel + r % panel] =
// x[token0 + r, f]. In runs of 16 rows (or of one panel, if narrower), so that each feature's writes fill
// whole cache lines instead of touching one line per element (which made this copy cost as much as a
// windowed attention's compute).
template <typename scalar_t, typename acc_t>
inline void load_transposed_panels(const Operand<scalar_t>& x, int64_t batch, int64_t head, int64_t token0,
                                   int64_t rows, int64_t features, acc_t* dst, int64_t panel) {
  const int64_t run = std::min<int64_t>(16, panel);  // divides the panel width (both powers of two)
  const int64_t stride = x.feature_stride;
  for (int64_t r0 = 0; r0 < rows; r0 += run) {
    const int64_t count = std::min(rows, r0 + run) - r0;
    acc_t* base = dst + (r0 / panel) * features * panel + r0 % panel;
    const scalar_t* src[16];  // the run's rows, looked up once (not once per element)
    for (int64_t r = 0; r < count; ++r) src[r] = x.row(batch, head, token0 + r0 + r);
    int64_t f = 0;
#if FUSED_ATTENTION_ISA_AVX512
    // Whole runs of 16 rows, 16 features at a time, in registers (transpose16.h).
    if constexpr (std::is_same_v<acc_t, float> &&
                  (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>)) {
      if (count == 16 && stride == 1) {
        for (; f + 16 <= features; f += 16) {
          Float16x block[16];
          for (int r = 0; r < 16; ++r) block[r] = load16_as_float(src[r], f);
          transpose16x16(block, base + f * panel, panel);
        }
      }
    }
#endif
    for (; f < features; ++f) {
      acc_t* out = base + f * panel;
      for (int64_t r = 0; r < count; ++r) out[r] = static_cast<acc_t>(src[r][f * stride]);
    }
  }
}

// x[token0 + r, f] = src[r * ld + f] (rounded to scalar_t).
template <typename scalar_t, typename acc_t>
inline void store_rows(const Operand<scalar_t>& x, int64_t batch, int64_t head, int64_t token0,
                                  int64_t rows, int64_t features, const acc_t* src, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* dst = x.row(batch, head, token0 + r);
    const acc_t* row = src + r * ld;
    if (x.feature_stride == 1) {  // a loop the compiler vectorizes (the strided one rounded to bf16 one by one)
      for (int64_t f = 0; f < features; ++f) dst[f] = static_cast<scalar_t>(row[f]);
    } else {
      for (int64_t f = 0; f < features; ++f) dst[f * x.feature_stride] = static_cast<scalar_t>(row[f]);
    }
  }
}

