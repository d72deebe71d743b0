// How the CPU attention kernels split work: blocks of query rows in a load-balanced order, and the
// float (or double) copies of K and V that every block of a (sequence, kv head) shares.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/attention_pack.h"
#include "cpu/attention_simd.h"



struct RowBlock {
  int64_t sequence, row, rows;
};

// Every sequence's rows in blocks of `block`, ordered first, last, second, second-to-last, ...: under a
// causal mask later blocks cost more, and at::parallel_for hands each thread a contiguous range of
// tasks, so this order gives every range a similar mix of cheap and dear blocks.
inline std::vector<RowBlock> row_blocks(const std::vector<Sequence>& sequences, int64_t block) {
  std::vector<RowBlock> blocks;
  for (int64_t s = 0; s < static_cast<int64_t>(sequences.size()); ++s) {
    const int64_t len = sequences[s].len_q, count = (len + block - 1) / block;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t b = k % 2 == 0 ? k / 2 : count - 1 - k / 2;
      blocks.push_back({s, b * block, std::min(block, len - b * block)});
    }
  }
  return blocks;
}

// K and V of every (sequence, kv head) in acc_t, in the layouts the products read:
//   keys_t:   (head_dim, ld_t) transposed, for Q K^T;      keys:   (len_k, ld_k) rows, for dS K;
//   values_t: (value_dim, ld_t) transposed, for dO V^T;    values: (len_k, ld_v) rows, for P V.
// ld_t leaves a vector of slack past the padded length, so a product starting at any key offset may
// read whole vectors. Padding is zero: no garbage (or subnormal) lanes reach the FMA units.
template <typename acc_t>
struct KeyTiles {
  enum Layout { kKeysT = 1, kKeys = 2, kValuesT = 4, kValues = 8 };
  static constexpr int64_t width = simd::Traits<acc_t>::width;

  int64_t heads_kv, head_dim, value_dim, ld_k, ld_v;
  std::vector<int64_t> ld_t;                   // per sequence: row stride of its transposed tiles
  std::vector<int64_t> transposed_base, rows_base;  // per sequence: offset of head 0, in columns / rows

  template <typename scalar_t>
  KeyTiles(const Problem<scalar_t>& problem, int layouts)
      : heads_kv(problem.heads_kv),
        head_dim(problem.head_dim),
        value_dim(problem.value_dim),
        ld_k(round_up(problem.head_dim, width)),
        ld_v(round_up(problem.value_dim, width)) {
    const auto& seqs = problem.sequences;
    int64_t columns = 0, rows = 0;
    for (const Sequence& seq : seqs) {
      ld_t.push_back(round_up(seq.len_k, width) + width);
      transposed_base.push_back(columns);
      rows_base.push_back(rows);
      columns += heads_kv * ld_t.back();
      rows += heads_kv * seq.len_k;
    }
    if (layouts & kKeysT) keys_t_.assign(columns * head_dim, acc_t(0));
    if (layouts & kValuesT) values_t_.assign(columns * value_dim, acc_t(0));
    if (layouts & kKeys) keys_.assign(rows * ld_k, acc_t(0));
    if (layouts & kValues) values_.assign(rows * ld_v, acc_t(0));
    const int64_t count = static_cast<int64_t>(seqs.size());
    at::parallel_for(0, count * heads_kv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / heads_kv, h = task % heads_kv;
        const Sequence& seq = seqs[s];
        const int64_t b = seq.batch, t0 = seq.k_start, n = seq.len_k;
        if (layouts & kKeysT) load_columns(problem.k, b, h, t0, n, head_dim, mutable_at(keys_t_, s, h, head_dim), ld_t[s]);
        if (layouts & kValuesT) {
          load_columns(problem.v, b, h, t0, n, value_dim, mutable_at(values_t_, s, h, value_dim), ld_t[s]);
        }
        if (layouts & kKeys) load_rows(problem.k, b, h, t0, n, head_dim, keys_.data() + row_offset(s, h, n, ld_k), ld_k);
        if (layouts & kValues) {
          load_rows(problem.v, b, h, t0, n, value_dim, values_.data() + row_offset(s, h, n, ld_v), ld_v);
        }
      }
    });
  }

  const acc_t* keys_t(int64_t s, int64_t h) const { return keys_t_.data() + transposed_offset(s, h, head_dim); }
  const acc_t* values_t(int64_t s, int64_t h) const { return values_t_.data() + transposed_offset(s, h, value_dim); }
  const acc_t* keys(int64_t s, int64_t h, int64_t len_k) const { return keys_.data() + row_offset(s, h, len_k, ld_k); }
  const acc_t* values(int64_t s, int64_t h, int64_t len_k) const {
    return values_.data() + row_offset(s, h, len_k, ld_v);
  }

 private:
  std::vector<acc_t> keys_t_, keys_, values_t_, values_;

  int64_t transposed_offset(int64_t s, int64_t h, int64_t features) const {
    return (transposed_base[s] + h * ld_t[s]) * features;
  }
  int64_t row_offset(int64_t s, int64_t h, int64_t len_k, int64_t ld) const { return (rows_base[s] + h * len_k) * ld; }
  acc_t* mutable_at(std::vector<acc_t>& storage, int64_t s, int64_t h, int64_t features) {
    return storage.data() + transposed_offset(s, h, features);
  }
};

