// CPU implementation of fused_attention::kvcache_attention: attention over a KV cache read where it lies,
// contiguous or paged (fused_attention/kvcache/cpu_cache.py). The caches become paged Operands
// (attention_problem.h), so the kernels that serve the regular op read each page in place: the decode
// forward (up to 16 query rows) uses the rows where they lie; the blocked forward beyond packs each
// sequence's keys into its tiles, as for any call. Nothing is gathered first.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/op_inputs.h"

namespace fused_attention::cpu {
namespace {

// Entry b: Lq query rows at cache positions total[b] - Lq + i, keys [begin[b], end[b]) visible (clamped
// to [0, total[b]]). The sequence starts at its first visible key, so the kernels' bottom-right
// positions (i + len_k - len_q) and distances are the cache's, shifted alike.
std::vector<Sequence> cache_sequences(int64_t len_q, const at::Tensor& total, const at::Tensor& begin,
                                      const at::Tensor& end) {
  const at::Tensor t = total.to(at::kLong).contiguous(), lo = begin.to(at::kLong).contiguous();
  const at::Tensor hi = end.to(at::kLong).contiguous();
  std::vector<Sequence> seqs;
  for (int64_t b = 0; b < t.numel(); ++b) {
    const int64_t n = std::max<int64_t>(t.data_ptr<int64_t>()[b], 0);
    const int64_t first = std::clamp<int64_t>(lo.data_ptr<int64_t>()[b], 0, n);
    const int64_t last = std::clamp<int64_t>(hi.data_ptr<int64_t>()[b], first, n);
    seqs.push_back({b, b, 0, first, len_q, n - first, last - first});
  }
  return seqs;
}

// The kernels read tokens [k_start, k_start + len_k) of each entry: their pages must be in the table and
// in the pool (a bad entry would read outside the caches).
void check_pages(const std::vector<Sequence>& seqs, const at::Tensor& table, int64_t page_size, int64_t pages) {
  const int64_t* entries = table.data_ptr<int64_t>();
  for (const Sequence& seq : seqs) {
    if (seq.len_k == 0) continue;
    const int64_t first = seq.k_start / page_size, last = (seq.k_start + seq.len_k - 1) / page_size;
    TORCH_CHECK(last < table.size(1), "fused_attention::kvcache_attention: block_table row ", seq.batch, " has ",
                table.size(1), " pages, ", last + 1, " needed");
    for (int64_t p = first; p <= last; ++p) {
      const int64_t page = entries[seq.batch * table.stride(0) + p];
      TORCH_CHECK(page >= 0 && page < pages, "fused_attention::kvcache_attention: block_table[", seq.batch, ", ", p,
                  "] = ", page, " is outside the page pool [0, ", pages, ")");
    }
  }
}

template <typename scalar_t>
Operand<scalar_t> paged(const at::Tensor& cache, const at::Tensor& table) {  // cache (pages, H, page_size, D)
  Operand<scalar_t> x = Operand<scalar_t>::dense(cache);
  x.pages = table.data_ptr<int64_t>();
  x.page_size = cache.size(2);
  x.table_stride = table.stride(0);
  return x;
}

std::tuple<at::Tensor, at::Tensor> kvcache_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& block_table,
                                                         const at::Tensor& total, const at::Tensor& key_begin,
                                                         const at::Tensor& key_end,
                                                         const c10::optional<at::Tensor>& alibi,
                                                         const c10::optional<at::Tensor>& sinks, int64_t window_left,
                                                         int64_t window_right, double softcap, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "fused_attention::kvcache_attention: q (B, Hq, Lq, D) and caches (pages, Hkv, page_size, D) must be 4-D");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "fused_attention::kvcache_attention: q and the caches must share a dtype");
  const int64_t batch = q.size(0), heads = q.size(1), len_q = q.size(2), heads_kv = k_cache.size(1);
  TORCH_CHECK(heads_kv > 0 && heads % heads_kv == 0 && v_cache.size(1) == heads_kv &&
                  k_cache.size(3) == q.size(3) && v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3),
              "fused_attention::kvcache_attention: caches ", k_cache.sizes(), ", ", v_cache.sizes(),
              " do not match q ", q.sizes());
  TORCH_CHECK(k_cache.size(2) > 0, "fused_attention::kvcache_attention: page_size must be positive");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 2 && block_table.size(0) == batch &&
                  block_table.stride(1) == 1,
              "fused_attention::kvcache_attention: block_table must be int64 (B, pages) with unit row stride");
  for (const at::Tensor* t : {&total, &key_begin, &key_end}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && !t->is_floating_point(),
                "fused_attention::kvcache_attention: lengths must be int (B,)");
  }
  const std::vector<Sequence> seqs = cache_sequences(len_q, total, key_begin, key_end);
  check_pages(seqs, block_table, k_cache.size(2), k_cache.size(0));
  at::Tensor out = at::empty({batch, heads, len_q, v_cache.size(3)}, q.options());
  at::Tensor lse = at::empty({batch, heads, len_q}, q.options().dtype(acc_dtype(q)));
  const at::Tensor sink_tensor = sink_logits(sinks, heads, acc_dtype(q));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_attention::kvcache_attention", [&] {
    using acc_t = attn_acc_t<scalar_t>;
    const auto [slope_tensor, slope_stride] = slopes<acc_t>(alibi, acc_dtype(q));
    const Problem<scalar_t> problem{seqs, Operand<scalar_t>::dense(q), paged<scalar_t>(k_cache, block_table),
                                    paged<scalar_t>(v_cache, block_table), heads, heads_kv, q.size(3),
                                    v_cache.size(3)};
    attention_forward_kernel<scalar_t>(
        problem,
        scoring<acc_t>(slope_tensor, slope_stride, c10::nullopt, c10::nullopt, sink_tensor, false, window_left,
                       window_right, softcap, scale, 0.0),
        Operand<scalar_t>::dense(out), lse.data_ptr<acc_t>(), RowIndex{heads * len_q, len_q});
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, CPU, m) { m.impl("kvcache_attention", &kvcache_attention_cpu); }

}  // namespace fused_attention::cpu
