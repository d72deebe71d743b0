// The CPU attention kernels compiled for x86-64-v3 (see attention_isa.h).
#include "cpu/attention_prelude.h"

#if FUSED_ATTENTION_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FUSED_ATTENTION_ISA_AVX2 1  // GCC does not define __AVX2__ inside a target region
namespace fused_attention::cpu::avx2 {
#include "cpu/attention_isa.h"
}  // namespace fused_attention::cpu::avx2
#undef FUSED_ATTENTION_ISA_AVX2
#pragma GCC pop_options
#endif
