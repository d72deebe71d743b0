// attention_with_kvcache's common CPU call past its Python layers and the dispatcher (kvcache_plain.h): the
// checks of the full path (fused_attention/kvcache/validate.py, the ops' own) as a yes/no, then the calls
// the full path makes (rotate_new's rotary kernels, the ops' attend).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "cpu/attention_direct.h"
#include "cpu/kvcache_attend.h"
#include "cpu/kvcache_plain.h"
#include "cpu/rotary_ops.h"

namespace fused_attention::cpu {
namespace {

// Lengths and capacities past this are refused by attend (far from int64 overflow in lengths + new_len).
constexpr int64_t kLimit = int64_t{1} << 62;

// Whether the block table (int32 (B, pages)) holds every page in use inside the pool and no append writes a
// slot twice: check_pages and check_written_once of the ops, as a yes/no. `lengths` lie within capacity.
bool pages_ok(const at::Tensor& table, const std::vector<int64_t>& lengths, int64_t new_len, int64_t page_size,
              int64_t pages) {
  const at::Tensor entries = table.contiguous();
  const int32_t* rows = entries.data_ptr<int32_t>();
  const int64_t columns = entries.size(1);
  for (size_t b = 0; b < lengths.size(); ++b) {
    if (page_outside_pool(rows + b * columns, 0, lengths[b] + new_len, page_size, pages) >= 0) return false;
  }
  return !appends_collide(rows, columns, lengths, new_len, page_size);
}

// Whether the RoPE tables serve the call as the full path checks them: float (S_ro, R / 2) tables of one
// shape, 2 R <= D, rows for every rotated position (new keys at lengths[b] + i, query rows there too when
// in order, else at lengths[b]).
bool tables_ok(const KVCachePlainCall& c, const std::vector<int64_t>& lengths, int64_t new_len) {
  const at::Tensor &cos = *c.rotary_cos, &sin = *c.rotary_sin;
  for (const at::Tensor* t : {&cos, &sin}) {
    if (!plain_cpu_tensor(*t) || !t->is_floating_point() || t->dim() != 2 ||
        (c10::GradMode::is_enabled() && t->requires_grad())) {
      return false;
    }
  }
  const int64_t rows = c.rows_in_order() ? c.q.size(2) : 1;
  const int64_t last = *std::max_element(lengths.begin(), lengths.end()) + std::max(new_len, rows);
  return cos.sizes() == sin.sizes() && cos.size(1) >= 1 && 2 * cos.size(1) <= c.q.size(3) && last <= cos.size(0);
}

// (q, k) rotated as rotate_new (fused_attention/kvcache/append.py) does: new key i of entry b at position
// lengths[b] + i, query row i there too when in order (a one-row step's only row, at lengths[b], either
// way), else every query row at lengths[b]; in the op's (B, H, L, D) views, new tensors.
std::pair<at::Tensor, at::Tensor> rotated(const KVCachePlainCall& c, const std::vector<int64_t>& lengths) {
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
  if (len_q == new_len && (len_q == 1 || c.rows_in_order())) {
    RECORD_FUNCTION("fused_attention::rotary_qk", std::vector<c10::IValue>({q, k}));
    auto [q_rot, k_rot] = rotary_qk(q, k, cos, sin, k_positions, c.rotary_interleaved, false);
    return {q_rot.transpose(1, 2), k_rot.transpose(1, 2)};
  }
  const auto rotate = [&](const at::Tensor& x, const at::Tensor& at) {
    RECORD_FUNCTION("fused_attention::rotary", std::vector<c10::IValue>({x}));
    return rotary(x, cos, sin, at, c.rotary_interleaved, false).transpose(1, 2);
  };
  return {rotate(q, positions(len_q, c.rows_in_order())), rotate(k, k_positions)};
}

}  // namespace

std::optional<std::vector<int64_t>> kvcache_plain_lengths(const KVCachePlainCall& c) {
  // (and not below ADInplaceOrView, where the op would not bump the caches' versions)
  if (calls_intercepted() || c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::ADInplaceOrView)) {
    return std::nullopt;
  }
  const bool append = c.k.has_value();
  if (append != c.v.has_value() || c.rotary_cos.has_value() != c.rotary_sin.has_value()) return std::nullopt;
  for (const at::Tensor* t : {&c.q, &c.k_cache, &c.v_cache}) {
    if (!plain_cpu_tensor(*t) || t->dim() != 4) return std::nullopt;
  }
  if (!plain_cpu_tensor(c.k) || !plain_cpu_tensor(c.v) || !plain_cpu_tensor(c.seqlens) ||
      !plain_cpu_tensor(c.block_table) || !plain_cpu_tensor(c.alibi) || !plain_cpu_tensor(c.sinks) ||
      !plain_cpu_tensor(c.batch_idx) || !plain_cpu_tensor(c.leftpad)) {
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
  const auto int_vector = [&](const at::Tensor& t) {
    return (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong) && t.dim() == 1 && t.size(0) == batch;
  };
  if ((c.batch_idx && (c.block_table || !int_vector(*c.batch_idx))) || (c.leftpad && !int_vector(*c.leftpad))) {
    return std::nullopt;
  }
  int64_t capacity = page_size;
  if (c.block_table) {
    const at::Tensor& table = *c.block_table;
    if (table.scalar_type() != at::kInt || table.dim() != 2 || table.size(0) != batch ||
        table.size(1) >= kLimit / page_size) {
      return std::nullopt;
    }
    capacity = table.size(1) * page_size;
  } else if (!c.batch_idx && c.k_cache.size(0) != batch) {
    return std::nullopt;
  }
  if (capacity >= kLimit || new_len >= kLimit) return std::nullopt;
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
  // (the op refuses one tensor as both caches whenever k is given, Lnew = 0 too)
  if (append && c.k_cache.numel() > 0 && c.k_cache.data_ptr() == c.v_cache.data_ptr()) return std::nullopt;
  if (c.block_table && !pages_ok(*c.block_table, lengths, new_len, page_size, c.k_cache.size(0))) {
    return std::nullopt;
  }
  if (c.batch_idx) {  // cache rows inside the cache, none named twice when appending (validate.py's rule)
    std::vector<int64_t> rows = per_entry(c.batch_idx, batch, 0);
    for (const int64_t r : rows) {
      if (r < 0 || r >= c.k_cache.size(0)) return std::nullopt;
    }
    std::sort(rows.begin(), rows.end());
    if (new_len > 0 && std::adjacent_find(rows.begin(), rows.end()) != rows.end()) return std::nullopt;
  }
  if (c.leftpad) {  // 0 <= leftpad[b] <= cache_seqlens[b]
    const std::vector<int64_t> pads = per_entry(c.leftpad, batch, 0);
    for (int64_t b = 0; b < batch; ++b) {
      if (pads[b] < 0 || pads[b] > lengths[b]) return std::nullopt;
    }
  }
  if (append && c.rotary_cos && !tables_ok(c, lengths, new_len)) return std::nullopt;  // (unused without an append)
  return lengths;
}

std::tuple<at::Tensor, at::Tensor> kvcache_plain(const KVCachePlainCall& c, const std::vector<int64_t>& lengths) {
  // (as Python's check_scale: 1 / math.sqrt(D), both correctly rounded)
  const double scale = c.scale ? *c.scale : 1.0 / std::sqrt(static_cast<double>(c.q.size(3)));
  const c10::optional<at::Tensor> none, table = c.block_table;
  constexpr int64_t kAll = std::numeric_limits<int64_t>::max();
  // visible_window: causal folds into the right edge (at most 0)
  const int64_t left = c.window_left, right = c.causal ? (c.window_right < 0 ? 0 : std::min<int64_t>(c.window_right, 0))
                                                       : c.window_right;
  const c10::optional<at::Tensor> alibi = c.alibi, sinks = c.sinks, rows = c.batch_idx, leftpad = c.leftpad;
  if (!c.k) {
    const CacheCall call{c.q,     c.k_cache, c.v_cache, table, rows,  none,      &lengths,
                         leftpad, alibi,     sinks,     left,  right, c.softcap, scale};
    RECORD_FUNCTION("fused_attention::kvcache_attention", std::vector<c10::IValue>({c.q, c.k_cache, c.v_cache}));
    return attend(call, nullptr, nullptr, 0, 0, kAll);
  }
  const auto [q, k] = c.rotary_cos ? rotated(c, lengths) : std::pair<at::Tensor, at::Tensor>{c.q, *c.k};
  const CacheCall call{q,       c.k_cache, c.v_cache, table, rows,  none,      &lengths,
                       leftpad, alibi,     sinks,     left,  right, c.softcap, scale};
  RECORD_FUNCTION("fused_attention::kvcache_append_attention_",
                  std::vector<c10::IValue>({c.k_cache, c.v_cache, k, *c.v, q}));
  auto result = attend(call, &k, &*c.v, k.size(2), 0, kAll);
  for (const at::Tensor* t : {&c.k_cache, &c.v_cache}) {  // as the op's ADInplaceOrView kernel (bump_written)
    if (!t->is_inference()) torch::autograd::impl::bump_version(*t);
  }
  return result;
}

}  // namespace fused_attention::cpu
