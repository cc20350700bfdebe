#include <omp.h>

#include <cmath>

#include "common.h"

using namespace springfield;

namespace {

// ---- BatchNorm + ReLU6 (EfficientNet-Lite's), springfield's own loops -----------------------
//
// oneDNN's BatchNorm fuses ReLU but not ReLU6's upper bound, so XLA made two more passes
// over the activations forward (the clamp) and three backward (the clamp's gradient).
// Here, for `relu` = 2, the statistics are one pass (sums of x - x0 and its square, x0 the
// first row, in float blocks added into double), the normalisation and clamp a second;
// backward, the gradient's sums one pass and the input's gradient a second, the clamp's
// mask recomputed from x. Float32 or bfloat16 activations; float32 statistics.

inline float ToF(float v) { return v; }
inline float ToF(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void Store(float* p, float v) { *p = v; }
inline void Store(uint16_t* p, float v) { *p = ToBf16(v); }

// The loops over a range of rows (c channels each), written plainly for the compiler to
// vectorise over the channels (no pointer aliases another, hence __restrict): once for
// AVX-512, once for any x86-64 (SPRINGFIELD_BOTH).
#define SF_R __restrict
constexpr int64_t kBlock = 64;  // rows summed in float before adding into double

template <typename T>
__attribute__((always_inline)) inline void StatsRows(const T* SF_R x, int64_t rows, int64_t c,
                                                     const float* SF_R x0, double* SF_R s1,
                                                     double* SF_R s2, float* SF_R a1,
                                                     float* SF_R a2) {
  for (int64_t r = 0; r < rows; r += kBlock) {
    for (int64_t k = 0; k < c; ++k) a1[k] = a2[k] = 0;
    for (int64_t rr = r; rr < std::min(rows, r + kBlock); ++rr) {
      for (int64_t k = 0; k < c; ++k) {
        const float d = ToF(x[rr * c + k]) - x0[k];
        a1[k] += d;
        a2[k] += d * d;
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      s1[k] += a1[k];
      s2[k] += a2[k];
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void NormRows(const T* SF_R x, int64_t rows, int64_t c,
                                                    const float* SF_R a, const float* SF_R b,
                                                    T* SF_R y) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < c; ++k) {
      float v = ToF(x[r * c + k]) * a[k] + b[k];
      v = v > 0.0f ? v : 0.0f;
      v = v < 6.0f ? v : 6.0f;
      Store(y + r * c + k, v);
    }
  }
}

// Sums of the gradient that passes the clamp (g) and of g * (x - mean).
template <typename T>
__attribute__((always_inline)) inline void GradSumRows(const T* SF_R x, const T* SF_R dy,
                                                       int64_t rows, int64_t c,
                                                       const float* SF_R a, const float* SF_R b,
                                                       const float* SF_R mean, double* SF_R sg,
                                                       double* SF_R sgx, float* SF_R a1,
                                                       float* SF_R a2) {
  for (int64_t r = 0; r < rows; r += kBlock) {
    for (int64_t k = 0; k < c; ++k) a1[k] = a2[k] = 0;
    for (int64_t rr = r; rr < std::min(rows, r + kBlock); ++rr) {
      for (int64_t k = 0; k < c; ++k) {
        // Both loaded unconditionally: a conditional load would not vectorise.
        const float xv = ToF(x[rr * c + k]), d = ToF(dy[rr * c + k]), v = xv * a[k] + b[k];
        const float g = (v > 0.0f && v < 6.0f) ? d : 0.0f;
        a1[k] += g;
        a2[k] += g * (xv - mean[k]);
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      sg[k] += a1[k];
      sgx[k] += a2[k];
    }
  }
}

// dx = k1 * g + k2 * x + k3 (BatchNorm's input gradient, rearranged per channel).
template <typename T>
__attribute__((always_inline)) inline void GradRows(const T* SF_R x, const T* SF_R dy,
                                                    int64_t rows, int64_t c, const float* SF_R a,
                                                    const float* SF_R b, const float* SF_R k1,
                                                    const float* SF_R k2, const float* SF_R k3,
                                                    T* SF_R dx) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < c; ++k) {
      const float xv = ToF(x[r * c + k]), d = ToF(dy[r * c + k]), v = xv * a[k] + b[k];
      const float g = (v > 0.0f && v < 6.0f) ? d : 0.0f;
      Store(dx + r * c + k, k1[k] * g + k2[k] * xv + k3[k]);
    }
  }
}
#undef SF_R

// NAME##Best: NAME's loop compiled for AVX-512 where springfield's AVX-512 loops run
// (OwnAvx512), else for the baseline x86-64.
#define SPRINGFIELD_BOTH(NAME, PARAMS, ARGS)                                          \
  template <typename T>                                                              \
  __attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void NAME##512 PARAMS {   \
    NAME ARGS;                                                                       \
  }                                                                                  \
  template <typename T>                                                              \
  void NAME##Any PARAMS {                                                            \
    NAME ARGS;                                                                       \
  }                                                                                  \
  template <typename T>                                                              \
  void NAME##Best PARAMS {                                                           \
    OwnAvx512() ? NAME##512<T> ARGS : NAME##Any<T> ARGS;                             \
  }

SPRINGFIELD_BOTH(StatsRows,
                 (const T* x, int64_t rows, int64_t c, const float* x0, double* s1, double* s2,
                  float* a1, float* a2),
                 (x, rows, c, x0, s1, s2, a1, a2))
SPRINGFIELD_BOTH(NormRows,
                 (const T* x, int64_t rows, int64_t c, const float* a, const float* b, T* y),
                 (x, rows, c, a, b, y))
SPRINGFIELD_BOTH(GradSumRows,
                 (const T* x, const T* dy, int64_t rows, int64_t c, const float* a,
                  const float* b, const float* mean, double* sg, double* sgx, float* a1,
                  float* a2),
                 (x, dy, rows, c, a, b, mean, sg, sgx, a1, a2))
SPRINGFIELD_BOTH(GradRows,
                 (const T* x, const T* dy, int64_t rows, int64_t c, const float* a,
                  const float* b, const float* k1, const float* k2, const float* k3, T* dx),
                 (x, dy, rows, c, a, b, k1, k2, k3, dx))

// y = a * x + b before the clamp, from the statistics (forward and backward alike).
void Affine(const float* scale, const float* shift, const float* mean, const float* var,
            float eps, int64_t c, float* a, float* b) {
  for (int64_t k = 0; k < c; ++k) {
    a[k] = scale[k] / std::sqrt(var[k] + eps);
    b[k] = shift[k] - mean[k] * a[k];
  }
}

// Runs body(thread, first row, rows) on every thread over an even split of `rows`.
template <typename F>
void SplitRows(int64_t rows, int threads, F body) {
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num();
    const int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
    body(t, r0, r1 - r0);
  }
}

template <typename T>
void BnRelu6Forward(const T* x, int64_t rows, int64_t c, const float* scale,
                    const float* shift, float eps, T* y, float* mean, float* var) {
  const int threads = static_cast<int>(std::clamp<int64_t>(omp_get_max_threads(), 1, rows));
  std::vector<double> s1(threads * c, 0.0), s2(threads * c, 0.0);
  std::vector<float> x0(c), a(c), b(c), tmp(2 * threads * c);
  for (int64_t k = 0; k < c; ++k) x0[k] = ToF(x[k]);
  SplitRows(rows, threads, [&](int64_t t, int64_t r0, int64_t n) {
    StatsRowsBest<T>(x + r0 * c, n, c, x0.data(), &s1[t * c], &s2[t * c], &tmp[2 * t * c],
                     &tmp[(2 * t + 1) * c]);
  });
  for (int64_t k = 0; k < c; ++k) {
    double m = 0, q = 0;
    for (int t = 0; t < threads; ++t) {
      m += s1[t * c + k];
      q += s2[t * c + k];
    }
    m /= rows;
    mean[k] = static_cast<float>(x0[k] + m);
    var[k] = static_cast<float>(std::max(q / rows - m * m, 0.0));
  }
  Affine(scale, shift, mean, var, eps, c, a.data(), b.data());
  SplitRows(rows, threads, [&](int64_t, int64_t r0, int64_t n) {
    NormRowsBest<T>(x + r0 * c, n, c, a.data(), b.data(), y + r0 * c);
  });
}

template <typename T>
void BnRelu6Backward(const T* x, const T* dy, int64_t rows, int64_t c, const float* mean,
                     const float* var, const float* scale, const float* shift, float eps,
                     T* dx, float* dscale, float* dshift) {
  const int threads = static_cast<int>(std::clamp<int64_t>(omp_get_max_threads(), 1, rows));
  std::vector<double> sg(threads * c, 0.0), sgx(threads * c, 0.0);
  std::vector<float> a(c), b(c), k1(c), k2(c), k3(c), tmp(2 * threads * c);
  Affine(scale, shift, mean, var, eps, c, a.data(), b.data());
  SplitRows(rows, threads, [&](int64_t t, int64_t r0, int64_t n) {
    GradSumRowsBest<T>(x + r0 * c, dy + r0 * c, n, c, a.data(), b.data(), mean, &sg[t * c],
                       &sgx[t * c], &tmp[2 * t * c], &tmp[(2 * t + 1) * c]);
  });
  for (int64_t k = 0; k < c; ++k) {
    double g = 0, gx = 0;
    for (int t = 0; t < threads; ++t) {
      g += sg[t * c + k];
      gx += sgx[t * c + k];
    }
    const double inv = 1.0 / std::sqrt(static_cast<double>(var[k]) + eps);
    dshift[k] = static_cast<float>(g);
    dscale[k] = static_cast<float>(gx * inv);
    // dx = scale * inv * (g - sum(g) / n - xhat * sum(g * xhat) / n), xhat = (x - mean) * inv
    const double s = scale[k] * inv, q = s * inv * inv * gx / rows;
    k1[k] = static_cast<float>(s);
    k2[k] = static_cast<float>(-q);
    k3[k] = static_cast<float>(q * mean[k] - s * g / rows);
  }
  SplitRows(rows, threads, [&](int64_t, int64_t r0, int64_t n) {
    GradRowsBest<T>(x + r0 * c, dy + r0 * c, n, c, a.data(), b.data(), k1.data(), k2.data(),
                    k3.data(), dx + r0 * c);
  });
}

// ---- BatchNorm (+ ReLU) ----------------------------------------------------------------------
//
// XLA:CPU runs a training BatchNorm + ReLU and its gradient as five to seven passes over the
// activations (statistics, normalisation, ReLU, and backwards two reductions and the input
// gradient), 4-5x the time oneDNN's JIT kernel takes for the same shapes when the data are
// in cache (2 cores, docs/performance.md); with bfloat16 activations it also spares XLA's
// conversion of each BatchNorm's input to float32. oneDNN computes the batch mean and biased
// variance, normalises, scales and shifts, and with `relu` applies ReLU as it writes,
// keeping the ReLU's mask in a workspace for the backward pass. Inference (running
// statistics) is one pass either way; it runs here for bfloat16 activations, which XLA:CPU
// handles at half its float32 speed.

// `relu`: 0 none, 1 ReLU (oneDNN's fused one), 2 ReLU6 (the loops above).
constexpr int64_t kRelu6 = 2;

// n, h, w, c, inputs are bfloat16, relu, epsilon's float32 bits.
Key BnKey(ffi::Span<const int64_t> x, ffi::DataType in, int64_t relu, float eps) {
  uint32_t bits;
  std::memcpy(&bits, &eps, 4);
  return Key{x[0], x[1], x[2], x[3], in == ffi::DataType::BF16, relu, bits};
}

// What training and inference plans share: the activations' and the per-channel arrays'
// descriptors, epsilon, and the flags (ReLU fused where the key says so).
struct BnDescs {
  memory::desc data, channels;
  float eps;
  dnnl::normalization_flags flags;
};

BnDescs MakeBnDescs(const Key& k, dnnl::normalization_flags extra) {
  BnDescs d;
  d.data = memory::desc({k[0], k[3], k[1], k[2]}, k[4] ? dt::bf16 : dt::f32, tag::nhwc);
  d.channels = memory::desc({k[3]}, dt::f32, tag::x);
  const uint32_t bits = static_cast<uint32_t>(k[6]);
  std::memcpy(&d.eps, &bits, 4);
  d.flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift | extra;
  if (k[5] == 1) d.flags |= dnnl::normalization_flags::fuse_norm_relu;
  return d;
}

struct BnPlan {
  BnDescs d;
  dnnl::batch_normalization_forward::primitive_desc fwd_pd;
  dnnl::batch_normalization_backward::primitive_desc bwd_pd;
  dnnl::primitive fwd, bwd;
};

std::shared_ptr<BnPlan> MakeBnPlan(const Key& k) {
  auto plan = std::make_shared<BnPlan>();
  auto& d = plan->d = MakeBnDescs(k, dnnl::normalization_flags::none);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  plan->fwd_pd = dnnl::batch_normalization_forward::primitive_desc(
      Engine(), prop_kind::forward_training, d.data, d.data, d.eps, d.flags, attr);
  plan->bwd_pd = dnnl::batch_normalization_backward::primitive_desc(
      Engine(), prop_kind::backward, d.data, d.data, d.data, d.eps, d.flags, plan->fwd_pd, attr);
  plan->fwd = dnnl::batch_normalization_forward(plan->fwd_pd);
  plan->bwd = dnnl::batch_normalization_backward(plan->bwd_pd);
  return plan;
}

struct BnInferPlan {
  BnDescs d;
  dnnl::batch_normalization_forward::primitive_desc pd;
  dnnl::primitive prim;
};

std::shared_ptr<BnInferPlan> MakeBnInferPlan(const Key& k) {
  auto plan = std::make_shared<BnInferPlan>();
  auto& d = plan->d = MakeBnDescs(k, dnnl::normalization_flags::use_global_stats);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  plan->pd = dnnl::batch_normalization_forward::primitive_desc(
      Engine(), prop_kind::forward_inference, d.data, d.data, d.eps, d.flags, attr);
  plan->prim = dnnl::batch_normalization_forward(plan->pd);
  return plan;
}

// oneDNN arguments: `data` pairs over activations, `channels` over per-channel arrays.
std::unordered_map<int, memory> BnArgs(const BnDescs& d,
                                       std::initializer_list<std::pair<int, void*>> data,
                                       std::initializer_list<std::pair<int, void*>> channels) {
  std::unordered_map<int, memory> args;
  for (auto [arg, ptr] : data) args.emplace(arg, memory(d.data, Engine(), ptr));
  for (auto [arg, ptr] : channels) args.emplace(arg, memory(d.channels, Engine(), ptr));
  return args;
}

ffi::Error BnInfer(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                   ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                   ffi::Result<ffi::AnyBuffer> y, int64_t relu, float eps) {
  if (!Supported(x.element_type(), y->element_type())) return Unsupported();
  return Guard([&] {
    auto p = Cached(BnKey(x.dimensions(), x.element_type(), relu, eps), MakeBnInferPlan);
    Run(p->prim, p->pd.scratchpad_desc(),
        BnArgs(p->d, {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_DST, y->untyped_data()}},
               {{DNNL_ARG_SCALE, scale.typed_data()}, {DNNL_ARG_SHIFT, shift.typed_data()},
                {DNNL_ARG_MEAN, mean.typed_data()}, {DNNL_ARG_VARIANCE, var.typed_data()}}));
  });
}

ffi::Error BnForward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                     ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean,
                     ffi::ResultBuffer<ffi::F32> var, ffi::ResultBuffer<ffi::U8> ws,
                     int64_t relu, float eps) {
  if (!Supported(x.element_type(), y->element_type())) return Unsupported();
  if (relu == kRelu6) {
    return Guard([&] {
      const auto d = x.dimensions();
      const int64_t rows = d[0] * d[1] * d[2], c = d[3];
      if (IsBf16(x.element_type())) {
        BnRelu6Forward(static_cast<const uint16_t*>(x.untyped_data()), rows, c,
                       scale.typed_data(), shift.typed_data(), eps,
                       static_cast<uint16_t*>(y->untyped_data()), mean->typed_data(),
                       var->typed_data());
      } else {
        BnRelu6Forward(static_cast<const float*>(x.untyped_data()), rows, c,
                       scale.typed_data(), shift.typed_data(), eps,
                       static_cast<float*>(y->untyped_data()), mean->typed_data(),
                       var->typed_data());
      }
    });
  }
  return Guard([&] {
    auto p = Cached(BnKey(x.dimensions(), x.element_type(), relu, eps), MakeBnPlan);
    auto args = BnArgs(
        p->d, {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_DST, y->untyped_data()}},
        {{DNNL_ARG_SCALE, scale.typed_data()}, {DNNL_ARG_SHIFT, shift.typed_data()},
         {DNNL_ARG_MEAN, mean->typed_data()}, {DNNL_ARG_VARIANCE, var->typed_data()}});
    if (relu) {
      args.emplace(DNNL_ARG_WORKSPACE,
                   memory(p->fwd_pd.workspace_desc(), Engine(), ws->typed_data()));
    }
    Run(p->fwd, p->fwd_pd.scratchpad_desc(), std::move(args));
  });
}

ffi::Error BnBackward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> mean,
                      ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::U8> ws,
                      ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dscale,
                      ffi::ResultBuffer<ffi::F32> dshift, int64_t relu, float eps) {
  if (!Supported(x.element_type(), dy.element_type()) ||
      !Supported(x.element_type(), dx->element_type())) {
    return Unsupported();
  }
  if (relu == kRelu6) {
    return Guard([&] {
      const auto d = x.dimensions();
      const int64_t rows = d[0] * d[1] * d[2], c = d[3];
      if (IsBf16(x.element_type())) {
        BnRelu6Backward(static_cast<const uint16_t*>(x.untyped_data()),
                        static_cast<const uint16_t*>(dy.untyped_data()), rows, c,
                        mean.typed_data(), var.typed_data(), scale.typed_data(),
                        shift.typed_data(), eps, static_cast<uint16_t*>(dx->untyped_data()),
                        dscale->typed_data(), dshift->typed_data());
      } else {
        BnRelu6Backward(static_cast<const float*>(x.untyped_data()),
                        static_cast<const float*>(dy.untyped_data()), rows, c,
                        mean.typed_data(), var.typed_data(), scale.typed_data(),
                        shift.typed_data(), eps, static_cast<float*>(dx->untyped_data()),
                        dscale->typed_data(), dshift->typed_data());
      }
    });
  }
  return Guard([&] {
    auto p = Cached(BnKey(x.dimensions(), x.element_type(), relu, eps), MakeBnPlan);
    auto args = BnArgs(p->d,
                       {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_DIFF_DST, dy.untyped_data()},
                        {DNNL_ARG_DIFF_SRC, dx->untyped_data()}},
                       {{DNNL_ARG_MEAN, mean.typed_data()}, {DNNL_ARG_VARIANCE, var.typed_data()},
                        {DNNL_ARG_SCALE, scale.typed_data()},
                        {DNNL_ARG_DIFF_SCALE, dscale->typed_data()},
                        {DNNL_ARG_DIFF_SHIFT, dshift->typed_data()}});
    if (relu) {
      args.emplace(DNNL_ARG_WORKSPACE,
                   memory(p->fwd_pd.workspace_desc(), Engine(), ws.typed_data()));
    }
    Run(p->bwd, p->bwd_pd.scratchpad_desc(), std::move(args));
  });
}

}  // namespace

#define SPRINGFIELD_BN_ATTRS .Attr<int64_t>("relu").Attr<float>("epsilon")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldBnForward, BnForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  SPRINGFIELD_BN_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldBnInfer, BnInfer,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  SPRINGFIELD_BN_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldBnBackward, BnBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  SPRINGFIELD_BN_ATTRS);

// The workspace bytes of a BatchNorm (+ ReLU) of NHWC shape n, h, w, c.
extern "C" int64_t springfield_bn_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                                   int64_t bf16, int64_t relu, float eps) {
  const int64_t dims[4] = {n, h, w, c};
  try {
    const Key k = BnKey(ffi::Span<const int64_t>(dims, 4),
                        bf16 ? ffi::DataType::BF16 : ffi::DataType::F32, relu, eps);
    return static_cast<int64_t>(Cached(k, MakeBnPlan)->fwd_pd.workspace_desc().get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
}
