// float32 decode over a (S, H, D) cache (FlashAttention's layout, B = 1): access orders compared.
#include <immintrin.h>
#include <omp.h>
#include <vector>
#include <chrono>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
constexpr int D = 128, H = 8, R = 4;
int S = 32768, NT = 2;
float *K, *V, *Q;
double g_sink[8];
thread_local long TS = H * D;  // token stride (floats)
thread_local long HS = D;
template <int hint> static inline void pf(const void* p) { _mm_prefetch((const char*)p, hint == 3 ? _MM_HINT_T0 : _MM_HINT_T1); }
static inline __m512 tsum16(__m512* a) {
  for (int m = 0; m < 8; ++m) a[m] = _mm512_add_ps(_mm512_shuffle_ps(a[2*m], a[2*m+1], 0x88), _mm512_shuffle_ps(a[2*m], a[2*m+1], 0xDD));
  for (int m = 0; m < 4; ++m) a[m] = _mm512_add_ps(_mm512_shuffle_ps(a[2*m], a[2*m+1], 0x88), _mm512_shuffle_ps(a[2*m], a[2*m+1], 0xDD));
  for (int m = 0; m < 2; ++m) a[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2*m], a[2*m+1], 0x88), _mm512_shuffle_f32x4(a[2*m], a[2*m+1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x88), _mm512_shuffle_f32x4(a[0], a[1], 0xDD));
}
// 16 keys of one head (rows TS apart); ahead: the head's rows 32 keys ahead (one per key) or null
__attribute__((noinline)) void qk16(const float* q, const float* k, float* s, const float* ahead, int ahead_bytes, int hint) {
  for (int j0 = 0; j0 < 16; j0 += 4) {
    if (ahead) for (int j = j0; j < j0 + 4; ++j) for (int b = 0; b < ahead_bytes; b += 64) { if (hint == 3) pf<3>((const char*)(ahead + j * TS) + b); else pf<2>((const char*)(ahead + j * TS) + b); }
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
      __m512 kd[4];
      for (int j = 0; j < 4; ++j) kd[j] = _mm512_loadu_ps(k + (j0 + j) * TS + d);
      for (int r = 0; r < 4; ++r) { __m512 qd = _mm512_loadu_ps(q + r * D + d); for (int j = 0; j < 4; ++j) acc[r * 4 + j] = _mm512_fmadd_ps(qd, kd[j], acc[r * 4 + j]); }
    }
    _mm512_storeu_ps(s + j0 * 4, tsum16(acc));
  }
}
__attribute__((noinline)) void pv2(int kc, const float* p, int lds, const float* v, float* o, const float* ahead, int ahead_bytes, int hint) {
  __m512 a0[8], a1[8];
  for (int f = 0; f < 8; ++f) { a0[f] = _mm512_loadu_ps(o + f * 16); a1[f] = _mm512_loadu_ps(o + D + f * 16); }
  for (int k = 0; k < kc; ++k) {
    if (ahead) for (int b = 0; b < ahead_bytes; b += 64) { if (hint == 3) pf<3>((const char*)(ahead + k * TS) + b); else pf<2>((const char*)(ahead + k * TS) + b); }
    __m512 p0 = _mm512_set1_ps(p[k]), p1 = _mm512_set1_ps(p[lds + k]);
    for (int f = 0; f < 8; ++f) { __m512 x = _mm512_loadu_ps(v + k * TS + f * 16); a0[f] = _mm512_fmadd_ps(p0, x, a0[f]); a1[f] = _mm512_fmadd_ps(p1, x, a1[f]); }
  }
  for (int f = 0; f < 8; ++f) { _mm512_storeu_ps(o + f * 16, a0[f]); _mm512_storeu_ps(o + D + f * 16, a1[f]); }
}
struct Var { const char* name; int order, chunk, sub, hint, whole; int layout = 0; };
float *Kh, *Vh;
// order 0: head-major within the chunk (main); 1: sub-block-major (all heads per sub-block of `sub` keys)
// whole: prefetch whole token rows (all heads) during head 0's pass; else the head's own row
static inline void pf_range(const void* p, long bytes, int hint) { for (long b = 0; b < bytes; b += 64) { if (hint == 3) pf<3>((const char*)p + b); else pf<2>((const char*)p + b); } }
double work2(int t, const Var& var) {
  const int SUB = var.sub;
  TS = H * D; HS = D;
  static thread_local std::vector<float> sc(H * R * 4096 + 64), out(H * R * D);
  const int per = S / NT;
  const long region = (long)SUB * TS * 4;  // bytes of one sub-block of K (or V)
  const int qcalls = H * SUB / 16, vcalls = H * SUB / 32;
  for (int c = t * per; c < (t + 1) * per; c += SUB) {
    const float* kc = K + (long)c * TS; const float* vc = V + (long)c * TS;
    const bool more = c + SUB < (t + 1) * per;
    int call = 0;
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < SUB; j += 16, ++call) {
        if (more) { pf_range((const char*)(kc + (long)SUB * TS) + region * call / qcalls, region / qcalls, var.hint); }
        qk16(Q + h * R * D, kc + (long)j * TS + h * HS, sc.data() + h * R * SUB + j * R, nullptr, 0, 0);
      }
    for (int i = 0; i < H * R * SUB; i += 16) _mm512_storeu_ps(sc.data() + i, _mm512_mul_ps(_mm512_loadu_ps(sc.data() + i), _mm512_set1_ps(1e-3f)));
    call = 0;
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < SUB; j += 32, ++call) {
        if (more) { pf_range((const char*)(vc + (long)SUB * TS) + region * call / vcalls, region / vcalls, var.hint); }
        pv2(32, sc.data() + h * R * SUB + j, SUB, vc + (long)j * TS + h * HS, out.data() + h * R * D, nullptr, 0, 0);
        pv2(32, sc.data() + h * R * SUB + 2 * SUB + j, SUB, vc + (long)j * TS + h * HS, out.data() + h * R * D + 2 * D, nullptr, 0, 0);
      }
  }
  return out[0];
}
double work3(int t, const Var& var) {
  const int T = var.sub; const int hint = var.hint;
  TS = H * D; HS = D;
  static thread_local std::vector<float> sc(H * R * 4096 + 64), out(H * R * D);
  const int per = S / NT;
  const long region = (long)T * TS * 4;
  for (int c = t * per; c < (t + 1) * per; c += T) {
    const float* kc = K + (long)c * TS; const float* vc = V + (long)c * TS;
    const bool more = c + T < (t + 1) * per;
    const int qcalls = H * T / 4;
    int call = 0;
    for (int j0 = 0; j0 < T; j0 += 4)
      for (int h = 0; h < H; ++h, ++call) {
        if (hint) pf_range((const char*)vc + region * call / qcalls, region / qcalls, hint);
        if (hint && var.whole && more) pf_range((const char*)(kc + (long)T * TS) + region * call / qcalls, region / qcalls, hint);
        // 4 rows x 4 keys of head h
        __m512 acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
        const float* k = kc + (long)j0 * TS + h * HS; const float* q = Q + h * R * D;
        for (int d = 0; d < D; d += 16) {
          __m512 kd[4];
          for (int j = 0; j < 4; ++j) kd[j] = _mm512_loadu_ps(k + j * TS + d);
          for (int r = 0; r < 4; ++r) { __m512 qd = _mm512_loadu_ps(q + r * D + d); for (int j = 0; j < 4; ++j) acc[r * 4 + j] = _mm512_fmadd_ps(qd, kd[j], acc[r * 4 + j]); }
        }
        _mm512_storeu_ps(sc.data() + h * R * T + j0 * 4, tsum16(acc));
      }
    for (int i = 0; i < H * R * T; i += 16) _mm512_storeu_ps(sc.data() + i, _mm512_mul_ps(_mm512_loadu_ps(sc.data() + i), _mm512_set1_ps(1e-3f)));
    for (int h = 0; h < H; ++h) {
      pv2(T, sc.data() + h * R * T, T, vc + h * HS, out.data() + h * R * D, nullptr, 0, 0);
      pv2(T, sc.data() + h * R * T + 2 * T, T, vc + h * HS, out.data() + h * R * D + 2 * D, nullptr, 0, 0);
    }
  }
  return out[0];
}
double work(int t, const Var& var) {
  if (var.order == 3) return work3(t, var);
  if (var.order == 2) return work2(t, var);
  const int CH = std::min(var.chunk, S / NT);
  if (var.layout == 1) { TS = D; HS = (long)S * D; } else { TS = H * D; HS = D; }
  const float* K = var.layout == 1 ? Kh : ::K; const float* V = var.layout == 1 ? Vh : ::V;
  static thread_local std::vector<float> sc(H * R * 4096 + 64), out(H * R * D);
  double sink = 0;
  const int per = S / NT;
  for (int c = t * per; c < (t + 1) * per; c += CH) {
    const float* kc = K + (long)c * TS; const float* vc = V + (long)c * TS;
    const int sub = var.order == 0 ? CH : var.sub;
    for (int s0 = 0; s0 < CH; s0 += sub) {
      for (int h = 0; h < H; ++h) {
        for (int j = s0; j < s0 + sub; j += 16) {
          const bool ok = j + 32 < CH && var.hint > 0;
          const float* ah = nullptr; int bytes = D * 4;
          if (ok && (!var.whole)) ah = kc + (long)(j + 32) * TS + h * HS;
          if (ok && var.whole && h == 0) { ah = kc + (long)(j + 32) * TS; bytes = TS * 4; }
          qk16(Q + h * R * D, kc + (long)j * TS + h * HS, sc.data() + h * R * CH + j * R, ah, bytes, var.hint);
        }
      }
    }
    for (int i = 0; i < H * R * CH; i += 16) _mm512_storeu_ps(sc.data() + i, _mm512_mul_ps(_mm512_loadu_ps(sc.data() + i), _mm512_set1_ps(1e-3f)));
    for (int s0 = 0; s0 < CH; s0 += sub) {
      for (int h = 0; h < H; ++h) {
        for (int j = s0; j < s0 + sub; j += 32) {
          const bool ok = j + 64 < CH && var.hint > 0;
          const float* ah = nullptr; int bytes = D * 4;
          if (ok && (!var.whole)) ah = vc + (long)(j + 32) * TS + h * HS;
          if (ok && var.whole && h == 0) { ah = vc + (long)(j + 32) * TS; bytes = TS * 4; }
          pv2(32, sc.data() + h * R * CH + j, CH, vc + (long)j * TS + h * HS, out.data() + h * R * D, ah, bytes, var.hint);
          pv2(32, sc.data() + h * R * CH + 2 * CH + j, CH, vc + (long)j * TS + h * HS, out.data() + h * R * D + 2 * D, nullptr, 0, 0);
        }
      }
    }
  }
  return sink + out[0];
}
int main(int argc, char** argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 7; if (argc > 2) NT = atoi(argv[2]); if (argc > 3) S = atoi(argv[3]);
  size_t n = (size_t)H * S * D;
  K = (float*)aligned_alloc(64, n * 4); V = (float*)aligned_alloc(64, n * 4); Q = (float*)aligned_alloc(64, H * R * D * 4);
  for (size_t i = 0; i < n; ++i) { K[i] = (i % 97) * 1e-3f; V[i] = (i % 89) * 1e-3f; }
  Kh = (float*)aligned_alloc(64, n * 4); Vh = (float*)aligned_alloc(64, n * 4);
  for (size_t i = 0; i < n; ++i) { Kh[i] = (i % 97) * 1e-3f; Vh[i] = (i % 89) * 1e-3f; }
  for (int i = 0; i < H * R * D; ++i) Q[i] = (i % 13) * 1e-2f;
  std::vector<Var> vars = {
    {"sum", -1, 0, 0, 0, 0},
    {"head-major 512 L2", 0, 512, 0, 2, 0}, {"head-major none", 0, 512, 0, 0, 0}, {"sub64 own L2", 1, 512, 64, 2, 0},
    {"bhsd head-major L2", 0, 512, 0, 2, 0, 1}, {"bhsd none", 0, 512, 0, 0, 0, 1},
    {"tm16 none", 3, 0, 16, 0, 0}, {"tm32 none", 3, 0, 32, 0, 0}, {"tm64 none", 3, 0, 64, 0, 0},
    {"tm16 V L2", 3, 0, 16, 2, 0}, {"tm32 V L2", 3, 0, 32, 2, 0}, {"tm32 VK L2", 3, 0, 32, 2, 1}, {"tm64 VK L2", 3, 0, 64, 2, 1}, {"tm16 VK L2", 3, 0, 16, 2, 1},
  };
  std::vector<std::vector<double>> ts(vars.size());
  for (int r = 0; r < rounds; ++r)
    for (size_t v = 0; v < vars.size(); ++v) {
      std::vector<double> one;
      for (int it = 0; it < 7; ++it) {
        auto a = std::chrono::steady_clock::now();
        if (vars[v].order < 0) {
#pragma omp parallel for num_threads(NT) schedule(static, 1)
          for (int t = 0; t < NT; ++t) {
            __m512 acc[8]; for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
            for (const float* base : {K, V}) { const float* x = base + n / NT * t; for (size_t i = 0; i < n / NT; i += 128) for (int u = 0; u < 8; ++u) acc[u] = _mm512_add_ps(acc[u], _mm512_load_ps(x + i + 16 * u)); }
            for (int i = 1; i < 8; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
            g_sink[t] += _mm512_reduce_add_ps(acc[0]);
          }
        } else {
#pragma omp parallel for num_threads(NT) schedule(static, 1)
          for (int t = 0; t < NT; ++t) { volatile double s = work(t, vars[v]); (void)s; }
        }
        one.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
      }
      std::sort(one.begin(), one.end()); ts[v].push_back(one[one.size() / 2]);
    }
  double sum_med = 0;
  for (size_t v = 0; v < vars.size(); ++v) {
    auto x = ts[v]; std::sort(x.begin(), x.end()); double med = x[x.size() / 2];
    if (v == 0) sum_med = med;
    printf("%-20s %7.3f ms %6.1f GB/s %4.0f%%\n", vars[v].name, med * 1e3, 2 * n * 4.0 / med / 1e9, 100 * sum_med / med);
  }
}
