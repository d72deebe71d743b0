// The CPU rotary ops' implementations (rotary.cpp), for C++ callers past the dispatcher: the KV-cache short
// path rotates the new keys (and the queries) with them, as the full path's op calls do.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fused_attention::cpu {

// x (B, S, H, D) rotated at positions (B, S) with the cos/sin tables (S_ro, R / 2) (checked; a new tensor).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                  bool interleaved, bool conjugate);
// q and k (B, S, H*, D) rotated at the same positions, in one pass.
std::tuple<at::Tensor, at::Tensor> rotary_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
                                             bool conjugate);

}  // namespace fused_attention::cpu
