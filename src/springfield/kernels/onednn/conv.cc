// Single convolutions (forward, input gradient, weight gradient) as FFI handlers: plain
// ones (HWIO weights) and depthwise ones (one k x k filter per channel, EfficientNet-Lite's:
// weights (k, k, 1, C), which is oneDNN's hwigo layout of a grouped convolution with C
// groups of one channel each; oneDNN runs those in its *_dw kernels).
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

ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                               int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                               int64_t depthwise) {
  if (!Supported(x.element_type(), dy.element_type())) return Unsupported();
  return Guard([&] {
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
