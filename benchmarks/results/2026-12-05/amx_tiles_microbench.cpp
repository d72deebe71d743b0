// AMX tile products and tile loads on one core: what the decode and forward kernels can expect.
//   g++ -O2 -mamx-tile -mamx-bf16 -mavx512f -mavx512bw amx_tiles_microbench.cpp -o amx_tiles && ./amx_tiles
// (Linux >= 5.16: the process asks for the AMX state with arch_prctl first.)
// 1. The decode's P V for 128 keys (2 row tiles x 8 value tiles x 4 depth tiles, P in hi + lo parts:
//    128 tdpbf16ps, C loaded and stored once) with every operand `offset` bytes past a cache line.
// 2. Q K^T over 32-key blocks with K's rows (256 bytes apart) loaded as A tiles straight from a buffer
//    of 16 KiB (L1), 1 MiB (L2) or 64 MiB (memory), with and without software prefetch ahead.
// 3. A one-thread AVX-512 sum over 256 MiB: the core's streaming read rate.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <x86intrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

struct alignas(64) Config {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static double tsc_ghz() {
  const auto t0 = std::chrono::steady_clock::now();
  const unsigned long long c0 = __rdtsc();
  while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(200)) {
  }
  return (__rdtsc() - c0) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
}

// A tiles in tmm4-5 (rows `lda` elements apart), B tiles in tmm6-7 (packed): C (tmm0-3) += A x B.
static void load_a_multiply(const uint16_t* a, int lda) {
  _tile_loadd(4, a, lda * 2);
  _tile_loadd(5, a + 16 * lda, lda * 2);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// The 2 x 2 C tiles to c (rows `ldc` floats apart).
static void store_c(float* c, int ldc) {
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4);
  _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

// 1. P V, 128 keys, value_dim 128.
alignas(64) static uint16_t V[16384 + 64], P[2 * 32 * 544 + 64];
alignas(64) static float C[32 * 128 + 64];
static void p_times_v(int offset_bytes) {
  const uint16_t* b = V + offset_bytes / 2;
  const uint16_t* p = P + offset_bytes / 2;
  float* c0 = C + offset_bytes / 4;
  const int lda = 544;  // the decode's P row stride (elements)
  for (int t = 0; t < 8; t += 2) {
    float* c = c0 + t * 16;
    _tile_loadd(0, c, 512);
    _tile_loadd(1, c + 16, 512);
    _tile_loadd(2, c + 16 * 128, 512);
    _tile_loadd(3, c + 16 * 128 + 16, 512);
    for (int d = 0; d < 4; ++d) {
      _tile_loadd(6, b + d * 8 * 512 + t * 512, 64);
      _tile_loadd(7, b + d * 8 * 512 + (t + 1) * 512, 64);
      for (int part = 0; part < 2; ++part) load_a_multiply(p + part * 32 * lda + d * 32, lda);
    }
    store_c(c, 128);
  }
}

// 2. One 32-key block of K Q^T (head dim 128: 4 depth tiles; 32 query rows: 2 B column tiles).
alignas(64) static uint16_t Q[4096];
alignas(64) static float S[32 * 32];
static void k_times_qt(const uint16_t* k, int prefetch_keys) {
  for (int j = 0; j < 32 && prefetch_keys > 0; ++j) {
    for (int line = 0; line < 4; ++line) _mm_prefetch((const char*)(k + (prefetch_keys + j) * 128) + 64 * line, _MM_HINT_T0);
  }
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int d = 0; d < 4; ++d) {
    _tile_loadd(6, Q + d * 512, 64);
    _tile_loadd(7, Q + 2048 + d * 512, 64);
    load_a_multiply(k + d * 32, 128);
  }
  store_c(S, 32);
}

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
    std::puts("no AMX permission");
    return 1;
  }
  Config config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
  const double ghz = tsc_ghz();
  std::printf("TSC %.2f GHz\n\n| P V, 128 keys, operands this far past a line | ticks | ns per tdpbf16ps |\n|---|---|---|\n", ghz);
  for (int offset : {0, 16, 32, 48}) {
    unsigned long long best = ~0ull;
    for (int rep = 0; rep < 5; ++rep) {
      const unsigned long long t0 = __rdtsc();
      for (int i = 0; i < 20000; ++i) p_times_v(offset);
      const unsigned long long t = (__rdtsc() - t0) / 20000;
      best = t < best ? t : best;
    }
    std::printf("| %d bytes | %llu | %.2f |\n", offset, best, best / ghz / 128);
  }
  std::printf("\n| K Q^T, K rows as A tiles from | prefetch ahead (keys) | ticks per 32 keys | GB/s of K |\n|---|---|---|---|\n");
  for (long bytes : {16L << 10, 1L << 20, 64L << 20}) {
    const long keys = bytes / 256;
    auto* k = static_cast<uint16_t*>(std::aligned_alloc(64, bytes + (1 << 16)));
    for (long i = 0; i < (bytes + (1 << 16)) / 2; ++i) k[i] = 0x3f80;
    for (int ahead : {0, 32, 128}) {
      unsigned long long best = ~0ull;
      const int passes = bytes < (1L << 21) ? 200 : 2;
      for (int rep = 0; rep < 5; ++rep) {
        long blocks = 0;
        const unsigned long long t0 = __rdtsc();
        for (int pass = 0; pass < passes; ++pass) {
          for (long b = 0; b + 32 <= keys; b += 32, ++blocks) k_times_qt(k + b * 128, ahead);
        }
        const unsigned long long t = (__rdtsc() - t0) / blocks;
        best = t < best ? t : best;
      }
      std::printf("| %ld KiB | %d | %llu | %.1f |\n", bytes >> 10, ahead, best, 8192.0 * ghz / best);
    }
    std::free(k);
  }
  const long n = (256L << 20) / 4;
  auto* x = static_cast<float*>(std::aligned_alloc(64, n * 4));
  for (long i = 0; i < n; ++i) x[i] = 1.0f;
  unsigned long long best = ~0ull;
  __m512 acc = _mm512_setzero_ps();
  for (int rep = 0; rep < 3; ++rep) {
    const unsigned long long t0 = __rdtsc();
    for (long i = 0; i < n; i += 16) acc = _mm512_add_ps(acc, _mm512_load_ps(x + i));
    const unsigned long long t = __rdtsc() - t0;
    best = t < best ? t : best;
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  std::printf("\nOne-thread AVX-512 sum over 256 MiB: %.1f GB/s (checksum %.0f)\n", n * 4.0 * ghz / best, lanes[0]);
  std::free(x);
  _tile_release();
}
