// SIMD building blocks of the CPU attention kernel: vectors (GCC/Clang vector extensions) of one native
// register of the variant being compiled (zmm in the AVX-512 variants, ymm in the AVX2 one, xmm / NEON q
// in the baseline), and an exp accurate to about an ulp.
//
// One register per vector, so that register tiles counted in vectors fit the register file: with
// 64-byte vectors everywhere, the AVX2 variant held each in two ymm and its 24-accumulator product tile
// in 48 of 16 registers, and ran the forward 8.7x slower than the AVX-512 variant on the same Zen 4
// core (whose 512-bit FMAs run as two 256-bit halves: the two should be level).
//
// at::vec is compiled for the build's baseline here (see vec_io.h), so its Sleef exp is not available
// here: a scalar std::exp per score would cost more than the matrix products it sits between.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

// The variant's vector register: its bytes, and how many there are (kernel headers are compiled once
// per variant, inside its namespace: attention_isa_*.cpp).
#if defined(FUSED_ATTENTION_ISA_AVX512)
#define FUSED_ATTENTION_VECTOR_BYTES 64
#define FUSED_ATTENTION_VECTOR_REGISTERS 32
#elif defined(FUSED_ATTENTION_ISA_AVX2)
#define FUSED_ATTENTION_VECTOR_BYTES 32
#define FUSED_ATTENTION_VECTOR_REGISTERS 16
#elif defined(__AVX512F__)  // a baseline built for a newer CPU than x86-64's (-march=native)
#define FUSED_ATTENTION_VECTOR_BYTES 64
#define FUSED_ATTENTION_VECTOR_REGISTERS 32
#elif defined(__AVX__)
#define FUSED_ATTENTION_VECTOR_BYTES 32
#define FUSED_ATTENTION_VECTOR_REGISTERS 16
#elif defined(__aarch64__)
#define FUSED_ATTENTION_VECTOR_BYTES 16
#define FUSED_ATTENTION_VECTOR_REGISTERS 32
#else  // x86-64's SSE2 baseline, and the 16-byte vectors every other target lowers well
#define FUSED_ATTENTION_VECTOR_BYTES 16
#define FUSED_ATTENTION_VECTOR_REGISTERS 16
#endif

namespace simd {

constexpr int kVectorRegisters = FUSED_ATTENTION_VECTOR_REGISTERS;

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  typedef float Vec __attribute__((vector_size(FUSED_ATTENTION_VECTOR_BYTES)));
  typedef int32_t Int __attribute__((vector_size(FUSED_ATTENTION_VECTOR_BYTES)));
  static constexpr int64_t width = FUSED_ATTENTION_VECTOR_BYTES / 4;
  static constexpr float log2e = 1.4426950408889634f;
  // ln 2 split in two so that n * ln2_hi is exact for the n that occur (Cody and Waite's reduction).
  static constexpr float ln2_hi = 0.693145751953125f;
  static constexpr float ln2_lo = 1.428606765330187e-06f;
  static constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float underflow = -87.3f;  // below it exp(x) is subnormal: flushed to 0
  static constexpr float overflow = 88.7f;    // above it exp(x) is past float's largest value
  static constexpr int mantissa_bits = 23;
  static constexpr int exponent_bias = 127;
};

template <>
struct Traits<double> {
  typedef double Vec __attribute__((vector_size(FUSED_ATTENTION_VECTOR_BYTES)));
  typedef int64_t Int __attribute__((vector_size(FUSED_ATTENTION_VECTOR_BYTES)));
  static constexpr int64_t width = FUSED_ATTENTION_VECTOR_BYTES / 8;
  static constexpr double log2e = 1.4426950408889634;
  static constexpr double ln2_hi = 0.6931471803691238;
  static constexpr double ln2_lo = 1.9082149292705877e-10;
  static constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double underflow = -708.3;
  static constexpr double overflow = 709.7;
  static constexpr int mantissa_bits = 52;
  static constexpr int exponent_bias = 1023;
  static constexpr int taylor_terms = 14;
};

template <typename T>
using Vec = typename Traits<T>::Vec;

template <typename T>
inline Vec<T> load(const T* src) {
  Vec<T> v;
  std::memcpy(&v, src, sizeof(v));  // an unaligned vector load
  return v;
}

template <typename T>
inline void store(T* dst, const Vec<T>& v) {
  std::memcpy(dst, &v, sizeof(v));
}

// Every lane = value, as one broadcast (straight from memory when the value is loaded): value - 0.0 is
// value for every value, -0.0 included, so the subtraction folds away. (`Vec{} + value` keeps an add,
// since -0.0 + 0.0 is +0.0, and a {value, value, ...} initializer is built lane by lane.)
template <typename T>
inline Vec<T> broadcast(T value) {
  return value - Vec<T>{};
}

// op over x's lanes, halving the vector at each step: log2(width) vector operations where a loop over
// the lanes made a chain of width dependent scalar ones (a third of the softmax on 128-key rows). The
// halves by shuffles: copied out through memory, each step waited on a store.
template <typename V, size_t offset, size_t... I>
inline auto lanes_from(const V& x, std::index_sequence<I...>) {  // lanes offset .. offset + sizeof...(I) - 1
  return __builtin_shufflevector(x, x, (I + offset)...);
}

template <typename T, typename V, typename Op>
inline T reduce(const V& x, const Op& op) {
  constexpr size_t lanes = sizeof(V) / sizeof(T);
  if constexpr (lanes == 2) {
    return op(x[0], x[1]);
  } else {
    constexpr std::make_index_sequence<lanes / 2> half;
    return reduce<T>(op(lanes_from<V, 0>(x, half), lanes_from<V, lanes / 2>(x, half)), op);
  }
}

template <typename T>
inline T reduce_add(const Vec<T>& x) {
  return reduce<T>(x, [](const auto& a, const auto& b) { return a + b; });
}

// The largest lane of a vector without NaN (max instructions: letting a NaN win took four a step).
template <typename T>
inline T reduce_max(const Vec<T>& x) {
  return reduce<T>(x, [](const auto& a, const auto& b) { return a > b ? a : b; });
}

// |x| as one AND of the sign bit (a compare, select and negate otherwise).
template <typename T>
inline Vec<T> abs(Vec<T> x) {
  using Int = typename Traits<T>::Int;
  constexpr auto magnitude = std::numeric_limits<std::remove_reference_t<decltype(Int{}[0])>>::max();
  return (Vec<T>)((Int)x & magnitude);
}

// exp(x) for x <= 0 (scores minus their row maximum), results below the smallest normal number flushed
// to 0: subnormals make everything after them many times slower, and they lie far below any tolerance.
// x = n ln2 + r with |r| <= ln2 / 2, then exp(r) by a polynomial and 2^n put into the exponent bits.
// float: 1 + r + r^2 q(r) with q a least-squares fit on Chebyshev nodes (relative error 3.6e-9, well
// under float's half ulp, so the result is within about an ulp); double: the Taylor series.
template <typename T>
inline Vec<T> exp_nonpositive(Vec<T> x) {
  using Tr = Traits<T>;
  using Int = typename Tr::Int;
  const Vec<T> n = (x * Tr::log2e + Tr::round_magic) - Tr::round_magic;
  const Vec<T> r = (x - n * Tr::ln2_hi) - n * Tr::ln2_lo;
  Vec<T> poly;
  if constexpr (std::is_same_v<T, float>) {
    Vec<T> q = r * 0.0013751408499602237f + 0.008368921815941352f;
    q = q * r + 0.041669533680769796f;
    q = q * r + 0.16666518414477388f;
    q = q * r + 0.4999998859081001f;
    poly = (q * (r * r) + r) + 1.0f;
  } else {
    poly = broadcast<T>(T(1));
    for (int term = Tr::taylor_terms; term >= 1; --term) {  // Horner: 1 + r/1 (1 + r/2 (1 + r/3 (...)))
      poly = poly * (r * (T(1) / T(term))) + T(1);
    }
  }
  const Int exponent = (__builtin_convertvector(n, Int) + Tr::exponent_bias) << Tr::mantissa_bits;
  const Vec<T> result = poly * (Vec<T>)exponent;  // a vector cast of equal size reinterprets the bits
  // Above the overflow bound the exponent bits would wrap into the sign: +inf, as exp gives (the lazy
  // softmax tries arguments above 0 and relies on an overflow showing as inf).
  const Vec<T> capped = x > Tr::overflow ? broadcast<T>(std::numeric_limits<T>::infinity()) : result;
  return x < Tr::underflow ? Vec<T>{} : capped;
}

// Beyond this |shift| exp_shifted_sum_to takes exp_rounded instead of exp_affine (float spacing there is
// 2^-8 and more: the scores themselves are that coarse).
template <typename T>
constexpr T kFusedShiftLimit = T(65536);

// x * scale rounded, never fused into an operation after it (a call the compiler cannot see into).
template <typename T>
__attribute__((noinline)) Vec<T> rounded_product(Vec<T> x, T scale) {
  return x * scale;
}

// exp(round(x * scale) - shift): the row's maximum was rounded so (row_max(s) * scale), and at its
// element the argument is then exactly 0. exp_affine's fused product (exact, or scale log2 e rounded)
// leaves it |shift| 2^-24 off 0, which overflowed from scores of 1e9 on (NaN, or a row of zeros after a
// failed maximum pass), and shift log2 e is past float's range below -2.4e38 (a mask holding float's
// lowest value, as Hugging Face's eager masks do: NaN).
template <typename T>
inline Vec<T> exp_rounded(Vec<T> x, T scale, T shift) {
  return exp_nonpositive<T>(rounded_product<T>(x, scale) - shift);
}

// exp(x * scale - shift) for arguments <= 0, as exp_nonpositive. The AVX-512 float version works in base
// 2: t = x * (scale log2 e) - shift log2 e is one FMA, 2^t = 2^n 2^f with n = round(t) and f = t - n
// exact, 2^f by a degree-6 fit (relative error 1e-7 as evaluated in float, under 2 ulp), and vscalefps
// puts n into the exponent. 11 instructions a vector against the generic version's 18: the softmax
// pass costs a fifth of the forward. Arguments below -125 (results below the smallest normal) give 0,
// and NaN stays NaN.
template <typename T>
inline Vec<T> exp_affine(Vec<T> x, T scale, T shift) {
#if FUSED_ATTENTION_ISA_AVX512
  if constexpr (std::is_same_v<T, float>) {
    // shift log2 e rounded to float errs by up to half an ulp of it (1.5e-5 at scores near 200), the same
    // for every term of a row, so its rounding error is taken off again: a large reference (and the lse
    // built on it) keeps float's precision, and the backward's sink gradient, which weighs the row's
    // terms against the sink's exactly computed one, its accuracy (its error over 100 random problems
    // fell below the float32 reference's).
    const float shift_log2e = shift * Traits<float>::log2e;
    const float shift_low = std::isfinite(shift_log2e) ? std::fma(shift, Traits<float>::log2e, -shift_log2e) : 0.0f;
    const __m512 t = _mm512_sub_ps(
        _mm512_fmsub_ps(x, _mm512_set1_ps(scale * Traits<float>::log2e), _mm512_set1_ps(shift_log2e)),
        _mm512_set1_ps(shift_low));
    // (the masked form: the plain one passes an undefined vector that GCC 12 warns about)
    const __m512 n = _mm512_mask_roundscale_ps(t, __mmask16(0xffff), t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Vec<T> f = t - n;
    Vec<T> p = f * 1.5370704932138324e-04f + 1.3399848248809576e-03f;
    p = p * f + 9.618373587727547e-03f;
    p = p * f + 5.550329014658928e-02f;
    p = p * f + 2.4022647738456726e-01f;
    p = p * f + 6.931471824645996e-01f;
    p = p * f + 1.0f;
    const __mmask16 normal = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);  // NaN: kept
    return _mm512_maskz_scalef_ps(normal, p, n);
  }
#endif
  return exp_nonpositive<T>(x * scale - shift);
}

// Flushes subnormal results to zero and reads subnormal inputs as zero (MXCSR FTZ and DAZ) on this
// thread while in scope. Probabilities far below the row's maximum (ALiBi's distant keys) times small
// values make subnormal products, and each one costs an FMA microcode assist of ~100 cycles: that made
// ALiBi 1.5x slower than plain attention. What is flushed lies below 1.2e-38 (float), far below any
// tolerance. Elsewhere a no-op: AArch64's FPCR.FZ would do the same, but whether it pays there (ARM cores
// have no x86-style microcode assist for subnormals) was never measured, so results stay IEEE exact.
class FlushDenormals {
 public:
#if FUSED_ATTENTION_X86_VARIANTS
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;

 public:
#else
  FlushDenormals() {}  // user-provided: `const FlushDenormals flush;` needs one
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

}  // namespace simd
