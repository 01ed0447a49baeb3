// Host-side pieces of the neuron operators shared by the CPU and CUDA
// wrappers: argument checks, layout resolution and output allocation. Every
// wrapper does the same five things in the same order (check, make
// contiguous, allocate, return early on empty input, dispatch and launch); the
// first three live here so that both devices reject bad input with the same
// message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <vector>

namespace fastspike {

enum class GradMode { kNone, kSurrogate, kRate };

struct ThresholdLayout {
  at::Tensor values;  // contiguous, in the accumulation dtype
  int64_t inner;      // see threshold_index() in neuron_step.h
  int64_t size;
};

struct ForwardPlan {
  // Contiguous [T, ...], or one contiguous step [...] when x_constant (x_seq
  // was a time broadcast, stride 0 along dim 0: it is read T times, never copied).
  at::Tensor x;
  bool x_constant = false;
  c10::optional<at::Tensor> residual;  // same layout rules as x
  bool residual_constant = false;
  bool compact = false;                // spikes are the int8 counts k⁺ − k⁻
  std::vector<int64_t> seq_sizes;      // x_seq.sizes(): [T, ...]
  ThresholdLayout threshold;
  c10::optional<at::Tensor> v_init;      // contiguous, acc dtype
  c10::optional<at::Tensor> count_init;  // contiguous, int32
  int64_t time_steps;
  int64_t neurons;
  at::ScalarType acc_dtype;
  GradMode grad_mode;
};

using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct ForwardOutputs {
  at::Tensor spikes;             // [T, ...], x's dtype (int8 counts when compact)
  at::Tensor v_final;            // [...], acc dtype
  at::Tensor count_final;        // [...], int32
  at::Tensor membrane_seq;       // [T, ...] acc dtype when grad_mode is surrogate, else [0]
  at::Tensor negative_open_seq;  // [T, ...] bool when surrogate and signed, else [0]
  at::Tensor input_mean;         // [...] acc dtype when grad_mode is rate, else [0]

  ForwardResult as_tuple() const {
    return {spikes, v_final, count_final, membrane_seq, negative_open_seq, input_mean};
  }
};

// float32 for float16/bfloat16/float32, float64 for float64 (docs/design.md §2).
at::ScalarType accumulation_dtype(at::ScalarType dtype);

ForwardPlan plan_forward(const at::Tensor& x_seq, const at::Tensor& threshold,
                         const c10::optional<at::Tensor>& v_init,
                         const c10::optional<at::Tensor>& count_init, int64_t group_size,
                         double init_fraction, double neg_margin, c10::string_view grad_mode,
                         const c10::optional<at::Tensor>& residual = c10::nullopt,
                         bool compact = false);

// The caller's buffers of the out= form (neuron_forward.out): spikes and the
// final state, written in place.
struct ForwardOutBuffers {
  at::Tensor spikes;       // x_seq's shape and dtype (int8 when compact), contiguous; may be x_seq
                           // (or residual) itself
  at::Tensor v_final;      // x_seq.shape[1:], acc dtype, contiguous; may be v_init itself
  at::Tensor count_final;  // x_seq.shape[1:], int32, contiguous; may be count_init itself
};

// buffers, when given, have passed check_forward_out and are used instead of
// fresh tensors.
ForwardOutputs allocate_forward_outputs(const ForwardPlan& plan, bool is_signed,
                                        const ForwardOutBuffers* buffers);

// Shapes, dtypes, devices and layout of the out= buffers, and that none of
// them overlaps what the kernel reads (x_seq, residual, v_init, count_init, the
// threshold) or each other, except element for element (spikes over x_seq or
// residual, v_final over v_init, count_final over count_init: each neuron reads
// its own element before it writes it).
void check_forward_out(const ForwardOutBuffers& buffers, const at::Tensor& x_seq,
                       const ForwardPlan& plan);

// Resolves a threshold tensor (scalar, per channel along dim 2, or per neuron)
// against x_seq, checking its shape and, where it costs no device sync, its values.
ThresholdLayout resolve_threshold(const at::Tensor& threshold, const at::Tensor& x_seq,
                                  at::ScalarType acc_dtype);

struct SurrogateBackwardPlan {
  at::Tensor grad_spikes;                   // contiguous
  c10::optional<at::Tensor> grad_v_final;   // contiguous, acc dtype
  at::Tensor membrane_seq;                  // contiguous
  at::Tensor negative_open_seq;             // contiguous (empty for unsigned)
  ThresholdLayout threshold;
  int64_t time_steps;
  int64_t neurons;
  int surrogate;
};

SurrogateBackwardPlan plan_surrogate_backward(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const at::Tensor& membrane_seq, const at::Tensor& negative_open_seq,
    const at::Tensor& threshold, int64_t group_size, bool is_signed, double neg_margin,
    c10::string_view surrogate, double alpha);

struct RateBackwardPlan {
  at::Tensor grad_spikes;  // contiguous
  at::Tensor input_mean;   // contiguous
  ThresholdLayout threshold;
  int64_t time_steps;
  int64_t neurons;
};

RateBackwardPlan plan_rate_backward(const at::Tensor& grad_spikes, const at::Tensor& input_mean,
                                    const at::Tensor& threshold);

// Fresh outputs of the backwards, shared by the CPU, CUDA and grid-emulation
// entry points: grad_x [T, ...] (grad_spikes' dtype) and, for the surrogate
// backward, grad_v_init [...] (the membrane's dtype).
std::tuple<at::Tensor, at::Tensor> allocate_surrogate_backward_outputs(
    const SurrogateBackwardPlan& plan);
at::Tensor allocate_rate_backward_output(const RateBackwardPlan& plan);

}  // namespace fastspike
