// The CPU kernels' Python module (models/cpu_kernels.py builds it).
#include <torch/extension.h>

#include "kernels.h"

void register_cpu_decoder(py::module& m);  // cpu_decoder.cpp
void register_cpu_heads(py::module& m);    // cpu_heads.cpp

// The long kernels run without the GIL (the server's HTTP thread runs meanwhile); they touch
// no Python object.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("panel_linear", &panel_linear, "y = x W^T + b over weights packed in 16-column panels",
        py::call_guard<py::gil_scoped_release>());
  m.def("q4_panel_linear", &q4_panel_linear, "panel_linear over 4-bit panels, dequantized exactly",
        py::call_guard<py::gil_scoped_release>());
  m.def("q8_panel_linear", &q8_panel_linear, "panel_linear over 8-bit panels, dequantized exactly",
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear_supported", &int8_linear_supported, "whether this CPU runs the 8-bit integer kernels");
  m.def("q4_int8_linear", &q4_int8_linear, "x rounded to 8 bits times 4-bit weights, integer dot products",
        py::call_guard<py::gil_scoped_release>());
  m.def("q8_int8_linear", &q8_int8_linear, "x rounded to 8 bits times 8-bit weights, integer dot products",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "RMSNorm of each row of x [T, H] (after x += add, in place, if given)",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("add") = py::none());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of gate_up [T, 2I]");
  m.def("argmax_rows", &argmax_rows, "each row's argmax (torch.argmax's: the first largest, NaN first)",
        py::call_guard<py::gil_scoped_release>());
  m.def("write_kv", &write_kv, "new keys and values into their cache slots (fp32 or fp16 caches)");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding of x's first heads, in place");
  m.def("tree_attention", &tree_attention, "paged decode/tree attention, written into out's tree rows",
        py::call_guard<py::gil_scoped_release>());
  register_cpu_decoder(m);
  register_cpu_heads(m);
}
