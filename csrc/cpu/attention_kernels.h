// Entry points of the CPU attention kernels, shared by the dense and the packed (varlen) ops in
// attention_ops.cpp. attention_dispatch.cpp runs the variant compiled for the best instruction set the
// CPU has (attention_isa_*.cpp: forward and backward in each).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/attention_problem.h"

namespace fused_attention::cpu {

// Arithmetic type: float for float16/bfloat16/float32, double for float64.
template <typename scalar_t>
using attn_acc_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
struct Problem {
  std::vector<Sequence> sequences;
  Operand<scalar_t> q, k, v;
  int64_t heads_q, heads_kv, head_dim, value_dim;
};

// (batch, head, token) -> offset into a contiguous per-row buffer (lse, or the backward's per-row data).
struct RowIndex {
  int64_t batch_stride, head_stride;
  // Where set (float arithmetic), each row's lse - float(lse) as well: float's spacing at |lse| is a
  // same-signed error in every exp(score - lse) of the row, which a merge over key blocks (ring
  // attention) would carry into its gradients; the pair holds lse to the precision of the row's sum.
  float* low = nullptr;
  int64_t at(const Sequence& seq, int64_t head, int64_t i) const {
    return seq.batch * batch_stride + head * head_stride + seq.q_start + i;
  }
};

// out: (rows, Ev) per (sequence, query head) through its strides; lse through `lse_index`.
template <typename scalar_t>
void attention_forward_kernel(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,
                              const Operand<scalar_t>& out, attn_acc_t<scalar_t>* lse, const RowIndex& lse_index);

// The blocked forward's tasks pack their own (sequence, kv head) pair where each pair's tiles take at
// most this (tasks_own_pairs, attention_forward.h); larger pairs are packed up front for all.
constexpr int64_t kPairTileBytes = int64_t(512) << 10;

// Calls with at most kDecodeMaxRows query rows per sequence take the decode forward (attention_decode.h):
// K and V read once per kv head for the whole group, from where they are, keys split across threads.
// Up to kDecodeWideRows rows against at least kDecodeWideMinKeys visible keys it serves too where the
// blocked forward pays more: where a kv head's group has few rows (at most 64 at head dim 128 and up, 32
// below), or where the blocked forward's K and V tiles, packed up front (pairs past kPairTileBytes),
// would reach kDecodeWideTileBytes in float (past the caches: every query head of a group reads them
// back from memory) and the group has at most kDecodeWideGroupRows rows (the largest measured). Measured
// in float32 on a 2-vCPU Emerald Rapids (AVX-512; cpu-decode-wide.md), applied to every dtype and
// variant: (1, 32 / 8 heads, 17, 16384, 128) ran in 0.37x the blocked forward's time, (1, 32 / 32, 32,
// 4096, 128) 0.53x; 13 of the 15 cases past the bound against 256-4k keys ran 1.1-2.0x slower on the
// decode path. Dropout stays on the blocked forward.
constexpr int64_t kDecodeMaxRows = 16;
constexpr int64_t kDecodeWideRows = 64;
constexpr int64_t kDecodeWideMinKeys = 1024;
constexpr int64_t kDecodeWideTileBytes = int64_t(64) << 20;
constexpr int64_t kDecodeWideGroupRows = 256;

template <typename scalar_t>
bool decode_serves(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring) {
  if (scoring.dropout.active()) return false;
  int64_t longest = 0, tile_bytes = 0;
  bool long_keys = true, packed_up_front = false;
  for (const Sequence& seq : problem.sequences) {
    longest = std::max(longest, seq.len_q);
    const int64_t pair_bytes = seq.len_k * (problem.head_dim + problem.value_dim) * int64_t(sizeof(attn_acc_t<scalar_t>));
    tile_bytes += pair_bytes * problem.heads_kv;
    packed_up_front = packed_up_front || pair_bytes > kPairTileBytes;
    if (seq.len_q == 0) continue;
    const auto [lo, hi] = scoring.rules.block_keys(seq, 0, seq.len_q);  // what the rows can see
    if (hi > lo && hi - lo < kDecodeWideMinKeys) long_keys = false;     // (none: no work on either path)
  }
  if (longest <= kDecodeMaxRows) return true;
  if (longest > kDecodeWideRows || !long_keys) return false;
  const int64_t group_rows = problem.heads_q / problem.heads_kv * longest;
  if (group_rows <= (problem.head_dim >= 128 ? 64 : 32)) return true;
  return packed_up_front && tile_bytes >= kDecodeWideTileBytes && group_rows <= kDecodeWideGroupRows;
}

// Where the backward puts gradients of the float mask and of the ALiBi slopes (null when not wanted).
template <typename acc_t>
struct ExtraGradients {
  acc_t* mask = nullptr;         // contiguous, the mask's (unexpanded) shape; see attention_backward.cpp
  int64_t mask_stride[4] = {0, 0, 0, 0};
  int64_t mask_numel = 0;
  bool mask_per_thread = false;  // tasks share mask entries: one partial buffer per thread, summed after
  // The slope and sink gradients sum one term per row of the whole call, and each row's slope term is
  // itself a sum of terms that cancel: all in double up to the end, so that float's rounding of partial
  // sums does not grow with the rows and keys (float32 slope gradient with sinks at 2048 keys: mean
  // relative error 9.4e-7 with float partial sums, 4.6e-7 in double, the float32 reference's 5.5e-7;
  // 2026-12-06 record alibi-slope-gradient.md).
  double* alibi = nullptr;       // (number of sequences, Hq) contiguous: summed to the slopes' shape after
  double* sinks = nullptr;       // (number of sequences, Hq) contiguous: summed over sequences after
};

template <typename scalar_t>
void attention_backward_kernel(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,
                               const Operand<scalar_t>& dout, const Operand<scalar_t>& dq,
                               const Operand<scalar_t>& dk, const Operand<scalar_t>& dv,
                               const ExtraGradients<attn_acc_t<scalar_t>>& extra);

#define FUSED_ATTENTION_DECLARE_ISA(isa)                                                                   \
  namespace isa {                                                                                           \
  template <typename scalar_t>                                                                              \
  void forward(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,             \
               const Operand<scalar_t>& out, attn_acc_t<scalar_t>* lse, const RowIndex& lse_index);        \
  template <typename scalar_t>                                                                              \
  void decode(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,              \
              const Operand<scalar_t>& out, attn_acc_t<scalar_t>* lse, const RowIndex& lse_index);         \
  template <typename scalar_t>                                                                              \
  void backward(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,            \
                const Operand<scalar_t>& dout, const Operand<scalar_t>& dq, const Operand<scalar_t>& dk,   \
                const Operand<scalar_t>& dv, const ExtraGradients<attn_acc_t<scalar_t>>& extra);           \
  }
FUSED_ATTENTION_DECLARE_ISA(baseline)
FUSED_ATTENTION_DECLARE_ISA(avx2)
FUSED_ATTENTION_DECLARE_ISA(avx512)
#undef FUSED_ATTENTION_DECLARE_ISA

namespace amx {  // AMX tiles: only the bfloat16 forward and decode (attention_isa_amx.cpp)
void forward_bf16(const Problem<c10::BFloat16>& problem, const Scoring<float>& scoring,
                  const Operand<c10::BFloat16>& out, float* lse, const RowIndex& lse_index);
void decode_bf16(const Problem<c10::BFloat16>& problem, const Scoring<float>& scoring,
                 const Operand<c10::BFloat16>& out, float* lse, const RowIndex& lse_index);
}

namespace avx512bf16 {  // AVX512-BF16: only the bfloat16 decode (attention_isa_avx512bf16.cpp)
void decode_bf16(const Problem<c10::BFloat16>& problem, const Scoring<float>& scoring,
                 const Operand<c10::BFloat16>& out, float* lse, const RowIndex& lse_index);
}

// The instruction set the kernels run with: the best this CPU supports (but avx512 over avx512bf16 on
// Intel cores, whose vdpbf16ps is slow), or FUSED_ATTENTION_CPU_ISA (baseline, avx2, avx512, avx512bf16,
// amx) if set and supported, so every variant can be tested on one machine. avx512bf16 and amx run the
// avx512 kernels but for their bfloat16 ones.
const char* attention_isa();
const char* attention_isa_reason();  // why that one: the best supported, asked for, or preferred
// Forward calls since the process started that took the decode forward and the blocked forward (tests
// check decode_serves' rule with it).
std::pair<int64_t, int64_t> forward_path_counts();

}  // namespace fused_attention::cpu
