#include "common.h"

using namespace springfield;

namespace {

// ---- conv + bias + ReLU + 2x2 average pool, as one block ----------------------------------
//
// The reference CNN and `seed` are stacks of conv -> bias -> ReLU -> avg-pool 2x2. Run by XLA
// around a oneDNN convolution, the bias, ReLU, pool and their gradients are six passes over
// the convolution's full-size output (and two thread pools taking turns on two cores). Here
// oneDNN adds the bias and applies ReLU as it writes the convolution's output (a post-op),
// one pass pools it and keeps a byte per element saying where ReLU let the gradient through,
// and on the way back one pass turns the pooled gradient into the convolution's output
// gradient, whose bias gradient oneDNN sums while it computes the weight gradient.

struct BlockPlan {
  memory::desc src, wei_user, dz, bias, conv_out;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::primitive fwd, bwd_weights;
};

std::shared_ptr<BlockPlan> MakeBlockPlan(const Key& k) {
  auto [n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, bf16] = k;
  const dt in = bf16 ? dt::bf16 : dt::f32;
  auto plan = std::make_shared<BlockPlan>();
  auto& eng = Engine();
  plan->src = memory::desc({n, c, h, w}, in, tag::nhwc);
  plan->wei_user = memory::desc({o, c, kh, kw}, in, tag::hwio);
  plan->dz = memory::desc({n, o, oh, ow}, in, tag::nhwc);
  // bf16 == 2: the forward convolution writes bfloat16 (see BlockForwardImpl).
  plan->conv_out = memory::desc({n, o, oh, ow}, bf16 == 2 ? dt::bf16 : dt::f32, tag::nhwc);
  plan->bias = memory::desc({o}, dt::f32, tag::x);
  memory::desc wei_any({o, c, kh, kw}, in, tag::any);
  memory::desc diff_wei_any({o, c, kh, kw}, dt::f32, tag::any);
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  dnnl::post_ops relu;
  relu.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr fwd_attr, attr;
  fwd_attr.set_post_ops(relu);
  fwd_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  plan->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, prop_kind::forward_training, algorithm::convolution_direct, plan->src, wei_any,
      plan->bias, plan->conv_out, strides, pad_l, pad_r, fwd_attr);
  plan->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, algorithm::convolution_direct, plan->src, diff_wei_any, plan->bias, plan->dz,
      strides, pad_l, pad_r, plan->fwd_pd, attr);
  plan->fwd = dnnl::convolution_forward(plan->fwd_pd);
  plan->bwd_weights = dnnl::convolution_backward_weights(plan->bwd_weights_pd);
  return plan;
}

std::shared_ptr<BlockPlan> GetBlockPlan(const Key& k) { return Cached(k, MakeBlockPlan); }

// The convolution's output before pooling. Kept per thread and reused: a fresh buffer each
// call would page-fault its way through hundreds of MB at 128 px.
float* ConvOutScratch(size_t count) {
  static thread_local std::vector<float> buf;
  if (buf.size() < count) buf.resize(count);
  return buf.data();
}

Key BlockKey(ffi::Span<const int64_t> x, ffi::Span<const int64_t> wt, int64_t sh,
             int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, ffi::DataType in) {
  const int64_t oh = (x[1] + pt + pb - wt[0]) / sh + 1;
  const int64_t ow = (x[2] + pl + pr - wt[1]) / sw + 1;
  return Key{x[0], x[1], x[2], x[3], wt[0], wt[1], wt[3], oh,
             ow,   sh,   sw,   pt,   pb,    pl,    pr,    in == ffi::DataType::BF16};
}

// Images per chunk: the block runs a few images at a time so that the convolution's
// output (and, backwards, its gradient) stays in cache between oneDNN and the pooling pass
// instead of making a round trip through memory (at 128 px, 268 MB for the first layer).
// `chunk_kb` (the calls' attribute of that name) is the convolution output's bytes per chunk.
int64_t ChunkImages(int64_t n, int64_t per_image_bytes, int64_t chunk_kb) {
  const int64_t budget = chunk_kb * 1024;
  return std::max<int64_t>(1, std::min<int64_t>(n, budget / std::max<int64_t>(1, per_image_bytes)));
}

Key WithBatch(Key k, int64_t n) {
  k[0] = n;
  return k;
}



// The pooled output `y` is float32 or bfloat16 (bfloat16 activations), whatever the inputs.
void BlockForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b,
                      ffi::AnyBuffer y, uint8_t* mask, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, int64_t chunk_kb) {
  Key k = BlockKey(x.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr, x.element_type());
  const int64_t n = k[0], h = k[1], wd = k[2], c = k[3], o = k[6], oh = k[7], ow = k[8];
  const int64_t in_bytes = k[15] ? 2 : 4;
  // Bfloat16 inputs and output: the convolution writes its output in bfloat16 too (as
  // autocast does), so twice the images fit a chunk and the pooling reads half the bytes.
  const bool y_bf16 = IsBf16(y.element_type());
  const bool r_bf16 = k[15] && y_bf16;
  if (r_bf16) k[15] = 2;
  const int64_t chunk = ChunkImages(n, oh * ow * o * (r_bf16 ? 2 : 4), chunk_kb);
  float* r = ConvOutScratch(static_cast<size_t>(chunk * oh * ow * o));
  auto* x_bytes = static_cast<char*>(x.untyped_data());
  std::shared_ptr<BlockPlan> last;
  memory wei;
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t nb = std::min(chunk, n - start);
    auto p = GetBlockPlan(WithBatch(k, nb));
    if (!last || !(p->fwd_pd.weights_desc() == last->fwd_pd.weights_desc())) {
      wei = WeightsIn(p->wei_user, p->fwd_pd.weights_desc(), w.untyped_data());
    }
    last = p;
    memory src(p->src, Engine(), x_bytes + start * h * wd * c * in_bytes);
    memory bias(p->bias, Engine(), b.typed_data());
    memory dst(p->conv_out, Engine(), r);
    Run(p->fwd, p->fwd_pd.scratchpad_desc(),
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_BIAS, bias},
         {DNNL_ARG_DST, dst}});
    char* y_chunk = static_cast<char*>(y.untyped_data()) +
                    start * (oh / 2) * (ow / 2) * o * (y_bf16 ? 2 : 4);
    uint8_t* mask_chunk = mask != nullptr ? mask + start * oh * ow * o / 8 : nullptr;
    PoolAndMask(r, r_bf16, y_chunk, y_bf16, mask_chunk, nb, oh, ow, o);
  }
}

ffi::Error BlockForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b,
                        ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::U8> mask,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                        int64_t pr, int64_t chunk_kb) {
  if (!Supported(x.element_type(), w.element_type()) || !Activation(y->element_type())) {
    return Unsupported();
  }
  return Guard([&] {
    BlockForwardImpl(x, w, b, *y, mask->typed_data(), sh, sw, pt, pb, pl, pr, chunk_kb);
  });
}

ffi::Error BlockInfer(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b,
                      ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, int64_t chunk_kb) {
  if (!Supported(x.element_type(), w.element_type()) || !Activation(y->element_type())) {
    return Unsupported();
  }
  return Guard([&] {
    BlockForwardImpl(x, w, b, *y, nullptr, sh, sw, pt, pb, pl, pr, chunk_kb);
  });
}

// From the pooled output's gradient, the block's weight and bias gradients. With `dz_out`,
// the convolution output's gradient goes there (the whole batch, for the input-gradient
// convolution that follows). Without (the first block: nobody wants the image's gradient),
// it is made chunk by chunk in cache and consumed at once, and the chunks' gradients summed.
// `dy` is float32 or bfloat16; the convolution output's gradient is in the inputs' type.
void BlockWeightGrad(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::U8> mask,
                     void* dz_out, float* dw, float* db, const Key& k, int64_t chunk_kb) {
  const int64_t n = k[0], h = k[1], wd = k[2], c = k[3], o = k[6], oh = k[7], ow = k[8];
  const bool bf16 = k[15];
  const int64_t in_bytes = bf16 ? 2 : 4;
  const int64_t chunk = dz_out != nullptr ? n : ChunkImages(n, oh * ow * o * in_bytes, chunk_kb);
  // Float-sized scratch serves both types (bfloat16 uses half of it).
  void* scratch = dz_out != nullptr ? nullptr : ConvOutScratch(chunk * oh * ow * o);
  const memory::desc wei_f32({o, c, k[4], k[5]}, dt::f32, tag::hwio);
  const int64_t wcount = o * c * k[4] * k[5];
  std::vector<float> part_w, part_b;
  auto* x_bytes = static_cast<char*>(x.untyped_data());
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t nb = std::min(chunk, n - start);
    auto p = GetBlockPlan(WithBatch(k, nb));
    void* dz = dz_out != nullptr ? dz_out : scratch;
    const bool dy_bf16 = IsBf16(dy.element_type());
    Unpool(static_cast<const char*>(dy.untyped_data()) +
               start * (oh / 2) * (ow / 2) * o * (dy_bf16 ? 2 : 4),
           dy_bf16, mask.typed_data() + start * oh * ow * o / 8, dz, bf16, nb, oh, ow, o);
    const bool first = start == 0;
    if (!first) {
      part_w.resize(wcount);
      part_b.resize(o);
    }
    memory src(p->src, Engine(), x_bytes + start * h * wd * c * in_bytes);
    memory diff_dst(p->dz, Engine(), dz);
    memory diff_bias(p->bias, Engine(), first ? db : part_b.data());
    RunWeightGrad(p->bwd_weights, p->bwd_weights_pd, wei_f32, first ? dw : part_w.data(),
                  {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                   {DNNL_ARG_DIFF_BIAS, diff_bias}});
    if (!first) {
      for (int64_t i = 0; i < wcount; ++i) dw[i] += part_w[i];
      for (int64_t i = 0; i < o; ++i) db[i] += part_b[i];
    }
  }
}

ffi::Error BlockBackward(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                         ffi::Buffer<ffi::U8> mask, ffi::Result<ffi::AnyBuffer> dz,
                         ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db,
                         int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                         int64_t pr, int64_t chunk_kb) {
  if (!Supported(x.element_type(), dz->element_type()) || !Activation(dy.element_type())) {
    return Unsupported();
  }
  return Guard([&] {
    BlockWeightGrad(x, dy, mask, dz->untyped_data(), dw->typed_data(), db->typed_data(),
                    BlockKey(x.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr,
                             x.element_type()),
                    chunk_kb);
  });
}

ffi::Error BlockBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                ffi::Buffer<ffi::U8> mask, ffi::ResultBuffer<ffi::F32> dw,
                                ffi::ResultBuffer<ffi::F32> db, int64_t sh, int64_t sw,
                                int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t chunk_kb) {
  if (!Supported(x.element_type(), x.element_type()) || !Activation(dy.element_type())) {
    return Unsupported();
  }
  return Guard([&] {
    BlockWeightGrad(x, dy, mask, nullptr, dw->typed_data(), db->typed_data(),
                    BlockKey(x.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr,
                             x.element_type()),
                    chunk_kb);
  });
}

}  // namespace

#define SPRINGFIELD_CONV_ATTRS                                              \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top") \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

#define SPRINGFIELD_BLOCK_ATTRS SPRINGFIELD_CONV_ATTRS.Attr<int64_t>("chunk_kb")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBlockForward, BlockForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>() SPRINGFIELD_BLOCK_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBlockInfer, BlockInfer,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>() SPRINGFIELD_BLOCK_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBlockBackward, BlockBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPRINGFIELD_BLOCK_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBlockBackwardWeights, BlockBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPRINGFIELD_BLOCK_ATTRS);
