// The neuron math of fastspike, written once for the CPU kernel, the CUDA
// kernel and NVRTC (docs/design.md §2). Everything here is a host-and-device function
// of plain values and pointers: no ATen, no standard library beyond <cstdint>,
// so the CPU test suite exercises exactly the arithmetic the GPU runs.
//
// Rounding: every operation of the forward dynamics goes through add_rn /
// sub_rn / mul_rn / div_rn. On the device these are the explicitly rounded
// intrinsics, which nvcc never contracts into fused multiply-adds; on the host
// the build passes -ffp-contract=off. Together with the reference doing the
// same operations in the same order, the forward agrees bit for bit.
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC has no <cstdint>: the widths nvcc uses on 64-bit Linux.
typedef long long int64_t;
typedef int int32_t;
typedef signed char int8_t;
typedef unsigned int uint32_t;
#else
#include <cmath>
#include <cstdint>
#include <cstring>
#endif

// Non-temporal (streaming) stores for the host forward's spike rows; SSE2 is
// part of x86-64, so both the baseline and the AVX2 build have them.
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__) && defined(__SSE2__)
#include <emmintrin.h>
#define FASTSPIKE_HAVE_STREAMING_STORES 1
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FASTSPIKE_HD __host__ __device__ __forceinline__
#else
#define FASTSPIKE_HD inline
#endif

namespace fastspike {

// ---------------------------------------------------------------------------
// Un-contracted, round-to-nearest arithmetic.
FASTSPIKE_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTSPIKE_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTSPIKE_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTSPIKE_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FASTSPIKE_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTSPIKE_HD double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTSPIKE_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTSPIKE_HD double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// e^a for the surrogate gradients. On the device expf. On the host a
// Cephes-style range reduction and polynomial (a few ulp in float), plain
// arithmetic that the compiler can vectorise where std::exp would be one scalar
// library call per lane. Arguments outside [−87, 88] are clamped (the sigmoid
// surrogate only needs "tiny" or "huge" there); NaN stays NaN.
FASTSPIKE_HD float exp_acc(float a) {
#ifdef __CUDA_ARCH__
  return expf(a);
#else
  float x = a < 88.0f ? a : 88.0f;
  x = x > -87.0f ? x : -87.0f;
  // n = round(x / ln 2), by truncation after adding ±0.5 (no floor call).
  const float t = x * 1.44269504088896341f;
  const int n = static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;  // x − n·ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // 2^n built from its exponent bits; n ∈ [−126, 127] after the clamp.
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // std::isnan, not a != a: GCC 12 vectorises only the former here.
  return std::isnan(a) ? a : y * scale;
#endif
}
FASTSPIKE_HD double exp_acc(double a) {
#ifdef __CUDA_ARCH__
  return ::exp(a);
#else
  return std::exp(a);
#endif
}

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

// a ± b modulo 2^32: int32 overflow is undefined behaviour in C++, and a
// count_init near 2^31 must not make the kernel's result depend on the compiler.
FASTSPIKE_HD int32_t wrapping_add(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}
FASTSPIKE_HD int32_t wrapping_sub(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) - static_cast<uint32_t>(b));
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

// ---------------------------------------------------------------------------
// Kernel bodies. Each takes the index the launcher hands one thread and does
// all T steps for it, so the CUDA __global__ wrappers only compute that index
// and a CPU test can walk the same grid (see cpu/grid_emulation.cpp).

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* x;          // [T, N]
  scalar_t* spikes;           // [T, N], may alias x
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

// kVec elements loaded or stored as one access on CUDA (float4 for float,
// 16 bytes being the widest access). The host loops index memory directly:
// copying a kVec-wide pack there costs more than the neuron math.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec < 16 ? sizeof(T) * kVec : 16) Pack {
  T val[kVec];
};

#ifndef __CUDA_ARCH__
// Copies one row of `bytes` from the lane buffer to dst (16-byte aligned)
// with non-temporal stores: a [T, N] output far larger than the caches is then
// written without first being read into them (the read-for-ownership a plain
// store costs, a third of the forward's memory traffic). Streamed rows are
// weakly ordered: the CPU launcher fences before each parallel task ends.
// Without SSE2, or for a row that is not a whole number of 16-byte chunks
// (the one-lane tail), a plain copy.
inline void stream_row(void* dst, const void* row, int64_t bytes) {
#ifdef FASTSPIKE_HAVE_STREAMING_STORES
  if (bytes % 16 == 0) {
    for (int64_t i = 0; i < bytes; i += 16) {
      const __m128i chunk =
          _mm_load_si128(reinterpret_cast<const __m128i*>(static_cast<const char*>(row) + i));
      _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(dst) + i), chunk);
    }
    return;
  }
#endif
  std::memcpy(dst, row, static_cast<size_t>(bytes));
}

// Asks for the row segment kPrefetchBlocks blocks ahead of `row` (bytes long)
// to be fetched into the caches. A block walks T rows at once, one stream per
// row; from T of about 16 up that is more streams than the hardware
// prefetchers follow (measured on the development EPYC, float32 IF, N = 2^20:
// 1.2-2x faster at T = 16 and 32, no change at T = 8). Prefetches never
// fault, so reading past the end of x is harmless; the address is formed as
// an integer. A hint only: compilers without __builtin_prefetch skip it.
constexpr int kPrefetchBlocks = 4;

inline void prefetch_ahead(const void* row, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(row) + kPrefetchBlocks * bytes;
  for (int64_t i = 0; i < bytes; i += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + i));
  }
#else
  (void)row;
  (void)bytes;
#endif
}
#endif

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
