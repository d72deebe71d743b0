// The dense and packed CPU forwards for a direct call from Python, past the dispatcher (see
// fused_attention/ops/eager.py): a tiny call spends more in the dispatcher's boxing of its 14
// arguments than in the kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <optional>
#include <tuple>

namespace fused_attention::cpu {

// attention's (out, lse), or nullopt when the dispatcher has work to do that this call would skip: a
// dispatch mode, the JIT tracer, functionalization or a functorch transform on this thread, or a tensor
// that is not a plain strided CPU tensor (a Python subclass, a negative or conjugate view, a functorch
// wrapper, sparse, quantized).
std::optional<std::tuple<at::Tensor, at::Tensor>> attention_direct(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& key_lengths, const c10::optional<at::Tensor>& alibi,
    const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& sinks, bool causal, int64_t window_left,
    int64_t window_right, double softcap, double scale, double dropout_p);

// varlen_attention's (out, lse) past the dispatcher, or nullopt where attention_direct would decline.
std::optional<std::tuple<at::Tensor, at::Tensor>> varlen_direct(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& seed,
    const c10::optional<at::Tensor>& sinks, int64_t window_left, int64_t window_right, double softcap, double scale,
    double dropout_p);

// The dispatch keys of a plain strided CPU tensor (any float dtype, inference or not): anything more (a
// Python subclass, a negative or conjugate view, a functorch wrapper, sparse, quantized, nested, another
// device) has the dispatcher do work that a direct call would skip. (An absent optional counts as plain.)
bool plain_cpu_tensor(const at::Tensor& t);
bool plain_cpu_tensor(const c10::optional<at::Tensor>& t);

// Whether something on this thread intercepts calls (a dispatch mode, the JIT tracer, functionalization,
// functorch, the Python dispatcher): then the dispatcher has work that a direct call would skip.
bool calls_intercepted();

// The common call past every Python layer (fused_attention/functional.py): whether attention_plain
// (attention_plain_grad where plain_call_needs_grad) serves q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv,
// S, Ev): plain CPU tensors of one float dtype, heads equal or grouped (gqa). Cheap checks only, no
// kernel: the caller asks while it holds the GIL (a declined call then gives nothing up).
bool plain_call_serves(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool gqa);
bool plain_call_needs_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
// The score scale: `scale`, else 1 / sqrt(E).
double plain_call_scale(const at::Tensor& q, std::optional<double> scale);

// For a call plain_call_serves: the full path's kernel call without mask, dropout or extension (scale:
// 1 / sqrt(E) when absent); its output, or nullopt where attention_direct declines (a dispatch mode,
// the JIT tracer, functorch: the caller then takes the full path).
std::optional<at::Tensor> attention_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                          std::optional<double> scale);

// The same call when q, k or v requires grad (attention_plain_grad.cpp): the output of a C++ autograd
// node, or nullopt where calls_intercepted. Its backward: plain_attention_backward, the attention_backward
// op's kernel with the arguments the Python rule gives it (profilers see it under the op's name).
std::optional<at::Tensor> attention_plain_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               bool causal, std::optional<double> scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> plain_attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        bool causal, double scale);

}  // namespace fused_attention::cpu
