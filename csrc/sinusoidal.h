// Shared by the CPU and CUDA kernels of fused_attention::add_sinusoidal_position_encoding, so both
// devices reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fused_attention {

inline void check_sinusoidal_inputs(const at::Tensor& x, double base) {
  TORCH_CHECK(x.dim() == 3,
              "add_sinusoidal_position_encoding: x must be 3-D, (seq, batch, dim) or (batch, seq, dim) "
              "with batch_first, got shape ", x.sizes());
  TORCH_CHECK(x.size(2) % 2 == 0,
              "add_sinusoidal_position_encoding: x.size(-1) must be even (sin/cos pairs), got ", x.size(2));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "add_sinusoidal_position_encoding: x must be float32, float64, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(base > 0, "add_sinusoidal_position_encoding: base must be positive, got ", base);
}

}  // namespace fused_attention
