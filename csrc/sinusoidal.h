// Shared by the CPU and CUDA kernels of fused_attention::add_sinusoidal_position_encoding, so both
// devices reject the same inputs with the same messages and use the same frequencies.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace fused_attention {

inline void check_sinusoidal_inputs(const at::Tensor& x, const std::optional<at::Tensor>& offsets,
                                    double base) {
  TORCH_CHECK(x.dim() == 3, "add_sinusoidal_position_encoding: x must be 3-D (batch, seq, dim), got shape ",
              x.sizes());
  TORCH_CHECK(x.size(2) % 2 == 0,
              "add_sinusoidal_position_encoding: x.size(-1) must be even (sin/cos pairs), got ", x.size(2));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "add_sinusoidal_position_encoding: x must be float32, float64, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(base > 0, "add_sinusoidal_position_encoding: base must be positive, got ", base);
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->scalar_type() == at::kLong,
                "add_sinusoidal_position_encoding: offsets must be int64, got ", offsets->scalar_type());
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == x.size(0),
                "add_sinusoidal_position_encoding: offsets must have shape (batch,) = (", x.size(0),
                ",), got ", offsets->sizes());
    TORCH_CHECK(offsets->device() == x.device(),
                "add_sinusoidal_position_encoding: offsets must be on x's device ", x.device(), ", got ",
                offsets->device());
  }
}

// Frequency of feature pair i: base^(-2i/dim), so PE[p, 2i] = sin(p * freq), PE[p, 2i+1] = cos(p * freq).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sinusoidal_frequency(int64_t pair, int64_t dim, acc_t base) {
  const acc_t exponent = -static_cast<acc_t>(2 * pair) / static_cast<acc_t>(dim);
#ifdef __CUDA_ARCH__
  return pow(base, exponent);
#else
  return std::pow(base, exponent);
#endif
}

}  // namespace fused_attention
