// Row operations of the CPU attention kernel on float (or double) score buffers padded to whole vectors:
// raw products to final scores (scale, softcap, ALiBi, masks, visibility), and the softmax pieces.
// Always inlined into the multi-versioned kernels, so they get the kernel's instruction set.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/attention_problem.h"
#include "cpu/attention_simd.h"


template <typename acc_t, typename mask_t>
inline void apply_mask_values(acc_t* s, const mask_t* m, int64_t stride, int64_t n) {
  if constexpr (std::is_same_v<mask_t, bool>) {
    for (int64_t j = 0; j < n; ++j) {
      if (!m[j * stride]) s[j] = -std::numeric_limits<acc_t>::infinity();
    }
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] += static_cast<acc_t>(m[j * stride]);
  }
}

// Adds (float) or applies (bool) the mask row of (batch, head, i) over keys [j0, j0 + n).
template <typename acc_t>
inline void apply_mask_row(const Mask& mask, int64_t batch, int64_t head, int64_t i, int64_t j0,
                                      int64_t n, acc_t* s) {
  const int64_t offset = mask.offset(batch, head, i, j0);
  const int64_t stride = mask.stride[3];
  switch (mask.dtype) {
    case at::kBool: return apply_mask_values(s, static_cast<const bool*>(mask.data) + offset, stride, n);
    case at::kFloat: return apply_mask_values(s, static_cast<const float*>(mask.data) + offset, stride, n);
    case at::kDouble: return apply_mask_values(s, static_cast<const double*>(mask.data) + offset, stride, n);
    case at::kBFloat16:
      return apply_mask_values(s, static_cast<const c10::BFloat16*>(mask.data) + offset, stride, n);
    case at::kHalf: return apply_mask_values(s, static_cast<const c10::Half*>(mask.data) + offset, stride, n);
    default: return;  // the op checks the dtype before any kernel runs
  }
}

// What the row passes below apply to each vector of raw products before using it (lanes j .. j + width).
struct Unchanged {
  template <typename V>
  V operator()(const V& x, int64_t) const { return x; }
};

// |position - j| for the lanes j .. j + width: ALiBi's distance, exact (integers far below 2^24).
template <typename acc_t>
struct Distance {
  using V = simd::Vec<acc_t>;
  int64_t position;
  V lane{};
  explicit Distance(int64_t position_) : position(position_) {
    for (int64_t k = 0; k < simd::Traits<acc_t>::width; ++k) lane[k] = static_cast<acc_t>(k);
  }
  V operator()(int64_t j) const { return simd::abs<acc_t>(lane + static_cast<acc_t>(j - position)); }
};

// x scale - slope |position - j|: the final score of a row that has only a scale and ALiBi.
template <typename acc_t>
struct ScaledDistance {
  using V = simd::Vec<acc_t>;
  acc_t scale, slope;
  Distance<acc_t> distance;
  ScaledDistance(acc_t scale_, acc_t slope_, int64_t position) : scale(scale_), slope(slope_), distance(position) {}
  V operator()(const V& x, int64_t j) const { return x * scale - distance(j) * slope; }
};

// The largest ALiBi bias -slope |position - j| over keys j in [lo, hi) (lo < hi).
template <typename acc_t>
inline acc_t max_distance_bias(acc_t slope, int64_t position, int64_t lo, int64_t hi) {
  const int64_t nearest = position < lo ? lo - position : position >= hi ? position - (hi - 1) : 0;
  const int64_t farthest = std::max(std::abs(position - lo), std::abs(position - (hi - 1)));
  return -slope * static_cast<acc_t>(slope > 0 ? nearest : farthest);
}

// s[j] <- s[j] scale - slope |position - j| over [0, n_pad): scale and ALiBi bias in one vector pass.
template <typename acc_t>
inline void scale_add_distance(acc_t* s, int64_t n_pad, acc_t scale, acc_t slope, int64_t position) {
  constexpr int64_t width = simd::Traits<acc_t>::width;
  const ScaledDistance<acc_t> bias(scale, slope, position);
  for (int64_t j = 0; j < n_pad; j += width) simd::store(s + j, bias(simd::load(s + j), j));
}

// -inf for the keys of [j0, j0 + n_pad) that the rules hide from row i (causal, window, key lengths; the
// padding past n too).
template <typename acc_t>
inline void hide_keys(const Rules& rules, const Sequence& seq, int64_t i, int64_t j0, int64_t n, int64_t n_pad,
                      acc_t* s) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const auto [lo, hi] = rules.keys(seq, i);
  const int64_t visible_lo = std::clamp<int64_t>(lo - j0, 0, n);
  const int64_t visible_hi = std::clamp<int64_t>(hi - j0, visible_lo, n);
  std::fill(s, s + visible_lo, neg_inf);
  std::fill(s + visible_hi, s + n_pad, neg_inf);
}

// s[0, n) holds q.k for keys [j0, j0 + n) of query row i (query head `head`); makes them final scores,
// -inf where hidden, and -inf in the padding up to n_pad. With softcap, tanh_out receives the tanh
// values (the backward's derivative); it may be null otherwise.
template <typename acc_t>
inline void score_row(const Scoring<acc_t>& scoring, const Sequence& seq, int64_t head, int64_t i,
                                 int64_t j0, int64_t n, int64_t n_pad, acc_t* s, acc_t* tanh_out) {
  const Rules& rules = scoring.rules;
  const acc_t scale = static_cast<acc_t>(rules.scale);
  const acc_t slope = scoring.slope(seq, head);
  const int64_t position = i + seq.len_k - seq.len_q - j0;
  if (rules.softcap > 0) {
    const acc_t cap = static_cast<acc_t>(rules.softcap);
    for (int64_t j = 0; j < n; ++j) {
      const acc_t t = std::tanh(s[j] * scale / cap);
      tanh_out[j] = t;
      s[j] = cap * t;
    }
    if (slope != acc_t(0)) scale_add_distance(s, n_pad, acc_t(1), slope, position);
  } else if (slope != acc_t(0)) {
    scale_add_distance(s, n_pad, scale, slope, position);
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] *= scale;
  }
  if (scoring.mask.present()) apply_mask_row(scoring.mask, seq.batch, head, i, j0, n, s);
  hide_keys(rules, seq, i, j0, n, n_pad, s);
}

// The largest f(score) over [0, n_pad), NaN where a NaN score is the only thing in the row's way: every
// other score -inf. A NaN among finite scores is passed over here (one max instruction a vector, where
// letting it win took four); the exp pass after this one carries it into the probabilities and the sum,
// and so to the output. Four independent running maxima: one chain would wait on its own latency.
template <typename acc_t, typename F = Unchanged>
inline acc_t row_max(const acc_t* s, int64_t n_pad, const F& f = F{}) {
  using V = simd::Vec<acc_t>;
  constexpr int64_t width = simd::Traits<acc_t>::width;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  constexpr int chains = 4;
  V best[chains];
  for (int c = 0; c < chains; ++c) best[c] = simd::broadcast(neg_inf);
  const auto take = [](V& b, const V& x) { b = x > b ? x : b; };  // false for NaN: b keeps its value
  int64_t j = 0;
  for (; j + chains * width <= n_pad; j += chains * width) {
#pragma GCC unroll 4
    for (int c = 0; c < chains; ++c) take(best[c], f(simd::load(s + j + c * width), j + c * width));
  }
  for (; j < n_pad; j += width) take(best[0], f(simd::load(s + j), j));
  for (int c = 1; c < chains; ++c) take(best[0], best[c]);
  const acc_t result = simd::reduce_max<acc_t>(best[0]);
  if (result == neg_inf) {  // a row that sees nothing skips the exp pass: a NaN must show here
    for (j = 0; j < n_pad; j += width) {
      const V x = f(simd::load(s + j), j);
      if (simd::reduce_max<acc_t>(x != x ? simd::broadcast<acc_t>(1) : simd::broadcast<acc_t>(0)) > 0) {
        return std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
  }
  return result;
}

// Where an exp pass writes a row's probabilities: floats at p (the default). pair(j, a, b) writes lanes
// [j, j + 2 width), single(j, a) [j, j + width), zero(n_pad) zeros over [0, n_pad).
template <typename acc_t>
struct FloatProbs {
  using V = simd::Vec<acc_t>;
  acc_t* p;
  void pair(int64_t j, const V& a, const V& b) const {
    simd::store(p + j, a);
    simd::store(p + j + simd::Traits<acc_t>::width, b);
  }
  void single(int64_t j, const V& a) const { simd::store(p + j, a); }
  void zero(int64_t n_pad) const { std::fill(p, p + n_pad, acc_t(0)); }
};

// exp(f(s) * scale - shift) over [0, n_pad) (one FMA, then exp) to `probs` (a writer as FloatProbs);
// returns the sum. -inf scores give 0.
template <typename acc_t, typename F = Unchanged, typename Probs>
inline acc_t exp_shifted_sum_to(const acc_t* s, const Probs& probs, int64_t n_pad, acc_t shift, acc_t scale = acc_t(1),
                                const F& f = F{}) {
  using V = simd::Vec<acc_t>;
  constexpr int64_t width = simd::Traits<acc_t>::width;
  const auto pass = [&](const auto& exp) {
    V total[2] = {V{}, V{}};  // two sums: one add chain would wait on its own latency
    int64_t j = 0;
    for (; j + 2 * width <= n_pad; j += 2 * width) {
      const V a = exp(f(simd::load(s + j), j));
      const V b = exp(f(simd::load(s + j + width), j + width));
      probs.pair(j, a, b);
      total[0] += a;
      total[1] += b;
    }
    if (j < n_pad) {
      const V a = exp(f(simd::load(s + j), j));
      probs.single(j, a);
      total[0] += a;
    }
    return simd::reduce_add<acc_t>(total[0] + total[1]);
  };
  if (std::abs(shift) > simd::kFusedShiftLimit<acc_t>) {  // (rare: huge scores or masks; see exp_rounded)
    return pass([&](const V& x) { return simd::exp_rounded<acc_t>(x, scale, shift); });
  }
  return pass([&](const V& x) { return simd::exp_affine<acc_t>(x, scale, shift); });
}

// The same to floats at p (p may be s).
template <typename acc_t, typename F = Unchanged>
inline acc_t exp_shifted_sum(const acc_t* s, acc_t* p, int64_t n_pad, acc_t shift, acc_t scale = acc_t(1),
                             const F& f = F{}) {
  return exp_shifted_sum_to(s, FloatProbs<acc_t>{p}, n_pad, shift, scale, f);
}

template <typename acc_t>
inline void scale_row(acc_t* x, int64_t n_pad, acc_t factor) {
  constexpr int64_t width = simd::Traits<acc_t>::width;
  for (int64_t j = 0; j < n_pad; j += width) simd::store(x + j, simd::load(x + j) * factor);
}

// sum_j x[j] (|position - j| - center) over [0, n), in double (see ExtraGradients): with x = dS, the
// gradient of an ALiBi slope (up to sign and the center's term), with x = p, the row's center. Eight
// independent partial sums, which the compiler vectorizes.
template <typename acc_t>
inline double distance_dot(const acc_t* x, int64_t position, int64_t n, double center = 0.0) {
  constexpr int64_t lanes = 8;
  double part[lanes] = {}, offset[lanes];  // offset: position - j, exact in double
  for (int64_t l = 0; l < lanes; ++l) offset[l] = static_cast<double>(position - l);
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    for (int64_t l = 0; l < lanes; ++l) {
      part[l] += static_cast<double>(x[j + l]) * (std::fabs(offset[l]) - center);
      offset[l] -= static_cast<double>(lanes);
    }
  }
  double total = 0.0;
  for (; j < n; ++j) total += static_cast<double>(x[j]) * (static_cast<double>(std::abs(position - j)) - center);
  for (int64_t l = 0; l < lanes; ++l) total += part[l];
  return total;
}

// The delta of softmax's backward on one row, sum_j w_j dp_j / (sum_j p_j + extra), in double over
// [0, n_pad): w = p, or p with dropout's keep applied; extra the sink's probability. The sum of the row's
// dS_j = p_j (dp_j keep_j - delta) is extra delta up to the rounding of each dS_j alone. With a float
// delta, sum_j p_j dp_j, the rows' dS summed to float's spacing at delta times (sum_j p_j - 1), a few
// ulps of the products: when one key holds most of a row (p 0.9998, dS 0.0048 against dp 14.7), the dq
// of two keys 170x as large as their sum inherited it (3x the float32 reference's error on the x86-64
// baseline variant, whose exp rounds otherwise; 0.02x on AVX-512, by luck).
template <typename acc_t>
inline double centered_delta(const acc_t* w, const acc_t* p, const acc_t* dp, int64_t n_pad, double extra) {
  // 32 partial sums each (four AVX-512 registers of doubles): the adds of one chain would wait on their
  // own latency. The tail goes to sums of its own, so that no lane's chain turns scalar.
  constexpr int64_t lanes = 32;
  double dot[lanes] = {}, total[lanes] = {};
  int64_t j = 0;
  for (; j + lanes <= n_pad; j += lanes) {
    for (int64_t l = 0; l < lanes; ++l) {
      dot[l] += static_cast<double>(w[j + l]) * static_cast<double>(dp[j + l]);
      total[l] += static_cast<double>(p[j + l]);
    }
  }
  double num = 0.0, den = extra;
  for (; j < n_pad; ++j) {
    num += static_cast<double>(w[j]) * static_cast<double>(dp[j]);
    den += static_cast<double>(p[j]);
  }
  for (int64_t l = 0; l < lanes; ++l) {
    num += dot[l];
    den += total[l];
  }
  return den > 0.0 ? num / den : 0.0;
}

// The softmax's backward on one row: dp <- p (dp keep - delta), keep null meaning 1, over [0, n_pad).
// delta in two parts (hi + lo, hi the acc_t nearest it), subtracted one after the other: dp - hi is
// exact where dp is near delta (the keys that hold the row), so dS keeps the precision of its own size.
template <typename acc_t>
inline void softmax_backward_row(const acc_t* p, acc_t* dp, const acc_t* keep, double delta, int64_t n_pad,
                                 acc_t scale = acc_t(1)) {
  using V = simd::Vec<acc_t>;
  constexpr int64_t width = simd::Traits<acc_t>::width;
  const acc_t hi = static_cast<acc_t>(delta), lo = static_cast<acc_t>(delta - static_cast<double>(hi));
  // scale != 1: dp *= scale (the score's, for dS of the raw products) in the same pass, the same two
  // roundings as a pass of its own.
  const auto run = [&](auto scaled) {
    for (int64_t j = 0; j < n_pad; j += width) {
      V g = simd::load(dp + j);
      if (keep) g *= simd::load(keep + j);
      const V ds = simd::load(p + j) * ((g - hi) - lo);
      simd::store(dp + j, decltype(scaled)::value ? ds * scale : ds);
    }
  };
  if (scale != acc_t(1)) return run(std::true_type{});
  run(std::false_type{});
}

// Whether score_row would only scale head `head`'s products (and add ALiBi's bias, if with_alibi) before
// masking keys by position (causal, window, key lengths): no softcap or mask, and a positive scale (so the
// row maximum of the products gives that of the scores, and -inf padding stays -inf) of at least acc_t's
// smallest normal (the kernels flush subnormals to 0: a scale of 1e-39 became 0 there, and -inf padding
// times 0 NaN).
template <typename acc_t>
inline bool scores_only_scaled(const Scoring<acc_t>& scoring, const Sequence& seq, int64_t head,
                               bool with_alibi = false) {
  const Rules& rules = scoring.rules;
  return !(rules.softcap > 0 || scoring.mask.present() ||
           !(static_cast<acc_t>(rules.scale) >= std::numeric_limits<acc_t>::min()) ||
           (!with_alibi && scoring.slope(seq, head) != acc_t(0)));
}

// Whether score_row would only scale row i's products over keys [j0, j0 + n): scores_only_scaled, and
// every key visible.
template <typename acc_t>
inline bool plain_row(const Scoring<acc_t>& scoring, const Sequence& seq, int64_t head, int64_t i, int64_t j0,
                      int64_t n, bool with_alibi = false) {
  if (!scores_only_scaled(scoring, seq, head, with_alibi)) return false;
  const auto [lo, hi] = scoring.rules.keys(seq, i);
  return lo <= j0 && hi >= j0 + n;
}

// Multiplies p by the dropout keep factor (0 or 1 / (1 - p)) of each key; keep receives the factors.
template <typename acc_t>
inline void dropout_row(const Dropout& dropout, uint64_t row_key, int64_t j0, int64_t n, acc_t* p,
                                   acc_t* keep) {
  const acc_t scale = static_cast<acc_t>(dropout.keep_scale);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t factor = dropout.keep(row_key, j0 + j) ? scale : acc_t(0);
    if (keep) keep[j] = factor;
    p[j] *= factor;
  }
}

