// Turning an op's optional tensors and flags into what the CPU kernels read (Scoring): shared by the
// attention ops (attention_ops.cpp) and the KV-cache op (kvcache_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <utility>

#include "cpu/attention_kernels.h"

namespace fused_attention::cpu {

inline at::ScalarType acc_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// An empty (B, H, N, last) tensor laid out as `like` (B, H, N, *): (B, N, H, last) in memory, transposed,
// where like's heads lie closer together than its tokens (q, k, v viewed from a (B, N, H * D) projection
// and transposed, as models make them; FlashAttention's layout), else contiguous. Models then undo the
// transpose with .transpose(1, 2).contiguous() (or a view, for gradients), which costs nothing: torch's
// CPU flash kernel returns (B, N, H, D) memory for the same reason. The same rule in Python:
// fused_attention/kernels/layout.py (the other backends and the ops' fake tensors).
inline at::Tensor empty_in_layout_of(const at::Tensor& like, int64_t last, const at::TensorOptions& options) {
  const int64_t batch = like.size(0), heads = like.size(1), tokens = like.size(2);
  if (heads > 1 && tokens > 1 && like.stride(1) < like.stride(2)) {
    return at::empty({batch, tokens, heads, last}, options).transpose(1, 2);
  }
  return at::empty({batch, heads, tokens, last}, options);
}
// A gradient for `like`, in its layout.
inline at::Tensor empty_gradient_of(const at::Tensor& like) { return empty_in_layout_of(like, like.size(3), like.options()); }

// Float copy of the slopes (1 or `rows`, Hq) and the stride between their rows (rows: the batch, or the
// packed sequences). The kernels index them by (row, head) unchecked: the shape is checked here.
template <typename acc_t>
std::pair<at::Tensor, int64_t> slopes(const c10::optional<at::Tensor>& alibi, at::ScalarType acc, int64_t rows,
                                      int64_t heads) {
  if (!alibi) return {at::Tensor(), 0};
  TORCH_CHECK(alibi->dim() == 2 && (alibi->size(0) == 1 || alibi->size(0) == rows) && alibi->size(1) == heads,
              "fused_attention: alibi slopes must be canonical (1 or ", rows, ", ", heads, "), got ", alibi->sizes());
  at::Tensor s = alibi->to(acc).contiguous();
  return {s, s.size(0) == 1 ? 0 : s.size(1)};
}

// (Hq,) sink logits in the compute dtype, contiguous (undefined without sinks).
inline at::Tensor sink_logits(const c10::optional<at::Tensor>& sinks, int64_t heads, at::ScalarType acc) {
  if (!sinks) return at::Tensor();
  TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == heads, "fused_attention: sinks must be (Hq,), got ",
              sinks->sizes());
  return sinks->to(acc).contiguous();
}

template <typename acc_t>
Scoring<acc_t> scoring(const at::Tensor& alibi, int64_t alibi_stride, const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& seed, const at::Tensor& sinks, bool causal,
                       int64_t window_left, int64_t window_right, double softcap, double scale, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0 && dropout_p <= 1, "fused_attention: dropout_p must be in [0, 1]");
  TORCH_CHECK(dropout_p == 0 || seed.has_value(), "fused_attention: dropout needs a seed");
  const uint64_t seed_value = seed ? static_cast<uint64_t>(seed->to(at::kLong).item<int64_t>()) : 0;
  Scoring<acc_t> s;
  s.rules = {causal, window_left, window_right, softcap, scale, dropout_p, seed_value};
  s.dropout = Dropout::make(s.rules);
  s.mask = Mask::from(mask);
  s.alibi = alibi.defined() ? alibi.data_ptr<acc_t>() : nullptr;
  s.alibi_batch_stride = alibi_stride;
  s.sinks = sinks.defined() ? sinks.data_ptr<acc_t>() : nullptr;
  return s;
}

}  // namespace fused_attention::cpu
