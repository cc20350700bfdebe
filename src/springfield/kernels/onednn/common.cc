// What every handler of the library shares: the engine, scratch buffers, running a
// primitive, and the one lock (common.h).
#include "common.h"

// The lock every handler of the library runs under (see CallLock below); adam.cc's too.
std::mutex& SpringfieldCallLock() {
  static std::mutex mu;
  return mu;
}

namespace springfield {

bool OwnAvx512() {
  static const bool yes = [] {
    const char* env = std::getenv("SPRINGFIELD_KERNELS_AVX512");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && !(env != nullptr && std::string(env) == "0");
  }();
  return yes;
}

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A buffer of at least `bytes`, 64-byte aligned, kept per thread and reused: a fresh
// scratchpad each call would map (and page-fault) fresh memory on every call. (What that
// saves was within the run-to-run spread where it was measured; docs/performance.md.)
// Slot 0 holds scratchpads; the matmul's bfloat16 copies of float32 operands use 1 and 2.
void* ScratchBytes(size_t bytes, int slot) {
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


}  // namespace springfield
