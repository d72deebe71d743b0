// The one place where fused_attention's C++ op schemas are defined. Device kernels register against
// these names from csrc/cpu and csrc/cuda; fake (meta) and autograd rules are registered from Python
// (fused_attention/_extension.py) once this library has loaded.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <vector>

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
}
// clang-format on

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
