// How the CPU attention kernels split work: blocks of query rows in a load-balanced order, and the
// float (or double) copies of K and V that every block of a (sequence, kv head) shares.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/attention_gemm.h"
#include "cpu/attention_kernels.h"
#include "cpu/attention_pack.h"
#include "cpu/attention_simd.h"



struct RowBlock {
  int64_t sequence, row, rows;
};

// The rows of each block when `len` rows go in blocks of at most `block`. even: as even as whole
// multiples of `even` rows allow (the AMX forward's slabs: 256 rows as 2 x 128, not 240 + 16, whose
// 16-row block costs about what a full one does; 0: full blocks and a remainder, which the float forward
// keeps: 512 float32 rows ran 1.07x slower as 192 + 192 + 128 than as 240 + 240 + 32).
inline int64_t block_rows_of(int64_t len, int64_t block, int64_t even) {
  const int64_t count = (len + block - 1) / block;
  if (even == 0 || count <= 1) return block;
  return std::min(block, ((len + count - 1) / count + even - 1) / even * even);
}

// The tasks that one thread of parallel_for_balanced runs, claimed one at a time: first its own runs
// front to back, then (when stealing) the back ends of the other runs, so a thread that finishes early
// (its core shared with other work, or a run that cost more than its estimate) takes over what another
// has not started. Each run is one word, front << 32 | back, claimed by compare-and-swap: every task runs
// exactly once, whichever thread takes it. Iterate with `for (int64_t task : claims)`.
class TaskClaims {
 public:
  struct Run {
    alignas(64) std::atomic<uint64_t> bounds;  // a line each: threads claim from different runs
  };
  struct Done {};
  class Iterator {
   public:
    int64_t operator*() const { return task_; }
    Iterator& operator++() {
      task_ = claims_->next();
      return *this;
    }
    bool operator!=(Done) const { return task_ >= 0; }

   private:
    friend class TaskClaims;
    Iterator(TaskClaims* claims, int64_t task) : claims_(claims), task_(task) {}
    TaskClaims* claims_;
    int64_t task_;
  };

  TaskClaims(Run* runs, int64_t count, int64_t first, int64_t last, bool steal)
      : runs_(runs), count_(count), first_(first), own_(last - first), steal_(steal) {}
  Iterator begin() { return {this, next()}; }
  Done end() const { return {}; }

  // The next task, or -1 when none is left to this thread.
  int64_t next() {
    for (; visited_ < (steal_ ? count_ : own_); ++visited_) {
      const bool own = visited_ < own_;
      std::atomic<uint64_t>& bounds = runs_[(first_ + visited_) % count_].bounds;
      uint64_t word = bounds.load(std::memory_order_relaxed);
      while ((word >> 32) < (word & 0xFFFFFFFFu)) {
        const uint64_t claimed = own ? word + (uint64_t{1} << 32) : word - 1;  // front + 1, or back - 1
        if (bounds.compare_exchange_weak(word, claimed, std::memory_order_relaxed)) {
          return static_cast<int64_t>(own ? word >> 32 : (word & 0xFFFFFFFFu) - 1);
        }
      }
    }
    return -1;
  }

 private:
  Run* runs_;
  int64_t count_, first_, own_, visited_ = 0;
  bool steal_;
};

// at::parallel_for over tasks [0, count) where each thread runs one contiguous run of tasks of about
// equal cost (cost(t) >= 0, any unit): at::parallel_for splits by count, which gave one thread every long
// sequence of a varlen batch sorted by length (lengths 1024, 512, ..., 32 ran no faster on 2 threads than
// on 1) or every full chunk of a decode. fn(claims) runs the tasks of a TaskClaims, once per thread (its
// buffers live across its tasks). With `steal`, threads that finish their runs take tasks from the others'
// (a one-token bfloat16 decode step spent a tenth of its samples waiting at the end of the call on a
// shared machine): what a task computes must then depend on neither the thread nor the order (each task
// writes only its own results); without, each thread runs exactly its runs, which depend on the thread
// count only.
template <typename Cost, typename Fn>
void parallel_for_balanced(int64_t count, const Cost& cost, const Fn& fn, bool steal = true) {
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  AlignedVector<double> prefix(count + 1, 0.0);
  for (int64_t t = 0; t < count; ++t) prefix[t + 1] = prefix[t] + static_cast<double>(cost(t));
  TORCH_CHECK(count < (int64_t{1} << 32), "attention kernels: ", count, " tasks in one call (claims count in 32 bits)");
  if (count == 0) return;
  std::vector<TaskClaims::Run> runs(shares);
  // Run i ends at the first task past (i + 1) / shares of the cost.
  for (int64_t i = 0, t = 0, begin = 0; i < shares; ++i, begin = t) {
    while (t < count && (i + 1 == shares || prefix[t] * shares < prefix[count] * (i + 1))) ++t;
    runs[i].bounds.store(static_cast<uint64_t>(begin) << 32 | static_cast<uint64_t>(t), std::memory_order_relaxed);
  }
  at::parallel_for(0, shares, 1, [&](int64_t first, int64_t last) {
    bool own_tasks = false;  // (a thread that can neither run nor steal a task sets up no buffers)
    for (int64_t i = first; i < last; ++i) {
      const uint64_t bounds = runs[i].bounds.load(std::memory_order_relaxed);
      own_tasks = own_tasks || (bounds >> 32) < (bounds & 0xFFFFFFFFu);
    }
    if (!own_tasks && !steal) return;
    TaskClaims claims(runs.data(), shares, first, last, steal);
    fn(claims);
  });
}

// A task's cost for parallel_for_balanced: q.k and P V of `rows` query rows over `keys` keys, plus its
// setup (taken as that of 32 keys).
inline int64_t task_cost(int64_t rows, int64_t keys) { return rows * (keys + 32); }

// The cost of task (sequence, kv head) = sequence * heads_kv + kv head, for parallel_for_balanced.
template <typename scalar_t>
auto pair_cost(const Problem<scalar_t>& problem) {
  return [&problem](int64_t task) {
    const Sequence& seq = problem.sequences[task / problem.heads_kv];
    return task_cost(seq.len_q * (problem.heads_q / problem.heads_kv), seq.len_k);
  };
}

// The cost of forward task (query head) * blocks.size() + block, for parallel_for_balanced: the block's
// rows over the range of keys they see.
template <typename scalar_t>
auto block_cost(const Problem<scalar_t>& problem, const Rules& rules, const std::vector<RowBlock>& blocks) {
  return [&problem, &rules, &blocks](int64_t task) {
    const RowBlock& block = blocks[task % static_cast<int64_t>(blocks.size())];
    const auto [lo, hi] = rules.block_keys(problem.sequences[block.sequence], block.row, block.row + block.rows);
    return task_cost(block.rows, std::max<int64_t>(hi - lo, 0));
  };
}

// Every sequence's rows in blocks of `block`, ordered first, last, second, second-to-last, ...: under a
// causal mask later blocks cost more, and at::parallel_for hands each thread a contiguous range of
// tasks, so this order gives every range a similar mix of cheap and dear blocks.
inline std::vector<RowBlock> row_blocks(const std::vector<Sequence>& sequences, int64_t block, int64_t even = 0) {
  std::vector<RowBlock> blocks;
  for (int64_t s = 0; s < static_cast<int64_t>(sequences.size()); ++s) {
    const int64_t len = sequences[s].len_q, size = block_rows_of(len, block, even), count = (len + size - 1) / size;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t b = k % 2 == 0 ? k / 2 : count - 1 - k / 2;
      blocks.push_back({s, b * size, std::min(size, len - b * size)});
    }
  }
  return blocks;
}

// K and V of every (sequence, kv head) in acc_t, as panels (attention_gemm.h) of the products that read
// them, so no product copies them again:
//   keys_t, values_t: transposed (features x keys), a panel per kPanel keys, for Q K^T and dO V^T;
//   keys, values:     rows (keys x features), a panel per kPanel features, for dS K and P V.
// Padding is zero: no garbage (or subnormal) lanes reach the FMA units.
template <typename acc_t>
struct KeyTiles {
  enum Layout { kKeysT = 1, kKeys = 2, kValuesT = 4, kValues = 8 };
  static constexpr int64_t panel = kPanel<acc_t>;

  int64_t heads_kv, head_dim, value_dim, ld_k, ld_v;
  std::vector<int64_t> len_k, key_panels;           // per sequence: keys, and panels of keys
  std::vector<int64_t> transposed_base, rows_base;  // per sequence: offset of head 0, in key panels / keys

  // local = false: every (sequence, kv head)'s tiles, loaded here in parallel. local = true: room for one
  // pair at a time, which load() fills: a task that owns a pair packs it into its own cache, where the
  // products read it, instead of a pass that first writes every pair to memory (many short sequences
  // are more K and V than the caches hold, so the products would read it all back from memory).
  template <typename scalar_t>
  KeyTiles(const Problem<scalar_t>& problem, int layouts, bool local = false)
      : heads_kv(problem.heads_kv),
        head_dim(problem.head_dim),
        value_dim(problem.value_dim),
        ld_k(round_up(problem.head_dim, panel)),
        ld_v(round_up(problem.value_dim, panel)),
        layouts_(layouts),
        local_(local) {
    const auto& seqs = problem.sequences;
    int64_t panels = 0, rows = 0;
    for (const Sequence& seq : seqs) {
      len_k.push_back(seq.len_k);
      key_panels.push_back((seq.len_k + panel - 1) / panel);
      transposed_base.push_back(panels);
      rows_base.push_back(rows);
      panels = local ? std::max(panels, key_panels.back()) : panels + heads_kv * key_panels.back();
      rows = local ? std::max(rows, seq.len_k) : rows + heads_kv * seq.len_k;
    }
    // Not zeroed here: each load zeroes its own padding (a serial fill of every tile, and the page faults
    // of first touch, cost a third of a short sequence's forward).
    if (layouts & kKeysT) keys_t_ = pooled_array<acc_t>(panels * panel * head_dim);
    if (layouts & kValuesT) values_t_ = pooled_array<acc_t>(panels * panel * value_dim);
    if (layouts & kKeys) keys_ = pooled_array<acc_t>(rows * ld_k);
    if (layouts & kValues) values_ = pooled_array<acc_t>(rows * ld_v);
    if (local) return;
    const int64_t count = static_cast<int64_t>(seqs.size());
    at::parallel_for(0, count * heads_kv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) load(problem, task / heads_kv, task % heads_kv);
    });
  }

  // Converts K and V of (sequence s, kv head h) into their tiles (local tiles: replacing the pair before).
  template <typename scalar_t>
  void load(const Problem<scalar_t>& problem, int64_t s, int64_t h) {
    const Sequence& seq = problem.sequences[s];
    const int64_t b = seq.batch, t0 = seq.k_start, n = seq.len_k;
    // The padding is the last panel of keys (transposed) or of features (rows): zeroed, then loaded over.
    const auto transposed = [&](const Operand<scalar_t>& x, int64_t features, acc_t* dst) {
      if (key_panels[s] > 0) std::fill_n(dst + (key_panels[s] - 1) * panel * features, panel * features, acc_t(0));
      load_transposed_panels(x, b, h, t0, n, features, dst, panel);
    };
    const auto by_rows = [&](const Operand<scalar_t>& x, int64_t features, acc_t* dst) {
      const int64_t feature_panels = (features + panel - 1) / panel;
      if (feature_panels > 0) std::fill_n(dst + (feature_panels - 1) * n * panel, n * panel, acc_t(0));
      load_row_panels(x, b, h, t0, n, features, dst, panel);
    };
    if (layouts_ & kKeysT) transposed(problem.k, head_dim, keys_t_.get() + transposed_offset(s, h, head_dim));
    if (layouts_ & kValuesT) transposed(problem.v, value_dim, values_t_.get() + transposed_offset(s, h, value_dim));
    if (layouts_ & kKeys) by_rows(problem.k, head_dim, keys_.get() + row_offset(s, h, ld_k));
    if (layouts_ & kValues) by_rows(problem.v, value_dim, values_.get() + row_offset(s, h, ld_v));
    // Keys at or past key_limit (key_lengths) are not part of the sequence and may hold anything (an
    // uninitialized cache's NaN): zeroed, as the products read whole vectors of keys past a row's last
    // visible one, where P = 0 times NaN made dq and dk NaN.
    const int64_t limit = std::clamp<int64_t>(seq.key_limit, 0, n);
    if (limit == n) return;
    const auto clear_transposed = [&](int64_t features, acc_t* dst) {
      for (int64_t j = limit; j < n; ++j) {
        acc_t* at = dst + j / panel * panel * features + j % panel;
        for (int64_t f = 0; f < features; ++f) at[f * panel] = acc_t(0);
      }
    };
    const auto clear_rows = [&](int64_t features, acc_t* dst) {
      for (int64_t p = 0; p < (features + panel - 1) / panel; ++p) {
        std::fill_n(dst + p * n * panel + limit * panel, (n - limit) * panel, acc_t(0));
      }
    };
    if (layouts_ & kKeysT) clear_transposed(head_dim, keys_t_.get() + transposed_offset(s, h, head_dim));
    if (layouts_ & kValuesT) clear_transposed(value_dim, values_t_.get() + transposed_offset(s, h, value_dim));
    if (layouts_ & kKeys) clear_rows(head_dim, keys_.get() + row_offset(s, h, ld_k));
    if (layouts_ & kValues) clear_rows(value_dim, values_.get() + row_offset(s, h, ld_v));
  }

  // Keys from `key` on (a multiple of the panel width), as the B of Q K^T / dO V^T.
  Panels<acc_t> keys_t(int64_t s, int64_t h, int64_t key) const { return transposed(keys_t_, s, h, head_dim, key); }
  Panels<acc_t> values_t(int64_t s, int64_t h, int64_t key) const { return transposed(values_t_, s, h, value_dim, key); }
  // Rows from `key` on, as the B of dS K / P V.
  Panels<acc_t> keys(int64_t s, int64_t h, int64_t key) const { return by_rows(keys_, s, h, ld_k, key); }
  Panels<acc_t> values(int64_t s, int64_t h, int64_t key) const { return by_rows(values_, s, h, ld_v, key); }

 private:
  int layouts_;
  bool local_;
  PooledArray<acc_t> keys_t_, keys_, values_t_, values_;

  int64_t transposed_offset(int64_t s, int64_t h, int64_t features) const {
    return local_ ? 0 : (transposed_base[s] + h * key_panels[s]) * panel * features;
  }
  int64_t row_offset(int64_t s, int64_t h, int64_t ld) const { return local_ ? 0 : (rows_base[s] + h * len_k[s]) * ld; }
  Panels<acc_t> transposed(const PooledArray<acc_t>& storage, int64_t s, int64_t h, int64_t features,
                           int64_t key) const {
    return {storage.get() + transposed_offset(s, h, features) + key / panel * panel * features, panel * features};
  }
  Panels<acc_t> by_rows(const PooledArray<acc_t>& storage, int64_t s, int64_t h, int64_t ld, int64_t key) const {
    return {storage.get() + row_offset(s, h, ld) + key * panel, len_k[s] * panel};
  }
};
