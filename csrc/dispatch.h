// Runtime option -> compile-time template argument, and the argument checks shared by launchers.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "kdkernels/divergence.cuh"

namespace kdkernels {

// Accumulation type: float64 for float64 inputs, float32 for float32/float16/bfloat16.
template <class T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

template <class Fn>
void with_divergence(int64_t d, Fn&& fn) {
  switch (d) {
    case kForwardKL: fn(std::integral_constant<int, kForwardKL>{}); break;
    case kReverseKL: fn(std::integral_constant<int, kReverseKL>{}); break;
    case kJSD: fn(std::integral_constant<int, kJSD>{}); break;
    case kSkewForwardKL: fn(std::integral_constant<int, kSkewForwardKL>{}); break;
    case kSkewReverseKL: fn(std::integral_constant<int, kSkewReverseKL>{}); break;
    case kTVD: fn(std::integral_constant<int, kTVD>{}); break;
    case kAKL: fn(std::integral_constant<int, kAKL>{}); break;
    default: TORCH_CHECK(false, "kdkernels native: unknown divergence code ", d);
  }
}

#define KD_DISPATCH_FLOAT(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

}  // namespace kdkernels
