// The CPU kernels every translation unit may call: the Python module's functions
// (bindings.cpp) and the decoder stack that chains them (cpu_decoder.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>

torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels,
                           const std::optional<torch::Tensor>& bias, int64_t N);
torch::Tensor q4_panel_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                              const std::optional<torch::Tensor>& bias, int64_t N);
torch::Tensor q8_panel_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                              const std::optional<torch::Tensor>& bias, int64_t N);
bool int8_linear_supported();
torch::Tensor q4_int8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                             const std::optional<torch::Tensor>& bias, int64_t N);
torch::Tensor q8_int8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                             const torch::Tensor& sums, const std::optional<torch::Tensor>& bias, int64_t N);
torch::Tensor rms_norm(torch::Tensor& x, const torch::Tensor& weight, double eps,
                       const std::optional<torch::Tensor>& add);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor argmax_rows(const torch::Tensor& logits);
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slots);
void rotary_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads);
void tree_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                    const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                    const torch::Tensor& seq_lens, const torch::Tensor& cu_seqlens_q,
                    const torch::Tensor& tree_mask, int64_t first_seq, int64_t first_tree_row, double scale);
