// The one place where fused_attention's C++ op schemas are defined. Device kernels register against
// these names from csrc/cpu and csrc/cuda; fake (meta) and autograd rules are registered from Python
// (fused_attention/_extension.py) once this library has loaded.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_attention, m) {
  // x: (seq, batch, dim), or (batch, seq, dim) when batch_first. Returns a new contiguous tensor.
  m.def("add_sinusoidal_position_encoding(Tensor x, int offset, float base, bool batch_first) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// Importing fused_attention._C runs the TORCH_LIBRARY registrations above; the module itself only
// reports how it was built, so Python can tell "CUDA kernels not compiled" from "no GPU".
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fused_attention compiled kernels; ops live under torch.ops.fused_attention";
#ifdef FUSED_ATTENTION_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
