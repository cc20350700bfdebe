#include "common.h"

using namespace springfield;

namespace {

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpringfieldMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b")
                                  .Attr<int64_t>("bf16"));
