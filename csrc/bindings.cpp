// pybind11 bindings: the module fused_lora._C (wrapped by fused_lora/ops/cpu_ops.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor

#include "isa.h"
#include "lora_cpu.h"
#include "philox.h"

namespace {

namespace py = pybind11;

// The seed as an int, from a Python int or a 0-d int64 CPU tensor holding one.
// NOTE: read here, with the GIL held, straight from the tensor's memory:
// int(tensor) in Python costs about a microsecond per op call.
int64_t seed_value(py::handle seed) {
  if (THPVariable_Check(seed.ptr())) {
    const at::Tensor& t = THPVariable_Unpack(seed.ptr());
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() == 1,
                "seed: expected an int or a one-element int64 CPU tensor, got a ", t.scalar_type(),
                " tensor of shape ", t.sizes(), " on ", t.device());
    return *t.const_data_ptr<int64_t>();
  }
  return seed.cast<int64_t>();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lora C++ CPU backend: Philox dropout mask and fused LoRA forward/backward";
  // NOTE: every op releases the GIL; its loops run on ATen's OpenMP threads.
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.def("keep_mask", &fused_lora::keep_mask, "bool (rows, cols) keep mask", py::arg("seed"),
        py::arg("rows"), py::arg("cols"), py::arg("threshold"), release_gil());
  m.def("random_uint16", &fused_lora::random_uint16,
        "16-bit random values of elements start .. start + count - 1 (int32)", py::arg("seed"),
        py::arg("start"), py::arg("count"), release_gil());
  m.def("philox_isa", &fused_lora::philox_isa,
        "the Philox implementation in use: avx512, avx2 or scalar (FUSED_LORA_ISA and "
        "FUSED_LORA_PHILOX_ISA cap it)");
  m.def("isa", [] { return fused_lora::isa_name(fused_lora::active_isa()); },
        "the ISA level the hot loops run: avx512, avx2 or baseline (FUSED_LORA_ISA caps it)");
  m.def("cpu_isa", [] { return fused_lora::isa_name(fused_lora::cpu_isa()); },
        "the best ISA level this CPU supports: avx512, avx2 or baseline");
  m.def("isa_env_error", &fused_lora::isa_env_error,
        "'' when FUSED_LORA_ISA and FUSED_LORA_PHILOX_ISA are unset or valid, else the message");
  // seed: an int or a 0-d int64 CPU tensor.
  m.def(
      "dropout",
      [](const at::Tensor& x, py::handle seed, int64_t threshold, double dropout_p, double scale) {
        const int64_t seed_int = seed_value(seed);
        py::gil_scoped_release no_gil;
        return fused_lora::dropout(x, seed_int, threshold, dropout_p, scale);
      },
      "acc(x) * (keep ? scale : 0) in fp32 (fp64 for fp64 x)", py::arg("x"), py::arg("seed"),
      py::arg("threshold"), py::arg("dropout_p"), py::arg("scale"));
  m.def(
      "lora_shrink",
      [](const at::Tensor& x, const at::Tensor& lora_A, py::handle seed, int64_t threshold,
         double dropout_p) {
        const int64_t seed_int = dropout_p > 0.0 ? seed_value(seed) : 0;
        py::gil_scoped_release no_gil;
        return fused_lora::lora_shrink(x, lora_A, seed_int, threshold, dropout_p);
      },
      "xa = D(x) A^T", py::arg("x"), py::arg("lora_A"), py::arg("seed"), py::arg("threshold"),
      py::arg("dropout_p"));
  m.def("lora_forward", &fused_lora::lora_forward, "y = x W^T + b + scaling * xa B^T",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_B"), py::arg("xa"),
        py::arg("scaling"), release_gil());
  m.def(
      "lora_linear",
      [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, py::handle seed,
         int64_t threshold, double dropout_p) {
        const int64_t seed_int = dropout_p > 0.0 ? seed_value(seed) : 0;
        py::gil_scoped_release no_gil;
        return fused_lora::lora_linear(x, weight, bias, lora_A, lora_B, scaling, seed_int, threshold,
                                       dropout_p);
      },
      "y = x W^T + b + scaling * D(x) A^T B^T as one autograd node (fused path, eager calls)",
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"),
      py::arg("scaling"), py::arg("seed"), py::arg("threshold"), py::arg("dropout_p"));
  m.def("dequantize_4bit", &fused_lora::dequantize_4bit,
        "out (N, K) = the dense weight of a bitsandbytes 4-bit weight, bit-exact", py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
        py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("out"), release_gil());
  m.def("gemm_4bit", &fused_lora::gemm_4bit,
        "out += a W^T (transposed) or a W for a 4-bit W, dequantized tile by tile (few rows, fp32)", py::arg("a"),
        py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("out_features"),
        py::arg("in_features"), py::arg("transposed"), py::arg("out"), release_gil());
  m.def(
      "lora_backward",
      [](const at::Tensor& dy, const std::optional<at::Tensor>& x, const at::Tensor& weight,
         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
         py::handle seed, int64_t threshold, double dropout_p, bool needs_dx, bool needs_dA,
         bool needs_dB) {
        const int64_t seed_int = dropout_p > 0.0 ? seed_value(seed) : 0;
        py::gil_scoped_release no_gil;
        return fused_lora::lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling, seed_int,
                                         threshold, dropout_p, needs_dx, needs_dA, needs_dB);
      },
      "(dx, dA, dB); None where not needed", py::arg("dy"), py::arg("x"), py::arg("weight"),
      py::arg("lora_A"), py::arg("lora_B"), py::arg("xa"), py::arg("scaling"), py::arg("seed"),
      py::arg("threshold"), py::arg("dropout_p"), py::arg("needs_dx"), py::arg("needs_dA"),
      py::arg("needs_dB"));
}
