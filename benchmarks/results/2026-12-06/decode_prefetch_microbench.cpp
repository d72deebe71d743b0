// float32 decode microbenchmark, variants alternated in one process.
#include <immintrin.h>
#include <omp.h>
#include <vector>
#include <chrono>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
constexpr int D = 128, H = 8, R = 4;
int S = 32768, CH = 4096, NT = 2;
float *K, *V, *Q;
struct Var { const char* name; int mode, pf, hint, pfv, vhint; };
template <int hint> static inline void pf(const void* p) {
  if constexpr (hint == 3) _mm_prefetch((const char*)p, _MM_HINT_T0);
  else if constexpr (hint == 2) _mm_prefetch((const char*)p, _MM_HINT_T1);
  else if constexpr (hint == 1) _mm_prefetch((const char*)p, _MM_HINT_T2);
  else _mm_prefetch((const char*)p, _MM_HINT_NTA);
}
static inline void pfh(const void* p, int hint) {
  switch (hint) { case 3: pf<3>(p); break; case 2: pf<2>(p); break; case 1: pf<1>(p); break; default: pf<0>(p); }
}
// 16 accumulators (row r, key j at r*4+j) -> lanes: out[i] = sum of acc[i]
static inline __m512 tsum16(__m512* a) {
  for (int m = 0; m < 8; ++m) a[m] = _mm512_add_ps(_mm512_shuffle_ps(a[2*m], a[2*m+1], 0x88), _mm512_shuffle_ps(a[2*m], a[2*m+1], 0xDD));
  for (int m = 0; m < 4; ++m) a[m] = _mm512_add_ps(_mm512_shuffle_ps(a[2*m], a[2*m+1], 0x88), _mm512_shuffle_ps(a[2*m], a[2*m+1], 0xDD));
  for (int m = 0; m < 2; ++m) a[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2*m], a[2*m+1], 0x88), _mm512_shuffle_f32x4(a[2*m], a[2*m+1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x88), _mm512_shuffle_f32x4(a[0], a[1], 0xDD));
}
__attribute__((noinline)) void qk_block16(const float* q, const float* k, float* s, const float* ahead, int hint) {
  for (int j0 = 0; j0 < 16; j0 += 4) {
    if (ahead) for (int j = j0; j < j0 + 4; ++j) for (int b = 0; b < D * 4; b += 64) pfh((const char*)(ahead + j * D) + b, hint);
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
      __m512 kd[4];
      for (int j = 0; j < 4; ++j) kd[j] = _mm512_loadu_ps(k + (j0 + j) * D + d);
      for (int r = 0; r < 4; ++r) {
        __m512 qd = _mm512_loadu_ps(q + r * D + d);
        for (int j = 0; j < 4; ++j) acc[r * 4 + j] = _mm512_fmadd_ps(qd, kd[j], acc[r * 4 + j]);
      }
    }
    _mm512_storeu_ps(s + j0 * 4, tsum16(acc));  // scores in (block, row, key) order; fine for timing
  }
}
__attribute__((noinline)) void pv_tile2(int kc, const float* p, int lds, const float* v, float* o, const float* ahead = nullptr, int hint = 3) {
  __m512 a0[8], a1[8];
  for (int f = 0; f < 8; ++f) { a0[f] = _mm512_loadu_ps(o + f * 16); a1[f] = _mm512_loadu_ps(o + D + f * 16); }
  for (int k = 0; k < kc; ++k) {
    if (ahead) for (int b = 0; b < D * 4; b += 64) pfh((const char*)(ahead + k * D) + b, hint);
    __m512 p0 = _mm512_set1_ps(p[k]), p1 = _mm512_set1_ps(p[lds + k]);
    for (int f = 0; f < 8; ++f) { __m512 x = _mm512_loadu_ps(v + k * D + f * 16); a0[f] = _mm512_fmadd_ps(p0, x, a0[f]); a1[f] = _mm512_fmadd_ps(p1, x, a1[f]); }
  }
  for (int f = 0; f < 8; ++f) { _mm512_storeu_ps(o + f * 16, a0[f]); _mm512_storeu_ps(o + D + f * 16, a1[f]); }
}
double work(int t, const Var& var) {
  static thread_local std::vector<float> sc(R * 4096 + 64), out(R * D);
  double sink = 0;
  for (int h = t * H / NT; h < (t + 1) * H / NT; ++h) {
    const float* kh = K + (size_t)h * S * D; const float* vh = V + (size_t)h * S * D;
    const float* q = Q + h * R * D;
    for (int c = 0; c < S; c += CH) {
      if (var.mode == 3) {
        __m512 a[8]; for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
        for (const float* base : {kh, vh}) {
          const float* x = base + (size_t)c * D;
          for (size_t i = 0; i < (size_t)CH * D; i += 128) for (int u = 0; u < 8; ++u) a[u] = _mm512_add_ps(a[u], _mm512_load_ps(x + i + 16 * u));
        }
        for (int i = 1; i < 8; ++i) a[0] = _mm512_add_ps(a[0], a[i]);
        sink += _mm512_reduce_add_ps(a[0]);
        continue;
      }
      if (var.mode != 2)
        for (int j = 0; j < CH; j += 16) {
          const float* ah = (var.pf > 0 && j + var.pf < CH) ? kh + (size_t)(c + j + var.pf) * D : nullptr;
          qk_block16(q, kh + (size_t)(c + j) * D, sc.data() + j * R, ah, var.hint);
        }
      for (int i = 0; i < R * CH; i += 16) _mm512_storeu_ps(sc.data() + i, _mm512_mul_ps(_mm512_loadu_ps(sc.data() + i), _mm512_set1_ps(1e-3f)));
      if (var.mode != 1)
        for (int j = 0; j < CH; j += 32) {
          if (var.pfv > 0 && j + var.pfv < CH) for (int jj = 0; jj < 32; ++jj) for (int b = 0; b < D * 4; b += 64) pfh((const char*)(vh + (size_t)(c + j + var.pfv + jj) * D) + b, var.vhint);
          const float* va = (var.pfv < 0 && j - var.pfv < CH) ? vh + (size_t)(c + j - var.pfv) * D : nullptr;
          pv_tile2(32, sc.data() + j, CH, vh + (size_t)(c + j) * D, out.data(), va, var.vhint);
          pv_tile2(32, sc.data() + 2 * CH + j, CH, vh + (size_t)(c + j) * D, out.data() + 2 * D);
        }
    }
    sink += out[0];
  }
  return sink;
}
int main(int argc, char** argv) {
  if (argc > 1) S = atoi(argv[1]); CH = std::min(CH, S);
  int rounds = argc > 2 ? atoi(argv[2]) : 15;
  size_t n = (size_t)H * S * D;
  K = (float*)aligned_alloc(64, n * 4); V = (float*)aligned_alloc(64, n * 4); Q = (float*)aligned_alloc(64, H * R * D * 4);
  for (size_t i = 0; i < n; ++i) { K[i] = (i % 97) * 1e-3f; V[i] = (i % 89) * 1e-3f; }
  for (int i = 0; i < H * R * D; ++i) Q[i] = (i % 13) * 1e-2f;
  std::vector<Var> vars = {
    {"sum", 3, 0, 0, 0, 0},
    {"full pf0", 0, 0, 2, 0, 0}, {"full T1", 0, 32, 2, 0, 0}, {"full T0", 0, 32, 3, 0, 0}, {"full T2", 0, 32, 1, 0, 0}, {"full NTA", 0, 32, 0, 0, 0},
    {"full T0 vT0", 0, 32, 3, 32, 3},
    {"qk pf0", 1, 0, 2, 0, 0}, {"qk T1", 1, 32, 2, 0, 0}, {"qk T0", 1, 32, 3, 0, 0},
    {"pv", 2, 0, 0, 0, 0}, {"pv vT0", 2, 0, 0, 32, 3},
    {"pv spread16 T0", 2, 0, 0, -16, 3}, {"pv spread32 T0", 2, 0, 0, -32, 3}, {"pv spread64 T0", 2, 0, 0, -64, 3},
    {"pv spread32 T1", 2, 0, 0, -32, 2}, {"pv spread32 NTA", 2, 0, 0, -32, 0},
    {"full T0 vs32T0", 0, 32, 3, -32, 3}, {"full T0 vs64T0", 0, 32, 3, -64, 3},
  };
  std::vector<std::vector<double>> ts(vars.size());
  for (int r = 0; r < rounds; ++r)
    for (size_t v = 0; v < vars.size(); ++v) {
      std::vector<double> one;
      for (int it = 0; it < 10; ++it) {
        auto a = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(NT) schedule(static, 1)
        for (int t = 0; t < NT; ++t) { volatile double s = work(t, vars[v]); (void)s; }
        one.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
      }
      std::sort(one.begin(), one.end()); ts[v].push_back(one[one.size() / 2]);
    }
  std::vector<double> meds;
  for (size_t v = 0; v < vars.size(); ++v) { auto x = ts[v]; std::sort(x.begin(), x.end()); meds.push_back(x[x.size() / 2]); }
  for (size_t v = 0; v < vars.size(); ++v) {
    double bytes = (vars[v].mode == 1 || vars[v].mode == 2) ? n * 4.0 : 2 * n * 4.0;
    double full_sum = 2 * n * 4.0 / meds[0];
    printf("%-14s %7.3f ms %6.1f GB/s  %3.0f%% of sum\n", vars[v].name, meds[v] * 1e3, bytes / meds[v] / 1e9, 100 * bytes / meds[v] / full_sum);
  }
}
