// SwiGLU's gate: silu(gate) * up, as `at::silu(gate) * up` computes it (models/layers.h swiglu).
// ATen rounds twice: silu in float32 rounded to the dtype (its output is a tensor), then the product in float32
// rounded again. The kernels do the same, so bfloat16 results equal ATen's up to float32 exp differences.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// gate, up [N, F] (rows may be strided, e.g. the halves of a fused [N, 2F] projection; last dim contiguous),
// out [N, F] contiguous; one dtype (float32/bfloat16), one device.
void silu_mul(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);
// gate_up [N, 2F]: gate is the first half of each row, up the second. Returns [N, F].
at::Tensor silu_mul(const at::Tensor& gate_up);
void silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);

}  // namespace rlaif::kernels
