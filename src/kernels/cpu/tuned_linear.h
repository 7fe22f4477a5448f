// The decode step's dense projections as one GEMM each: out = x·wᵀ (+ bias) (+ out, accumulating: `h += x·Wᵀ`).
// On CUDA through cuBLASLt with the fastest of its heuristic's algorithms for each shape, timed once per shape on
// the first call outside a graph capture (EngineOptions::tuned_gemm); the CPU reference is ATen's addmm.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// x [S, K] and out [S, N] with contiguous rows of any stride (out may be column slices' parent: a packed GEMM's
// output), w [N, K] contiguous, bias [N] contiguous or undefined; one dtype (float32/bfloat16), one device.
void linear_tuned(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out,
                  bool accumulate);
void linear_tuned_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out,
                      bool accumulate);

}  // namespace rlaif::kernels
