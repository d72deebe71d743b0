// Forward of the CPU attention kernel for decode steps: a few query rows per sequence (decode_serves)
// against many keys. Such a call is bound by reading K and V, so it reads them once, from the user's
// tensors, for all the query heads that share them:
//
// - GQA packing: the rows of every query head of a kv head's group form one small matrix (G x L rows),
//   so each key and value row read from memory serves all of them.
// - No copy of K or V: products read the input rows directly where they are float (or double) rows of
//   whole vectors (a paged cache's page by page); otherwise 16 keys (K) or 64 values (V) at a time are
//   converted into an L1 buffer.
// - Split-KV: a task is (sequence, kv head, chunk of keys), or (sequence, chunk) over every kv head where
//   their token rows lie side by side (decode_chunk's sweeps). A sequence's visible keys are cut into
//   equal chunks of at most decode_chunk_keys (a function of the shape only), each task keeps its
//   rows' unnormalised output, reference maximum and sum, and a merge combines the chunks in chunk
//   order: results do not depend on the thread count or on scheduling. A group with one chunk writes its
//   output directly.
//
// Scores go through softmax_block and finish_rows (attention_forward.h), so masks, key lengths, windows,
// causal, ALiBi, softcap, sinks and the lse follow the same code as the blocked forward.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/attention_forward.h"
#include "cpu/attention_gemm.h"
#include "cpu/attention_kernels.h"
#include "cpu/attention_pack.h"
#include "cpu/attention_rows.h"
#include "cpu/attention_simd.h"

// Keys per chunk (one task's key range): at least kDecodeChunkKeys where the rows allow (a task's setup
// and its partial result, rows x value_dim, small next to reading the chunk); for long caches whose
// heads' rows lie in one run, up to kDecodeMaxChunkKeys while the call keeps kDecodeMinTasks tasks
// (S = 4096 keys of one kv head still feed 8 threads; S = 32768 of 8 kv heads go in chunks of 4096): a
// thread reads K's rows, then V's, of one chunk, and each switch costs; chunks of 4096 instead of 512
// streamed such a cache from memory 1.05-1.15x as fast (2026-12-05, cpu-decode-chunks.md). A task
// takes its chunk in score blocks whose rows x keys stay under kDecodeScoreFloats (L2; the AMX q.k's
// padding rows aside; a task over every kv head (decode_chunk's sweeps) holds one such block a kv head).
// Functions of the shape and layout only, never of the thread count.
constexpr int64_t kDecodeChunkKeys = 512;
constexpr int64_t kDecodeMaxChunkKeys = 4096;
constexpr int64_t kDecodeMinTasks = 64;
// Chunk sizes are multiples of this (a sequence's last chunk aside).
constexpr int64_t kDecodeChunkStep = 32;
constexpr int64_t kDecodeScoreFloats = 16384;
// Values converted per step where V cannot be read in place (32 KiB of float at value_dim 128: L1).
constexpr int64_t kDecodeValueStep = 64;
// Keys per pass of the P.V tiles over value rows read in place (16 KiB of float rows at value_dim 128).
constexpr int64_t kDecodeValueBlock = 32;

// Asks for `rows` rows of `bytes` bytes, `stride` bytes apart, to be brought towards the core. For caches
// whose rows of one kv head are not adjacent (FlashAttention's (B, S, Hkv, D): Hkv * D elements apart,
// 2-4 KiB at D 128 and 8 kv heads): a 4 KiB page holds one or two rows of a head, and the hardware
// prefetchers, which stay inside a page, do not follow. Also for rows read side by side (dot_keys).
// into_l1: see RowsAhead.
__attribute__((always_inline)) inline void prefetch_rows(const void* first, int64_t rows, int64_t stride,
                                                         int64_t bytes, bool into_l1 = false) {
  const RowsAhead ahead{static_cast<const char*>(first), rows, stride, bytes, into_l1};
  for (int64_t r = 0; r < rows; ++r) ahead.fetch(r);
}

// Keys ahead of the ones being read that the decode products ask for.
constexpr int64_t kDecodePrefetchKeys = 32;

// Pages of fewer tokens than this count as scattered (a contiguous KV cache is one page of S_max tokens).
constexpr int64_t kDecodeShortPage = 64;

// Whether x's rows of one head lie scattered: interleaved with the other heads' rows, or in short pages.
// Rows that follow each other for longer and are read one after another by one query row's q.k are left to
// the hardware prefetchers (software prefetch there measured no faster, with 7% of a one-row step's
// samples on its loop); the other products ask for them into L1 (RowsAhead).
template <typename scalar_t>
bool scattered_rows(const Operand<scalar_t>& x, int64_t features) {
  return x.feature_stride == 1 && (x.token_stride > features || (x.pages != nullptr && x.page_size < kDecodeShortPage));
}

// prefetch_rows for tokens [token, token + count) of (batch, head), page by page: Operand::for_each_run's
// walk, written out because it must be inlined (GCC finds a function that only reads and prefetches free
// of effects and drops its calls; tests/test_cpu_codegen.py) and for_each_run, compiled for no particular
// instruction set, cannot inline a lambda of an instruction set's namespace.
template <typename scalar_t>
__attribute__((always_inline)) inline void prefetch_tokens(const Operand<scalar_t>& x, int64_t batch, int64_t head,
                                                           int64_t token, int64_t count, int64_t features,
                                                           bool into_l1 = false) {
  while (count > 0) {
    const int64_t run = std::min(count, x.adjacent_rows(token));
    prefetch_rows(x.row(batch, head, token), run, x.token_stride * int64_t(sizeof(scalar_t)),
                  features * int64_t(sizeof(scalar_t)), into_l1);
    token += run;
    count -= run;
  }
}

// Whether a head's rows of x follow one another in runs of at least a long chunk (torch's contiguous
// (B, H, S, D) layout; attention_with_kvcache's contiguous cache is one page of S_max tokens): only there
// did longer chunks read faster (FlashAttention's (B, S, H, D) layout and pages of 16 read 0.8-0.9x as
// fast in chunks of 4096 as of 512).
template <typename scalar_t>
bool rows_in_one_run(const Operand<scalar_t>& x, int64_t features) {
  return x.feature_stride == 1 && x.token_stride == features &&
         (x.pages == nullptr || x.page_size >= kDecodeMaxChunkKeys);
}

// Keys per score block (the keys whose scores a task holds at once): rows x keys under kDecodeScoreFloats,
// and at most a long chunk where K's and V's rows each lie in one run per head (rows_in_one_run), else
// kDecodeChunkKeys: a task reads a block's K rows, then its V rows.
inline int64_t decode_block_keys(int64_t rows, bool one_run) {
  return std::clamp<int64_t>(kDecodeScoreFloats / std::max<int64_t>(rows, 1) / 64 * 64, 64,
                             one_run ? kDecodeMaxChunkKeys : kDecodeChunkKeys);
}

// Keys per chunk (one task's key range, one or more score blocks). total_keys: the visible keys of every
// (sequence, kv head) of the call. Enough chunks for kDecodeMinTasks tasks; chunks of many rows (a block
// of fewer than kDecodeChunkKeys keys) span several blocks, up to the longest chunk, so that a task's
// setup (its rows' queries) and its partial result (rows x value_dim, merged afterwards) stay small next
// to the keys it reads.
inline int64_t decode_chunk_keys(int64_t rows, int64_t total_keys, bool one_run) {
  const int64_t block = decode_block_keys(rows, one_run);
  const int64_t longest = std::max(block, one_run ? kDecodeMaxChunkKeys : kDecodeChunkKeys);
  const int64_t spread = total_keys / kDecodeMinTasks / kDecodeChunkStep * kDecodeChunkStep;  // (rounded down)
  return std::clamp<int64_t>(spread, std::min(block, kDecodeChunkKeys), longest);
}

// TransposeSum's network for vectors of `width` elements, `per_lane` to 128 bits: the input element that
// element l of level k's result takes, from a[2m] (< width) or a[2m + 1] (>= width), with the even units
// (or the odd ones). Levels k < log2(per_lane) work within 128-bit lanes.
constexpr bool transpose_in_lane(int per_lane, int k) { return (1 << k) < per_lane; }
constexpr int transpose_pick(int width, int per_lane, int k, int l, bool odd) {
  const bool in_lane = transpose_in_lane(per_lane, k);
  const int unit = in_lane ? 1 : per_lane, group = in_lane ? per_lane : width;
  const int half = group / unit / 2, base = l / group * group, i = l % group / unit, o = l % unit;
  return i < half ? base + (2 * i + odd) * unit + o : width + base + (2 * (i - half) + odd) * unit + o;
}

// out[i] = the sum of the elements of a[i] for i < width. A network of width - 1 shuffle-add steps: each
// level pairs a[2m] and a[2m + 1] into a[m], the even units of both plus their odd units, within 128-bit
// lanes first (units of one element), then across lanes (units of a lane); element i of the result then
// holds a[i]'s sum. On AVX-512, float, the in-lane levels are vshufps, which cost less than the two-source
// lane crossings (vpermt2ps) that a halves-first order needs at every level: bfloat16 decode, whose q.k
// products are fewer than float's, read L3-resident K and V 1.07x faster, float32 unchanged (2026-12-04
// record, cpu-decode-side-by-side.md).
template <typename T>
struct TransposeSum {
  using V = simd::Vec<T>;
  using Int = typename simd::Traits<T>::Int;
  using Lane = std::remove_reference_t<decltype(Int{}[0])>;
  static constexpr int width = static_cast<int>(simd::Traits<T>::width);
  static constexpr int per_lane = std::min<int>(width, 16 / static_cast<int>(sizeof(T)));  // per 128 bits
  static constexpr int levels = __builtin_ctz(static_cast<unsigned>(width));

  template <bool odd>
  static constexpr std::array<Lane, width> mask(int k) {
    std::array<Lane, width> m{};
    for (int l = 0; l < width; ++l) m[l] = static_cast<Lane>(transpose_pick(width, per_lane, k, l, odd));
    return m;
  }

  template <int k>
  static void level(V* a) {
    if constexpr (k < levels) {
      constexpr int pairs = width >> (k + 1);
#if FUSED_ATTENTION_ISA_AVX512
      if constexpr (std::is_same_v<T, float>) {  // GCC turns the generic masks into vpermt2ps
#pragma GCC unroll 8
        for (int m = 0; m < pairs; ++m) {
          const __m512 x = (__m512)a[2 * m], y = (__m512)a[2 * m + 1];
          if constexpr (transpose_in_lane(per_lane, k)) {
            a[m] = (V)_mm512_add_ps(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xDD));
          } else {  // masked: GCC 12 -Wall flags the plain form's undefined pass-through operand
            a[m] = (V)_mm512_add_ps(_mm512_mask_shuffle_f32x4(x, 0xFFFF, x, y, 0x88),
                                    _mm512_mask_shuffle_f32x4(x, 0xFFFF, x, y, 0xDD));
          }
        }
      } else
#endif
      {
        static constexpr std::array<Lane, width> lo_bits = mask<false>(k), hi_bits = mask<true>(k);
        Int lo, hi;
        std::memcpy(&lo, lo_bits.data(), sizeof(lo));
        std::memcpy(&hi, hi_bits.data(), sizeof(hi));
#pragma GCC unroll 8
        for (int m = 0; m < pairs; ++m) {
          a[m] = __builtin_shuffle(a[2 * m], a[2 * m + 1], lo) + __builtin_shuffle(a[2 * m], a[2 * m + 1], hi);
        }
      }
      level<k + 1>(a);
    }
  }

  static void run(V* a, T* out) {
#if defined(__clang__)  // no __builtin_shuffle: lane by lane
    for (int i = 0; i < width; ++i) {
      T sum = 0;
      for (int l = 0; l < width; ++l) sum += a[i][l];
      out[i] = sum;
    }
#else
    level<0>(a);
    simd::store(out, a[0]);
#endif
  }
};

// q.k with float (or double) vectors: one vector of features per step.
template <typename T>
struct FloatDot {
  using QElem = T;
  using KElem = T;
  using Operand = simd::Vec<T>;
  static constexpr int64_t features = simd::Traits<T>::width;
  static Operand load_q(const T* x) { return simd::load(x); }
  static Operand load_k(const T* x) { return simd::load(x); }
  static simd::Vec<T> add(simd::Vec<T> acc, Operand q, Operand k) { return acc + q * k; }
};

// out[r * ldo + j] = q_r . k_j for rows r < rows (row stride ldq) and the `width` key rows at k (row
// stride ldk), over `steps` steps of Dot::features features; out is of the accumulator type. Rows go in
// blocks of 4, 2, 1: a block of R rows takes the keys width / R at a time into width accumulators (one
// TransposeSum). A block of several rows reads a vector of each of its keys at a time, each serving the
// R rows, so one query load serves `keys` products: with a query load per product the loads, not the
// FMAs, were the limit (40 loads per 32 FMAs at 4 rows of 128 floats; with 4 query heads per kv head the
// step read L3-resident K and V 1.22x slower; 2026-12-04 record, cpu-decode-side-by-side.md). On Zen 4
// the hardware prefetcher did not follow keys read side by side: they are asked for ahead (`ahead`, a few
// rows per block of keys: asked for all at once before the products, 128 prefetches per 16 float keys at
// head dim 128, `perf` put 8% of a one-row step on that loop, and a step read a (B, H, S, D) cache from
// memory 1.25-1.3x slower on one thread; 2026-12-04 record, cpu-decode-memory.md). One
// row (rows == 1) reads key row after key row, one stream the prefetcher follows (1.6x faster than a
// vector of each of 16 rows in turn, neither with a software prefetch; cpu-decode-row-order.md). Never
// inlined, so that the accumulators stay in registers, and `ahead` by reference (both as gemm_tile).
template <typename Dot, typename Acc>
__attribute__((noinline)) void dot_keys(const typename Dot::QElem* q, int64_t rows, int64_t ldq,
                                        const typename Dot::KElem* k, int64_t ldk, int64_t steps, Acc* out,
                                        int64_t ldo, const RowsAhead& ahead = RowsAhead{}) {
  using S = TransposeSum<Acc>;
  using V = simd::Vec<Acc>;
  using Operand = typename Dot::Operand;
  constexpr int width = S::width;
  const auto block = [&](auto rows_per_block, int64_t r0) {
    constexpr int R = decltype(rows_per_block)::value, keys = width / R;
    const typename Dot::QElem* qr = q + r0 * ldq;
    for (int j0 = 0; j0 < width; j0 += keys) {
      const typename Dot::KElem* kj = k + j0 * ldk;
      if (r0 == 0 && ahead.first != nullptr) {
        for (int j = j0; j < j0 + keys && j < ahead.rows; ++j) ahead.fetch(j);
      }
      V acc[width] = {};
      const auto add = [&](int r, int j, Operand qd, Operand kd) {
        V& a = acc[r * keys + j];
        a = Dot::add(a, qd, kd);
      };
      if (R == 1 && rows == 1) {  // (R: no dead branch in the larger blocks)
#pragma GCC unroll 16
        for (int j = 0; j < keys; ++j) {
          for (int64_t d = 0; d < steps; ++d) {
            const Operand kd = Dot::load_k(kj + j * ldk + d * Dot::features);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) add(r, j, Dot::load_q(qr + r * ldq + d * Dot::features), kd);
          }
        }
      } else {
        for (int64_t d = 0; d < steps; ++d) {
          Operand kd[keys];
#pragma GCC unroll 16
          for (int j = 0; j < keys; ++j) kd[j] = Dot::load_k(kj + j * ldk + d * Dot::features);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const Operand qd = Dot::load_q(qr + r * ldq + d * Dot::features);
#pragma GCC unroll 16
            for (int j = 0; j < keys; ++j) add(r, j, qd, kd[j]);
          }
        }
      }
      alignas(64) Acc lanes[width];  // lane r * keys + j: row r0 + r, key j0 + j
      S::run(acc, lanes);
      for (int r = 0; r < R; ++r) std::memcpy(out + (r0 + r) * ldo + j0, lanes + r * keys, keys * sizeof(Acc));
    }
  };
  constexpr int four = width >= 4 ? 4 : width;
  int64_t r0 = 0;
  for (; r0 + four <= rows; r0 += four) block(std::integral_constant<int, four>{}, r0);
  if (rows - r0 >= 2) {
    block(std::integral_constant<int, 2>{}, r0);
    r0 += 2;
  }
  if (rows > r0) block(std::integral_constant<int, 1>{}, r0);
}

#if defined(FUSED_ATTENTION_BF16_DOT)
#include "cpu/attention_decode_bf16.h"
#endif
#if FUSED_ATTENTION_ISA_AVX512
#include "cpu/attention_decode_widen.h"
#endif
#if defined(FUSED_ATTENTION_AMX_DECODE)
#include "cpu/attention_decode_amx.h"
#endif

// load_rows (attention_pack.h), with bfloat16 rows widened by a loop the compiler vectorizes (the
// element-wise conversion cost more than reading the rows).
template <typename scalar_t, typename acc_t>
inline void decode_load_rows(const Operand<scalar_t>& x, int64_t batch, int64_t head, int64_t token0, int64_t rows,
                             int64_t features, acc_t* dst, int64_t ld) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if (x.feature_stride == 1) {
      for (int64_t r = 0; r < rows; ++r) {
        const c10::BFloat16* src = x.row(batch, head, token0 + r);
        float* out = dst + r * ld;
        for (int64_t f = 0; f < features; ++f) {
          uint16_t bits;
          std::memcpy(&bits, src + f, sizeof(bits));
          const uint32_t wide = uint32_t{bits} << 16;  // bfloat16 is the top half of a float
          std::memcpy(out + f, &wide, sizeof(wide));
        }
        std::fill(out + features, out + ld, 0.0f);
      }
      return;
    }
  }
  load_rows(x, batch, head, token0, rows, features, dst, ld);
}

// Whether rows of x can be read in place as acc_t rows of whole vectors (else they are converted).
template <typename scalar_t, typename acc_t>
inline bool readable_in_place(const Operand<scalar_t>& x, int64_t features) {
  return std::is_same_v<scalar_t, acc_t> && x.feature_stride == 1 && features % simd::Traits<acc_t>::width == 0;
}

// Per-thread buffers of the decode tasks.
template <typename acc_t>
struct DecodeBuffers {
  int64_t block, ldq, lds, ldv;  // block: keys per score block (decode_block_keys)
  AlignedVector<acc_t> q, scores, out, row_max, row_sum, anchor, keys, values;
  AlignedVector<c10::BFloat16> q16;  // the query rows as they are, for dot_keys with Bf16Dot (rows x head_dim)
  AlignedVector<float> qw;           // the query rows in WidenDot's layout (rows x head_dim)
  std::vector<const void*> rows;   // a chunk's value rows, for values_bf16
  std::vector<uint8_t> lazy;
#if defined(FUSED_ATTENTION_AMX_DECODE)
  AmxDecodeBuffers amx;  // sized by decode when the tiles serve (rows then a multiple of 16)
#endif
  DecodeBuffers(int64_t rows, int64_t block, int64_t head_dim, int64_t value_dim)
      : block(block),
        ldq(round_up<int64_t>(head_dim, simd::Traits<acc_t>::width)),
        lds(round_up<int64_t>(block, simd::Traits<acc_t>::width) + 16),  // + 16: see kScoreStride
        ldv(round_up<int64_t>(value_dim, simd::Traits<acc_t>::width)),
        q(rows * ldq),
        scores(rows * lds),
        out(rows * ldv),
        row_max(rows),
        row_sum(rows),
        anchor(rows),
        keys(simd::Traits<acc_t>::width * ldq),
        values(kDecodeValueStep * ldv),
        lazy(rows) {}
  RowState<acc_t> state(int64_t row) {
    return {row_max.data() + row, row_sum.data() + row, anchor.data() + row, lazy.data() + row};
  }
};

// Whether the products read these bfloat16 rows in place, 32 features per load (AVX-512: dot_keys with
// Bf16Dot, buf.q16 filled, or WidenDot, buf.qw filled; values_bf16).
template <typename scalar_t>
constexpr bool bf16_dot(const Operand<scalar_t>& k, int64_t dim) {
#if FUSED_ATTENTION_ISA_AVX512
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return k.feature_stride == 1 && dim % 32 == 0;
#endif
  return false;
}

// Whether q.k asks for keys ahead: rows scattered, or read in place side by side (several query rows;
// dot_keys), which the hardware prefetcher does not follow. (Keys converted first are read row by row.)
template <typename scalar_t, typename acc_t>
bool decode_prefetches_keys(const Operand<scalar_t>& k, int64_t features, int64_t rows) {
  const bool side_by_side = rows > 1 && (readable_in_place<scalar_t, acc_t>(k, features) || bf16_dot(k, features));
  return side_by_side || scattered_rows(k, features);
}

// scores[r * lds + j] = q_r . k_(j0 + j) for rows r < rows (buf's from row0 on) and keys j < n of
// (sequence, kv head), and the same up to round_up(n, width) (zero keys past n). Keys ahead are asked for up
// to key j0 + reach (reach >= n: the keys a later call reads; decode_chunk's sweeps).
template <typename scalar_t, typename acc_t>
void decode_scores(const Problem<scalar_t>& problem, const Sequence& seq, int64_t kv_head, int64_t j0, int64_t n,
                   int64_t row0, int64_t rows, DecodeBuffers<acc_t>& buf, acc_t* scores, int64_t reach = 0) {
  reach = std::max(reach, n);
  constexpr int64_t width = simd::Traits<acc_t>::width;
#if defined(FUSED_ATTENTION_AMX_DECODE)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (amx_decode(problem, rows, true)) {
      return amx_scores(problem, seq, kv_head, j0, n, buf.q16.data() + row0 * problem.head_dim, rows, buf.amx,
                        scores, buf.lds);
    }
  }
#endif
  const Operand<scalar_t>& k = problem.k;
  const int64_t dim = problem.head_dim, vectors = buf.ldq / width;
  const acc_t* q = buf.q.data() + row0 * buf.ldq;
  const bool in_place = readable_in_place<scalar_t, acc_t>(k, dim);
  const bool ahead = decode_prefetches_keys<scalar_t, acc_t>(k, dim, rows);
  const bool scattered = scattered_rows(k, dim);
  for (int64_t b = 0; b < n; b += width) {
    const int64_t count = std::min(width, n - b);
    const acc_t* keys = buf.keys.data();
    int64_t ldk = buf.ldq;
    const int64_t token = seq.k_start + j0 + b;
    const bool whole = count == width && k.adjacent_rows(token) >= width;  // one run of `width` rows
    // The keys kDecodePrefetchKeys ahead: asked for by dot_keys when they are one run and it reads the
    // rows in place, else here.
    RowsAhead next;
    if (ahead && b + kDecodePrefetchKeys < reach) {
      const int64_t later = std::min(width, reach - b - kDecodePrefetchKeys), at = token + kDecodePrefetchKeys;
      if (whole && (in_place || bf16_dot(k, dim)) && k.adjacent_rows(at) >= later) {
        next = {reinterpret_cast<const char*>(k.row(seq.batch, kv_head, at)), later,
                k.token_stride * int64_t(sizeof(scalar_t)), dim * int64_t(sizeof(scalar_t)), !scattered};
      } else {
        prefetch_tokens(k, seq.batch, kv_head, at, later, dim, !scattered);
      }
    }
#if FUSED_ATTENTION_ISA_AVX512
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_dot(k, dim) && whole) {
#if defined(FUSED_ATTENTION_BF16_DOT)
        dot_keys<Bf16Dot>(buf.q16.data() + row0 * dim, rows, dim, k.row(seq.batch, kv_head, token), k.token_stride,
                          dim / Bf16Dot::features, scores + b, buf.lds, next);
#else
        dot_keys<WidenDot>(buf.qw.data() + row0 * dim, rows, dim, k.row(seq.batch, kv_head, token), k.token_stride,
                           dim / WidenDot::features, scores + b, buf.lds, next);
#endif
        continue;
      }
    }
#endif
    if (in_place && whole) {
      keys = reinterpret_cast<const acc_t*>(k.row(seq.batch, kv_head, token));
      ldk = k.token_stride;
    } else {
      decode_load_rows(k, seq.batch, kv_head, token, count, dim, buf.keys.data(), buf.ldq);
      std::fill(buf.keys.begin() + count * buf.ldq, buf.keys.end(), acc_t(0));
    }
    dot_keys<FloatDot<acc_t>>(q, rows, buf.ldq, keys, ldk, vectors, scores + b, buf.lds, next);
  }
}

// acc[r * ldv + f] += sum_j p[r * lds + j] v_(j0 + j)[f] over keys j < n. Values ahead are asked for up to
// key j0 + reach (as decode_scores).
template <typename scalar_t, typename acc_t>
void decode_values(const Problem<scalar_t>& problem, const Sequence& seq, int64_t kv_head, int64_t j0, int64_t n,
                   const acc_t* p, int64_t rows, DecodeBuffers<acc_t>& buf, acc_t* acc, int64_t reach = 0) {
  reach = std::max(reach, n);
  constexpr int64_t width = simd::Traits<acc_t>::width;
  const Operand<scalar_t>& v = problem.v;
  const int64_t value_dim = problem.value_dim;
  const bool scattered = scattered_rows(v, value_dim);
  // B rows (ldb apart, whole vectors) straight from where they are: no panel copy, kDecodeValueBlock keys
  // at a time. Where rows are whole multiples of a quarter of the register file (8 vectors with 32
  // registers: value_dim 128 in float on AVX-512; 4 with 16), tiles of 2 x that many vectors read the
  // block's value rows from memory front to back (gemm_blocks' 4-vector tiles read half rows, which
  // streamed V at 0.6-0.8x the rate in a microbenchmark on AVX-512): for all rows up to 4 (a decode step
  // bound by memory), else for the first two, and the other rows read the block from L1 through
  // gemm_blocks, whose larger tiles load less per product (8 causal rows were 10% slower without).
  // in_place: values are the cache's rows, one run of `count` (not a buffer). Each block's first tile asks
  // for the rows kDecodePrefetchKeys ahead, one per key (RowsAhead: into L1, or L2 where scattered), and
  // rows ahead past the run's end (the next page's first ones) are asked for at once; values converted
  // into a buffer ask only where scattered (the rest is left to the hardware prefetchers). Spread or at
  // once made no difference to scattered rows (FlashAttention's layout, pages of 16). Left to the hardware
  // prefetchers, P V alone streamed V 0.76x as fast in a microbenchmark and the whole step 0.82x on a
  // quiet memory; asked for a block at a time, 0.9-0.95x (2026-12-06, cpu-decode-l1-prefetch.md,
  // cpu-decode-zen5-interleave.md).
  const auto product = [&](const acc_t* values, int64_t ldb, int64_t key, int64_t count, bool in_place) {
    constexpr int64_t tile_vectors = simd::kVectorRegisters / 4;
    const int64_t vectors = (value_dim + width - 1) / width;
    const int64_t first = vectors % tile_vectors != 0 ? 0 : rows <= 4 ? rows : 2;
    const bool tiles_ask = in_place && first > 0, asks = tiles_ask || scattered;
    // Blocks end at multiples of kDecodeValueBlock keys from the call's first key, not the run's: a run that
    // a call boundary at such a multiple cuts in two (decode_chunk's sweeps) sums as it does whole.
    for (int64_t k0 = 0, kc = 0; k0 < count; k0 += kc) {
      kc = std::min(kDecodeValueBlock - (key + k0) % kDecodeValueBlock, count - k0);
      const acc_t* a = p + key + k0;
      const acc_t* b = values + k0 * ldb;
      const int64_t ahead = key + k0 + kDecodePrefetchKeys;
      // The rows ahead within this run (the first tile asks for them), then those past it at once.
      const int64_t later = tiles_ask ? std::clamp<int64_t>(count - k0 - kDecodePrefetchKeys, 0, kc) : 0;
      if (asks && ahead + later < std::min(reach, ahead + kc)) {
        prefetch_tokens(v, seq.batch, kv_head, seq.k_start + j0 + ahead + later,
                        std::min(reach, ahead + kc) - ahead - later, value_dim, !scattered);
      }
      for (int64_t v0 = 0; v0 < vectors && first > 0; v0 += tile_vectors) {
        for (int64_t r = 0; r < first; r += 2) {
          const acc_t* ar = a + r * buf.lds;
          acc_t* cr = acc + r * buf.ldv + v0 * width;
          const acc_t* br = b + v0 * width;
          const RowsAhead next{reinterpret_cast<const char*>(b + kDecodePrefetchKeys * ldb),
                               v0 == 0 && r == 0 ? later : 0, ldb * int64_t(sizeof(acc_t)),
                               value_dim * int64_t(sizeof(acc_t)), !scattered};
          if (first - r >= 2 && next.rows > 0) {
            gemm_tile<acc_t, 2, tile_vectors, true>(kc, ar, buf.lds, 1, br, ldb, cr, buf.ldv, true, next);
          } else if (first - r >= 2) {
            gemm_tile<acc_t, 2, tile_vectors>(kc, ar, buf.lds, 1, br, ldb, cr, buf.ldv, true);
          } else if (next.rows > 0) {
            gemm_tile<acc_t, 1, tile_vectors, true>(kc, ar, buf.lds, 1, br, ldb, cr, buf.ldv, true, next);
          } else {
            gemm_tile<acc_t, 1, tile_vectors>(kc, ar, buf.lds, 1, br, ldb, cr, buf.ldv, true);
          }
        }
      }
      if (rows == first) continue;
      const auto panel_of = [&](int64_t k1, int64_t, int64_t vec, int64_t) {
        return std::pair<const acc_t*, int64_t>(b + k1 * ldb + vec * width, ldb);
      };
      gemm_blocks(rows - first, value_dim, kc, a + first * buf.lds, buf.lds, 1, panel_of, acc + first * buf.ldv,
                  buf.ldv, true);
    }
  };
#if FUSED_ATTENTION_ISA_AVX512
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    bool on_tiles = false;  // the AMX products (attention_decode_amx.h)
#if defined(FUSED_ATTENTION_AMX_DECODE)
    on_tiles = amx_decode(problem, rows);
#endif
    if (on_tiles || bf16_dot(v, value_dim)) {
      // The chunk's value rows (and those asked for ahead) looked up once, page by page (row() divides by
      // the page size, and values_bf16 asks for each row in every tile and to prefetch it).
      const int64_t known = std::min(reach, n + kDecodePrefetchKeys);
      buf.rows.resize(known);
      v.for_each_run(seq.batch, kv_head, seq.k_start + j0, known, [&](const scalar_t* first, int64_t j, int64_t run) {
        for (int64_t r = 0; r < run; ++r) buf.rows[j + r] = first + r * v.token_stride;
      });
      const auto row_of = [&](int64_t j) { return static_cast<const c10::BFloat16*>(buf.rows[j]); };
#if defined(FUSED_ATTENTION_AMX_DECODE)
      if (on_tiles) return amx_values(rows, n, row_of, value_dim, buf.amx, acc, buf.ldv, scattered);
#endif
      return values_bf16(rows, n, known, p, buf.lds, row_of, value_dim, acc, buf.ldv, !scattered);
    }
  }
#endif
  if (readable_in_place<scalar_t, acc_t>(v, value_dim)) {  // run by run of adjacent rows (a page of a paged cache)
    v.for_each_run(seq.batch, kv_head, seq.k_start + j0, n, [&](const scalar_t* first, int64_t b, int64_t count) {
      product(reinterpret_cast<const acc_t*>(first), v.token_stride, b, count, true);
    });
    return;
  }
  for (int64_t b = 0; b < n; b += kDecodeValueStep) {
    const int64_t count = std::min(kDecodeValueStep, n - b);
    decode_load_rows(v, seq.batch, kv_head, seq.k_start + j0 + b, count, value_dim, buf.values.data(), buf.ldv);
    product(buf.values.data(), buf.ldv, b, count, false);
  }
}

// A task's rows of kv head `kv_head` from buf's row row0 on (row row0 + g * L + i: query row i of head
// kv_head * G + g): nothing seen yet (output, maximum, sum), and their query rows loaded for the products.
template <typename scalar_t, typename acc_t>
void decode_begin(const Problem<scalar_t>& problem, const Sequence& seq, int64_t kv_head, int64_t row0,
                  DecodeBuffers<acc_t>& buf) {
  const int64_t group = problem.heads_q / problem.heads_kv, len = seq.len_q, rows = group * len;
  const int64_t dim = problem.head_dim;
  std::fill_n(buf.out.begin() + row0 * buf.ldv, rows * buf.ldv, acc_t(0));
  std::fill_n(buf.row_max.begin() + row0, rows, -std::numeric_limits<acc_t>::infinity());
  std::fill_n(buf.row_sum.begin() + row0, rows, acc_t(0));
  std::fill_n(buf.lazy.begin() + row0, rows, uint8_t(1));
  for (int64_t g = 0; g < group; ++g) {
    decode_load_rows(problem.q, seq.batch, kv_head * group + g, seq.q_start, len, dim,
                     buf.q.data() + (row0 + g * len) * buf.ldq, buf.ldq);
  }
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (bf16_dot(problem.k, dim)) {
      [[maybe_unused]] const size_t need = static_cast<size_t>((row0 + rows) * dim);
#if FUSED_ATTENTION_ISA_AVX512 && !defined(FUSED_ATTENTION_BF16_DOT)
      if (buf.qw.size() < need) buf.qw.resize(need);
      widen_queries(buf.q.data() + row0 * buf.ldq, rows, buf.ldq, dim, buf.qw.data() + row0 * dim);  // WidenDot's rows
#endif
#if defined(FUSED_ATTENTION_BF16_DOT) || defined(FUSED_ATTENTION_AMX_DECODE)
      // Bf16Dot's rows, or the AMX tiles' (whose rows re-scored one at a time take WidenDot's above)
      if (buf.q16.size() < need) buf.q16.resize(need);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* src = problem.q.row(seq.batch, kv_head * group + r / len, seq.q_start + r % len);
        c10::BFloat16* dst = buf.q16.data() + (row0 + r) * dim;
        if (problem.q.feature_stride == 1) {  // (the element loop below took 5% of an 8-row AMX step)
          std::memcpy(dst, src, dim * sizeof(scalar_t));
          continue;
        }
        for (int64_t f = 0; f < dim; ++f) dst[f] = src[f * problem.q.feature_stride];
      }
#endif
    }
  }
}

// The softmax of kv head kv_head's rows from buf's row row0 on over keys [jb, jb + nb), whose q.k
// decode_scores wrote: the probabilities replace the scores, the rows' output is rescaled to their new
// maximum (the blocked forward's online softmax).
template <typename scalar_t, typename acc_t>
void decode_softmax(const Problem<scalar_t>& problem, const Scoring<acc_t>& scoring, const Sequence& seq,
                    int64_t kv_head, int64_t jb, int64_t nb, int64_t row0, DecodeBuffers<acc_t>& buf) {
  const int64_t group = problem.heads_q / problem.heads_kv, len = seq.len_q;
  acc_t* scores = buf.scores.data();
  for (int64_t g = 0; g < group; ++g) {
    const int64_t first = row0 + g * len;
    // A row whose lazy attempt overflowed gets its q.k again.
    const auto rescore = [&](int64_t r, acc_t* s) {
      decode_scores(problem, seq, kv_head, jb, nb, first + r, 1, buf, s);
    };
#if defined(FUSED_ATTENTION_AMX_DECODE)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (amx_decode(problem, group * len)) {  // P straight into the tiles' two bf16 parts (the scores stay)
        softmax_block(scoring, seq, kv_head * group + g, 0, len, jb, nb, scores + first * buf.lds, buf.lds,
                      static_cast<acc_t*>(nullptr), 0, buf.out.data() + first * buf.ldv, buf.ldv, buf.state(first),
                      [](int64_t, const acc_t*) {}, rescore, AmxDecodeProbs{&buf.amx, first});
        continue;
      }
    }
#endif
    softmax_block(scoring, seq, kv_head * group + g, 0, len, jb, nb, scores + first * buf.lds, buf.lds,
                  scores + first * buf.lds, buf.lds, buf.out.data() + first * buf.ldv, buf.ldv, buf.state(first),
                  [](int64_t, const acc_t*) {}, rescore);
  }
}

// Whether x's token rows hold every head's row side by side (FlashAttention's (B, S, Hkv, D) layout, paged
// or not): a run of tokens is then one run of memory for all heads.
template <typename scalar_t>
bool token_rows_whole(const Operand<scalar_t>& x, int64_t heads, int64_t features) {
  return heads > 1 && x.feature_stride == 1 && x.head_stride == features && x.token_stride == heads * features;
}

// Keys per sweep of a task over several kv heads (a multiple of kDecodeValueBlock, of kDecodeValueStep and of
// the widest vector: the blocks of q.k and P V then never straddle a sweep's edge).
constexpr int64_t kDecodeSweepKeys = 64;
static_assert(kDecodeSweepKeys % kDecodeValueBlock == 0 && kDecodeSweepKeys % kDecodeValueStep == 0 &&
              kDecodeSweepKeys % simd::Traits<double>::width == 0 && kDecodeSweepKeys % simd::Traits<float>::width == 0);

// One task: keys [j0, j0 + n) of the sequence for kv heads [first_head, first_head + heads), all rows of
// their groups (kv head first_head + h's rows from buf's row h * G * L on; row g * L + i of a head is query
// row i of its query head g). Leaves the rows' unnormalised output in buf.out (row stride buf.ldv) and their
// reference maximum and sum in buf.row_max / buf.row_sum. Score block after score block, the rows' softmax
// state carried across; each block's first keys (and values, where scattered) asked for early, the products
// ask for those 32 ahead.
//
// Several kv heads (K and V of token_rows_whole layout) take each block's q.k and P V kDecodeSweepKeys keys
// at a time across the heads, in the same blocks as one head's task (so the same bits): a sweep reads whole
// token rows, one run of memory, while each head's products ask for its rows ahead into the next sweep. Head
// after head over a chunk reads a head's 512 bytes of each 4 KiB token row (float, D 128, 8 kv heads): 0.8-0.9x
// as fast from memory in a microbenchmark on an Emerald Rapids; in the kernel, S 32768, sweeps read float32
// 1.08-1.10x and bfloat16 1.02-1.09x as fast (2026-12-07, decode-sweeps.md).
template <typename scalar_t, typename acc_t>
void decode_chunk(const Problem<scalar_t>& problem, const Scoring<acc_t>& scoring, const Sequence& seq,
                  int64_t first_head, int64_t heads, int64_t j0, int64_t n, DecodeBuffers<acc_t>& buf) {
  const int64_t rows = problem.heads_q / problem.heads_kv * seq.len_q;
  const int64_t sweep = heads > 1 ? kDecodeSweepKeys : buf.block;
  const bool keys_early = decode_prefetches_keys<scalar_t, acc_t>(problem.k, problem.head_dim, rows);
  const bool values_early = scattered_rows(problem.v, problem.value_dim);
  const bool keys_into_l1 = !scattered_rows(problem.k, problem.head_dim);
  for (int64_t h = 0; h < heads; ++h) decode_begin(problem, seq, first_head + h, h * rows, buf);
  for (int64_t b0 = 0; b0 < n; b0 += buf.block) {
    const int64_t jb = j0 + b0, nb = std::min(buf.block, n - b0), first = std::min(nb, kDecodePrefetchKeys);
    for (int64_t h = 0; h < heads && keys_early; ++h) {
      prefetch_tokens(problem.k, seq.batch, first_head + h, seq.k_start + jb, first, problem.head_dim, keys_into_l1);
    }
    for (int64_t s0 = 0; s0 < nb; s0 += sweep) {
      for (int64_t h = 0; h < heads; ++h) {
        decode_scores(problem, seq, first_head + h, jb + s0, std::min(sweep, nb - s0), h * rows, rows, buf,
                      buf.scores.data() + h * rows * buf.lds + s0, nb - s0);
      }
    }
    for (int64_t h = 0; h < heads && values_early; ++h) {
      prefetch_tokens(problem.v, seq.batch, first_head + h, seq.k_start + jb, first, problem.value_dim);
    }
    for (int64_t h = 0; h < heads; ++h) decode_softmax(problem, scoring, seq, first_head + h, jb, nb, h * rows, buf);
    for (int64_t s0 = 0; s0 < nb; s0 += sweep) {
      for (int64_t h = 0; h < heads; ++h) {
        decode_values(problem, seq, first_head + h, jb + s0, std::min(sweep, nb - s0),
                      buf.scores.data() + h * rows * buf.lds + s0, rows, buf, buf.out.data() + h * rows * buf.ldv,
                      nb - s0);
      }
    }
  }
}

// A task: a chunk of kv heads [kv_head, kv_head + heads) of a sequence (one head, or every head: sweeps);
// head kv_head + h's partial result in slot slot + h * chunks; slot -1 when it is the group's only chunk
// (written directly).
struct DecodeTask {
  int64_t sequence, kv_head, heads, key, keys, slot, chunks;
};

// Whether a call's tasks sweep every kv head (decode_chunk): K's and V's token rows hold every head
// side by side and each kv head's rows are few (a step bound by reading the cache; the AMX products, and
// more rows, keep a task per kv head).
template <typename scalar_t>
bool decode_sweeps(const Problem<scalar_t>& problem, int64_t max_rows, bool on_tiles) {
  return !on_tiles && max_rows <= 16 && token_rows_whole(problem.k, problem.heads_kv, problem.head_dim) &&
         token_rows_whole(problem.v, problem.heads_kv, problem.value_dim);
}

template <typename scalar_t>
void decode(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,
            const Operand<scalar_t>& out, attn_acc_t<scalar_t>* lse, const RowIndex& lse_index) {
  using acc_t = attn_acc_t<scalar_t>;
  const int64_t group = problem.heads_q / problem.heads_kv;
  const int64_t ldv = round_up<int64_t>(problem.value_dim, simd::Traits<acc_t>::width);
  int64_t max_rows = 1;
  int64_t total_keys = 0;
  std::vector<std::pair<int64_t, int64_t>> visible_keys(problem.sequences.size());  // each sequence's [lo, hi)
  for (size_t s = 0; s < problem.sequences.size(); ++s) {
    const Sequence& seq = problem.sequences[s];
    if (seq.len_q == 0) continue;
    max_rows = std::max(max_rows, group * seq.len_q);
    visible_keys[s] = scoring.rules.block_keys(seq, 0, seq.len_q);
    total_keys += std::max<int64_t>(visible_keys[s].second - visible_keys[s].first, 0) * problem.heads_kv;
  }
  const bool one_run = rows_in_one_run(problem.k, problem.head_dim) && rows_in_one_run(problem.v, problem.value_dim);
  bool on_tiles = false;
#if defined(FUSED_ATTENTION_AMX_DECODE)
  on_tiles = amx_decode(problem, max_rows, true);
#endif
  const int64_t chunk = decode_chunk_keys(max_rows, total_keys, one_run);
  const int64_t block = decode_block_keys(max_rows, one_run);
  // Tasks over every kv head where there are 8 a thread (one sequence of 8192 keys on 2 threads; at 4096 keys,
  // 4 a thread, bfloat16 steps ran 0.89x as fast as with tasks per kv head). Results are the same either way.
  int64_t total_chunks = 0;
  for (size_t s = 0; s < problem.sequences.size(); ++s) {
    const int64_t visible = std::max<int64_t>(visible_keys[s].second - visible_keys[s].first, 0);
    if (problem.sequences[s].len_q > 0) total_chunks += std::max<int64_t>(1, (visible + chunk - 1) / chunk);
  }
  const bool sweeps = decode_sweeps(problem, max_rows, on_tiles) && total_chunks >= 8 * at::get_num_threads();

  // Tasks in (sequence, chunk, kv head) order; partial results of split groups in slots of max_rows rows.
  std::vector<DecodeTask> tasks;
  struct Split {
    int64_t sequence, kv_head, first_slot, chunks;
  };
  std::vector<Split> splits;
  int64_t slots = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(problem.sequences.size()); ++s) {
    const Sequence& seq = problem.sequences[s];
    if (seq.len_q == 0) continue;
    const int64_t lo = visible_keys[s].first, hi = visible_keys[s].second;  // (no structured binding: lambdas use them)
    // The visible keys in the fewest chunks of at most `chunk` keys, equal to within kDecodeChunkStep:
    // chunks at fixed multiples of `chunk` left a last one of a few keys per kv head, and the threads'
    // contiguous shares of the chunk-major tasks went one to the full chunks, one to the short ones
    // (S = 520, 8 kv heads, 2 threads: 2.1x the time of S = 512).
    const int64_t visible = std::max<int64_t>(hi - lo, 0);
    const int64_t chunks = std::max<int64_t>(1, (visible + chunk - 1) / chunk);
    const int64_t steps = (visible + kDecodeChunkStep - 1) / kDecodeChunkStep, base = steps / chunks, extra = steps % chunks;
    const auto bound = [&](int64_t c) { return std::min(hi, lo + kDecodeChunkStep * (c * base + std::min(c, extra))); };
    // Chunk-major: consecutive tasks (one thread's share) read the same key rows of every kv head, so a
    // cache that interleaves heads ((B, S, Hkv, D), FlashAttention's layout) is read line after line,
    // not 1 / Hkv of each row region per pass. A (sequence, kv head)'s chunks keep consecutive slots.
    for (int64_t h = 0; h < problem.heads_kv && chunks > 1; ++h) splits.push_back({s, h, slots + h * chunks, chunks});
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = bound(c), end = bound(c + 1);
      const int64_t heads = sweeps ? problem.heads_kv : 1;
      for (int64_t h = 0; h < problem.heads_kv; h += heads) {
        tasks.push_back({s, h, heads, begin, std::max<int64_t>(end - begin, 0), chunks > 1 ? slots + h * chunks + c : -1,
                         chunks});
      }
    }
    if (chunks > 1) slots += problem.heads_kv * chunks;
  }
  AlignedVector<acc_t> partial_out(slots * max_rows * ldv), partial_max(slots * max_rows), partial_sum(slots * max_rows);

  const auto finish = [&](const Sequence& seq, int64_t kv_head, acc_t* acc, const acc_t* row_max, const acc_t* row_sum) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = kv_head * group + g, first = g * seq.len_q;
      finish_rows(seq, head, 0, seq.len_q, problem.value_dim, acc + first * ldv, ldv, row_max + first,
                  row_sum + first, out, lse, lse_index, scoring.sink(head));
    }
  };

  int64_t buffer_rows = sweeps ? problem.heads_kv * max_rows : max_rows;
#if defined(FUSED_ATTENTION_AMX_DECODE)
  // Tile products write whole 16-row tiles: the buffers get the padding rows.
  if (on_tiles) buffer_rows = round_up<int64_t>(max_rows, tiles::kRows);
#endif

  // The threads take runs of tasks of equal cost (a batch of caches of unequal lengths: one of 2048 keys,
  // three of 1, gave one of two threads every long task when split by count).
  const auto cost = [&](int64_t t) {
    return task_cost(tasks[t].heads * group * problem.sequences[tasks[t].sequence].len_q, tasks[t].keys);
  };
  parallel_for_balanced(static_cast<int64_t>(tasks.size()), cost, [&](TaskClaims& claims) {
    const simd::FlushDenormals flush;
    DecodeBuffers<acc_t> buf(buffer_rows, block, problem.head_dim, problem.value_dim);
#if defined(FUSED_ATTENTION_AMX_DECODE)
    std::optional<tiles::Scope> scope;
    if (on_tiles) {
      buf.amx = AmxDecodeBuffers(max_rows, buffer_rows, block, problem.head_dim, problem.value_dim,
                                 amx_decode(problem, max_rows));
      scope.emplace();
    }
#endif
    for (int64_t t : claims) {
      const DecodeTask& task = tasks[t];
      const Sequence& seq = problem.sequences[task.sequence];
      const int64_t rows = group * seq.len_q;
      decode_chunk(problem, scoring, seq, task.kv_head, task.heads, task.key, task.keys, buf);
      for (int64_t h = 0; h < task.heads; ++h) {
        acc_t* o = buf.out.data() + h * rows * ldv;
        const acc_t *m = buf.row_max.data() + h * rows, *l = buf.row_sum.data() + h * rows;
        if (task.slot < 0) {
          finish(seq, task.kv_head + h, o, m, l);
          continue;
        }
        const int64_t slot = task.slot + h * task.chunks;
        std::copy_n(o, rows * ldv, partial_out.data() + slot * max_rows * ldv);
        std::copy_n(m, rows, partial_max.data() + slot * max_rows);
        std::copy_n(l, rows, partial_sum.data() + slot * max_rows);
      }
    }
  });

  // The merge: each row's chunks rescaled to their largest reference and summed in chunk order.
  at::parallel_for(0, static_cast<int64_t>(splits.size()), 1, [&](int64_t begin, int64_t end) {
    constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    const simd::FlushDenormals flush;
    AlignedVector<acc_t> acc(max_rows * ldv), row_max(max_rows), row_sum(max_rows);
    for (int64_t t = begin; t < end; ++t) {
      const Split& split = splits[t];
      const Sequence& seq = problem.sequences[split.sequence];
      const int64_t rows = group * seq.len_q;
      for (int64_t r = 0; r < rows; ++r) {
        acc_t top = neg_inf;
        for (int64_t c = 0; c < split.chunks; ++c) {
          const acc_t m = partial_max[(split.first_slot + c) * max_rows + r];
          top = m > top || std::isnan(m) ? m : top;  // NaN spreads
        }
        acc_t* o = acc.data() + r * ldv;
        std::fill(o, o + ldv, acc_t(0));
        acc_t total = 0;
        for (int64_t c = 0; c < split.chunks; ++c) {
          const int64_t slot = split.first_slot + c;
          const acc_t m = partial_max[slot * max_rows + r];
          if (m == neg_inf) continue;  // the chunk showed this row nothing
          const acc_t factor = std::exp(m - top);
          total += partial_sum[slot * max_rows + r] * factor;
          const acc_t* part = partial_out.data() + (slot * max_rows + r) * ldv;
          for (int64_t f = 0; f < ldv; ++f) o[f] += part[f] * factor;
        }
        row_max[r] = top;
        row_sum[r] = total;
      }
      finish(seq, split.kv_head, acc.data(), row_max.data(), row_sum.data());
    }
  });
}
