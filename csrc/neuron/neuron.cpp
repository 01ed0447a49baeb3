// Operator schemas of fastspike (the one TORCH_LIBRARY block) and the host
// checks shared by the CPU and CUDA implementations. The operators are
// documented for users in README.md ("Operators").
#include "neuron.h"

#include "cpu/huge_page_allocator.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>

namespace fastspike {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on the same device as x_seq (",
              x.device(), "), got ", t.device());
}

void check_state(const c10::optional<at::Tensor>& state, const at::Tensor& x_seq,
                 at::ScalarType dtype, const char* name) {
  if (!state.has_value()) return;
  const at::Tensor& s = *state;
  check_same_device(s, x_seq, name);
  TORCH_CHECK_TYPE(s.scalar_type() == dtype, name, " must have dtype ", dtype, " for x_seq of dtype ",
              x_seq.scalar_type(), ", got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.sizes() == x_seq.sizes().slice(1), name,
              " must have the shape of one time step of x_seq, ",
              shape_str(x_seq.sizes().slice(1)), ", got ", shape_str(s.sizes()));
}

GradMode parse_grad_mode(c10::string_view grad_mode) {
  if (grad_mode == "none") return GradMode::kNone;
  if (grad_mode == "surrogate") return GradMode::kSurrogate;
  if (grad_mode == "rate") return GradMode::kRate;
  TORCH_CHECK_VALUE(false, "grad_mode must be 'none', 'surrogate' or 'rate', got '",
              std::string(grad_mode), "'");
}

int parse_surrogate(c10::string_view surrogate, double alpha) {
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0,
              "alpha (surrogate sharpness) must be a finite number > 0, got ", alpha);
  if (surrogate == "sigmoid") return 0;
  if (surrogate == "atan") return 1;
  TORCH_CHECK_VALUE(false, "surrogate must be 'sigmoid' or 'atan', got '", std::string(surrogate),
              "'");
}

int64_t neurons_per_step(const at::Tensor& seq) {
  int64_t neurons = 1;
  for (int64_t d = 1; d < seq.dim(); ++d) neurons *= seq.size(d);
  return neurons;
}

void check_neuron_params(int64_t group_size, double neg_margin) {
  TORCH_CHECK_VALUE(group_size >= 1 && group_size <= (1 << 20),
              "group_size must be an integer in [1, 2^20] (1 = plain IF), got ", group_size);
  TORCH_CHECK_VALUE(std::isfinite(neg_margin) && neg_margin >= 0,
              "neg_margin must be a finite number >= 0, got ", neg_margin);
}

// A time broadcast (stride 0 along dim 0, as from x.unsqueeze(0).expand(T, ...))
// is kept as one contiguous step that the kernels read at every t; anything
// else is made contiguous.
at::Tensor time_stream(const at::Tensor& seq, bool& constant) {
  constant = seq.dim() >= 1 && seq.size(0) > 1 && seq.stride(0) == 0;
  return constant ? seq.select(0, 0).contiguous() : seq.contiguous();
}

void check_residual(const at::Tensor& residual, const at::Tensor& x_seq) {
  check_same_device(residual, x_seq, "residual");
  TORCH_CHECK_TYPE(residual.scalar_type() == x_seq.scalar_type(), "residual must have x_seq's dtype ",
              x_seq.scalar_type(), ", got ", residual.scalar_type());
  TORCH_CHECK_VALUE(residual.sizes() == x_seq.sizes(), "residual must have x_seq's shape ",
              shape_str(x_seq.sizes()), " (no broadcasting), got ", shape_str(residual.sizes()));
}

// int8 holds |k⁺ − k⁻| ≤ m only up to m = 127.
constexpr int64_t kMaxCompactGroup = 127;

}  // namespace

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

ThresholdLayout resolve_threshold(const at::Tensor& threshold, const at::Tensor& x_seq,
                                  at::ScalarType acc_dtype) {
  check_same_device(threshold, x_seq, "threshold");
  TORCH_CHECK_TYPE(is_supported_float(threshold.scalar_type()),
              "threshold must be a floating-point tensor, got ", threshold.scalar_type());
  const auto x_sizes = x_seq.sizes();
  ThresholdLayout layout;
  if (threshold.numel() == 1 && threshold.dim() <= 1) {
    layout.inner = 1;
    layout.size = 1;
  } else if (threshold.dim() == 1 && x_seq.dim() >= 3 && threshold.size(0) == x_sizes[2]) {
    int64_t inner = 1;
    for (int64_t d = 3; d < x_seq.dim(); ++d) inner *= x_sizes[d];
    layout.inner = inner;
    layout.size = threshold.size(0);
  } else if ((x_seq.dim() >= 3 && threshold.sizes() == x_sizes.slice(2)) ||
             (x_seq.dim() >= 2 && threshold.sizes() == x_sizes.slice(1))) {
    layout.inner = 1;
    layout.size = threshold.numel();
  } else {
    TORCH_CHECK_VALUE(false,
                "threshold must be a scalar, a per-channel tensor of shape [C] with C = "
                "x_seq.size(2), or a per-neuron tensor of shape x_seq.shape[2:] or "
                "x_seq.shape[1:]; x_seq has shape ",
                shape_str(x_sizes), ", threshold has shape ", shape_str(threshold.sizes()));
  }
  layout.values = threshold.to(acc_dtype).contiguous().view({-1});
  // Checking values needs them on the host: done for CPU tensors only, so
  // that CUDA calls never synchronise. On CUDA an invalid threshold makes
  // that neuron's outputs NaN (see neuron_unit in neuron_step.h).
  if (layout.values.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(layout.values.scalar_type(), "check_threshold", [&] {
      const scalar_t* values = layout.values.data_ptr<scalar_t>();
      for (int64_t i = 0; i < layout.values.numel(); ++i) {
        TORCH_CHECK_VALUE(std::isfinite(values[i]) && values[i] > 0,
                    "threshold must be finite and > 0 everywhere, got ", values[i],
                    " at flat index ", i);
      }
    });
  }
  return layout;
}

ForwardPlan plan_forward(const at::Tensor& x_seq, const at::Tensor& threshold,
                         const c10::optional<at::Tensor>& v_init,
                         const c10::optional<at::Tensor>& count_init, int64_t group_size,
                         double init_fraction, double neg_margin, c10::string_view grad_mode,
                         const c10::optional<at::Tensor>& residual, bool compact) {
  TORCH_CHECK_TYPE(is_supported_float(x_seq.scalar_type()),
              "x_seq must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
              x_seq.scalar_type());
  TORCH_CHECK_VALUE(x_seq.dim() >= 1,
              "x_seq must have a leading time axis, shape [T, ...], got a 0-dim tensor");
  check_neuron_params(group_size, neg_margin);
  TORCH_CHECK_VALUE(std::isfinite(init_fraction),
              "init_fraction (initial membrane as a fraction of θ/m) must be finite, got ",
              init_fraction);
  ForwardPlan plan;
  plan.acc_dtype = accumulation_dtype(x_seq.scalar_type());
  plan.grad_mode = parse_grad_mode(grad_mode);
  check_state(v_init, x_seq, plan.acc_dtype, "v_init");
  check_state(count_init, x_seq, at::kInt, "count_init");
  if (residual.has_value()) check_residual(*residual, x_seq);
  if (compact) {
    TORCH_CHECK_VALUE(plan.grad_mode == GradMode::kNone,
                "compact spikes (int8 counts) are for inference and have no gradient: grad_mode "
                "must be 'none', got '", std::string(grad_mode), "'");
    TORCH_CHECK_VALUE(group_size <= kMaxCompactGroup, "compact spikes are int8 counts |k| <= group_size, "
                "so group_size must be <= ", kMaxCompactGroup, ", got ", group_size);
  }
  plan.threshold = resolve_threshold(threshold, x_seq, plan.acc_dtype);
  plan.x = time_stream(x_seq, plan.x_constant);
  if (residual.has_value()) plan.residual = time_stream(*residual, plan.residual_constant);
  plan.compact = compact;
  plan.seq_sizes = x_seq.sizes().vec();
  if (v_init.has_value()) plan.v_init = v_init->contiguous();
  if (count_init.has_value()) plan.count_init = count_init->contiguous();
  plan.time_steps = x_seq.size(0);
  plan.neurons = neurons_per_step(x_seq);
  return plan;
}

namespace {

void check_out_buffer(const at::Tensor& buffer, const at::Tensor& x_seq, at::IntArrayRef sizes,
                      at::ScalarType dtype, const char* name) {
  check_same_device(buffer, x_seq, name);
  TORCH_CHECK_TYPE(buffer.scalar_type() == dtype, name, " must have dtype ", dtype, " for x_seq of dtype ",
              x_seq.scalar_type(), ", got ", buffer.scalar_type());
  TORCH_CHECK_VALUE(buffer.sizes() == sizes, name, " must have shape ", shape_str(sizes), ", got ",
              shape_str(buffer.sizes()));
  TORCH_CHECK_VALUE(buffer.is_contiguous(), name, " must be contiguous");
}

// `allowed_full`: the one tensor `buffer` may coincide with exactly.
void check_no_overlap(const at::Tensor& buffer, const char* name, const at::Tensor& other,
                      const char* other_name, bool allowed_full) {
  if (!other.defined() || other.numel() == 0 || buffer.numel() == 0) return;
  const auto status = at::get_overlap_status(buffer, other);
  if (status == at::MemOverlapStatus::No) return;
  if (allowed_full && status == at::MemOverlapStatus::Full) return;
  TORCH_CHECK_VALUE(false, name, " overlaps ", other_name, " in memory",
              allowed_full ? " other than element for element" : "",
              "; pass separate buffers", allowed_full ? " (or exactly the same tensor)" : "");
}

}  // namespace

void check_forward_out(const ForwardOutBuffers& buffers, const at::Tensor& x_seq,
                       const ForwardPlan& plan) {
  const char* spikes_name = "spikes (the out= tensor)";
  const char* v_name = "v (the out= state)";
  const char* count_name = "count (the out= state)";
  check_out_buffer(buffers.spikes, x_seq, x_seq.sizes(), plan.compact ? at::kChar : x_seq.scalar_type(),
                   spikes_name);
  check_out_buffer(buffers.v_final, x_seq, x_seq.sizes().slice(1), plan.acc_dtype, v_name);
  check_out_buffer(buffers.count_final, x_seq, x_seq.sizes().slice(1), at::kInt, count_name);
  const at::Tensor v_init = plan.v_init.value_or(at::Tensor());
  const at::Tensor count_init = plan.count_init.value_or(at::Tensor());
  const at::Tensor residual = plan.residual.value_or(at::Tensor());
  // The threshold as the kernel reads it (the caller's tensor itself when already
  // contiguous in the accumulation dtype): nothing may write over it.
  const at::Tensor& threshold = plan.threshold.values;
  check_no_overlap(buffers.spikes, spikes_name, plan.x, "x_seq", /*allowed_full=*/true);
  check_no_overlap(buffers.spikes, spikes_name, residual, "residual", /*allowed_full=*/true);
  check_no_overlap(buffers.spikes, spikes_name, v_init, "v_init", false);
  check_no_overlap(buffers.spikes, spikes_name, count_init, "count_init", false);
  check_no_overlap(buffers.spikes, spikes_name, threshold, "threshold", false);
  check_no_overlap(buffers.v_final, v_name, threshold, "threshold", false);
  check_no_overlap(buffers.count_final, count_name, threshold, "threshold", false);
  check_no_overlap(buffers.v_final, v_name, plan.x, "x_seq", false);
  check_no_overlap(buffers.v_final, v_name, residual, "residual", false);
  check_no_overlap(buffers.v_final, v_name, buffers.spikes, spikes_name, false);
  check_no_overlap(buffers.v_final, v_name, v_init, "v_init", true);
  check_no_overlap(buffers.v_final, v_name, count_init, "count_init", false);
  check_no_overlap(buffers.count_final, count_name, plan.x, "x_seq", false);
  check_no_overlap(buffers.count_final, count_name, residual, "residual", false);
  check_no_overlap(buffers.count_final, count_name, buffers.spikes, spikes_name, false);
  check_no_overlap(buffers.count_final, count_name, buffers.v_final, v_name, false);
  check_no_overlap(buffers.count_final, count_name, count_init, "count_init", true);
  check_no_overlap(buffers.count_final, count_name, v_init, "v_init", false);
}

ForwardOutputs allocate_forward_outputs(const ForwardPlan& plan, bool is_signed,
                                        const ForwardOutBuffers* buffers) {
  const at::Tensor& x = plan.x;
  const at::IntArrayRef seq_sizes(plan.seq_sizes);
  const auto state_sizes = seq_sizes.slice(1);
  const auto acc_options = x.options().dtype(plan.acc_dtype);
  const auto nothing = [&](at::ScalarType dtype) { return at::empty({0}, x.options().dtype(dtype)); };
  ForwardOutputs out;
  if (buffers != nullptr) {
    out.spikes = buffers->spikes;
    out.v_final = buffers->v_final;
    out.count_final = buffers->count_final;
  } else {
    out.spikes = empty_output(seq_sizes, x.options().dtype(plan.compact ? at::kChar : x.scalar_type()));
    out.v_final = empty_output(state_sizes, acc_options);
    out.count_final = empty_output(state_sizes, x.options().dtype(at::kInt));
  }
  const bool surrogate = plan.grad_mode == GradMode::kSurrogate;
  out.membrane_seq = surrogate ? empty_output(seq_sizes, acc_options) : nothing(plan.acc_dtype);
  out.negative_open_seq =
      surrogate && is_signed ? empty_output(seq_sizes, x.options().dtype(at::kBool)) : nothing(at::kBool);
  out.input_mean =
      plan.grad_mode == GradMode::kRate ? empty_output(state_sizes, acc_options) : nothing(plan.acc_dtype);
  return out;
}

SurrogateBackwardPlan plan_surrogate_backward(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const at::Tensor& membrane_seq, const at::Tensor& negative_open_seq,
    const at::Tensor& threshold, int64_t group_size, bool is_signed, double neg_margin,
    c10::string_view surrogate, double alpha) {
  TORCH_CHECK_TYPE(is_supported_float(grad_spikes.scalar_type()),
              "grad_spikes must be a floating-point tensor, got ", grad_spikes.scalar_type());
  TORCH_CHECK_VALUE(grad_spikes.dim() >= 1, "grad_spikes must have a leading time axis [T, ...]");
  check_neuron_params(group_size, neg_margin);
  const auto acc = accumulation_dtype(grad_spikes.scalar_type());
  check_same_device(membrane_seq, grad_spikes, "membrane_seq");
  TORCH_CHECK_VALUE(membrane_seq.scalar_type() == acc && membrane_seq.sizes() == grad_spikes.sizes(),
              "membrane_seq must be the ", acc, " tensor of shape ", shape_str(grad_spikes.sizes()),
              " recorded by neuron_forward(grad_mode='surrogate'), got ", membrane_seq.scalar_type(),
              " of shape ", shape_str(membrane_seq.sizes()));
  if (is_signed) {
    check_same_device(negative_open_seq, grad_spikes, "negative_open_seq");
    TORCH_CHECK_VALUE(negative_open_seq.scalar_type() == at::kBool &&
                    negative_open_seq.sizes() == grad_spikes.sizes(),
                "negative_open_seq must be the bool tensor of shape ",
                shape_str(grad_spikes.sizes()),
                " recorded by neuron_forward(grad_mode='surrogate', signed=True), got ",
                negative_open_seq.scalar_type(), " of shape ",
                shape_str(negative_open_seq.sizes()));
  }
  check_state(grad_v_final, grad_spikes, acc, "grad_v_final");
  SurrogateBackwardPlan plan;
  plan.surrogate = parse_surrogate(surrogate, alpha);
  plan.threshold = resolve_threshold(threshold, grad_spikes, acc);
  plan.grad_spikes = grad_spikes.contiguous();
  if (grad_v_final.has_value()) plan.grad_v_final = grad_v_final->contiguous();
  plan.membrane_seq = membrane_seq.contiguous();
  plan.negative_open_seq = is_signed ? negative_open_seq.contiguous() : negative_open_seq;
  plan.time_steps = grad_spikes.size(0);
  plan.neurons = neurons_per_step(grad_spikes);
  return plan;
}

RateBackwardPlan plan_rate_backward(const at::Tensor& grad_spikes, const at::Tensor& input_mean,
                                    const at::Tensor& threshold) {
  TORCH_CHECK_TYPE(is_supported_float(grad_spikes.scalar_type()),
              "grad_spikes must be a floating-point tensor, got ", grad_spikes.scalar_type());
  TORCH_CHECK_VALUE(grad_spikes.dim() >= 1, "grad_spikes must have a leading time axis [T, ...]");
  const auto acc = accumulation_dtype(grad_spikes.scalar_type());
  check_state(input_mean, grad_spikes, acc, "input_mean");
  RateBackwardPlan plan;
  plan.threshold = resolve_threshold(threshold, grad_spikes, acc);
  plan.grad_spikes = grad_spikes.contiguous();
  plan.input_mean = input_mean.contiguous();
  plan.time_steps = grad_spikes.size(0);
  plan.neurons = neurons_per_step(grad_spikes);
  return plan;
}

TORCH_LIBRARY(fastspike, m) {
  // Runs all T steps of the generalised neuron (docs/design.md §2) in one call:
  // the kernel. Returns (spikes, v_final, count_final, membrane_seq,
  // negative_open_seq, input_mean); the last three are what the backward of
  // grad_mode needs and are empty ([0]) otherwise. residual (x_seq's shape and
  // dtype): charge with x + residual, rounded as torch.add would, without
  // storing the sum. compact: spikes are the int8 counts k⁺ − k⁻ (grad_mode
  // 'none', m <= 127). x_seq and residual may be time broadcasts (stride 0
  // along dim 0). It has no derivative of its own: `neuron` below is the
  // differentiable form.
  m.def(
      "neuron_forward(Tensor x_seq, Tensor threshold, Tensor? v_init, Tensor? count_init, "
      "int group_size, bool signed, float init_fraction, float neg_margin, str grad_mode, "
      "Tensor? residual=None, bool compact=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The differentiable neuron: (spikes, v_final, count_final) of neuron_forward,
  // with the backward of `grad` ('surrogate': neuron_backward_surrogate with this
  // surrogate and alpha; 'rate': neuron_backward_rate). Its kernel is
  // CompositeImplicitAutograd, registered from Python (fastspike/ops.py): an
  // autograd function that runs neuron_forward and keeps surrogate and alpha,
  // which only the backward reads, in its context. A schema of its own lets
  // TorchScript and jit.trace record the differentiable call.
  m.def(
      "neuron(Tensor x_seq, Tensor threshold, Tensor? v_init, Tensor? count_init, int group_size, "
      "bool signed, float init_fraction, float neg_margin, str grad, str surrogate, float alpha, "
      "Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
  // The out= overload (ATen's convention): the forward arguments, then the
  // caller's buffers for the spikes (which may be x_seq or residual itself; int8
  // when compact) and the final state (which may be v_init / count_init
  // themselves), so a loop that reuses them allocates nothing. Inference only,
  // as ATen's out= overloads: no grad_mode (nothing is recorded). It returns
  // nothing rather than aliases of the buffers, because
  // torch's functionalization (torch.compile, export) rejects custom operators
  // whose outputs carry alias annotations.
  m.def(
      "neuron_forward.out(Tensor x_seq, Tensor threshold, Tensor? v_init, Tensor? count_init, "
      "int group_size, bool signed, float init_fraction, float neg_margin, Tensor? residual=None, "
      "bool compact=False, *, Tensor(a!) spikes, Tensor(b!) v_final, Tensor(c!) count_final) -> ()");
  // Reverse-time pass of the surrogate gradient; returns (grad_x, grad_v_init).
  m.def(
      "neuron_backward_surrogate(Tensor grad_spikes, Tensor? grad_v_final, Tensor membrane_seq, "
      "Tensor negative_open_seq, Tensor threshold, int group_size, bool signed, "
      "float neg_margin, str surrogate, float alpha) -> (Tensor, Tensor)");
  // Straight-through rate gradient; returns grad_x.
  m.def("neuron_backward_rate(Tensor grad_spikes, Tensor input_mean, Tensor threshold) -> Tensor");
  // Test hooks: run the CUDA kernel bodies on the CPU, walking the grid the
  // CUDA launcher would use (blocks x threads, grid-stride); vector_width 0
  // lets the launcher's rule choose it.
  m.def(
      "_emulate_cuda_forward(Tensor x_seq, Tensor threshold, Tensor? v_init, Tensor? count_init, "
      "int group_size, bool signed, float init_fraction, float neg_margin, str grad_mode, "
      "int blocks, int threads, int vector_width, Tensor? residual=None, bool compact=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_emulate_cuda_backward_surrogate(Tensor grad_spikes, Tensor? grad_v_final, "
      "Tensor membrane_seq, Tensor negative_open_seq, Tensor threshold, int group_size, "
      "bool signed, float neg_margin, str surrogate, float alpha, int blocks, int threads) "
      "-> (Tensor, Tensor)");
  m.def(
      "_emulate_cuda_backward_rate(Tensor grad_spikes, Tensor input_mean, Tensor threshold, "
      "int blocks, int threads) -> Tensor");
}

std::tuple<at::Tensor, at::Tensor> allocate_surrogate_backward_outputs(
    const SurrogateBackwardPlan& plan) {
  return {empty_output(plan.grad_spikes.sizes(), plan.grad_spikes.options()),
          empty_output(plan.grad_spikes.sizes().slice(1), plan.membrane_seq.options())};
}

at::Tensor allocate_rate_backward_output(const RateBackwardPlan& plan) {
  return empty_output(plan.grad_spikes.sizes(), plan.grad_spikes.options());
}

}  // namespace fastspike
