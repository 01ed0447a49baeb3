// The __global__ kernels of the neuron operators, in a header that both nvcc
// (cuda/neuron_kernel.cu) and NVRTC (fastspike/cupy_backend.py, through CuPy)
// compile, so the two CUDA paths launch the same code. The kernels only
// compute their grid-stride index; the per-element work is in neuron_elements.h.
// Nothing here may need more than NVRTC offers: no ATen, no standard library.
#pragma once

#include "../neuron_elements.h"

namespace fastspike {

template <typename scalar_t, typename acc_t, bool kSigned, int kGroup, int kVec>
__global__ void neuron_forward_kernel(ForwardArgs<scalar_t, acc_t> args, int64_t work_items) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < work_items;
       i += stride) {
    forward_element<scalar_t, acc_t, kSigned, kGroup, kVec>(i, args);
  }
}

template <typename scalar_t, typename acc_t, bool kSigned, int kGroup>
__global__ void neuron_backward_surrogate_kernel(SurrogateBackwardArgs<scalar_t, acc_t> args) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       n < args.neurons; n += stride) {
    surrogate_backward_element<scalar_t, acc_t, kSigned, kGroup>(n, args);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void neuron_backward_rate_kernel(RateBackwardArgs<scalar_t, acc_t> args) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       n < args.neurons; n += stride) {
    rate_backward_element<scalar_t, acc_t>(n, args);
  }
}

}  // namespace fastspike
