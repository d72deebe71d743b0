// q.k for bfloat16 caches on AVX512-BF16 (attention_isa_avx512bf16.cpp includes attention_decode.h with
// FUSED_ATTENTION_BF16_DOT, which includes this): a query row and a key row, both bfloat16 as they lie,
// pair up along the features in vdpbf16ps; the products of two bfloat16 are exact in float, only the
// order of the float additions differs from dot_keys. P V: values_tile_pairs below (from values_bf16).
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

// values_tile_pairs' sums in float, each probability as the sum of its two parts (hi + lo): for a tile
// whose products came out NaN. A value of +-inf meets the remainder too, and a remainder of 0 (a probability
// that bfloat16 holds exactly) times inf is NaN where p times inf is inf: this sum gives what float P V gives.
template <typename RowOf>
__attribute__((noinline, cold)) void values_pairs_in_float(int rows, int blocks, int64_t k0, int64_t k1,
                                                           const uint16_t* pb, int64_t ldpb, const RowOf& row_of,
                                                           int64_t f0, float* acc, int64_t ldv) {
  const auto widen = [](uint16_t bits) { return c10::BFloat16(bits, c10::BFloat16::from_bits()).operator float(); };
  for (int r = 0; r < rows; ++r) {
    for (int64_t f = f0; f < f0 + 32 * blocks; ++f) {
      float sum = 0.0f;
      for (int64_t j = k0; j < k1; ++j) {
        const float p = widen(pb[r * ldpb + (j - k0)]) + widen(pb[(r + rows) * ldpb + (j - k0)]);
        sum += p * static_cast<float>(row_of(j)[f]);
      }
      acc[r * ldv + f] += sum;
    }
  }
}

// P V for bfloat16 value rows on AVX512-BF16, two keys per vdpbf16ps: the value rows of keys j and j + 1
// interleaved feature by feature (vpunpcklwd / vpunpckhwd, within 128-bit lanes) meet the pair of their
// probabilities, broadcast, so each float lane adds p_j v_j[f] + p_{j+1} v_{j+1}[f]: half the multiply
// instructions and half the shuffles of widening V to float (values_tile), where vdpbf16ps issues as fast
// as an FMA (Zen 5: both ~0.85 TSC ticks per zmm instruction, 12 chains). Each probability goes in as two
// bfloat16 parts, its top 16 bits and the rest (16 significant bits, as the AMX products take P): the cpu
// backend computes 16-bit inputs with float32 intermediates, and P rounded once to bfloat16 (as
// FlashAttention's bfloat16 P V does) broke that promise's bound (a step with a float mask, ALiBi and sinks:
// 1.17x the policy's float32-intermediates bound, found by a random sweep). A tile whose sums come out NaN
// (an infinite value met a remainder of 0) is summed again in float (values_pairs_in_float). pb: row r's
// probabilities of keys [k0, k1) at pb + r * ldpb, their remainders at pb + (r + Rows) * ldpb, one 0 past
// an odd count. prefetch, into_l1: as values_tile.
template <int Rows, int Blocks, typename RowOf>
__attribute__((noinline)) void values_tile_pairs(int64_t k0, int64_t k1, const uint16_t* pb, int64_t ldpb,
                                                 const RowOf& row_of, int64_t reach, int64_t f0, float* acc,
                                                 int64_t ldv, int64_t prefetch, bool into_l1) {
  // Accumulators of row r, block b at r * Blocks + b; every loop over them unrolled in the source, as
  // GCC otherwise kept them in memory outside the key loop (stored and reloaded around it).
  __m512 lo[Rows * Blocks], hi[Rows * Blocks];
#pragma GCC unroll 16
  for (int i = 0; i < Rows * Blocks; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  for (int64_t j = k0; j < k1; j += 2) {
    const bool pair = j + 1 < k1;
    const c10::BFloat16* v0 = row_of(j) + f0;
    const c10::BFloat16* v1 = pair ? row_of(j + 1) + f0 : nullptr;
    if (prefetch > 0) {
      for (int64_t a = j + kDecodePrefetchKeys; a < std::min(j + 2, k1) + kDecodePrefetchKeys && a < reach; ++a) {
        prefetch_rows(row_of(a), 1, 0, prefetch, into_l1);
      }
    }
    __m512i low[Blocks], high[Blocks];
#pragma GCC unroll 16
    for (int blk = 0; blk < Blocks; ++blk) {
      const __m512i x = _mm512_loadu_si512(v0 + 32 * blk);
      const __m512i y = pair ? _mm512_loadu_si512(v1 + 32 * blk) : _mm512_setzero_si512();
      low[blk] = _mm512_unpacklo_epi16(x, y);
      high[blk] = _mm512_unpackhi_epi16(x, y);
    }
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      int32_t both, rest;
      std::memcpy(&both, pb + r * ldpb + (j - k0), sizeof(both));
      std::memcpy(&rest, pb + (r + Rows) * ldpb + (j - k0), sizeof(rest));
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(both), pl = (__m512bh)_mm512_set1_epi32(rest);
#pragma GCC unroll 16
      for (int blk = 0; blk < Blocks; ++blk) {
        lo[r * Blocks + blk] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(lo[r * Blocks + blk], pr, (__m512bh)low[blk]), pl,
                                                (__m512bh)low[blk]);
        hi[r * Blocks + blk] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(hi[r * Blocks + blk], pr, (__m512bh)high[blk]), pl,
                                                (__m512bh)high[blk]);
      }
    }
  }
  __mmask16 unordered = 0;
#pragma GCC unroll 16
  for (int i = 0; i < Rows * Blocks; ++i) {
    unordered |= _mm512_cmp_ps_mask(lo[i], lo[i], _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi[i], hi[i], _CMP_UNORD_Q);
  }
  if (unordered != 0) [[unlikely]] {
    return values_pairs_in_float(Rows, Blocks, k0, k1, pb, ldpb, row_of, f0, acc, ldv);
  }
  // Float lane 4 l + i of `lo` holds feature 8 l + i, of `hi` feature 8 l + 4 + i (l < 4, i < 4).
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 16
    for (int b = 0; b < Blocks; ++b) {
      float* out = acc + r * ldv + f0 + 32 * b;
      const __m512 l = lo[r * Blocks + b], h = hi[r * Blocks + b];
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_permutex2var_ps(l, first, h)));
      _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_loadu_ps(out + 16), _mm512_permutex2var_ps(l, second, h)));
    }
  }
}

// Rows [0, rows) of p's keys [k0, k1) (at most 32) as two bfloat16 parts, as split_pair splits them: p's
// top 16 bits into pb (row stride 32), the remainder (>= 0, exact in float, then rounded) into row r + rows;
// zeros past k1.
inline void probabilities_bf16(const float* p, int64_t ldp, int64_t rows, int64_t k0, int64_t k1, uint16_t* pb) {
  const __m512i top_bits = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));  // (split_pair's split)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < 32; i += 16) {
      const int64_t left = std::clamp<int64_t>(k1 - k0 - i, 0, 16);
      const __mmask16 mask = static_cast<__mmask16>((uint32_t{1} << left) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(mask, p + r * ldp + k0 + i);
      const __m512 top = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top_bits));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + r * 32 + i), (__m256i)_mm512_cvtneps_pbh(top));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + (r + rows) * 32 + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, top)));
    }
  }
}
