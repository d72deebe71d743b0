// Autograd kernel of the ops that have no backward (the KV-cache ops): a call that would need a gradient
// (grad mode on and an input that requires grad) raises before the op runs, naming the inputs; any other
// call goes on below autograd. Without it, a direct torch.ops call took torch's autograd fallback, whose
// outputs' backward left every gradient None without a word (and the append op had written its caches
// first). The append op's ADInplaceOrView kernel bumps the version counters of the caches it writes. In
// C++, boxed, so that a call that needs no gradient pays no Python frame: a decode step's host side is
// tens of microseconds. Device-independent.
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView (torch < 2.14 needs it named)
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace fused_attention {
namespace {

// fn(schema argument, its tensor) for each of the op's arguments on the stack that is a defined tensor.
template <typename Fn>
void for_each_tensor_argument(const c10::OperatorHandle& op, const torch::jit::Stack& stack, const Fn& fn) {
  const auto& arguments = op.schema().arguments();
  for (size_t i = 0, first = stack.size() - arguments.size(); i < arguments.size(); ++i) {
    const c10::IValue& value = stack[first + i];
    if (value.isTensor() && value.toTensor().defined()) fn(arguments[i], value.toTensor());
  }
}

void forward_only(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    std::string wanting;
    int count = 0;
    for_each_tensor_argument(op, *stack, [&](const c10::Argument& argument, const at::Tensor& t) {
      if (t.requires_grad()) wanting += (count++ > 0 ? ", " : "") + argument.name();
    });
    TORCH_CHECK_VALUE(count == 0, op.schema().name(), " is forward only (inference), but ", wanting,
                      count == 1 ? " requires" : " require",
                      " grad; call it under torch.no_grad() / torch.inference_mode(), or detach the inputs");
  }
  const at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView kernel of the mutating op: bumps the version counters of the arguments the schema marks
// written (Tensor(a!): the caches) after the call, as torch's in-place ops do, so autograd refuses a
// backward that would read a tensor sharing their storage saved before the write (torch's fallback bumps
// only written returns). Here, not in the Autograd kernel: inference mode skips that key, but a cache made
// outside inference mode still reaches this one. Inference tensors have no counter.
void bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  std::vector<at::Tensor> written;
  for_each_tensor_argument(op, *stack, [&](const c10::Argument& argument, const at::Tensor& t) {
    const auto& alias = argument.alias_info();
    if (alias && alias->isWrite() && !t.is_inference()) written.push_back(t);
  });
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, Autograd, m) {
  m.impl("kvcache_attention", torch::CppFunction::makeFromBoxedFunction<&forward_only>());
  m.impl("kvcache_append_attention_", torch::CppFunction::makeFromBoxedFunction<&forward_only>());
}

TORCH_LIBRARY_IMPL(fused_attention, ADInplaceOrView, m) {
  m.impl("kvcache_append_attention_", torch::CppFunction::makeFromBoxedFunction<&bump_written>());
}

}  // namespace fused_attention
