// CPU implementation of fused_attention::kvcache_attention and kvcache_append_attention_: attention over a
// KV cache read where it lies, contiguous or paged (fused_attention/kvcache/cpu_cache.py), the second
// after writing the new keys and values into the caches. The caches become paged Operands
// (attention_problem.h), so the kernels that serve the regular op read each page in place: the decode
// forward (up to 16 query rows) uses the rows where they lie; the blocked forward beyond packs each
// sequence's keys into its tiles, as for any call. Nothing is gathered first.
//
// A decode step's call is short (tens of microseconds at a few hundred keys), so the page table, the
// key ranges and the append are worked out here rather than as tensor ops in Python.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu/attention_direct.h"
#include "cpu/attention_kernels.h"
#include "cpu/kvcache_plain.h"
#include "cpu/op_inputs.h"
#include "cpu/rotary_ops.h"

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

std::vector<int64_t> per_entry(const c10::optional<at::Tensor>& t, int64_t batch, int64_t fill) {
  if (!t) return std::vector<int64_t>(batch, fill);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && !t->is_floating_point(), kOp, "lengths must be int (B,)");
  const at::Tensor c = t->to(at::kLong).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + batch};
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
  for (int64_t p = first / page_size; p <= (last - 1) / page_size; ++p) {
    TORCH_CHECK(entries[p] >= 0 && entries[p] < pages, kOp, "page ", p, " of entry ", b, " is ", entries[p],
                ", outside the page pool (or cache rows) [0, ", pages, ")");
  }
}

// No cache slot is written twice by an append: two entries whose tables share the page they append to
// would overwrite each other's keys (pages several entries only read, a shared prefix, are fine). Here,
// not in Python, for the cpu backend: a decode step's call is tens of microseconds, and the check there
// took several tensor ops (validate.check_written_once does it for the other paths).
void check_written_once(const at::Tensor& table, const std::vector<int64_t>& seqlens, int64_t new_len,
                        int64_t page_size) {
  const int64_t* entries = table.data_ptr<int64_t>();
  std::vector<int64_t> slots;
  slots.reserve(seqlens.size() * static_cast<size_t>(new_len));
  for (size_t b = 0; b < seqlens.size(); ++b) {
    for (int64_t t = seqlens[b]; t < seqlens[b] + new_len; ++t) {
      slots.push_back(entries[b * table.stride(0) + t / page_size] * page_size + t % page_size);
    }
  }
  std::sort(slots.begin(), slots.end());
  TORCH_CHECK_VALUE(std::adjacent_find(slots.begin(), slots.end()) == slots.end(), kOp,
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

// Whether a written-once append over `table` (int32 (B, pages) here) would write a slot twice, or a page in
// use lies outside the pool: the full path's checks (check_pages, check_written_once) as a yes/no.
bool plain_pages_ok(const at::Tensor& table, const std::vector<int64_t>& lengths, int64_t new_len, int64_t page_size,
                    int64_t pages) {
  const at::Tensor entries = table.contiguous();
  const int32_t* rows = entries.data_ptr<int32_t>();
  const int64_t columns = entries.size(1);
  std::vector<int64_t> slots;
  for (size_t b = 0; b < lengths.size(); ++b) {
    const int32_t* row = rows + b * columns;
    const int64_t used = (lengths[b] + new_len + page_size - 1) / page_size;  // <= columns (lengths within capacity)
    for (int64_t p = 0; p < used; ++p) {
      if (row[p] < 0 || row[p] >= pages) return false;
    }
    for (int64_t t = lengths[b]; t < lengths[b] + new_len; ++t) slots.push_back(row[t / page_size] * page_size + t % page_size);
  }
  std::sort(slots.begin(), slots.end());
  return std::adjacent_find(slots.begin(), slots.end()) == slots.end();
}

}  // namespace

std::optional<std::vector<int64_t>> kvcache_plain_lengths(const KVCachePlainCall& c) {
  if (calls_intercepted()) return std::nullopt;
  const bool append = c.k.has_value();
  if (append != c.v.has_value()) return std::nullopt;
  for (const at::Tensor* t : {&c.q, &c.k_cache, &c.v_cache}) {
    if (!plain_cpu_tensor(*t) || t->dim() != 4) return std::nullopt;
  }
  if (!plain_cpu_tensor(c.k) || !plain_cpu_tensor(c.v) || !plain_cpu_tensor(c.seqlens) ||
      !plain_cpu_tensor(c.block_table)) {
    return std::nullopt;
  }
  const at::ScalarType dtype = c.q.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf && dtype != at::kDouble) return std::nullopt;
  if (c.k_cache.scalar_type() != dtype || c.v_cache.scalar_type() != dtype) return std::nullopt;
  if (append && (c.k->dim() != 4 || c.v->dim() != 4 || c.k->scalar_type() != dtype || c.v->scalar_type() != dtype)) {
    return std::nullopt;
  }
  if (c10::GradMode::is_enabled() && (c.q.requires_grad() || c.k_cache.requires_grad() || c.v_cache.requires_grad() ||
                                      (append && (c.k->requires_grad() || c.v->requires_grad())))) {
    return std::nullopt;  // (the full path raises: forward only)
  }
  const int64_t batch = c.q.size(0), heads = c.q.size(1), dim = c.q.size(3);
  const int64_t heads_kv = c.k_cache.size(1), page_size = c.k_cache.size(2);
  if (batch < 1 || c.q.size(2) < 1 || dim < 1 || page_size < 1 || heads_kv < 1 || heads % heads_kv != 0 ||
      c.k_cache.size(3) != dim || c.v_cache.sizes().slice(0, 3) != c.k_cache.sizes().slice(0, 3)) {
    return std::nullopt;
  }
  const int64_t new_len = append ? c.k->size(2) : 0;
  if (append && (c.k->sizes() != at::IntArrayRef({batch, heads_kv, new_len, dim}) ||
                 c.v->sizes() != at::IntArrayRef({batch, heads_kv, new_len, c.v_cache.size(3)}))) {
    return std::nullopt;
  }
  int64_t capacity = page_size;
  if (c.block_table) {
    const at::Tensor& table = *c.block_table;
    if (table.scalar_type() != at::kInt || table.dim() != 2 || table.size(0) != batch) return std::nullopt;
    capacity = table.size(1) * page_size;
  } else if (c.k_cache.size(0) != batch) {
    return std::nullopt;
  }
  std::vector<int64_t> lengths;
  if (c.seqlens) {
    const at::Tensor& t = *c.seqlens;
    if ((t.scalar_type() != at::kInt && t.scalar_type() != at::kLong) || t.dim() != 1 || t.size(0) != batch) {
      return std::nullopt;
    }
    lengths = per_entry(t, batch, 0);
  } else {
    lengths.assign(batch, c.seqlen.value_or(capacity));
  }
  for (const int64_t n : lengths) {
    if (n < 0 || n > capacity - new_len) return std::nullopt;
  }
  if (append && new_len > 0 && c.k_cache.numel() > 0 && c.k_cache.data_ptr() == c.v_cache.data_ptr()) {
    return std::nullopt;
  }
  if (c.block_table && !plain_pages_ok(*c.block_table, lengths, new_len, page_size, c.k_cache.size(0))) {
    return std::nullopt;
  }
  if (c.rotary_cos.has_value() != c.rotary_sin.has_value()) return std::nullopt;
  if (append && c.rotary_cos) {  // (without an append the tables are not used, nor checked)
    const at::Tensor &cos = *c.rotary_cos, &sin = *c.rotary_sin;
    for (const at::Tensor* t : {&cos, &sin}) {
      if (!plain_cpu_tensor(*t) || !t->is_floating_point() || t->dim() != 2 ||
          (c10::GradMode::is_enabled() && t->requires_grad())) {
        return std::nullopt;
      }
    }
    const int64_t rows = c.causal ? c.q.size(2) : 1;  // query rows rotated at their own positions
    const int64_t last = *std::max_element(lengths.begin(), lengths.end()) + std::max(new_len, rows);
    if (cos.sizes() != sin.sizes() || cos.size(1) < 1 || 2 * cos.size(1) > dim || last > cos.size(0)) {
      return std::nullopt;
    }
  }
  return lengths;
}

namespace {

// (q, k) rotated as rotate_new (fused_attention/kvcache/append.py) does: new key i of entry b at position
// lengths[b] + i, query row i there too when causal (a one-row step's only row, at lengths[b], either
// way), else every query row at lengths[b]; in the op's (B, H, L, D) views, new tensors.
std::pair<at::Tensor, at::Tensor> plain_rotary(const KVCachePlainCall& c, const std::vector<int64_t>& lengths) {
  const at::ScalarType table_type = c.q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cos = c.rotary_cos->to(table_type).contiguous(), sin = c.rotary_sin->to(table_type).contiguous();
  const at::Tensor q = c.q.transpose(1, 2), k = c.k->transpose(1, 2);  // (B, L, H, D), as the rotary ops take them
  const int64_t batch = q.size(0), len_q = q.size(1), new_len = k.size(1);
  const auto positions = [&](int64_t len, bool in_order) {
    at::Tensor p = at::empty({batch, len}, at::kLong);
    int64_t* at = p.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < len; ++i) at[b * len + i] = lengths[b] + (in_order ? i : 0);
    }
    return p;
  };
  const at::Tensor k_positions = positions(new_len, true);
  if (len_q == new_len && (len_q == 1 || c.causal)) {
    auto [q_rot, k_rot] = rotary_qk(q, k, cos, sin, k_positions, c.rotary_interleaved, false);
    return {q_rot.transpose(1, 2), k_rot.transpose(1, 2)};
  }
  const at::Tensor q_rot = rotary(q, cos, sin, positions(len_q, c.causal), c.rotary_interleaved, false);
  const at::Tensor k_rot = rotary(k, cos, sin, k_positions, c.rotary_interleaved, false);
  return {q_rot.transpose(1, 2), k_rot.transpose(1, 2)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_plain(const KVCachePlainCall& c, const std::vector<int64_t>& lengths) {
  // (as Python's check_scale: 1 / math.sqrt(D), both correctly rounded)
  const double scale = c.scale ? *c.scale : 1.0 / std::sqrt(static_cast<double>(c.q.size(3)));
  const c10::optional<at::Tensor> none, table = c.block_table;
  constexpr int64_t kAll = std::numeric_limits<int64_t>::max();
  if (!c.k) {
    // visible_window: causal leaves (-1, 0)
    const CacheCall call{c.q,  c.k_cache, c.v_cache, table, none,  none, &lengths,
                         none, none,      none,      -1,    c.causal ? 0 : -1, 0.0, scale};
    RECORD_FUNCTION("fused_attention::kvcache_attention", std::vector<c10::IValue>({c.q, c.k_cache, c.v_cache}));
    return attend(call, nullptr, nullptr, 0, 0, kAll);
  }
  const auto [q, k] = c.rotary_cos ? plain_rotary(c, lengths) : std::pair<at::Tensor, at::Tensor>{c.q, *c.k};
  const CacheCall call{q,    c.k_cache, c.v_cache, table, none,  none, &lengths,
                       none, none,      none,      -1,    c.causal ? 0 : -1, 0.0, scale};
  RECORD_FUNCTION("fused_attention::kvcache_append_attention_", std::vector<c10::IValue>({c.k_cache, c.v_cache, q}));
  auto result = attend(call, &k, &*c.v, k.size(2), 0, kAll);
  for (const at::Tensor* t : {&c.k_cache, &c.v_cache}) {
    if (!t->is_inference()) torch::autograd::impl::bump_version(*t);
  }
  return result;
}

TORCH_LIBRARY_IMPL(fused_attention, CPU, m) {
  m.impl("kvcache_attention", &kvcache_attention_cpu);
  m.impl("kvcache_append_attention_", &kvcache_append_attention_cpu);
}

}  // namespace fused_attention::cpu
