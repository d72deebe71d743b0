// The short path's call when q, k or v requires grad (see attention_direct.h): a C++ autograd node in
// place of the Python layer's autograd.Function (fused_attention/ops/eager.py), which cost a tiny call
// ~25 us. The same kernels both ways: the forward through attention_direct, the backward through the
// attention_backward op's kernel with the arguments the Python rule gives the op
// (fused_attention/ops/attention_rules.py, dense_autograd_rules), so gradients are equal bit for bit;
// profilers see both under the ops' names. Not through the dispatcher: its inline calls read a
// thread-local that aarch64's libc10 does not export (the CI's aarch64 link check), so a dispatch mode
// turned on only around a backward does not see this one (one on at the forward declines the node).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu/attention_direct.h"

namespace fused_attention::cpu {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The message of a second derivative through attention (the same as the Python rules',
// fused_attention/ops/attention_rules.py).
constexpr const char* kNoSecondDerivative =
    "fused_attention: attention gradients have no derivative of their own (a gradient penalty, or any "
    "second derivative, through attention is not supported)";

// An Error node with these next edges, as the torch version's function_constructor holds nodes
// (std::shared_ptr through torch 2.x's early releases, c10::intrusive_ptr later).
template <typename NodePtr>
NodePtr error_node(torch::autograd::edge_list&& next_edges) {
  using torch::autograd::Error;
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<Error>(kNoSecondDerivative, std::move(next_edges));
  } else {
    return c10::make_intrusive<Error>(kNoSecondDerivative, std::move(next_edges));
  }
}

// (named, not anonymous: grad_fn.name() reads torch::autograd::CppNode<fused_attention::cpu::PlainAttention>)
struct PlainAttention : public torch::autograd::Function<PlainAttention> {
  // Not traceable (the default): compiled autograd must not trace the backward's kernel call, which is
  // not a dispatcher call; torch 2.7+ runs such a node as one opaque call, while 2.6 refuses it (the
  // Python side keeps gradient calls off this node there: backends/plain_call.py).

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
    const variable_list saved = ctx->get_saved_variables();
    std::optional<at::NoGradGuard> no_graph;  // the kernel's own ops record nothing (create_graph: see below)
    if (at::GradMode::is_enabled()) no_graph.emplace();
    auto [dq, dk, dv] = plain_attention_backward(grads[0], saved[0], saved[1], saved[2],
                                                 ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble());
    if (no_graph.has_value()) {
      no_graph.reset();
      // create_graph: the gradients depend on dout, q, k and v through a node that raises when a second
      // derivative reaches it (as torch's own kernels without one do); without it they carried no graph,
      // and a penalty that also had other terms got 0 from attention without a word
      using NodePtr = std::invoke_result_t<torch::autograd::function_constructor, torch::autograd::edge_list&&>;
      variable_list wrapped = torch::autograd::wrap_outputs(
          {grads[0], saved[0], saved[1], saved[2]}, {dq, dk, dv},
          [](torch::autograd::edge_list&& next_edges) { return error_node<NodePtr>(std::move(next_edges)); });
      return {wrapped[0], wrapped[1], wrapped[2], at::Tensor(), at::Tensor()};
    }
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

std::optional<at::Tensor> attention_plain_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               bool causal, std::optional<double> scale) {
  if (calls_intercepted()) return std::nullopt;
  return PlainAttention::apply(q, k, v, causal, plain_call_scale(q, scale));
}

}  // namespace fused_attention::cpu
