// attention_with_kvcache's common CPU call past its Python layers and the dispatcher
// (fused_attention/kvcache/plain_call.py): a decode step's call spent 40-70 us on the host before
// (validation in Python, the op's schema parsing), more than its kernel over a few hundred keys.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace fused_attention::cpu {

// The call in one key split, tensors as the ops take them (layout resolved): q (B, Hq, Lq, D), caches
// (B_cache or pages, Hkv, S_max or page_size, D / Dv), k and v (B, Hkv, Lnew, D / Dv); the window, softcap,
// slopes and sinks as Python's checks canonicalized them.
struct KVCachePlainCall {
  at::Tensor q, k_cache, v_cache;
  std::optional<at::Tensor> k, v;
  std::optional<at::Tensor> seqlens;  // int (B,)
  std::optional<int64_t> seqlen;      // or one length for every entry; neither: every cache full
  std::optional<at::Tensor> block_table;
  std::optional<at::Tensor> batch_idx, leftpad;  // int (B,): cache rows (contiguous caches), first keys
  bool causal = false;
  std::optional<double> scale;
  std::optional<at::Tensor> rotary_cos, rotary_sin;  // (S_ro, R / 2), used when appending (fused RoPE)
  bool rotary_interleaved = false;
  int64_t window_left = -1, window_right = -1;  // check_window's (before causal folds in)
  double softcap = 0.0;                         // 0: none
  std::optional<at::Tensor> alibi, sinks;       // float32 (1 or B, Hq); (Hq,)
  // Whether query rows sit at their own positions (causal or windowed; else every row at the cache's
  // length): the rows RoPE rotates, as FlashAttention.
  bool rows_in_order() const { return causal || window_left != -1 || window_right != -1; }
};

// Each entry's cache length when the plain path serves the call: nothing intercepts calls, the tensors
// are plain CPU tensors of one float dtype, none requires grad, and every check of the full path passes
// (shapes, lengths within capacity, left padding within the lengths, the cache rows and pages in use inside
// the caches, no slot appended twice, the caches not one tensor when appending, RoPE tables that cover the
// rotated positions). nullopt otherwise: the
// caller takes the full path, which raises its errors. Cheap (no kernel): the caller asks holding the GIL.
std::optional<std::vector<int64_t>> kvcache_plain_lengths(const KVCachePlainCall& call);

// The full path's op calls for it (the same kernels and arguments: the same bits; RoPE as rotate_new in
// fused_attention/kvcache/append.py), recorded under the ops' names for profilers: out (B, Hq, Lq, Dv) in
// q's layout and lse (B, Hq, Lq); after an append, the caches' version counters bumped as the op's
// ADInplaceOrView kernel does.
std::tuple<at::Tensor, at::Tensor> kvcache_plain(const KVCachePlainCall& call, const std::vector<int64_t>& lengths);

}  // namespace fused_attention::cpu
