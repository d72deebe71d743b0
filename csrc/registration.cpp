// The one place where fused_attention's C++ op schemas are defined. Device kernels register against
// these names from csrc/cpu and csrc/cuda; fake (meta) and autograd rules are registered from Python
// (fused_attention/_extension.py) once this library has loaded.
#include <pybind11/pybind11.h>
#include <utility>
// pybind11's at::Tensor casters without torch/extension.h, which brings all of libtorch's C++ API (the
// build's slowest file took 35 s with it, 10 s without; it is compiled three times in CI).
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <vector>

#include "cpu/attention_direct.h"
#include "cpu/attention_kernels.h"
#include "cpu/kvcache_plain.h"

// clang-format off: one schema per line reads best.
TORCH_LIBRARY(fused_attention, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // x: (batch, seq, dim), any strides, dim even. Returns x + PE[p] with p = (offsets[b] if given, else
  // offset) + s, PE[p, 2i] = sin(p * base^(-2i/dim)), PE[p, 2i+1] = cos(...). The output has x's stride
  // order (empty_like), so a sequence-first view gives a sequence-first output.
  m.def("add_sinusoidal_position_encoding(Tensor x, Tensor? offsets, int offset, float base) -> Tensor",
        tags);

  // x: (batch, seq, heads, head_dim), any strides. cos, sin: contiguous (table_len, rotary_dim / 2),
  // float32 (float64 for float64 x). positions: int64 (batch, seq), the table row of each token (clamped
  // into the table). Rotates pairs (i, i + rotary_dim / 2), or (2i, 2i + 1) when interleaved, by the
  // token's angle, by minus that angle when conjugate (the backward); features past rotary_dim pass through.
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool conjugate) "
        "-> Tensor",
        tags);
  // rotary, in place on x: the only mutating form.
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool conjugate) "
        "-> ()",
        tags);
  // rotary of q (batch, seq, q_heads, head_dim) and k (batch, seq, k_heads, head_dim) in one pass.
  m.def("rotary_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor positions, bool interleaved, "
        "bool conjugate) -> (Tensor, Tensor)",
        tags);

  // Attention on canonical inputs (fused_attention/inputs.py): q (B, Hq, L, E), k (B, Hkv, S, E),
  // v (B, Hkv, S, Ev), any strides, Hq a multiple of Hkv (GQA); mask 4-D, each dim full or 1 (bool hides,
  // float adds); key_lengths int (B,); alibi (1 or B, Hq); seed int64 (1,), needed when dropout_p > 0.
  // Causal is top-left, windows bottom-right (-1 = unbounded). Returns out (B, Hq, L, Ev) and lse
  // (B, Hq, L) in float32 (float64 for float64 inputs); rows that see no key give 0 and -inf. sinks
  // (Hq,): learned sink logits that join each row's softmax denominator (lse includes them).
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_lengths, Tensor? alibi, "
        "Tensor? seed, Tensor? sinks, bool causal, int window_left, int window_right, float softcap, "
        "float scale, float dropout_p) -> (Tensor, Tensor)",
        tags);
  // Gradients (dq, dk, dv, dmask, dalibi, dsinks) of `attention` for upstream dout (B, Hq, L, Ev); dmask,
  // dalibi and dsinks are empty unless asked for. Recomputes the softmax: no saved activations needed.
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_lengths, "
        "Tensor? alibi, Tensor? seed, Tensor? sinks, bool causal, int window_left, int window_right, "
        "float softcap, float scale, float dropout_p, bool need_mask_grad, bool need_alibi_grad, "
        "bool need_sinks_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        tags);
  // `attention` without dropout or sinks, its lse in float64 for every dtype: to the precision of each
  // row's sum, not float's spacing at |lse| (ring attention merges blocks through it).
  m.def("attention_precise_lse(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_lengths, Tensor? alibi, "
        "bool causal, int window_left, int window_right, float softcap, float scale) -> (Tensor, Tensor)",
        tags);
  // (dq, dk, dv) of one block of a larger softmax, as FlashAttention's backward: lse and
  // delta = rowsum(dO * O) (B, Hq, L) of the whole softmax are given, not recomputed (ring attention); a
  // float64 lse keeps its precision in float arithmetic.
  m.def("attention_backward_from_stats(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? mask, "
        "Tensor? key_lengths, Tensor? alibi, Tensor lse, Tensor delta, bool causal, int window_left, "
        "int window_right, float softcap, float scale) -> (Tensor, Tensor, Tensor)",
        tags);
  // Packed sequences: q (total_q, Hq, E), k/v (total_k, Hkv, E/Ev), cu_seqlens int (n + 1,); windows
  // bottom-right per sequence (causal is window_right = 0). Returns out (total_q, Hq, Ev), lse (Hq, total_q).
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "Tensor? alibi, Tensor? seed, Tensor? sinks, int window_left, int window_right, float softcap, "
        "float scale, float dropout_p) -> (Tensor, Tensor)",
        tags);
  m.def("varlen_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, Tensor? alibi, Tensor? seed, Tensor? sinks, int window_left, int window_right, "
        "float softcap, float scale, float dropout_p, bool need_alibi_grad, bool need_sinks_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        tags);
  // Attention over a KV cache where it lies (forward only): q (B, Hq, Lq, D); caches (pages, Hkv,
  // page_size, D / Dv), any strides, entry b's token t in page block_table[b, t / page_size] (int (B,
  // pages)); without a block table the cache is contiguous, entry b's keys in cache row batch_idx[b]
  // (default b). Entry b holds total[b] = seqlens[b] + new_len keys; query row i sits at position
  // total[b] - Lq + i and sees keys [max(leftpad[b], key_start), min(total[b], key_stop)) within windows
  // measured from it (causal: window_right = 0). Returns out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) as
  // `attention`.
  m.def("kvcache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? block_table, Tensor? batch_idx, "
        "Tensor seqlens, int new_len, Tensor? leftpad, int key_start, int key_stop, Tensor? alibi, Tensor? sinks, "
        "int window_left, int window_right, float softcap, float scale) -> (Tensor, Tensor)",
        tags);
  // kvcache_attention over all keys after writing k (B, Hkv, Lnew, D) and v (B, Hkv, Lnew, Dv) into the
  // caches at tokens seqlens[b] + i (new_len = Lnew): the caches are the only tensors written, and only
  // after every check has passed.
  m.def("kvcache_append_attention_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor q, "
        "Tensor? block_table, Tensor? batch_idx, Tensor seqlens, Tensor? leftpad, Tensor? alibi, Tensor? sinks, "
        "int window_left, int window_right, float softcap, float scale) -> (Tensor, Tensor)",
        tags);
}
// clang-format on

namespace {
// `call`'s (out, lse) with the GIL released (as the dispatcher's Python entry does), or None where it
// declines.
template <typename Call>
pybind11::object without_gil(const Call& call) {
  std::optional<std::tuple<at::Tensor, at::Tensor>> result;
  {
    pybind11::gil_scoped_release no_gil;
    result = call();
  }
  if (!result) return pybind11::none();
  return pybind11::cast(*result);
}
}  // namespace

// Importing fused_attention._C runs the TORCH_LIBRARY registrations above; the module itself only
// reports how it was built, so Python can tell "CUDA kernels not compiled" from "no GPU".
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fused_attention compiled kernels; ops live under torch.ops.fused_attention";
  module.def("cpu_attention_isa", &fused_attention::cpu::attention_isa,
             "Instruction set the CPU attention kernels run with (baseline, avx2, avx512, avx512bf16 or amx)");
  module.def("cpu_attention_isa_reason", &fused_attention::cpu::attention_isa_reason,
             "Why the CPU attention kernels run that instruction set");
  module.def("cpu_forward_path_counts", &fused_attention::cpu::forward_path_counts,
             "(decode, blocked): CPU attention forward calls so far that took each path");
  // The attention ops' CPU forwards past the dispatcher (fused_attention/ops/eager.py); None when the
  // dispatcher has work to do, and then the caller calls the op.
  module.def(
      "attention_direct",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
         const c10::optional<at::Tensor>& key_lengths, const c10::optional<at::Tensor>& alibi,
         const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& sinks, bool causal,
         int64_t window_left, int64_t window_right, double softcap, double scale, double dropout_p) {
        return without_gil([&] {
          return fused_attention::cpu::attention_direct(q, k, v, mask, key_lengths, alibi, seed, sinks, causal,
                                                        window_left, window_right, softcap, scale, dropout_p);
        });
      });
  module.def(
      "varlen_direct",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
         const at::Tensor& cu_seqlens_k, const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& seed,
         const c10::optional<at::Tensor>& sinks, int64_t window_left, int64_t window_right, double softcap,
         double scale, double dropout_p) {
        return without_gil([&] {
          return fused_attention::cpu::varlen_direct(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi, seed, sinks,
                                                     window_left, window_right, softcap, scale, dropout_p);
        });
      });
  // The common call past every Python layer (fused_attention/functional.py): q, k, v plain torch.Tensor
  // objects, is_causal and enable_gqa Python bools, scale None or a float; out, or None for anything
  // else (plain_call_serves' rules, or attention_direct declining), and then the caller takes the full path.
  module.def("attention_plain", [](pybind11::handle q, pybind11::handle k, pybind11::handle v, pybind11::handle causal,
                                   pybind11::handle scale, pybind11::handle gqa) -> pybind11::object {
    const auto is_bool = [](pybind11::handle x) { return x.ptr() == Py_True || x.ptr() == Py_False; };
    if (!THPVariable_CheckExact(q.ptr()) || !THPVariable_CheckExact(k.ptr()) || !THPVariable_CheckExact(v.ptr()) ||
        !is_bool(causal) || !is_bool(gqa) || !(scale.is_none() || PyFloat_CheckExact(scale.ptr()))) {
      return pybind11::none();
    }
    const std::optional<double> scale_value =
        scale.is_none() ? std::nullopt : std::optional<double>(PyFloat_AS_DOUBLE(scale.ptr()));
    // Copies (a reference count each): torch.utils.swap_tensors may swap a tensor object's contents
    // while the GIL is released.
    const at::Tensor q_t = THPVariable_Unpack(q.ptr()), k_t = THPVariable_Unpack(k.ptr()),
                     v_t = THPVariable_Unpack(v.ptr());
    const bool grouped = gqa.ptr() == Py_True;
    if (!fused_attention::cpu::plain_call_serves(q_t, k_t, v_t, grouped)) return pybind11::none();
    const bool needs_grad = fused_attention::cpu::plain_call_needs_grad(q_t, k_t, v_t);
    std::optional<at::Tensor> out;
    {
      pybind11::gil_scoped_release no_gil;  // around the kernel, as the dispatcher's Python entry does
      out = needs_grad ? fused_attention::cpu::attention_plain_grad(q_t, k_t, v_t, causal.ptr() == Py_True, scale_value)
                       : fused_attention::cpu::attention_plain(q_t, k_t, v_t, causal.ptr() == Py_True, scale_value);
    }
    if (!out) return pybind11::none();
    return pybind11::cast(*out);
  });
  // attention_with_kvcache's common call past its Python layers (fused_attention/kvcache/plain_call.py): q,
  // the caches, k and v (or None) plain torch.Tensor objects in the layout `bhsd` says, cache_seqlens None,
  // an int or a tensor, cache_batch_idx, cache_leftpad, block_table, rotary_cos and rotary_sin None or tensors, is_causal, return_lse and
  // rotary_interleaved Python bools, scale None or a float; the window, softcap, ALiBi slopes and sinks as
  // Python's checks canonicalized them; out (with lse when return_lse), or None for anything else
  // (kvcache_plain_lengths' rules), and then the caller takes the full path.
  module.def("kvcache_plain", [](pybind11::handle q, pybind11::handle k_cache, pybind11::handle v_cache,
                                 pybind11::handle k, pybind11::handle v, pybind11::handle seqlens,
                                 pybind11::handle batch_idx, pybind11::handle leftpad,
                                 pybind11::handle block_table, pybind11::handle causal, pybind11::handle scale,
                                 pybind11::handle return_lse, pybind11::handle rotary_cos, pybind11::handle rotary_sin,
                                 pybind11::handle rotary_interleaved, int64_t window_left, int64_t window_right,
                                 double softcap, std::optional<at::Tensor> alibi, std::optional<at::Tensor> sinks,
                                 bool bhsd) -> pybind11::object {
    const auto is_tensor = [](pybind11::handle x) { return THPVariable_CheckExact(x.ptr()); };
    const auto is_bool = [](pybind11::handle x) { return x.ptr() == Py_True || x.ptr() == Py_False; };
    const auto maybe_tensor = [&](pybind11::handle x) { return x.is_none() || is_tensor(x); };
    if (!is_tensor(q) || !is_tensor(k_cache) || !is_tensor(v_cache) || !maybe_tensor(k) || !maybe_tensor(v) ||
        !maybe_tensor(block_table) || !(maybe_tensor(seqlens) || PyLong_CheckExact(seqlens.ptr())) ||
        !maybe_tensor(batch_idx) || !maybe_tensor(leftpad) ||
        !is_bool(causal) || !is_bool(return_lse) || !(scale.is_none() || PyFloat_CheckExact(scale.ptr())) ||
        !maybe_tensor(rotary_cos) || !maybe_tensor(rotary_sin) || !is_bool(rotary_interleaved)) {
      return pybind11::none();
    }
    // Copies (a reference count each): torch.utils.swap_tensors may swap a tensor object's contents
    // while the GIL is released. Views (B, H, S, D) as the ops take them.
    const auto unpack = [&](pybind11::handle x) -> at::Tensor {
      const at::Tensor& t = THPVariable_Unpack(x.ptr());
      return bhsd || t.dim() != 4 ? t : t.transpose(1, 2);
    };
    const auto unpack_maybe = [&](pybind11::handle x) -> std::optional<at::Tensor> {
      if (x.is_none()) return std::nullopt;
      return unpack(x);
    };
    fused_attention::cpu::KVCachePlainCall call{unpack(q), unpack(k_cache), unpack(v_cache), unpack_maybe(k),
                                                unpack_maybe(v)};
    if (PyLong_CheckExact(seqlens.ptr())) {
      int overflow = 0;
      const long long n = PyLong_AsLongLongAndOverflow(seqlens.ptr(), &overflow);
      if (overflow != 0) return pybind11::none();
      call.seqlen = n;
    } else if (!seqlens.is_none()) {
      call.seqlens = THPVariable_Unpack(seqlens.ptr());
    }
    if (!block_table.is_none()) call.block_table = THPVariable_Unpack(block_table.ptr());
    if (!batch_idx.is_none()) call.batch_idx = THPVariable_Unpack(batch_idx.ptr());
    if (!leftpad.is_none()) call.leftpad = THPVariable_Unpack(leftpad.ptr());
    if (!rotary_cos.is_none()) call.rotary_cos = THPVariable_Unpack(rotary_cos.ptr());
    if (!rotary_sin.is_none()) call.rotary_sin = THPVariable_Unpack(rotary_sin.ptr());
    call.rotary_interleaved = rotary_interleaved.ptr() == Py_True;
    call.window_left = window_left;
    call.window_right = window_right;
    call.softcap = softcap;
    call.alibi = std::move(alibi);
    call.sinks = std::move(sinks);
    call.causal = causal.ptr() == Py_True;
    if (!scale.is_none()) call.scale = PyFloat_AS_DOUBLE(scale.ptr());
    const std::optional<std::vector<int64_t>> lengths = fused_attention::cpu::kvcache_plain_lengths(call);
    if (!lengths) return pybind11::none();
    std::tuple<at::Tensor, at::Tensor> result;
    {
      pybind11::gil_scoped_release no_gil;  // around the kernel, as the dispatcher's Python entry does
      result = fused_attention::cpu::kvcache_plain(call, *lengths);
      if (!bhsd) std::get<0>(result) = std::get<0>(result).transpose(1, 2).contiguous();  // (B, Lq, Hq, Dv)
    }
    if (return_lse.ptr() == Py_True) return pybind11::cast(result);
    return pybind11::cast(std::get<0>(result));
  });
#ifdef FUSED_ATTENTION_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
