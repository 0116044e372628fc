// A draft of independent Medusa-style heads (models/heads.py) in one call (CPU, fp32).
//
// Drafting for a step runs each head's token projection and residual blocks, the draft
// vocabulary's unembedding, a softmax and a top-k: about forty small operations, whose Python
// and dispatch work cost more than their arithmetic (a 4-head draft at batch 1: ~0.42 ms with
// the weights in cache, of which the 13 linear layers take ~0.12; docs/benchmarks.md,
// nineteenth session). CpuHeads holds the heads' packed weights once and runs the same
// kernels and ATen operators in the same order from C++, without the GIL: the same
// probabilities and ids, bit for bit, as MedusaHeads.top_guesses(heads(hidden, embeds))
// (tests/models/test_cpu_decoder.py).
#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "linear_spec.h"

class CpuHeads {
 public:
  // token_proj: one a head (none: heads that read no token); blocks: num_layers a head, head
  // by head; unembedding: the draft vocabulary's rows of the base model's unembedding.
  CpuHeads(const std::vector<LinearSpec>& token_proj, const std::vector<LinearSpec>& blocks, int64_t num_layers,
           const LinearSpec& unembedding, int64_t max_quantized_rows)
      : layers_(num_layers), unembedding_(make_linear(unembedding)), max_quantized_rows_(max_quantized_rows) {
    TORCH_CHECK(num_layers > 0 && !blocks.empty() && blocks.size() % num_layers == 0,
                "expected num_layers residual blocks a head");
    heads_ = static_cast<int64_t>(blocks.size()) / num_layers;
    TORCH_CHECK(token_proj.empty() || static_cast<int64_t>(token_proj.size()) == heads_,
                "expected one token projection a head, or none");
    for (const auto& spec : token_proj) token_proj_.push_back(make_linear(spec));
    for (const auto& spec : blocks) blocks_.push_back(make_linear(spec));
  }

  // hidden [N, H]: each sequence's last kept state; next_embeds [N, H]: the embedding of the
  // token the base model picked from it (heads with a token projection). -> (probabilities,
  // indices into the draft vocabulary) of each head's k likeliest guesses, [N, heads, k].
  std::tuple<torch::Tensor, torch::Tensor> top_guesses(const torch::Tensor& hidden,
                                                       const std::optional<torch::Tensor>& next_embeds,
                                                       int64_t k) const {
    TORCH_CHECK(hidden.dim() == 2, "expected hidden [N, H]");
    TORCH_CHECK(token_proj_.empty() == !next_embeds.has_value(), "next_embeds go with a token projection");
    const torch::Tensor state = hidden.contiguous();
    const torch::Tensor embeds = next_embeds.has_value() ? next_embeds->contiguous() : torch::Tensor();
    std::vector<torch::Tensor> outputs;
    for (int64_t h = 0; h < heads_; ++h) {
      torch::Tensor x = token_proj_.empty() ? state : state + token_proj_[h](embeds, max_quantized_rows_);
      for (int64_t l = 0; l < layers_; ++l)   // a residual block: x + SiLU(W x + b)
        x = x + at::silu(blocks_[h * layers_ + l](x, max_quantized_rows_));
      outputs.push_back(x);
    }
    const torch::Tensor guesses = at::stack(outputs, 1);   // [N, heads, H]
    const torch::Tensor logits = unembedding_(guesses.reshape({-1, hidden.size(1)}), max_quantized_rows_)
                                     .view({hidden.size(0), heads_, unembedding_.N});
    auto [values, indices] = logits.softmax(-1).topk(std::min(k, logits.size(-1)), -1);
    return {values, indices};
  }

 private:
  int64_t layers_, heads_ = 0;
  std::vector<Linear> token_proj_, blocks_;
  Linear unembedding_;
  int64_t max_quantized_rows_;
};

void register_cpu_heads(py::module& m) {
  py::class_<CpuHeads>(m, "CpuHeads", py::module_local(), "a draft of independent heads in one call")
      .def(py::init<const std::vector<LinearSpec>&, const std::vector<LinearSpec>&, int64_t, const LinearSpec&,
                    int64_t>())
      .def("top_guesses", &CpuHeads::top_guesses, py::call_guard<py::gil_scoped_release>());
}
