// Argument checks shared by the kernels' CPU references and dispatchers (the CUDA side gets checked arguments).
#pragma once

#include <ATen/ATen.h>

#include "core/error.h"

namespace rlaif::kernels {

// The activation dtypes every kernel supports: float32 and bfloat16.
inline void check_activation(const at::Tensor& t, const char* op, const char* name) {
  RLAIF_CHECK(t.defined(), "{}: {} is undefined", op, name);
  RLAIF_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "{}: {} has dtype {}, want float32 or "
              "bfloat16", op, name, c10::toString(t.scalar_type()));
}

// `t` has `like`'s dtype and device.
inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  RLAIF_CHECK(t.defined() && t.scalar_type() == like.scalar_type() && t.device() == like.device(),
              "{}: {} must have dtype {} on {}", op, name, c10::toString(like.scalar_type()), like.device().str());
}

inline void check_index(const at::Tensor& t, const at::Tensor& like, int64_t n, const char* op, const char* name) {
  RLAIF_CHECK(t.defined() && (t.scalar_type() == at::kLong || t.scalar_type() == at::kInt) && t.dim() == 1 &&
                  t.size(0) == n && t.is_contiguous() && t.device() == like.device(),
              "{}: {} must be a contiguous int32/int64 vector of {} on {}", op, name, n, like.device().str());
}

// Whether t (if defined) starts 16-byte aligned: what the CUDA kernels' vector paths need of a tensor's start.
inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Reads element i of an int32 or int64 vector (CPU tensors).
inline int64_t index_at(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kLong ? t.data_ptr<int64_t>()[i] : t.data_ptr<int32_t>()[i];
}

}  // namespace rlaif::kernels
