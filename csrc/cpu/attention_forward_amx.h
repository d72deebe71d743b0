// Forward of the CPU attention kernel for bfloat16 inputs on AMX: the same online softmax as
// attention_forward.h (softmax_block and finish_rows, in float), with Q K^T and P V as tile products.
// K and V of every (sequence, kv head) are packed once into B tiles. P goes into P V as two bfloat16
// parts (hi + lo: 16 significant bits), each V tile multiplied by both: the cpu backend promises float32 arithmetic,
// and P rounded to bfloat16 alone (torch's CPU flash kernel, FlashAttention) put outputs of rows that one
// key dominates 2.2 bfloat16 half-ulps from the exact result (bound: 2; tests/test_cpu_attention.py,
// test_alibi_rows_across_many_key_blocks, on a Xeon with AMX).
//
// Key blocks start at multiples of 32 keys (one B tile of V): keys before a block's first visible one
// get -inf scores from softmax_block like any hidden key.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu/attention_amx.h"
#include "cpu/attention_forward.h"


// K packed for Q K^T (key tile t of 16 keys, feature chunk d of 32: tile (d, t) at (t * d_tiles + d) *
// 512) and V for P V (key chunk c of 32, feature tile f of 16: tile (c, f) at (c * f_tiles + f) * 512),
// zero past the sequence's keys (up to a multiple of 32) and features.
struct PackedKeys {
  int64_t heads_kv, d_tiles, f_tiles;
  std::vector<int64_t> key_chunks, base;  // per sequence: 32-key chunks, offset of its head 0 in chunks
  // Not zero-filled as a whole (3-5% of a 128-token call): the vector packing writes every element of
  // every tile but those of a sequence's last 32 keys, which are zeroed first (all of them otherwise).
  AlignedArray<c10::BFloat16> keys, values;

  // local: room for one (sequence, kv head) pair at a time, which load() packs (forward tasks that own
  // whole pairs); else every pair, packed here in parallel.
  template <typename scalar_t>
  explicit PackedKeys(const Problem<scalar_t>& problem, bool local_ = false)
      : heads_kv(problem.heads_kv),
        d_tiles((problem.head_dim + tiles::kDepth - 1) / tiles::kDepth),
        f_tiles((problem.value_dim + tiles::kRows - 1) / tiles::kRows),
        local(local_) {
    int64_t chunks = 0;
    for (const Sequence& seq : problem.sequences) {
      key_chunks.push_back((seq.len_k + tiles::kDepth - 1) / tiles::kDepth);
      base.push_back(chunks);
      chunks = local ? std::max(chunks, key_chunks.back()) : chunks + heads_kv * key_chunks.back();
    }
    keys = aligned_array<c10::BFloat16>(chunks * 2 * d_tiles * tiles::kTileElems);  // uninitialised
    values = aligned_array<c10::BFloat16>(chunks * f_tiles * tiles::kTileElems);
    if (local) return;
    at::parallel_for(0, static_cast<int64_t>(problem.sequences.size()) * heads_kv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) pack(problem, task / heads_kv, task % heads_kv);
    });
  }

  // Packs pair (s, h) (a local instance's only one).
  template <typename scalar_t>
  void load(const Problem<scalar_t>& problem, int64_t s, int64_t h) { pack(problem, s, h); }

  const c10::BFloat16* keys_at(int64_t s, int64_t h) const { return keys.get() + key_offset(s, h); }
  const c10::BFloat16* values_at(int64_t s, int64_t h) const { return values.get() + value_offset(s, h); }

 private:
  bool local;

  template <typename scalar_t>
  void pack(const Problem<scalar_t>& problem, int64_t s, int64_t h) {
    const Sequence& seq = problem.sequences[s];
    const int64_t n = key_chunks[s];
    if (n == 0) return;
    const int64_t key_chunk = 2 * d_tiles * tiles::kTileElems, value_chunk = f_tiles * tiles::kTileElems;
    c10::BFloat16* k = keys.get() + key_offset(s, h);
    c10::BFloat16* v = values.get() + value_offset(s, h);
    const bool k_vector = vector_packed(problem.k), v_vector = vector_packed(problem.v);
    std::fill(k + (k_vector ? n - 1 : 0) * key_chunk, k + n * key_chunk, c10::BFloat16(0.0f));
    std::fill(v + (v_vector ? n - 1 : 0) * value_chunk, v + n * value_chunk, c10::BFloat16(0.0f));
    pack_keys(problem.k, seq, h, problem.head_dim, k);
    pack_values(problem.v, seq, h, problem.value_dim, v);
  }

  int64_t chunk_offset(int64_t s, int64_t h) const { return local ? 0 : base[s] + h * key_chunks[s]; }
  int64_t key_offset(int64_t s, int64_t h) const { return chunk_offset(s, h) * 2 * d_tiles * tiles::kTileElems; }
  int64_t value_offset(int64_t s, int64_t h) const { return chunk_offset(s, h) * f_tiles * tiles::kTileElems; }

  // Whether x's rows are packed with vector shuffles (bf16 rows of adjacent features), else element-wise.
  template <typename scalar_t>
  static bool vector_packed(const Operand<scalar_t>& x) {
    return std::is_same_v<scalar_t, c10::BFloat16> && x.feature_stride == 1;
  }

  // Tile (d, t) row p, column j, element e = K[16 t + j, 32 d + 2 p + e]: per 16 keys and 32 features, a
  // 16 x 16 transpose of feature pairs (element by element, packing took a third of a 128-token call).
  template <typename scalar_t>
  void pack_keys(const Operand<scalar_t>& k, const Sequence& seq, int64_t h, int64_t dim, c10::BFloat16* dst) const {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (vector_packed(k)) {
        for (int64_t key0 = 0; key0 < seq.len_k; key0 += tiles::kRows) {
          const int64_t count = std::min(tiles::kRows, seq.len_k - key0);
          const c10::BFloat16* rows[tiles::kRows];
          for (int64_t j = 0; j < count; ++j) rows[j] = k.row(seq.batch, h, seq.k_start + key0 + j);
          tiles::pack_pair_transpose_tiles(rows, count, dim, dst + (key0 / tiles::kRows) * d_tiles * tiles::kTileElems);
        }
        return;
      }
    }
    for (int64_t key = 0; key < seq.len_k; ++key) {
      const scalar_t* row = k.row(seq.batch, h, seq.k_start + key);
      c10::BFloat16* tile_row = dst + (key / tiles::kRows) * d_tiles * tiles::kTileElems + (key % tiles::kRows) * 2;
      for (int64_t f = 0; f < dim; ++f) {
        const int64_t d = f / tiles::kDepth, p = (f % tiles::kDepth) / 2;
        tile_row[d * tiles::kTileElems + p * 2 * tiles::kRows + f % 2] = static_cast<c10::BFloat16>(row[f * k.feature_stride]);
      }
    }
  }

  // Tile (c, f) row p, column j, element e = V[32 c + 2 p + e, 16 f + j]: row p interleaves value rows 2p
  // and 2p + 1 element by element.
  template <typename scalar_t>
  void pack_values(const Operand<scalar_t>& v, const Sequence& seq, int64_t h, int64_t value_dim,
                   c10::BFloat16* dst) const {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (vector_packed(v)) {
        for (int64_t key = 0; key < seq.len_k; key += 2) {
          const c10::BFloat16* even = v.row(seq.batch, h, seq.k_start + key);
          const c10::BFloat16* odd = key + 1 < seq.len_k ? v.row(seq.batch, h, seq.k_start + key + 1) : nullptr;
          tiles::pack_pair_rows(even, odd, value_dim, f_tiles, tiles::value_pair_row(dst, key, f_tiles));
        }
        return;
      }
    }
    for (int64_t key = 0; key < seq.len_k; ++key) {
      const scalar_t* row = v.row(seq.batch, h, seq.k_start + key);
      const int64_t c = key / tiles::kDepth, p = (key % tiles::kDepth) / 2, e = key % 2;
      c10::BFloat16* chunk = dst + c * f_tiles * tiles::kTileElems + p * 2 * tiles::kRows + e;
      for (int64_t f = 0; f < value_dim; ++f) {
        chunk[(f / tiles::kRows) * tiles::kTileElems + (f % tiles::kRows) * 2] = static_cast<c10::BFloat16>(row[f * v.feature_stride]);
      }
    }
  }
};

// P's row stride in bf16: a whole number of A tiles' depth, plus one so rows do not alias in L1.
constexpr int64_t kProbStride = kBlockK + tiles::kDepth;

// A block's rows go through Q K^T, the softmax and P V a slab at a time: a slab's scores and P stay in
// cache between the three passes, and a slab on a causal diagonal runs its softmax over only the keys its
// rows can see (128 causal tokens: 1.2x; the whole block's rows at once ran it over all the block's keys).
// Two row tiles: the products run in whole 2 x 2 blocks of tiles.
constexpr int64_t kSlabRows = 2 * tiles::kRows;

// The most bytes of V tiles that one P V reads and finds in L1 with the slab's P beside them (32 KiB);
// past it the product asks for its tiles ahead.
constexpr int64_t kL1ValueBytes = int64_t(32) << 10;

// Per thread. None of it zeroed (the zeroing was a tenth of a 12-head, 128-token call): every element a
// pass reads was written before in the same block (the rows of a last, partial row tile are not, and only
// give rows of the tiles that nothing reads).
struct AmxBuffers {
  ForwardBuffers<float> f;  // the block's output, running max and sum (q, scores and probs unused)
  AlignedArray<float> scores;  // a slab's
  AlignedArray<c10::BFloat16> q, p, p_lo;  // the block's query rows; a slab's P in two parts
  int64_t ldq;
  // block_rows: the most rows a block of the call has, rounded up to whole row tiles (which the products
  // read and write).
  AmxBuffers(int64_t head_dim, int64_t ldv, int64_t block_rows)
      : f(0, ldv, 1, block_rows, 0),
        scores(aligned_array<float>(kSlabRows * kScoreStride)),
        q(aligned_array<c10::BFloat16>(block_rows * round_up(head_dim, tiles::kDepth))),
        p(aligned_array<c10::BFloat16>(kSlabRows * kProbStride)),
        p_lo(aligned_array<c10::BFloat16>(kSlabRows * kProbStride)),
        ldq(round_up(head_dim, tiles::kDepth)) {}
};

template <typename scalar_t>
void forward_rows_amx(const Problem<scalar_t>& problem, const Scoring<float>& scoring, const RowBlock& block,
                      int64_t head, const PackedKeys& packed, AmxBuffers& buf, const Operand<scalar_t>& out,
                      float* lse, const RowIndex& lse_index) {
  const Sequence& seq = problem.sequences[block.sequence];
  const int64_t i0 = block.row, rows = block.rows;
  const int64_t ldv = packed.f_tiles * tiles::kRows;
  const int64_t kv_head = head / (problem.heads_q / problem.heads_kv);
  const c10::BFloat16* keys = packed.keys_at(block.sequence, kv_head);
  const c10::BFloat16* values = packed.values_at(block.sequence, kv_head);
  const auto [first, hi] = scoring.rules.block_keys(seq, i0, i0 + rows);
  const int64_t lo = first / tiles::kDepth * tiles::kDepth;
  float* scores = buf.scores.get();
  float* acc = buf.f.out.data();
  buf.f.reset(rows);
  if (first < hi) load_rows(problem.q, seq.batch, head, seq.q_start + i0, rows, problem.head_dim, buf.q.get(), buf.ldq);
  // Slabs whose output holds a product already: a slab's first P V writes its C tiles instead of loading
  // and adding to the zeros (a block of 128 or 256 keys is every slab's first).
  static_assert(kBlockQ <= 64 * kSlabRows);
  uint64_t started = 0;
  for (int64_t j0 = lo; j0 < hi; j0 += kBlockK) {
    const int64_t n = std::min(kBlockK, hi - j0);
    for (int64_t r0 = 0; r0 < rows; r0 += kSlabRows) {
      const int64_t slab = std::min(kSlabRows, rows - r0), slab_tiles = (slab + tiles::kRows - 1) / tiles::kRows;
      const auto [b, e] = group_keys(scoring.rules, seq, i0 + r0, slab, j0, n, tiles::kDepth);
      if (b >= e) continue;
      const int64_t m = std::min(e, n) - b;  // the slab's keys [j0 + b, j0 + b + m): e is a whole chunk
      tiles::product(slab_tiles, (e - b) / tiles::kRows, packed.d_tiles, buf.q.get() + r0 * buf.ldq, buf.ldq,
                     keys + (j0 + b) / tiles::kRows * packed.d_tiles * tiles::kTileElems, tiles::kTileElems,
                     packed.d_tiles * tiles::kTileElems, scores, kScoreStride, false);
      c10::BFloat16 *probs = buf.p.get(), *probs_lo = buf.p_lo.get();
      const int64_t n_tiles = (m + tiles::kRows - 1) / tiles::kRows, chunks = (e - b) / tiles::kDepth;
      const auto rescore = [](int64_t, float*) {};  // the scores are never overwritten
      if (scoring.dropout.active()) {  // dropout works on float probabilities: one scratch row, then split
        softmax_block(scoring, seq, head, i0 + r0, slab, j0 + b, m, scores, kScoreStride, buf.f.probs.data(), 0,
                      acc + r0 * ldv, ldv, buf.f.state(r0), [&](int64_t r, const float* p) {
                        tiles::to_bf16_split_row(p, n_tiles * tiles::kRows, chunks * tiles::kDepth,
                                                 probs + r * kProbStride, probs_lo + r * kProbStride);
                      }, rescore);
      } else {
        softmax_block(scoring, seq, head, i0 + r0, slab, j0 + b, m, scores, kScoreStride, buf.f.probs.data(), 0,
                      acc + r0 * ldv, ldv, buf.f.state(r0), [](int64_t, const float*) {}, rescore,
                      [&](int64_t r, float*) { return tiles::SplitProbs{probs + r * kProbStride, probs_lo + r * kProbStride}; });
      }
      const uint64_t slab_bit = uint64_t(1) << (r0 / kSlabRows);
      tiles::product(slab_tiles, packed.f_tiles, chunks, probs, kProbStride,
                     values + (j0 + b) / tiles::kDepth * packed.f_tiles * tiles::kTileElems,
                     packed.f_tiles * tiles::kTileElems, tiles::kTileElems, acc + r0 * ldv, ldv, (started & slab_bit) != 0,
                     probs_lo, /*prefetch=*/chunks * packed.f_tiles * tiles::kTileElems * 2 > kL1ValueBytes);
      started |= slab_bit;
    }
  }
  finish_rows(seq, head, i0, rows, problem.value_dim, acc, ldv, buf.f.row_max.data(), buf.f.row_sum.data(), out, lse,
              lse_index, scoring.sink(head));
}

// tasks_own_pairs (attention_forward.h) with PackedKeys' bytes per 32 keys.
template <typename scalar_t>
bool amx_owns_pairs(const Problem<scalar_t>& problem) {
  const int64_t d_tiles = (problem.head_dim + tiles::kDepth - 1) / tiles::kDepth;
  const int64_t f_tiles = (problem.value_dim + tiles::kRows - 1) / tiles::kRows;
  const int64_t chunk_bytes = (2 * d_tiles + f_tiles) * tiles::kTileElems * 2;
  return tasks_own_pairs(problem, [&](int64_t len_k) { return (len_k + tiles::kDepth - 1) / tiles::kDepth * chunk_bytes; });
}

template <typename scalar_t>
void forward_amx(const Problem<scalar_t>& problem, const Scoring<float>& scoring, const Operand<scalar_t>& out,
                 float* lse, const RowIndex& lse_index) {
  const std::vector<RowBlock> blocks = row_blocks(problem.sequences, kBlockQ, kSlabRows);
  const int64_t count = static_cast<int64_t>(blocks.size());
  int64_t block_rows = 0;
  for (const RowBlock& block : blocks) block_rows = std::max(block_rows, round_up(block.rows, tiles::kRows));
  const int64_t f_tiles = (problem.value_dim + tiles::kRows - 1) / tiles::kRows;
  if (amx_owns_pairs(problem)) {
    const int64_t pairs = static_cast<int64_t>(problem.sequences.size()) * problem.heads_kv;
    parallel_for_balanced(pairs, pair_cost(problem), [&](TaskClaims& claims) {
      PackedKeys packed(problem, /*local=*/true);
      AmxBuffers buf(problem.head_dim, f_tiles * tiles::kRows, block_rows);
      const tiles::Scope scope;
      const simd::FlushDenormals flush;
      for (int64_t task : claims) {
        for_each_pair_block(problem, task, kSlabRows, [&](int64_t s, int64_t kv_head) { packed.load(problem, s, kv_head); },
                            [&](const RowBlock& block, int64_t head) {
                              forward_rows_amx(problem, scoring, block, head, packed, buf, out, lse, lse_index);
                            });
      }
    });
    return;
  }
  const PackedKeys packed(problem);
  parallel_for_balanced(count * problem.heads_q, block_cost(problem, scoring.rules, blocks), [&](TaskClaims& claims) {
    AmxBuffers buf(problem.head_dim, f_tiles * tiles::kRows, block_rows);
    const tiles::Scope scope;
    const simd::FlushDenormals flush;
    for (int64_t task : claims) {
      forward_rows_amx(problem, scoring, blocks[task % count], task / count, packed, buf, out, lse, lse_index);
    }
  });
}
