// Precompiled header for the libtorch-facing layers: the narrow ATen header, never <torch/torch.h>.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <string>
#include <vector>
