// The CPU attention kernels of one instruction set: included by attention_isa_<isa>.cpp inside
// `namespace fused_attention::cpu::<isa>` and, for the x86 variants, inside a `#pragma GCC target`
// region, so that every helper (products, exp, row passes) is compiled for that instruction set.
//
// Why not GCC's target_clones on the kernels: their always-inline helpers are compiled for the baseline
// first, and some vector code (broadcasts above all) reaches the clone already lowered lane by lane,
// which measured several times slower than code compiled for the target throughout.
#include "cpu/attention_backward.h"
#include "cpu/attention_decode.h"
#include "cpu/attention_forward.h"

#define FUSED_ATTENTION_INSTANTIATE(scalar_t)                                                            \
  template void forward<scalar_t>(const Problem<scalar_t>&, const Scoring<attn_acc_t<scalar_t>>&,       \
                                  const Operand<scalar_t>&, attn_acc_t<scalar_t>*, const RowIndex&);   \
  template void decode<scalar_t>(const Problem<scalar_t>&, const Scoring<attn_acc_t<scalar_t>>&,        \
                                 const Operand<scalar_t>&, attn_acc_t<scalar_t>*, const RowIndex&);    \
  template void backward<scalar_t>(const Problem<scalar_t>&, const Scoring<attn_acc_t<scalar_t>>&,      \
                                   const Operand<scalar_t>&, const Operand<scalar_t>&,                 \
                                   const Operand<scalar_t>&, const Operand<scalar_t>&,                 \
                                   const ExtraGradients<attn_acc_t<scalar_t>>&);
FUSED_ATTENTION_INSTANTIATE(float)
FUSED_ATTENTION_INSTANTIATE(double)
FUSED_ATTENTION_INSTANTIATE(c10::BFloat16)
FUSED_ATTENTION_INSTANTIATE(c10::Half)
#undef FUSED_ATTENTION_INSTANTIATE
