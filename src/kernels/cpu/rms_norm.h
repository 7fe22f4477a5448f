// RMSNorm (optionally fused with the residual add before it): CPU reference, dispatcher and CUDA hook.
// Numerics of models/layers.h rms_norm: normalise in float32, round to the dtype, multiply by w in the dtype.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// out = w * to_dtype(x * rsqrt(mean(x^2) + eps)), all of it in float32 but the two roundings to the dtype.
// x [..., D] contiguous float32/bfloat16, w [D] and out (x's shape, contiguous) of x's dtype and device.
void rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& out);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
void rms_norm_cpu(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& out);

// The residual add and the next norm: h = to_dtype(h + delta) in place, then out = rms_norm(h, w, eps).
// Equals `h = h + delta; out = layers::rms_norm(h, w, eps)`. h, delta, out [..., D] contiguous, same dtype.
void add_rms_norm(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps, const at::Tensor& out);
void add_rms_norm_cpu(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps,
                      const at::Tensor& out);

}  // namespace rlaif::kernels
