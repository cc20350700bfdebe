// Adam and AdamW as one pass over each parameter, in place, exposed to XLA as an FFI handler.
//
// optax's adam under XLA:CPU is three loops per parameter: the first moment, the second
// moment, then the parameter from both (re-read from memory), the last bound by its two
// divisions and square root. For `refcnn`'s 2.1M-weight dense layer that was 5.4 ms of an
// 18 ms bfloat16 step. Here one loop reads the gradient, both moments and the parameter
// once and writes the three back, 16 floats at a time.
//
// The arithmetic is optax's, operation for operation and in the same order, with the fused
// multiply-adds XLA:CPU contracts the same expressions into (it does on every CPU with FMA,
// which this kernel requires): the results are bit for bit those of optax.adam / adamw /
// adam after add_decayed_weights under jax.jit (tests/test_fused_adam.py checks it).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// common.cc: every handler of the library takes turns (each spreads over every core).
std::mutex& SpringfieldCallLock();

namespace {

// How the weight decay enters: not at all, added to the gradient (L2, optax's
// add_decayed_weights before adam), or added to the update (decoupled, adamw).
enum Decay : int64_t { kNone = 0, kL2 = 1, kDecoupled = 2 };

struct Hyper {
  float step;    // -learning rate of this step
  float c1, c2;  // the bias corrections 1 - b1^t and 1 - b2^t
  float b1, ob1, b2, ob2, eps, wd;
};

// One element, as the vector loops below compute each lane. Which product of `a*b + c*d`
// is fused into the add follows what XLA:CPU does with optax's expression in each mode
// (the second moment's differs with L2 decay).
template <int64_t kDecay>
__attribute__((always_inline)) inline void Scalar(const float* g, float* m, float* v, float* p,
                                                  int64_t i, const Hyper& h) {
  float gi = g[i];
  if (kDecay == kL2) gi = std::fma(h.wd, p[i], gi);
  const float mt = std::fma(h.ob1, gi, h.b1 * m[i]);
  const float vt = kDecay == kL2 ? std::fma(h.b2, v[i], h.ob2 * (gi * gi))
                                 : std::fma(h.ob2, gi * gi, h.b2 * v[i]);
  m[i] = mt;
  v[i] = vt;
  // XLA rewrites (m / c1) / (sqrt(v / c2) + eps) as m / (c1 * (sqrt(v / c2) + eps)).
  float u = mt / (h.c1 * (std::sqrt(vt / h.c2) + h.eps));
  if (kDecay == kDecoupled) u = std::fma(h.wd, p[i], u);
  p[i] = std::fma(u, h.step, p[i]);
}

template <int64_t kDecay>
__attribute__((target("avx512f,fma"))) void Avx512(const float* g, float* m, float* v, float* p,
                                                   int64_t n, const Hyper& h) {
  const __m512 step = _mm512_set1_ps(h.step), c1 = _mm512_set1_ps(h.c1),
               c2 = _mm512_set1_ps(h.c2), b1 = _mm512_set1_ps(h.b1), ob1 = _mm512_set1_ps(h.ob1),
               b2 = _mm512_set1_ps(h.b2), ob2 = _mm512_set1_ps(h.ob2),
               eps = _mm512_set1_ps(h.eps), wd = _mm512_set1_ps(h.wd);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 pi = _mm512_loadu_ps(p + i);
    __m512 gi = _mm512_loadu_ps(g + i);
    if (kDecay == kL2) gi = _mm512_fmadd_ps(wd, pi, gi);
    const __m512 mt = _mm512_fmadd_ps(ob1, gi, _mm512_mul_ps(b1, _mm512_loadu_ps(m + i)));
    const __m512 vi = _mm512_loadu_ps(v + i), g2 = _mm512_mul_ps(gi, gi);
    const __m512 vt = kDecay == kL2 ? _mm512_fmadd_ps(b2, vi, _mm512_mul_ps(ob2, g2))
                                    : _mm512_fmadd_ps(ob2, g2, _mm512_mul_ps(b2, vi));
    _mm512_storeu_ps(m + i, mt);
    _mm512_storeu_ps(v + i, vt);
    const __m512 denom =
        _mm512_mul_ps(c1, _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(vt, c2)), eps));
    __m512 u = _mm512_div_ps(mt, denom);
    if (kDecay == kDecoupled) u = _mm512_fmadd_ps(wd, pi, u);
    _mm512_storeu_ps(p + i, _mm512_fmadd_ps(u, step, pi));
  }
  for (; i < n; ++i) Scalar<kDecay>(g, m, v, p, i, h);
}

template <int64_t kDecay>
__attribute__((target("avx2,fma"))) void Avx2(const float* g, float* m, float* v, float* p,
                                              int64_t n, const Hyper& h) {
  const __m256 step = _mm256_set1_ps(h.step), c1 = _mm256_set1_ps(h.c1),
               c2 = _mm256_set1_ps(h.c2), b1 = _mm256_set1_ps(h.b1), ob1 = _mm256_set1_ps(h.ob1),
               b2 = _mm256_set1_ps(h.b2), ob2 = _mm256_set1_ps(h.ob2),
               eps = _mm256_set1_ps(h.eps), wd = _mm256_set1_ps(h.wd);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 pi = _mm256_loadu_ps(p + i);
    __m256 gi = _mm256_loadu_ps(g + i);
    if (kDecay == kL2) gi = _mm256_fmadd_ps(wd, pi, gi);
    const __m256 mt = _mm256_fmadd_ps(ob1, gi, _mm256_mul_ps(b1, _mm256_loadu_ps(m + i)));
    const __m256 vi = _mm256_loadu_ps(v + i), g2 = _mm256_mul_ps(gi, gi);
    const __m256 vt = kDecay == kL2 ? _mm256_fmadd_ps(b2, vi, _mm256_mul_ps(ob2, g2))
                                    : _mm256_fmadd_ps(ob2, g2, _mm256_mul_ps(b2, vi));
    _mm256_storeu_ps(m + i, mt);
    _mm256_storeu_ps(v + i, vt);
    const __m256 denom =
        _mm256_mul_ps(c1, _mm256_add_ps(_mm256_sqrt_ps(_mm256_div_ps(vt, c2)), eps));
    __m256 u = _mm256_div_ps(mt, denom);
    if (kDecay == kDecoupled) u = _mm256_fmadd_ps(wd, pi, u);
    _mm256_storeu_ps(p + i, _mm256_fmadd_ps(u, step, pi));
  }
  for (; i < n; ++i) Scalar<kDecay>(g, m, v, p, i, h);
}

// 2: AVX-512, 1: AVX2 with FMA, 0: neither (the kernel is not used; SPRINGFIELD_KERNELS_AVX512=0
// keeps to AVX2, which the tests check against the same references).
int Isa() {
  const char* env = std::getenv("SPRINGFIELD_KERNELS_AVX512");
  const bool no512 = env != nullptr && std::string(env) == "0";
  if (__builtin_cpu_supports("avx512f") && !no512) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

using Loop = void (*)(const float*, float*, float*, float*, int64_t, const Hyper&);

template <int64_t kDecay>
Loop Pick(int isa) {
  return isa == 2 ? Avx512<kDecay> : Avx2<kDecay>;
}

// Arguments: hyper = [-lr, 1 - b1^t, 1 - b2^t], then (gradient, m, v, parameter) per leaf;
// results: (m, v, parameter) per leaf, each aliased to its argument, so updated in place.
ffi::Error Adam(ffi::Buffer<ffi::F32> hyper, ffi::RemainingArgs args, ffi::RemainingRets rets,
                float b1, float ob1, float b2, float ob2, float eps, float wd, int64_t decay) {
  static const int isa = Isa();
  if (isa == 0) return ffi::Error(ffi::ErrorCode::kUnimplemented, "adam: needs AVX2 and FMA");
  if (args.size() % 4 != 0 || rets.size() != args.size() / 4 * 3) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "adam: (g, m, v, p) per parameter");
  }
  const float* hp = hyper.typed_data();
  const Hyper h{hp[0], hp[1], hp[2], b1, ob1, b2, ob2, eps, wd};
  const Loop loop = decay == kL2          ? Pick<kL2>(isa)
                    : decay == kDecoupled ? Pick<kDecoupled>(isa)
                                          : Pick<kNone>(isa);
  struct Leaf {
    const float* g;
    float *m, *v, *p;
    int64_t n;
  };
  const size_t count = args.size() / 4;
  std::vector<Leaf> leaves(count);
  for (size_t k = 0; k < count; ++k) {
    auto g = args.get<ffi::Buffer<ffi::F32>>(4 * k);
    auto m = rets.get<ffi::Buffer<ffi::F32>>(3 * k);
    auto v = rets.get<ffi::Buffer<ffi::F32>>(3 * k + 1);
    auto p = rets.get<ffi::Buffer<ffi::F32>>(3 * k + 2);
    if (!g.has_value() || !m.has_value() || !v.has_value() || !p.has_value()) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "adam: float32 buffers only");
    }
    leaves[k] = {g->typed_data(), (*m)->typed_data(), (*v)->typed_data(), (*p)->typed_data(),
                 static_cast<int64_t>(g->element_count())};
  }
  std::lock_guard<std::mutex> lock(SpringfieldCallLock());
  // One parallel region for every leaf: each thread takes its share of each, in 64-byte runs.
#pragma omp parallel
  {
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    for (const Leaf& l : leaves) {
      const int64_t share = ((l.n + threads - 1) / threads + 15) / 16 * 16;
      const int64_t lo = std::min(l.n, t * share), hi = std::min(l.n, lo + share);
      if (hi > lo) loop(l.g + lo, l.m + lo, l.v + lo, l.p + lo, hi - lo, h);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldAdam, Adam,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("b1")
                                  .Attr<float>("ob1")
                                  .Attr<float>("b2")
                                  .Attr<float>("ob2")
                                  .Attr<float>("eps")
                                  .Attr<float>("wd")
                                  .Attr<int64_t>("decay"));

// Which loop the kernel runs here: 2 (AVX-512), 1 (AVX2 + FMA) or 0 (none: optax's instead).
extern "C" int springfield_adam_isa() { return Isa(); }
