// out = x·wᵀ (+ bias) (+ out) through cuBLASLt: per shape, the heuristic's candidate algorithms are each timed once
// (on a scratch output, outside any graph capture) and the fastest is kept for every later call, captures included.
// The decode step's GEMMs at batch 64 run on as few as 64 of the H100's 132 SMs under the default heuristic choice
// (session 9 profile: o 1.0 TB/s, q/k/v 1.2 TB/s); a measured choice is the cheapest test of a better one.
#include "kernels/cuda/tuned_linear.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <tuple>

#include "core/error.h"

namespace rlaif::kernels {

namespace {

constexpr int kCandidates = 16;  // heuristic results timed per shape
constexpr int kTimedRuns = 5;

void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw InternalError(fmt::format("[kernels] cuBLASLt {} failed: status {}", what, static_cast<int>(s)));
}

// The descriptors of one call: D [N × S] (column-major view of out) = op(w)ᵀ [N × K] · x [K × S] (+ C = D).
struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  Problem(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out) {
    const cudaDataType dt = x.scalar_type() == at::kFloat ? CUDA_R_32F : CUDA_R_16BF;
    check_lt(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul descriptor");
    const cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
    check_lt(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)), "transa");
    check_lt(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof(n)), "transb");
    if (bias.defined()) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      const void* ptr = bias.data_ptr();
      check_lt(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)), "epilogue");
      check_lt(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr, sizeof(ptr)), "bias");
      check_lt(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt, sizeof(dt)), "bias type");
    }
    const int64_t S = x.size(0), K = x.size(1), N = w.size(0);
    check_lt(cublasLtMatrixLayoutCreate(&a, dt, K, N, w.stride(0)), "layout of w");
    check_lt(cublasLtMatrixLayoutCreate(&b, dt, K, S, x.stride(0)), "layout of x");
    check_lt(cublasLtMatrixLayoutCreate(&c, dt, N, S, out.stride(0)), "layout of out");
  }
  ~Problem() {
    cublasLtMatrixLayoutDestroy(c);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatmulDescDestroy(op);
  }
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;
};

// Shape, strides, dtype, epilogue, accumulation and the pointers' 16-byte alignment: what the chosen algorithm
// depends on (cuBLASLt's kernels may require aligned operands).
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool, bool, int>;

int alignment_bits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out) {
  auto aligned = [](const at::Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  return aligned(x) | aligned(w) << 1 | aligned(bias) << 2 | aligned(out) << 3;
}

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
std::map<Key, cublasLtMatmulAlgo_t>& cache() {
  static std::map<Key, cublasLtMatmulAlgo_t> c;
  return c;
}

// One matmul with `algo` (nullptr: cuBLASLt's own heuristic choice); its status, for the tuning to skip on.
cublasStatus_t matmul(const Problem& p, const cublasLtMatmulAlgo_t* algo, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& out, bool accumulate, cudaStream_t stream) {
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  return cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p.op, &alpha, w.data_ptr(), p.a, x.data_ptr(), p.b,
                        &beta, out.data_ptr(), p.c, out.data_ptr(), p.c, algo, at::cuda::getCUDABlasLtWorkspace(),
                        at::cuda::getCUDABlasLtWorkspaceSize(), stream);
}

void run(const Problem& p, const cublasLtMatmulAlgo_t* algo, const at::Tensor& x, const at::Tensor& w,
         const at::Tensor& out, bool accumulate, cudaStream_t stream) {
  check_lt(matmul(p, algo, x, w, out, accumulate, stream), "matmul");
}

// The fastest candidate on a scratch copy of out (the real out is untouched: with accumulate it is the residual).
cublasLtMatmulAlgo_t tune(const Problem& p, const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                          bool accumulate, cudaStream_t stream) {
  cublasLtMatmulPreference_t pref = nullptr;
  check_lt(cublasLtMatmulPreferenceCreate(&pref), "preference");
  const size_t ws = at::cuda::getCUDABlasLtWorkspaceSize();
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
           "workspace preference");
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), p.op, p.a, p.b, p.c,
                                                           p.c, pref, kCandidates, results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  check_lt(st, "heuristic");
  if (found == 0) throw InternalError("[kernels] cuBLASLt has no algorithm for this GEMM");
  // A scratch output with out's row stride (the layout's ld) and 16-byte alignment, zeros: only the time is wanted.
  const int64_t S = out.size(0), N = out.size(1), ld = out.stride(0);
  const int64_t shift = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16) / out.element_size();
  const at::Tensor target = at::zeros({shift + (S - 1) * ld + N}, out.options()).as_strided({S, N}, {ld, 1}, shift);
  float best_ms = 0.0f;
  int best = -1;
  for (int i = 0; i < found; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
    // An algorithm this shape rejects at run time is skipped, not fatal.
    if (matmul(p, &results[i].algo, x, w, target, accumulate, stream) != CUBLAS_STATUS_SUCCESS) continue;
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record(at::cuda::getCurrentCUDAStream());
    for (int r = 0; r < kTimedRuns; ++r) run(p, &results[i].algo, x, w, target, accumulate, stream);
    stop.record(at::cuda::getCurrentCUDAStream());
    stop.synchronize();
    const float ms = start.elapsed_time(stop);
    if (best < 0 || ms < best_ms) best = i, best_ms = ms;
  }
  if (best < 0) throw InternalError("[kernels] no cuBLASLt algorithm ran for this GEMM");
  return results[best].algo;
}

}  // namespace

void linear_tuned_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out,
                       bool accumulate) {
  if (x.size(0) == 0 || w.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const Problem p(x, w, bias, out);
  const Key key{x.get_device(), x.size(0), x.size(1), w.size(0), x.stride(0), w.stride(0), out.stride(0),
                static_cast<int>(x.scalar_type()), bias.defined(), accumulate, alignment_bits(x, w, bias, out)};
  cublasLtMatmulAlgo_t algo;
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto it = cache().find(key);
    if (it == cache().end()) {
      cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess) throw InternalError("[kernels] cudaStreamIsCapturing failed");
      if (capturing != cudaStreamCaptureStatusNone) {
        // No timing inside a capture: the heuristic's choice (at::linear's), not cached, so an eager call tunes.
        return run(p, nullptr, x, w, out, accumulate, stream);
      }
      it = cache().emplace(key, tune(p, x, w, out, accumulate, stream)).first;
    }
    algo = it->second;
  }
  run(p, &algo, x, w, out, accumulate, stream);
}

}  // namespace rlaif::kernels
