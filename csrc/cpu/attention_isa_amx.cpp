// The bfloat16 forward on Intel AMX (attention_forward_amx.h) and the bfloat16 decode with its products on
// tiles where a kv head serves many query rows (attention_decode_amx.h); everything else runs the AVX-512
// kernels. The decode's products the tiles do not take (q.k below kAmxScoresMinRows rows, P V below
// kAmxDecodeMinRows) widen bfloat16 to float FMAs as the avx512 variant's do, not vdpbf16ps: on Intel's
// cores, the only ones with AMX, vdpbf16ps gives half the products per cycle (attention_dispatch.cpp).
#include "cpu/attention_prelude.h"

#if FUSED_ATTENTION_AMX
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,amx-tile,amx-bf16,avx512bf16")
#define FUSED_ATTENTION_ISA_AVX512 1
namespace fused_attention::cpu::amx {
#define FUSED_ATTENTION_AMX_DECODE 1
#include "cpu/attention_forward_amx.h"
#include "cpu/attention_decode.h"

void forward_bf16(const Problem<c10::BFloat16>& problem, const Scoring<float>& scoring,
                  const Operand<c10::BFloat16>& out, float* lse, const RowIndex& lse_index) {
  forward_amx<c10::BFloat16>(problem, scoring, out, lse, lse_index);
}

void decode_bf16(const Problem<c10::BFloat16>& problem, const Scoring<float>& scoring,
                 const Operand<c10::BFloat16>& out, float* lse, const RowIndex& lse_index) {
  decode<c10::BFloat16>(problem, scoring, out, lse, lse_index);
}
}  // namespace fused_attention::cpu::amx
#undef FUSED_ATTENTION_AMX_DECODE
#undef FUSED_ATTENTION_ISA_AVX512
#pragma GCC pop_options
#endif
