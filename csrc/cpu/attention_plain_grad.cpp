// The short path's call when q, k or v requires grad (see attention_direct.h): a C++ autograd node in
// place of the Python layer's autograd.Function (fused_attention/ops/eager.py), which cost a tiny call
// ~25 us. The same kernels both ways: the forward through attention_direct (the profiler sees it), the
// backward through the dispatcher's attention_backward with the arguments the Python rule gives it
// (fused_attention/ops/attention_rules.py, dense_autograd_rules), so gradients are equal bit for bit.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <tuple>

#include "cpu/attention_direct.h"

namespace fused_attention::cpu {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (named, not anonymous: grad_fn.name() reads torch::autograd::CppNode<fused_attention::cpu::PlainAttention>)
struct PlainAttention : public torch::autograd::Function<PlainAttention> {
  // The backward reads only saved tensors, a bool, a double and a registered op with a fake kernel:
  // compiled autograd may trace it (torch 2.6 refuses to run an untraceable C++ node under it).
  static constexpr bool is_traceable = true;

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            bool causal, double scale) {
    ctx->save_for_backward({q, k, v});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    // (the caller checked calls_intercepted and the tensors: attention_direct serves the call)
    return std::get<0>(attention_direct(q, k, v, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                        causal, -1, -1, 0.0, scale, 0.0)
                           .value());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fused_attention::attention_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, int64_t, int64_t, double,
                double, double, bool, bool, bool)>();
    const variable_list saved = ctx->get_saved_variables();
    auto [dq, dk, dv, dmask, dalibi, dsinks] =
        op.call(grads[0].contiguous(), saved[0], saved[1], saved[2], std::nullopt, std::nullopt, std::nullopt,
                std::nullopt, std::nullopt, ctx->saved_data["causal"].toBool(), -1, -1, 0.0,
                ctx->saved_data["scale"].toDouble(), 0.0, false, false, false);
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

std::optional<at::Tensor> attention_plain_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               bool causal, std::optional<double> scale) {
  if (calls_intercepted()) return std::nullopt;
  return PlainAttention::apply(q, k, v, causal, plain_call_scale(q, scale));
}

}  // namespace fused_attention::cpu
