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

#include <cstdint>

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

template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
                            const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t width = simd::Traits<T>::width;
  const int64_t vectors = (n + width - 1) / width;
  int64_t v = 0;
  for (; v + kVectors <= vectors; v += kVectors) {
    gemm_columns<T, kVectors>(m, depth, a, a_row, a_col, b + v * width, ldb, c + v * width, ldc, accumulate);
  }
  const T* b_tail = b + v * width;
  T* c_tail = c + v * width;
  switch (vectors - v) {
    case 1: return gemm_columns<T, 1>(m, depth, a, a_row, a_col, b_tail, ldb, c_tail, ldc, accumulate);
    case 2: return gemm_columns<T, 2>(m, depth, a, a_row, a_col, b_tail, ldb, c_tail, ldc, accumulate);
    case 3: return gemm_columns<T, 3>(m, depth, a, a_row, a_col, b_tail, ldb, c_tail, ldc, accumulate);
    default: return;
  }
}

static_assert(kVectors == 4, "gemm's tail switch covers kVectors - 1 vectors");

