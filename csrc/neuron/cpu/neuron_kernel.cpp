// CPU implementations of the neuron operators. The forward and both backwards
// run blocks of kCpuBlock consecutive neurons through all T steps with
// at::parallel_for over blocks: the same element functions the CUDA kernels
// run, with the block as their lane count, so the lane loop over neurons is the
// vectorisable inner loop and the T loop stays inside.
#include "../neuron_dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

namespace fastspike {
namespace {

// 64 lanes: wide enough for SIMD, small enough that the per-lane state stays
// in L1 next to the rows being streamed (measured: 256 was no faster).
constexpr int kCpuBlock = 64;

// Grain in units of `unit` neurons such that one task does >= ~32k steps.
int64_t grain_for(int64_t time_steps, int64_t unit) {
  const int64_t steps = std::max<int64_t>(time_steps, 1);
  return std::max<int64_t>(1, (32768 / steps + unit - 1) / unit);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTSPIKE_HAVE_X86_PATHS 1
// `blocks(begin, end)` compiled for AVX2 (8 float lanes instead of SSE2's 4)
// and for AVX-512 (16 lanes; 512-bit vectors preferred, as GCC's generic
// tuning would otherwise keep to 256): flatten inlines the lambda and the whole
// neuron math under it into one function, so all of it is compiled for that
// instruction set. No FMA is used (-ffp-contract=off keeps a*b+c two roundings
// even where the instruction set has FMA), so every result stays bit-identical
// to the baseline path; only the vector width changes.
template <typename Blocks>
__attribute__((target("avx2"), flatten)) void run_blocks_avx2(const Blocks& blocks, int64_t begin,
                                                              int64_t end) {
  blocks(begin, end);
}

template <typename Blocks>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512"), flatten))
void run_blocks_avx512(const Blocks& blocks, int64_t begin, int64_t end) {
  blocks(begin, end);
}
#endif

// Which build of the lane loops runs: the widest the CPU has that ATen's own
// choice allows (ATEN_CPU_CAPABILITY=avx2 or =default caps it, e.g. to test the
// narrower paths on a wider machine). backend_info()["cpu_kernels"] mirrors it.
enum class LaneBuild { kBaseline, kAvx2, kAvx512 };

LaneBuild lane_build() {
#ifdef FASTSPIKE_HAVE_X86_PATHS
  // Decided once, as ATen decides its own capability once per process.
  static const LaneBuild build = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      return LaneBuild::kAvx512;
    }
    if (capability != "DEFAULT" && __builtin_cpu_supports("avx2")) return LaneBuild::kAvx2;
    return LaneBuild::kBaseline;
  }();
  return build;
#else
  return LaneBuild::kBaseline;
#endif
}

// The forward writes its spike rows with non-temporal stores (stream_row in
// host_memory.h) once the output outgrows the caches. Measured on the
// development EPYC (32 MB L3), float32 IF, T = 8, 2 threads: 1.2-1.6x slower
// for an 8 MB output, which stays in cache for its reader; 1.4-1.6x faster
// from 16 MB up, where the plain stores' read-for-ownership traffic dominates.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

template <typename scalar_t, typename acc_t>
bool stream_spikes(const ForwardArgs<scalar_t, acc_t>& a) {
  const int64_t row_bytes = a.neurons * static_cast<int64_t>(sizeof(scalar_t));
  // Rows of a full block then start on 16-byte boundaries (blocks are 64 lanes).
  const bool aligned = reinterpret_cast<uintptr_t>(a.spikes) % 16 == 0 && row_bytes % 16 == 0;
  return a.spikes != nullptr && aligned && a.time_steps * row_bytes >= kStreamingBytes;
}

// Runs element(lanes, index) over all neurons: the full blocks of kCpuBlock
// lanes in parallel (in the build lane_build() picks), then the
// neurons that do not fill a block one at a time. `lanes` is a
// std::integral_constant, so each call site picks its element function's
// lane count at compile time.
template <typename Element>
void for_each_block(int64_t neurons, int64_t time_steps, const Element& element) {
  const int64_t full_blocks = neurons / kCpuBlock;
  const auto blocks = [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) element(std::integral_constant<int, kCpuBlock>(), b);
  };
  const LaneBuild build = lane_build();
  at::parallel_for(0, full_blocks, grain_for(time_steps, kCpuBlock), [&](int64_t begin, int64_t end) {
#ifdef FASTSPIKE_HAVE_X86_PATHS
    switch (build) {
      case LaneBuild::kAvx512:
        run_blocks_avx512(blocks, begin, end);
        break;
      case LaneBuild::kAvx2:
        run_blocks_avx2(blocks, begin, end);
        break;
      case LaneBuild::kBaseline:
        blocks(begin, end);
        break;
    }
#else
    (void)build;
    blocks(begin, end);
#endif
#ifdef FASTSPIKE_HAVE_STREAMING_STORES
    // Streamed stores are weakly ordered: make them visible before the task
    // reports done, so whoever reads the output after parallel_for sees them.
    _mm_sfence();
#endif
  });
  for (int64_t n = full_blocks * kCpuBlock; n < neurons; ++n) {
    element(std::integral_constant<int, 1>(), n);
  }
}

void run_forward_cpu(const ForwardPlan& plan, const ForwardOutputs& out, int64_t group_size,
                     bool is_signed, double init_fraction, double neg_margin) {
  FASTSPIKE_DISPATCH_FLOATS(plan.x.scalar_type(), "neuron_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto args =
        make_forward_args<scalar_t, acc_t>(plan, out, group_size, init_fraction, neg_margin);
    args.stream_spikes = stream_spikes(args);
    FASTSPIKE_DISPATCH_NEURON(is_signed, group_size, [&] {
      for_each_block(plan.neurons, plan.time_steps, [&](auto lanes, int64_t index) {
        forward_element<scalar_t, acc_t, kSigned, kGroup, decltype(lanes)::value>(index, args);
      });
    });
  });
}

void run_backward_surrogate_cpu(const SurrogateBackwardPlan& plan, const at::Tensor& grad_x,
                                const at::Tensor& grad_v_init, int64_t group_size,
                                bool is_signed, double neg_margin, double alpha) {
  FASTSPIKE_DISPATCH_FLOATS(plan.grad_spikes.scalar_type(), "neuron_backward_surrogate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = make_surrogate_backward_args<scalar_t, acc_t>(plan, grad_x, grad_v_init,
                                                                    group_size, neg_margin, alpha);
    FASTSPIKE_DISPATCH_NEURON(is_signed, group_size, [&] {
      for_each_block(plan.neurons, plan.time_steps, [&](auto lanes, int64_t index) {
        surrogate_backward_element<scalar_t, acc_t, kSigned, kGroup, decltype(lanes)::value>(
            index, args);
      });
    });
  });
}

void run_backward_rate_cpu(const RateBackwardPlan& plan, const at::Tensor& grad_x) {
  FASTSPIKE_DISPATCH_FLOATS(plan.grad_spikes.scalar_type(), "neuron_backward_rate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = make_rate_backward_args<scalar_t, acc_t>(plan, grad_x);
    for_each_block(plan.neurons, plan.time_steps, [&](auto lanes, int64_t index) {
      rate_backward_element<scalar_t, acc_t, decltype(lanes)::value>(index, args);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastspike, CPU, m) {
  m.impl("neuron_forward", &neuron_forward_op<run_forward_cpu>);
  m.impl("neuron_forward.out", &neuron_forward_out_op<run_forward_cpu>);
  m.impl("neuron_backward_surrogate", &neuron_backward_surrogate_op<run_backward_surrogate_cpu>);
  m.impl("neuron_backward_rate", &neuron_backward_rate_op<run_backward_rate_cpu>);
}

}  // namespace fastspike
