// Intel AMX tile products for the bfloat16 forward (Sapphire Rapids and later): one TDPBF16PS multiplies
// a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 floats, 16x the FMAs of an AVX-512 instruction.
//
// Every tile is configured 16 rows x 64 bytes: C tiles hold 16 x 16 floats; A tiles 16 rows x 32 bf16
// of a row-major matrix; B tiles are packed (VNNI): row p holds, for each of 16 columns, the pair of
// depth indices 2p and 2p + 1, so a B tile is 1 KiB contiguous and whoever packs it pads with zeros.
// Tile registers: C in tmm0-3 (2 x 2), A in tmm4-5, B in tmm6-7. Only included in the AMX target region.
#pragma once

#include <cstdint>

#include "cpu/attention_pack.h"


namespace tiles {

constexpr int64_t kRows = 16;     // rows of every tile; columns of a float C tile and of a B tile
constexpr int64_t kDepth = 32;    // bf16 depth of one A tile / B tile
constexpr int64_t kTileElems = kRows * kDepth;  // bf16 elements of a packed B tile

// Loads the tile configuration for this thread and releases the tiles when it goes out of scope
// (the tile state is per thread, and an unreleased one costs every later context switch).
class Scope {
 public:
  Scope() {
    Config config{};
    config.palette = 1;
    for (int t = 0; t < 8; ++t) {
      config.colsb[t] = 64;
      config.rows[t] = kRows;
    }
    // The instruction in asm with the configuration as a memory input: GCC 12's _tile_loadconfig does not
    // tell the compiler that it reads the bytes, and where Scope() was not inlined (the decode's) the
    // stores of the row and column counts were dropped as dead; the first tile load then faulted.
    asm volatile("ldtilecfg %0" : : "m"(config));
  }
  ~Scope() { _tile_release(); }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  struct alignas(64) Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  };
};

// C (row_tiles x col_tiles tiles of 16 x 16 floats, row stride ldc) = or += A x B: A tile (r, d) at
// a + 16 r lda + 32 d (bf16, row stride lda); B tile (d, c) packed at b + d b_depth + c b_col. With a_lo
// (laid out as a), C = or += (A + A_lo) x B: each B tile loaded once for both, C loaded and stored once
// (P V with P in two bf16 parts; two calls loaded and stored the C tiles twice). prefetch: B's tiles come
// from L2, and each depth step asks for the next step's (P V over 64 KiB of V waited on its tile loads:
// bf16 (4,16,256,128) 1.047x; callers leave it off where B stays in L1, where there is nothing to gain).
template <int row_tiles, int col_tiles>
inline void product_block(int64_t depth_tiles, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                          int64_t b_depth, int64_t b_col, float* c, int64_t ldc, bool accumulate,
                          const c10::BFloat16* a_lo = nullptr, bool prefetch = false) {
  const int64_t a_stride = lda * 2, c_stride = ldc * 4;
  float* c1 = c + kRows;
  float* c2 = c + kRows * ldc;
  float* c3 = c2 + kRows;
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if constexpr (col_tiles > 1) _tile_loadd(1, c1, c_stride);
    if constexpr (row_tiles > 1) _tile_loadd(2, c2, c_stride);
    if constexpr (row_tiles > 1 && col_tiles > 1) _tile_loadd(3, c3, c_stride);
  } else {
    _tile_zero(0);
    if constexpr (col_tiles > 1) _tile_zero(1);
    if constexpr (row_tiles > 1) _tile_zero(2);
    if constexpr (row_tiles > 1 && col_tiles > 1) _tile_zero(3);
  }
  for (int64_t d = 0; d < depth_tiles; ++d) {
    if (prefetch && d + 1 < depth_tiles) {
      for (int64_t line = 0; line < kTileElems; line += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(b + (d + 1) * b_depth + line), _MM_HINT_T0);
        if constexpr (col_tiles > 1) _mm_prefetch(reinterpret_cast<const char*>(b + (d + 1) * b_depth + b_col + line), _MM_HINT_T0);
      }
    }
    _tile_loadd(6, b + d * b_depth, 64);
    if constexpr (col_tiles > 1) _tile_loadd(7, b + d * b_depth + b_col, 64);
    for (const c10::BFloat16* part : {a, a_lo}) {
      if (part == nullptr) break;
      _tile_loadd(4, part + d * kDepth, a_stride);
      if constexpr (row_tiles > 1) _tile_loadd(5, part + kRows * lda + d * kDepth, a_stride);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (col_tiles > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (row_tiles > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (row_tiles > 1 && col_tiles > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  if constexpr (col_tiles > 1) _tile_stored(1, c1, c_stride);
  if constexpr (row_tiles > 1) _tile_stored(2, c2, c_stride);
  if constexpr (row_tiles > 1 && col_tiles > 1) _tile_stored(3, c3, c_stride);
}

// C = A x B for a depth of at most two tiles (head_dim <= 64), as Q K^T is: the B tiles of two columns
// stay in tmm4-7 while all row tiles pass, one A load per two products where 2 x 2 blocks need one per
// product (a tile load costs about as much as a product here). C in tmm0-1, A in tmm2-3.
template <int depth_tiles, int col_tiles>
inline void product_shallow_columns(int64_t row_tiles, const c10::BFloat16* a, int64_t lda,
                                    const c10::BFloat16* b, int64_t b_depth, int64_t b_col, float* c,
                                    int64_t ldc) {
  static_assert(depth_tiles >= 1 && depth_tiles <= 2 && col_tiles >= 1 && col_tiles <= 2);
  const int64_t a_stride = lda * 2, c_stride = ldc * 4;
  _tile_loadd(4, b, 64);
  if constexpr (depth_tiles > 1) _tile_loadd(5, b + b_depth, 64);
  if constexpr (col_tiles > 1) _tile_loadd(6, b + b_col, 64);
  if constexpr (depth_tiles > 1 && col_tiles > 1) _tile_loadd(7, b + b_col + b_depth, 64);
  for (int64_t r = 0; r < row_tiles; ++r) {
    const c10::BFloat16* a_r = a + r * kRows * lda;
    float* c_r = c + r * kRows * ldc;
    _tile_zero(0);
    if constexpr (col_tiles > 1) _tile_zero(1);
    _tile_loadd(2, a_r, a_stride);
    if constexpr (depth_tiles > 1) _tile_loadd(3, a_r + kDepth, a_stride);
    _tile_dpbf16ps(0, 2, 4);
    if constexpr (depth_tiles > 1) _tile_dpbf16ps(0, 3, 5);
    if constexpr (col_tiles > 1) _tile_dpbf16ps(1, 2, 6);
    if constexpr (depth_tiles > 1 && col_tiles > 1) _tile_dpbf16ps(1, 3, 7);
    _tile_stored(0, c_r, c_stride);
    if constexpr (col_tiles > 1) _tile_stored(1, c_r + kRows, c_stride);
  }
}

// The same for at most two row tiles (a slab of the forward): the A tiles (rows x depth, at most 4) stay
// in tmm4-7 while the columns pass, B in tmm2-3, C in tmm0-1: two tile loads per column where the
// column-stationary order needs four.
template <int depth_tiles, int row_tiles>
inline void product_shallow_rows(int64_t col_tiles, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                                 int64_t b_depth, int64_t b_col, float* c, int64_t ldc) {
  static_assert(depth_tiles >= 1 && depth_tiles <= 2 && row_tiles >= 1 && row_tiles <= 2);
  const int64_t a_stride = lda * 2, c_stride = ldc * 4;
  _tile_loadd(4, a, a_stride);
  if constexpr (depth_tiles > 1) _tile_loadd(5, a + kDepth, a_stride);
  if constexpr (row_tiles > 1) _tile_loadd(6, a + kRows * lda, a_stride);
  if constexpr (depth_tiles > 1 && row_tiles > 1) _tile_loadd(7, a + kRows * lda + kDepth, a_stride);
  for (int64_t t = 0; t < col_tiles; ++t) {
    const c10::BFloat16* b_t = b + t * b_col;
    float* c_t = c + t * kRows;
    _tile_zero(0);
    if constexpr (row_tiles > 1) _tile_zero(1);
    _tile_loadd(2, b_t, 64);
    if constexpr (depth_tiles > 1) _tile_loadd(3, b_t + b_depth, 64);
    _tile_dpbf16ps(0, 4, 2);
    if constexpr (depth_tiles > 1) _tile_dpbf16ps(0, 5, 3);
    if constexpr (row_tiles > 1) _tile_dpbf16ps(1, 6, 2);
    if constexpr (depth_tiles > 1 && row_tiles > 1) _tile_dpbf16ps(1, 7, 3);
    _tile_stored(0, c_t, c_stride);
    if constexpr (row_tiles > 1) _tile_stored(1, c_t + kRows * ldc, c_stride);
  }
}

template <int depth_tiles>
inline void product_shallow(int64_t row_tiles, int64_t col_tiles, const c10::BFloat16* a, int64_t lda,
                            const c10::BFloat16* b, int64_t b_depth, int64_t b_col, float* c, int64_t ldc) {
  if (row_tiles == 2 && col_tiles > 2) return product_shallow_rows<depth_tiles, 2>(col_tiles, a, lda, b, b_depth, b_col, c, ldc);
  if (row_tiles == 1 && col_tiles > 2) return product_shallow_rows<depth_tiles, 1>(col_tiles, a, lda, b, b_depth, b_col, c, ldc);
  int64_t t = 0;
  for (; t + 2 <= col_tiles; t += 2) {
    product_shallow_columns<depth_tiles, 2>(row_tiles, a, lda, b + t * b_col, b_depth, b_col, c + t * kRows, ldc);
  }
  if (t < col_tiles) {
    product_shallow_columns<depth_tiles, 1>(row_tiles, a, lda, b + t * b_col, b_depth, b_col, c + t * kRows, ldc);
  }
}

// The whole product, in 2 x 2 blocks of tiles (1-wide at odd edges); shallow ones column-stationary.
// With a_lo: (A + A_lo) x B; prefetch: see product_block.
inline void product(int64_t row_tiles, int64_t col_tiles, int64_t depth_tiles, const c10::BFloat16* a,
                    int64_t lda, const c10::BFloat16* b, int64_t b_depth, int64_t b_col, float* c, int64_t ldc,
                    bool accumulate, const c10::BFloat16* a_lo = nullptr, bool prefetch = false) {
  if (a_lo == nullptr && !accumulate && (depth_tiles == 1 || depth_tiles == 2)) {
    if (depth_tiles == 1) return product_shallow<1>(row_tiles, col_tiles, a, lda, b, b_depth, b_col, c, ldc);
    return product_shallow<2>(row_tiles, col_tiles, a, lda, b, b_depth, b_col, c, ldc);
  }
  for (int64_t r = 0; r < row_tiles; r += 2) {
    const c10::BFloat16* a_r = a + r * kRows * lda;
    const c10::BFloat16* a_lo_r = a_lo != nullptr ? a_lo + r * kRows * lda : nullptr;
    float* c_r = c + r * kRows * ldc;
    const bool two_rows = r + 1 < row_tiles;
    for (int64_t t = 0; t < col_tiles; t += 2) {
      const c10::BFloat16* b_t = b + t * b_col;
      float* c_t = c_r + t * kRows;
      const bool two_cols = t + 1 < col_tiles;
      if (two_rows && two_cols) {
        product_block<2, 2>(depth_tiles, a_r, lda, b_t, b_depth, b_col, c_t, ldc, accumulate, a_lo_r, prefetch);
      } else if (two_rows) {
        product_block<2, 1>(depth_tiles, a_r, lda, b_t, b_depth, b_col, c_t, ldc, accumulate, a_lo_r, prefetch);
      } else if (two_cols) {
        product_block<1, 2>(depth_tiles, a_r, lda, b_t, b_depth, b_col, c_t, ldc, accumulate, a_lo_r, prefetch);
      } else {
        product_block<1, 1>(depth_tiles, a_r, lda, b_t, b_depth, b_col, c_t, ldc, accumulate, a_lo_r, prefetch);
      }
    }
  }
}

// Up to 32 bf16 elements of x from `from` (of `n`), zero past n.
inline __m512i load_bf16(const c10::BFloat16* x, int64_t from, int64_t n) {
  const int64_t left = n - from;
  if (left >= 32) return _mm512_loadu_si512(x + from);
  return _mm512_maskz_loadu_epi16(left > 0 ? (__mmask32)((1ull << left) - 1) : 0, x + from);
}

// A B tile of Q K^T (packed: row p, column j = the feature pair 2p, 2p + 1 of key j) from `count` <= 16
// key rows, features [f0, f0 + 32) of `features` (zero past either): a 16 x 16 transpose of 32-bit pairs.
// Output rows are `ld` bf16 apart (32: a tile; the decode transposes float scores with it, rows of a
// score block).
inline void pack_pair_transpose(const c10::BFloat16* const* rows, int64_t count, int64_t f0, int64_t features,
                                c10::BFloat16* tile, int64_t ld = kDepth) {
  // (Masked forms with all lanes on: GCC 12 -Wall flags the plain forms' undefined pass-through operand.)
  __m512i r[16], t[16];
  for (int j = 0; j < 16; ++j) r[j] = j < count ? load_bf16(rows[j], f0, features) : _mm512_setzero_si512();
  for (int i = 0; i < 16; i += 2) {  // lane L of t[i]: r_i, r_i+1 at 4L, 4L + 1; of t[i + 1]: at 4L + 2, 4L + 3
    t[i] = _mm512_mask_unpacklo_epi32(r[i], 0xFFFF, r[i], r[i + 1]);
    t[i + 1] = _mm512_mask_unpackhi_epi32(r[i], 0xFFFF, r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // lane L of r[i + m]: rows i .. i + 3 of column 4L + m
    r[i] = _mm512_mask_unpacklo_epi64(t[i], 0xFF, t[i], t[i + 2]);
    r[i + 1] = _mm512_mask_unpackhi_epi64(t[i], 0xFF, t[i], t[i + 2]);
    r[i + 2] = _mm512_mask_unpacklo_epi64(t[i + 1], 0xFF, t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_mask_unpackhi_epi64(t[i + 1], 0xFF, t[i + 1], t[i + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // column 4L + m: lane L of r[m], r[4 + m], r[8 + m], r[12 + m]
    const __m512i x0 = _mm512_mask_shuffle_i32x4(r[m], 0xFFFF, r[m], r[4 + m], 0x88);
    const __m512i x1 = _mm512_mask_shuffle_i32x4(r[m], 0xFFFF, r[m], r[4 + m], 0xDD);
    const __m512i y0 = _mm512_mask_shuffle_i32x4(r[8 + m], 0xFFFF, r[8 + m], r[12 + m], 0x88);
    const __m512i y1 = _mm512_mask_shuffle_i32x4(r[8 + m], 0xFFFF, r[8 + m], r[12 + m], 0xDD);
    _mm512_storeu_si512(tile + (0 + m) * ld, _mm512_mask_shuffle_i32x4(x0, 0xFFFF, x0, y0, 0x88));
    _mm512_storeu_si512(tile + (4 + m) * ld, _mm512_mask_shuffle_i32x4(x1, 0xFFFF, x1, y1, 0x88));
    _mm512_storeu_si512(tile + (8 + m) * ld, _mm512_mask_shuffle_i32x4(x0, 0xFFFF, x0, y0, 0xDD));
    _mm512_storeu_si512(tile + (12 + m) * ld, _mm512_mask_shuffle_i32x4(x1, 0xFFFF, x1, y1, 0xDD));
  }
}

// The B tiles of all features of `count` <= 16 rows (zero past count and features), depth tile d at
// dst + 512 d: K's tiles for Q K^T (per 16 keys), Q^T's for the decode's K Q^T (per 16 query rows).
inline void pack_pair_transpose_tiles(const c10::BFloat16* const* rows, int64_t count, int64_t features,
                                      c10::BFloat16* dst) {
  for (int64_t d = 0; d * kDepth < features; ++d) pack_pair_transpose(rows, count, d * kDepth, features, dst + d * kTileElems);
}

// Where pack_pair_rows writes the pair of value rows from `key` (even) on, in V's B tiles from `base`
// (32-key chunk c's f_tiles tiles at c f_tiles 512).
inline c10::BFloat16* value_pair_row(c10::BFloat16* base, int64_t key, int64_t f_tiles) {
  return base + key / kDepth * f_tiles * kTileElems + key % kDepth / 2 * 2 * kRows;
}

// Row p of every B tile of P V for one pair of value rows (`odd` null: zero): element 2j + e of feature
// tile f's row = row e's feature 16 f + j; tiles 1 KiB apart, `features` of them valid, f_tiles tiles.
inline void pack_pair_rows(const c10::BFloat16* even, const c10::BFloat16* odd, int64_t features, int64_t f_tiles,
                           c10::BFloat16* dst) {
  alignas(64) static constexpr int16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr int16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  for (int64_t f = 0; f < f_tiles; f += 2) {
    const __m512i a = load_bf16(even, f * kRows, features);
    const __m512i b = odd != nullptr ? load_bf16(odd, f * kRows, features) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + f * kTileElems, _mm512_permutex2var_epi16(a, low, b));
    if (f + 1 < f_tiles) _mm512_storeu_si512(dst + (f + 1) * kTileElems, _mm512_permutex2var_epi16(a, high, b));
  }
}

// 32 floats (a: the first 16) as two bfloat16 rows, hi[j] + lo[j] = x[j] to 16 significant bits (hi: x's
// top 16 bits, exact; lo = bf16(x - hi), the remainder exact in float): one conversion packs two vectors.
inline void split_pair(__m512 a, __m512 b, c10::BFloat16* hi, c10::BFloat16* lo) {
  const __m512i top_bits = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const auto top = [&](__m512 x) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top_bits)); };
  const __m512 ta = top(a), tb = top(b);
  _mm512_storeu_si512(hi, (__m512i)_mm512_cvtne2ps_pbh(tb, ta));
  _mm512_storeu_si512(lo, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, tb), _mm512_sub_ps(a, ta)));
}

// The float row as split_pair's two parts; 0 for n <= j < n_zero (n a whole number of vectors).
inline void to_bf16_split_row(const float* src, int64_t n, int64_t n_zero, c10::BFloat16* hi, c10::BFloat16* lo) {
  int64_t j = 0;
  for (; j < n; j += 32) {
    split_pair(_mm512_loadu_ps(src + j), j + 16 < n ? _mm512_loadu_ps(src + j + 16) : _mm512_setzero_ps(), hi + j, lo + j);
  }
  std::fill(hi + j, hi + n_zero, c10::BFloat16(0.0f));
  std::fill(lo + j, lo + n_zero, c10::BFloat16(0.0f));
}

// softmax_block's writer (see FloatProbs) of a row's probabilities straight into P's two bf16 parts, with
// no float row between (its store and reload were a fifth of the softmax's samples). Writes whole 32s:
// the rows have room up to the next multiple of 32, which the products read.
struct SplitProbs {
  c10::BFloat16 *hi, *lo;
  template <typename V>
  void pair(int64_t j, const V& a, const V& b) const { split_pair((__m512)a, (__m512)b, hi + j, lo + j); }
  template <typename V>
  void single(int64_t j, const V& a) const { split_pair((__m512)a, _mm512_setzero_ps(), hi + j, lo + j); }
  void zero(int64_t n_pad) const {
    std::fill(hi, hi + round_up<int64_t>(n_pad, kDepth), c10::BFloat16(0.0f));
    std::fill(lo, lo + round_up<int64_t>(n_pad, kDepth), c10::BFloat16(0.0f));
  }
};

}  // namespace tiles
