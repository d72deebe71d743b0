// The bfloat16 decode kernel for CPUs with AVX512-BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids):
// attention_decode.h with its q.k products on vdpbf16ps (dot_keys with Bf16Dot). Everything else, and every
// other dtype, runs the avx512 variant.
#include "cpu/attention_prelude.h"

#if FUSED_ATTENTION_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#define FUSED_ATTENTION_ISA_AVX512 1
#define FUSED_ATTENTION_BF16_DOT 1
namespace fused_attention::cpu::avx512bf16 {
#include "cpu/attention_decode.h"

void decode_bf16(const Problem<c10::BFloat16>& problem, const Scoring<float>& scoring,
                 const Operand<c10::BFloat16>& out, float* lse, const RowIndex& lse_index) {
  decode<c10::BFloat16>(problem, scoring, out, lse, lse_index);
}
}  // namespace fused_attention::cpu::avx512bf16
#undef FUSED_ATTENTION_BF16_DOT
#undef FUSED_ATTENTION_ISA_AVX512
#pragma GCC pop_options
#endif
