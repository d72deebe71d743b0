// CPU implementation of fused_attention::kvcache_attention and kvcache_append_attention_: attention over a
// KV cache read where it lies, contiguous or paged (fused_attention/kvcache/cpu_cache.py), the second
// after writing the new keys and values into the caches. The caches become paged Operands
// (attention_problem.h), so the kernels that serve the regular op read each page in place: the decode
// forward (up to 16 query rows) uses the rows where they lie; the blocked forward beyond packs each
// sequence's keys into its tiles, as for any call. Nothing is gathered first.
//
// A decode step's call is short (tens of microseconds at a few hundred keys), so the page table, the
// key ranges and the append are worked out here rather than as tensor ops in Python; its common calls
// skip Python's layers and the dispatcher altogether (kvcache_plain.cpp, through attend).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/kvcache_attend.h"
#include "cpu/op_inputs.h"

namespace fused_attention::cpu {
namespace {

constexpr const char* kOp = "fused_attention::kvcache_attention: ";

// Each entry's pages, int64 (B, pages) with unit-stride rows: the block table of a paged cache, or for a
// contiguous one a single page of S_max keys per entry, its cache row (batch_idx[b], else b).
at::Tensor page_table(const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& batch_idx,
                      int64_t batch) {
  TORCH_CHECK(!(block_table && batch_idx), kOp, "batch_idx cannot be combined with block_table");
  const c10::optional<at::Tensor>& given = block_table ? block_table : batch_idx;
  if (!given) {
    at::Tensor rows = at::empty({batch, 1}, at::kLong);
    std::iota(rows.data_ptr<int64_t>(), rows.data_ptr<int64_t>() + batch, int64_t{0});
    return rows;
  }
  TORCH_CHECK(!given->is_floating_point() && given->dim() == (block_table ? 2 : 1) && given->size(0) == batch, kOp,
              "block_table must be int (B, pages) and batch_idx int (B,), got ", given->sizes());
  at::Tensor table = given->to(at::kLong).contiguous();
  return block_table ? table : table.view({batch, 1});
}

// Entry b: Lq query rows at cache positions total[b] - Lq + i (total = seqlens + new_len), keys
// [max(leftpad[b], key_start), min(total[b], key_stop)) visible. The sequence starts at its first visible
// key, so the kernels' bottom-right positions (i + len_k - len_q) and distances are the cache's, shifted alike.
std::vector<Sequence> cache_sequences(int64_t len_q, const std::vector<int64_t>& seqlens, int64_t new_len,
                                      const std::vector<int64_t>& leftpad, int64_t key_start, int64_t key_stop) {
  std::vector<Sequence> seqs;
  for (int64_t b = 0; b < static_cast<int64_t>(seqlens.size()); ++b) {
    const int64_t n = std::max<int64_t>(seqlens[b] + new_len, 0);
    const int64_t first = std::clamp<int64_t>(std::max(leftpad[b], key_start), 0, n);
    const int64_t last = std::clamp<int64_t>(key_stop, first, n);
    seqs.push_back({b, b, 0, first, len_q, n - first, last - first});
  }
  return seqs;
}

// Tokens [first, last) of entry b must have their pages in the table and in the pool (a bad entry would
// read or write outside the caches).
void check_pages(const at::Tensor& table, int64_t b, int64_t first, int64_t last, int64_t page_size,
                 int64_t pages) {
  if (last <= first) return;
  const int64_t* entries = table.data_ptr<int64_t>() + b * table.stride(0);
  TORCH_CHECK((last - 1) / page_size < table.size(1), kOp, "entry ", b, " needs tokens up to ", last - 1,
              " but its pages hold ", table.size(1) * page_size);
  const int64_t p = page_outside_pool(entries, first, last, page_size, pages);
  TORCH_CHECK(p < 0, kOp, "page ", p, " of entry ", b, " is ", entries[p],
              ", outside the page pool (or cache rows) [0, ", pages, ")");
}

// No cache slot is written twice by an append (appends_collide). Here, not in Python, for the cpu backend:
// a decode step's call is tens of microseconds, and the check there took several tensor ops
// (validate.check_written_once does it for the other paths).
void check_written_once(const at::Tensor& table, const std::vector<int64_t>& seqlens, int64_t new_len,
                        int64_t page_size) {
  TORCH_CHECK_VALUE(!appends_collide(table.data_ptr<int64_t>(), table.stride(0), seqlens, new_len, page_size), kOp,
                    "block_table (or cache_batch_idx): the pages k and v are appended to must belong to one batch "
                    "entry each (a cache slot would be written twice)");
}

template <typename scalar_t>
Operand<scalar_t> paged(const at::Tensor& cache, const at::Tensor& table) {  // cache (pages, H, page_size, D)
  Operand<scalar_t> x = Operand<scalar_t>::dense(cache);
  x.pages = table.data_ptr<int64_t>();
  x.page_size = cache.size(2);
  x.table_stride = table.stride(0);
  return x;
}

// Copies x (B, H, Lnew, D) into the cache at tokens seqlens[b] + i of each entry.
template <typename scalar_t>
void write_rows(const Operand<scalar_t>& cache, const at::Tensor& x, const std::vector<int64_t>& seqlens) {
  const scalar_t* src = x.data_ptr<scalar_t>();
  for (int64_t b = 0; b < x.size(0); ++b) {
    for (int64_t h = 0; h < x.size(1); ++h) {
      for (int64_t i = 0; i < x.size(2); ++i) {
        const scalar_t* from = src + b * x.stride(0) + h * x.stride(1) + i * x.stride(2);
        scalar_t* to = cache.row(b, h, seqlens[b] + i);
        for (int64_t d = 0; d < x.size(3); ++d) to[d * cache.feature_stride] = from[d * x.stride(3)];
      }
    }
  }
}

void check_shapes(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, kOp,
              "q (B, Hq, Lq, D) and caches (pages, Hkv, page_size, D) must be 4-D");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), kOp,
              "q and the caches must share a dtype");
  const int64_t heads = q.size(1), heads_kv = k_cache.size(1);
  TORCH_CHECK(heads_kv > 0 && heads % heads_kv == 0 && v_cache.size(1) == heads_kv &&
                  k_cache.size(3) == q.size(3) && v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3),
              kOp, "caches ", k_cache.sizes(), ", ", v_cache.sizes(), " do not match q ", q.sizes());
  TORCH_CHECK(k_cache.size(2) > 0, kOp, "page_size must be positive");
}

}  // namespace

std::vector<int64_t> per_entry(const c10::optional<at::Tensor>& t, int64_t batch, int64_t fill) {
  if (!t) return std::vector<int64_t>(batch, fill);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && !t->is_floating_point(), kOp, "lengths must be int (B,)");
  const at::Tensor c = t->to(at::kLong).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + batch};
}

std::tuple<at::Tensor, at::Tensor> attend(const CacheCall& c, const at::Tensor* k_new, const at::Tensor* v_new,
                                          int64_t new_len, int64_t key_start, int64_t key_stop) {
  check_shapes(c.q, c.k_cache, c.v_cache);
  const int64_t batch = c.q.size(0), heads = c.q.size(1), len_q = c.q.size(2), heads_kv = c.k_cache.size(1);
  const at::Tensor table = page_table(c.block_table, c.batch_idx, batch);
  const int64_t page_size = c.k_cache.size(2), pages = c.k_cache.size(0);
  const std::vector<int64_t> seqlens = c.lengths ? *c.lengths : per_entry(c.seqlens, batch, 0);
  // Far beyond any cache, and far from int64 overflow in seqlens + new_len (which would hide the write).
  constexpr int64_t kLimit = int64_t{1} << 62;
  TORCH_CHECK(new_len < kLimit, kOp, "new_len ", new_len, " is out of range");
  for (const int64_t n : seqlens) TORCH_CHECK(n > -kLimit && n < kLimit, kOp, "seqlens ", n, " is out of range");
  const std::vector<Sequence> seqs =
      cache_sequences(len_q, seqlens, new_len, per_entry(c.leftpad, batch, 0), key_start, key_stop);
  for (const Sequence& seq : seqs) {
    check_pages(table, seq.batch, seq.k_start, seq.k_start + seq.len_k, page_size, pages);
  }
  if (k_new) {
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(seqlens[b] >= 0, kOp, "seqlens must be >= 0, got ", seqlens[b]);
      check_pages(table, b, seqlens[b], seqlens[b] + new_len, page_size, pages);
    }
    const bool aliased = batch > 0 && c.k_cache.numel() > 0 && c.k_cache.data_ptr() == c.v_cache.data_ptr();
    TORCH_CHECK_VALUE(!aliased, kOp, "k_cache and v_cache must not be the same memory when k and v are appended ",
                      "(the values would overwrite the keys)");
    check_written_once(table, seqlens, new_len, page_size);
  }
  at::Tensor out = empty_in_layout_of(c.q, c.v_cache.size(3), c.q.options());
  at::Tensor lse = at::empty({batch, heads, len_q}, c.q.options().dtype(acc_dtype(c.q)));
  const at::Tensor sink_tensor = sink_logits(c.sinks, heads, acc_dtype(c.q));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.q.scalar_type(), "fused_attention::kvcache_attention", [&] {
    using acc_t = attn_acc_t<scalar_t>;
    const auto [slope_tensor, slope_stride] = slopes<acc_t>(c.alibi, acc_dtype(c.q), batch, heads);
    const Scoring<acc_t> rules = scoring<acc_t>(slope_tensor, slope_stride, c10::nullopt, c10::nullopt, sink_tensor,
                                                false, c.window_left, c.window_right, c.softcap, c.scale, 0.0);
    const Problem<scalar_t> problem{seqs, Operand<scalar_t>::dense(c.q), paged<scalar_t>(c.k_cache, table),
                                    paged<scalar_t>(c.v_cache, table), heads, heads_kv, c.q.size(3),
                                    c.v_cache.size(3)};
    if (k_new) {  // the last step that can fail has run: from here on the call completes
      write_rows(problem.k, *k_new, seqlens);
      write_rows(problem.v, *v_new, seqlens);
    }
    attention_forward_kernel<scalar_t>(problem, rules, Operand<scalar_t>::dense(out), lse.data_ptr<acc_t>(),
                                       RowIndex{heads * len_q, len_q});
  });
  return {out, lse};
}

namespace {

std::tuple<at::Tensor, at::Tensor> kvcache_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& batch_idx,
    const at::Tensor& seqlens, int64_t new_len, const c10::optional<at::Tensor>& leftpad,
    int64_t key_start, int64_t key_stop, const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& sinks,
    int64_t window_left, int64_t window_right, double softcap, double scale) {
  TORCH_CHECK(new_len >= 0, kOp, "new_len must be >= 0");
  const c10::optional<at::Tensor> lengths = seqlens;
  const CacheCall call{q,       k_cache, v_cache, block_table, batch_idx,    lengths, nullptr,
                       leftpad, alibi,   sinks,   window_left, window_right, softcap, scale};
  return attend(call, nullptr, nullptr, new_len, key_start, key_stop);
}

std::tuple<at::Tensor, at::Tensor> kvcache_append_attention_cpu(
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q, const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& batch_idx,
    const at::Tensor& seqlens, const c10::optional<at::Tensor>& leftpad,
    const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& sinks, int64_t window_left,
    int64_t window_right, double softcap, double scale) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == k_cache.size(1) &&
                  k.size(3) == k_cache.size(3) && v.sizes().slice(0, 3) == k.sizes().slice(0, 3) &&
                  v.size(3) == v_cache.size(3),
              kOp, "new keys ", k.sizes(), " and values ", v.sizes(), " must be (B, Hkv, Lnew, D / Dv) of the caches ",
              k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(), kOp,
              "new keys and values must have the caches' dtype");
  const c10::optional<at::Tensor> lengths = seqlens;
  const CacheCall call{q,       k_cache, v_cache, block_table, batch_idx,    lengths, nullptr,
                       leftpad, alibi,   sinks,   window_left, window_right, softcap, scale};
  return attend(call, &k, &v, k.size(2), 0, std::numeric_limits<int64_t>::max());
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, CPU, m) {
  m.impl("kvcache_attention", &kvcache_attention_cpu);
  m.impl("kvcache_append_attention_", &kvcache_append_attention_cpu);
}

}  // namespace fused_attention::cpu
