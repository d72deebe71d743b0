// The CPU attention kernels compiled for x86-64-v4 (see attention_isa.h).
#include "cpu/attention_prelude.h"

#if FUSED_ATTENTION_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FUSED_ATTENTION_ISA_AVX512 1  // GCC does not define __AVX512F__ inside a target region
namespace fused_attention::cpu::avx512 {
#include "cpu/attention_isa.h"
}  // namespace fused_attention::cpu::avx512
#undef FUSED_ATTENTION_ISA_AVX512
#pragma GCC pop_options
#endif
