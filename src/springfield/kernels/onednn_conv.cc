// 2-D convolutions (NHWC activations, HWIO weights) run by oneDNN, exposed to XLA as typed
// FFI handlers. XLA:CPU's own convolution kernels reach about 60% of GEMM speed on the
// machines springfield is measured on; oneDNN's JIT kernels reach ~100%, and twice that with
// bfloat16 inputs on CPUs with AVX512_BF16. Inputs are float32 or bfloat16 (all of one
// call's alike); accumulation and weight gradients are always float32, and the activations
// a single convolution writes (its output, its input's gradient) are float32 or, from
// bfloat16 inputs, bfloat16 where the caller asks for them so.
//
// Besides single convolutions, whole conv -> bias -> ReLU -> 2x2 average-pool blocks (the
// reference CNN's and `seed`'s) run as one call each way: see "conv + bias + ReLU" below;
// BatchNorm, and the matrix products of dense layers ("matrix products" below), too.
//
// One plan (primitive descriptors, primitives, weight reorders) is built per geometry
// and cached for the life of the process. Calls run one at a time (each uses every core),
// so a scratchpad kept per thread serves them all.
#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <immintrin.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::algorithm;
using dnnl::memory;
using dnnl::prop_kind;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

// The lock every handler of the library runs under (see CallLock below); adam.cc's too.
std::mutex& SpringfieldCallLock() {
  static std::mutex mu;
  return mu;
}

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, types: 0 float32 throughout,
// 1 bfloat16 inputs with float32 outputs, 2 bfloat16 inputs and activation outputs (a
// single convolution's output and its input's gradient; weight gradients stay float32).
using Key = std::array<int64_t, 16>;
constexpr int64_t kF32 = 0, kBf16In = 1, kBf16InOut = 2;

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

std::shared_ptr<Plan> MakePlan(const Key& k) {
  auto [n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, types] = k;
  const dt in = types != kF32 ? dt::bf16 : dt::f32;
  const dt out = types == kBf16InOut ? dt::bf16 : dt::f32;
  auto plan = std::make_shared<Plan>();
  auto& eng = Engine();
  plan->src = memory::desc({n, c, h, w}, in, tag::nhwc);
  plan->dst = memory::desc({n, o, oh, ow}, in, tag::nhwc);
  plan->wei_user = memory::desc({o, c, kh, kw}, in, tag::hwio);
  plan->src_out = memory::desc({n, c, h, w}, out, tag::nhwc);
  plan->dst_out = memory::desc({n, o, oh, ow}, out, tag::nhwc);
  plan->wei_f32 = memory::desc({o, c, kh, kw}, dt::f32, tag::hwio);
  memory::desc wei_any({o, c, kh, kw}, in, tag::any);
  memory::desc diff_wei_any({o, c, kh, kw}, dt::f32, tag::any);
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

// The plan `make` builds for `k`, built once per process (one cache per plan type).
template <typename P>
std::shared_ptr<P> Cached(const Key& k, std::shared_ptr<P> (*make)(const Key&)) {
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<P>> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(k);
  if (it != plans.end()) return it->second;
  auto plan = make(k);
  plans.emplace(k, plan);
  return plan;
}

std::shared_ptr<Plan> GetPlan(const Key& k) { return Cached(k, MakePlan); }

Key MakeKey(ffi::Span<const int64_t> x, ffi::Span<const int64_t> wt,
            ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
            int64_t pb, int64_t pl, int64_t pr, int64_t types) {
  return Key{x[0], x[1], x[2], x[3], wt[0], wt[1], wt[3], y[1],
             y[2], sh,   sw,   pt,   pb,    pl,    pr,    types};
}

bool Supported(ffi::DataType a, ffi::DataType b) {
  return a == b && (a == ffi::DataType::F32 || a == ffi::DataType::BF16);
}

// The Key's types for inputs of type `in` and an activation output of type `out`; -1 where
// oneDNN has no such convolution (a bfloat16 output needs bfloat16 inputs).
int64_t Types(ffi::DataType in, ffi::DataType out) {
  if (in == ffi::DataType::F32) return out == ffi::DataType::F32 ? kF32 : -1;
  if (in != ffi::DataType::BF16) return -1;
  if (out == ffi::DataType::F32) return kBf16In;
  return out == ffi::DataType::BF16 ? kBf16InOut : -1;
}

ffi::Error Unsupported() {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "springfield oneDNN convolution: inputs must both be float32 or bfloat16, "
                    "and a bfloat16 result needs bfloat16 inputs");
}

// A buffer of at least `bytes`, 64-byte aligned, kept per thread and reused: a fresh
// scratchpad each call would map (and page-fault) fresh memory on every call. (What that
// saves was within the run-to-run spread where it was measured; docs/performance.md.)
// Slot 0 holds scratchpads; the matmul's bfloat16 copies of float32 operands use 1 and 2.
void* ScratchBytes(size_t bytes, int slot = 0) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  static thread_local std::unique_ptr<void, Free> bufs[3];
  static thread_local size_t sizes[3] = {0, 0, 0};
  if (sizes[slot] < bytes) {
    sizes[slot] = (bytes + 4095) / 4096 * 4096;
    bufs[slot].reset(std::aligned_alloc(64, sizes[slot]));
  }
  return bufs[slot].get();
}

// Runs `prim` with `args` and a scratchpad (calls run one at a time, see Guard).
void Run(dnnl::primitive& prim, const memory::desc& scratch_md,
         std::unordered_map<int, memory> args) {
  dnnl::stream stream(Engine());
  args.emplace(DNNL_ARG_SCRATCHPAD,
               memory(scratch_md, Engine(), ScratchBytes(scratch_md.get_size())));
  prim.execute(stream, args);
  stream.wait();
}

// A memory object over the user's HWIO weights, reordered to `want` if that differs.
memory WeightsIn(const memory::desc& have, const memory::desc& want, void* data) {
  memory user(have, Engine(), data);
  if (want == have) return user;
  memory mine(want, Engine());
  dnnl::stream stream(Engine());
  dnnl::reorder(user, mine).execute(stream, user, mine);
  stream.wait();
  return mine;
}

// Runs a weight-gradient primitive (other arguments in `args`) so that float32 HWIO weight
// gradients land at `out`, going through oneDNN's preferred layout where it differs.
void RunWeightGrad(dnnl::primitive& prim,
                   const dnnl::convolution_backward_weights::primitive_desc& pd,
                   const memory::desc& wei_f32, void* out,
                   std::unordered_map<int, memory> args) {
  memory user(wei_f32, Engine(), out);
  const auto want = pd.diff_weights_desc();
  memory diff_wei = want == wei_f32 ? user : memory(want, Engine());
  args.emplace(DNNL_ARG_DIFF_WEIGHTS, diff_wei);
  Run(prim, pd.scratchpad_desc(), std::move(args));
  if (!(want == wei_f32)) {
    dnnl::stream stream(Engine());
    dnnl::reorder(diff_wei, user).execute(stream, diff_wei, user);
    stream.wait();
  }
}

// Every handler runs under one lock. XLA runs independent thunks side by side, and each
// oneDNN call (and each pooling pass) already spreads over every core with OpenMP: two at
// once put twice as many spinning threads as cores on the machine, and a weight gradient
// that takes 3 ms alone took 176 ms beside another (resnet, bfloat16, 2 cores).
std::mutex& CallLock() { return SpringfieldCallLock(); }

ffi::Error Guard(const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(CallLock());
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr) {
  const int64_t types = Types(x.element_type(), y->element_type());
  if (!Supported(x.element_type(), w.element_type()) || types < 0) return Unsupported();
  return Guard([&] {
    auto p = GetPlan(MakeKey(x.dimensions(), w.dimensions(), y->dimensions(), sh,
                             sw, pt, pb, pl, pr, types));
    memory src(p->src, Engine(), x.untyped_data());
    memory dst(p->dst_out, Engine(), y->untyped_data());
    memory wei = WeightsIn(p->wei_user, p->fwd_pd.weights_desc(), w.untyped_data());
    Run(p->fwd, p->fwd_pd.scratchpad_desc(),
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  });
}

ffi::Error ConvBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w,
                            ffi::Result<ffi::AnyBuffer> dx, int64_t sh, int64_t sw,
                            int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  const int64_t types = Types(dy.element_type(), dx->element_type());
  if (!Supported(dy.element_type(), w.element_type()) || types < 0) return Unsupported();
  return Guard([&] {
    auto p = GetPlan(MakeKey(dx->dimensions(), w.dimensions(), dy.dimensions(), sh,
                             sw, pt, pb, pl, pr, types));
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
                               int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (!Supported(x.element_type(), dy.element_type())) return Unsupported();
  return Guard([&] {
    auto p = GetPlan(MakeKey(x.dimensions(), dw->dimensions(), dy.dimensions(), sh,
                             sw, pt, pb, pl, pr, Types(x.element_type(), ffi::DataType::F32)));
    memory src(p->src, Engine(), x.untyped_data());
    memory diff_dst(p->dst, Engine(), dy.untyped_data());
    RunWeightGrad(p->bwd_weights, p->bwd_weights_pd, p->wei_f32, dw->untyped_data(),
                  {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}});
  });
}


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

// Whether the AVX-512 versions of the passes below run (SPRINGFIELD_KERNELS_AVX512=0 keeps
// the portable ones, which the tests check against the same references).
bool Avx512() {
  const char* env = std::getenv("SPRINGFIELD_KERNELS_AVX512");
  return __builtin_cpu_supports("avx512f") && !(env != nullptr && std::string(env) == "0");
}

inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (activations are finite)
  return static_cast<uint16_t>(u >> 16);
}

// The same rounding, 16 at a time: the scalar loop does not vectorise (no 32->16-bit
// narrowing below AVX-512), and at ~1 ns an element it took 2x the memory pass it sits in.
__attribute__((target("avx512f"))) void ToBf16Avx512(const float* in, uint16_t* out,
                                                     int64_t n) {
  const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i u = _mm512_castps_si512(_mm512_loadu_ps(in + i));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    u = _mm512_add_epi32(u, _mm512_add_epi32(round, odd));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
  }
  for (; i < n; ++i) out[i] = ToBf16(in[i]);
}

void ToBf16Row(const float* in, uint16_t* out, int64_t n) {
  static const bool avx512 = Avx512();
  if (avx512) {
    ToBf16Avx512(in, out, n);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = ToBf16(in[i]);
  }
}

void FromBf16Row(const uint16_t* in, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(in[i]) << 16;
    std::memcpy(out + i, &u, 4);
  }
}

// A per-thread float row for the passes that read or write bfloat16: they compute in
// float32 there and convert the row at once.
float* RowScratch(int64_t count, int which) {
  static thread_local std::vector<float> rows[3];
  if (static_cast<int64_t>(rows[which].size()) < count) rows[which].resize(count);
  return rows[which].data();
}

// ReLU's mask keeps one bit per element of the convolution's output (bit e % 8 of byte
// e / 8 of the flat index e; `c` a multiple of 8): a byte each was the largest array the
// block wrote and read back (67 MB at 128 px for the first block), and memory, not
// arithmetic, bounds these passes. Each pass below has a portable version for `n` (or `c`)
// a multiple of 8 and an AVX-512 one that does 16 at a time and leaves the rest to it.
void MaskBytes(const float* row, uint8_t* m, int64_t n) {
  for (int64_t e = 0; e < n; e += 8) {
    uint8_t bits = 0;
    for (int k = 0; k < 8; ++k) bits |= static_cast<uint8_t>(row[e + k] > 0.f) << k;
    m[e / 8] = bits;
  }
}

__attribute__((target("avx512f"))) void MaskBytesAvx512(const float* row, uint8_t* m,
                                                        int64_t n) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    const uint16_t bits = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + e), _mm512_setzero_ps(),
                                             _CMP_GT_OQ);
    std::memcpy(m + e / 8, &bits, 2);
  }
  MaskBytes(row + e, m + e / 8, n - e);
}

void MaskRow(const float* row, uint8_t* m, int64_t n) {
  static const bool avx512 = Avx512();
  (avx512 ? MaskBytesAvx512 : MaskBytes)(row, m, n);
}

// Each mask byte as 8 lanes of all-ones or zero bits: an AND per element, which compilers
// vectorise (a select by bit, not a branch: the mask is as random as the activations).
const uint32_t* ByteLanes() {
  static const std::vector<uint32_t> lanes = [] {
    std::vector<uint32_t> t(256 * 8);
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 8; ++k) t[b * 8 + k] = (b >> k) & 1 ? 0xFFFFFFFFu : 0u;
    }
    return t;
  }();
  return lanes.data();
}

// One output column's `c` channels: o[ch] = g[ch] / 4 where bit ch of `m` is set, else 0.
void UnpoolLanes(const float* g, const uint8_t* m, float* o, int64_t c) {
  const uint32_t* table = ByteLanes();
  for (int64_t ch = 0; ch < c; ch += 8) {
    const uint32_t* lanes = table + 8 * m[ch / 8];
    for (int k = 0; k < 8; ++k) {
      float v = 0.25f * g[ch + k];
      uint32_t u;
      std::memcpy(&u, &v, 4);
      u &= lanes[k];
      std::memcpy(o + ch + k, &u, 4);
    }
  }
}

__attribute__((target("avx512f"))) void UnpoolLanesAvx512(const float* g, const uint8_t* m,
                                                          float* o, int64_t c) {
  const __m512 quarter = _mm512_set1_ps(0.25f);
  int64_t ch = 0;
  for (; ch + 16 <= c; ch += 16) {
    uint16_t bits;
    std::memcpy(&bits, m + ch / 8, 2);
    _mm512_storeu_ps(o + ch, _mm512_maskz_mul_ps(bits, _mm512_loadu_ps(g + ch), quarter));
  }
  UnpoolLanes(g + ch, m + ch / 8, o + ch, c - ch);
}

// One row of the convolution output's gradient: out[j, ch] = g[j / 2, ch] / 4 where the
// mask bit of element j * c + ch is set, else 0 (and 0 for a last odd column).
void UnpoolRow(const float* g, const uint8_t* m, float* out, int64_t ow, int64_t pw,
               int64_t c) {
  static const bool avx512 = Avx512();
  const auto lanes = avx512 ? UnpoolLanesAvx512 : UnpoolLanes;
  for (int64_t j = 0; j < ow; ++j) {
    if (j / 2 >= pw) {
      std::fill(out + j * c, out + (j + 1) * c, 0.f);
    } else {
      lanes(g + (j / 2) * c, m + j * c / 8, out + j * c, c);
    }
  }
}

// y[n, i, j, c] = mean of r over the 2x2 window at (2i, 2j); r and y each float32 or (the
// flags) bfloat16; the mask's bits say r > 0 everywhere (rows and columns the floor division
// leaves out get no gradient anyway).
void PoolAndMask(const void* r, bool r_bf16, void* y, bool y_bf16, uint8_t* mask, int64_t n,
                 int64_t oh, int64_t ow, int64_t c) {
  const int64_t ph = oh / 2, pw = ow / 2, pairs = (oh + 1) / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t p = 0; p < pairs; ++p) {
      const float* rows[2];
      for (int64_t t = 0; t < 2 && 2 * p + t < oh; ++t) {
        const int64_t at = (b * oh + 2 * p + t) * ow * c;
        if (r_bf16) {
          float* f = RowScratch(ow * c, 1 + t);
          FromBf16Row(static_cast<const uint16_t*>(r) + at, f, ow * c);
          rows[t] = f;
        } else {
          rows[t] = static_cast<const float*>(r) + at;
        }
        if (mask != nullptr) MaskRow(rows[t], mask + at / 8, ow * c);
      }
      if (p >= ph) continue;  // a last odd row: its mask only
      const int64_t at = (b * ph + p) * pw * c;
      float* out = y_bf16 ? RowScratch(pw * c, 0) : static_cast<float*>(y) + at;
      for (int64_t j = 0; j < pw; ++j) {
        const float* a = rows[0] + 2 * j * c;
        const float* d = rows[1] + 2 * j * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch)
          out[j * c + ch] = 0.25f * (a[ch] + a[c + ch] + d[ch] + d[c + ch]);
      }
      if (y_bf16) ToBf16Row(out, static_cast<uint16_t*>(y) + at, pw * c);
    }
  }
}

// dz[n, i, j, c] = dy[n, i/2, j/2, c] / 4 where the mask's bit is set, else 0; dy and dz
// each float32 or (the flags) bfloat16.
void Unpool(const void* dy, bool dy_bf16, const uint8_t* mask, void* dz, bool dz_bf16,
            int64_t n, int64_t oh, int64_t ow, int64_t c) {
  const int64_t ph = oh / 2, pw = ow / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t i = 0; i < oh; ++i) {
      const int64_t at = (b * oh + i) * ow * c;
      float* out = dz_bf16 ? RowScratch(ow * c, 0) : static_cast<float*>(dz) + at;
      if (i / 2 >= ph) {
        std::fill(out, out + ow * c, 0.f);
      } else {
        const int64_t g_at = (b * ph + i / 2) * pw * c;
        const float* g = static_cast<const float*>(dy) + g_at;
        if (dy_bf16) {
          float* gf = RowScratch(pw * c, 1);
          FromBf16Row(static_cast<const uint16_t*>(dy) + g_at, gf, pw * c);
          g = gf;
        }
        UnpoolRow(g, mask + at / 8, out, ow, pw, c);
      }
      if (dz_bf16) ToBf16Row(out, static_cast<uint16_t*>(dz) + at, ow * c);
    }
  }
}

// Images per chunk: the block runs a few images at a time so that the convolution's
// output (and, backwards, its gradient) stays in cache between oneDNN and the pooling pass
// instead of making a round trip through memory (at 128 px, 268 MB for the first layer).
int64_t ChunkImages(int64_t n, int64_t per_image_bytes) {
  static const int64_t budget = [] {
    const char* env = std::getenv("SPRINGFIELD_BLOCK_CHUNK_KB");
    return (env != nullptr ? std::atoll(env) : 4096) * 1024;
  }();
  return std::max<int64_t>(1, std::min<int64_t>(n, budget / std::max<int64_t>(1, per_image_bytes)));
}

Key WithBatch(Key k, int64_t n) {
  k[0] = n;
  return k;
}

bool IsBf16(ffi::DataType t) { return t == ffi::DataType::BF16; }

bool Activation(ffi::DataType t) { return t == ffi::DataType::F32 || IsBf16(t); }

// The pooled output `y` is float32 or bfloat16 (bfloat16 activations), whatever the inputs.
void BlockForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b,
                      ffi::AnyBuffer y, uint8_t* mask, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  Key k = BlockKey(x.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr, x.element_type());
  const int64_t n = k[0], h = k[1], wd = k[2], c = k[3], o = k[6], oh = k[7], ow = k[8];
  const int64_t in_bytes = k[15] ? 2 : 4;
  // Bfloat16 inputs and output: the convolution writes its output in bfloat16 too (as
  // autocast does), so twice the images fit a chunk and the pooling reads half the bytes.
  const bool y_bf16 = IsBf16(y.element_type());
  const bool r_bf16 = k[15] && y_bf16;
  if (r_bf16) k[15] = 2;
  const int64_t chunk = ChunkImages(n, oh * ow * o * (r_bf16 ? 2 : 4));
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
                        int64_t pr) {
  if (!Supported(x.element_type(), w.element_type()) || !Activation(y->element_type())) {
    return Unsupported();
  }
  return Guard([&] {
    BlockForwardImpl(x, w, b, *y, mask->typed_data(), sh, sw, pt, pb, pl, pr);
  });
}

ffi::Error BlockInfer(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b,
                      ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  if (!Supported(x.element_type(), w.element_type()) || !Activation(y->element_type())) {
    return Unsupported();
  }
  return Guard([&] {
    BlockForwardImpl(x, w, b, *y, nullptr, sh, sw, pt, pb, pl, pr);
  });
}

// From the pooled output's gradient, the block's weight and bias gradients. With `dz_out`,
// the convolution output's gradient goes there (the whole batch, for the input-gradient
// convolution that follows). Without (the first block: nobody wants the image's gradient),
// it is made chunk by chunk in cache and consumed at once, and the chunks' gradients summed.
// `dy` is float32 or bfloat16; the convolution output's gradient is in the inputs' type.
void BlockWeightGrad(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::U8> mask,
                     void* dz_out, float* dw, float* db, const Key& k) {
  const int64_t n = k[0], h = k[1], wd = k[2], c = k[3], o = k[6], oh = k[7], ow = k[8];
  const bool bf16 = k[15];
  const int64_t in_bytes = bf16 ? 2 : 4;
  const int64_t chunk = dz_out != nullptr ? n : ChunkImages(n, oh * ow * o * in_bytes);
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
                         int64_t pr) {
  if (!Supported(x.element_type(), dz->element_type()) || !Activation(dy.element_type())) {
    return Unsupported();
  }
  return Guard([&] {
    BlockWeightGrad(x, dy, mask, dz->untyped_data(), dw->typed_data(), db->typed_data(),
                    BlockKey(x.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr,
                             x.element_type()));
  });
}

ffi::Error BlockBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                ffi::Buffer<ffi::U8> mask, ffi::ResultBuffer<ffi::F32> dw,
                                ffi::ResultBuffer<ffi::F32> db, int64_t sh, int64_t sw,
                                int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (!Supported(x.element_type(), x.element_type()) || !Activation(dy.element_type())) {
    return Unsupported();
  }
  return Guard([&] {
    BlockWeightGrad(x, dy, mask, nullptr, dw->typed_data(), db->typed_data(),
                    BlockKey(x.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr,
                             x.element_type()));
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


// ---- matrix products for dense layers ------------------------------------------------------
//
// Under `--precision bfloat16` the convolutions multiply in bfloat16 but a dense layer under
// XLA:CPU stays float32 (and a bfloat16 dot there is slower still: XLA converts around the
// products). `refcnn`'s 8192 x 256 layer is then three float32 products a step (forward,
// input and weight gradient) at about 200 GFLOP/s, where oneDNN's bfloat16 matmul (the one
// PyTorch's autocast and TensorFlow's mixed_bfloat16 reach) does them faster.
//
// out[M, N] = op(a) @ op(b), op(x) = x or its transpose (`trans_a`, `trans_b`, read in place
// through strides: no copy), accumulated in float32. With `bf16` the products are bfloat16:
// a float32 operand is rounded to bfloat16 (to nearest even, as XLA's convert does) into a
// buffer first, here rather than by XLA, whose float32 -> bfloat16 convert of the 8192 x 256
// weights took 0.7-1.0 ms a step (oneDNN's reorder is vectorised). Without `bf16` both are
// float32. `out` is float32, or bfloat16 with `bf16`.

struct MatmulPlan {
  memory::desc a, b, out, a_user, b_user;
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul prim;
  // Float32 -> bfloat16 roundings of a float32 operand under bfloat16 products.
  std::unique_ptr<dnnl::reorder> round_a, round_b;
};

// Key: m, k, n, trans_a, trans_b, bfloat16 products, a is float32, b is float32, bfloat16
// output (the rest zero).
std::shared_ptr<MatmulPlan> MakeMatmulPlan(const Key& key) {
  const int64_t m = key[0], k = key[1], n = key[2], ta = key[3], tb = key[4];
  const dt math = key[5] ? dt::bf16 : dt::f32;
  auto plan = std::make_shared<MatmulPlan>();
  // A transposed operand is the stored matrix read column-major: format "ba".
  plan->a = memory::desc({m, k}, math, ta ? tag::ba : tag::ab);
  plan->b = memory::desc({k, n}, math, tb ? tag::ba : tag::ab);
  plan->a_user = memory::desc({m, k}, key[6] ? dt::f32 : dt::bf16, ta ? tag::ba : tag::ab);
  plan->b_user = memory::desc({k, n}, key[7] ? dt::f32 : dt::bf16, tb ? tag::ba : tag::ab);
  plan->out = memory::desc({m, n}, key[8] ? dt::bf16 : dt::f32, tag::ab);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  plan->pd = dnnl::matmul::primitive_desc(Engine(), plan->a, plan->b, plan->out, attr);
  plan->prim = dnnl::matmul(plan->pd);
  if (!(plan->a_user == plan->a)) {
    plan->round_a = std::make_unique<dnnl::reorder>(
        dnnl::reorder::primitive_desc(Engine(), plan->a_user, Engine(), plan->a));
  }
  if (!(plan->b_user == plan->b)) {
    plan->round_b = std::make_unique<dnnl::reorder>(
        dnnl::reorder::primitive_desc(Engine(), plan->b_user, Engine(), plan->b));
  }
  return plan;
}

// `data` as the plan's operand `want`: itself, or its bfloat16 rounding in buffer `slot`.
memory Operand(const memory::desc& have, const memory::desc& want, dnnl::reorder* round,
               void* data, int slot) {
  memory user(have, Engine(), data);
  if (round == nullptr) return user;
  memory mine(want, Engine(), ScratchBytes(want.get_size(), slot));
  dnnl::stream stream(Engine());
  round->execute(stream, user, mine);
  stream.wait();
  return mine;
}

ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                  int64_t trans_a, int64_t trans_b, int64_t bf16) {
  const auto ta = a.element_type(), tb = b.element_type(), to = out->element_type();
  const bool ok = Activation(ta) && Activation(tb) && Activation(to) &&
                  (bf16 || (ta == ffi::DataType::F32 && tb == ta && to == ta));
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (!ok || ad.size() != 2 || bd.size() != 2 || od.size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "springfield oneDNN matmul: 2-D float32 or bfloat16 arrays, bfloat16 "
                      "ones only with bfloat16 products");
  }
  const int64_t m = od[0], n = od[1];
  const int64_t k = trans_a ? ad[0] : ad[1];
  if ((trans_a ? ad[1] : ad[0]) != m || (trans_b ? bd[1] : bd[0]) != k ||
      (trans_b ? bd[0] : bd[1]) != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "springfield oneDNN matmul: shapes do not match");
  }
  const Key key{m, k, n, trans_a, trans_b, bf16 != 0, !IsBf16(ta), !IsBf16(tb), IsBf16(to)};
  return Guard([&] {
    auto p = Cached(key, MakeMatmulPlan);
    memory am = Operand(p->a_user, p->a, p->round_a.get(), a.untyped_data(), 1);
    memory bm = Operand(p->b_user, p->b, p->round_b.get(), b.untyped_data(), 2);
    memory om(p->out, Engine(), out->untyped_data());
    Run(p->prim, p->pd.scratchpad_desc(),
        {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, om}});
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBlockForward, BlockForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>() SPRINGFIELD_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBlockInfer, BlockInfer,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>() SPRINGFIELD_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBlockBackward, BlockBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPRINGFIELD_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldConvBlockBackwardWeights, BlockBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() SPRINGFIELD_CONV_ATTRS);

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b")
                                  .Attr<int64_t>("bf16"));
