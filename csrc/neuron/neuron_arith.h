// Arithmetic helpers of the neuron math (docs/design.md §2), for the CPU
// kernels, nvcc and NVRTC alike: the explicitly rounded add/sub/mul/div, the
// exponential of the surrogate gradients and int32 arithmetic that wraps.
// Host-and-device functions of plain values only: no ATen; on the host <cmath>,
// <cstdint> and <cstring> (std::exp, std::isnan, std::memcpy), under NVRTC no
// standard library at all (it gets its own integer typedefs below).
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

// a ± b modulo 2^32: int32 overflow is undefined behaviour in C++, and a
// count_init near 2^31 must not make the kernel's result depend on the compiler.
FASTSPIKE_HD int32_t wrapping_add(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}
FASTSPIKE_HD int32_t wrapping_sub(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) - static_cast<uint32_t>(b));
}

}  // namespace fastspike
