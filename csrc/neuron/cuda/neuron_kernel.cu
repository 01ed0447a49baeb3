// CUDA implementations of the neuron operators. One launch runs all T steps
// of the forward (each thread keeps its neurons' membranes in registers) and
// one launch runs the reverse-time pass of each backward. The kernels only
// compute their grid-stride index (neuron_kernels.cuh, also compiled by NVRTC
// for the CuPy path): the per-element work is in neuron_elements.h,
// shared with the CPU kernels and walked on the CPU by grid_emulation.cpp.
//
// Light headers only (docs/design.md §4): torch/extension.h or ATen/cuda/CUDAContext.h
// would make this file several times slower to compile.
#include "../neuron_dispatch.h"
#include "neuron_kernels.cuh"  // the __global__ kernels, shared with the CuPy/NVRTC path

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace fastspike {
namespace {

// Enough blocks to fill the device many times over; the grid-stride loops
// take whatever is left beyond that.
int64_t max_blocks_for(const at::Tensor& t) {
  int sm_count = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return static_cast<int64_t>(sm_count) * 32;
}

void run_forward_cuda(const ForwardPlan& plan, const ForwardOutputs& out, int64_t group_size,
                      bool is_signed, double init_fraction, double neg_margin) {
  const c10::cuda::CUDAGuard guard(plan.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = max_blocks_for(plan.x);
  FASTSPIKE_DISPATCH_FLOATS(plan.x.scalar_type(), "neuron_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args =
        make_forward_args<scalar_t, acc_t>(plan, out, group_size, init_fraction, neg_margin);
    const int width = forward_vector_width(args);
    const int64_t work_items = plan.neurons / width;
    const int64_t blocks = blocks_for(work_items, kThreadsPerBlock, max_blocks);
    FASTSPIKE_DISPATCH_NEURON(is_signed, group_size, [&] {
      if (width == kForwardVectorWidth) {
        neuron_forward_kernel<scalar_t, acc_t, kSigned, kGroup, kForwardVectorWidth>
            <<<blocks, kThreadsPerBlock, 0, stream>>>(args, work_items);
      } else {
        neuron_forward_kernel<scalar_t, acc_t, kSigned, kGroup, 1>
            <<<blocks, kThreadsPerBlock, 0, stream>>>(args, work_items);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void run_backward_surrogate_cuda(const SurrogateBackwardPlan& plan, const at::Tensor& grad_x,
                                 const at::Tensor& grad_v_init, int64_t group_size,
                                 bool is_signed, double neg_margin, double alpha) {
  const c10::cuda::CUDAGuard guard(grad_x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_for(plan.neurons, kThreadsPerBlock, max_blocks_for(grad_x));
  FASTSPIKE_DISPATCH_FLOATS(plan.grad_spikes.scalar_type(), "neuron_backward_surrogate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = make_surrogate_backward_args<scalar_t, acc_t>(plan, grad_x, grad_v_init,
                                                                    group_size, neg_margin, alpha);
    FASTSPIKE_DISPATCH_NEURON(is_signed, group_size, [&] {
      neuron_backward_surrogate_kernel<scalar_t, acc_t, kSigned, kGroup>
          <<<blocks, kThreadsPerBlock, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void run_backward_rate_cuda(const RateBackwardPlan& plan, const at::Tensor& grad_x) {
  const c10::cuda::CUDAGuard guard(grad_x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_for(plan.neurons, kThreadsPerBlock, max_blocks_for(grad_x));
  FASTSPIKE_DISPATCH_FLOATS(plan.grad_spikes.scalar_type(), "neuron_backward_rate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = make_rate_backward_args<scalar_t, acc_t>(plan, grad_x);
    neuron_backward_rate_kernel<scalar_t, acc_t><<<blocks, kThreadsPerBlock, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastspike, CUDA, m) {
  m.impl("neuron_forward", &neuron_forward_op<run_forward_cuda>);
  m.impl("neuron_forward.out", &neuron_forward_out_op<run_forward_cuda>);
  m.impl("neuron_backward_surrogate", &neuron_backward_surrogate_op<run_backward_surrogate_cuda>);
  m.impl("neuron_backward_rate", &neuron_backward_rate_op<run_backward_rate_cuda>);
}

}  // namespace fastspike
