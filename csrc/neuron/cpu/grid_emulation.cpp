// Runs the CUDA kernel bodies on the CPU, walking the grid the CUDA launcher
// would use: every (block, thread) pair in order, each with its grid-stride
// loop, the vector width chosen by the same rule. Registered as test-only
// operators (prefixed _emulate_cuda_) so that a machine without a GPU still
// exercises the index arithmetic, the vector paths and the stride loops of
// cuda/neuron_kernel.cu; only the launch itself is left for a GPU to test.
#include "../neuron_dispatch.h"

#include <torch/library.h>

namespace fastspike {
namespace {

// Calls body(i) for every index a grid of blocks x threads visits, in the
// order block, thread, stride step: as many calls as the GPU would make.
template <typename Body>
void walk_grid(int64_t work_items, int64_t blocks, int64_t threads, const Body& body) {
  TORCH_CHECK_VALUE(blocks >= 1 && threads >= 1, "blocks and threads must be >= 1, got ", blocks,
              " and ", threads);
  const int64_t stride = blocks * threads;
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t thread = 0; thread < threads; ++thread) {
      for (int64_t i = block * threads + thread; i < work_items; i += stride) body(i);
    }
  }
}

ForwardResult emulate_cuda_forward(const at::Tensor& x_seq, const at::Tensor& threshold,
                                   const c10::optional<at::Tensor>& v_init,
                                   const c10::optional<at::Tensor>& count_init,
                                   int64_t group_size, bool is_signed, double init_fraction,
                                   double neg_margin, c10::string_view grad_mode, int64_t blocks,
                                   int64_t threads, int64_t vector_width,
                                   const c10::optional<at::Tensor>& residual, bool compact) {
  const ForwardPlan plan = plan_forward(x_seq, threshold, v_init, count_init, group_size,
                                        init_fraction, neg_margin, grad_mode, residual, compact);
  const ForwardOutputs out = allocate_forward_outputs(plan, is_signed, nullptr);
  if (plan.neurons == 0) return out.as_tuple();
  FASTSPIKE_DISPATCH_FLOATS(plan.x.scalar_type(), "emulate_cuda_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args =
        make_forward_args<scalar_t, acc_t>(plan, out, group_size, init_fraction, neg_margin);
    const int width = vector_width > 0
                          ? static_cast<int>(vector_width)
                          : forward_vector_width(args);
    TORCH_CHECK_VALUE(width == 1 || (width == kForwardVectorWidth && plan.neurons % width == 0),
                "vector_width must be 0 (launcher's rule), 1, or ", kForwardVectorWidth,
                " with neurons divisible by it; got ", vector_width, " for ", plan.neurons,
                " neurons");
    const int64_t work_items = plan.neurons / width;
    FASTSPIKE_DISPATCH_NEURON(is_signed, group_size, [&] {
      if (width == kForwardVectorWidth) {
        walk_grid(work_items, blocks, threads, [&](int64_t i) {
          forward_element<scalar_t, acc_t, kSigned, kGroup, kForwardVectorWidth>(i, args);
        });
      } else {
        walk_grid(work_items, blocks, threads, [&](int64_t i) {
          forward_element<scalar_t, acc_t, kSigned, kGroup, 1>(i, args);
        });
      }
    });
  });
  return out.as_tuple();
}

std::tuple<at::Tensor, at::Tensor> emulate_cuda_backward_surrogate(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const at::Tensor& membrane_seq, const at::Tensor& negative_open_seq,
    const at::Tensor& threshold, int64_t group_size, bool is_signed, double neg_margin,
    c10::string_view surrogate, double alpha, int64_t blocks, int64_t threads) {
  const auto run = [blocks, threads](const SurrogateBackwardPlan& plan, const at::Tensor& grad_x,
                                     const at::Tensor& grad_v_init, int64_t group_size,
                                     bool is_signed, double neg_margin, double alpha) {
    FASTSPIKE_DISPATCH_FLOATS(plan.grad_spikes.scalar_type(), "emulate_cuda_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto args = make_surrogate_backward_args<scalar_t, acc_t>(
          plan, grad_x, grad_v_init, group_size, neg_margin, alpha);
      FASTSPIKE_DISPATCH_NEURON(is_signed, group_size, [&] {
        walk_grid(plan.neurons, blocks, threads, [&](int64_t n) {
          surrogate_backward_element<scalar_t, acc_t, kSigned, kGroup>(n, args);
        });
      });
    });
  };
  const SurrogateBackwardPlan plan =
      plan_surrogate_backward(grad_spikes, grad_v_final, membrane_seq, negative_open_seq,
                              threshold, group_size, is_signed, neg_margin, surrogate, alpha);
  auto [grad_x, grad_v_init] = allocate_surrogate_backward_outputs(plan);
  if (plan.neurons > 0) run(plan, grad_x, grad_v_init, group_size, is_signed, neg_margin, alpha);
  return {grad_x, grad_v_init};
}

at::Tensor emulate_cuda_backward_rate(const at::Tensor& grad_spikes, const at::Tensor& input_mean,
                                      const at::Tensor& threshold, int64_t blocks,
                                      int64_t threads) {
  const RateBackwardPlan plan = plan_rate_backward(grad_spikes, input_mean, threshold);
  at::Tensor grad_x = allocate_rate_backward_output(plan);
  if (plan.neurons == 0) return grad_x;
  FASTSPIKE_DISPATCH_FLOATS(plan.grad_spikes.scalar_type(), "emulate_cuda_backward_rate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = make_rate_backward_args<scalar_t, acc_t>(plan, grad_x);
    walk_grid(plan.neurons, blocks, threads,
              [&](int64_t n) { rate_backward_element<scalar_t, acc_t>(n, args); });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastspike, CPU, m) {
  m.impl("_emulate_cuda_forward", &emulate_cuda_forward);
  m.impl("_emulate_cuda_backward_surrogate", &emulate_cuda_backward_surrogate);
  m.impl("_emulate_cuda_backward_rate", &emulate_cuda_backward_rate);
}

}  // namespace fastspike
