// Bit-packed ReLU sign patterns: declarations shared by the CPU (signs_cpu.cpp) and CUDA
// (signs_cuda.cu) kernels. No torch, no pybind11: kernels see raw pointers, sizes and strides.
//
// Layout: activations x are an [n, u] matrix of IEEE floats (fp16, bf16, fp32 or fp64) read through
// a signed-integer view of the same width (elem_size bytes). For IEEE floats, "x > 0" is exactly
// "the integer view is > 0" (sign bit clear and not +0); NaNs are rejected before the kernels run.
// Sign words are uint32: bit b of word w of row r is (x[r, 32 w + b] > 0); bits past u are zero.
#pragma once
#include <cstdint>

#ifndef LAZYHASTY_HD
#define LAZYHASTY_HD
#endif

namespace lazyhasty {

LAZYHASTY_HD inline int64_t sign_words(int64_t units) { return (units + 31) / 32; }

// Valid bits of word w: all 32 except in the last word of a row whose unit count is not a multiple of
// 32. Reference words may carry garbage past u (e.g. a column slice of wider words): it is ignored.
LAZYHASTY_HD inline uint32_t word_mask(int64_t w, int64_t u) {
  const int64_t rem = u - w * 32;
  return rem >= 32 ? 0xffffffffu : ((1u << rem) - 1u);
}

// out[r * so0 + w] = packed signs of row r, words w < sign_words(u).
void pack_signs_cpu(int elem_size, const void* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                    uint32_t* out, int64_t so0);

// counts[r] = number of units c < u with (x[r, c] > 0) != bit c of ref row r.
void sign_mismatch_cpu(int elem_size, const void* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                       const uint32_t* ref, int64_t sr0, int64_t* counts);

// CUDA launchers (signs_cuda.cu). `stream` is a cudaStream_t; counts must be zeroed by the caller.
// They return a cudaError_t as int (0 = success) so that callers need no CUDA headers.
int pack_signs_cuda(int elem_size, const void* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                    uint32_t* out, int64_t so0, void* stream);
int sign_mismatch_cuda(int elem_size, const void* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                       const uint32_t* ref, int64_t sr0, int64_t* counts, void* stream);
const char* cuda_error_string(int code);
int cuda_runtime_version();

}  // namespace lazyhasty
