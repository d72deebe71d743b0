// Runs the CPU attention kernels compiled for the best instruction set this CPU supports.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/attention_kernels.h"
#include "cpu/attention_prelude.h"

#if FUSED_ATTENTION_AMX && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fused_attention::cpu {
namespace {

enum class Isa { baseline, avx2, avx512, avx512bf16, amx };

#if FUSED_ATTENTION_AMX
// Linux hands out AMX's tile data state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults.
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

Isa best_supported() {
#if FUSED_ATTENTION_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512cd");
#if FUSED_ATTENTION_AMX
  if (avx512 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
      __builtin_cpu_supports("avx512bf16") && amx_permitted()) {
    return Isa::amx;
  }
#endif
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::avx512bf16;
  if (avx512) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
    return Isa::avx2;
  }
#endif
  return Isa::baseline;
}

// vdpbf16ps issues at a float FMA's rate on AMD's cores (Zen 4, Zen 5: ~0.85 TSC ticks per zmm
// instruction each) but at a quarter of it on Intel's (Sapphire and Emerald Rapids: 1.40-1.75 ticks against
// 0.35-0.43, so 32 bfloat16 products per vdpbf16ps come at half the rate of widening them to float for
// two FMAs; benchmarks/results/2026-12-05/cpu-decode-widen.md, 2026-12-07/cpu-decode-intel-widen.md).
// The avx512bf16 variant differs from avx512 only by its bfloat16 decode on vdpbf16ps, so Intel CPUs
// without AMX run avx512 (its decode widens); the variable can still ask for avx512bf16.
bool bf16_dot_at_fma_rate() {
#if FUSED_ATTENTION_X86_VARIANTS
  return !__builtin_cpu_is("intel");
#else
  return true;
#endif
}

Isa preferred(Isa best) { return best == Isa::avx512bf16 && !bf16_dot_at_fma_rate() ? Isa::avx512 : best; }

Isa selected() {
  static const Isa isa = [] {
    const Isa best = best_supported();
    const char* requested = std::getenv("FUSED_ATTENTION_CPU_ISA");
    if (requested == nullptr || *requested == '\0') return preferred(best);
    const std::string name(requested);
    const Isa wanted = name == "amx"          ? Isa::amx
                       : name == "avx512bf16" ? Isa::avx512bf16
                       : name == "avx512"     ? Isa::avx512
                       : name == "avx2"       ? Isa::avx2
                                              : Isa::baseline;
    TORCH_CHECK(name == "amx" || name == "avx512bf16" || name == "avx512" || name == "avx2" || name == "baseline",
                "FUSED_ATTENTION_CPU_ISA must be baseline, avx2, avx512, avx512bf16 or amx, got ", name);
    TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best),
                "FUSED_ATTENTION_CPU_ISA=", name, " is not supported by this CPU or build");
    return wanted;
  }();
  return isa;
}

}  // namespace

const char* attention_isa() {
  switch (selected()) {
    case Isa::amx: return "amx";
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

const char* attention_isa_reason() {
  static const char* reason = [] {  // (read once, as selected() reads the variable)
    const Isa isa = selected();
    const char* requested = std::getenv("FUSED_ATTENTION_CPU_ISA");
    if (requested != nullptr && *requested != '\0') return "asked for by FUSED_ATTENTION_CPU_ISA";
    if (isa != best_supported()) {
      return "AVX512-BF16 left unused: on Intel cores vdpbf16ps gives half the bfloat16 product rate of widening "
             "to float FMAs";
    }
    return "the best this CPU supports";
  }();
  return reason;
}

namespace {
std::atomic<int64_t> decode_calls{0}, blocked_calls{0};
}  // namespace

std::pair<int64_t, int64_t> forward_path_counts() { return {decode_calls.load(), blocked_calls.load()}; }

template <typename scalar_t>
void attention_forward_kernel(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,
                              const Operand<scalar_t>& out, attn_acc_t<scalar_t>* lse, const RowIndex& lse_index) {
  // An lse for the backward from statistics (RowIndex::low) comes from the blocked forward of the
  // backward's own ISA: its scores round as the backward's do, so that every row's exp(score - lse) there
  // sums to 1 (the decode path's and AMX's products round differently: at scores of a few tens that left
  // float32 value gradients at 3-6x the tolerance policy's bound).
  const bool as_backward = lse_index.low != nullptr;
  const bool decode = !as_backward && decode_serves(problem, scoring);
  if (!as_backward) (decode ? decode_calls : blocked_calls).fetch_add(1, std::memory_order_relaxed);
  if (decode) {
    switch (selected()) {
#if FUSED_ATTENTION_X86_VARIANTS
      case Isa::amx:
#if FUSED_ATTENTION_AMX
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return amx::decode_bf16(problem, scoring, out, lse, lse_index);
#endif
        return avx512::decode<scalar_t>(problem, scoring, out, lse, lse_index);
      case Isa::avx512bf16:
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          return avx512bf16::decode_bf16(problem, scoring, out, lse, lse_index);
        }
        return avx512::decode<scalar_t>(problem, scoring, out, lse, lse_index);
      case Isa::avx512: return avx512::decode<scalar_t>(problem, scoring, out, lse, lse_index);
      case Isa::avx2: return avx2::decode<scalar_t>(problem, scoring, out, lse, lse_index);
#endif
      default: return baseline::decode<scalar_t>(problem, scoring, out, lse, lse_index);
    }
  }
  switch (selected()) {
#if FUSED_ATTENTION_X86_VARIANTS
    case Isa::amx:
#if FUSED_ATTENTION_AMX
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (!as_backward) return amx::forward_bf16(problem, scoring, out, lse, lse_index);
      }
#endif
      return avx512::forward<scalar_t>(problem, scoring, out, lse, lse_index);
    case Isa::avx512bf16:
    case Isa::avx512: return avx512::forward<scalar_t>(problem, scoring, out, lse, lse_index);
    case Isa::avx2: return avx2::forward<scalar_t>(problem, scoring, out, lse, lse_index);
#endif
    default: return baseline::forward<scalar_t>(problem, scoring, out, lse, lse_index);
  }
}

template <typename scalar_t>
void attention_backward_kernel(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,
                               const Operand<scalar_t>& dout, const Operand<scalar_t>& dq,
                               const Operand<scalar_t>& dk, const Operand<scalar_t>& dv,
                               const ExtraGradients<attn_acc_t<scalar_t>>& extra) {
  switch (selected()) {
#if FUSED_ATTENTION_X86_VARIANTS
    case Isa::amx:
    case Isa::avx512bf16:
    case Isa::avx512: return avx512::backward<scalar_t>(problem, scoring, dout, dq, dk, dv, extra);
    case Isa::avx2: return avx2::backward<scalar_t>(problem, scoring, dout, dq, dk, dv, extra);
#endif
    default: return baseline::backward<scalar_t>(problem, scoring, dout, dq, dk, dv, extra);
  }
}

#define FUSED_ATTENTION_INSTANTIATE(scalar_t)                                                              \
  template void attention_forward_kernel<scalar_t>(const Problem<scalar_t>&,                              \
                                                   const Scoring<attn_acc_t<scalar_t>>&,                  \
                                                   const Operand<scalar_t>&, attn_acc_t<scalar_t>*,       \
                                                   const RowIndex&);                                      \
  template void attention_backward_kernel<scalar_t>(                                                      \
      const Problem<scalar_t>&, const Scoring<attn_acc_t<scalar_t>>&, const Operand<scalar_t>&,           \
      const Operand<scalar_t>&, const Operand<scalar_t>&, const Operand<scalar_t>&,                       \
      const ExtraGradients<attn_acc_t<scalar_t>>&);
FUSED_ATTENTION_INSTANTIATE(float)
FUSED_ATTENTION_INSTANTIATE(double)
FUSED_ATTENTION_INSTANTIATE(c10::BFloat16)
FUSED_ATTENTION_INSTANTIATE(c10::Half)
#undef FUSED_ATTENTION_INSTANTIATE

}  // namespace fused_attention::cpu
