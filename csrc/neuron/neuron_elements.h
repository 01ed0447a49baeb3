// The element functions of the kernels: each takes the index the launcher
// hands one CUDA thread (or one block of CPU lanes) and runs all T steps of
// its neurons, forward or backward. The CUDA __global__ wrappers
// (cuda/neuron_kernels.cuh) only compute that index, the CPU kernels call them
// on blocks of lanes, and cpu/grid_emulation.cpp walks the CUDA grid with them
// on the CPU. Host-and-device; the host's memory helpers (streaming stores,
// prefetch) come from cpu/host_memory.h, which the device never sees.
#pragma once

#include "neuron_args.h"
#include "neuron_step.h"

#ifndef __CUDA_ARCH__
#include "cpu/host_memory.h"
#endif

namespace fastspike {

// kVec elements loaded or stored as one access on CUDA (float4 for float,
// 16 bytes being the widest access). The host loops index memory directly:
// copying a kVec-wide pack there costs more than the neuron math.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec < 16 ? sizeof(T) * kVec : 16) Pack {
  T val[kVec];
};

// The charging current: x, or x + residual rounded in x's dtype first, as
// torch.add followed by the neuron would (the sum is never stored).
template <typename scalar_t, typename acc_t, bool kResidual>
FASTSPIKE_HD acc_t charge_current(scalar_t x, scalar_t r) {
  if (!kResidual) return static_cast<acc_t>(x);
  return static_cast<acc_t>(
      static_cast<scalar_t>(add_rn(static_cast<acc_t>(x), static_cast<acc_t>(r))));
}

// One neuron, one time step: updates its state, records what the surrogate
// backward needs when kRecord (the plan guarantees those outputs exist then),
// and returns k⁺ − k⁻.
template <typename scalar_t, typename acc_t, bool kSigned, int kGroup, bool kRecord>
FASTSPIKE_HD acc_t forward_lane(acc_t xv, int64_t offset, const ForwardArgs<scalar_t, acc_t>& a,
                              int m, acc_t unit, acc_t& v, int32_t& count, acc_t& sum) {
  acc_t charged;
  bool negative_open;
  const acc_t k =
      neuron_step<acc_t, kSigned, kGroup>(xv, unit, a.neg_margin, m, v, count, charged, negative_open);
  if (kRecord) {
    a.membrane_seq[offset] = charged;
    if (kSigned) a.negative_open_seq[offset] = negative_open;
  }
  sum = add_rn(sum, xv);
  return k;
}

// The spike output (k⁺ − k⁻)·u in the input's dtype.
template <typename scalar_t, typename acc_t>
FASTSPIKE_HD scalar_t spike_value(acc_t k, acc_t unit) {
  return static_cast<scalar_t>(mul_rn(k, unit));
}

// The int8 count k⁺ − k⁻. |k| ≤ m ≤ 127 for any state the ops produce; the
// clamp only keeps a nonsensical count_init from an out-of-range conversion.
template <typename acc_t>
FASTSPIKE_HD int8_t spike_count(acc_t k) {
  k = k < acc_t(127) ? k : acc_t(127);
  k = k > acc_t(-127) ? k : acc_t(-127);
  return static_cast<int8_t>(static_cast<int>(k));
}

// The T steps of kVec neurons starting at n0, state in the caller's arrays.
// kCompact writes the int8 counts k⁺ − k⁻ (|k| ≤ m ≤ 127, checked by the
// host) instead of (k⁺ − k⁻)·u; kResidual adds the residual to x first.
template <typename scalar_t, typename acc_t, bool kSigned, int kGroup, int kVec, bool kRecord,
          bool kResidual, bool kCompact>
FASTSPIKE_HD void forward_steps(int64_t n0, const ForwardArgs<scalar_t, acc_t>& a,
                                const acc_t* unit, acc_t* v, int32_t* count, acc_t* sum) {
  const int m = kGroup > 0 ? kGroup : a.group_size;
  // A constant input is read at time stride 0: never materialised T times.
  const int64_t x_stride = a.x_constant ? 0 : a.neurons;
  const int64_t r_stride = a.residual_constant ? 0 : a.neurons;
  for (int64_t t = 0; t < a.time_steps; ++t) {
    const int64_t offset = t * a.neurons + n0;
    const int64_t x_offset = t * x_stride + n0;
    const int64_t r_offset = t * r_stride + n0;
#ifdef __CUDA_ARCH__
    typedef Pack<scalar_t, kVec> ScalarPack;
    const ScalarPack x = *reinterpret_cast<const ScalarPack*>(a.x + x_offset);
    const ScalarPack r = kResidual ? *reinterpret_cast<const ScalarPack*>(a.residual + r_offset) : x;
    acc_t k[kVec];
    for (int l = 0; l < kVec; ++l) {
      k[l] = forward_lane<scalar_t, acc_t, kSigned, kGroup, kRecord>(
          charge_current<scalar_t, acc_t, kResidual>(x.val[l], r.val[l]), offset + l, a, m,
          unit[l], v[l], count[l], sum[l]);
    }
    if (kCompact) {
      Pack<int8_t, kVec> c;
      for (int l = 0; l < kVec; ++l) c.val[l] = spike_count(k[l]);
      *reinterpret_cast<Pack<int8_t, kVec>*>(a.spike_counts + offset) = c;
    } else {
      ScalarPack s;
      for (int l = 0; l < kVec; ++l) s.val[l] = spike_value<scalar_t, acc_t>(k[l], unit[l]);
      *reinterpret_cast<ScalarPack*>(a.spikes + offset) = s;
    }
#else
    // The lanes are independent neurons (spikes may alias x, but only lane by
    // lane), so the host compiler may use SIMD across them. A streamed spike
    // row is built in `row` and stored after the lane loop.
    const scalar_t* x = a.x + x_offset;
    const scalar_t* r = kResidual ? a.residual + r_offset : x;
    if (kVec > 1) prefetch_ahead(x, kVec * sizeof(scalar_t));
    alignas(16) scalar_t row[kVec];
    scalar_t* s = a.stream_spikes ? row : a.spikes + offset;
    int8_t* c = a.spike_counts + offset;
#ifdef _OPENMP
#pragma omp simd
#endif
    for (int l = 0; l < kVec; ++l) {
      const acc_t k = forward_lane<scalar_t, acc_t, kSigned, kGroup, kRecord>(
          charge_current<scalar_t, acc_t, kResidual>(x[l], r[l]), offset + l, a, m, unit[l], v[l],
          count[l], sum[l]);
      if (kCompact) {
        c[l] = spike_count(k);
      } else {
        s[l] = spike_value<scalar_t, acc_t>(k, unit[l]);
      }
    }
    if (!kCompact && a.stream_spikes) stream_row(a.spikes + offset, row, kVec * sizeof(scalar_t));
#endif
  }
}

// Picks the residual variant once per element, so the lane loop has no branch.
template <typename scalar_t, typename acc_t, bool kSigned, int kGroup, int kVec, bool kRecord,
          bool kCompact>
FASTSPIKE_HD void forward_steps_any_input(int64_t n0, const ForwardArgs<scalar_t, acc_t>& a,
                                          const acc_t* unit, acc_t* v, int32_t* count,
                                          acc_t* sum) {
  if (a.residual) {
    forward_steps<scalar_t, acc_t, kSigned, kGroup, kVec, kRecord, true, kCompact>(n0, a, unit, v,
                                                                                 count, sum);
  } else {
    forward_steps<scalar_t, acc_t, kSigned, kGroup, kVec, kRecord, false, kCompact>(n0, a, unit, v,
                                                                                  count, sum);
  }
}

// Neurons [index·kVec, index·kVec + kVec) over all T steps. kVec > 1 needs
// neurons % kVec == 0 and x/residual/spikes/counts aligned to kVec elements
// (the launcher checks), so every row t·N + index·kVec is aligned too and
// there is no tail.
template <typename scalar_t, typename acc_t, bool kSigned, int kGroup, int kVec>
FASTSPIKE_HD void forward_element(int64_t index, const ForwardArgs<scalar_t, acc_t>& a) {
  const int64_t n0 = index * kVec;
  const int m = kGroup > 0 ? kGroup : a.group_size;
  acc_t unit[kVec], v[kVec], sum[kVec];
  int32_t count[kVec];
  for (int l = 0; l < kVec; ++l) {
    const int64_t n = n0 + l;
    unit[l] = neuron_unit(a.threshold[threshold_index(n, a.threshold_inner, a.threshold_size)], m);
    v[l] = a.v_init ? a.v_init[n] : mul_rn(a.init_fraction, unit[l]);
    count[l] = a.count_init ? a.count_init[n] : 0;
    sum[l] = 0;
  }
  // Recording and the output form are decided once here, so the lane loop
  // has no branch in it. Compact counts never record (inference only).
  if (a.membrane_seq) {
    forward_steps_any_input<scalar_t, acc_t, kSigned, kGroup, kVec, true, false>(n0, a, unit, v,
                                                                               count, sum);
  } else if (a.spike_counts) {
    forward_steps_any_input<scalar_t, acc_t, kSigned, kGroup, kVec, false, true>(n0, a, unit, v,
                                                                               count, sum);
  } else {
    forward_steps_any_input<scalar_t, acc_t, kSigned, kGroup, kVec, false, false>(n0, a, unit, v,
                                                                                count, sum);
  }
  for (int l = 0; l < kVec; ++l) {
    const int64_t n = n0 + l;
    a.v_final[n] = v[l];
    a.count_final[n] = count[l];
    if (a.input_mean) a.input_mean[n] = div_rn(sum[l], acc_t(a.time_steps));
  }
}

// Backpropagation through time for kVec neurons starting at n0, reverse order
// in one pass: h_t = v_{t−1} + x_t, so dL/dx_t = dL/dh_t and dL/dv_{t−1} =
// dL/dh_t, with dL/dh_t = g_t · ds_t/dh_t + dL/dv_t (reset detached:
// dv_t/dh_t = 1). The member loop is outside the lane loop so that the lanes
// (independent neurons) vectorise on the host; on CUDA kVec is 1.
template <typename scalar_t, typename acc_t, bool kSigned, int kGroup, int kVec, int kKind>
FASTSPIKE_HD void backward_steps(int64_t n0, const SurrogateBackwardArgs<scalar_t, acc_t>& a,
                                 const acc_t* unit, const acc_t* inv_unit, acc_t* grad_v) {
  const int m = kGroup > 0 ? kGroup : a.group_size;
  const acc_t alpha = a.alpha;
  const acc_t neg_margin = a.neg_margin;
  for (int64_t t = a.time_steps - 1; t >= 0; --t) {
    const int64_t offset = t * a.neurons + n0;
    const acc_t* h = a.membrane_seq + offset;
    acc_t d[kVec];
    for (int l = 0; l < kVec; ++l) d[l] = 0;
    for (int j = 1; j <= m; ++j) {
      for (int l = 0; l < kVec; ++l) {
        d[l] += positive_term<acc_t, kKind>(h[l], j, unit[l], inv_unit[l], alpha);
      }
    }
    if (kSigned) {
      // The 1-byte flags as acc_t first, read as bytes: GCC vectorises neither
      // a float select on a 1-byte mask nor a conversion from bool.
      const unsigned char* open_flags =
          reinterpret_cast<const unsigned char*>(a.negative_open_seq + offset);
      acc_t open[kVec], v_after[kVec];
      for (int l = 0; l < kVec; ++l) open[l] = static_cast<acc_t>(open_flags[l]);
      for (int l = 0; l < kVec; ++l) {
        v_after[l] = sub_rn(h[l], mul_rn(acc_t(positive_count<acc_t, kGroup>(h[l], unit[l], m)),
                                         unit[l]));
      }
      for (int j = 1; j <= m; ++j) {
        for (int l = 0; l < kVec; ++l) {
          const acc_t term =
              negative_term<acc_t, kKind>(v_after[l], j, unit[l], inv_unit[l], neg_margin, alpha);
          d[l] += open[l] != acc_t(0) ? term : acc_t(0);
        }
      }
    }
    const scalar_t* g = a.grad_spikes + offset;
    scalar_t* grad_x = a.grad_x + offset;
    for (int l = 0; l < kVec; ++l) {
      grad_v[l] = static_cast<acc_t>(g[l]) * d[l] + grad_v[l];
      grad_x[l] = static_cast<scalar_t>(grad_v[l]);
    }
  }
}

// Neurons [index·kVec, index·kVec + kVec) of the surrogate backward (one
// neuron per CUDA thread, a block of lanes per CPU task).
template <typename scalar_t, typename acc_t, bool kSigned, int kGroup, int kVec = 1>
FASTSPIKE_HD void surrogate_backward_element(int64_t index,
                                             const SurrogateBackwardArgs<scalar_t, acc_t>& a) {
  const int64_t n0 = index * kVec;
  const int m = kGroup > 0 ? kGroup : a.group_size;
  acc_t unit[kVec], inv_unit[kVec], grad_v[kVec];
  for (int l = 0; l < kVec; ++l) {
    const int64_t n = n0 + l;
    unit[l] = neuron_unit(a.threshold[threshold_index(n, a.threshold_inner, a.threshold_size)], m);
    inv_unit[l] = acc_t(1) / unit[l];
    grad_v[l] = a.grad_v_final ? a.grad_v_final[n] : acc_t(0);
  }
  if (a.surrogate == kSurrogateAtan) {
    backward_steps<scalar_t, acc_t, kSigned, kGroup, kVec, kSurrogateAtan>(n0, a, unit, inv_unit,
                                                                           grad_v);
  } else {
    backward_steps<scalar_t, acc_t, kSigned, kGroup, kVec, kSurrogateSigmoid>(n0, a, unit,
                                                                              inv_unit, grad_v);
  }
  for (int l = 0; l < kVec; ++l) a.grad_v_init[n0 + l] = grad_v[l];
}

// Straight-through on the time average (Fast-SNN fine-tuning): every x_t gets
// (1/T)·Σ_τ g_τ where 0 < x̄ < θ, else 0. Neurons [index·kVec, index·kVec + kVec):
// one per CUDA thread, a block of lanes per CPU task (the lane loops vectorise).
template <typename scalar_t, typename acc_t, int kVec = 1>
FASTSPIKE_HD void rate_backward_element(int64_t index, const RateBackwardArgs<scalar_t, acc_t>& a) {
  const int64_t n0 = index * kVec;
  acc_t total[kVec];
  for (int l = 0; l < kVec; ++l) total[l] = 0;
  for (int64_t t = 0; t < a.time_steps; ++t) {
    const scalar_t* g = a.grad_spikes + t * a.neurons + n0;
    for (int l = 0; l < kVec; ++l) total[l] += static_cast<acc_t>(g[l]);
  }
  scalar_t grad[kVec];
  for (int l = 0; l < kVec; ++l) {
    const int64_t n = n0 + l;
    const acc_t theta = a.threshold[threshold_index(n, a.threshold_inner, a.threshold_size)];
    const acc_t mean = a.input_mean[n];
    const bool pass = acc_t(0) < mean && mean < theta;
    grad[l] = static_cast<scalar_t>(pass ? total[l] / acc_t(a.time_steps) : acc_t(0));
  }
  for (int64_t t = 0; t < a.time_steps; ++t) {
    scalar_t* grad_x = a.grad_x + t * a.neurons + n0;
    for (int l = 0; l < kVec; ++l) grad_x[l] = grad[l];
  }
}

}  // namespace fastspike
