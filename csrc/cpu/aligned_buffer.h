// Kernel buffers that start on a cache line. malloc aligns to 16 bytes (a large block sits 16 bytes past
// a page), so a buffer's 64-byte rows would each straddle two lines: every AVX-512 access and every AMX
// tile row then touches two. An AMX product over operands 16 bytes off a line ran 2.5x slower than over
// aligned ones (a microbenchmark of the decode's P V here, 2026-12-05). Rows inside a buffer stay aligned
// where their strides are multiples of 64 bytes (kScoreStride, kProbStride, the tiles).
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>
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

}  // namespace fused_attention::cpu
