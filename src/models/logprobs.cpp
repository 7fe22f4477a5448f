// Target-token log-probs through the LM head without materialising [N, V] logits for all rows: forward and
// backward both walk the rows in chunks, recomputing each chunk's logits (activation memory O(chunk · V)).
#include <torch/csrc/autograd/custom_function.h>

#include "core/error.h"
#include "models/decoder.h"

namespace rlaif {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

struct ChunkedLogProb : public torch::autograd::Function<ChunkedLogProb> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& targets, int64_t chunk) {
    const int64_t N = hidden.size(0);
    at::Tensor out = at::empty({N}, hidden.options().dtype(at::kFloat));
    at::Tensor lse = at::empty({N}, hidden.options().dtype(at::kFloat));
    for (int64_t s = 0; s < N; s += chunk) {
      const int64_t n = std::min(chunk, N - s);
      at::Tensor logits = at::linear(hidden.narrow(0, s, n), weight).to(at::kFloat);  // [n, V]
      at::Tensor l = at::logsumexp(logits, -1);                                         // [n]
      at::Tensor t = logits.gather(1, targets.narrow(0, s, n).unsqueeze(1)).squeeze(1);
      out.narrow(0, s, n).copy_(t - l);
      lse.narrow(0, s, n).copy_(l);
    }
    ctx->save_for_backward({hidden, weight, targets, lse});
    ctx->saved_data["chunk"] = chunk;
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &weight = saved[1], &targets = saved[2], &lse = saved[3];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const at::Tensor go = grads[0].to(at::kFloat);  // [N]
    const bool need_h = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const int64_t N = hidden.size(0);
    at::Tensor gh = need_h ? at::empty_like(hidden) : at::Tensor();
    at::Tensor gw = need_w ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat)) : at::Tensor();
    for (int64_t s = 0; s < N && (need_h || need_w); s += chunk) {
      const int64_t n = std::min(chunk, N - s);
      at::Tensor h = hidden.narrow(0, s, n);
      at::Tensor logits = at::linear(h, weight).to(at::kFloat);                         // [n, V]
      // d/dlogits of (logit_t - lse) = onehot(t) - softmax; scaled by the incoming gradient.
      at::Tensor g = at::exp(logits - lse.narrow(0, s, n).unsqueeze(1)).neg_();
      g.scatter_add_(1, targets.narrow(0, s, n).unsqueeze(1), at::ones({n, 1}, g.options()));
      g.mul_(go.narrow(0, s, n).unsqueeze(1));
      if (need_h) gh.narrow(0, s, n).copy_(at::matmul(g.to(weight.scalar_type()), weight));
      if (need_w) gw.add_(at::matmul(g.t(), h.to(at::kFloat)));
    }
    return {gh, need_w ? gw.to(weight.scalar_type()) : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor chunked_target_logprobs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                   int64_t chunk_rows) {
  RLAIF_CHECK(hidden.dim() == 2 && weight.dim() == 2 && targets.dim() == 1, "hidden [N,D], weight [V,D], targets [N]");
  RLAIF_CHECK(chunk_rows > 0, "chunk_rows {}", chunk_rows);
  return ChunkedLogProb::apply(hidden, weight, targets, chunk_rows);
}

}  // namespace rlaif
