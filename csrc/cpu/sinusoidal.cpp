// CPU kernel for fused_attention::add_sinusoidal_position_encoding: out[b, s] = x[b, s] + PE[p], with
// p = (offsets[b] or offset) + s, PE[p, 2i] = sin(p * base^(-2i/D)), PE[p, 2i+1] = cos(...).
//
// A sin and a cos per pair would cost more than the memory traffic, so consecutive positions come from
// the angle-addition recurrence (exact sin/cos once per task, then 4 multiplies per pair and position).
// Without offsets every batch entry shares position s, so each PE row is computed once and added to all
// B rows: on sequence-first input those rows are adjacent in memory and the kernel streams x once.
#include "sinusoidal.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/vec_io.h"

namespace fused_attention::cpu {
namespace {

// Elements added per parallel task: large enough to amortize the exact sin/cos that starts each task.
constexpr int64_t kElementsPerTask = 32768;

// sin/cos(p * freq_i) for p, p + 1, ... In float64 whatever x's dtype: each step adds about one float64
// rounding, so even 10^6 steps stay far below float32 resolution (and near float64 for float64 x).
class SinusoidRecurrence {
 public:
  SinusoidRecurrence(int64_t dim, double base)
      : freq_(dim / 2), step_cos_(dim / 2), step_sin_(dim / 2), cos_(dim / 2), sin_(dim / 2) {
    for (size_t i = 0; i < freq_.size(); ++i) {
      freq_[i] = sinusoidal_frequency<double>(static_cast<int64_t>(i), dim, base);
      step_cos_[i] = std::cos(freq_[i]);
      step_sin_[i] = std::sin(freq_[i]);
    }
  }

  void start(int64_t position) {
    for (size_t i = 0; i < freq_.size(); ++i) {
      const double angle = static_cast<double>(position) * freq_[i];
      cos_[i] = std::cos(angle);
      sin_[i] = std::sin(angle);
    }
  }

  // Writes PE of the current position (sin, cos interleaved) and moves on to the next position.
  template <typename value_t>
  C10_ALWAYS_INLINE void emit_and_advance(value_t* pe) {
    const int64_t pairs = static_cast<int64_t>(freq_.size());
    double* __restrict__ cos_now = cos_.data();
    double* __restrict__ sin_now = sin_.data();
    const double* __restrict__ step_cos = step_cos_.data();
    const double* __restrict__ step_sin = step_sin_.data();
    for (int64_t i = 0; i < pairs; ++i) {
      pe[2 * i] = static_cast<value_t>(sin_now[i]);
      pe[2 * i + 1] = static_cast<value_t>(cos_now[i]);
      const double c = cos_now[i] * step_cos[i] - sin_now[i] * step_sin[i];
      sin_now[i] = sin_now[i] * step_cos[i] + cos_now[i] * step_sin[i];
      cos_now[i] = c;
    }
  }

 private:
  std::vector<double> freq_, step_cos_, step_sin_, cos_, sin_;
};

// dst[d] = src[d] + pe[d] over one (b, s) row.
template <typename scalar_t>
C10_ALWAYS_INLINE void add_row(const scalar_t* src, int64_t src_stride, scalar_t* dst, int64_t dst_stride,
                               const acc_t<scalar_t>* pe, int64_t dim) {
  using Vec = AccVec<scalar_t>;
  if (src_stride == 1 && dst_stride == 1) {
    for_each_vector<Vec::size()>(dim, [&](int64_t d, auto count) C10_ALWAYS_INLINE_ATTRIBUTE {
      store_acc(dst + d, load_acc(src + d, count) + load_acc(pe + d, count), count);
    });
    return;
  }
  for (int64_t d = 0; d < dim; ++d) {
    dst[d * dst_stride] = static_cast<scalar_t>(static_cast<acc_t<scalar_t>>(src[d * src_stride]) + pe[d]);
  }
}

// The kernel's arguments as plain data; strides in elements, (b, s, d) order.
template <typename scalar_t>
struct SinusoidalRows {
  const scalar_t* in;
  scalar_t* out;
  int64_t in_stride[3];
  int64_t out_stride[3];
  int64_t seq_len;
  int64_t dim;
  int64_t group_size;      // batch entries sharing positions: all of them without offsets, else 1
  const int64_t* offsets;  // (groups,), or null: every group starts at `offset`
  int64_t offset_stride;
  int64_t offset;
  double base;
};

// Rows [begin, end) of the (group, s) grid: the hot loop, compiled per instruction set.
template <typename scalar_t>
FUSED_ATTENTION_CPU_MULTIVERSION void add_rows(const SinusoidalRows<scalar_t>& rows, int64_t begin,
                                               int64_t end) {
  SinusoidRecurrence recurrence(rows.dim, rows.base);
  std::vector<acc_t<scalar_t>> pe(rows.dim);
  for (int64_t row = begin; row < end;) {
    const int64_t group = row / rows.seq_len;
    const int64_t group_end = std::min(end, (group + 1) * rows.seq_len);
    recurrence.start((rows.offsets ? rows.offsets[group * rows.offset_stride] : rows.offset) +
                     row % rows.seq_len);
    for (; row < group_end; ++row) {
      recurrence.emit_and_advance(pe.data());
      const int64_t s = row % rows.seq_len;
      for (int64_t b = group * rows.group_size; b < (group + 1) * rows.group_size; ++b) {
        add_row(rows.in + b * rows.in_stride[0] + s * rows.in_stride[1], rows.in_stride[2],
                rows.out + b * rows.out_stride[0] + s * rows.out_stride[1], rows.out_stride[2], pe.data(),
                rows.dim);
      }
    }
  }
}

template <typename scalar_t>
void add_sinusoidal_kernel(const at::Tensor& x, const std::optional<at::Tensor>& offsets, int64_t offset,
                           double base, at::Tensor& out) {
  const int64_t groups = offsets.has_value() ? x.size(0) : 1;
  const SinusoidalRows<scalar_t> rows{x.const_data_ptr<scalar_t>(),
                                      out.mutable_data_ptr<scalar_t>(),
                                      {x.stride(0), x.stride(1), x.stride(2)},
                                      {out.stride(0), out.stride(1), out.stride(2)},
                                      x.size(1),
                                      x.size(2),
                                      x.size(0) / groups,
                                      offsets.has_value() ? offsets->const_data_ptr<int64_t>() : nullptr,
                                      offsets.has_value() ? offsets->stride(0) : 0,
                                      offset,
                                      base};
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (rows.group_size * rows.dim));
  at::parallel_for(0, groups * rows.seq_len, grain,
                   [&](int64_t begin, int64_t end) { add_rows(rows, begin, end); });
}

at::Tensor add_sinusoidal_position_encoding_cpu(const at::Tensor& x, const std::optional<at::Tensor>& offsets,
                                                int64_t offset, double base) {
  check_sinusoidal_inputs(x, offsets, base);
  // Same stride order as x: a sequence-first view in gives a sequence-first output, streamed in order.
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "add_sinusoidal_position_encoding_cpu",
                                  [&] { add_sinusoidal_kernel<scalar_t>(x, offsets, offset, base, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_attention, CPU, m) {
  m.impl("add_sinusoidal_position_encoding", &add_sinusoidal_position_encoding_cpu);
}

}  // namespace fused_attention::cpu
