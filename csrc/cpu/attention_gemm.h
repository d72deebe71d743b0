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

namespace fused_attention::cpu {

// C (m x n) (+)= A (m x depth, strides a_row / a_col) B (depth x n, row stride ldb). With depth 0 and
// accumulate false, C becomes 0. Defined for float and double in attention_gemm.cpp, compiled once per
// instruction set (see vec_io.h) rather than inlined at every call.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
          T* c, int64_t ldc, bool accumulate);

}  // namespace fused_attention::cpu
