// The decode kernel's products over bfloat16 caches read in place on AVX-512 (attention_decode.h includes
// this in its AVX-512 variants). A load of 32 bfloat16 of a K or V row becomes two float vectors in
// registers, its even features (a bfloat16 is the top half of a float: a shift left by 16) and its odd
// ones (a mask of the top halves), for float FMAs: no copy of K or V, no rounding of P. On the AMX Xeon we
// measure on, vdpbf16ps takes two cycles per 32 products where two FMAs take one (2026-12-05 record,
// cpu-decode-widen.md); on AVX-512 without AVX512-BF16 the rows had been converted into buffers first.
//
// - q.k (dot_keys with WidenDot, where there is no AVX512-BF16): the query rows in float, each block of
//   32 features stored as its 16 even features then its 16 odd ones (widen_queries), meet K's widened
//   halves; the sum over the features is the same, in another order.
// - P V (values_bf16): the probabilities in float times the widened value rows.
#pragma once

// q.k for float query rows (widen_queries' layout) and bfloat16 key rows (dot_keys): 32 features per step.
struct WidenDot {
  using QElem = float;
  using KElem = c10::BFloat16;
  struct Operand {
    __m512 even, odd;
  };
  static constexpr int64_t features = 32;
  static Operand load_q(const float* x) { return {_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)}; }
  static Operand load_k(const c10::BFloat16* x) {
    const __m512i v = _mm512_loadu_si512(x);
    return {_mm512_castsi512_ps((__m512i)((__v16su)v << 16)),
            _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))))};
  }
  static simd::Vec<float> add(simd::Vec<float> acc, Operand q, Operand k) {
    return (simd::Vec<float>)_mm512_fmadd_ps(q.odd, k.odd, _mm512_fmadd_ps(q.even, k.even, (__m512)acc));
  }
};

// out[r * dim + 32 b + i] = q[r * ldq + 32 b + 2 i], and + 16 the odd feature 2 i + 1, for i < 16: WidenDot's
// query layout (dim a multiple of 32).
inline void widen_queries(const float* q, int64_t rows, int64_t ldq, int64_t dim, float* out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t f = 0; f < dim; f += 32) {
      const __m512 a = _mm512_loadu_ps(q + r * ldq + f), b = _mm512_loadu_ps(q + r * ldq + f + 16);
      _mm512_storeu_ps(out + r * dim + f, _mm512_permutex2var_ps(a, even, b));
      _mm512_storeu_ps(out + r * dim + f + 16, _mm512_permutex2var_ps(a, odd, b));
    }
  }
}

// acc[r][f0 + 0..31] += the 32 features of a block, from its even and odd features (the two halves of
// every 32-bit pair of bfloat16, widened in place).
inline void add_even_odd(__m512 even, __m512 odd, float* acc) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_loadu_ps(acc), _mm512_permutex2var_ps(even, first, odd)));
  _mm512_storeu_ps(acc + 16, _mm512_add_ps(_mm512_loadu_ps(acc + 16), _mm512_permutex2var_ps(even, second, odd)));
}

// One register tile: Rows rows x Blocks blocks of 32 features from feature f0, over keys [k0, k1): each
// block of a value row loaded once and widened (WidenDot::load_k), FMAs with the probabilities (on
// AVX512-BF16, values_tile_pairs). Its loops over rows and blocks are unrolled in the source: GCC kept the
// accumulators of more than one row in memory outside the key loop otherwise (stored, reloaded around it).
// prefetch: bytes of the row kDecodePrefetchKeys keys ahead (if below reach: the keys row_of knows) to ask
// for with each key (0: none), into L1 where into_l1 (RowsAhead).
template <int Rows, int Blocks, typename RowOf>
__attribute__((noinline)) void values_tile(int64_t k0, int64_t k1, const float* p, int64_t ldp, const RowOf& row_of,
                                           int64_t reach, int64_t f0, float* acc, int64_t ldv, int64_t prefetch,
                                           bool into_l1) {
  __m512 even[Rows][Blocks], odd[Rows][Blocks];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 16
    for (int b = 0; b < Blocks; ++b) even[r][b] = odd[r][b] = _mm512_setzero_ps();
  }
  for (int64_t j = k0; j < k1; ++j) {
    const c10::BFloat16* v = row_of(j) + f0;
    if (prefetch > 0 && j + kDecodePrefetchKeys < reach) {
      prefetch_rows(row_of(j + kDecodePrefetchKeys), 1, 0, prefetch, into_l1);
    }
    __m512 e[Blocks], o[Blocks];
#pragma GCC unroll 16
    for (int blk = 0; blk < Blocks; ++blk) {
      const WidenDot::Operand x = WidenDot::load_k(v + 32 * blk);
      e[blk] = x.even;
      o[blk] = x.odd;
    }
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 16
      for (int blk = 0; blk < Blocks; ++blk) {
        even[r][blk] = _mm512_fmadd_ps(pr, e[blk], even[r][blk]);
        odd[r][blk] = _mm512_fmadd_ps(pr, o[blk], odd[r][blk]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 16
    for (int b = 0; b < Blocks; ++b) add_even_odd(even[r][b], odd[r][b], acc + r * ldv + f0 + 32 * b);
  }
}

// acc[r * ldv + f] += sum_j p[r * ldp + j] v_j[f] for rows r < rows, keys j < n (v_j at row_of(j),
// value_dim a multiple of 32). Keys go kDecodeValueBlock at a time (their value rows then stay in L1) through
// tiles of up to 4 rows x 64 features (one row: 1 x 128), the features of a block before the next block.
// The first tile of a block asks for whole rows kDecodePrefetchKeys ahead, contiguous caches too: the
// half-row passes streamed a cache from memory 0.83x as fast without (2026-12-05, cpu-decode-widen.md);
// into L1 where into_l1 (rows not scattered; RowsAhead); rows up to key `reach` (>= n; row_of's) are asked
// for.
template <typename RowOf>
void values_bf16(int64_t rows, int64_t n, int64_t reach, const float* p, int64_t ldp, const RowOf& row_of,
                 int64_t value_dim, float* acc, int64_t ldv, bool into_l1) {
  const int64_t row_bytes = value_dim * int64_t(sizeof(c10::BFloat16));
  for (int64_t k0 = 0; k0 < n; k0 += kDecodeValueBlock) {
    const int64_t k1 = std::min(n, k0 + kDecodeValueBlock);
    int64_t prefetch = row_bytes;
    for (int64_t r0 = 0; r0 < rows;) {
      const int64_t take = std::min<int64_t>(4, rows - r0);
      const float* pr = p + r0 * ldp;
      float* c = acc + r0 * ldv;
#if defined(FUSED_ATTENTION_BF16_DOT)
      alignas(64) uint16_t pb[2 * 4 * 32];  // the rows' bfloat16 parts, then their remainders
      probabilities_bf16(pr, ldp, take, k0, k1, pb);
#endif
      // A tile of R rows x B blocks of 32 features from f0.
      const auto tile = [&](auto rows_c, auto blocks_c, int64_t f0) {
        constexpr int R = decltype(rows_c)::value, B = decltype(blocks_c)::value;
#if defined(FUSED_ATTENTION_BF16_DOT)
        values_tile_pairs<R, B>(k0, k1, pb, 32, row_of, reach, f0, c, ldv, prefetch, into_l1);
#else
        values_tile<R, B>(k0, k1, pr, ldp, row_of, reach, f0, c, ldv, prefetch, into_l1);
#endif
      };
      using std::integral_constant;
      if (take == 1) {  // one row: 4 blocks a tile
        int64_t f0 = 0;
        for (; f0 + 128 <= value_dim; f0 += 128, prefetch = 0) tile(integral_constant<int, 1>{}, integral_constant<int, 4>{}, f0);
        for (; f0 < value_dim; f0 += 32, prefetch = 0) tile(integral_constant<int, 1>{}, integral_constant<int, 1>{}, f0);
      } else {
        for (int64_t f0 = 0; f0 < value_dim; prefetch = 0) {
          const bool two = value_dim - f0 >= 64;
          switch ((take - 2) * 2 + (two ? 1 : 0)) {
            case 0: tile(integral_constant<int, 2>{}, integral_constant<int, 1>{}, f0); break;
            case 1: tile(integral_constant<int, 2>{}, integral_constant<int, 2>{}, f0); break;
            case 2: tile(integral_constant<int, 3>{}, integral_constant<int, 1>{}, f0); break;
            case 3: tile(integral_constant<int, 3>{}, integral_constant<int, 2>{}, f0); break;
            case 4: tile(integral_constant<int, 4>{}, integral_constant<int, 1>{}, f0); break;
            default: tile(integral_constant<int, 4>{}, integral_constant<int, 2>{}, f0); break;
          }
          f0 += two ? 64 : 32;
        }
      }
      r0 += take;
    }
  }
}
