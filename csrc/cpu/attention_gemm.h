// The one matrix product of the CPU attention kernel, on float (or double) tiles in its own buffers:
//
//   C[m, n] (+)= sum_k A[m * a_row + k * a_col] * B[k * ldb + n]
//
// A is read through two strides, so the same routine computes Q K^T (with K stored transposed), P V,
// and the backward's P^T dO and dS^T Q (A transposed by its strides). B and C rows are padded to whole
// vectors by their owners (ldb, ldc and the allocation cover n up to round_up(N, width)); the padding
// lanes compute garbage that nobody reads.
//
// Register blocking: kRows rows of A times kVectors vectors of B stay in registers for the whole k loop
// (24 accumulators of 32 registers: AVX-512, NEON; 12 of 16: AVX2, SSE), broadcasting one A element per
// row and FMA-ing it with the B vectors: the loads per FMA are few enough that the loop runs at the FMA
// ports' rate.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/attention_simd.h"


constexpr int kRows = 6;
constexpr int kVectors = simd::kVectorRegisters >= 32 ? 4 : 2;

// Rows of memory that a loop asks for ahead of reading them, one row per step: `rows` rows (none when 0)
// of `bytes` bytes, `stride` bytes apart, from `first`. Spread over the loop, the requests leave the core
// between its FMAs instead of filling its miss buffers in one burst. A stream of rows that follow one
// another is asked for into L1 (prefetcht0); rows scattered one or two to a 4 KiB page (other heads' rows
// between them, short pages) into L2 (prefetcht1). On a Zen 5 (2026-12-06 record,
// cpu-decode-l1-prefetch.md): a decode step's q.k over rows that follow one another read them from memory
// 1.32x as fast into L1 as into L2 (a microbenchmark); FlashAttention's layout and pages of 16 (scattered)
// 0.97-1.11x as fast into L2 as into L1. AMX decode (attention_decode_amx.h) keeps L2: unmeasured there.
struct RowsAhead {
  const char* first = nullptr;
  int64_t rows = 0, stride = 0, bytes = 0;
  bool into_l1 = false;
  __attribute__((always_inline)) void fetch(int64_t row) const {
    const char* p = first + row * stride;
    if (into_l1) {
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
    } else {
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
    }
  }
};

// Never inlined: inlined into the attention loops it measured with accumulators spilled to the stack.
// With `ahead` (kAhead), step k asks for row k of it (RowsAhead). `ahead` by reference: a 40-byte copy
// on the stack, built from narrow stores and read back whole, stalled every call (store forwarding fails;
// 5-7% of a float32 backward; tests/test_cpu_codegen.py).
template <typename T, int rows, int vectors, bool kAhead = false>
__attribute__((noinline)) void gemm_tile(int64_t depth, const T* a, int64_t a_row, int64_t a_col, const T* b,
                                 int64_t ldb, T* c, int64_t ldc, bool accumulate, const RowsAhead& ahead = RowsAhead{}) {
  using V = simd::Vec<T>;
  constexpr int64_t width = simd::Traits<T>::width;
  // Fully unrolled, so that the arrays become registers. The tile's sum starts at 0 and joins C only at
  // the end, so that a C accumulated over many calls (dK, dV over a long query range) is a sum of
  // partial sums, not one chain of every term: its rounding error grows with the number of calls plus
  // the depth of one, not with their product (dV over 1025 query rows was 3.7x a float32 matmul's error).
  //
  // Narrow tiles, whose accumulators leave registers free, sum the depth in kChains interleaved chains
  // (step k into chain k % kChains), added at the end: each chain's running sum is smaller and takes
  // fewer roundings. A score against fewer than 16 keys (one vector) summed head dim 128 in one chain per
  // key, and its float32 error reached 5x that of torch's product at that shape, past the tolerance
  // policy's bound (a float32 lse at 1 key, 122 rows); the wide tiles of long sequences keep one chain.
  // (With 16 registers, AVX2 and the baseline, the chains spilled: one chain there.)
  constexpr bool room = simd::kVectorRegisters >= 32;
  constexpr int kChains = room && rows * vectors * 4 + vectors + 2 <= simd::kVectorRegisters   ? 4
                          : room && rows * vectors * 2 + vectors + 2 <= simd::kVectorRegisters ? 2
                                                                                                : 1;
  V acc[kChains][rows][vectors] = {};
  const auto step = [&](int chain, int64_t k) __attribute__((always_inline)) {
    if constexpr (kAhead) {
      if (k < ahead.rows) ahead.fetch(k);
    }
    V bk[vectors];
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) {
      bk[v] = simd::load(b + k * ldb + v * width);
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r) {
      const V ar = simd::broadcast(a[r * a_row + k * a_col]);
#pragma GCC unroll 8
      for (int v = 0; v < vectors; ++v) {
        acc[chain][r][v] += ar * bk[v];
      }
    }
  };
  int64_t k = 0;
  for (; k + kChains <= depth; k += kChains) {
#pragma GCC unroll 4
    for (int chain = 0; chain < kChains; ++chain) step(chain, k + chain);
  }
  for (; k < depth; ++k) step(0, k);
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) {
      V total = acc[0][r][v];
      if constexpr (kChains == 4) total = (acc[0][r][v] + acc[1][r][v]) + (acc[2][r][v] + acc[3][r][v]);
      if constexpr (kChains == 2) total = acc[0][r][v] + acc[1][r][v];
      const V sum = accumulate ? simd::load(c + r * ldc + v * width) + total : total;
      simd::store(c + r * ldc + v * width, sum);
    }
  }
}

// All rows of one column block of `vectors` vectors, the last rows with a smaller register tile.
template <typename T, int vectors>
inline void gemm_columns(int64_t m, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                                    const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    gemm_tile<T, kRows, vectors>(depth, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, accumulate);
  }
  const T* a_tail = a + i * a_row;
  T* c_tail = c + i * ldc;
  switch (m - i) {
    case 1: return gemm_tile<T, 1, vectors>(depth, a_tail, a_row, a_col, b, ldb, c_tail, ldc, accumulate);
    case 2: return gemm_tile<T, 2, vectors>(depth, a_tail, a_row, a_col, b, ldb, c_tail, ldc, accumulate);
    case 3: return gemm_tile<T, 3, vectors>(depth, a_tail, a_row, a_col, b, ldb, c_tail, ldc, accumulate);
    case 4: return gemm_tile<T, 4, vectors>(depth, a_tail, a_row, a_col, b, ldb, c_tail, ldc, accumulate);
    case 5: return gemm_tile<T, 5, vectors>(depth, a_tail, a_row, a_col, b, ldb, c_tail, ldc, accumulate);
    default: return;
  }
}

static_assert(kRows == 6, "gemm_columns' tail switch covers kRows - 1 rows");

// Depth of one panel of B in a product: kDepthChunk x (kVectors vectors) floats is 32 KiB, which stays
// in L1 while every row block of A streams past it.
constexpr int64_t kDepthChunk = 128;

// Depth steps per part of a narrow product (gemm_blocks' tail columns) where gemm_tile's depth chains find
// no free registers (16 registers: AVX2, the baseline); with 32 the chains do it inside the tile.
constexpr int64_t kNarrowDepth = simd::kVectorRegisters >= 32 ? kDepthChunk : 32;

// Columns of one panel: the register tile's width.
template <typename T>
constexpr int64_t kPanel = kVectors * simd::Traits<T>::width;

// B stored as panels of kPanel<T> columns, zero-padded: row k of column block v at
// data + v * block_stride + k * kPanel<T>. KeyTiles keeps K and V this way, so the products that read
// them every step never copy them (copying cost 10-20% of the backward at head_dim 128).
template <typename T>
struct Panels {
  const T* data;
  int64_t block_stride;
};

// Copies B[0, depth) x [0, columns) (columns a whole number of vectors) into a contiguous panel. A panel
// read row after row never misses L1, where B's own rows, a whole sequence apart in a transposed K,
// all fall in the same few cache sets.
template <typename T>
inline void pack_panel(int64_t depth, int64_t columns, const T* b, int64_t ldb, T* panel) {
  for (int64_t k = 0; k < depth; ++k) std::memcpy(panel + k * columns, b + k * ldb, columns * sizeof(T));
}

// The product over depth chunks and column blocks; panel(k0, kc, v, vectors) returns the B panel (and
// its row stride) of rows [k0, k0 + kc) and `vectors` vectors from column vector v.
template <typename T, typename PanelOf>
inline void gemm_blocks(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                        const PanelOf& panel_of, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t width = simd::Traits<T>::width;
  const int64_t vectors = (n + width - 1) / width;
  if (depth == 0 && !accumulate) {  // an empty sum: C = 0 (else it kept what a previous product left there)
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + vectors * width, T(0));
  }
  for (int64_t k0 = 0; k0 < depth; k0 += kDepthChunk) {
    const int64_t kc = std::min(kDepthChunk, depth - k0);
    const T* a_k = a + k0 * a_col;
    const bool add = accumulate || k0 > 0;
    int64_t v = 0;
    for (; v + kVectors <= vectors; v += kVectors) {
      const auto [b, ldb] = panel_of(k0, kc, v, kVectors);
      gemm_columns<T, kVectors>(m, kc, a_k, a_row, a_col, b, ldb, c + v * width, ldc, add);
    }
    const int64_t tail = vectors - v;
    if (tail == 0) continue;
    const auto [b, ldb] = panel_of(k0, kc, v, tail);
    T* c_tail = c + v * width;
    // The narrow columns sum the depth kNarrowDepth steps at a time, each part added to C: with one chain
    // per element in a tile (16 registers), a score against a few keys summed head dim 128 in one chain,
    // past the tolerance policy's bound in float32 (122 rows against 1 key).
    for (int64_t k1 = 0; k1 < kc; k1 += kNarrowDepth) {
      const int64_t kn = std::min(kNarrowDepth, kc - k1);
      const T* a_n = a_k + k1 * a_col;
      const T* b_n = b + k1 * ldb;
      const bool add_n = add || k1 > 0;
      // Only tails narrower than kVectors occur: wider tiles are not instantiated (with 16 registers a
      // 6 x 3 tile would not fit them).
      if (tail == 1) gemm_columns<T, 1>(m, kn, a_n, a_row, a_col, b_n, ldb, c_tail, ldc, add_n);
      if constexpr (kVectors > 2) {
        if (tail == 2) gemm_columns<T, 2>(m, kn, a_n, a_row, a_col, b_n, ldb, c_tail, ldc, add_n);
      }
      if constexpr (kVectors > 3) {
        if (tail == 3) gemm_columns<T, 3>(m, kn, a_n, a_row, a_col, b_n, ldb, c_tail, ldc, add_n);
      }
    }
  }
}

static_assert(kVectors <= 4, "gemm_blocks' tails cover up to 3 vectors");

// B row-major with row stride ldb (rows padded to whole vectors): packed panel by panel as it is used.
template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                            const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t width = simd::Traits<T>::width;
  thread_local AlignedVector<T> panel(kDepthChunk * kPanel<T>);
  const auto panel_of = [&](int64_t k0, int64_t kc, int64_t v, int64_t vectors) {
    const T* start = b + k0 * ldb + v * width;
    if (ldb == kPanel<T>) return std::pair<const T*, int64_t>(start, ldb);  // rows one panel wide are one
    pack_panel(kc, vectors * width, start, ldb, panel.data());
    return std::pair<const T*, int64_t>(panel.data(), vectors * width);
  };
  gemm_blocks(m, n, depth, a, a_row, a_col, panel_of, c, ldc, accumulate);
}

// B already in panels.
template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col, Panels<T> b,
                 T* c, int64_t ldc, bool accumulate) {
  const auto panel_of = [&](int64_t k0, int64_t, int64_t v, int64_t) {
    return std::pair<const T*, int64_t>(b.data + v / kVectors * b.block_stride + k0 * kPanel<T>, kPanel<T>);
  };
  gemm_blocks(m, n, depth, a, a_row, a_col, panel_of, c, ldc, accumulate);
}
