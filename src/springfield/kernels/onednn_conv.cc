// 2-D convolutions (NHWC activations, HWIO weights) run by oneDNN, exposed to XLA as typed
// FFI handlers. XLA:CPU's own convolution kernels reach about 60% of GEMM speed on the
// machines springfield is measured on; oneDNN's JIT kernels reach ~100%, and twice that with
// bfloat16 inputs on CPUs with AVX512_BF16. Inputs are float32 or bfloat16 (all of one
// call's alike); results and accumulation are always float32.
//
// One plan (primitive descriptors, primitives, weight reorders) is built per geometry
// and cached for the life of the process. Scratchpads are user-managed and allocated per
// call so that two XLA threads may run the same plan at once.
#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::algorithm;
using dnnl::memory;
using dnnl::prop_kind;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, inputs are bfloat16
using Key = std::array<int64_t, 16>;

struct Plan {
  // Inputs (src, wei_user, dst as diff_dst) in the input type; outputs in float32.
  memory::desc src, wei_user, dst, src_f32, wei_f32, dst_f32;
  dnnl::primitive_attr attr;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::primitive fwd, bwd_data, bwd_weights;
};

std::shared_ptr<Plan> MakePlan(const Key& k) {
  auto [n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, bf16] = k;
  const dt in = bf16 ? dt::bf16 : dt::f32;
  auto plan = std::make_shared<Plan>();
  auto& eng = Engine();
  plan->src = memory::desc({n, c, h, w}, in, tag::nhwc);
  plan->dst = memory::desc({n, o, oh, ow}, in, tag::nhwc);
  plan->wei_user = memory::desc({o, c, kh, kw}, in, tag::hwio);
  plan->src_f32 = memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  plan->dst_f32 = memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc);
  plan->wei_f32 = memory::desc({o, c, kh, kw}, dt::f32, tag::hwio);
  memory::desc wei_any({o, c, kh, kw}, in, tag::any);
  memory::desc diff_wei_any({o, c, kh, kw}, dt::f32, tag::any);
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  plan->attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  plan->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, prop_kind::forward_training, algorithm::convolution_direct, plan->src,
      wei_any, plan->dst_f32, strides, pad_l, pad_r, plan->attr);
  plan->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, algorithm::convolution_direct, plan->src_f32, wei_any, plan->dst, strides,
      pad_l, pad_r, plan->fwd_pd, plan->attr);
  plan->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, algorithm::convolution_direct, plan->src, diff_wei_any, plan->dst, strides,
      pad_l, pad_r, plan->fwd_pd, plan->attr);
  plan->fwd = dnnl::convolution_forward(plan->fwd_pd);
  plan->bwd_data = dnnl::convolution_backward_data(plan->bwd_data_pd);
  plan->bwd_weights = dnnl::convolution_backward_weights(plan->bwd_weights_pd);
  return plan;
}

std::shared_ptr<Plan> GetPlan(const Key& k) {
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(k);
  if (it != plans.end()) return it->second;
  auto plan = MakePlan(k);
  plans.emplace(k, plan);
  return plan;
}

Key MakeKey(ffi::Span<const int64_t> x, ffi::Span<const int64_t> wt,
            ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
            int64_t pb, int64_t pl, int64_t pr, ffi::DataType in) {
  return Key{x[0], x[1], x[2], x[3], wt[0], wt[1], wt[3], y[1],
             y[2], sh,   sw,   pt,   pb,    pl,    pr,    in == ffi::DataType::BF16};
}

bool Supported(ffi::DataType a, ffi::DataType b) {
  return a == b && (a == ffi::DataType::F32 || a == ffi::DataType::BF16);
}

ffi::Error Unsupported() {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "springfield oneDNN convolution: inputs must both be float32 or bfloat16");
}

// Runs `prim` with `args`, giving it a scratchpad of its own.
void Run(dnnl::primitive& prim, const memory::desc& scratch_md,
         std::unordered_map<int, memory> args) {
  dnnl::stream stream(Engine());
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratch_md, Engine()));
  prim.execute(stream, args);
  stream.wait();
}

// A memory object over the user's HWIO weights, reordered to `want` if that differs.
memory WeightsIn(const Plan& p, const memory::desc& want, void* data) {
  memory user(p.wei_user, Engine(), data);
  if (want == p.wei_user) return user;
  memory mine(want, Engine());
  dnnl::stream stream(Engine());
  dnnl::reorder(user, mine).execute(stream, user, mine);
  stream.wait();
  return mine;
}

ffi::Error Guard(const std::function<void()>& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> y,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr) {
  if (!Supported(x.element_type(), w.element_type())) return Unsupported();
  return Guard([&] {
    auto p = GetPlan(MakeKey(x.dimensions(), w.dimensions(), y->dimensions(), sh,
                             sw, pt, pb, pl, pr, x.element_type()));
    memory src(p->src, Engine(), x.untyped_data());
    memory dst(p->dst_f32, Engine(), y->untyped_data());
    memory wei = WeightsIn(*p, p->fwd_pd.weights_desc(), w.untyped_data());
    Run(p->fwd, p->fwd_pd.scratchpad_desc(),
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  });
}

ffi::Error ConvBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                            int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (!Supported(dy.element_type(), w.element_type())) return Unsupported();
  return Guard([&] {
    auto p = GetPlan(MakeKey(dx->dimensions(), w.dimensions(), dy.dimensions(), sh,
                             sw, pt, pb, pl, pr, dy.element_type()));
    memory diff_dst(p->dst, Engine(), dy.untyped_data());
    memory diff_src(p->src_f32, Engine(), dx->untyped_data());
    memory wei = WeightsIn(*p, p->bwd_data_pd.weights_desc(), w.untyped_data());
    Run(p->bwd_data, p->bwd_data_pd.scratchpad_desc(),
        {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei},
         {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                               int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (!Supported(x.element_type(), dy.element_type())) return Unsupported();
  return Guard([&] {
    auto p = GetPlan(MakeKey(x.dimensions(), dw->dimensions(), dy.dimensions(), sh,
                             sw, pt, pb, pl, pr, x.element_type()));
    memory src(p->src, Engine(), x.untyped_data());
    memory diff_dst(p->dst, Engine(), dy.untyped_data());
    memory user(p->wei_f32, Engine(), dw->untyped_data());
    const auto want = p->bwd_weights_pd.diff_weights_desc();
    memory diff_wei = want == p->wei_f32 ? user : memory(want, Engine());
    Run(p->bwd_weights, p->bwd_weights_pd.scratchpad_desc(),
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
         {DNNL_ARG_DIFF_WEIGHTS, diff_wei}});
    if (!(want == p->wei_f32)) {
      dnnl::stream stream(Engine());
      dnnl::reorder(diff_wei, user).execute(stream, diff_wei, user);
      stream.wait();
    }
  });
}

}  // namespace

#define SPRINGFIELD_CONV_ATTRS                                              \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top") \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPRINGFIELD_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBackwardData, ConvBackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPRINGFIELD_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBackwardWeights, ConvBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPRINGFIELD_CONV_ATTRS);

// Which implementation oneDNN picked for each pass of a geometry: for benchmarks.
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
