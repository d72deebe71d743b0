// What the KV-cache ops (kvcache_ops.cpp) and their short path (kvcache_plain.cpp) share: the attention over
// caches read where they lie, and the checks of a block table that both run.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace fused_attention::cpu {

// A call's arguments as the ops take them: q (B, Hq, Lq, D), caches (pages, Hkv, page_size, D / Dv).
struct CacheCall {
  const at::Tensor &q, &k_cache, &v_cache;
  const c10::optional<at::Tensor> &block_table, &batch_idx;
  const c10::optional<at::Tensor>& seqlens;  // int (B,); absent: `lengths`, already read (kvcache_plain)
  const std::vector<int64_t>* lengths;
  const c10::optional<at::Tensor> &leftpad, &alibi, &sinks;
  int64_t window_left, window_right;
  double softcap, scale;
};

// out (B, Hq, Lq, Dv), lse (B, Hq, Lq) over keys [key_start, key_stop) of each entry, after appending
// k_new, v_new (B, Hkv, Lnew, D / Dv) when given. Every check runs before the caches are written.
std::tuple<at::Tensor, at::Tensor> attend(const CacheCall& c, const at::Tensor* k_new, const at::Tensor* v_new,
                                          int64_t new_len, int64_t key_start, int64_t key_stop);

// t's values (int (B,)), or `fill` for each entry without t.
std::vector<int64_t> per_entry(const c10::optional<at::Tensor>& t, int64_t batch, int64_t fill);

// The first page of tokens [first, last) whose entry in `row` (a block table's row, holding that many
// pages) lies outside the pool [0, pages), or -1.
template <typename Index>
int64_t page_outside_pool(const Index* row, int64_t first, int64_t last, int64_t page_size, int64_t pages) {
  if (last <= first) return -1;
  for (int64_t p = first / page_size; p <= (last - 1) / page_size; ++p) {
    if (row[p] < 0 || row[p] >= pages) return p;
  }
  return -1;
}

// Whether appending new_len tokens at lengths[b] of each entry would write a cache slot twice: two entries
// whose tables (rows `stride` apart) share the page they append to would overwrite each other's keys (pages
// several entries only read, a shared prefix, are fine).
template <typename Index>
bool appends_collide(const Index* table, int64_t stride, const std::vector<int64_t>& lengths, int64_t new_len,
                     int64_t page_size) {
  std::vector<int64_t> slots;
  slots.reserve(lengths.size() * static_cast<size_t>(std::max<int64_t>(new_len, 0)));
  for (size_t b = 0; b < lengths.size(); ++b) {
    for (int64_t t = lengths[b]; t < lengths[b] + new_len; ++t) {
      slots.push_back(int64_t{table[b * stride + t / page_size]} * page_size + t % page_size);
    }
  }
  std::sort(slots.begin(), slots.end());
  return std::adjacent_find(slots.begin(), slots.end()) != slots.end();
}

}  // namespace fused_attention::cpu
