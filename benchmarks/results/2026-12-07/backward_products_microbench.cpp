// The five products of one backward step (96 query rows, n keys, head dim 64) through gemm(), timed on
// one thread: g++ -O3 -march=native -std=c++17 -Icsrc $(torch include flags) this.cpp; taskset -c 1 ./a.out 1024
// (tile-calls-and-packing.md).
#include "cpu/aligned_buffer.h"
using namespace fused_attention::cpu;
#include "cpu/attention_gemm.h"
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>
using T = float;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
template <class F> double best(F f, int reps) {
  std::vector<double> ts;
  for (int i = 0; i < reps; ++i) { double t = now(); f(); ts.push_back(now() - t); }
  std::sort(ts.begin(), ts.end()); return ts[ts.size() / 10];
}
int main(int argc, char** argv) {
  const int64_t rows = 96, n = argc > 1 ? atoi(argv[1]) : 1024, dim = 64, ld = n + 16;
  AlignedVector<T> q(rows * dim), dout(rows * dim), probs(rows * ld), dprobs(rows * ld), dq(rows * dim);
  AlignedVector<T> kt(dim * n), vt(dim * n), keys(n * dim), dk(n * dim), dv(n * dim), pT(n * (rows + 16)), pT2(n*(rows+16));
  for (auto* v : {&q, &dout, &probs, &dprobs, &dq, &kt, &vt, &keys, &dk, &dv, &pT})
    for (size_t i = 0; i < v->size(); ++i) (*v)[i] = 0.001f * float((i * 7919) % 1000);
  // K^T as panels: kPanel=64 columns -> panel block stride = dim*64 per 64 keys
  Panels<T> ktp{kt.data(), dim * kPanel<T>};
  Panels<T> kp{keys.data(), 0};  // keys rows n x dim with dim == kPanel: one panel, block_stride unused
  const double fl = 2.0 * rows * n * dim;
  auto rep = [&](const char* name, auto f) {
    for (int w = 0; w < 3; ++w) f();
    double t = best(f, 200);
    printf("%-36s %8.1f us %6.1f GF/s\n", name, t * 1e6, fl / t / 1e9);
  };
  for (int round = 0; round < 4; ++round) {
  rep("S = Q K^T (panels)", [&] { gemm<T>(rows, n, dim, q.data(), dim, 1, ktp, probs.data(), ld, false); });
  rep("dV += P^T dO (A transposed)", [&] { gemm<T>(n, dim, rows, probs.data(), 1, ld, dout.data(), dim, dv.data(), dim, true); });
  rep("dQ = dS K (depth n)", [&] { gemm<T>(rows, dim, n, dprobs.data(), ld, 1, kp, dq.data(), dim, false); });
  rep("dK += dS^T Q (A transposed)", [&] { gemm<T>(n, dim, rows, dprobs.data(), 1, ld, q.data(), dim, dk.data(), dim, true); });
  // transposed copy then normal A
  const int64_t ldt = rows + 16;
  rep("transpose P (n x rows)", [&] { for (int64_t r = 0; r < rows; ++r) for (int64_t j = 0; j < n; ++j) pT[j * ldt + r] = probs[r * ld + j]; });
  rep("dV += (P^T copy) dO", [&] { gemm<T>(n, dim, rows, pT.data(), ldt, 1, dout.data(), dim, dv.data(), dim, true); });
  }
}
