// Host-side glue shared by the CPU kernels, the CUDA launchers and the CPU
// emulation of the CUDA grid: compile-time dispatch of the neuron variants,
// the launch rules, and filling the kernel argument structs from tensors.
#pragma once

#include "neuron.h"
#include "neuron_elements.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

// Runtime choices (signed or not, group size 1 or general) become template
// parameters, so the inner loops carry no branch on them (as pytorch_scatter
// does for its reductions). Inside the body, kSigned and kGroup are constexpr.
#define FASTSPIKE_DISPATCH_NEURON(IS_SIGNED, GROUP_SIZE, ...) \
  [&] {                                                       \
    if (IS_SIGNED) {                                          \
      constexpr bool kSigned = true;                          \
      if ((GROUP_SIZE) == 1) {                                \
        constexpr int kGroup = 1;                             \
        return __VA_ARGS__();                                 \
      }                                                       \
      constexpr int kGroup = 0;                               \
      return __VA_ARGS__();                                   \
    }                                                         \
    constexpr bool kSigned = false;                           \
    if ((GROUP_SIZE) == 1) {                                  \
      constexpr int kGroup = 1;                               \
      return __VA_ARGS__();                                   \
    }                                                         \
    constexpr int kGroup = 0;                                 \
    return __VA_ARGS__();                                     \
  }()

#define FASTSPIKE_DISPATCH_FLOATS(DTYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, DTYPE, NAME, __VA_ARGS__)

namespace fastspike {

// ---------------------------------------------------------------------------
// Launch rules of the CUDA kernels, kept here (not in the .cu) so the CPU
// emulation walks exactly the grid a GPU would run.
constexpr int kThreadsPerBlock = 256;
constexpr int kForwardVectorWidth = 4;

inline int64_t blocks_for(int64_t work_items, int64_t threads, int64_t max_blocks) {
  const int64_t needed = (work_items + threads - 1) / threads;
  return std::max<int64_t>(1, std::min(needed, max_blocks));
}

// The forward kernel loads kForwardVectorWidth neurons per access when every
// row of x, residual and the spike output starts on such a boundary;
// otherwise one at a time.
template <typename scalar_t, typename acc_t>
int forward_vector_width(const ForwardArgs<scalar_t, acc_t>& a) {
  constexpr int kWidth = kForwardVectorWidth;
  const auto aligned = [](const void* p, uintptr_t align) {
    return reinterpret_cast<uintptr_t>(p) % align == 0;  // nullptr counts as aligned
  };
  constexpr uintptr_t kAlign = alignof(Pack<scalar_t, kWidth>);
  const bool all_aligned = aligned(a.x, kAlign) && aligned(a.residual, kAlign) &&
                           aligned(a.spikes, kAlign) &&
                           aligned(a.spike_counts, alignof(Pack<int8_t, kWidth>));
  return (a.neurons % kWidth == 0 && all_aligned) ? kWidth : 1;
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename scalar_t, typename acc_t>
ForwardArgs<scalar_t, acc_t> make_forward_args(const ForwardPlan& plan, const ForwardOutputs& out,
                                               int64_t group_size, double init_fraction,
                                               double neg_margin) {
  ForwardArgs<scalar_t, acc_t> a;
  a.x = plan.x.data_ptr<scalar_t>();
  a.spikes = plan.compact ? nullptr : out.spikes.data_ptr<scalar_t>();
  a.spike_counts = plan.compact ? out.spikes.data_ptr<int8_t>() : nullptr;
  a.residual = data_or_null<scalar_t>(plan.residual);
  a.x_constant = plan.x_constant;
  a.residual_constant = plan.residual_constant;
  a.stream_spikes = false;  // the CPU launcher decides (see stream_spikes in cpu/)
  a.threshold = plan.threshold.values.data_ptr<acc_t>();
  a.threshold_inner = plan.threshold.inner;
  a.threshold_size = plan.threshold.size;
  a.v_init = data_or_null<acc_t>(plan.v_init);
  a.count_init = data_or_null<int32_t>(plan.count_init);
  a.v_final = out.v_final.data_ptr<acc_t>();
  a.count_final = out.count_final.data_ptr<int32_t>();
  a.membrane_seq = data_or_null<acc_t>(out.membrane_seq);
  a.negative_open_seq = data_or_null<bool>(out.negative_open_seq);
  a.input_mean = data_or_null<acc_t>(out.input_mean);
  a.time_steps = plan.time_steps;
  a.neurons = plan.neurons;
  a.group_size = static_cast<int>(group_size);
  a.init_fraction = static_cast<acc_t>(init_fraction);
  a.neg_margin = static_cast<acc_t>(neg_margin);
  return a;
}

template <typename scalar_t, typename acc_t>
SurrogateBackwardArgs<scalar_t, acc_t> make_surrogate_backward_args(
    const SurrogateBackwardPlan& plan, const at::Tensor& grad_x, const at::Tensor& grad_v_init,
    int64_t group_size, double neg_margin, double alpha) {
  SurrogateBackwardArgs<scalar_t, acc_t> a;
  a.grad_spikes = plan.grad_spikes.data_ptr<scalar_t>();
  a.grad_v_final = data_or_null<acc_t>(plan.grad_v_final);
  a.membrane_seq = plan.membrane_seq.data_ptr<acc_t>();
  a.negative_open_seq = data_or_null<bool>(plan.negative_open_seq);
  a.threshold = plan.threshold.values.data_ptr<acc_t>();
  a.threshold_inner = plan.threshold.inner;
  a.threshold_size = plan.threshold.size;
  a.grad_x = grad_x.data_ptr<scalar_t>();
  a.grad_v_init = grad_v_init.data_ptr<acc_t>();
  a.time_steps = plan.time_steps;
  a.neurons = plan.neurons;
  a.group_size = static_cast<int>(group_size);
  a.neg_margin = static_cast<acc_t>(neg_margin);
  a.surrogate = plan.surrogate;
  a.alpha = static_cast<acc_t>(alpha);
  return a;
}

template <typename scalar_t, typename acc_t>
RateBackwardArgs<scalar_t, acc_t> make_rate_backward_args(const RateBackwardPlan& plan,
                                                          const at::Tensor& grad_x) {
  RateBackwardArgs<scalar_t, acc_t> a;
  a.grad_spikes = plan.grad_spikes.data_ptr<scalar_t>();
  a.input_mean = plan.input_mean.data_ptr<acc_t>();
  a.threshold = plan.threshold.values.data_ptr<acc_t>();
  a.threshold_inner = plan.threshold.inner;
  a.threshold_size = plan.threshold.size;
  a.grad_x = grad_x.data_ptr<scalar_t>();
  a.time_steps = plan.time_steps;
  a.neurons = plan.neurons;
  return a;
}

}  // namespace fastspike

// ---------------------------------------------------------------------------
// The operator entry points, written once and instantiated per device with
// that device's runner (the part that dispatches on dtype and launches).

namespace fastspike {

using ForwardRunner = void (*)(const ForwardPlan&, const ForwardOutputs&, int64_t group_size,
                               bool is_signed, double init_fraction, double neg_margin);
using SurrogateBackwardRunner = void (*)(const SurrogateBackwardPlan&, const at::Tensor& grad_x,
                                         const at::Tensor& grad_v_init, int64_t group_size,
                                         bool is_signed, double neg_margin, double alpha);
using RateBackwardRunner = void (*)(const RateBackwardPlan&, const at::Tensor& grad_x);

template <ForwardRunner run>
ForwardResult neuron_forward_op(const at::Tensor& x_seq, const at::Tensor& threshold,
                                const c10::optional<at::Tensor>& v_init,
                                const c10::optional<at::Tensor>& count_init, int64_t group_size,
                                bool is_signed, double init_fraction, double neg_margin,
                                c10::string_view grad_mode,
                                const c10::optional<at::Tensor>& residual, bool compact) {
  const ForwardPlan plan = plan_forward(x_seq, threshold, v_init, count_init, group_size,
                                        init_fraction, neg_margin, grad_mode, residual, compact);
  const ForwardOutputs out = allocate_forward_outputs(plan, is_signed, nullptr);
  if (plan.neurons > 0) run(plan, out, group_size, is_signed, init_fraction, neg_margin);
  return out.as_tuple();
}

template <ForwardRunner run>
void neuron_forward_out_op(const at::Tensor& x_seq, const at::Tensor& threshold,
                           const c10::optional<at::Tensor>& v_init,
                           const c10::optional<at::Tensor>& count_init, int64_t group_size,
                           bool is_signed, double init_fraction, double neg_margin,
                           const c10::optional<at::Tensor>& residual, bool compact,
                           at::Tensor& spikes, at::Tensor& v_final, at::Tensor& count_final) {
  const ForwardPlan plan = plan_forward(x_seq, threshold, v_init, count_init, group_size,
                                        init_fraction, neg_margin, "none", residual, compact);
  const ForwardOutBuffers buffers{spikes, v_final, count_final};
  check_forward_out(buffers, x_seq, plan);
  const ForwardOutputs out = allocate_forward_outputs(plan, is_signed, &buffers);
  if (plan.neurons > 0) run(plan, out, group_size, is_signed, init_fraction, neg_margin);
}

template <SurrogateBackwardRunner run>
std::tuple<at::Tensor, at::Tensor> neuron_backward_surrogate_op(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const at::Tensor& membrane_seq, const at::Tensor& negative_open_seq,
    const at::Tensor& threshold, int64_t group_size, bool is_signed, double neg_margin,
    c10::string_view surrogate, double alpha) {
  const SurrogateBackwardPlan plan =
      plan_surrogate_backward(grad_spikes, grad_v_final, membrane_seq, negative_open_seq,
                              threshold, group_size, is_signed, neg_margin, surrogate, alpha);
  auto [grad_x, grad_v_init] = allocate_surrogate_backward_outputs(plan);
  if (plan.neurons > 0) run(plan, grad_x, grad_v_init, group_size, is_signed, neg_margin, alpha);
  return {grad_x, grad_v_init};
}

template <RateBackwardRunner run>
at::Tensor neuron_backward_rate_op(const at::Tensor& grad_spikes, const at::Tensor& input_mean,
                                   const at::Tensor& threshold) {
  const RateBackwardPlan plan = plan_rate_backward(grad_spikes, input_mean, threshold);
  at::Tensor grad_x = allocate_rate_backward_output(plan);
  if (plan.neurons > 0) run(plan, grad_x);
  return grad_x;
}

}  // namespace fastspike
