// Vector helpers of the CPU kernels: loads and stores between scalar_t memory and vectors of its math
// type (float for float16/bfloat16, otherwise scalar_t itself), so each kernel is written once for all
// four dtypes, and the multi-versioning that turns those vectors into AVX2/AVX-512 code.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// The extension is compiled for baseline x86-64, where at::vec's Vectorized is a plain array loop that
// the compiler vectorizes with SSE only: too slow to keep up with memory. Functions marked with this
// are compiled once per x86-64 level and the best one for the running CPU is picked at load time
// (GCC function multi-versioning, resolved through glibc's ifunc), so the build stays portable. Callees
// inlined into a version get its instruction set; callees left out of line run baseline code, so nothing
// leaks to older CPUs. Elsewhere the kernels still build, with the compiler's own vectorization.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__GLIBC__)
#define FUSED_ATTENTION_CPU_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSED_ATTENTION_CPU_MULTIVERSION
#endif

namespace fused_attention::cpu {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_t<scalar_t>>;

// float16/bfloat16 <-> float, `size` elements at a time. at::vec's portable fallback converts element by
// element through c10's scalar code, which costs more than the memory traffic; these loops are plain
// enough for the compiler to vectorize inside the multi-versioned kernels. Results are bit for bit c10's:
// rounding to nearest even, NaN stays NaN.
template <int64_t size>
C10_ALWAYS_INLINE void widen(const c10::BFloat16* src, float* dst) {
  uint16_t bits[size];
  std::memcpy(bits, src, sizeof(bits));
  uint32_t wide[size];
  for (int64_t k = 0; k < size; ++k) {
    wide[k] = uint32_t{bits[k]} << 16;  // bfloat16 is the top half of a float32
  }
  std::memcpy(dst, wide, sizeof(wide));
}

template <int64_t size>
C10_ALWAYS_INLINE void narrow(const float* src, c10::BFloat16* dst) {
  uint32_t bits[size];
  std::memcpy(bits, src, sizeof(bits));
  uint16_t narrowed[size];
  for (int64_t k = 0; k < size; ++k) {
    const uint32_t rounded = (bits[k] + 0x7fffu + ((bits[k] >> 16) & 1u)) >> 16;
    narrowed[k] = (bits[k] & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
  }
  std::memcpy(dst, narrowed, sizeof(narrowed));
}

// IEEE float16 <-> float32 without branches, so that the loops below vectorize (GCC does not vectorize
// its own _Float16 conversions). The standard bit tricks (as in the FP16 library and c10): exponents are
// re-biased by a float multiply, subnormals handled by a float subtract, rounding left to the FPU.
C10_ALWAYS_INLINE float half_bits_to_float(uint16_t half) {
  const uint32_t shifted = uint32_t{half} << 17;  // exponent and mantissa at the top, sign dropped
  const uint32_t sign = (uint32_t{half} & 0x8000u) << 16;
  // Normal, infinite, NaN: exponent + (224 - 15) then * 2^-112 re-biases to float's 127 (31 maps to 255).
  const float normal = c10::bit_cast<float>((shifted >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal: the mantissa as the fraction of 0.5 * (1 + m / 2^23), minus 0.5.
  const float subnormal = c10::bit_cast<float>((shifted >> 17) | (126u << 23)) - 0.5f;
  // An integer select: a conditional would become a branch around the float math (trapping math), and a
  // branch does not vectorize.
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(shifted < (1u << 27));
  return c10::bit_cast<float>(sign | (c10::bit_cast<uint32_t>(subnormal) & is_subnormal) |
                              (c10::bit_cast<uint32_t>(normal) & ~is_subnormal));
}

C10_ALWAYS_INLINE uint16_t float_to_half_bits(float value) {
  const uint32_t bits = c10::bit_cast<uint32_t>(value);
  const uint32_t doubled = bits + bits;  // sign dropped
  // Scaling up then down makes the FPU round the mantissa to 10 bits (to nearest even) and saturate to inf.
  float rounded = (std::fabs(value) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bias = std::max(doubled & 0xFF000000u, 0x71000000u);
  rounded += c10::bit_cast<float>((bias >> 1) + 0x07800000u);
  const uint32_t rounded_bits = c10::bit_cast<uint32_t>(rounded);
  const uint32_t magnitude = ((rounded_bits >> 13) & 0x7C00u) + (rounded_bits & 0x0FFFu);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t is_nan = 0u - static_cast<uint32_t>(doubled > 0xFF000000u);  // integer select, as above
  return static_cast<uint16_t>(sign | (0x7E00u & is_nan) | (magnitude & ~is_nan));
}

template <int64_t size>
C10_ALWAYS_INLINE void widen(const c10::Half* src, float* dst) {
  uint16_t bits[size];
  std::memcpy(bits, src, sizeof(bits));
  for (int64_t k = 0; k < size; ++k) {
    dst[k] = half_bits_to_float(bits[k]);
  }
}

template <int64_t size>
C10_ALWAYS_INLINE void narrow(const float* src, c10::Half* dst) {
  uint16_t bits[size];
  for (int64_t k = 0; k < size; ++k) {
    bits[k] = float_to_half_bits(src[k]);
  }
  std::memcpy(dst, bits, sizeof(bits));
}

// Reads `count` (at most AccVec::size()) elements; the rest of the vector is zero.
template <typename scalar_t>
C10_ALWAYS_INLINE AccVec<scalar_t> load_acc(const scalar_t* src, int64_t count = AccVec<scalar_t>::size()) {
  constexpr int64_t size = AccVec<scalar_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    // The full-width branch keeps the common case a fixed-size load.
    return count == size ? AccVec<scalar_t>::loadu(src) : AccVec<scalar_t>::loadu(src, count);
  } else {
    __at_align__ float values[size];
    if (count == size) {
      widen<size>(src, values);
    } else {
      scalar_t partial[size] = {};
      std::copy_n(src, count, partial);
      widen<size>(partial, values);
    }
    return AccVec<scalar_t>::loadu(values);
  }
}

// Writes the first `count` (at most AccVec::size()) elements, rounded to scalar_t.
template <typename scalar_t>
C10_ALWAYS_INLINE void store_acc(scalar_t* dst, const AccVec<scalar_t>& value,
                                 int64_t count = AccVec<scalar_t>::size()) {
  constexpr int64_t size = AccVec<scalar_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    count == size ? value.store(dst) : value.store(dst, count);
  } else {
    __at_align__ float values[size];
    value.store(values);
    if (count == size) {
      narrow<size>(values, dst);
    } else {
      scalar_t partial[size];
      narrow<size>(values, partial);
      std::copy_n(partial, count, dst);
    }
  }
}

// (v0, v1, v2, v3, ...) -> (v1, v0, v3, v2, ...): a fixed permutation the compiler turns into one shuffle.
template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> swap_adjacent(const at::vec::Vectorized<T>& v) {
  constexpr int64_t size = at::vec::Vectorized<T>::size();
  __at_align__ T values[size];
  __at_align__ T swapped[size];
  v.store(values);
  for (int64_t k = 0; k < size; ++k) {
    swapped[k] = values[k ^ 1];
  }
  return at::vec::Vectorized<T>::loadu(swapped);
}

// Calls step(i, count) over [0, n) in steps of `width`: full steps get count as a compile-time constant,
// so their loads and stores are plain vector moves; the last, partial step (if any) gets a runtime count.
template <int64_t width, typename Step>
C10_ALWAYS_INLINE void for_each_vector(int64_t n, Step&& step) {
  int64_t i = 0;
  for (; i + width <= n; i += width) {
    step(i, std::integral_constant<int64_t, width>{});
  }
  if (i < n) {
    step(i, n - i);
  }
}

}  // namespace fused_attention::cpu
