// CPU implementations of fused_attention::attention / attention_backward (dense, canonical inputs) and
// varlen_attention / varlen_attention_backward (packed): tensors to kernel problems and back.
// Inputs arrive canonical from fused_attention/inputs.py; the checks here guard the op boundary.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/attention_direct.h"
#include "cpu/attention_kernels.h"
#include "cpu/op_inputs.h"

namespace fused_attention::cpu {

std::vector<Sequence> dense_sequences(int64_t batch, int64_t len_q, int64_t len_k,
                                      const c10::optional<at::Tensor>& key_lengths) {
  std::vector<Sequence> seqs;
  at::Tensor lengths;
  if (key_lengths) lengths = key_lengths->to(at::kLong).contiguous();
  for (int64_t b = 0; b < batch; ++b) {
    int64_t limit = len_k;
    if (key_lengths) limit = std::clamp<int64_t>(lengths.data_ptr<int64_t>()[b], 0, len_k);
    seqs.push_back({b, b, 0, 0, len_q, len_k, limit});
  }
  return seqs;
}

namespace {

// cu_seqlens are checked here too: under torch.compile (and called as an op) their values reach the
// kernels unchecked by Python, and an offset out of range read and wrote outside q, k, v and out. Returns
// the offsets as a contiguous int64 tensor.
at::Tensor checked_offsets(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.device().is_cpu() && cu.dim() == 1 && cu.numel() >= 1 &&
                  (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              "fused_attention: ", name, " must be a 1-D int32 or int64 CPU tensor with batch + 1 entries, got ",
              cu.scalar_type(), " ", cu.sizes(), " on ", cu.device());
  at::Tensor offsets = cu.to(at::kLong).contiguous();
  const int64_t* x = offsets.data_ptr<int64_t>();
  bool ordered = x[0] == 0;
  for (int64_t b = 0; ordered && b + 1 < offsets.numel(); ++b) ordered = x[b] <= x[b + 1];
  TORCH_CHECK(ordered, "fused_attention: ", name, " must start at 0 and be non-decreasing");
  TORCH_CHECK(x[offsets.numel() - 1] == total, "fused_attention: ", name,
              " must end at the number of packed tokens (", total, "), got ", x[offsets.numel() - 1]);
  return offsets;
}

}  // namespace

std::vector<Sequence> packed_sequences(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total_q,
                                       int64_t total_k) {
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
              "fused_attention: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got ",
              cu_seqlens_q.numel(), " and ", cu_seqlens_k.numel());
  const at::Tensor cq = checked_offsets(cu_seqlens_q, "cu_seqlens_q", total_q);
  const at::Tensor ck = checked_offsets(cu_seqlens_k, "cu_seqlens_k", total_k);
  const int64_t* q = cq.data_ptr<int64_t>();
  const int64_t* k = ck.data_ptr<int64_t>();
  std::vector<Sequence> seqs;
  for (int64_t b = 0; b + 1 < cq.numel(); ++b) {
    seqs.push_back({0, b, q[b], k[b], q[b + 1] - q[b], k[b + 1] - k[b], k[b + 1] - k[b]});
  }
  return seqs;
}

namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims) {
  TORCH_CHECK(q.dim() == dims && k.dim() == dims && v.dim() == dims,
              "fused_attention: q, k, v must be ", dims, "-D, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fused_attention: q, k, v must share a dtype");
  const int64_t head_axis = dims - 2 - (dims == 4 ? 1 : 0);  // (B, H, N, D) or (N, H, D)
  const int64_t hq = q.size(head_axis), hkv = k.size(head_axis);
  // No heads at all is an empty problem (torch returns an empty output), dense or packed.
  const bool empty = hq == 0 && hkv == 0;
  TORCH_CHECK((empty || (hkv > 0 && hq % hkv == 0)) && v.size(head_axis) == hkv,
              "fused_attention: query heads must be a multiple of the key/value heads");
}

template <typename scalar_t>
Problem<scalar_t> dense_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& key_lengths) {
  // Without heads there is no work: no sequences, and one nominal kv head so that group sizes divide.
  const bool no_heads = q.size(1) == 0;
  return {dense_sequences(no_heads ? 0 : q.size(0), q.size(2), k.size(2), key_lengths),
          Operand<scalar_t>::dense(q), Operand<scalar_t>::dense(k), Operand<scalar_t>::dense(v), q.size(1),
          no_heads ? 1 : k.size(1), q.size(3), v.size(3)};
}

template <typename scalar_t>
Problem<scalar_t> packed_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k) {
  std::vector<Sequence> sequences = packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0));
  // Without query heads there is no work (the offsets are still checked): no sequences, and one nominal
  // kv head so that group sizes divide, as in dense_problem.
  const bool no_heads = q.size(1) == 0;
  if (no_heads) sequences.clear();
  return {std::move(sequences), Operand<scalar_t>::packed(q), Operand<scalar_t>::packed(k), Operand<scalar_t>::packed(v),
          q.size(1), no_heads ? 1 : k.size(1), q.size(2), v.size(2)};
}

void check_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!mask) return;
  TORCH_CHECK(mask->dim() == 4, "fused_attention: attn_mask must be canonical 4-D");
  const auto dt = mask->scalar_type();
  TORCH_CHECK(dt == at::kBool || dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "fused_attention: attn_mask must be bool or floating point, got ", dt);
  for (int d = 0; d < 4; ++d) {
    const int64_t full = d == 1 ? q.size(1) : (d == 3 ? -1 : q.size(d));
    TORCH_CHECK(mask->size(d) == 1 || full < 0 || mask->size(d) == full,
                "fused_attention: attn_mask of shape ", mask->sizes(), " does not broadcast");
  }
}

// The upstream gradient's shape (B, Hq, L, Ev) (dense) or (total_q, Hq, Ev) (packed): the kernels read it
// through its strides, unchecked.
void check_dout(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& v, const char* op) {
  const int64_t dims = q.dim();
  bool ok = dout.dim() == dims && dout.size(dims - 1) == v.size(dims - 1);
  for (int64_t d = 0; ok && d < dims - 1; ++d) ok = dout.size(d) == q.size(d);
  TORCH_CHECK(ok, "fused_attention::", op, ": dout must be ", dims == 4 ? "(B, Hq, L, Ev)" : "(total_q, Hq, Ev)",
              ", got ", dout.sizes());
}

// `precise`: lse in float64 for every input dtype, to the precision of each row's sum (RowIndex::low)
// rather than float's spacing at |lse| (what a merge over key blocks needs: ring attention).
template <bool precise>
std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& mask,
                                                 const c10::optional<at::Tensor>& key_lengths,
                                                 const c10::optional<at::Tensor>& alibi,
                                                 const c10::optional<at::Tensor>& seed,
                                                 const c10::optional<at::Tensor>& sinks, bool causal,
                                                 int64_t window_left, int64_t window_right, double softcap,
                                                 double scale, double dropout_p) {
  check_inputs(q, k, v, 4);
  check_mask(mask, q);
  const int64_t batch = q.size(0), heads = q.size(1), len_q = q.size(2);
  at::Tensor out = empty_in_layout_of(q, v.size(3), q.options());
  at::Tensor lse = at::empty({batch, heads, len_q}, q.options().dtype(acc_dtype(q)));
  const bool split = precise && acc_dtype(q) == at::kFloat;
  at::Tensor low = split ? at::empty(lse.sizes(), lse.options()) : at::Tensor();
  const at::Tensor sink_tensor = sink_logits(sinks, heads, acc_dtype(q));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_attention::attention", [&] {
    using acc_t = attn_acc_t<scalar_t>;
    const auto [slope_tensor, slope_stride] = slopes<acc_t>(alibi, acc_dtype(q), batch, heads);
    const Problem<scalar_t> problem = dense_problem<scalar_t>(q, k, v, key_lengths);
    RowIndex rows{heads * len_q, len_q};
    if (split) rows.low = low.data_ptr<float>();
    attention_forward_kernel<scalar_t>(
        problem,
        scoring<acc_t>(slope_tensor, slope_stride, mask, seed, sink_tensor, causal, window_left, window_right,
                       softcap, scale, dropout_p),
        Operand<scalar_t>::dense(out), lse.data_ptr<acc_t>(), rows);
  });
  if constexpr (precise) lse = split ? lse.to(at::kDouble).add_(low) : lse;
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_precise_lse_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const c10::optional<at::Tensor>& mask,
                                                             const c10::optional<at::Tensor>& key_lengths,
                                                             const c10::optional<at::Tensor>& alibi, bool causal,
                                                             int64_t window_left, int64_t window_right,
                                                             double softcap, double scale) {
  return attention_cpu<true>(q, k, v, mask, key_lengths, alibi, c10::nullopt, c10::nullopt, causal, window_left,
                             window_right, softcap, scale, 0.0);
}

// The buffer the kernel adds the float mask's gradient into, and how to turn it into that gradient.
struct MaskGradient {
  at::Tensor buffer;  // (threads or 1, numel of the mask) in the compute dtype
  int64_t stride[4] = {0, 0, 0, 0};
  bool per_thread = false;

  MaskGradient(const at::Tensor& mask, int64_t batch, int64_t heads_kv, at::ScalarType acc) {
    // Tasks are (batch, kv head): they share entries where the mask broadcasts over either.
    per_thread = (mask.size(0) == 1 && batch > 1) || (mask.size(1) == 1 && heads_kv > 1);
    int64_t numel = 1;
    for (int d = 3; d >= 0; --d) {
      stride[d] = mask.size(d) == 1 ? 0 : numel;
      numel *= mask.size(d);
    }
    buffer = at::zeros({per_thread ? at::get_num_threads() : 1, numel}, mask.options().dtype(acc));
  }
  at::Tensor result(const at::Tensor& mask) const { return buffer.sum(0).view(mask.sizes()).to(mask.scalar_type()); }
};

template <typename acc_t>
ExtraGradients<acc_t> extra_gradients(const MaskGradient* mask, const at::Tensor& alibi_buffer,
                                      const at::Tensor& sink_buffer) {
  ExtraGradients<acc_t> extra;
  if (mask) {
    extra.mask = mask->buffer.data_ptr<acc_t>();
    std::copy(mask->stride, mask->stride + 4, extra.mask_stride);
    extra.mask_numel = mask->buffer.size(1);
    extra.mask_per_thread = mask->per_thread;
  }
  if (alibi_buffer.defined()) extra.alibi = alibi_buffer.data_ptr<double>();
  if (sink_buffer.defined()) extra.sinks = sink_buffer.data_ptr<double>();
  return extra;
}

// (sequences, Hq) per-sequence slope gradients -> the slopes' own (1 or B, Hq) shape and dtype.
at::Tensor slope_gradient(const at::Tensor& buffer, const at::Tensor& alibi) {
  return (alibi.size(0) == 1 ? buffer.sum(0, true) : buffer).to(alibi.scalar_type());
}

// The stand-in for a gradient not asked for: a fresh empty tensor per output, since outputs of an op may
// not alias each other (torch.library.opcheck, functionalization).
at::Tensor no_gradient(const at::Tensor& like) { return like.new_empty({0}); }

// (sequences, Hq) per-sequence sink gradients -> the sinks' (Hq,) and dtype; empty when not asked for.
at::Tensor sink_gradient(const at::Tensor& buffer, const c10::optional<at::Tensor>& sinks, const at::Tensor& like) {
  return buffer.defined() ? buffer.sum(0).to(sinks->scalar_type()) : no_gradient(like);
}

// A slope or sink gradient's (sequences, Hq) accumulator, in double (see ExtraGradients); undefined when
// the gradient is not asked for.
at::Tensor head_gradient_buffer(bool need, int64_t sequences, int64_t heads, const at::Tensor& q) {
  return need ? at::zeros({sequences, heads}, q.options().dtype(at::kDouble)) : at::Tensor();
}

at::Tensor sink_buffer(bool need, const c10::optional<at::Tensor>& sinks, int64_t sequences, int64_t heads,
                       const at::Tensor& q) {
  TORCH_CHECK(!need || sinks, "fused_attention: no sinks to differentiate");
  return head_gradient_buffer(need, sequences, heads, q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& key_lengths,
    const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& seed,
    const c10::optional<at::Tensor>& sinks, bool causal, int64_t window_left, int64_t window_right, double softcap,
    double scale, double dropout_p, bool need_mask_grad, bool need_alibi_grad, bool need_sinks_grad) {
  check_inputs(q, k, v, 4);
  check_mask(mask, q);
  TORCH_CHECK(!need_mask_grad || (mask && mask->is_floating_point()), "fused_attention: no float mask to differentiate");
  TORCH_CHECK(!need_alibi_grad || alibi, "fused_attention: no alibi slopes to differentiate");
  const int64_t batch = q.size(0), heads = q.size(1);
  check_dout(dout, q, v, "attention_backward");
  const at::ScalarType acc = acc_dtype(q);
  at::Tensor dq = empty_gradient_of(q), dk = empty_gradient_of(k), dv = empty_gradient_of(v);
  const c10::optional<MaskGradient> mask_grad =
      need_mask_grad ? c10::make_optional(MaskGradient(*mask, batch, k.size(1), acc)) : c10::nullopt;
  const at::Tensor alibi_buffer = head_gradient_buffer(need_alibi_grad, batch, heads, q);
  const at::Tensor sink_tensor = sink_logits(sinks, heads, acc);
  const at::Tensor sinks_buffer = sink_buffer(need_sinks_grad, sinks, batch, heads, q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_attention::attention_backward", [&] {
    using acc_t = attn_acc_t<scalar_t>;
    const auto [slope_tensor, slope_stride] = slopes<acc_t>(alibi, acc, batch, heads);
    const Problem<scalar_t> problem = dense_problem<scalar_t>(q, k, v, key_lengths);
    attention_backward_kernel<scalar_t>(
        problem,
        scoring<acc_t>(slope_tensor, slope_stride, mask, seed, sink_tensor, causal, window_left, window_right,
                       softcap, scale, dropout_p),
        Operand<scalar_t>::dense(dout), Operand<scalar_t>::dense(dq), Operand<scalar_t>::dense(dk),
        Operand<scalar_t>::dense(dv),
        extra_gradients<acc_t>(mask_grad ? &*mask_grad : nullptr, alibi_buffer, sinks_buffer));
  });
  return {dq, dk, dv, mask_grad ? mask_grad->result(*mask) : no_gradient(q),
          need_alibi_grad ? slope_gradient(alibi_buffer, *alibi) : no_gradient(q),
          sink_gradient(sinks_buffer, sinks, q)};
}

// The backward of one block of a larger softmax (ring attention): each row's lse and
// delta = rowsum(dO * O) of the whole softmax are given, so p = exp(score - lse) and dS = p (dp - delta).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_from_stats_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& key_lengths,
    const c10::optional<at::Tensor>& alibi, const at::Tensor& lse, const at::Tensor& delta, bool causal,
    int64_t window_left, int64_t window_right, double softcap, double scale) {
  check_inputs(q, k, v, 4);
  check_mask(mask, q);
  const int64_t batch = q.size(0), heads = q.size(1), len_q = q.size(2);
  const at::ScalarType acc = acc_dtype(q);
  for (const at::Tensor* t : {&lse, &delta}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == heads && t->size(2) == len_q,
                "fused_attention::attention_backward_from_stats: lse and delta must be (B, Hq, L) = (", batch, ", ",
                heads, ", ", len_q, "), got ", t->sizes());
  }
  check_dout(dout, q, v, "attention_backward_from_stats");
  const at::Tensor row_lse = lse.to(acc).contiguous(), row_delta = delta.to(acc).contiguous();
  // A float64 lse (attention_precise_lse's) in float arithmetic: its part below float's spacing too.
  at::Tensor row_lse_low;
  if (acc == at::kFloat && lse.scalar_type() == at::kDouble) {
    const at::Tensor exact = lse.contiguous();
    row_lse_low = at::empty(row_lse.sizes(), row_lse.options());
    const double* e = exact.data_ptr<double>();
    const float* hi = row_lse.data_ptr<float>();
    float* lo = row_lse_low.data_ptr<float>();
    for (int64_t i = 0; i < exact.numel(); ++i) lo[i] = std::isfinite(e[i]) ? static_cast<float>(e[i] - hi[i]) : 0.0f;
  }
  at::Tensor dq = empty_gradient_of(q), dk = empty_gradient_of(k), dv = empty_gradient_of(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_attention::attention_backward_from_stats", [&] {
    using acc_t = attn_acc_t<scalar_t>;
    const auto [slope_tensor, slope_stride] = slopes<acc_t>(alibi, acc, q.size(0), q.size(1));
    Scoring<acc_t> rules = scoring<acc_t>(slope_tensor, slope_stride, mask, c10::nullopt, at::Tensor(), causal,
                                          window_left, window_right, softcap, scale, 0.0);
    rules.row_lse = row_lse.data_ptr<acc_t>();
    rules.row_delta = row_delta.data_ptr<acc_t>();
    if (row_lse_low.defined()) rules.row_lse_low = row_lse_low.data_ptr<float>();
    rules.row_batch_stride = heads * len_q;
    rules.row_head_stride = len_q;
    attention_backward_kernel<scalar_t>(dense_problem<scalar_t>(q, k, v, key_lengths), rules,
                                        Operand<scalar_t>::dense(dout), Operand<scalar_t>::dense(dq),
                                        Operand<scalar_t>::dense(dk), Operand<scalar_t>::dense(dv),
                                        ExtraGradients<acc_t>{});
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                        const at::Tensor& cu_seqlens_k,
                                                        const c10::optional<at::Tensor>& alibi,
                                                        const c10::optional<at::Tensor>& seed,
                                                        const c10::optional<at::Tensor>& sinks, int64_t window_left,
                                                        int64_t window_right, double softcap, double scale,
                                                        double dropout_p) {
  check_inputs(q, k, v, 3);
  const int64_t total = q.size(0), heads = q.size(1);
  const at::Tensor sink_tensor = sink_logits(sinks, heads, acc_dtype(q));
  // Tokens outside every sequence stay 0 (-inf lse), as in the torch backend.
  at::Tensor out = at::zeros({total, heads, v.size(2)}, q.options());
  at::Tensor lse = at::full({heads, total}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_attention::varlen_attention", [&] {
    using acc_t = attn_acc_t<scalar_t>;
    const auto [slope_tensor, slope_stride] = slopes<acc_t>(alibi, acc_dtype(q), cu_seqlens_q.numel() - 1, heads);
    const Problem<scalar_t> problem = packed_problem<scalar_t>(q, k, v, cu_seqlens_q, cu_seqlens_k);
    attention_forward_kernel<scalar_t>(
        problem,
        scoring<acc_t>(slope_tensor, slope_stride, c10::nullopt, seed, sink_tensor, false, window_left, window_right,
                       softcap, scale, dropout_p),
        Operand<scalar_t>::packed(out), lse.data_ptr<acc_t>(), RowIndex{0, total});
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const c10::optional<at::Tensor>& alibi,
    const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& sinks, int64_t window_left,
    int64_t window_right, double softcap, double scale, double dropout_p, bool need_alibi_grad,
    bool need_sinks_grad) {
  check_inputs(q, k, v, 3);
  TORCH_CHECK(!need_alibi_grad || alibi, "fused_attention: no alibi slopes to differentiate");
  check_dout(dout, q, v, "varlen_attention_backward");
  const at::ScalarType acc = acc_dtype(q);
  // (in the inputs' layouts, as the fake's and the other backends' zeros_like)
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const int64_t sequences = cu_seqlens_q.numel() - 1;
  const at::Tensor alibi_buffer = head_gradient_buffer(need_alibi_grad, sequences, q.size(1), q);
  const at::Tensor sink_tensor = sink_logits(sinks, q.size(1), acc);
  const at::Tensor sinks_buffer = sink_buffer(need_sinks_grad, sinks, sequences, q.size(1), q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_attention::varlen_attention_backward", [&] {
    using acc_t = attn_acc_t<scalar_t>;
    const auto [slope_tensor, slope_stride] = slopes<acc_t>(alibi, acc, sequences, q.size(1));
    const Problem<scalar_t> problem = packed_problem<scalar_t>(q, k, v, cu_seqlens_q, cu_seqlens_k);
    attention_backward_kernel<scalar_t>(
        problem,
        scoring<acc_t>(slope_tensor, slope_stride, c10::nullopt, seed, sink_tensor, false, window_left, window_right,
                       softcap, scale, dropout_p),
        Operand<scalar_t>::packed(dout), Operand<scalar_t>::packed(dq), Operand<scalar_t>::packed(dk),
        Operand<scalar_t>::packed(dv), extra_gradients<acc_t>(nullptr, alibi_buffer, sinks_buffer));
  });
  return {dq, dk, dv, need_alibi_grad ? slope_gradient(alibi_buffer, *alibi) : no_gradient(q),
          sink_gradient(sinks_buffer, sinks, q)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> plain_attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        bool causal, double scale) {
  RECORD_FUNCTION("fused_attention::attention_backward", std::vector<c10::IValue>({dout, q, k, v}));
  auto grads = attention_backward_cpu(dout, q, k, v, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                      std::nullopt, causal, -1, -1, 0.0, scale, 0.0, false, false, false);
  return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
}

bool plain_cpu_tensor(const at::Tensor& t) {
  static const c10::DispatchKeySet plain({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                          c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});
  return t.layout() == at::kStrided && plain.isSupersetOf(t.key_set());
}

bool plain_cpu_tensor(const c10::optional<at::Tensor>& t) { return !t.has_value() || plain_cpu_tensor(*t); }

bool calls_intercepted() {
  // The keys a thread includes when something intercepts calls: a dispatch mode, the JIT tracer,
  // functionalization, functorch, the Python dispatcher. Asked key by key through libc10's exported
  // functions: the inline TLS accessor needs a thread-local init symbol that aarch64 builds lack.
  static constexpr c10::DispatchKey intercepting[] = {
      c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::PythonDispatcher,
      c10::DispatchKey::PreDispatch, c10::DispatchKey::Tracer, c10::DispatchKey::Functionalize,
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode,
      c10::DispatchKey::FuncTorchVmapMode, c10::DispatchKey::VmapMode};
  for (const c10::DispatchKey key : intercepting) {
    if (c10::impl::tls_is_dispatch_key_included(key)) return true;
  }
  return false;
}

namespace {

// Whether a direct entry may serve the call: nothing intercepts calls, and every tensor argument (present
// or absent) is a plain CPU tensor. Otherwise the entry declines and the caller takes the dispatcher.
template <typename... Inputs>
bool direct_serves(const Inputs&... inputs) {
  return !calls_intercepted() && (plain_cpu_tensor(inputs) && ...);
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor>> attention_direct(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& key_lengths, const c10::optional<at::Tensor>& alibi,
    const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& sinks, bool causal, int64_t window_left,
    int64_t window_right, double softcap, double scale, double dropout_p) {
  if (!direct_serves(q, k, v, mask, key_lengths, alibi, seed, sinks)) return std::nullopt;
  // profilers still see the call (the inputs are built only when one records them)
  RECORD_FUNCTION("fused_attention::attention", std::vector<c10::IValue>({q, k, v}));
  return attention_cpu<false>(q, k, v, mask, key_lengths, alibi, seed, sinks, causal, window_left, window_right,
                              softcap, scale, dropout_p);
}

std::optional<std::tuple<at::Tensor, at::Tensor>> varlen_direct(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& seed,
    const c10::optional<at::Tensor>& sinks, int64_t window_left, int64_t window_right, double softcap, double scale,
    double dropout_p) {
  if (!direct_serves(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi, seed, sinks)) return std::nullopt;
  RECORD_FUNCTION("fused_attention::varlen_attention", std::vector<c10::IValue>({q, k, v}));
  return varlen_attention_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi, seed, sinks, window_left, window_right,
                              softcap, scale, dropout_p);
}

bool plain_call_serves(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool gqa) {
  // (first: a nested tensor's sizes cannot be asked for)
  if (!plain_cpu_tensor(q) || !plain_cpu_tensor(k) || !plain_cpu_tensor(v)) return false;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  const int64_t heads_q = q.size(1), heads_k = k.size(1), heads_v = v.size(1), head_dim = q.size(3);
  if (k.size(0) != q.size(0) || v.size(0) != q.size(0) || k.size(3) != head_dim || v.size(2) != k.size(2)) {
    return false;
  }
  const bool equal_heads = heads_q == heads_k && heads_k == heads_v;
  if (!equal_heads && !(gqa && heads_k == heads_v && heads_k > 0 && heads_q % heads_k == 0)) return false;
  const at::ScalarType dtype = q.scalar_type();
  if (k.scalar_type() != dtype || v.scalar_type() != dtype ||
      (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf && dtype != at::kDouble)) {
    return false;
  }
  return true;
}

bool plain_call_needs_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
}

double plain_call_scale(const at::Tensor& q, std::optional<double> scale) {
  const int64_t head_dim = q.size(3);
  // (as Python's check_scale: 1 / math.sqrt(E), both correctly rounded)
  return scale ? *scale : head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

std::optional<at::Tensor> attention_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                          std::optional<double> scale) {
  auto result = attention_direct(q, k, v, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, causal,
                                 -1, -1, 0.0, plain_call_scale(q, scale), 0.0);
  if (!result) return std::nullopt;
  return std::get<0>(*result);
}

TORCH_LIBRARY_IMPL(fused_attention, CPU, m) {
  m.impl("attention", &attention_cpu<false>);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_backward_from_stats", &attention_backward_from_stats_cpu);
  m.impl("attention_precise_lse", &attention_precise_lse_cpu);
  m.impl("varlen_attention", &varlen_attention_cpu);
  m.impl("varlen_attention_backward", &varlen_attention_backward_cpu);
}

}  // namespace fused_attention::cpu
