// What the oneDNN kernels of springfield share (compiled together: conv.cc, block.cc,
// pool.cc, norm.cc, matmul.cc, adam.cc and common.cc, into one library).
//
// 2-D convolutions (NHWC activations, HWIO weights) run by oneDNN, exposed to XLA as typed
// FFI handlers. XLA:CPU's own convolution kernels reach about 60% of GEMM speed on the
// machines springfield is measured on; oneDNN's JIT kernels reach ~100%, and twice that with
// bfloat16 inputs on CPUs with AVX512_BF16. Inputs are float32 or bfloat16 (all of one
// call's alike); accumulation and weight gradients are always float32, and the activations
// a single convolution writes (its output, its input's gradient) are float32 or, from
// bfloat16 inputs, bfloat16 where the caller asks for them so.
//
// Besides single convolutions (conv.cc), whole conv -> bias -> ReLU -> 2x2 average-pool
// blocks (the reference CNN's and `seed`'s) run as one call each way (block.cc, pool.cc);
// BatchNorm (norm.cc), the matrix products of dense layers (matmul.cc) and the fused Adam
// update (adam.cc), too.
//
// One plan (primitive descriptors, primitives, weight reorders) is built per geometry
// and cached for the life of the process. Calls run one at a time (each uses every core),
// so a scratchpad kept per thread serves them all.
#pragma once

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

// The lock every handler of the library runs under (see Guard); adam.cc's too.
std::mutex& SpringfieldCallLock();

namespace springfield {

dnnl::engine& Engine();

// n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, types: 0 float32 throughout,
// 1 bfloat16 inputs with float32 outputs, 2 bfloat16 inputs and activation outputs (a
// single convolution's output and its input's gradient; weight gradients stay float32).
using Key = std::array<int64_t, 16>;
constexpr int64_t kF32 = 0, kBf16In = 1, kBf16InOut = 2;

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

inline bool Supported(ffi::DataType a, ffi::DataType b) {
  return a == b && (a == ffi::DataType::F32 || a == ffi::DataType::BF16);
}

// The Key's types for inputs of type `in` and an activation output of type `out`; -1 where
// oneDNN has no such convolution (a bfloat16 output needs bfloat16 inputs).
inline int64_t Types(ffi::DataType in, ffi::DataType out) {
  if (in == ffi::DataType::F32) return out == ffi::DataType::F32 ? kF32 : -1;
  if (in != ffi::DataType::BF16) return -1;
  if (out == ffi::DataType::F32) return kBf16In;
  return out == ffi::DataType::BF16 ? kBf16InOut : -1;
}

inline ffi::Error Unsupported() {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "springfield oneDNN convolution: inputs must both be float32 or bfloat16, "
                    "and a bfloat16 result needs bfloat16 inputs");
}

inline bool IsBf16(ffi::DataType t) { return t == ffi::DataType::BF16; }

inline bool Activation(ffi::DataType t) { return t == ffi::DataType::F32 || IsBf16(t); }

// A buffer of at least `bytes`, 64-byte aligned, kept per thread and reused: a fresh
// scratchpad each call would map (and page-fault) fresh memory on every call. (What that
// saves was within the run-to-run spread where it was measured; docs/performance.md.)
// Slot 0 holds scratchpads; the matmul's bfloat16 copies of float32 operands use 1 and 2.
void* ScratchBytes(size_t bytes, int slot = 0);

// Runs `prim` with `args` and a scratchpad (calls run one at a time, see Guard).
void Run(dnnl::primitive& prim, const memory::desc& scratch_md,
         std::unordered_map<int, memory> args);

// A memory object over the user's HWIO weights, reordered to `want` if that differs.
memory WeightsIn(const memory::desc& have, const memory::desc& want, void* data);

// Runs a weight-gradient primitive (other arguments in `args`) so that float32 HWIO weight
// gradients land at `out`, going through oneDNN's preferred layout where it differs.
void RunWeightGrad(dnnl::primitive& prim,
                   const dnnl::convolution_backward_weights::primitive_desc& pd,
                   const memory::desc& wei_f32, void* out,
                   std::unordered_map<int, memory> args);

// float32 to bfloat16, rounded to nearest even (activations are finite).
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Whether springfield's own AVX-512 loops may run: the CPU has AVX-512 (F, BW, VL) and
// SPRINGFIELD_KERNELS_AVX512 is not "0" (which the tests set to check the other paths).
bool OwnAvx512();

// Runs `body` under the library's lock, turning oneDNN's exceptions into FFI errors.
ffi::Error Guard(const std::function<void()>& body);

// pool.cc: the block's passes over the convolution's output (see block.cc).
void PoolAndMask(const void* r, bool r_bf16, void* y, bool y_bf16, uint8_t* mask, int64_t n,
                 int64_t oh, int64_t ow, int64_t c);
void Unpool(const void* dy, bool dy_bf16, const uint8_t* mask, void* dz, bool dz_bf16,
            int64_t n, int64_t oh, int64_t ow, int64_t c);

}  // namespace springfield
