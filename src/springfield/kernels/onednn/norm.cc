#include "common.h"

using namespace springfield;

namespace {

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
  if (k[5]) d.flags |= dnnl::normalization_flags::fuse_norm_relu;
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
                      ffi::Buffer<ffi::U8> ws, ffi::Result<ffi::AnyBuffer> dx,
                      ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift,
                      int64_t relu, float eps) {
  if (!Supported(x.element_type(), dy.element_type()) ||
      !Supported(x.element_type(), dx->element_type())) {
    return Unsupported();
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
