// A decode or tree-verification step's pass through all decoder layers in one call (CPU, fp32).
//
// models/llama.py chains about fifteen calls a layer (norms, linear layers, the rotary
// embedding, the cache writes, attention, views and checks between them); at batch 1 on a
// 2-core CPU the Python and dispatch work between the kernels was ~2 ms of a ~7 ms step of
// SmolLM2-135M (docs/benchmarks.md, thirteenth session), as much as all its attention and norms.
// CpuDecoder holds each layer's packed weights once and runs the same kernels with the same
// arguments in the same order from C++, without the GIL: a step gets the bits llama.py's
// layers give it (tests/models/test_cpu_decoder.py), with none of the glue.
//
// It covers the steps whose every query goes through tree_attention: decode and tree steps
// (and, with --int8-linear's batch-invariant attention, prompt runs laid out as trees).
// Steps with prompt chunks for SDPA stay in Python (models/cpu_attention.py).
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "kernels.h"
#include "linear_spec.h"

class CpuDecoder {
 public:
  // linears: 4 a layer (qkv, o, gate_up, down), norms: 2 a layer (input, post-attention).
  CpuDecoder(const std::vector<LinearSpec>& linears, std::vector<torch::Tensor> norms, double eps,
             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t max_quantized_rows, double scale)
      : norms_(std::move(norms)), eps_(eps), scale_(scale), heads_(num_heads), kv_heads_(num_kv_heads),
        head_dim_(head_dim), max_quantized_rows_(max_quantized_rows) {
    TORCH_CHECK(!linears.empty() && linears.size() == 4 * (norms_.size() / 2) && norms_.size() % 2 == 0,
                "expected 4 linear layers and 2 norms a decoder layer");
    for (const auto& spec : linears) linears_.push_back(make_linear(spec));
  }

  int64_t num_layers() const { return static_cast<int64_t>(norms_.size() / 2); }

  // x [T, H]: the embeddings; k_cache, v_cache [layers, blocks, block_size, Hkv, D]; the rest
  // is the step's attention metadata (models/attention.py), every sequence a tree sequence.
  // -> (the last layer's output, the residual stream before it), as LlamaModel's loop leaves them.
  std::tuple<torch::Tensor, torch::Tensor> forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                                                   const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                                   const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                                                   const torch::Tensor& seq_lens, const torch::Tensor& cu_seqlens_q,
                                                   const torch::Tensor& tree_mask) const {
    TORCH_CHECK(x.dim() == 2 && k_cache.dim() == 5 && k_cache.size(0) == num_layers() &&
                v_cache.sizes() == k_cache.sizes(), "expected x [T, H] and caches [layers, blocks, block, Hkv, D]");
    const int64_t T = x.size(0), rotated = heads_ + kv_heads_;
    torch::Tensor residual = x;
    for (int64_t l = 0; l < num_layers(); ++l) {
      const Linear* linear = &linears_[4 * l];
      torch::Tensor h = l == 0 ? rms_norm(residual, norms_[0], eps_, std::nullopt)
                               : rms_norm(residual, norms_[2 * l], eps_, x);
      torch::Tensor qkv = linear[0](h, max_quantized_rows_).view({T, -1, head_dim_});
      rotary_(qkv, cos, sin, rotated);
      torch::Tensor k_layer = k_cache.select(0, l), v_layer = v_cache.select(0, l);
      write_kv(qkv.slice(1, heads_, rotated), qkv.slice(1, rotated), k_layer, v_layer, slot_mapping);
      const torch::Tensor q = qkv.slice(1, 0, heads_).contiguous();
      torch::Tensor attended = torch::empty_like(q);
      tree_attention(attended, q, k_layer, v_layer, block_tables, seq_lens, cu_seqlens_q, tree_mask, 0, 0, scale_);
      h = rms_norm(residual, norms_[2 * l + 1], eps_, linear[1](attended.view({T, -1}), max_quantized_rows_));
      x = linear[3](silu_mul(linear[2](h, max_quantized_rows_)), max_quantized_rows_);
    }
    return {x, residual};
  }

 private:
  std::vector<Linear> linears_;
  std::vector<torch::Tensor> norms_;
  double eps_, scale_;  // the norms' epsilon, attention's 1 / sqrt(head_dim)
  int64_t heads_, kv_heads_, head_dim_, max_quantized_rows_;
};

void register_cpu_decoder(py::module& m) {
  py::class_<CpuDecoder>(m, "CpuDecoder", py::module_local(),  // local: two builds may share a process (benchmarks.kernels_ab)
                         "all decoder layers of a decode or tree step in one call")
      .def(py::init<const std::vector<LinearSpec>&, std::vector<torch::Tensor>, double, int64_t, int64_t, int64_t,
                    int64_t, double>())
      .def("forward", &CpuDecoder::forward, py::call_guard<py::gil_scoped_release>());
}
