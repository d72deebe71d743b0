// Throughput of vdpbf16ps against a float FMA on this CPU: 16 independent accumulators each, rdtsc
// ticks per instruction (the record cpu-decode-widen.md quotes it).
// g++ -O2 -mavx512f -mavx512bf16 -mavx512bw dpbf16_throughput.cpp -o dpb && ./dpb
#include <immintrin.h>
#include <cstdio>
#include <x86intrin.h>
int main(){
  __m512 acc[16]; for(int i=0;i<16;i++) acc[i]=_mm512_setzero_ps();
  __m512bh a=(__m512bh)_mm512_set1_epi32(0x3f803f80), b=(__m512bh)_mm512_set1_epi32(0x3f803f80);
  long N=20000000;
  unsigned long long t0=__rdtsc();
  for(long i=0;i<N;i++){
#pragma GCC unroll 16
    for(int j=0;j<16;j++) acc[j]=_mm512_dpbf16_ps(acc[j],a,b);
    __asm__ volatile("" : "+v"(a));
  }
  unsigned long long t1=__rdtsc();
  float s=0; for(int i=0;i<16;i++) s+=_mm512_reduce_add_ps(acc[i]);
  printf("dpbf16ps: %.3f ticks per instr (%f)\n",(double)(t1-t0)/(N*16),s);
  __m512 f[16]; for(int i=0;i<16;i++) f[i]=_mm512_setzero_ps();
  __m512 x=_mm512_set1_ps(1.0f), y=_mm512_set1_ps(1e-9f);
  t0=__rdtsc();
  for(long i=0;i<N;i++){
#pragma GCC unroll 16
    for(int j=0;j<16;j++) f[j]=_mm512_fmadd_ps(x,y,f[j]);
    __asm__ volatile("" : "+v"(x));
  }
  t1=__rdtsc();
  s=0; for(int i=0;i<16;i++) s+=_mm512_reduce_add_ps(f[i]);
  printf("fma: %.3f ticks per instr (%f)\n",(double)(t1-t0)/(N*16),s);
}
