// The bfloat16 forward on Intel AMX (see attention_forward_amx.h); everything else runs the AVX-512 kernels.
#include "cpu/attention_prelude.h"

#if FUSED_ATTENTION_AMX
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,amx-tile,amx-bf16,avx512bf16")
#define FUSED_ATTENTION_ISA_AVX512 1
namespace fused_attention::cpu::amx {
#include "cpu/attention_forward_amx.h"

void forward_bf16(const Problem<c10::BFloat16>& problem, const Scoring<float>& scoring,
                  const Operand<c10::BFloat16>& out, float* lse, const RowIndex& lse_index) {
  forward_amx<c10::BFloat16>(problem, scoring, out, lse, lse_index);
}
}  // namespace fused_attention::cpu::amx
#undef FUSED_ATTENTION_ISA_AVX512
#pragma GCC pop_options
#endif
