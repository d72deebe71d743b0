// What the CPU attention kernels compute, shared by forward and backward and by the dense and packed
// (varlen) ops: where each sequence's rows live, which keys a query row sees, how a raw q.k product
// becomes the final score, and the dropout decision of each (row, key).
//
// Semantics are those of fused_attention/kernels/chunked.py (the torch backend): causal is top-left
// (key j visible to query i when j <= i); windows are bottom-right (query i sits at key position
// i + len_k - len_q); key j is visible only below the sequence's key limit (key_lengths); the score is
// scale * q.k, then softcap * tanh(score / softcap), minus slope * |position - j| (ALiBi), plus a float
// mask; a false bool mask entry hides the key. A row with no visible key gives output 0 and lse -inf.
// Learned sinks add exp(sinks[head]) to each row's softmax denominator (a key without value; lse
// includes it, so a row with no visible key then has lse = sinks[head]).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace fused_attention::cpu {

template <typename T>
constexpr T round_up(T value, T multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// A (batch, heads, tokens, features) view through its strides; packed (varlen) tensors use batch 0 and
// a token offset per sequence. A paged one (a KV cache, kvcache_ops.cpp) holds pages of page_size tokens
// at batch_stride apart: token t of batch entry b lies in page pages[b * table_stride + t / page_size].
// Every reader goes through row(), so each kernel reads paged caches in place; only runs of tokens inside
// one page are token_stride apart (adjacent_rows).
template <typename scalar_t>
struct Operand {
  scalar_t* data;
  int64_t batch_stride, head_stride, token_stride, feature_stride;
  const int64_t* pages = nullptr;
  int64_t page_size = 0, table_stride = 0;

  static Operand dense(const at::Tensor& t) {  // (B, H, N, D)
    return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  }
  static Operand packed(const at::Tensor& t) {  // (total, H, D)
    return {t.data_ptr<scalar_t>(), 0, t.stride(1), t.stride(0), t.stride(2)};
  }
  scalar_t* row(int64_t batch, int64_t head, int64_t token) const {
    if (pages) {
      const int64_t page = pages[batch * table_stride + token / page_size];
      return data + page * batch_stride + head * head_stride + token % page_size * token_stride;
    }
    return data + batch * batch_stride + head * head_stride + token * token_stride;
  }
  // How many rows from `token` on lie token_stride apart (the rest of its page).
  int64_t adjacent_rows(int64_t token) const {
    return pages ? page_size - token % page_size : std::numeric_limits<int64_t>::max();
  }
  // fn(first row, offset from token, rows) for each run of rows token_stride apart that covers tokens
  // [token, token + count) of (batch, head): one per page.
  template <typename Fn>
  void for_each_run(int64_t batch, int64_t head, int64_t token, int64_t count, Fn&& fn) const {
    for (int64_t offset = 0; offset < count;) {
      const int64_t run = std::min(count - offset, adjacent_rows(token + offset));
      fn(row(batch, head, token + offset), offset, run);
      offset += run;
    }
  }
};

// One attention problem: a sequence of one batch entry (dense) or one packed sequence (varlen).
struct Sequence {
  int64_t batch;    // batch index into dense operands (0 for packed ones)
  int64_t index;    // sequence number: dense batch index or packed sequence index (ALiBi row, dropout)
  int64_t q_start;  // first query token (0 for dense)
  int64_t k_start;  // first key token (0 for dense)
  int64_t len_q, len_k;
  int64_t key_limit;  // keys at or past it are hidden (key_lengths), else len_k
};

std::vector<Sequence> dense_sequences(int64_t batch, int64_t len_q, int64_t len_k,
                                      const c10::optional<at::Tensor>& key_lengths);
std::vector<Sequence> packed_sequences(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total_q,
                                       int64_t total_k);

struct Rules {
  bool causal;
  int64_t window_left, window_right;  // -1: unbounded
  double softcap, scale, dropout_p;
  uint64_t seed;

  // Half-open interval of keys that query row i of `seq` may see (empty when lo >= hi). Both ends grow
  // with i, so a block of rows [i0, i1) sees at most [keys(i0).first, keys(i1 - 1).second).
  std::pair<int64_t, int64_t> keys(const Sequence& seq, int64_t i) const {
    const int64_t position = i + seq.len_k - seq.len_q;
    int64_t lo = 0, hi = seq.key_limit;
    if (causal) hi = std::min(hi, i + 1);
    if (window_right >= 0) hi = std::min(hi, position + window_right + 1);
    if (window_left >= 0) lo = std::max(lo, position - window_left);
    return {std::max<int64_t>(lo, 0), std::max<int64_t>(std::min(hi, seq.key_limit), 0)};
  }
  std::pair<int64_t, int64_t> block_keys(const Sequence& seq, int64_t i0, int64_t i1) const {
    return {keys(seq, i0).first, keys(seq, i1 - 1).second};
  }
};

// Counter-based dropout: the decision for (sequence, head, row, key) is a hash of the seed and those
// coordinates, so the backward regenerates the forward's mask without storing it, in any order.
struct Dropout {
  uint64_t seed;
  uint32_t threshold;  // keep when the 24-bit uniform is >= threshold
  double keep_scale;   // 1 / (1 - p)

  static Dropout make(const Rules& rules) {
    const double p = rules.dropout_p;
    return {rules.seed, static_cast<uint32_t>(std::ceil(p * double(1 << 24))), p < 1 ? 1.0 / (1.0 - p) : 0.0};
  }
  bool active() const { return threshold > 0; }
  static uint64_t mix(uint64_t x) {  // the splitmix64 finalizer: a bijection with full avalanche
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  }
  uint64_t row_key(int64_t sequence, int64_t head, int64_t row) const {
    return mix(seed ^ mix((uint64_t(sequence) << 40) ^ (uint64_t(head) << 24) ^ uint64_t(row)));
  }
  bool keep(uint64_t row_key, int64_t key) const {
    return uint32_t(mix(row_key + uint64_t(key) * 0x9E3779B97F4A7C15ull) >> 40) >= threshold;
  }
};

// A 4-D mask broadcast through its strides (0 where it broadcasts); bool hides keys, floats add.
struct Mask {
  const void* data = nullptr;
  at::ScalarType dtype = at::kBool;
  int64_t stride[4] = {0, 0, 0, 0};

  static Mask from(const c10::optional<at::Tensor>& mask) {
    Mask m;
    if (!mask) return m;
    m.data = mask->data_ptr();
    m.dtype = mask->scalar_type();
    for (int d = 0; d < 4; ++d) m.stride[d] = mask->size(d) == 1 ? 0 : mask->stride(d);
    return m;
  }
  bool present() const { return data != nullptr; }
  int64_t offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * stride[0] + h * stride[1] + i * stride[2] + j * stride[3];
  }
};

// Everything a kernel needs besides the tensors it reads and writes.
template <typename acc_t>
struct Scoring {
  Rules rules;
  Dropout dropout;
  Mask mask;
  const acc_t* alibi = nullptr;  // (1 or B, Hq) contiguous, in acc_t
  int64_t alibi_batch_stride = 0;
  const acc_t* sinks = nullptr;  // (Hq,) contiguous, in acc_t
  // The backward given each row's lse and delta = rowsum(dO * O) (FlashAttention's interface, for a
  // block of a larger softmax: ring attention): (B, Hq, L) contiguous, in acc_t; null: recomputed.
  const acc_t* row_lse = nullptr;
  const float* row_lse_low = nullptr;  // lse - row_lse where float's spacing at |lse| is too coarse
  const acc_t* row_delta = nullptr;
  int64_t row_batch_stride = 0, row_head_stride = 0;

  acc_t sink(int64_t head) const { return sinks ? sinks[head] : -std::numeric_limits<acc_t>::infinity(); }

  acc_t slope(const Sequence& seq, int64_t head) const {
    return alibi ? alibi[seq.index * alibi_batch_stride + head] : acc_t(0);
  }
};

}  // namespace fused_attention::cpu
