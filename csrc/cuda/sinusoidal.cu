// CUDA kernel for fused_attention::add_sinusoidal_position_encoding: out[b, s] = x[b, s] + PE[p], with
// p = (offsets[b] or offset) + s, PE[p, 2i] = sin(p * base^(-2i/D)), PE[p, 2i+1] = cos(...).
//
// Threads of a block row share one position (group, s) and take one feature pair each: one sincos per
// pair, added to every batch entry of the group (all of them without offsets), so x is read once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cuda/launch.h"
#include "sinusoidal.h"

namespace fused_attention::gpu {
namespace {

__device__ __forceinline__ void sin_cos(float angle, float* s, float* c) { sincosf(angle, s, c); }
__device__ __forceinline__ void sin_cos(double angle, double* s, double* c) { sincos(angle, s, c); }

// Strides in elements, (b, s, d) order.
struct SinusoidalLayout {
  int64_t in_stride[3];
  int64_t out_stride[3];
  int64_t seq_len;
  int64_t dim;
  int64_t groups;      // batch entries sharing positions: batch with offsets, else 1
  int64_t group_size;  // batch / groups
};

template <typename scalar_t>
__global__ void add_sinusoidal_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                      SinusoidalLayout layout, const int64_t* __restrict__ offsets,
                                      int64_t offset_stride, int64_t offset, double base) {
  // Angles in float32 (float64 for float64 x): 16-bit angles would be off by whole radians at long positions.
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = layout.groups * layout.seq_len, half = layout.dim / 2;
  // A thread keeps its pairs for every row it visits, so each frequency is computed once per thread, in
  // float64 then rounded: float32 pow can be off by ulps, which long positions multiply.
  for (int64_t pair = threadIdx.x; pair < half; pair += blockDim.x) {
    const auto frequency = static_cast<acc_t>(sinusoidal_frequency<double>(pair, layout.dim, base));
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
         row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
      const int64_t group = row / layout.seq_len, s = row - group * layout.seq_len;
      const int64_t position = (offsets != nullptr ? offsets[group * offset_stride] : offset) + s;
      acc_t sin_value, cos_value;
      sin_cos(static_cast<acc_t>(position) * frequency, &sin_value, &cos_value);
      for (int64_t b = group * layout.group_size; b < (group + 1) * layout.group_size; ++b) {
        const scalar_t* src =
            in + b * layout.in_stride[0] + s * layout.in_stride[1] + 2 * pair * layout.in_stride[2];
        scalar_t* dst =
            out + b * layout.out_stride[0] + s * layout.out_stride[1] + 2 * pair * layout.out_stride[2];
        dst[0] = static_cast<scalar_t>(static_cast<acc_t>(src[0]) + sin_value);
        dst[layout.out_stride[2]] =
            static_cast<scalar_t>(static_cast<acc_t>(src[layout.in_stride[2]]) + cos_value);
      }
    }
  }
}

at::Tensor add_sinusoidal_position_encoding_cuda(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& offsets, int64_t offset,
                                                 double base) {
  check_sinusoidal_inputs(x, offsets, base);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) {
    return out;
  }
  const int64_t groups = offsets.has_value() ? x.size(0) : 1;
  const SinusoidalLayout layout{{x.stride(0), x.stride(1), x.stride(2)},
                                {out.stride(0), out.stride(1), out.stride(2)},
                                x.size(1),
                                x.size(2),
                                groups,
                                x.size(0) / groups};
  // Only as many blocks as the GPU holds at once: each thread then visits many rows per frequency.
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t resident_blocks = int64_t{8} * multiprocessors;
  const RowLaunch launch = row_launch(groups * x.size(1), x.size(2) / 2, resident_blocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "add_sinusoidal_position_encoding_cuda", [&] {
        add_sinusoidal_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), layout,
            offsets.has_value() ? offsets->const_data_ptr<int64_t>() : nullptr,
            offsets.has_value() ? offsets->stride(0) : 0, offset, base);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, CUDA, m) {
  m.impl("add_sinusoidal_position_encoding", &add_sinusoidal_position_encoding_cuda);
}

}  // namespace fused_attention::gpu
