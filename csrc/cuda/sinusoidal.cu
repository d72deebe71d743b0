// CUDA kernel for fused_attention::add_sinusoidal_position_encoding: out = x + PE, with
// PE[pos, 2i] = sin(pos * base^(-2i/D)), PE[pos, 2i+1] = cos(...), pos = s + offset.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "sinusoidal.h"

namespace fused_attention {
namespace {

constexpr int kThreads = 256;
// The grid-stride loop covers the rest; more blocks than this only add scheduling overhead.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

__device__ __forceinline__ void sin_cos(float angle, float* s, float* c) { sincosf(angle, s, c); }
__device__ __forceinline__ void sin_cos(double angle, double* s, double* c) { sincos(angle, s, c); }

// One thread per (sin, cos) pair: one angle, one sincos. Indices are 64-bit because numel can pass 2**31.
template <typename scalar_t>
__global__ void add_sinusoidal_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                      int64_t num_pairs, int64_t half, int64_t size1, int64_t stride0,
                                      int64_t stride1, int64_t stride2, int64_t offset,
                                      at::opmath_type<scalar_t> base, bool batch_first) {
  // Angles in float32 (float64 for float64 x), as on the CPU.
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pair < num_pairs;
       pair += step) {
    const int64_t row = pair / half, i = pair - row * half;
    const int64_t i0 = row / size1, i1 = row - i0 * size1;
    const auto pos = static_cast<acc_t>((batch_first ? i1 : i0) + offset);
    const acc_t inv_freq = pow(base, -static_cast<acc_t>(2 * i) / static_cast<acc_t>(2 * half));
    acc_t s, c;
    sin_cos(pos * inv_freq, &s, &c);
    // Strided read straight from x: a non-contiguous x costs no extra copy.
    const scalar_t* src = in + i0 * stride0 + i1 * stride1 + 2 * i * stride2;
    out[2 * pair] = static_cast<scalar_t>(static_cast<acc_t>(src[0]) + s);
    out[2 * pair + 1] = static_cast<scalar_t>(static_cast<acc_t>(src[stride2]) + c);
  }
}

at::Tensor add_sinusoidal_position_encoding_cuda(const at::Tensor& x, int64_t offset, double base,
                                                 bool batch_first) {
  check_sinusoidal_inputs(x, base);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t num_pairs = out.numel() / 2;
  if (num_pairs == 0) {
    return out;
  }
  const int64_t blocks = std::min((num_pairs + kThreads - 1) / kThreads, kMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "add_sinusoidal_position_encoding_cuda", [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    add_sinusoidal_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                                        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                        num_pairs, x.size(2) / 2, x.size(1), x.stride(0), x.stride(1),
                                        x.stride(2), offset, static_cast<acc_t>(base), batch_first);
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, CUDA, m) {
  m.impl("add_sinusoidal_position_encoding", &add_sinusoidal_position_encoding_cuda);
}

}  // namespace fused_attention
