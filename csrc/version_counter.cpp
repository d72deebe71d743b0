// ADInplaceOrView kernel of fused_attention::rotary_, the one mutating op: bumps x's version counter
// after the rotation, as torch's own in-place ops do, so autograd refuses a backward that would read
// an x it saved before the rotation. Without it the op would mutate x silently: a custom op's default
// autograd fallback only bumps mutated *returns*, and rotary_ returns nothing. Device-independent.
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView (torch < 2.14 needs it named)
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace fused_attention {
namespace {

void rotary_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
                            bool conjugate) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_attention::rotary_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, bool, bool)>();
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, x, cos, sin, positions, interleaved, conjugate);
  }
  torch::autograd::impl::bump_version(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, ADInplaceOrView, m) {
  m.impl("rotary_", TORCH_FN(rotary_inplace_or_view));
}

}  // namespace fused_attention
