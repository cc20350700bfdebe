// Single convolutions (forward, input gradient, weight gradient) as FFI handlers: plain
// ones (HWIO weights) and depthwise ones (one k x k filter per channel, EfficientNet-Lite's:
// weights (k, k, 1, C), which is oneDNN's hwigo layout of a grouped convolution with C
// groups of one channel each; oneDNN runs those in its *_dw kernels).
#include <omp.h>

#include <type_traits>

#include "common.h"

using namespace springfield;

namespace {

struct Plan {
  // Inputs (src, wei_user, dst as diff_dst) in the input type; the output and the input's
  // gradient (dst_out, src_out) in the output type; weight gradients in float32.
  memory::desc src, wei_user, dst, src_out, wei_f32, dst_out;
  dnnl::primitive_attr attr;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::primitive fwd, bwd_data, bwd_weights;
};

// Added to a Key's types: a depthwise convolution (o == c).
constexpr int64_t kDepthwise = 4;

std::shared_ptr<Plan> MakePlan(const Key& k) {
  auto [n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, kind] = k;
  const bool depthwise = kind & kDepthwise;
  const int64_t types = kind & ~kDepthwise;
  const memory::dims wdims =
      depthwise ? memory::dims{c, 1, 1, kh, kw} : memory::dims{o, c, kh, kw};
  const tag wtag = depthwise ? tag::hwigo : tag::hwio;
  const dt in = types != kF32 ? dt::bf16 : dt::f32;
  const dt out = types == kBf16InOut ? dt::bf16 : dt::f32;
  auto plan = std::make_shared<Plan>();
  auto& eng = Engine();
  plan->src = memory::desc({n, c, h, w}, in, tag::nhwc);
  plan->dst = memory::desc({n, o, oh, ow}, in, tag::nhwc);
  plan->wei_user = memory::desc(wdims, in, wtag);
  plan->src_out = memory::desc({n, c, h, w}, out, tag::nhwc);
  plan->dst_out = memory::desc({n, o, oh, ow}, out, tag::nhwc);
  plan->wei_f32 = memory::desc(wdims, dt::f32, wtag);
  memory::desc wei_any(wdims, in, tag::any);
  memory::desc diff_wei_any(wdims, dt::f32, tag::any);
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  plan->attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  plan->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, prop_kind::forward_training, algorithm::convolution_direct, plan->src,
      wei_any, plan->dst_out, strides, pad_l, pad_r, plan->attr);
  plan->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, algorithm::convolution_direct, plan->src_out, wei_any, plan->dst, strides,
      pad_l, pad_r, plan->fwd_pd, plan->attr);
  plan->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, algorithm::convolution_direct, plan->src, diff_wei_any, plan->dst, strides,
      pad_l, pad_r, plan->fwd_pd, plan->attr);
  plan->fwd = dnnl::convolution_forward(plan->fwd_pd);
  plan->bwd_data = dnnl::convolution_backward_data(plan->bwd_data_pd);
  plan->bwd_weights = dnnl::convolution_backward_weights(plan->bwd_weights_pd);
  return plan;
}


std::shared_ptr<Plan> GetPlan(const Key& k) { return Cached(k, MakePlan); }

// x: (n, h, w, c); wt: (kh, kw, c or 1, o); y: (n, oh, ow, o).
Key MakeKey(ffi::Span<const int64_t> x, ffi::Span<const int64_t> wt,
            ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
            int64_t pb, int64_t pl, int64_t pr, int64_t types, int64_t depthwise) {
  return Key{x[0], x[1], x[2], x[3], wt[0], wt[1], wt[3], y[1],
             y[2], sh,   sw,   pt,   pb,    pl,    pr,    types | (depthwise ? kDepthwise : 0)};
}

ffi::Error ConvForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr, int64_t depthwise) {
  const int64_t types = Types(x.element_type(), y->element_type());
  if (!Supported(x.element_type(), w.element_type()) || types < 0) return Unsupported();
  return Guard([&] {
    auto p = GetPlan(MakeKey(x.dimensions(), w.dimensions(), y->dimensions(), sh,
                             sw, pt, pb, pl, pr, types, depthwise));
    memory src(p->src, Engine(), x.untyped_data());
    memory dst(p->dst_out, Engine(), y->untyped_data());
    memory wei = WeightsIn(p->wei_user, p->fwd_pd.weights_desc(), w.untyped_data());
    Run(p->fwd, p->fwd_pd.scratchpad_desc(),
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  });
}

ffi::Error ConvBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w,
                            ffi::Result<ffi::AnyBuffer> dx, int64_t sh, int64_t sw,
                            int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                            int64_t depthwise) {
  const int64_t types = Types(dy.element_type(), dx->element_type());
  if (!Supported(dy.element_type(), w.element_type()) || types < 0) return Unsupported();
  return Guard([&] {
    auto p = GetPlan(MakeKey(dx->dimensions(), w.dimensions(), dy.dimensions(), sh,
                             sw, pt, pb, pl, pr, types, depthwise));
    memory diff_dst(p->dst, Engine(), dy.untyped_data());
    memory diff_src(p->src_out, Engine(), dx->untyped_data());
    memory wei = WeightsIn(p->wei_user, p->bwd_data_pd.weights_desc(), w.untyped_data());
    Run(p->bwd_data, p->bwd_data_pd.scratchpad_desc(),
        {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei},
         {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

// ---- Depthwise weight gradients, springfield's own loop ---------------------------------------
//
// oneDNN 3.2 has no depthwise kernel for a 5x5 weight gradient and runs it in its generic
// `jit:avx512_core` convolution: Lite0's nine 5x5 layers took 105 ms of a 550 ms training
// step at 160 px (2 GFLOP/s for [32,10,10,1152]). Here each thread takes a share of the
// images; for each image and 16-64 channels at a time it runs the filter's tap rows over
// that slice while it is in cache, with the row's sums in registers. The threads' sums are
// added in a fixed order (the same numbers every run with the same thread count).

struct DwGeom {
  int64_t n, h, w, c, oh, ow, s, pt, pl;
};

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 Load16(
    const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i v = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
}

// One output column near the row's ends: the taps that fall outside are skipped.
template <int K, int V, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) inline void DwEdge(
    __m512 (&acc)[K][V], const T* xr, const T* dr, int64_t ow, const DwGeom& g,
    const __mmask16* m) {
  __m512 d[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) d[v] = Load16(dr + ow * g.c + 16 * v, m[v]);
  const int64_t iw0 = ow * g.s - g.pl;
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) {
    const int64_t iw = iw0 + j;
    if (iw < 0 || iw >= g.w) continue;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      acc[j][v] = _mm512_fmadd_ps(d[v], Load16(xr + iw * g.c + 16 * v, m[v]), acc[j][v]);
  }
}

// One task: tap row `i` of the k x k filter, channels [c0, c0 + 16 V) (lane masks `m`),
// images [n0, n1); the K x 16V sums added to out[j * 16V + lane].
template <int K, int V, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void DwGradTask(
    const T* x, const T* dy, const DwGeom& g, int i, int64_t c0, const __mmask16* m,
    int64_t n0, int64_t n1, float* out) {
  __m512 acc[K][V];
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_loadu_ps(out + (j * V + v) * 16);
  // Output columns whose k taps all fall inside the row: [lo, hi).
  const int64_t last = g.w - K + g.pl;  // the last column's input offset, if >= 0
  const int64_t lo = std::min(g.ow, (g.pl + g.s - 1) / g.s);
  const int64_t hi = std::max(lo, std::min(g.ow, last < 0 ? 0 : last / g.s + 1));
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oh = 0; oh < g.oh; ++oh) {
      const int64_t ih = oh * g.s - g.pt + i;
      if (ih < 0 || ih >= g.h) continue;
      const T* xr = x + (n * g.h + ih) * g.w * g.c + c0;
      const T* dr = dy + (n * g.oh + oh) * g.ow * g.c + c0;
      for (int64_t ow = 0; ow < lo; ++ow) DwEdge<K, V, T>(acc, xr, dr, ow, g, m);
      for (int64_t ow = lo; ow < hi; ++ow) {
        __m512 d[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) d[v] = Load16(dr + ow * g.c + 16 * v, m[v]);
        const T* xp = xr + (ow * g.s - g.pl) * g.c;
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j)
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v)
            acc[j][v] = _mm512_fmadd_ps(d[v], Load16(xp + j * g.c + 16 * v, m[v]), acc[j][v]);
      }
      for (int64_t ow = hi; ow < g.ow; ++ow) DwEdge<K, V, T>(acc, xr, dr, ow, g, m);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (j * V + v) * 16, acc[j][v]);
}

// dw (k, k, 1, c) float32 from x (n, h, w, c) and dy (n, oh, ow, c), V vectors of channels
// at a time. Each thread takes a share of the images and keeps its own sums; a tile of one
// image (its channels' slice of x and dy) stays in cache while the k tap rows pass over it.
template <int K, int V, typename T>
void DwGradV(const T* x, const T* dy, const DwGeom& g, float* dw) {
  constexpr int64_t CB = 16 * V;
  const int64_t tiles = (g.c + CB - 1) / CB, size = tiles * K * K * CB;
  const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), g.n));
  std::vector<float> part(threads * size, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num();
    float* mine = part.data() + t * size;
    for (int64_t n = g.n * t / threads; n < g.n * (t + 1) / threads; ++n) {
      for (int64_t b = 0; b < tiles; ++b) {
        __mmask16 m[V];
        for (int v = 0; v < V; ++v) {
          const int64_t left = g.c - b * CB - 16 * v;
          m[v] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
        }
        for (int i = 0; i < K; ++i) {
          DwGradTask<K, V, T>(x, dy, g, i, b * CB, m, n, n + 1, mine + (b * K + i) * K * CB);
        }
      }
    }
  }
  for (int64_t tap = 0; tap < K * K; ++tap) {
    for (int64_t c = 0; c < g.c; ++c) {
      float sum = 0;
      for (int64_t t = 0; t < threads; ++t) {
        sum += part[t * size + ((c / CB) * K * K + tap) * CB + c % CB];
      }
      dw[tap * g.c + c] = sum;
    }
  }
}

template <typename T>
void DwGrad5(const T* x, const T* dy, const DwGeom& g, float* dw) {
  // As many 16-channel vectors at a time as the channels fill, up to 4: 5 x 4 accumulators
  // of the 32 registers.
  switch (std::min<int64_t>((g.c + 15) / 16, 4)) {
    case 1: return DwGradV<5, 1>(x, dy, g, dw);
    case 2: return DwGradV<5, 2>(x, dy, g, dw);
    case 3: return DwGradV<5, 3>(x, dy, g, dw);
    default: return DwGradV<5, 4>(x, dy, g, dw);
  }
}

// Runs the loop above for a 5x5 filter on a CPU with AVX-512 (float32 or bfloat16 inputs);
// false leaves the weight gradient to oneDNN. (3x3 ones stay in oneDNN's `jit_dw`, which
// was as fast or faster for Lite0's 3x3 layers in float32.)
bool OwnDepthwiseWeightGrad(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::ResultBuffer<ffi::F32> dw,
                            int64_t s, int64_t pt, int64_t pl) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (!OwnAvx512() || wd[0] != 5 || wd[1] != 5) return false;
  const DwGeom g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], s, pt, pl};
  if (IsBf16(x.element_type())) {
    DwGrad5(static_cast<const uint16_t*>(x.untyped_data()),
            static_cast<const uint16_t*>(dy.untyped_data()), g, dw->typed_data());
  } else {
    DwGrad5(static_cast<const float*>(x.untyped_data()),
            static_cast<const float*>(dy.untyped_data()), g, dw->typed_data());
  }
  return true;
}

// depthwise: 0 a plain convolution, 1 a depthwise one in oneDNN, 2 a depthwise one whose
// weight gradient runs in the loop above where it can.
ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                               int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                               int64_t depthwise) {
  if (!Supported(x.element_type(), dy.element_type())) return Unsupported();
  return Guard([&] {
    if (depthwise == 2 && sh == sw && OwnDepthwiseWeightGrad(x, dy, dw, sh, pt, pl)) return;
    auto p = GetPlan(MakeKey(x.dimensions(), dw->dimensions(), dy.dimensions(), sh,
                             sw, pt, pb, pl, pr, Types(x.element_type(), ffi::DataType::F32),
                             depthwise));
    memory src(p->src, Engine(), x.untyped_data());
    memory diff_dst(p->dst, Engine(), dy.untyped_data());
    RunWeightGrad(p->bwd_weights, p->bwd_weights_pd, p->wei_f32, dw->untyped_data(),
                  {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}});
  });
}

}  // namespace

#define SPRINGFIELD_CONV_ATTRS                                                    \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")       \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right") \
      .Attr<int64_t>("depthwise")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() SPRINGFIELD_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBackwardData, ConvBackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() SPRINGFIELD_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBackwardWeights, ConvBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPRINGFIELD_CONV_ATTRS);

// Which implementation oneDNN picked for each pass of a geometry (bf16: a Key's types, plus
// 4 for a depthwise convolution): for benchmarks.
extern "C" const char* springfield_conv_impl(int64_t n, int64_t h, int64_t w, int64_t c,
                                             int64_t kh, int64_t kw, int64_t o,
                                             int64_t oh, int64_t ow, int64_t sh,
                                             int64_t sw, int64_t pt, int64_t pb,
                                             int64_t pl, int64_t pr, int64_t bf16) {
  static thread_local std::string out;
  auto p = GetPlan(Key{n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, bf16});
  out = std::string(p->fwd_pd.impl_info_str()) + " / " + p->bwd_data_pd.impl_info_str() + " / " +
        p->bwd_weights_pd.impl_info_str();
  return out.c_str();
}
