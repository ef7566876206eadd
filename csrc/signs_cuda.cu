// CUDA sign-pattern kernels. One warp builds one 32-unit word with __ballot_sync: lane l reads unit
// 32 w + l, so a warp's loads are contiguous (coalesced) when the unit stride is 1.
#include <cuda_runtime.h>

#define LAZYHASTY_HD __host__ __device__
#include "signs.h"

namespace lazyhasty {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWordsPerTask = 32;  // one task = 32 words (1024 units) of one row

template <typename T>
__global__ void pack_kernel(const T* __restrict__ x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                            uint32_t* __restrict__ out, int64_t so0, int64_t words) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t n_warps = (static_cast<int64_t>(gridDim.x) * kThreads) >> 5;
  for (int64_t t = warp; t < n * words; t += n_warps) {
    const int64_t r = t / words, w = t % words, c = w * 32 + lane;
    const bool pos = c < u && x[r * sx0 + c * sx1] > 0;
    const uint32_t word = __ballot_sync(0xffffffffu, pos);
    if (lane == 0) out[r * so0 + w] = word;
  }
}

template <typename T>
__global__ void mismatch_kernel(const T* __restrict__ x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                                const uint32_t* __restrict__ ref, int64_t sr0,
                                unsigned long long* __restrict__ counts, int64_t words) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t n_warps = (static_cast<int64_t>(gridDim.x) * kThreads) >> 5;
  const int64_t chunks = (words + kWordsPerTask - 1) / kWordsPerTask;
  for (int64_t t = warp; t < n * chunks; t += n_warps) {
    const int64_t r = t / chunks, w0 = (t % chunks) * kWordsPerTask;
    const int64_t w1 = min(w0 + kWordsPerTask, words);
    unsigned int diff = 0;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t c = w * 32 + lane;
      const bool pos = c < u && x[r * sx0 + c * sx1] > 0;
      const uint32_t word = __ballot_sync(0xffffffffu, pos);
      diff += __popc((word ^ ref[r * sr0 + w]) & word_mask(w, u));  // every lane holds the same word: lane 0 adds
    }
    if (lane == 0 && diff) atomicAdd(counts + r, static_cast<unsigned long long>(diff));
  }
}

int grid_for(int64_t tasks) {
  int64_t blocks = (tasks + kWarps - 1) / kWarps;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535) blocks = 65535;  // grid-stride loops cover the rest
  return static_cast<int>(blocks);
}

}  // namespace

int pack_signs_cuda(int elem_size, const void* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                    uint32_t* out, int64_t so0, void* stream) {
  const int64_t words = sign_words(u);
  if (n == 0 || words == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int grid = grid_for(n * words);
  switch (elem_size) {
    case 2: pack_kernel<<<grid, kThreads, 0, s>>>(static_cast<const int16_t*>(x), n, u, sx0, sx1, out, so0, words); break;
    case 4: pack_kernel<<<grid, kThreads, 0, s>>>(static_cast<const int32_t*>(x), n, u, sx0, sx1, out, so0, words); break;
    case 8: pack_kernel<<<grid, kThreads, 0, s>>>(static_cast<const long long*>(x), n, u, sx0, sx1, out, so0, words); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int sign_mismatch_cuda(int elem_size, const void* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                       const uint32_t* ref, int64_t sr0, int64_t* counts, void* stream) {
  const int64_t words = sign_words(u);
  if (n == 0 || words == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  auto c = reinterpret_cast<unsigned long long*>(counts);
  const int grid = grid_for(n * ((words + kWordsPerTask - 1) / kWordsPerTask));
  switch (elem_size) {
    case 2: mismatch_kernel<<<grid, kThreads, 0, s>>>(static_cast<const int16_t*>(x), n, u, sx0, sx1, ref, sr0, c, words); break;
    case 4: mismatch_kernel<<<grid, kThreads, 0, s>>>(static_cast<const int32_t*>(x), n, u, sx0, sx1, ref, sr0, c, words); break;
    case 8: mismatch_kernel<<<grid, kThreads, 0, s>>>(static_cast<const long long*>(x), n, u, sx0, sx1, ref, sr0, c, words); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace lazyhasty
