// CUDA graph capture and replay for the engine's decode step, reached through the kernel registry so the
// CPU build never sees CUDA headers.
#pragma once

#include <functional>

namespace rlaif::kernels {

void* graph_capture_cuda(const std::function<void()>& body);
void graph_replay_cuda(void* graph);
void graph_destroy_cuda(void* graph);
// The profilers' capture range (Nsight Compute's --profile-from-start off): start or stop it.
void profiler_range_cuda(bool start);

}  // namespace rlaif::kernels
