// CUDA kernels for fused_attention::rotary, rotary_ and rotary_qk: rotary position embedding (RoPE) of
// (batch, seq, heads, head_dim) tensors of any strides, in one pass over memory.
//
// A block row (threadIdx.y) owns a token (b, s), looks its cos/sin row up once, and its threads take one
// (head, pair) each, across every operand (q then k for rotary_qk: one launch for both).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <tuple>
#include <utility>

#include "cuda/launch.h"
#include "rotary.h"

namespace fused_attention::gpu {
namespace {

constexpr int kMaxOperands = 2;

// Passed by value: kernel parameters, no device allocation.
template <typename scalar_t>
struct RotaryOperands {
  RotaryOperand<scalar_t> items[kMaxOperands];
  int count;
};

template <typename scalar_t>
__global__ void rotary_kernel(RotaryOperands<scalar_t> operands,
                              RotaryAngles<at::opmath_type<scalar_t>> angles, int64_t tokens) {
  // Math in float32 (float64 for float64 x), as on the CPU.
  using acc_t = at::opmath_type<scalar_t>;
  const int half_dim = static_cast<int>(angles.half_dim);
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; token < tokens;
       token += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t b = token / angles.seq_len, s = token - b * angles.seq_len;
    const int64_t row = angles.table_row(b, s);
    const acc_t* cos_row = angles.cos + row * half_dim;
    const acc_t* sin_row = angles.sin + row * half_dim;
    for (int n = 0; n < operands.count; ++n) {
      const RotaryOperand<scalar_t>& op = operands.items[n];
      const scalar_t* in = op.in + b * op.in_stride[0] + s * op.in_stride[1];
      scalar_t* out = op.out + b * op.out_stride[0] + s * op.out_stride[1];
      // Within a token, 32-bit indices suffice (checked on the host); offsets into memory are 64-bit.
      const int pairs = static_cast<int>(op.heads) * half_dim;
      for (int item = threadIdx.x; item < pairs; item += blockDim.x) {
        const int h = item / half_dim, i = item - h * half_dim;
        const int64_t first = angles.first_feature(i), second = angles.second_feature(i);
        acc_t x0 = static_cast<acc_t>(in[h * op.in_stride[2] + first * op.in_stride[3]]);
        acc_t x1 = static_cast<acc_t>(in[h * op.in_stride[2] + second * op.in_stride[3]]);
        rotate_pair(x0, x1, cos_row[i], angles.conjugate ? -sin_row[i] : sin_row[i]);
        out[h * op.out_stride[2] + first * op.out_stride[3]] = static_cast<scalar_t>(x0);
        out[h * op.out_stride[2] + second * op.out_stride[3]] = static_cast<scalar_t>(x1);
      }
      if (op.in == op.out) {
        continue;
      }
      const int rest = static_cast<int>(op.head_dim) - 2 * half_dim;
      for (int item = threadIdx.x; item < static_cast<int>(op.heads) * rest; item += blockDim.x) {
        const int h = item / rest, d = 2 * half_dim + item - h * rest;
        out[h * op.out_stride[2] + d * op.out_stride[3]] = in[h * op.in_stride[2] + d * op.in_stride[3]];
      }
    }
  }
}

// Rotates each (input, output) pair with the same angles in one launch; output may be the input itself.
void rotary_cuda(std::initializer_list<std::pair<at::Tensor, at::Tensor>> in_out, const at::Tensor& cos,
                 const at::Tensor& sin, const at::Tensor& positions, bool interleaved, bool conjugate) {
  const at::Tensor& first = in_out.begin()->first;
  const int64_t tokens = positions.numel();
  if (tokens == 0) {
    return;
  }
  int64_t items_per_token = 0;
  for (const auto& [input, output] : in_out) {
    items_per_token =
        std::max(items_per_token, input.size(2) * std::max(cos.size(1), input.size(3) - 2 * cos.size(1)));
  }
  const RowLaunch launch = row_launch(tokens, items_per_token);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "rotary_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RotaryOperands<scalar_t> operands{};
    for (const auto& [input, output] : in_out) {
      operands.items[operands.count++] = make_rotary_operand<scalar_t>(input, output);
    }
    rotary_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(
        operands, make_rotary_angles<acc_t>(cos, sin, positions, interleaved, conjugate), tokens);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& positions, bool interleaved, bool conjugate) {
  check_rotary_inputs("rotary", x, cos, sin, positions);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(x);
  rotary_cuda({{x, out}}, cos, sin, positions, interleaved, conjugate);
  return out;
}

void rotary_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
             bool interleaved, bool conjugate) {
  check_rotary_inputs("rotary_", x, cos, sin, positions);
  // Elements sharing memory (e.g. an expanded x) would be rotated twice.
  at::assert_no_internal_overlap(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  rotary_cuda({{x, x}}, cos, sin, positions, interleaved, conjugate);
}

std::tuple<at::Tensor, at::Tensor> rotary_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, const at::Tensor& positions,
                                             bool interleaved, bool conjugate) {
  check_rotary_qk_inputs(q, k, cos, sin, positions);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  rotary_cuda({{q, q_out}, {k, k_out}}, cos, sin, positions, interleaved, conjugate);
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, CUDA, m) {
  m.impl("rotary", &rotary);
  m.impl("rotary_", &rotary_);
  m.impl("rotary_qk", &rotary_qk);
}

}  // namespace fused_attention::gpu
