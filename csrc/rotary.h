// Shared by the CPU and CUDA kernels of fused_attention::rotary, rotary_ and rotary_qk: the input
// checks (same messages on both devices), the plain-data views the kernels walk, and the rotation itself.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace fused_attention {

// cos/sin tables are float32, or float64 for float64 x: 16-bit tables would round every angle.
inline at::ScalarType rotary_table_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rotary_tables(const char* op, const at::Tensor& cos, const at::Tensor& sin,
                                at::ScalarType x_dtype, const at::Device& device) {
  TORCH_CHECK(cos.dim() == 2, op, ": cos must be 2-D (table_len, rotary_dim / 2), got shape ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have cos's shape ", cos.sizes(), ", got ",
              sin.sizes());
  const auto table_dtype = rotary_table_dtype(x_dtype);
  TORCH_CHECK(
      cos.scalar_type() == table_dtype && sin.scalar_type() == table_dtype, op, ": cos and sin must be ",
      table_dtype == at::kDouble ? "float64 for float64 inputs" : "float32 (float64 only for float64 inputs)",
      ", got ", cos.scalar_type(), " and ", sin.scalar_type());
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), op, ": cos and sin must be contiguous");
  TORCH_CHECK(cos.device() == device && sin.device() == device, op, ": cos and sin must be on ", device,
              ", got ", cos.device(), " and ", sin.device());
}

// x: (batch, seq, heads, head_dim) with any strides, rotated by tables of rotary_dim / 2 columns.
inline void check_rotary_operand(const char* op, const char* name, const at::Tensor& x,
                                 const at::Tensor& cos) {
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (batch, seq, heads, head_dim), got shape ",
              x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(2 * cos.size(1) <= x.size(3), op, ": rotary_dim = 2 * cos.size(1) = ", 2 * cos.size(1),
              " must not exceed ", name, ".size(-1) = ", x.size(3));
  // The CUDA kernel indexes features within one token in 32 bits (tokens and memory offsets are 64-bit).
  TORCH_CHECK(x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(), op, ": ", name,
              " has too many elements per token: ", x.size(2), " heads x ", x.size(3));
}

inline void check_rotary_positions(const char* op, const at::Tensor& positions, const at::Tensor& x,
                                   const at::Tensor& cos) {
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == x.size(0) && positions.size(1) == x.size(1), op,
              ": positions must have shape (batch, seq) = (", x.size(0), ", ", x.size(1), "), got ",
              positions.sizes());
  TORCH_CHECK(positions.device() == x.device(), op, ": positions must be on ", x.device(), ", got ",
              positions.device());
  TORCH_CHECK(cos.size(0) > 0 || positions.numel() == 0, op,
              ": cos and sin have no rows to look positions up in");
}

inline void check_rotary_inputs(const char* op, const at::Tensor& x, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& positions) {
  check_rotary_tables(op, cos, sin, x.scalar_type(), x.device());
  check_rotary_operand(op, "x", x, cos);
  check_rotary_positions(op, positions, x, cos);
}

inline void check_rotary_qk_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                   const at::Tensor& sin, const at::Tensor& positions) {
  constexpr const char* op = "rotary_qk";
  check_rotary_tables(op, cos, sin, q.scalar_type(), q.device());
  check_rotary_operand(op, "q", q, cos);
  check_rotary_operand(op, "k", k, cos);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), op, ": k must be on q's device ", q.device(), ", got ", k.device());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), op, ": k must have q's batch and seq sizes (",
              q.size(0), ", ", q.size(1), "), got (", k.size(0), ", ", k.size(1), ")");
  check_rotary_positions(op, positions, q, cos);
}

// One (batch, seq, heads, head_dim) operand as plain data, so the same struct reaches a CUDA kernel by
// value. `out` may equal `in` (the in-place op). Strides are in elements, in (b, s, h, d) order.
template <typename scalar_t>
struct RotaryOperand {
  const scalar_t* in;
  scalar_t* out;
  int64_t heads;
  int64_t head_dim;
  int64_t in_stride[4];
  int64_t out_stride[4];
};

template <typename scalar_t>
RotaryOperand<scalar_t> make_rotary_operand(const at::Tensor& x, const at::Tensor& out) {
  RotaryOperand<scalar_t> operand{
      x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.size(2), x.size(3), {}, {}};
  for (int dim = 0; dim < 4; ++dim) {
    operand.in_stride[dim] = x.stride(dim);
    operand.out_stride[dim] = out.stride(dim);
  }
  return operand;
}

// The cos/sin tables and the positions that pick their rows, as plain data.
template <typename acc_t>
struct RotaryAngles {
  const acc_t* cos;
  const acc_t* sin;
  int64_t table_len;  // T: rows of cos/sin
  int64_t half_dim;   // R2: columns of cos/sin, i.e. pairs rotated per head
  const int64_t* positions;
  int64_t position_stride[2];  // (b, s)
  int64_t seq_len;
  bool interleaved;
  bool conjugate;

  // Table row of token (b, s). Python validates positions only for CPU tensors; clamping keeps a bad
  // CUDA position from reading outside the table.
  C10_HOST_DEVICE int64_t table_row(int64_t b, int64_t s) const {
    const int64_t p = positions[b * position_stride[0] + s * position_stride[1]];
    return p < 0 ? 0 : (p >= table_len ? table_len - 1 : p);
  }

  // Features paired by rotation i: (i, i + R2) for half-split (GPT-NeoX/Llama), (2i, 2i + 1) interleaved.
  C10_HOST_DEVICE int64_t first_feature(int64_t i) const { return interleaved ? 2 * i : i; }
  C10_HOST_DEVICE int64_t second_feature(int64_t i) const { return interleaved ? 2 * i + 1 : i + half_dim; }
};

template <typename acc_t>
RotaryAngles<acc_t> make_rotary_angles(const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& positions, bool interleaved, bool conjugate) {
  return {cos.const_data_ptr<acc_t>(),
          sin.const_data_ptr<acc_t>(),
          cos.size(0),
          cos.size(1),
          positions.const_data_ptr<int64_t>(),
          {positions.stride(0), positions.stride(1)},
          positions.size(1),
          interleaved,
          conjugate};
}

// The rotation of one pair by angle theta (c = cos theta, s = sin theta; the caller negates s for the
// conjugate, i.e. the backward): (a, b) -> (a c - b s, b c + a s). Templated so CPU vectors use it too.
template <typename value_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void rotate_pair(value_t& a, value_t& b, const value_t& c,
                                                   const value_t& s) {
  const value_t a_in = a;
  a = a * c - b * s;
  b = b * c + a_in * s;
}

}  // namespace fused_attention
