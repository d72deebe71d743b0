// Forward of the CPU attention kernel: FlashAttention's online softmax over key blocks, per block of
// query rows.
//
// K (transposed) and V of every (sequence, kv head) are converted once into float tiles that all query
// blocks and all query heads of the group share: up front for long sequences, where a task is (sequence,
// query head, block of rows); by the task itself when many short pairs make a task (sequence, kv head)
// (forward_owns_pairs), so the tiles are packed into the cache that reads them. Each block of rows
// computes its scores against kBlockK keys at a time with the register-blocked product of
// attention_gemm.h, turns them into probabilities with a running maximum and sum, and accumulates P V.
// Key blocks outside the rows' visible range (causal, window, key_lengths) are never visited, so a
// window of width w costs O(L w). Memory: the converted K and V, plus O(kBlockQ x kBlockK) per thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/attention_gemm.h"
#include "cpu/attention_kernels.h"
#include "cpu/attention_pack.h"
#include "cpu/attention_rows.h"
#include "cpu/attention_tasks.h"


// Query rows per task and keys per step. Each K / V block is reused by kBlockQ rows and the block's
// scores (kBlockQ x kBlockK) stay in L2: torch's CPU flash kernel measured best with 256 x 512; 240 is
// five groups (below).
constexpr int64_t kBlockQ = 240;
constexpr int64_t kBlockK = 512;
// Row stride of the score block: 512 floats would put every row in the same few L1 sets (2 KiB apart),
// and the P V product reads six rows at once; the padding measured 1.3-1.5x faster for that product.
constexpr int64_t kScoreStride = kBlockK + 16;

// Rows per group in a block's products: each group multiplies only the keys it can see, so the part of
// a block that a causal diagonal or a window's edge hides costs little (a 240-row block computed the
// whole 240 x 240 square on the diagonal; 48-row groups compute 3/5 of it). 48 is a whole number of
// register tiles (6 rows) and of AMX tiles (16 rows).
constexpr int64_t kGroupRows = 48;

// The online softmax's state of each row of a block (see softmax_block).
template <typename acc_t>
struct RowState {
  acc_t* max;      // reference maximum (-inf before the row's first visible key)
  acc_t* sum;      // running sum of exp(score - reference)
  acc_t* anchor;   // ALiBi rows: the bias's largest value in the block that last set the reference
  uint8_t* lazy;   // whether the next block tries the reference without a maximum pass
};

template <typename acc_t>
struct ForwardBuffers {
  AlignedVector<acc_t> q, scores, probs, out, row_max, row_sum, anchor;
  std::vector<uint8_t> lazy;
  // probs: rows apart from the scores. block_rows: the most rows a block of this call has; sized to it,
  // a short call does not zero a kBlockQ x kScoreStride scores buffer (half a MiB) on every call.
  // score_rows: the rows of scores at a time (all of a block's, unless given).
  ForwardBuffers(int64_t head_dim, int64_t ldv, int64_t prob_rows = 0, int64_t block_rows = kBlockQ,
                 int64_t score_rows = -1)
      : q(block_rows * head_dim),
        scores((score_rows < 0 ? block_rows : score_rows) * kScoreStride),
        probs(prob_rows * kScoreStride),
        out(block_rows * ldv),
        row_max(block_rows),
        row_sum(block_rows),
        anchor(block_rows),
        lazy(block_rows) {}
  // Before each block of `rows` rows: nothing seen yet. Only those rows: a 128-row block in a kBlockQ
  // buffer zeroed all 240 rows' output.
  void reset(int64_t rows) {
    std::fill_n(out.begin(), rows * (out.size() / row_max.size()), acc_t(0));
    std::fill_n(row_max.begin(), rows, -std::numeric_limits<acc_t>::infinity());
    std::fill_n(row_sum.begin(), rows, acc_t(0));
    std::fill_n(lazy.begin(), rows, uint8_t(1));
  }
  RowState<acc_t> state(int64_t first_row) {
    return {row_max.data() + first_row, row_sum.data() + first_row, anchor.data() + first_row, lazy.data() + first_row};
  }
};

// A row's running sum may grow to this before its reference maximum must move up, and a lazy attempt that
// leaves it below the inverse is refused (see softmax_block).
template <typename acc_t>
constexpr acc_t kLazySumLimit = acc_t(4294967296.0);  // 2^32
// A block that moves a row's maximum up by more than this makes its next block skip the lazy attempt.
template <typename acc_t>
constexpr acc_t kLazyMargin = acc_t(8);

// softmax_block's default writers: row r's probabilities as floats at p.
template <typename acc_t>
struct FloatProbsOf {
  FloatProbs<acc_t> operator()(int64_t, acc_t* p) const { return {p}; }
};

// The online softmax of one score block: scores[r * ld + j] holds q.k of row i0 + r and key j0 + j
// (j < n). Writes the block's probabilities (dropout applied) to probs[r * ldp + j] (which may be the
// scores themselves), zero past n up to round_up(n, width), and keeps the rows' reference maximum,
// running sum and output (out, row stride ldv) consistent. on_row(r, p) sees each row's final
// probabilities while they are still in L1; rescore(r, s) writes row r's q.k again (only called when
// probs are the scores and a row's first attempt below overwrote them).
//
// The reference maximum moves lazily: a row that has one takes exp(score - reference) in a single pass
// without the block's maximum, and keeps the result unless the running sum passes kLazySumLimit (a score
// far above the reference, an overflow, or a NaN); only then, and on a row's first block, a maximum pass
// sets a new reference and rescales (state.lazy says whether a row tries; see kLazyMargin; ALiBi rows
// always try, their reference moved up with the bias). Terms above 1 keep float's relative precision and
// the sum stays 30 binary orders below overflow, but exp's argument, score - reference, rounds at its own
// magnitude: a reference ~20 below the scores costs each term ~1e-6 of itself.
//
// probs_of(r, p) gives the writer (as FloatProbs) that row r's probabilities go through: floats at p by
// default; another writer (the AMX forward's bf16 parts) leaves p unwritten and takes no dropout.
template <typename acc_t, typename OnRow, typename Rescore, typename ProbsOf = FloatProbsOf<acc_t>>
void softmax_block(const Scoring<acc_t>& scoring, const Sequence& seq, int64_t head, int64_t i0, int64_t rows,
                   int64_t j0, int64_t n, acc_t* scores, int64_t ld, acc_t* probs, int64_t ldp, acc_t* out,
                   int64_t ldv, const RowState<acc_t>& state, const OnRow& on_row, const Rescore& rescore,
                   const ProbsOf& probs_of = ProbsOf{}) {
  constexpr bool floats = std::is_same_v<ProbsOf, FloatProbsOf<acc_t>>;
  TORCH_INTERNAL_ASSERT(floats || !scoring.dropout.active(), "dropout needs the probabilities as floats");
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  constexpr int64_t width = simd::Traits<acc_t>::width;
  const int64_t n_pad = round_up(n, width);
  const acc_t scale = static_cast<acc_t>(scoring.rules.scale);
  const acc_t slope = scoring.slope(seq, head);
  const acc_t lazy_sum_margin = std::exp(kLazyMargin<acc_t>);
  // What each row needs (plain rows, the common case, skip the score pass: the scale is folded into the
  // exp's argument, and ALiBi's bias into both passes: ScaledDistance).
  struct Row {
    acc_t *s, *p;
    bool plain, alibi, lazy;  // lazy: tries the reference it has before a maximum pass
    acc_t exp_scale;
    ScaledDistance<acc_t> bias;
  };
  const auto row_of = [&](int64_t r) {
    const bool plain = plain_row(scoring, seq, head, i0 + r, j0, n, /*with_alibi=*/true);
    const bool alibi = plain && slope != acc_t(0);
    return Row{scores + r * ld, probs + r * ldp, plain, alibi,
               (alibi || state.lazy[r]) && state.max[r] > neg_inf,  // false for a row with no reference yet, and for NaN
               plain && !alibi ? scale : acc_t(1), ScaledDistance<acc_t>(scale, slope, i0 + r + seq.len_k - seq.len_q - j0)};
  };
  const auto finish_scores = [&](int64_t r, const Row& row) {
    if (row.plain) {
      std::fill(row.s + n, row.s + n_pad, neg_inf);
    } else {
      score_row(scoring, seq, head, i0 + r, j0, n, n_pad, row.s, row.s /* softcap's tanh is not needed here */);
    }
  };
  const auto row_max_of = [&](const Row& row) {
    return row.alibi ? row_max(row.s, n_pad, row.bias) : row_max(row.s, n_pad) * row.exp_scale;
  };
  // First every row's final scores and, where the row has no reference to try, its maximum: the rows'
  // maximum passes are independent, so the wait for each one's reduction overlaps the others' work (one
  // row at a time, each 128-key row's exp pass waited on its own maximum).
  constexpr int64_t kMaxRows = 256;
  acc_t block_maxima[kMaxRows];
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    for (int64_t r = r0; r < std::min(rows, r0 + kMaxRows); ++r) {
      const Row row = row_of(r);
      finish_scores(r, row);
      if (!row.lazy) block_maxima[r - r0] = row_max_of(row);
    }
    for (int64_t r = r0; r < std::min(rows, r0 + kMaxRows); ++r) {
      const Row row = row_of(r);
      acc_t* s = row.s;
      acc_t* p = row.p;
      const bool alibi = row.alibi;
      const ScaledDistance<acc_t>& bias = row.bias;
      const auto exp_sum = [&](acc_t shift) {
        return alibi ? exp_shifted_sum_to(s, probs_of(r, p), n_pad, shift, acc_t(1), bias)
                     : exp_shifted_sum_to(s, probs_of(r, p), n_pad, shift, row.exp_scale);
      };
      // ALiBi's bias at its largest in this block: the reference follows it exactly, so that the scores'
      // climb toward the diagonal never forces a maximum pass (what is left, q.k, barely moves). Also for
      // rows whose scores already hold the bias (a causal mask's diagonal block, a window, a softcap): a
      // reference left ~20 below such a climb took exp of arguments ~20 (float32 ALiBi rows under a causal
      // mask: lse 4-5x the float32 reference's error, found by a random sweep). Over the keys the rules let
      // the row see (a top-left causal row's diagonal is not its ALiBi position); a reference above what a
      // user mask leaves costs precision the same way or, far above, a maximum pass: any is exact while the
      // sum checks below hold.
      const bool biased = slope != acc_t(0);
      acc_t bias_top = acc_t(0);
      if (biased) {
        const auto [lo, hi] = scoring.rules.keys(seq, i0 + r);
        const int64_t first = std::clamp<int64_t>(lo - j0, 0, n), end = std::clamp<int64_t>(hi - j0, 0, n);
        bias_top = first < end ? max_distance_bias(slope, bias.distance.position, first, end)
                               : max_distance_bias(slope, bias.distance.position, int64_t(0), n);
      }
      acc_t& reference = state.max[r];
      acc_t& total = state.sum[r];
      bool done = false;
      acc_t block_max = row.lazy ? neg_inf : block_maxima[r - r0];  // a lazy row's: found if its try fails
      if (row.lazy) {
        // ALiBi rows try the reference moved up by the bias's climb since a maximum pass set it.
        const acc_t shift = biased && bias_top > state.anchor[r] ? bias_top - state.anchor[r] : acc_t(0);
        const acc_t carried = shift > 0 ? total * std::exp(-shift) : total;
        const acc_t block_sum = exp_sum(reference + shift);
        const acc_t sum = carried + block_sum;
        // Too large: a score far above the reference (or inf, or NaN). Too small: the moved reference
        // overshot the scores (their q.k fell as the bias rose) and the terms are underflowing.
        if (sum <= kLazySumLimit<acc_t> && sum >= acc_t(1) / kLazySumLimit<acc_t>) {
          if (shift > 0) {
            scale_row(out + r * ldv, ldv, std::exp(-shift));
            reference += shift;
            state.anchor[r] = bias_top;
          }
          total = sum;
          done = true;
          // Terms well above 1: the maximum has climbed past the reference, so let the next block move it
          // (else a steady climb would drift until an attempt fails).
          state.lazy[r] = block_sum <= lazy_sum_margin;
        } else {
          if (p == s) {
            rescore(r, s);
            finish_scores(r, row);
          }
          block_max = row_max_of(row);
        }
      }
      if (!done) {
        const acc_t old_max = reference;
        const acc_t new_max = block_max > old_max || std::isnan(block_max) ? block_max : old_max;  // NaN spreads
        if (new_max == neg_inf) {  // nothing visible yet: the row's probabilities are all 0
          probs_of(r, p).zero(n_pad);
          on_row(r, p);
          continue;
        }
        // (exp(-inf) is 0: a row's first block skips the call)
        const acc_t rescale = old_max == neg_inf ? acc_t(0) : std::exp(old_max - new_max);
        total = total * rescale + exp_sum(new_max);
        reference = new_max;
        // The bias part of the reference, for rows with a slope; other rows' references never move with
        // the bias (an anchor of +inf).
        state.anchor[r] = biased ? bias_top : std::numeric_limits<acc_t>::infinity();
        state.lazy[r] = old_max == neg_inf || new_max <= old_max + kLazyMargin<acc_t>;
        if (rescale != acc_t(1)) scale_row(out + r * ldv, ldv, rescale);
      }
      if (floats && scoring.dropout.active()) {
        dropout_row(scoring.dropout, scoring.dropout.row_key(seq.index, head, i0 + r), j0, n, p,
                    static_cast<acc_t*>(nullptr));
      }
      on_row(r, p);
    }
  }
}

// Normalises the rows' output by their sum (plus the head's sink term exp(sink), -inf: none), writes it
// and the log-sum-exp.
template <typename scalar_t, typename acc_t>
void finish_rows(const Sequence& seq, int64_t head, int64_t i0, int64_t rows, int64_t value_dim, acc_t* out,
                 int64_t ldv, const acc_t* row_max_, const acc_t* row_sum, const Operand<scalar_t>& output,
                 acc_t* lse, const RowIndex& lse_index, acc_t sink) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t total = row_sum[r], shift = row_max_[r], factor = 1;
    if (sink > -std::numeric_limits<acc_t>::infinity()) {
      if (total > 0 && sink <= shift) {
        total += std::exp(sink - shift);
      } else {  // the sink is the larger term (or the only one): shift the row's sum to it
        factor = total > 0 ? std::exp(shift - sink) : acc_t(0);
        total = total * factor + acc_t(1);
        shift = sink;
      }
    }
    const acc_t inverse = total > 0 ? factor / total : acc_t(0);  // a row that saw nothing stays 0
    scale_row(out + r * ldv, ldv, inverse);
    const int64_t at = lse_index.at(seq, head, i0 + r);
    // In double: the reference `shift` can sit far below the row's maximum (a lazy block keeps it while
    // the sum stays under kLazySumLimit: up to ~22 below), and shift + log(total) in float then rounds two
    // terms of that size (float32 ALiBi rows under a causal mask: lse 0.48 came out 1.9e-6 off, past the
    // tolerance policy's bound; a random sweep found it).
    const double exact = static_cast<double>(shift) + std::log(static_cast<double>(total));
    lse[at] = total > 0 ? static_cast<acc_t>(exact) : -std::numeric_limits<acc_t>::infinity();
    if constexpr (std::is_same_v<acc_t, float>) {
      if (lse_index.low) {
        lse_index.low[at] = total > 0 ? static_cast<float>(exact - static_cast<double>(lse[at])) : 0.0f;
      }
    }
  }
  store_rows(output, seq.batch, head, seq.q_start + i0, rows, value_dim, out, ldv);
}


// The keys [begin, end) of [j0, j0 + n), as offsets from j0, that rows [r0, r0 + rows) can see, begin
// rounded down and end up to multiples of `align` (end at most round_up(n, align)). Keys in the range
// that a row cannot see get -inf from softmax_block like any hidden key.
inline std::pair<int64_t, int64_t> group_keys(const Rules& rules, const Sequence& seq, int64_t r0, int64_t rows,
                                              int64_t j0, int64_t n, int64_t align) {
  const auto [lo, hi] = rules.block_keys(seq, r0, r0 + rows);
  const int64_t begin = std::clamp<int64_t>(lo - j0, 0, n), end = std::clamp<int64_t>(hi - j0, 0, n);
  if (begin >= end) return {0, 0};
  return {begin / align * align, round_up(end, align)};
}

// Calls fn(first row, rows, begin, end) for each run of consecutive groups of rows [i0, i0 + rows) that
// see the same keys [begin, end) of the block (group_keys), skipping runs that see none: off the
// diagonal a whole block is one run, so a product packs its panels once for all groups.
template <typename Fn>
inline void for_each_run(const Rules& rules, const Sequence& seq, int64_t i0, int64_t rows, int64_t j0, int64_t n,
                         int64_t align, const Fn& fn) {
  const auto keys_of = [&](int64_t g) { return group_keys(rules, seq, i0 + g, std::min(kGroupRows, rows - g), j0, n, align); };
  for (int64_t g = 0; g < rows;) {
    const auto range = keys_of(g);
    int64_t end = g + kGroupRows;
    while (end < rows && keys_of(end) == range) end += kGroupRows;
    end = std::min(end, rows);
    if (range.first < range.second) fn(g, end - g, range.first, range.second);
    g = end;
  }
}

// Rows [i0, i0 + rows) of one (sequence, query head).
template <typename scalar_t, typename acc_t>
void forward_rows(const Problem<scalar_t>& problem, const Scoring<acc_t>& scoring,
                                                   const RowBlock& block, int64_t head,
                                                   const KeyTiles<acc_t>& tiles, ForwardBuffers<acc_t>& buf,
                                                   const Operand<scalar_t>& out, acc_t* lse,
                                                   const RowIndex& lse_index) {
  const Sequence& seq = problem.sequences[block.sequence];
  const int64_t i0 = block.row, rows = block.rows;
  const int64_t dim = problem.head_dim, value_dim = problem.value_dim, ldv = tiles.ld_v;
  const int64_t kv_head = head / (problem.heads_q / problem.heads_kv);
  // Key blocks start at whole panels of the transposed K; keys before the first visible one get -inf.
  constexpr int64_t panel = kPanel<acc_t>;
  const auto [first, hi] = scoring.rules.block_keys(seq, i0, i0 + rows);
  const int64_t lo = first / panel * panel;
  acc_t* scores = buf.scores.data();
  acc_t* acc = buf.out.data();
  buf.reset(rows);
  // The query rows as the products' A (read through its row stride): in place where they are acc_t rows of
  // unit feature stride (a copy cost 2-4% of a 128-token forward in float32), else converted into buf.q.
  const acc_t* q = buf.q.data();
  int64_t ldq = dim;
  bool in_place = false;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    in_place = problem.q.feature_stride == 1 && problem.q.pages == nullptr;
    if (in_place) {
      q = problem.q.row(seq.batch, head, seq.q_start + i0);
      ldq = problem.q.token_stride;
    }
  }
  if (first < hi && !in_place) load_rows(problem.q, seq.batch, head, seq.q_start + i0, rows, dim, buf.q.data(), dim);
  for (int64_t j0 = lo; j0 < hi; j0 += kBlockK) {
    const int64_t n = std::min(kBlockK, hi - j0);
    // Runs start at a panel (keys_t's blocks) but end at the block's last vector of keys, not its panel: a
    // block of 1 key computed 64 columns (and in the 4-vector tile, one chain over the head dim per score).
    const int64_t last = round_up(n, simd::Traits<acc_t>::width);
    for_each_run(scoring.rules, seq, i0, rows, j0, n, panel, [&](int64_t g, int64_t group, int64_t b, int64_t e) {
      gemm<acc_t>(group, std::min(e, last) - b, dim, q + g * ldq, ldq, 1,
                  tiles.keys_t(block.sequence, kv_head, j0 + b), scores + g * kScoreStride + b, kScoreStride, false);
    });
    // The probabilities replace the scores; a row whose lazy attempt overflowed gets its q.k again.
    const auto rescore = [&](int64_t r, acc_t* s) {
      gemm<acc_t>(1, n, dim, q + r * ldq, ldq, 1, tiles.keys_t(block.sequence, kv_head, j0), s,
                  kScoreStride, false);
    };
    softmax_block(scoring, seq, head, i0, rows, j0, n, scores, kScoreStride, scores, kScoreStride, acc, ldv,
                  buf.state(0), [](int64_t, const acc_t*) {}, rescore);
    for_each_run(scoring.rules, seq, i0, rows, j0, n, 1, [&](int64_t g, int64_t group, int64_t b, int64_t e) {
      gemm<acc_t>(group, value_dim, e - b, scores + g * kScoreStride + b, kScoreStride, 1,
                  tiles.values(block.sequence, kv_head, j0 + b), acc + g * ldv, ldv, true);
    });
  }
  finish_rows(seq, head, i0, rows, value_dim, acc, ldv, buf.row_max.data(), buf.row_sum.data(), out, lse,
              lse_index, scoring.sink(head));
}

// Whether forward tasks should own whole (sequence, kv head) pairs and pack each pair's tiles themselves
// (a local KeyTiles or PackedKeys): when there are enough pairs to keep every thread busy and one pair's
// tiles sit well inside a core's L2. Many short sequences (an encoder's batch) then never write K and V
// to memory and read them back; long sequences keep the shared tiles and the balanced order of
// row_blocks. pair_bytes(len_k): the packed bytes of a pair with len_k keys.
template <typename scalar_t, typename PairBytes>
bool tasks_own_pairs(const Problem<scalar_t>& problem, const PairBytes& pair_bytes) {
  const int64_t pairs = static_cast<int64_t>(problem.sequences.size()) * problem.heads_kv;
  if (pairs < 4 * static_cast<int64_t>(at::get_num_threads())) return false;
  for (const Sequence& seq : problem.sequences) {
    if (pair_bytes(seq.len_k) > kPairTileBytes) return false;
  }
  return true;
}

template <typename scalar_t, typename acc_t>
bool forward_owns_pairs(const Problem<scalar_t>& problem) {
  const int64_t ld_k = round_up(problem.head_dim, kPanel<acc_t>), ld_v = round_up(problem.value_dim, kPanel<acc_t>);
  return tasks_own_pairs(problem, [&](int64_t len_k) {
    return round_up(len_k, kPanel<acc_t>) * (ld_k + ld_v) * int64_t(sizeof(acc_t));
  });
}

// The work of one pair-owning forward task (task = sequence * heads_kv + kv head): load(sequence, kv
// head) prepares the pair's K and V, then run(block, head) for each block of rows
// (block_rows_of(len, kBlockQ, even)) and each query head of the group.
template <typename scalar_t, typename Load, typename Run>
void for_each_pair_block(const Problem<scalar_t>& problem, int64_t task, int64_t even, const Load& load, const Run& run) {
  const int64_t group = problem.heads_q / problem.heads_kv;
  const int64_t s = task / problem.heads_kv, kv_head = task % problem.heads_kv;
  load(s, kv_head);
  const int64_t len = problem.sequences[s].len_q;
  const int64_t size = block_rows_of(len, kBlockQ, even);
  for (int64_t row = 0; row < len; row += size) {
    const RowBlock block{s, row, std::min(size, len - row)};
    for (int64_t head = kv_head * group; head < (kv_head + 1) * group; ++head) run(block, head);
  }
}

template <typename scalar_t>
void forward(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,
                              const Operand<scalar_t>& out, attn_acc_t<scalar_t>* lse,
                              const RowIndex& lse_index) {
  using acc_t = attn_acc_t<scalar_t>;
  constexpr int layouts = KeyTiles<acc_t>::kKeysT | KeyTiles<acc_t>::kValues;
  const int64_t heads = problem.heads_q;
  int64_t block_rows = 0;
  for (const Sequence& seq : problem.sequences) block_rows = std::max(block_rows, std::min(seq.len_q, kBlockQ));
  if (forward_owns_pairs<scalar_t, acc_t>(problem)) {
    const int64_t pairs = static_cast<int64_t>(problem.sequences.size()) * problem.heads_kv;
    parallel_for_balanced(pairs, pair_cost(problem), [&](TaskClaims& claims) {
      const simd::FlushDenormals flush;
      KeyTiles<acc_t> tiles(problem, layouts, /*local=*/true);
      ForwardBuffers<acc_t> buf(problem.head_dim, tiles.ld_v, 0, block_rows);
      for (int64_t task : claims) {
        for_each_pair_block(problem, task, 0, [&](int64_t s, int64_t kv_head) { tiles.load(problem, s, kv_head); },
                            [&](const RowBlock& block, int64_t head) {
                              forward_rows(problem, scoring, block, head, tiles, buf, out, lse, lse_index);
                            });
      }
    });
    return;
  }
  const KeyTiles<acc_t> tiles(problem, layouts);
  const std::vector<RowBlock> blocks = row_blocks(problem.sequences, kBlockQ);
  const int64_t count = static_cast<int64_t>(blocks.size());
  parallel_for_balanced(count * heads, block_cost(problem, scoring.rules, blocks), [&](TaskClaims& claims) {
    const simd::FlushDenormals flush;
    ForwardBuffers<acc_t> buf(problem.head_dim, tiles.ld_v, 0, block_rows);
    for (int64_t task : claims) {
      forward_rows(problem, scoring, blocks[task % count], task / count, tiles, buf, out, lse, lse_index);
    }
  });
}
