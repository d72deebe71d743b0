// q.k for bfloat16 caches on AVX512-BF16 (attention_isa_avx512bf16.cpp and attention_isa_amx.cpp
// include attention_decode.h with FUSED_ATTENTION_BF16_DOT, which includes this), for fewer query rows
// than the AMX tiles take (attention_decode_amx.h): a query row and a key row, both bfloat16 as they lie,
// pair up along the features in vdpbf16ps; the products of two bfloat16 are exact in float, only the
// order of the float additions differs from dot_keys. (P V: attention_decode_widen.h.)
#pragma once

// q.k for bfloat16 query and key rows (dot_keys): 32 features per step, the pairs' products summed in
// float lanes.
struct Bf16Dot {
  using QElem = c10::BFloat16;
  using KElem = c10::BFloat16;
  using Operand = __m512bh;
  static constexpr int64_t features = 32;
  static Operand load_q(const QElem* x) { return (__m512bh)_mm512_loadu_si512(x); }
  static Operand load_k(const KElem* x) { return (__m512bh)_mm512_loadu_si512(x); }
  static simd::Vec<float> add(simd::Vec<float> acc, Operand q, Operand k) {
    return (simd::Vec<float>)_mm512_dpbf16_ps((__m512)acc, q, k);
  }
};
