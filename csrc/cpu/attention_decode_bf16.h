// The decode kernel's two products for bfloat16 caches on AVX512-BF16 (attention_isa_avx512bf16.cpp
// includes attention_decode.h with FUSED_ATTENTION_BF16_DOT, which includes this). vdpbf16ps multiplies
// pairs of bfloat16 and adds both products into one float lane, so K and V rows are read as they lie in
// the cache, 32 features per load, and never widened to float (the widening cost more than reading them).
//
// - q.k (dot_keys with Bf16Dot): a query row and a key row pair up along the features; the products of two
//   bfloat16 are exact in float, only the order of the float additions differs from dot_keys.
// - p.V (values_bf16): pairs of keys. Two value rows interleaved 16 bits at a time meet the rows'
//   probabilities rounded to bfloat16 (as FlashAttention feeds P to its P.V product); the softmax sum
//   stays in float.
#pragma once

// q.k for bfloat16 query and key rows (dot_keys): 32 features per step, the pairs' products summed in
// float lanes.
struct Bf16Dot {
  using Elem = c10::BFloat16;
  using Operand = __m512bh;
  static constexpr int64_t features = 32;
  static Operand load(const Elem* x) { return (__m512bh)_mm512_loadu_si512(x); }
  static simd::Vec<float> add(simd::Vec<float> acc, Operand q, Operand k) {
    return (simd::Vec<float>)_mm512_dpbf16_ps((__m512)acc, q, k);
  }
};

// out (rows x round_up(n, 32)) = p (rows x n, row stride ldp) rounded to bfloat16, zero past n: 32-bit
// word j of a row is then the pair (p_2j, p_2j+1) that values_bf16 broadcasts.
inline void bf16_pairs(const float* p, int64_t rows, int64_t n, int64_t ldp, AlignedVector<c10::BFloat16>& out) {
  const int64_t ld = round_up<int64_t>(n, 32);
  out.resize(rows * ld);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < ld; j += 32) {
      const int64_t left = n - j;
      const __mmask16 lo = left >= 16 ? 0xFFFF : (left > 0 ? (__mmask16)((1u << left) - 1) : 0);
      const __mmask16 hi = left >= 32 ? 0xFFFF : (left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0);
      const __m512 a = _mm512_maskz_loadu_ps(lo, p + r * ldp + j), b = _mm512_maskz_loadu_ps(hi, p + r * ldp + j + 16);
      _mm512_storeu_si512(out.data() + r * ld + j, (__m512i)_mm512_cvtne2ps_pbh(b, a));  // a in the low half
    }
  }
}

// acc[r][f0 + 0..31] += the 32 features of a block, from the unpacked halves: unpacklo of two rows holds
// features 0-3, 8-11, 16-19, 24-27 of the block (16-bit interleaving works within 128-bit lanes),
// unpackhi 4-7, 12-15, 20-23, 28-31.
inline void add_unpacked(__m512 lo, __m512 hi, float* acc) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_loadu_ps(acc), _mm512_permutex2var_ps(lo, first, hi)));
  _mm512_storeu_ps(acc + 16, _mm512_add_ps(_mm512_loadu_ps(acc + 16), _mm512_permutex2var_ps(lo, second, hi)));
}

// One register tile: Rows rows x Blocks blocks of 32 features from feature f0, over all n keys.
// prefetch: bytes of the row kDecodePrefetchKeys keys ahead to ask for with each pair of keys (0: none).
template <int Rows, int Blocks, typename RowOf>
__attribute__((noinline)) void values_tile(int64_t n, const c10::BFloat16* p16, int64_t ldp, const RowOf& row_of,
                                           int64_t f0, float* acc, int64_t ldv, int64_t prefetch) {
  __m512 lo[Rows][Blocks], hi[Rows][Blocks];
  for (int r = 0; r < Rows; ++r) {
    for (int b = 0; b < Blocks; ++b) lo[r][b] = hi[r][b] = _mm512_setzero_ps();
  }
  // An odd last key pairs with a row of zeros (its partner's probability is 0, but 0 x inf is NaN).
  alignas(64) static const c10::BFloat16 zeros[128] = {};
  for (int64_t j = 0; j < n; j += 2) {
    const c10::BFloat16* a = row_of(j) + f0;
    const c10::BFloat16* b = j + 1 < n ? row_of(j + 1) + f0 : zeros;
    if (prefetch > 0 && j + kDecodePrefetchKeys < n) {
      prefetch_rows(row_of(j + kDecodePrefetchKeys), 1, 0, prefetch);
      if (j + 1 + kDecodePrefetchKeys < n) prefetch_rows(row_of(j + 1 + kDecodePrefetchKeys), 1, 0, prefetch);
    }
    __m512bh x[Blocks], y[Blocks];
    for (int blk = 0; blk < Blocks; ++blk) {
      const __m512i va = _mm512_loadu_si512(a + 32 * blk), vb = _mm512_loadu_si512(b + 32 * blk);
      x[blk] = (__m512bh)_mm512_unpacklo_epi16(va, vb);
      y[blk] = (__m512bh)_mm512_unpackhi_epi16(va, vb);
    }
    for (int r = 0; r < Rows; ++r) {
      int32_t pair;  // (p_j, p_j+1): one 32-bit word of the row
      std::memcpy(&pair, p16 + r * ldp + j, sizeof(pair));
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(pair);
      for (int blk = 0; blk < Blocks; ++blk) {
        lo[r][blk] = _mm512_dpbf16_ps(lo[r][blk], x[blk], pr);
        hi[r][blk] = _mm512_dpbf16_ps(hi[r][blk], y[blk], pr);
      }
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int b = 0; b < Blocks; ++b) add_unpacked(lo[r][b], hi[r][b], acc + r * ldv + f0 + 32 * b);
  }
}

// acc[r * ldv + f] += sum_j p_rj v_j[f] for rows r < rows, keys j < n (v_j at row_of(j), value_dim a
// multiple of 32), p16 from bf16_pairs (row stride ldp). Each tile has 16 accumulators and loads each
// pair of value rows once: 2 rows x 128 features where 128 features remain, so that the first tile reads
// whole value rows front to back (its partner tiles find them in L2); tiles of 4 rows x 64 features
// read half rows in two passes and streamed a cache from memory 1.1-1.2x slower (2026-12-04 record,
// cpu-decode-memory.md); else up to 4 rows x 64 or 32. scattered: rows are short runs in their own
// pages (see prefetch_rows); the tile of the first rows and features asks for whole rows ahead.
template <typename RowOf>
void values_bf16(int64_t rows, int64_t n, const c10::BFloat16* p16, int64_t ldp, const RowOf& row_of,
                 int64_t value_dim, float* acc, int64_t ldv, bool scattered) {
  for (int64_t f0 = 0; f0 < value_dim;) {
    // blocks of 32 features per tile: 4 (2 rows) while 128 features remain, then 2 (4 rows), then 1
    const int64_t blocks = value_dim - f0 >= 128 ? 4 : value_dim - f0 >= 64 ? 2 : 1;
    const int64_t tile_rows = blocks == 4 ? 2 : 4;
    const int64_t row_bytes = scattered && f0 == 0 ? value_dim * int64_t(sizeof(c10::BFloat16)) : 0;
    for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
      const c10::BFloat16* p = p16 + r0 * ldp;
      float* c = acc + r0 * ldv;
      const int64_t prefetch = r0 == 0 ? row_bytes : 0;
      const int64_t take = std::min(tile_rows, rows - r0);
      if (blocks == 4) {
        if (take == 2) values_tile<2, 4>(n, p, ldp, row_of, f0, c, ldv, prefetch);
        else values_tile<1, 4>(n, p, ldp, row_of, f0, c, ldv, prefetch);
        continue;
      }
      switch ((take - 1) * 2 + (blocks == 2 ? 1 : 0)) {
        case 0: values_tile<1, 1>(n, p, ldp, row_of, f0, c, ldv, prefetch); break;
        case 1: values_tile<1, 2>(n, p, ldp, row_of, f0, c, ldv, prefetch); break;
        case 2: values_tile<2, 1>(n, p, ldp, row_of, f0, c, ldv, prefetch); break;
        case 3: values_tile<2, 2>(n, p, ldp, row_of, f0, c, ldv, prefetch); break;
        case 4: values_tile<3, 1>(n, p, ldp, row_of, f0, c, ldv, prefetch); break;
        case 5: values_tile<3, 2>(n, p, ldp, row_of, f0, c, ldv, prefetch); break;
        case 6: values_tile<4, 1>(n, p, ldp, row_of, f0, c, ldv, prefetch); break;
        default: values_tile<4, 2>(n, p, ldp, row_of, f0, c, ldv, prefetch); break;
      }
    }
    f0 += 32 * blocks;
  }
}
