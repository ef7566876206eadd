// pybind11 bindings for lazyhasty._C (CPU kernels). Tensors cross as data pointers (ints) with sizes and
// element strides; lazyhasty/ops/*.py validates shapes, dtypes and devices before calling here.
#include <pybind11/pybind11.h>

#include "signs.h"

namespace py = pybind11;
using namespace lazyhasty;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lazyhasty CPU kernels (OpenMP); see lazyhasty/ops for the torch-facing API";
  m.def("pack_signs",
        [](int elem_size, uintptr_t x, int64_t n, int64_t u, int64_t sx0, int64_t sx1, uintptr_t out, int64_t so0) {
          py::gil_scoped_release release;
          pack_signs_cpu(elem_size, ptr<const void>(x), n, u, sx0, sx1, ptr<uint32_t>(out), so0);
        },
        py::arg("elem_size"), py::arg("x"), py::arg("n"), py::arg("u"), py::arg("sx0"), py::arg("sx1"),
        py::arg("out"), py::arg("so0"));
  m.def("sign_mismatch",
        [](int elem_size, uintptr_t x, int64_t n, int64_t u, int64_t sx0, int64_t sx1, uintptr_t ref, int64_t sr0,
           uintptr_t counts) {
          py::gil_scoped_release release;
          sign_mismatch_cpu(elem_size, ptr<const void>(x), n, u, sx0, sx1, ptr<const uint32_t>(ref), sr0,
                            ptr<int64_t>(counts));
        },
        py::arg("elem_size"), py::arg("x"), py::arg("n"), py::arg("u"), py::arg("sx0"), py::arg("sx1"),
        py::arg("ref"), py::arg("sr0"), py::arg("counts"));
#ifdef LAZYHASTY_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
