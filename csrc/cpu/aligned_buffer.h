// Kernel buffers that start on a cache line. malloc aligns to 16 bytes (a large block sits 16 bytes past
// a page), so a buffer's 64-byte rows would each straddle two lines: every AVX-512 access and every AMX
// tile row then touches two. An AMX product over operands 16 bytes off a line ran 2.5x slower than over
// aligned ones (a microbenchmark of the decode's P V here, 2026-12-05). Rows inside a buffer stay aligned
// where their strides are multiples of 64 bytes (kScoreStride, kProbStride, the tiles).
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace fused_attention::cpu {

constexpr std::size_t kCacheLine = 64;

inline void* cache_line_new(std::size_t bytes) { return ::operator new(bytes, std::align_val_t{kCacheLine}); }
inline void cache_line_delete(void* p) { ::operator delete(p, std::align_val_t{kCacheLine}); }

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}  // NOLINT(google-explicit-constructor): rebinding
  T* allocate(std::size_t n) { return static_cast<T*>(cache_line_new(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) { cache_line_delete(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

struct CacheLineDelete {
  void operator()(void* p) const { cache_line_delete(p); }
};

// n elements of a trivial type, uninitialised.
template <typename T>
using AlignedArray = std::unique_ptr<T[], CacheLineDelete>;

template <typename T>
AlignedArray<T> aligned_array(std::size_t n) {
  static_assert(std::is_trivially_destructible_v<T>);  // no destructor runs
  return AlignedArray<T>(static_cast<T*>(cache_line_new(n * sizeof(T))));
}

// Large scratch blocks that are reused from call to call instead of freed. A fresh block's first touch
// faults every 4 KiB page in: a (1, 32, 32 query rows, 1024, 128) float32 call on the blocked forward,
// whose K and V tiles take 16 MiB each, faulted 4083 pages a call and took 10.9 ms, 4.6 ms once the
// blocks were reused (a 2-vCPU VM, 2026-12-07, cpu-decode-wide.md). Freed blocks of at least kPooledBytes wait here
// (up to kPoolRetainedBytes in all, the oldest leaving first) for a request of at least half their size;
// larger ones are freed.
constexpr std::size_t kPooledBytes = std::size_t(1) << 20;
constexpr std::size_t kPoolRetainedBytes = std::size_t(256) << 20;

class BlockPool {
 public:
  // A block of at least `bytes` (rounded up to kPooledBytes), and its size.
  std::pair<void*, std::size_t> acquire(std::size_t bytes) {
    bytes = (bytes + kPooledBytes - 1) / kPooledBytes * kPooledBytes;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        const bool fits = it->second >= bytes && it->second / 2 <= bytes;  // (a small request leaves a large block)
        if (fits && (best == free_.end() || it->second < best->second)) best = it;
      }
      if (best != free_.end()) {
        const std::pair<void*, std::size_t> block = *best;
        retained_ -= block.second;
        free_.erase(best);
        return block;
      }
    }
    return {cache_line_new(bytes), bytes};
  }

  // Called from a deleter: never throws (a block the pool cannot hold is freed).
  // Blocks leave the pool under the lock and are freed after it (freeing a large block takes time).
  void release(void* p, std::size_t bytes) noexcept {
    if (bytes > kPoolRetainedBytes) return cache_line_delete(p);
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      try {
        free_.emplace_back(p, bytes);
        retained_ += bytes;
        p = nullptr;
      } catch (...) {
      }
    }
    if (p != nullptr) return cache_line_delete(p);  // (the pool could not grow)
    while (void* oldest = evict_over_limit()) cache_line_delete(oldest);
  }

 private:
  void* evict_over_limit() noexcept {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (retained_ <= kPoolRetainedBytes) return nullptr;
    void* oldest = free_.front().first;
    retained_ -= free_.front().second;
    free_.erase(free_.begin());
    return oldest;
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, std::size_t>> free_;  // oldest first
  std::size_t retained_ = 0;
};

// Never destroyed: blocks may be released by threads that outlive static destruction.
inline BlockPool& block_pool() {
  static BlockPool* pool = new BlockPool();
  return *pool;
}

struct PooledDelete {
  std::size_t bytes = 0;
  void operator()(void* p) const {
    if (bytes == 0) {
      cache_line_delete(p);  // a small block, never pooled
    } else {
      block_pool().release(p, bytes);
    }
  }
};

// n elements of a trivial type, uninitialised (a reused block holds an earlier call's values), from the
// pool where the block is large.
template <typename T>
using PooledArray = std::unique_ptr<T[], PooledDelete>;

template <typename T>
PooledArray<T> pooled_array(std::size_t n) {
  static_assert(std::is_trivially_destructible_v<T>);
  if (n * sizeof(T) < kPooledBytes) {
    return PooledArray<T>(static_cast<T*>(cache_line_new(std::max<std::size_t>(n, 1) * sizeof(T))), PooledDelete{0});
  }
  const auto [p, bytes] = block_pool().acquire(n * sizeof(T));
  return PooledArray<T>(static_cast<T*>(p), PooledDelete{bytes});
}

}  // namespace fused_attention::cpu
