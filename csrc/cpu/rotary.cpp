// CPU kernels for fused_attention::rotary, rotary_ and rotary_qk: rotary position embedding (RoPE) of
// (batch, seq, heads, head_dim) tensors of any strides, in one pass over memory.
//
// Work is split over tokens (b, s): a token looks up its cos/sin row once and rotates every head of
// every operand with it (q and k together for rotary_qk), so the table row stays in L1.
#include "rotary.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/rotary_ops.h"
#include "cpu/vec_io.h"

namespace fused_attention::cpu {
namespace {

// Elements per parallel task: enough to amortize the task, small enough to balance short sequences.
constexpr int64_t kElementsPerTask = 32768;

// Half-split pairs (i, i + R2) with unit feature stride: both halves are contiguous vectors.
template <typename scalar_t>
C10_ALWAYS_INLINE void rotate_half_split(const scalar_t* in, scalar_t* out, const acc_t<scalar_t>* cos_row,
                                         const acc_t<scalar_t>* sin_row, int64_t half_dim,
                                         const AccVec<scalar_t>& sin_sign) {
  using Vec = AccVec<scalar_t>;
  for_each_vector<Vec::size()>(half_dim, [&](int64_t i, auto count) C10_ALWAYS_INLINE_ATTRIBUTE {
    Vec a = load_acc(in + i, count), b = load_acc(in + half_dim + i, count);
    rotate_pair(a, b, load_acc(cos_row + i, count), load_acc(sin_row + i, count) * sin_sign);
    store_acc(out + i, a, count);
    store_acc(out + half_dim + i, b, count);
  });
}

// Interleaved pairs (2i, 2i + 1) with unit feature stride, as out = x * cos_pairs + swap_adjacent(x) *
// sin_pairs over whole vectors (see interleaved_tables): no de-interleaving of lanes.
template <typename scalar_t>
C10_ALWAYS_INLINE void rotate_interleaved(const scalar_t* in, scalar_t* out, const acc_t<scalar_t>* cos_pairs,
                                          const acc_t<scalar_t>* sin_pairs, int64_t rotary_dim) {
  using Vec = AccVec<scalar_t>;
  for_each_vector<Vec::size()>(rotary_dim, [&](int64_t j, auto count) C10_ALWAYS_INLINE_ATTRIBUTE {
    const Vec x = load_acc(in + j, count);
    store_acc(out + j, x * load_acc(cos_pairs + j, count) + swap_adjacent(x) * load_acc(sin_pairs + j, count),
              count);
  });
}

// One token's angles laid out feature by feature for rotate_interleaved: cos_pairs = (c0, c0, c1, c1, ...),
// sin_pairs = (-s0, s0, -s1, s1, ...), with s negated for the conjugate. Built once per token, used by
// every head.
template <typename acc>
C10_ALWAYS_INLINE void interleaved_tables(const acc* cos_row, const acc* sin_row, int64_t half_dim,
                                          bool conjugate, acc* cos_pairs, acc* sin_pairs) {
  const acc sign = conjugate ? -1 : 1;
  for (int64_t i = 0; i < half_dim; ++i) {
    cos_pairs[2 * i] = cos_pairs[2 * i + 1] = cos_row[i];
    sin_pairs[2 * i + 1] = sign * sin_row[i];
    sin_pairs[2 * i] = -sin_pairs[2 * i + 1];
  }
}

// Any feature strides: one pair at a time.
template <typename scalar_t>
C10_ALWAYS_INLINE void rotate_strided(const scalar_t* in, int64_t in_stride, scalar_t* out,
                                      int64_t out_stride, const acc_t<scalar_t>* cos_row,
                                      const acc_t<scalar_t>* sin_row,
                                      const RotaryAngles<acc_t<scalar_t>>& angles) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < angles.half_dim; ++i) {
    const int64_t first = angles.first_feature(i), second = angles.second_feature(i);
    acc a = static_cast<acc>(in[first * in_stride]), b = static_cast<acc>(in[second * in_stride]);
    rotate_pair(a, b, cos_row[i], angles.conjugate ? -sin_row[i] : sin_row[i]);
    out[first * out_stride] = static_cast<scalar_t>(a);
    out[second * out_stride] = static_cast<scalar_t>(b);
  }
}

// Rotates the first rotary_dim features of one head and copies the rest (unless in place).
template <typename scalar_t>
C10_ALWAYS_INLINE void rotate_head(const scalar_t* in, scalar_t* out, const RotaryOperand<scalar_t>& operand,
                                   const acc_t<scalar_t>* cos_row, const acc_t<scalar_t>* sin_row,
                                   const acc_t<scalar_t>* cos_pairs, const acc_t<scalar_t>* sin_pairs,
                                   const RotaryAngles<acc_t<scalar_t>>& angles,
                                   const AccVec<scalar_t>& sin_sign) {
  const int64_t in_stride = operand.in_stride[3], out_stride = operand.out_stride[3];
  const int64_t rotary_dim = 2 * angles.half_dim;
  if (in_stride == 1 && out_stride == 1) {
    if (angles.interleaved) {
      rotate_interleaved(in, out, cos_pairs, sin_pairs, rotary_dim);
    } else {
      rotate_half_split(in, out, cos_row, sin_row, angles.half_dim, sin_sign);
    }
  } else {
    rotate_strided(in, in_stride, out, out_stride, cos_row, sin_row, angles);
  }
  if (in != out) {
    for (int64_t d = rotary_dim; d < operand.head_dim; ++d) {
      out[d * out_stride] = in[d * in_stride];
    }
  }
}

// Tokens [begin, end): the hot loop, compiled per instruction set.
template <typename scalar_t>
FUSED_ATTENTION_CPU_MULTIVERSION void rotate_tokens(c10::ArrayRef<RotaryOperand<scalar_t>> operands,
                                                    const RotaryAngles<acc_t<scalar_t>>& angles,
                                                    int64_t begin, int64_t end) {
  // The backward rotates by -theta: the same kernel with sin negated.
  const AccVec<scalar_t> sin_sign(angles.conjugate ? -1 : 1);
  std::vector<acc_t<scalar_t>> cos_pairs(angles.interleaved ? 2 * angles.half_dim : 0);
  std::vector<acc_t<scalar_t>> sin_pairs(cos_pairs.size());
  for (int64_t token = begin; token < end; ++token) {
    const int64_t b = token / angles.seq_len, s = token % angles.seq_len;
    const int64_t row = angles.table_row(b, s);
    const acc_t<scalar_t>* cos_row = angles.cos + row * angles.half_dim;
    const acc_t<scalar_t>* sin_row = angles.sin + row * angles.half_dim;
    if (angles.interleaved) {
      interleaved_tables(cos_row, sin_row, angles.half_dim, angles.conjugate, cos_pairs.data(),
                         sin_pairs.data());
    }
    for (const auto& operand : operands) {
      const scalar_t* in = operand.in + b * operand.in_stride[0] + s * operand.in_stride[1];
      scalar_t* out = operand.out + b * operand.out_stride[0] + s * operand.out_stride[1];
      for (int64_t h = 0; h < operand.heads; ++h) {
        rotate_head(in + h * operand.in_stride[2], out + h * operand.out_stride[2], operand, cos_row, sin_row,
                    cos_pairs.data(), sin_pairs.data(), angles, sin_sign);
      }
    }
  }
}

template <typename scalar_t>
void rotary_kernel(c10::ArrayRef<RotaryOperand<scalar_t>> operands,
                   const RotaryAngles<acc_t<scalar_t>>& angles, int64_t batch) {
  int64_t elements_per_token = 0;
  for (const auto& operand : operands) {
    elements_per_token += operand.heads * operand.head_dim;
  }
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_token));
  at::parallel_for(0, batch * angles.seq_len, grain, [&](int64_t begin, int64_t end) {
    rotate_tokens<scalar_t>(operands, angles, begin, end);
  });
}

// Python checks the positions only outside torch.compile (they are data): a position past the table, which
// a CUDA kernel can only clamp (table_row), raises here, before the parallel loop, instead of rotating its
// token by the wrong angle; a ValueError, as Python's check raises.
template <typename acc_t>
void check_positions_in_table(const RotaryAngles<acc_t>& angles, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < angles.seq_len; ++s) {
      const int64_t position = angles.positions[b * angles.position_stride[0] + s * angles.position_stride[1]];
      TORCH_CHECK_VALUE(position >= 0 && position < angles.table_len, "fused_attention rotary: position ", position,
                        " falls outside the cos/sin table of ", angles.table_len, " rows");
    }
  }
}

// Rotates each (input, output) pair with the same angles; output may be the input itself.
void rotary_cpu(std::initializer_list<std::pair<at::Tensor, at::Tensor>> in_out, const at::Tensor& cos,
                const at::Tensor& sin, const at::Tensor& positions, bool interleaved, bool conjugate) {
  const at::Tensor& first = in_out.begin()->first;
  if (positions.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "rotary_cpu", [&] {
    c10::SmallVector<RotaryOperand<scalar_t>, 2> operands;
    for (const auto& [input, output] : in_out) {
      operands.push_back(make_rotary_operand<scalar_t>(input, output));
    }
    const auto angles = make_rotary_angles<acc_t<scalar_t>>(cos, sin, positions, interleaved, conjugate);
    check_positions_in_table(angles, first.size(0));
    rotary_kernel<scalar_t>(operands, angles, first.size(0));
  });
}

}  // namespace

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& positions, bool interleaved, bool conjugate) {
  check_rotary_inputs("rotary", x, cos, sin, positions);
  at::Tensor out = at::empty_like(x);
  rotary_cpu({{x, out}}, cos, sin, positions, interleaved, conjugate);
  return out;
}

namespace {

void rotary_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
             bool interleaved, bool conjugate) {
  check_rotary_inputs("rotary_", x, cos, sin, positions);
  // Elements sharing memory (e.g. an expanded x) would be rotated twice.
  at::assert_no_internal_overlap(x);
  rotary_cpu({{x, x}}, cos, sin, positions, interleaved, conjugate);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, const at::Tensor& positions,
                                             bool interleaved, bool conjugate) {
  check_rotary_qk_inputs(q, k, cos, sin, positions);
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  rotary_cpu({{q, q_out}, {k, k_out}}, cos, sin, positions, interleaved, conjugate);
  return {q_out, k_out};
}

TORCH_LIBRARY_IMPL(fused_attention, CPU, m) {
  m.impl("rotary", &rotary);
  m.impl("rotary_", &rotary_);
  m.impl("rotary_qk", &rotary_qk);
}

}  // namespace fused_attention::cpu
