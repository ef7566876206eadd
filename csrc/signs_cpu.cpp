#include "signs.h"

#include <stdexcept>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace lazyhasty {
namespace {

#if defined(__SSE2__)
// 32 contiguous values -> one word with compare + movemask (SSE2 is baseline on x86-64: no -march needed).
inline uint32_t pack32_simd(const int32_t* p) {
  const __m128i z = _mm_setzero_si128();
  uint32_t w = 0;
  for (int k = 0; k < 8; ++k) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4 * k));
    w |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, z)))) << (4 * k);
  }
  return w;
}
inline uint32_t pack32_simd(const int16_t* p) {
  const __m128i z = _mm_setzero_si128();
  uint32_t w = 0;
  for (int k = 0; k < 2; ++k) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k + 8));
    const __m128i m = _mm_packs_epi16(_mm_cmpgt_epi16(a, z), _mm_cmpgt_epi16(b, z));
    w |= static_cast<uint32_t>(_mm_movemask_epi8(m) & 0xffff) << (16 * k);
  }
  return w;
}
#endif

template <typename T>
inline uint32_t pack_word(const T* row, int64_t sx1, int64_t c0, int64_t u) {
  uint32_t word = 0;
  const int64_t c1 = (c0 + 32 < u) ? c0 + 32 : u;
#if defined(__SSE2__)
  if constexpr (!std::is_same_v<T, int64_t>) {
    if (sx1 == 1 && c1 - c0 == 32) return pack32_simd(row + c0);
  }
#endif
  if (sx1 == 1) {
    for (int64_t c = c0; c < c1; ++c) word |= static_cast<uint32_t>(row[c] > 0) << (c - c0);
  } else {
    for (int64_t c = c0; c < c1; ++c) word |= static_cast<uint32_t>(row[c * sx1] > 0) << (c - c0);
  }
  return word;
}

template <typename T>
void pack_impl(const T* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1, uint32_t* out, int64_t so0) {
  const int64_t words = sign_words(u);
  // collapse(2): a probe set of one example with many units must still use every core.
#pragma omp parallel for collapse(2) schedule(static) if (n * words > 256)
  for (int64_t r = 0; r < n; ++r)
    for (int64_t w = 0; w < words; ++w) out[r * so0 + w] = pack_word(x + r * sx0, sx1, w * 32, u);
}

template <typename T>
void mismatch_impl(const T* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1, const uint32_t* ref,
                   int64_t sr0, int64_t* counts) {
  const int64_t words = sign_words(u);
#pragma omp parallel for schedule(static) if (n * words > 256)
  for (int64_t r = 0; r < n; ++r) {
    int64_t diff = 0;
    const T* row = x + r * sx0;
    const uint32_t* ref_row = ref + r * sr0;
    for (int64_t w = 0; w < words; ++w)
      diff += __builtin_popcount((pack_word(row, sx1, w * 32, u) ^ ref_row[w]) & word_mask(w, u));
    counts[r] = diff;
  }
}

void check_args(int elem_size, const void* x, int64_t n, int64_t u, const void* out) {
  if (elem_size != 2 && elem_size != 4 && elem_size != 8)
    throw std::invalid_argument("lazyhasty._C: elem_size must be 2, 4 or 8 bytes");
  if (n < 0 || u < 0) throw std::invalid_argument("lazyhasty._C: negative size");
  if (n > 0 && u > 0 && (x == nullptr || out == nullptr))
    throw std::invalid_argument("lazyhasty._C: null data pointer");
}

}  // namespace

void pack_signs_cpu(int elem_size, const void* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                    uint32_t* out, int64_t so0) {
  check_args(elem_size, x, n, u, out);
  if (n == 0 || u == 0) return;
  switch (elem_size) {
    case 2: pack_impl(static_cast<const int16_t*>(x), n, u, sx0, sx1, out, so0); break;
    case 4: pack_impl(static_cast<const int32_t*>(x), n, u, sx0, sx1, out, so0); break;
    default: pack_impl(static_cast<const int64_t*>(x), n, u, sx0, sx1, out, so0); break;
  }
}

void sign_mismatch_cpu(int elem_size, const void* x, int64_t n, int64_t u, int64_t sx0, int64_t sx1,
                       const uint32_t* ref, int64_t sr0, int64_t* counts) {
  check_args(elem_size, x, n, u, counts);
  if (n > 0 && u > 0 && ref == nullptr) throw std::invalid_argument("lazyhasty._C: null ref pointer");
  if (u == 0) {
    for (int64_t r = 0; r < n; ++r) counts[r] = 0;
    return;
  }
  switch (elem_size) {
    case 2: mismatch_impl(static_cast<const int16_t*>(x), n, u, sx0, sx1, ref, sr0, counts); break;
    case 4: mismatch_impl(static_cast<const int32_t*>(x), n, u, sx0, sx1, ref, sr0, counts); break;
    default: mismatch_impl(static_cast<const int64_t*>(x), n, u, sx0, sx1, ref, sr0, counts); break;
  }
}

}  // namespace lazyhasty
