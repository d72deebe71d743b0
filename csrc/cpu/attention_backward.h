// Backward of the CPU attention kernel.
//
// A task is (sequence, kv head): it owns that head's dK and dV (accumulated in acc_t) and the dQ of
// every query head of its group, so no two threads write the same gradient and results do not depend
// on scheduling. When the tasks cannot keep every thread busy (one sequence with one KV head), each is
// cut into parts (backward_parts) that take its (query head, row step) units in turn and sum dK and dV
// into their own buffers, which are then added in part order: results depend on the thread count, not
// on scheduling. A unit holds all keys of its rows, so dQ is never split. For each block of query rows it holds the rows' whole visible key range and recomputes
// their softmax exactly (max, exp, sum), as the torch backend does: the rows' delta is then
// sum_j p_ij dp_ij over that range, which keeps gradients that vanish exactly at 0 (a row that sees one
// key has dq = 0) instead of the rounding noise of rowsum(dO * O). Memory: the converted K and V, plus
// O(rows x S) per thread (backward_rows_per_step).

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <limits>
#include <vector>

#include "cpu/attention_gemm.h"
#include "cpu/attention_kernels.h"
#include "cpu/attention_pack.h"
#include "cpu/attention_rows.h"
#include "cpu/attention_tasks.h"

// Query rows per step. A step holds its rows' scores and their gradients over the whole key range, which
// should stay in L2 (about 1.6 MB of both), and every step reads all of K and V and reads and writes all
// of dK and dV, so within that budget fewer, larger steps move less: 96 rows at S = 2048, 48 at 4096
// (measured 0.90x -> 0.96x of torch there). A whole number of register tiles (6 rows), at least 12.
constexpr int64_t kBackwardScoreBytes = 1600 * 1024;
constexpr int64_t kBackwardRowsMax = 96;

template <typename acc_t>
inline int64_t backward_rows_per_step(int64_t ld) {
  const int64_t fit = kBackwardScoreBytes / (2 * ld * static_cast<int64_t>(sizeof(acc_t)));
  return std::clamp<int64_t>(fit / kRows * kRows, 2 * kRows, kBackwardRowsMax);
}


// One thread's work space, kept from task to task (a fresh one per task cost an allocation and a fill of
// a quarter megabyte per (batch, head) at 128 tokens): only dK and dV must start at zero, every other
// buffer is written before it is read.
template <typename acc_t>
struct BackwardBuffers {
  int64_t ld = 0;    // score rows: the sequence's whole key range, padded
  int64_t rows = 0;  // query rows per step
  AlignedVector<acc_t> q, dout, dq, probs, dprobs, tanh, keep, kept;
  AlignedVector<acc_t> dk, dv;
  void start(int64_t ld_t, int64_t ld_k, int64_t ld_v, int64_t len_k, bool softcap, bool dropout) {
    ld = ld_t;
    rows = backward_rows_per_step<acc_t>(ld_t);
    q.resize(rows * ld_k);
    dout.resize(rows * ld_v);
    dq.resize(rows * ld_k);
    probs.resize(rows * ld_t);
    dprobs.resize(rows * ld_t);
    if (softcap) tanh.resize(rows * ld_t);
    if (dropout) {
      keep.resize(rows * ld_t);
      kept.resize(rows * ld_t);
    }
    dk.assign(len_k * ld_k, acc_t(0));
    dv.assign(len_k * ld_v, acc_t(0));
  }
};

template <typename acc_t>
struct BackwardTask {
  int64_t sequence, kv_head;
  const KeyTiles<acc_t>& tiles;
};

// Where one query head's slope and sink gradients go (null: not wanted).
struct HeadGradients {
  double* slope;
  double* sink;
};

// Parts per (sequence, kv head) task: 1 when the tasks divide evenly among the threads, or are many
// enough that an uneven last round costs little; else enough parts that they divide evenly (the copy and
// the final sum of one more dK and dV per part are small next to a part's products), as far as their
// dK and dV fit in kBackwardPartsBytes (`part_bytes`: one part of every task): one KV head of 16k keys
// on 64 threads gets 32 parts, 256 MiB, not 64.
constexpr int64_t kBackwardPartsBytes = int64_t(256) << 20;

inline int64_t backward_parts(int64_t tasks, int64_t threads, int64_t part_bytes) {
  if (threads <= 1 || tasks % threads == 0 || tasks >= 4 * threads) return 1;
  return std::clamp<int64_t>(kBackwardPartsBytes / std::max<int64_t>(part_bytes, 1), 1, threads / std::gcd(tasks, threads));
}

// What one part of a split task keeps until the parts are summed.
template <typename acc_t>
struct BackwardPartial {
  AlignedVector<acc_t> dk, dv;
  AlignedVector<double> slopes, sinks;  // per query head of the group
};

// Gradients of rows [i0, i0 + rows) of query head `head`: writes their dq, adds to the task's dk / dv
// and to the extra (mask, slope) gradients.
template <typename scalar_t, typename acc_t>
void backward_rows(const Problem<scalar_t>& problem, const Scoring<acc_t>& scoring,
                                                    const BackwardTask<acc_t>& task, int64_t head, int64_t i0,
                                                    int64_t rows, const Operand<scalar_t>& dout,
                                                    const Operand<scalar_t>& dq,
                                                    const ExtraGradients<acc_t>& extra, acc_t* mask_sink,
                                                    const HeadGradients& head_grads, BackwardBuffers<acc_t>& buf) {
  constexpr int64_t width = simd::Traits<acc_t>::width;
  const Sequence& seq = problem.sequences[task.sequence];
  const int64_t dim = problem.head_dim, value_dim = problem.value_dim;
  const int64_t ld_k = task.tiles.ld_k, ld_v = task.tiles.ld_v, ld = buf.ld;
  const auto [first, hi] = scoring.rules.block_keys(seq, i0, i0 + rows);
  if (first >= hi) {  // the rows see nothing: their output was 0 whatever q, so dq = 0
    std::fill(buf.dq.begin(), buf.dq.end(), acc_t(0));
    store_rows(dq, seq.batch, head, seq.q_start + i0, rows, dim, buf.dq.data(), ld_k);
    return;
  }
  // From a whole panel of the transposed K and V: keys before the first visible one get p = 0.
  const int64_t lo = first / kPanel<acc_t> * kPanel<acc_t>;
  const int64_t n = hi - lo, n_pad = round_up(n, width);
  const int64_t s = task.sequence, h = task.kv_head;
  load_rows(problem.q, seq.batch, head, seq.q_start + i0, rows, dim, buf.q.data(), ld_k);
  load_rows(dout, seq.batch, head, seq.q_start + i0, rows, value_dim, buf.dout.data(), ld_v);
  acc_t* probs = buf.probs.data();
  acc_t* dprobs = buf.dprobs.data();
  gemm<acc_t>(rows, n, dim, buf.q.data(), ld_k, 1, task.tiles.keys_t(s, h, lo), probs, ld, false);
  gemm<acc_t>(rows, n, value_dim, buf.dout.data(), ld_v, 1, task.tiles.values_t(s, h, lo), dprobs, ld, false);
  const bool softcap = scoring.rules.softcap > 0, dropout = scoring.dropout.active();
  const acc_t* kept = dropout ? buf.kept.data() : probs;  // P with dropout applied: what multiplied V
  const acc_t scale = static_cast<acc_t>(scoring.rules.scale);
  const acc_t sink = scoring.sink(head), neg_inf = -std::numeric_limits<acc_t>::infinity();
  // The sink and slope gradients: one term per row, in double (see ExtraGradients).
  double step_sink = 0, step_alibi = 0;
  // As in the forward's plain rows, rows whose scores are only scaled products (no softcap, mask or ALiBi)
  // fold the scale into the exp instead of a score pass; the keys the rules hide from them (causal, window,
  // key lengths: in a causal step every row but the last has some) are set to -inf. With given statistics
  // (row_lse, from the forward) only rows that see every key of this step's range fold, as before: the
  // forward scores rows that see part of a key block with score_row, and folding the others too made a
  // float32 dv from the precise forward's lse miss the tolerance policy's bound by 1.8x at scale 6 (the
  // forward decides per key block of 512, this per step, so the two match on most rows, not all).
  const bool only_scaled = scores_only_scaled(scoring, seq, head);
  // dS's scale joins the softmax's backward pass where nothing reads dS before it (mask and slope
  // gradients) and softcap's derivative does not go with it.
  const bool fold_scale = !mask_sink && !head_grads.slope && !softcap;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* p = probs + r * ld;
    acc_t* dp = dprobs + r * ld;
    const bool plain = only_scaled && (!scoring.row_lse || plain_row(scoring, seq, head, i0 + r, lo, n));
    const acc_t exp_scale = plain ? scale : acc_t(1);
    if (plain) {
      hide_keys(scoring.rules, seq, i0 + r, lo, n, n_pad, p);
    } else {
      score_row(scoring, seq, head, i0 + r, lo, n, n_pad, p, softcap ? buf.tanh.data() + r * ld : nullptr);
    }
    acc_t p_sink = 0;
    double delta = 0;
    const acc_t* keep_row = nullptr;  // dropout's keep factors of the row
    if (scoring.row_lse) {  // given statistics: p = exp(score - lse) of the whole softmax, delta as given
      const int64_t at = seq.batch * scoring.row_batch_stride + head * scoring.row_head_stride + seq.q_start + i0 + r;
      const acc_t lse = scoring.row_lse[at];
      if (lse == neg_inf) {
        std::fill(p, p + n_pad, acc_t(0));
      } else {
        exp_shifted_sum(p, p, n_pad, lse, exp_scale);  // lse is large where scores are
        if (scoring.row_lse_low) scale_row(p, n_pad, static_cast<acc_t>(std::exp(-scoring.row_lse_low[at])));
      }
      delta = scoring.row_delta[at];
    } else {
      // The sink joins the denominator (and the shift, when it is the larger term); it has no value.
      const acc_t max = std::max(row_max(p, n_pad) * exp_scale, sink);
      if (max == neg_inf) {
        std::fill(p, p + n_pad, acc_t(0));
      } else {
        const acc_t sink_term = sink > neg_inf ? std::exp(sink - max) : acc_t(0);
        const acc_t inverse = acc_t(1) / (exp_shifted_sum(p, p, n_pad, max, exp_scale) + sink_term);
        scale_row(p, n_pad, inverse);
        p_sink = sink_term * inverse;
      }
      if (dropout) {
        acc_t* keep = buf.keep.data() + r * ld;
        acc_t* pk = buf.kept.data() + r * ld;
        std::copy(p, p + n_pad, pk);
        std::fill(keep + n, keep + n_pad, acc_t(0));
        dropout_row(scoring.dropout, scoring.dropout.row_key(seq.index, head, i0 + r), lo, n, pk, keep);
        delta = centered_delta(pk, p, dp, n_pad, p_sink);
        keep_row = keep;
      } else {
        delta = centered_delta(p, p, dp, n_pad, p_sink);
      }
    }
    softmax_backward_row(p, dp, keep_row, delta, n_pad, fold_scale ? scale : acc_t(1));
    // d sink = -p_sink * delta: raising the sink scales the row's output by 1 - p_sink.
    step_sink -= static_cast<double>(p_sink) * delta;
    // dp now holds dS, the gradient of the final score (times the scale where fold_scale, and then
    // nothing below reads it): that of an added float mask, and minus the distance times it for the slope.
    if (mask_sink) {
      acc_t* sink = mask_sink + seq.batch * extra.mask_stride[0] + head * extra.mask_stride[1] +
                    (i0 + r) * extra.mask_stride[2] + lo * extra.mask_stride[3];
      for (int64_t j = 0; j < n; ++j) sink[j * extra.mask_stride[3]] += dp[j];
    }
    if (head_grads.slope) {
      // d slope = -sum_j dS_j d_j, whose terms cancel: sum_j dS_j = p_sink delta, 0 without a sink. The
      // distances are measured from c = sum_j p_j d_j, so that the rounding of every dS_j (and of delta,
      // which shifts them all by p_j) is not multiplied by distances of up to the key range:
      // -sum_j dS_j (d_j - c) - c p_sink delta. With this c, delta's rounding cancels with a sink too
      // (it enters as delta (sum_j p_j (d_j - c) - c p_sink) = delta c (1 - sum_j p_j - p_sink) = 0);
      // the mean distance c / (1 - p_sink), the center before, did not, and its division cancels when
      // the sink dominates. (Raw distances made the float32 slope gradient 2-3x the float32 reference's
      // error at 53 keys; alibi-slope-gradient.md.)
      const int64_t position = i0 + r + seq.len_k - seq.len_q - lo;
      const double center = distance_dot(p, position, n);
      step_alibi -= distance_dot(dp, position, n, center) +
                    center * static_cast<double>(p_sink) * delta;
    }
    if (softcap) {
      const acc_t* t = buf.tanh.data() + r * ld;
      for (int64_t j = 0; j < n; ++j) dp[j] *= (acc_t(1) - t[j] * t[j]) * scale;
    } else if (!fold_scale) {
      for (int64_t j = 0; j < n; ++j) dp[j] *= scale;
    }
    for (int64_t j = n; j < n_pad; ++j) dp[j] = acc_t(0);
  }
  if (head_grads.sink) *head_grads.sink += step_sink;
  if (head_grads.slope) *head_grads.slope += step_alibi;
  gemm<acc_t>(n, value_dim, rows, kept, 1, ld, buf.dout.data(), ld_v, buf.dv.data() + lo * ld_v, ld_v, true);
  gemm<acc_t>(rows, dim, n, dprobs, ld, 1, task.tiles.keys(s, h, lo), buf.dq.data(), ld_k, false);
  store_rows(dq, seq.batch, head, seq.q_start + i0, rows, dim, buf.dq.data(), ld_k);
  gemm<acc_t>(n, dim, rows, dprobs, 1, ld, buf.q.data(), ld_k, buf.dk.data() + lo * ld_k, ld_k, true);
}

// dK (or dV) rows [r0, r1) of a split task: the parts' sums added in part order, stored.
template <typename scalar_t, typename acc_t>
void sum_parts(std::vector<BackwardPartial<acc_t>*> parts, AlignedVector<acc_t> BackwardPartial<acc_t>::*grad,
               const Operand<scalar_t>& out, const Sequence& seq, int64_t kv_head, int64_t r0, int64_t r1,
               int64_t features, int64_t ld) {
  acc_t* total = (parts[0]->*grad).data();
  for (size_t p = 1; p < parts.size(); ++p) {
    const acc_t* add = (parts[p]->*grad).data();
    for (int64_t x = r0 * ld; x < r1 * ld; ++x) total[x] += add[x];
  }
  store_rows(out, seq.batch, kv_head, seq.k_start + r0, r1 - r0, features, total + r0 * ld, ld);
}

template <typename scalar_t>
void backward(const Problem<scalar_t>& problem, const Scoring<attn_acc_t<scalar_t>>& scoring,
                               const Operand<scalar_t>& dout, const Operand<scalar_t>& dq,
                               const Operand<scalar_t>& dk, const Operand<scalar_t>& dv,
                               const ExtraGradients<attn_acc_t<scalar_t>>& extra) {
  using acc_t = attn_acc_t<scalar_t>;
  using Tiles = KeyTiles<acc_t>;
  constexpr int layouts = Tiles::kKeysT | Tiles::kKeys | Tiles::kValuesT;
  const int64_t ld_k = round_up(problem.head_dim, Tiles::panel), ld_v = round_up(problem.value_dim, Tiles::panel);
  const int64_t heads_q = problem.heads_q, heads_kv = problem.heads_kv, group = heads_q / heads_kv;
  const int64_t count = static_cast<int64_t>(problem.sequences.size()), tasks = count * heads_kv;
  // Parts of one task write the same mask-gradient entries where the mask broadcasts over query heads
  // or rows, unless every thread has its own buffer.
  const bool shared_mask = extra.mask && !extra.mask_per_thread && (extra.mask_stride[1] == 0 || extra.mask_stride[2] == 0);
  int64_t part_bytes = 0;
  for (const Sequence& seq : problem.sequences) {
    part_bytes += heads_kv * seq.len_k * (ld_k + ld_v) * static_cast<int64_t>(sizeof(acc_t));
  }
  const int64_t parts = shared_mask ? 1 : backward_parts(tasks, at::get_num_threads(), part_bytes);
  // Whole tasks pack their own pair's K and V just before using them (KeyTiles' local mode: they stay in
  // the thread's cache, and short sequences never write them all to memory first); the parts of split
  // tasks share tiles packed once.
  const bool own_tiles = parts == 1;
  std::optional<Tiles> shared;
  if (!own_tiles) shared.emplace(problem, layouts);
  std::vector<BackwardPartial<acc_t>> partials(parts > 1 ? tasks * parts : 0);
  const auto cost_of_pair = pair_cost(problem);
  // Mask-gradient buffers per thread are summed after the call: which thread ran a task then changes the
  // order of the sums, so those calls do not steal.
  const bool steal = !(extra.mask && extra.mask_per_thread);
  parallel_for_balanced(tasks * parts, [&](int64_t index) { return cost_of_pair(index / parts); },
                        [&](TaskClaims& claims) {
    const simd::FlushDenormals flush;
    acc_t* mask_sink = extra.mask;
    if (mask_sink && extra.mask_per_thread) mask_sink += at::get_thread_num() * extra.mask_numel;
    BackwardBuffers<acc_t> buf;
    std::optional<Tiles> own;
    if (own_tiles) own.emplace(problem, layouts, /*local=*/true);
    const Tiles& tiles = own_tiles ? *own : *shared;
    for (int64_t index : claims) {
      const int64_t task_index = index / parts, part = index % parts;
      const int64_t s = task_index / heads_kv, kv_head = task_index % heads_kv;
      const Sequence& seq = problem.sequences[s];
      if (own_tiles) own->load(problem, s, kv_head);
      const BackwardTask<acc_t> task{s, kv_head, tiles};
      // Score rows cover the panels of keys, plus a vector so that rows do not alias in L1.
      const int64_t ld = tiles.key_panels[s] * Tiles::panel + simd::Traits<acc_t>::width;
      buf.start(ld, tiles.ld_k, tiles.ld_v, seq.len_k, scoring.rules.softcap > 0, scoring.dropout.active());
      BackwardPartial<acc_t>* partial = parts > 1 ? &partials[index] : nullptr;
      if (partial) {
        partial->slopes.assign(extra.alibi ? group : 0, 0.0);
        partial->sinks.assign(extra.sinks ? group : 0, 0.0);
      }
      // Units (query head g, row step), g-major, dealt to the parts in rounds of one each, every other
      // round in reverse order: under a causal mask, where each step costs more than the one before, the
      // parts get equal sums (a plain deal would give the last part the dearer step of every round).
      const int64_t steps = (seq.len_q + buf.rows - 1) / buf.rows;
      for (int64_t deal = 0; deal * parts < group * steps; ++deal) {
        const int64_t unit = deal * parts + (deal % 2 == 0 ? part : parts - 1 - part);
        if (unit >= group * steps) break;
        const int64_t g = unit / steps, i0 = unit % steps * buf.rows, head = kv_head * group + g;
        const int64_t slot = seq.index * heads_q + head;
        HeadGradients head_grads{nullptr, nullptr};
        if (extra.alibi) head_grads.slope = partial ? &partial->slopes[g] : extra.alibi + slot;
        if (extra.sinks) head_grads.sink = partial ? &partial->sinks[g] : extra.sinks + slot;
        backward_rows(problem, scoring, task, head, i0, std::min(buf.rows, seq.len_q - i0), dout, dq, extra,
                      mask_sink, head_grads, buf);
      }
      if (partial) {
        partial->dk = std::move(buf.dk);
        partial->dv = std::move(buf.dv);
      } else {
        store_rows(dk, seq.batch, kv_head, seq.k_start, seq.len_k, problem.head_dim, buf.dk.data(), tiles.ld_k);
        store_rows(dv, seq.batch, kv_head, seq.k_start, seq.len_k, problem.value_dim, buf.dv.data(), tiles.ld_v);
      }
    }
  }, steal);
  if (parts == 1) return;
  // The parts' sums, in part order: over (task, block of keys) in parallel, the slope and sink
  // gradients (one number per query head) in this thread.
  constexpr int64_t key_block = 256;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (task, first key)
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t r0 = 0; r0 < problem.sequences[t / heads_kv].len_k; r0 += key_block) blocks.emplace_back(t, r0);
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto [t, r0] = blocks[b];
      const Sequence& seq = problem.sequences[t / heads_kv];
      const int64_t r1 = std::min(seq.len_k, r0 + key_block);
      std::vector<BackwardPartial<acc_t>*> of_task;
      for (int64_t p = 0; p < parts; ++p) of_task.push_back(&partials[t * parts + p]);
      sum_parts(of_task, &BackwardPartial<acc_t>::dk, dk, seq, t % heads_kv, r0, r1, problem.head_dim, ld_k);
      sum_parts(of_task, &BackwardPartial<acc_t>::dv, dv, seq, t % heads_kv, r0, r1, problem.value_dim, ld_v);
    }
  });
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t first = problem.sequences[t / heads_kv].index * heads_q + t % heads_kv * group;
    for (int64_t p = 0; p < parts; ++p) {
      const BackwardPartial<acc_t>& part = partials[t * parts + p];
      for (int64_t g = 0; g < group; ++g) {
        if (extra.alibi) extra.alibi[first + g] += part.slopes[g];
        if (extra.sinks) extra.sinks[first + g] += part.sinks[g];
      }
    }
  }
}
