// The CPU attention kernels compiled for the build's baseline instruction set (see attention_isa.h).
#include "cpu/attention_prelude.h"

namespace fused_attention::cpu::baseline {
#include "cpu/attention_isa.h"
}  // namespace fused_attention::cpu::baseline
