// Everything outside this project that the per-instruction-set kernel headers use, included by each
// attention_isa_*.cpp *before* it opens its namespace and target region: the kernel headers are then
// included inside `namespace fused_attention::cpu::<isa>`, where their own #includes of these are no-ops.
// (A header not listed here would be pulled into that namespace: add it here.)
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/aligned_buffer.h"
#include "cpu/attention_kernels.h"
#include "cpu/attention_problem.h"

// The instruction-set variants need GCC's target pragmas on x86-64; elsewhere only the baseline is built.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSED_ATTENTION_X86_VARIANTS 1
#include <immintrin.h>
#else
#define FUSED_ATTENTION_X86_VARIANTS 0
#endif

// The AMX variant (bfloat16 forward) needs GCC 12 or later (amx-tile / amx-bf16 targets and CPU checks).
#if FUSED_ATTENTION_X86_VARIANTS && __GNUC__ >= 12
#define FUSED_ATTENTION_AMX 1
#else
#define FUSED_ATTENTION_AMX 0
#endif
