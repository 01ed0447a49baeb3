// The argument structs of the kernels, filled on the host (make_*_args in
// neuron_dispatch.h, or fastspike/cupy_backend.py, which lays them out from the
// declarations below: keep one field per line) and passed by value to the
// element functions of neuron_elements.h. A field left zero (nullptr, false, 0)
// means "off".
#pragma once

#include "neuron_arith.h"

namespace fastspike {

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* x;          // [T, N]
  scalar_t* spikes;           // [T, N], may alias x or residual
  const acc_t* threshold;     // [P], already in acc_t
  int64_t threshold_inner;
  int64_t threshold_size;
  const acc_t* v_init;        // [N] or nullptr (start at φ·u)
  const int32_t* count_init;  // [N] or nullptr (start at 0)
  acc_t* v_final;             // [N]
  int32_t* count_final;       // [N]
  acc_t* membrane_seq;        // [T, N] or nullptr: record h_t for the surrogate backward
  bool* negative_open_seq;    // [T, N] or nullptr
  acc_t* input_mean;          // [N] or nullptr: record x̄ for the rate backward
  int64_t time_steps;
  int64_t neurons;
  int group_size;
  acc_t init_fraction;
  acc_t neg_margin;
  // Zero (nullptr, false) means the plain forward, so a caller that fills the
  // struct field by field only sets what it uses.
  const scalar_t* residual;   // nullptr, or charge with x + residual rounded in scalar_t
  int8_t* spike_counts;       // nullptr, or write k⁺ − k⁻ here instead of to spikes
  bool x_constant;            // x is one step [N] read at every t (time stride 0)
  bool residual_constant;     // likewise for residual
  // Host only: write the spike rows with non-temporal stores (the launcher
  // sets it for outputs far larger than the caches, 16-byte aligned rows).
  bool stream_spikes;
};

template <typename scalar_t, typename acc_t>
struct SurrogateBackwardArgs {
  const scalar_t* grad_spikes;      // [T, N]
  const acc_t* grad_v_final;        // [N] or nullptr
  const acc_t* membrane_seq;        // [T, N]
  const bool* negative_open_seq;    // [T, N] or nullptr (unsigned neurons)
  const acc_t* threshold;
  int64_t threshold_inner;
  int64_t threshold_size;
  scalar_t* grad_x;                 // [T, N]
  acc_t* grad_v_init;               // [N]
  int64_t time_steps;
  int64_t neurons;
  int group_size;
  acc_t neg_margin;
  int surrogate;
  acc_t alpha;
};

template <typename scalar_t, typename acc_t>
struct RateBackwardArgs {
  const scalar_t* grad_spikes;  // [T, N]
  const acc_t* input_mean;      // [N]
  const acc_t* threshold;
  int64_t threshold_inner;
  int64_t threshold_size;
  scalar_t* grad_x;             // [T, N]
  int64_t time_steps;
  int64_t neurons;
};

}  // namespace fastspike
