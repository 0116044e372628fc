// A PackedLinear (models/packed_linear.py) as the C++ stacks call it (cpu_decoder.cpp,
// cpu_heads.cpp): its kernel, that kernel's weight tensors, and for exact 4/8-bit panels the
// fp32 panels that calls of more than max_quantized_rows take; made from the tuple that
// PackedLinear.kernel_spec() gives.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

struct Linear {
  enum class Kind { Panels, Q4Panels, Q8Panels, Q4Int8, Q8Int8 };
  Kind kind;
  std::vector<torch::Tensor> weights;
  torch::Tensor panels;
  std::optional<torch::Tensor> bias;
  int64_t N;

  torch::Tensor operator()(const torch::Tensor& x, int64_t max_quantized_rows) const {
    const bool quantized_fits = x.size(0) <= max_quantized_rows;
    switch (kind) {
      case Kind::Q4Int8: return q4_int8_linear(x, weights[0], weights[1], bias, N);
      case Kind::Q8Int8: return q8_int8_linear(x, weights[0], weights[1], weights[2], bias, N);
      case Kind::Q4Panels:
        if (quantized_fits) return q4_panel_linear(x, weights[0], weights[1], bias, N);
        break;
      case Kind::Q8Panels:
        if (quantized_fits) return q8_panel_linear(x, weights[0], weights[1], bias, N);
        break;
      case Kind::Panels: break;
    }
    return panel_linear(x, panels, bias, N);
  }
};

using LinearSpec = std::tuple<std::string, std::vector<torch::Tensor>, std::optional<torch::Tensor>,
                              std::optional<torch::Tensor>, int64_t>;  // kernel, weights, panels, bias, N

inline Linear make_linear(const LinearSpec& spec) {
  const auto& [name, weights, panels, bias, N] = spec;
  const std::pair<const char*, std::pair<Linear::Kind, size_t>> kinds[] = {
      {"panel_linear", {Linear::Kind::Panels, 0}},     {"q4_panel_linear", {Linear::Kind::Q4Panels, 2}},
      {"q8_panel_linear", {Linear::Kind::Q8Panels, 2}}, {"q4_int8_linear", {Linear::Kind::Q4Int8, 2}},
      {"q8_int8_linear", {Linear::Kind::Q8Int8, 3}}};
  for (const auto& [known, kind] : kinds) {
    if (name != known) continue;
    TORCH_CHECK(weights.size() == kind.second, name, " takes ", kind.second, " weight tensors, got ", weights.size());
    const bool needs_panels = kind.first == Linear::Kind::Panels || kind.first == Linear::Kind::Q4Panels ||
                              kind.first == Linear::Kind::Q8Panels;
    TORCH_CHECK(!needs_panels || panels.has_value(), name, " needs its fp32 panels");
    return {kind.first, weights, panels.value_or(torch::Tensor()), bias, N};
  }
  TORCH_CHECK(false, "unknown linear kernel ", name);
}

}  // namespace
