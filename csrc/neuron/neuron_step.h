// The neuron itself (docs/design.md §2): threshold layouts, the spike counts of
// a group of m members defined by comparisons, one time step of the
// generalised (signed, grouped) IF neuron with reset by subtraction, and the
// surrogate derivative terms its backward sums. Host-and-device, shared by the
// CPU kernels, nvcc and NVRTC.
#pragma once

#include "neuron_arith.h"

namespace fastspike {

// ---------------------------------------------------------------------------
// Threshold layouts. A threshold tensor of P elements applies to neuron n
// (the flat index over x_seq.shape[1:]) at index (n / inner) % P:
//   scalar       P = 1
//   per channel  P = C = x_seq.size(2), inner = prod(x_seq.shape[3:])
//   per neuron   P = prod(shape), inner = 1 (shape = x_seq.shape[2:] or [1:])
FASTSPIKE_HD int64_t threshold_index(int64_t neuron, int64_t inner, int64_t size) {
  return size == 1 ? 0 : (neuron / inner) % size;
}

// u = θ/m. A threshold that is not finite and > 0 can only reach a kernel on
// CUDA, where values are not checked so that calls never synchronise; it gives
// u = NaN, so that neuron's spikes and membrane come out NaN, not plausible.
template <typename acc_t>
FASTSPIKE_HD acc_t neuron_unit(acc_t threshold, int group_size) {
  const acc_t unit = div_rn(threshold, acc_t(group_size));
  const bool valid = unit > acc_t(0) && (unit - unit) == acc_t(0);
  const acc_t zero = 0;
  return valid ? unit : zero / zero;
}

// ---------------------------------------------------------------------------
// Spike counts of a group of m members, defined by comparisons (docs/design.md §2):
//   k⁺ = #{j ∈ 1..m : h ≥ j·u}          n⁻ = #{j ∈ 1..m : v ≤ −ε − (j−1)·u}
// Each set is a prefix of 1..m (the rounded levels are monotone in j), so the
// count is found from a quotient estimate corrected by one comparison either
// way: the quotient is off by at most one for m ≤ 2^20, and the comparisons
// make the result exactly the comparison count, with no loop over m (which
// keeps the CPU lane loop vectorisable and the CUDA thread branch-free).
// floor(clamp(q, 0, m)) without a call to floor: the conversion truncates,
// which is floor once q is clamped non-negative (and NaN becomes 0).
template <typename acc_t>
FASTSPIKE_HD int clamp_count(acc_t q, int m) {
  q = q > acc_t(0) ? q : acc_t(0);
  q = q < acc_t(m) ? q : acc_t(m);
  return static_cast<int>(q);
}

template <typename acc_t, int kGroup>
FASTSPIKE_HD int positive_count(acc_t h, acc_t unit, int group_size) {
  if (kGroup == 1) return (h >= unit) ? 1 : 0;
  const int m = kGroup > 0 ? kGroup : group_size;
  int k = clamp_count(div_rn(h, unit), m);
  // Each fixup is a comparison added as 0/1 and clamped after, never a test
  // of two conditions: GCC 12 cannot vectorise a select between two masks,
  // and (k < m) & (h ≥ …) made the whole lane loop of a group neuron scalar.
  k += static_cast<int>(h >= mul_rn(acc_t(k + 1), unit));
  k = k < m ? k : m;
  k -= static_cast<int>(h < mul_rn(acc_t(k), unit));
  return k > 0 ? k : 0;
}

template <typename acc_t>
FASTSPIKE_HD acc_t negative_level(int j, acc_t unit, acc_t neg_margin) {
  return sub_rn(-neg_margin, mul_rn(acc_t(j - 1), unit));  // L_j = −ε − (j−1)·u
}

template <typename acc_t, int kGroup>
FASTSPIKE_HD int negative_count(acc_t v, acc_t unit, acc_t neg_margin, int group_size) {
  if (kGroup == 1) return (v <= -neg_margin) ? 1 : 0;
  const int m = kGroup > 0 ? kGroup : group_size;
  // floor(q) + 1 with q = (−ε − v)/u, clamped to [0, m]; q < 0 gives 1 here,
  // which the second fixup takes back.
  int n = clamp_count(div_rn(sub_rn(-neg_margin, v), unit), m) + 1;
  n = n < m ? n : m;
  // Fixups as in positive_count: add the comparison, clamp after.
  n += static_cast<int>(v <= negative_level(n + 1, unit, neg_margin));
  n = n < m ? n : m;
  // !(v <= L) rather than v > L: a NaN membrane must end with no negative spikes.
  n -= static_cast<int>(!(v <= negative_level(n, unit, neg_margin)));
  return n > 0 ? n : 0;
}

// ---------------------------------------------------------------------------
// One time step of the generalised neuron (docs/design.md §2). `unit` is u = θ/m.
// Updates (v, count) in place and returns k⁺ − k⁻ in acc_t (as the reference
// computes it, so a count that wrapped around int32 gives no integer overflow;
// the count itself wraps as torch's int32 arithmetic does). `charged` receives the
// membrane after charging (what the surrogate backward needs) and
// `negative_open` whether the negative-spike count was below the spike count
// (the only case in which k⁻ depends on v).
template <typename acc_t, bool kSigned, int kGroup>
FASTSPIKE_HD acc_t neuron_step(acc_t x, acc_t unit, acc_t neg_margin, int group_size,
                             acc_t& v, int32_t& count, acc_t& charged,
                             bool& negative_open) {
  const acc_t h = add_rn(v, x);
  charged = h;
  const int k_pos = positive_count<acc_t, kGroup>(h, unit, group_size);
  acc_t v_new = sub_rn(h, mul_rn(acc_t(k_pos), unit));
  int32_t c = wrapping_add(count, k_pos);
  int k_neg = 0;
  negative_open = false;
  if (kSigned) {
    const int n_neg = negative_count<acc_t, kGroup>(v_new, unit, neg_margin, group_size);
    negative_open = n_neg < c;
    k_neg = negative_open ? n_neg : c;  // min(c, n⁻): never more than fired
    v_new = add_rn(v_new, mul_rn(acc_t(k_neg), unit));
    c = wrapping_sub(c, k_neg);
  }
  v = v_new;
  count = c;
  return sub_rn(acc_t(k_pos), acc_t(k_neg));
}

// Derivative of the Heaviside step [z ≥ 0] used by the surrogate backward, in
// units of u: the caller passes z/u and multiplies nothing back, because the
// spike output carries a factor u that cancels the 1/u of the chain rule.
enum SurrogateKind : int { kSurrogateSigmoid = 0, kSurrogateAtan = 1 };

// The sigmoid surrogate's derivative is taken as exactly 0 where |α·z| > 40
// (it is below α·e^-40 ≈ 4e-18·α there). Its far tail otherwise fills the
// gradients with values so small that their products with upstream gradients
// are denormal floats, and on Intel CPUs every denormal operand of the next
// convolution's backward takes a slow microcode path (a converted CIFAR
// ResNet-18 training step at T = 8: 1.26 s against 0.17 s with denormals
// flushed). The reference (fastspike/reference.py) cuts the same tail.
constexpr double kSigmoidTailCut = 40.0;

template <typename acc_t, int kKind>
FASTSPIKE_HD acc_t surrogate_grad(acc_t z, acc_t alpha) {
  if (kKind == kSurrogateAtan) {
    // d/dz [atan(π/2·α·z)/π + 1/2]
    const acc_t w = acc_t(1.5707963267948966) * alpha * z;
    return alpha / (acc_t(2) * (acc_t(1) + w * w));
  }
  // d/dz sigmoid(α·z), cut to 0 where |α·z| > kSigmoidTailCut (see there).
  const acc_t a = alpha * z;
  const acc_t s = acc_t(1) / (acc_t(1) + exp_acc(-a));
  const acc_t d = alpha * s * (acc_t(1) - s);
  return (a > acc_t(kSigmoidTailCut) || a < -acc_t(kSigmoidTailCut)) ? acc_t(0) : d;
}

// d s_t / d h_t for one step with the reset path detached is a sum of terms:
// positive members j = 1..m contribute φ'((h − j·u)/u); when the negative side
// was open, negative members contribute φ'((L_j − v')/u), L_j = −ε − (j−1)·u,
// v' = h − k⁺·u. The backward sums them in that order (see backward_steps).
template <typename acc_t, int kKind>
FASTSPIKE_HD acc_t positive_term(acc_t h, int j, acc_t unit, acc_t inv_unit, acc_t alpha) {
  return surrogate_grad<acc_t, kKind>((h - mul_rn(acc_t(j), unit)) * inv_unit, alpha);
}

template <typename acc_t, int kKind>
FASTSPIKE_HD acc_t negative_term(acc_t v_after, int j, acc_t unit, acc_t inv_unit,
                                 acc_t neg_margin, acc_t alpha) {
  return surrogate_grad<acc_t, kKind>((negative_level(j, unit, neg_margin) - v_after) * inv_unit,
                                      alpha);
}

}  // namespace fastspike
