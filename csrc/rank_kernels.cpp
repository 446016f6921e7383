// Small-rank products with explicit 64-byte vectors (GCC/Clang vector
// extensions: one zmm with AVX-512, two ymm with AVX2), compiled once per x86-64
// ISA level (simd.h). Register blocks are fixed at compile time; every block
// shape sums an element in the same order, so block boundaries never change bits.
#include "rank_kernels.h"

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace fused_lora {
namespace {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

#define FUSED_LORA_INLINE inline __attribute__((always_inline))

template <typename T>
FUSED_LORA_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
FUSED_LORA_INLINE void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
struct HalfVecOf;
template <>
struct HalfVecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct HalfVecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};

// The lanes summed as a fixed tree (halves added pairwise), the same for every
// element and every ISA level.
template <typename T>
FUSED_LORA_INLINE T lane_sum(const Vec<T>& v) {
  using Half = typename HalfVecOf<T>::type;
  Half low, high;
  std::memcpy(&low, &v, sizeof(Half));
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
  const Half sum = low + high;
  constexpr int kHalfLanes = kLanes<T> / 2;
  T lanes[kHalfLanes];
  std::memcpy(lanes, &sum, sizeof(sum));
  for (int width = kHalfLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) {
      lanes[l] += lanes[l + width];
    }
  }
  return lanes[0];
}

// ---- row_dots: out[i, j] = sum_k in[i, k] m[j, k], vectorised over j: m is
// packed transposed (pack_transposed: (n, r_pad), r padded to whole vectors),
// so every k is one broadcast of in[i, k] times VB vectors of m^T[k, :].
// Per element: summed over k in order from zero (one vector lane).
template <typename T>
FUSED_LORA_INLINE int64_t padded_rank(int64_t rank) {
  return (rank + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

template <int IB, int VB, typename T>
FUSED_LORA_INLINE void row_dots_block(const T* in, int64_t ld_in, const T* m_t, int64_t ld_m,
                                      int64_t n, int64_t rank, int64_t j0, T* out) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[IB][VB];
  for (int a = 0; a < IB; ++a) {
    for (int q = 0; q < VB; ++q) {
      acc[a][q] = Vec<T>{};
    }
  }
  // NOTE: one pointer per row, advanced with k: no per-row index registers
  // reloaded from the stack (8 rows ran out of registers otherwise).
  const T* row[IB];
  for (int a = 0; a < IB; ++a) {
    row[a] = in + a * ld_in;
  }
  const T* m_row = m_t;
  for (int64_t k = 0; k < n; ++k) {
    Vec<T> mv[VB];
    for (int q = 0; q < VB; ++q) {
      mv[q] = load(m_row + q * L);
    }
    m_row += ld_m;
    for (int a = 0; a < IB; ++a) {
      const T s = *row[a]++;  // NOTE: scalar * vector: one broadcast
      for (int q = 0; q < VB; ++q) {
        acc[a][q] += s * mv[q];
      }
    }
  }
  alignas(64) T lanes[VB * L];
  for (int a = 0; a < IB; ++a) {
    for (int q = 0; q < VB; ++q) {
      store(lanes + q * L, acc[a][q]);
    }
    const int64_t count = std::min<int64_t>(VB * L, rank - j0);
    for (int64_t j = 0; j < count; ++j) {
      out[a * rank + j] = lanes[j];
    }
  }
}

// Rows of in in blocks of IB (then one at a time), all of one VB-vector group of j.
template <int IB, int VB, typename T>
FUSED_LORA_INLINE void row_dots_group(const T* in, int64_t ld_in, const T* m_t, int64_t ld_m,
                                      int64_t rows, int64_t n, int64_t rank, int64_t j0, T* out) {
  int64_t i = 0;
  for (; i + IB <= rows; i += IB) {
    row_dots_block<IB, VB>(in + i * ld_in, ld_in, m_t + j0, ld_m, n, rank, j0, out + i * rank + j0);
  }
  for (; i < rows; ++i) {
    row_dots_block<1, VB>(in + i * ld_in, ld_in, m_t + j0, ld_m, n, rank, j0, out + i * rank + j0);
  }
}

template <typename T>
FUSED_LORA_INLINE void row_dots_impl(const T* in, int64_t ld_in, const T* m_t, int64_t rows,
                                     int64_t rank, int64_t n, T* out) {
  constexpr int L = kLanes<T>;
  const int64_t ld_m = padded_rank<T>(rank);
  int64_t j0 = 0;
  // NOTE: register blocks of about 8 accumulators plus loads: 8 rows x 1 vector
  // of j (r = 16 in fp32), 6 x 2, 4 x 3 or 4 x 4.
  for (; j0 + 4 * L <= ld_m; j0 += 4 * L) {
    row_dots_group<4, 4>(in, ld_in, m_t, ld_m, rows, n, rank, j0, out);
  }
  switch ((ld_m - j0) / L) {
    case 3: row_dots_group<4, 3>(in, ld_in, m_t, ld_m, rows, n, rank, j0, out); break;
    case 2: row_dots_group<6, 2>(in, ld_in, m_t, ld_m, rows, n, rank, j0, out); break;
    case 1: row_dots_group<8, 1>(in, ld_in, m_t, ld_m, rows, n, rank, j0, out); break;
    default: break;
  }
}

template <typename T>
FUSED_LORA_INLINE void pack_transposed_impl(const T* m, int64_t ld_m, int64_t rank, int64_t n,
                                            T* packed) {
  const int64_t ld = padded_rank<T>(rank);
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t j = 0; j < ld; ++j) {
      packed[k * ld + j] = j < rank ? m[j * ld_m + k] : T(0);
    }
  }
}

// ---- outer_accumulate: a JB x V-vector block of out[j, c] += sum_i coef[i, j] in[i, c].
// Per element: summed over i in order from zero, then added to out.
template <int JB, int V, typename T>
FUSED_LORA_INLINE void outer_block(const T* coef, int64_t rank, const T* in, int64_t ld_in,
                                   int64_t rows, T* out, int64_t ld_out) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[JB][V];
  for (int b = 0; b < JB; ++b) {
    for (int q = 0; q < V; ++q) {
      acc[b][q] = Vec<T>{};
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    Vec<T> v[V];
    for (int q = 0; q < V; ++q) {
      v[q] = load(in + i * ld_in + q * L);
    }
    for (int b = 0; b < JB; ++b) {
      const T s = coef[i * rank + b];
      for (int q = 0; q < V; ++q) {
        acc[b][q] += s * v[q];
      }
    }
  }
  for (int b = 0; b < JB; ++b) {
    for (int q = 0; q < V; ++q) {
      T* dst = out + b * ld_out + q * L;
      store(dst, load(dst) + acc[b][q]);
    }
  }
}

template <int V, int JB, typename T>
FUSED_LORA_INLINE void outer_columns(const T* coef, int64_t rank, const T* in, int64_t ld_in,
                                     int64_t rows, T* out, int64_t ld_out) {
  int64_t j = 0;
  for (; j + JB <= rank; j += JB) {
    outer_block<JB, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out);
  }
  for (; j + 4 <= rank; j += 4) {
    outer_block<4, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out);
  }
  switch (rank - j) {
    case 3: outer_block<3, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out); break;
    case 2: outer_block<2, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out); break;
    case 1: outer_block<1, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out); break;
    default: break;
  }
}

template <typename T>
FUSED_LORA_INLINE void outer_accumulate_impl(const T* coef, const T* in, int64_t ld_in,
                                             int64_t rows, int64_t rank, int64_t n, T* out,
                                             int64_t ld_out) {
  constexpr int64_t L = kLanes<T>;
  int64_t c = 0;
  // NOTE: blocks of 8 j x 2 vectors (16 accumulators): per row 2 loads and 8
  // broadcasts for 16 FMAs. Measured faster than 4 x 4 (which reads each row
  // of in once per 4 j, and rows 2^k apart leave L1 between reads) and 16 x 1.
  for (; c + 2 * L <= n; c += 2 * L) {
    outer_columns<2, 8>(coef, rank, in + c, ld_in, rows, out + c, ld_out);
  }
  for (; c + L <= n; c += L) {
    outer_columns<1, 4>(coef, rank, in + c, ld_in, rows, out + c, ld_out);
  }
  for (; c < n; ++c) {
    for (int64_t j = 0; j < rank; ++j) {
      T sum = 0;
      for (int64_t i = 0; i < rows; ++i) {
        sum += coef[i * rank + j] * in[i * ld_in + c];
      }
      out[j * ld_out + c] += sum;
    }
  }
}

// ---- expand: out[i, c] = f(sum_j coef[i, j] m[j, c]) from m packed in panels of
// kPanelBytes columns (pack_panels), an IB-row x panel block at a time into tmp,
// then the epilogue f. Per element: summed over j in order from zero.
template <typename T>
constexpr int64_t kPanelCols = kPanelBytes / sizeof(T);

template <typename T>
FUSED_LORA_INLINE void pack_panels_impl(const T* m, int64_t ld_m, int64_t rank, int64_t n,
                                        T* packed) {
  constexpr int64_t C = kPanelCols<T>;
  for (int64_t c0 = 0; c0 < n; c0 += C) {
    T* panel = packed + (c0 / C) * rank * C;
    for (int64_t j = 0; j < rank; ++j) {
      for (int64_t c = 0; c < C; ++c) {
        panel[j * C + c] = c0 + c < n ? m[j * ld_m + c0 + c] : T(0);
      }
    }
  }
}

template <int IB, typename T>
FUSED_LORA_INLINE void expand_block(const T* coef, int64_t rank, const T* panel, T* tmp) {
  constexpr int L = kLanes<T>;
  constexpr int V = kPanelCols<T> / L;
  Vec<T> acc[IB][V];
  for (int a = 0; a < IB; ++a) {
    for (int q = 0; q < V; ++q) {
      acc[a][q] = Vec<T>{};
    }
  }
  for (int64_t j = 0; j < rank; ++j) {
    Vec<T> mv[V];
    for (int q = 0; q < V; ++q) {
      mv[q] = load(panel + j * kPanelCols<T> + q * L);
    }
    for (int a = 0; a < IB; ++a) {
      const T s = coef[a * rank + j];
      for (int q = 0; q < V; ++q) {
        acc[a][q] += s * mv[q];
      }
    }
  }
  for (int a = 0; a < IB; ++a) {
    for (int q = 0; q < V; ++q) {
      store(tmp + a * kPanelCols<T> + q * L, acc[a][q]);
    }
  }
}

template <typename T, typename Epilogue>
FUSED_LORA_INLINE void expand_impl(const T* coef, const T* packed, int64_t rows, int64_t rank,
                                   int64_t n, const Epilogue& epilogue) {
  constexpr int64_t C = kPanelCols<T>;
  constexpr int IB = 4;
  alignas(64) T tmp[IB * C];
  for (int64_t c0 = 0; c0 < n; c0 += C) {
    const T* panel = packed + (c0 / C) * rank * C;
    const int64_t count = std::min<int64_t>(C, n - c0);
    int64_t i = 0;
    for (; i + IB <= rows; i += IB) {
      expand_block<IB>(coef + i * rank, rank, panel, tmp);
      for (int a = 0; a < IB; ++a) {
        epilogue(i + a, c0, tmp + a * C, count);
      }
    }
    for (; i < rows; ++i) {
      expand_block<1>(coef + i * rank, rank, panel, tmp);
      epilogue(i, c0, tmp, count);
    }
  }
}

template <typename scalar_t, typename T>
FUSED_LORA_INLINE void expand_masked_store_impl(const T* coef, const T* packed, int64_t rows,
                                                int64_t rank, int64_t n, const uint16_t* rnd,
                                                int64_t ld_rnd, uint32_t threshold, T alpha,
                                                T keep_scale, scalar_t* out, int64_t ld_out) {
  expand_impl(coef, packed, rows, rank, n,
              [&](int64_t i, int64_t c, const T* values, int64_t count) {
    scalar_t* dst = out + i * ld_out + c;
    if (rnd == nullptr) {
      for (int64_t k = 0; k < count; ++k) {
        dst[k] = static_cast<scalar_t>(values[k] * alpha);
      }
      return;
    }
    const uint16_t* r = rnd + i * ld_rnd + c;
    // NOTE: the dropped element is multiplied by 0, not selected away: a NaN/Inf in
    // dxa A reaches dx as in the reference. scaling and 1/(1-p) are applied one after
    // the other (not as one product that could overflow), as in the reference.
    for (int64_t k = 0; k < count; ++k) {
      const T factor = static_cast<uint32_t>(r[k]) >= threshold ? keep_scale : T(0);
      dst[k] = static_cast<scalar_t>(values[k] * alpha * factor);
    }
  });
}

template <typename scalar_t, typename T>
FUSED_LORA_INLINE void expand_bias_store_impl(const T* coef, const T* packed, int64_t rows,
                                              int64_t rank, int64_t n, const scalar_t* bias,
                                              scalar_t* out, int64_t ld_out) {
  expand_impl(coef, packed, rows, rank, n,
              [&](int64_t i, int64_t c, const T* values, int64_t count) {
    scalar_t* dst = out + i * ld_out + c;
    if (bias == nullptr) {
      for (int64_t k = 0; k < count; ++k) {
        dst[k] = static_cast<scalar_t>(values[k]);
      }
      return;
    }
    for (int64_t k = 0; k < count; ++k) {
      dst[k] = static_cast<scalar_t>(values[k] + static_cast<T>(bias[c + k]));
    }
  });
}

}  // namespace

#define FUSED_LORA_DEFINE_RANK_KERNELS_ACC(acc_t)                                              \
  FUSED_LORA_MULTIVERSION                                                                      \
  void row_dots(const acc_t* in, int64_t ld_in, const acc_t* m_t, int64_t rows, int64_t rank,  \
                int64_t n, acc_t* out) {                                                       \
    row_dots_impl(in, ld_in, m_t, rows, rank, n, out);                                         \
  }                                                                                            \
  void pack_transposed(const acc_t* m, int64_t ld_m, int64_t rank, int64_t n, acc_t* packed) { \
    pack_transposed_impl(m, ld_m, rank, n, packed);                                            \
  }                                                                                            \
  FUSED_LORA_MULTIVERSION                                                                      \
  void outer_accumulate(const acc_t* coef, const acc_t* in, int64_t ld_in, int64_t rows,       \
                        int64_t rank, int64_t n, acc_t* out, int64_t ld_out) {                 \
    outer_accumulate_impl(coef, in, ld_in, rows, rank, n, out, ld_out);                        \
  }                                                                                            \
  void pack_panels(const acc_t* m, int64_t ld_m, int64_t rank, int64_t n, acc_t* packed) {     \
    pack_panels_impl(m, ld_m, rank, n, packed);                                                \
  }

FUSED_LORA_DEFINE_RANK_KERNELS_ACC(float)
FUSED_LORA_DEFINE_RANK_KERNELS_ACC(double)

#define FUSED_LORA_DEFINE_RANK_KERNELS_OUT(scalar_t, acc_t)                                    \
  FUSED_LORA_MULTIVERSION                                                                      \
  void expand_masked_store(const acc_t* coef, const acc_t* packed, int64_t rows, int64_t rank, \
                           int64_t n, const uint16_t* rnd, int64_t ld_rnd, uint32_t threshold, \
                           acc_t alpha, acc_t keep_scale, scalar_t* out, int64_t ld_out) {     \
    expand_masked_store_impl(coef, packed, rows, rank, n, rnd, ld_rnd, threshold, alpha,       \
                             keep_scale, out, ld_out);                                         \
  }                                                                                            \
  FUSED_LORA_MULTIVERSION                                                                      \
  void expand_bias_store(const acc_t* coef, const acc_t* packed, int64_t rows, int64_t rank,   \
                         int64_t n, const scalar_t* bias, scalar_t* out, int64_t ld_out) {     \
    expand_bias_store_impl(coef, packed, rows, rank, n, bias, out, ld_out);                    \
  }

FUSED_LORA_DEFINE_RANK_KERNELS_OUT(float, float)
FUSED_LORA_DEFINE_RANK_KERNELS_OUT(double, double)
FUSED_LORA_DEFINE_RANK_KERNELS_OUT(c10::BFloat16, float)
FUSED_LORA_DEFINE_RANK_KERNELS_OUT(c10::Half, float)

}  // namespace fused_lora
