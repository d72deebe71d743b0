// The decode kernel's P V phase (values_bf16 of csrc/cpu/attention_decode_widen.h, included as it is)
// streaming a bfloat16 V from memory, alone or after a stand-in for the q.k phase (16 vdpbf16ps per key,
// K read row after row (SIDE 0) or four rows side by side (SIDE 1), KPHASE 2: prefetched 32 keys ahead;
// EXTRA: more register-only FMAs per key). 4 query rows, head dim 128, chunks of 4096 keys as the kernel.
// Record: cpu-decode-zen5-memory.md. Build and run (repository root, the project's venv):
//   g++ -O3 -march=x86-64-v4 -mavx512bf16 -std=c++17 -I.venv/lib/python3.11/site-packages/torch/include \
//       -I. -DHDR='"csrc/cpu/attention_decode_widen.h"' -DKPHASE=2 benchmarks/results/2026-12-06/decode_value_phase.cpp -o /tmp/vp
//   /tmp/vp 8 32768 5   (8 kv heads of 32768 keys: 128 MiB of K and V, from memory; `1 2048 300`: in L2)
// The 2 x 128 tiles: apply decode_value_rows.diff to the header first.
#include <immintrin.h>
#include <x86intrin.h>
#include <c10/util/BFloat16.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
template <class T> using AlignedVector = std::vector<T>;
namespace simd { template <class T> struct VT; template <> struct VT<float> { typedef float type __attribute__((vector_size(64))); }; template <class T> using Vec = typename VT<T>::type; }
constexpr int64_t kDecodePrefetchKeys = 32;
constexpr int64_t kDecodeValueBlock = 32;
__attribute__((always_inline)) inline void prefetch_rows(const void* first, int64_t rows, int64_t stride, int64_t bytes) {
  const char* p = static_cast<const char*>(first);
  for (int64_t r = 0; r < rows; ++r, p += stride) for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
}
#ifndef EXTRA
#define EXTRA 0
#endif
#ifndef SIDE
#define SIDE 0
#endif
#ifndef NOV
#define NOV 0
#endif
#ifndef KPHASE
#define KPHASE 0
#endif
#include HDR
int main(int argc, char** argv) {
  const int64_t heads = atoi(argv[1]), S = atoi(argv[2]), chunk = std::min<int64_t>(S, 4096), D = 128, rows = 4;
  const int reps = atoi(argv[3]);
  c10::BFloat16* v = (c10::BFloat16*)aligned_alloc(4096, heads * S * D * 2);
  c10::BFloat16* k = (c10::BFloat16*)aligned_alloc(4096, heads * S * D * 2);
  for (int64_t i = 0; i < heads * S * D; ++i) k[i] = c10::BFloat16(float(i % 5) * 0.1f);
  for (int64_t i = 0; i < heads * S * D; ++i) v[i] = c10::BFloat16(float(i % 7) * 0.1f);
  const int64_t ldp = chunk + 16, ldv = D;
  std::vector<float> p(rows * ldp, 0.001f), acc(rows * ldv, 0.f);
  double best = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    uint64_t t0 = __rdtsc();
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t c = 0; c < S; c += chunk) {
        const c10::BFloat16* base = v + (h * S + c) * D;
        auto row_of = [&](int64_t j) { return base + j * D; };
        if (KPHASE) {
          const c10::BFloat16* kb = k + (h * S + c) * D;
          __m512 a[16]; for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
          const __m512bh q0 = (__m512bh)_mm512_set1_epi32(0x3f803f80);
          if (SIDE) {
          for (int64_t j = 0; j < chunk; j += 4) {
            if (KPHASE == 2) prefetch_rows(kb + (j + 32) * D, 4, 256, 256);
            for (int d = 0; d < 4; ++d) {
              __m512bh kv[4];
              for (int jj = 0; jj < 4; ++jj) kv[jj] = (__m512bh)_mm512_loadu_si512(kb + (j + jj) * D + 32 * d);
              for (int r = 0; r < 4; ++r) for (int jj = 0; jj < 4; ++jj) a[r * 4 + jj] = _mm512_dpbf16_ps(a[r * 4 + jj], q0, kv[jj]);
            }
          }
          } else
          for (int64_t j = 0; j < chunk; ++j) {
            if (KPHASE == 2) prefetch_rows(kb + (j + 32) * D, 1, 0, 256);
            for (int e = 0; e < EXTRA; ++e) {
              for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(a[i], a[(i + 1) & 15], a[(i + 5) & 15]);
            }
            for (int d = 0; d < 4; ++d) {
              const __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + j * D + 32 * d);
              for (int r = 0; r < 4; ++r) a[r * 4 + d] = _mm512_dpbf16_ps(a[r * 4 + d], q0, kv);
            }
          }
          float s = 0; for (int i = 0; i < 16; ++i) s += _mm512_reduce_add_ps(a[i]);
          acc[0] += s * 1e-30f;
        }
        if (!NOV) values_bf16(rows, chunk, p.data(), ldp, row_of, D, acc.data(), ldv);
      }
    double t = double(__rdtsc() - t0) / (heads * S);
    best = std::min(best, t);
  }
  printf("%s heads=%ld S=%ld: %.1f ticks/key (%.1f GB/s)\n", HDR, heads, S, best, (KPHASE ? 512 : 256) / (best / 2.596));
}
