// CUDA graphs through ATen's CUDAGraph: capture on a pool stream (capture cannot run on the legacy default
// stream), ordered after the caller's stream, which then waits for the capture to finish.
#include "kernels/cuda/graph.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <cuda_profiler_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <fmt/format.h>

#include "core/error.h"

namespace rlaif::kernels {

void* graph_capture_cuda(const std::function<void()>& body) {
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  const auto caller = at::cuda::getCurrentCUDAStream();
  const auto side = at::cuda::getStreamFromPool();
  at::cuda::CUDAEvent ready;
  ready.record(caller);
  ready.block(side);
  {
    c10::cuda::CUDAStreamGuard guard(side);
    graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    body();
    graph->capture_end();
  }
  at::cuda::CUDAEvent done;
  done.record(side);
  done.block(caller);
  return graph.release();
}

void graph_replay_cuda(void* graph) { static_cast<at::cuda::CUDAGraph*>(graph)->replay(); }

void graph_destroy_cuda(void* graph) { delete static_cast<at::cuda::CUDAGraph*>(graph); }

void profiler_range_cuda(bool start) {
  const cudaError_t e = start ? cudaProfilerStart() : cudaProfilerStop();
  if (e != cudaSuccess)
    throw InternalError(fmt::format("[kernels] cudaProfiler{} failed: {}", start ? "Start" : "Stop", cudaGetErrorString(e)));
}

}  // namespace rlaif::kernels
