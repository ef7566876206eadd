// pybind11 bindings for lazyhasty._cuda. Compiled by the host compiler: the kernels live in .cu files
// built by nvcc without pybind11 headers. Streams cross as integers (cudaStream_t handles).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "signs.h"

namespace py = pybind11;
using namespace lazyhasty;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string("lazyhasty._cuda.") + what + ": " + cuda_error_string(code));
}
void check_elem(int elem_size) {
  if (elem_size != 2 && elem_size != 4 && elem_size != 8)
    throw std::invalid_argument("lazyhasty._cuda: elem_size must be 2, 4 or 8 bytes");
}
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lazyhasty CUDA kernels (static cudart; no libtorch)";
  m.def("pack_signs",
        [](int elem_size, uintptr_t x, int64_t n, int64_t u, int64_t sx0, int64_t sx1, uintptr_t out, int64_t so0,
           uintptr_t stream) {
          check_elem(elem_size);
          check(pack_signs_cuda(elem_size, ptr<const void>(x), n, u, sx0, sx1, ptr<uint32_t>(out), so0,
                                ptr<void>(stream)),
                "pack_signs");
        });
  m.def("sign_mismatch",
        [](int elem_size, uintptr_t x, int64_t n, int64_t u, int64_t sx0, int64_t sx1, uintptr_t ref, int64_t sr0,
           uintptr_t counts, uintptr_t stream) {
          check_elem(elem_size);
          check(sign_mismatch_cuda(elem_size, ptr<const void>(x), n, u, sx0, sx1, ptr<const uint32_t>(ref), sr0,
                                   ptr<int64_t>(counts), ptr<void>(stream)),
                "sign_mismatch");
        });
  m.attr("cuda_runtime_version") = cuda_runtime_version();
  m.attr("architectures") = LAZYHASTY_CUDA_ARCHS;
}
