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
// (24 accumulators of the 32 AVX-512 registers), broadcasting one A element per row and FMA-ing it with
// the B vectors: the loads per FMA are few enough that the loop runs at the FMA ports' rate.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/attention_simd.h"


constexpr int kRows = 6;
constexpr int kVectors = 4;

template <typename T, int rows, int vectors>
inline void gemm_tile(int64_t depth, const T* a, int64_t a_row, int64_t a_col, const T* b,
                                 int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  using V = simd::Vec<T>;
  constexpr int64_t width = simd::Traits<T>::width;
  // Fully unrolled, so that the arrays become registers.
  V acc[rows][vectors];
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) {
      acc[r][v] = accumulate ? simd::load(c + r * ldc + v * width) : V{};
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
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
        acc[r][v] += ar * bk[v];
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) {
      simd::store(c + r * ldc + v * width, acc[r][v]);
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

// Depth of one packed panel of B: kDepthChunk x (kVectors vectors) floats is 32 KiB, which stays in L1
// while every row block of A streams past it.
constexpr int64_t kDepthChunk = 128;

// Copies B[0, depth) x [0, columns) (columns a whole number of vectors) into a contiguous panel. A panel
// read row after row never misses L1, where B's own rows, a whole sequence apart in the transposed K,
// all fall in the same few cache sets (and P V's 512 x 64 block of V is larger than L1).
template <typename T>
inline void pack_panel(int64_t depth, int64_t columns, const T* b, int64_t ldb, T* panel) {
  for (int64_t k = 0; k < depth; ++k) std::memcpy(panel + k * columns, b + k * ldb, columns * sizeof(T));
}

template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                            const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t width = simd::Traits<T>::width;
  constexpr int64_t block = kVectors * width;
  thread_local std::vector<T> panel(kDepthChunk * block);
  const int64_t vectors = (n + width - 1) / width;
  for (int64_t k0 = 0; k0 < depth; k0 += kDepthChunk) {
    const int64_t kc = std::min(kDepthChunk, depth - k0);
    const T* a_k = a + k0 * a_col;
    const bool add = accumulate || k0 > 0;
    int64_t v = 0;
    for (; v + kVectors <= vectors; v += kVectors) {
      const T* b_panel = b + k0 * ldb + v * width;
      if (ldb != block) {  // rows of exactly one panel's width (V with head_dim 64) are a panel already
        pack_panel(kc, block, b_panel, ldb, panel.data());
        b_panel = panel.data();
      }
      gemm_columns<T, kVectors>(m, kc, a_k, a_row, a_col, b_panel, block, c + v * width, ldc, add);
    }
    const int64_t tail = vectors - v;
    if (tail == 0) continue;
    pack_panel(kc, tail * width, b + k0 * ldb + v * width, ldb, panel.data());
    T* c_tail = c + v * width;
    const int64_t ld_tail = tail * width;
    switch (tail) {
      case 1: gemm_columns<T, 1>(m, kc, a_k, a_row, a_col, panel.data(), ld_tail, c_tail, ldc, add); break;
      case 2: gemm_columns<T, 2>(m, kc, a_k, a_row, a_col, panel.data(), ld_tail, c_tail, ldc, add); break;
      case 3: gemm_columns<T, 3>(m, kc, a_k, a_row, a_col, panel.data(), ld_tail, c_tail, ldc, add); break;
      default: break;
    }
  }
}

static_assert(kVectors == 4, "gemm's tail switch covers kVectors - 1 vectors");
