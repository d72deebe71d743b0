// CPU kernel for fused_attention::add_sinusoidal_position_encoding: out = x + PE, with
// PE[pos, 2i] = sin(pos * base^(-2i/D)), PE[pos, 2i+1] = cos(...), pos = s + offset.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "sinusoidal.h"

namespace fused_attention {
namespace {

// Work per parallel task, in elements: each element costs a sin or cos, so chunks this size amortize
// the task overhead without starving threads on short sequences.
constexpr int64_t kElementsPerTask = 16384;

template <typename scalar_t>
void add_sinusoidal_cpu_kernel(const at::Tensor& x, at::Tensor& out, int64_t offset, double base,
                               bool batch_first) {
  // Angles in float32 (float64 for float64 x): 16-bit angles would be off by whole radians at long
  // positions.
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t size0 = x.size(0), size1 = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t stride0 = x.stride(0), stride1 = x.stride(1), stride2 = x.stride(2);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(dim, 1));

  at::parallel_for(0, size0 * size1, grain, [&](int64_t row_begin, int64_t row_end) {
    // Per-chunk frequencies save a pow per element; D/2 values, not a (seq, dim) table.
    std::vector<acc_t> inv_freq(half);
    for (int64_t i = 0; i < half; ++i) {
      inv_freq[i] = std::pow(static_cast<acc_t>(base), -static_cast<acc_t>(2 * i) / static_cast<acc_t>(dim));
    }
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t i0 = row / size1, i1 = row % size1;
      const auto pos = static_cast<acc_t>((batch_first ? i1 : i0) + offset);
      // Strided read straight from x: a non-contiguous x costs no extra copy.
      const scalar_t* src = in + i0 * stride0 + i1 * stride1;
      scalar_t* row_out = dst + row * dim;
      for (int64_t i = 0; i < half; ++i) {
        const acc_t angle = pos * inv_freq[i];
        row_out[2 * i] = static_cast<scalar_t>(static_cast<acc_t>(src[2 * i * stride2]) + std::sin(angle));
        row_out[2 * i + 1] =
            static_cast<scalar_t>(static_cast<acc_t>(src[(2 * i + 1) * stride2]) + std::cos(angle));
      }
    }
  });
}

at::Tensor add_sinusoidal_position_encoding_cpu(const at::Tensor& x, int64_t offset, double base,
                                                bool batch_first) {
  check_sinusoidal_inputs(x, base);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "add_sinusoidal_position_encoding_cpu", [&] {
                                    add_sinusoidal_cpu_kernel<scalar_t>(x, out, offset, base, batch_first);
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, CPU, m) {
  m.impl("add_sinusoidal_position_encoding", &add_sinusoidal_position_encoding_cpu);
}

}  // namespace fused_attention
