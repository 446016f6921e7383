// Small-rank products with explicit vectors of the ISA level's width (GCC/Clang
// vector extensions: zmm with AVX-512, ymm with AVX2, xmm on baseline x86-64),
// one build per level (simd.h). Register blocks are fixed at compile time per
// level, sized so accumulators and loads fit the level's register file; every
// block shape and every level sums an element in the same order, so neither
// block boundaries nor the level change bits (baseline has no FMA: its own bits).
#include "rank_kernels.h"

#include <algorithm>
#include <type_traits>

#include "simd.h"

namespace fused_lora {
namespace {

// ---- row_dots: out[i, j] = sum_k in[i, k] m[j, k], vectorised over j: m is
// packed transposed ((n, r_pad), r padded to whole 64-byte vectors), so every k
// is one broadcast of in[i, k] times VB vectors of m^T[k, :].
// Per element: summed over k in order from zero (one vector lane).

// Rows per register block for VB vectors of j: IB * VB accumulators, VB loads of
// m^T and a broadcast within the register file.
// NOTE: 32 registers (AVX-512): 8 x 1 (r = 16 in fp32), 6 x 2, 6 x 3, 4 x 4;
// 16 registers (AVX2, baseline): 12 x 1, 6 x 2 (r = 16 in fp32 on AVX2), 3 x 3, 2 x 4.
template <typename I>
constexpr int row_dots_rows(int vectors) {
  if (I::kRegisters >= 32) {
    return vectors == 1 ? 8 : (vectors == 2 ? 6 : (vectors == 3 ? 6 : 4));
  }
  return vectors == 1 ? 12 : (vectors == 2 ? 6 : (vectors == 3 ? 3 : 2));
}

template <typename I, int IB, int VB, typename T>
FUSED_LORA_INLINE void row_dots_block(const T* in, int64_t ld_in, const T* m_t, int64_t ld_m,
                                      int64_t n, int64_t rank, int64_t j0, T* out) {
  using V = Vec<T, I>;
  constexpr int L = kLanes<T, I>;
  V acc[IB][VB] = {};
  // NOTE: one pointer per row, advanced with k: no per-row index registers
  // reloaded from the stack (8 rows ran out of registers otherwise).
  const T* row[IB];
  for (int a = 0; a < IB; ++a) {
    row[a] = in + a * ld_in;
  }
  const T* m_row = m_t + j0;
  for (int64_t k = 0; k < n; ++k) {
    V mv[VB];
    for (int q = 0; q < VB; ++q) {
      mv[q] = load_vec<V>(m_row + q * L);
    }
    m_row += ld_m;
    for (int a = 0; a < IB; ++a) {
      const T s = *row[a]++;  // NOTE: scalar * vector: one broadcast
      for (int q = 0; q < VB; ++q) {
        acc[a][q] += s * mv[q];
      }
    }
  }
  const int64_t count = std::min<int64_t>(VB * L, rank - j0);
  for (int a = 0; a < IB; ++a) {
    T* dst = out + a * rank + j0;
    if (count == VB * L) {
      for (int q = 0; q < VB; ++q) {
        store_vec(dst + q * L, acc[a][q]);
      }
    } else {
      alignas(64) T lanes[VB * L];
      for (int q = 0; q < VB; ++q) {
        store_vec(lanes + q * L, acc[a][q]);
      }
      for (int64_t j = 0; j < count; ++j) {
        dst[j] = lanes[j];
      }
    }
  }
}

// Rows of in in blocks of IB (then one at a time), all of one VB-vector group of j.
template <typename I, int VB, typename T>
FUSED_LORA_INLINE void row_dots_group(const T* in, int64_t ld_in, const T* m_t, int64_t ld_m,
                                      int64_t rows, int64_t n, int64_t rank, int64_t j0, T* out) {
  constexpr int IB = row_dots_rows<I>(VB);
  int64_t i = 0;
  for (; i + IB <= rows; i += IB) {
    row_dots_block<I, IB, VB>(in + i * ld_in, ld_in, m_t, ld_m, n, rank, j0, out + i * rank);
  }
  for (; i < rows; ++i) {
    row_dots_block<I, 1, VB>(in + i * ld_in, ld_in, m_t, ld_m, n, rank, j0, out + i * rank);
  }
}

template <typename I, typename T>
FUSED_LORA_INLINE void row_dots_impl(const T* in, int64_t ld_in, const T* m_t, int64_t rows,
                                     int64_t rank, int64_t n, T* out) {
  constexpr int L = kLanes<T, I>;
  const int64_t ld_m = packed_rank(rank, sizeof(T));
  const int64_t vectors = (rank + L - 1) / L;  // the padding past them is never read
  int64_t v = 0;
  for (; v + 4 <= vectors; v += 4) {
    row_dots_group<I, 4>(in, ld_in, m_t, ld_m, rows, n, rank, v * L, out);
  }
  switch (vectors - v) {
    case 3: row_dots_group<I, 3>(in, ld_in, m_t, ld_m, rows, n, rank, v * L, out); break;
    case 2: row_dots_group<I, 2>(in, ld_in, m_t, ld_m, rows, n, rank, v * L, out); break;
    case 1: row_dots_group<I, 1>(in, ld_in, m_t, ld_m, rows, n, rank, v * L, out); break;
    default: break;
  }
}

// ---- outer_accumulate: a JB x V-vector block of out[j, c] += sum_i coef[i, j] in[i, c].
// Per element: summed over i in order from zero, then added to out.
template <typename I, int JB, int V, typename T>
FUSED_LORA_INLINE void outer_block(const T* coef, int64_t rank, const T* in, int64_t ld_in,
                                   int64_t rows, T* out, int64_t ld_out) {
  using W = Vec<T, I>;
  constexpr int L = kLanes<T, I>;
  W acc[JB][V] = {};
  for (int64_t i = 0; i < rows; ++i) {
    W v[V];
    for (int q = 0; q < V; ++q) {
      v[q] = load_vec<W>(in + i * ld_in + q * L);
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
      store_vec(dst, load_vec<W>(dst) + acc[b][q]);
    }
  }
}

template <typename I, int V, int JB, typename T>
FUSED_LORA_INLINE void outer_columns(const T* coef, int64_t rank, const T* in, int64_t ld_in,
                                     int64_t rows, T* out, int64_t ld_out) {
  int64_t j = 0;
  for (; j + JB <= rank; j += JB) {
    outer_block<I, JB, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out);
  }
  if constexpr (JB > 4) {
    for (; j + 4 <= rank; j += 4) {
      outer_block<I, 4, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out);
    }
  }
  switch (rank - j) {
    case 3: outer_block<I, 3, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out); break;
    case 2: outer_block<I, 2, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out); break;
    case 1: outer_block<I, 1, V>(coef + j, rank, in, ld_in, rows, out + j * ld_out, ld_out); break;
    default: break;
  }
}

// Rows per chunk of outer_accumulate; each chunk's sums are added to out.
// NOTE: a chunk is taken whole (every column, every j) before the next, so the
// rows of in are read in address order. Before, each column strip walked down a
// whole block of rows one row stride apart; a perf profile then showed
// outer_accumulate at 40% of MKL's FMA rate (K = N = 256, T = 4096, AVX2). With
// chunks of 64 rows the change was within this machine's noise, a little faster.
constexpr int64_t kOuterRows = 64;

template <typename I, typename T>
FUSED_LORA_INLINE void outer_accumulate_impl(const T* coef, const T* in, int64_t ld_in,
                                             int64_t rows_total, int64_t rank, int64_t n, T* out,
                                             int64_t ld_out) {
  constexpr int64_t L = kLanes<T, I>;
  // NOTE: blocks of JB j x 2 vectors: per row 2 loads and JB broadcasts for 2 JB FMAs.
  // 32 registers: 8 x 2 (16 accumulators), measured faster than 4 x 4 (which reads
  // each row of in once per 4 j, and rows 2^k apart leave L1 between reads) and
  // 16 x 1. 16 registers: 6 x 2 (12 accumulators, 2 loads, a broadcast).
  constexpr int JB = I::kRegisters >= 32 ? 8 : 6;
  for (int64_t i0 = 0; i0 < rows_total; i0 += kOuterRows) {
    const int64_t rows = std::min(kOuterRows, rows_total - i0);
    const T* chunk_coef = coef + i0 * rank;
    const T* chunk_in = in + i0 * ld_in;
    int64_t c = 0;
    for (; c + 2 * L <= n; c += 2 * L) {
      outer_columns<I, 2, JB>(chunk_coef, rank, chunk_in + c, ld_in, rows, out + c, ld_out);
    }
    for (; c + L <= n; c += L) {
      outer_columns<I, 1, JB>(chunk_coef, rank, chunk_in + c, ld_in, rows, out + c, ld_out);
    }
    for (; c < n; ++c) {
      for (int64_t j = 0; j < rank; ++j) {
        T sum = 0;
        for (int64_t i = 0; i < rows; ++i) {
          sum += chunk_coef[i * rank + j] * chunk_in[i * ld_in + c];
        }
        out[j * ld_out + c] += sum;
      }
    }
  }
}

// ---- expand: out[i, c] = f(sum_j coef[i, j] m[j, c]) from m packed in panels of
// kPanelBytes columns (pack_panels): an IB-row x SV-vector block of a panel at a
// time, the epilogue f applied to the accumulators as they leave the registers.
// Per element: summed over j in order from zero.
template <typename T>
constexpr int64_t kPanelCols = kPanelBytes / sizeof(T);

// NOTE: 32 registers: 4 rows x the whole 256-byte panel (4 zmm); 16 registers: 2 rows
// x 4 vectors (8 accumulators, 4 loads, a broadcast), a panel in 2 (AVX2) or 4 parts.
template <typename I>
constexpr int kExpandRows = I::kRegisters >= 32 ? 4 : 2;
constexpr int kExpandVectors = 4;

// The epilogues. vec: a whole vector of values for columns c .. c + L - 1 of row i;
// tail: `count` values (at the end of a row, and for fp16/bf16 outputs).

// A whole vector through the epilogue's tail: for outputs narrower than T (fp16/bf16),
// which are rounded element by element.
template <typename I, typename T, typename Epilogue>
FUSED_LORA_INLINE void vec_through_tail(const Epilogue& epilogue, int64_t i, int64_t c,
                                        const Vec<T, I>& values) {
  constexpr int L = kLanes<T, I>;
  alignas(64) T lanes[L];
  store_vec(lanes, values);
  epilogue.tail(i, c, lanes, L);
}

template <typename I, typename scalar_t, typename T>
struct MaskedStore {
  const uint16_t* rnd;  // null: no mask
  int64_t ld_rnd;
  uint32_t threshold;
  T alpha;
  scalar_t* out;
  int64_t ld_out;

  FUSED_LORA_INLINE void vec(int64_t i, int64_t c, const Vec<T, I>& values) const {
    using V = Vec<T, I>;
    constexpr int L = kLanes<T, I>;
    if constexpr (std::is_same_v<scalar_t, T>) {
      const V alpha_v = V{} + alpha;
      if (rnd == nullptr) {
        store_vec(out + i * ld_out + c, values * alpha_v);
        return;
      }
      // NOTE: dropped elements are multiplied by 0 (not selected away), as D() does.
      using Int = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
      using IV = VecBytes<Int, I::kBytes>;
      const IV r = __builtin_convertvector(
          load_vec<VecBytes<uint16_t, 2 * L>>(rnd + i * ld_rnd + c), IV);
      const V factor = r >= static_cast<Int>(threshold) ? alpha_v : V{};
      store_vec(out + i * ld_out + c, values * factor);
    } else {
      vec_through_tail<I, T>(*this, i, c, values);
    }
  }

  FUSED_LORA_INLINE void tail(int64_t i, int64_t c, const T* values, int64_t count) const {
    scalar_t* dst = out + i * ld_out + c;
    if (rnd == nullptr) {
      for (int64_t k = 0; k < count; ++k) {
        dst[k] = static_cast<scalar_t>(values[k] * alpha);
      }
      return;
    }
    const uint16_t* r = rnd + i * ld_rnd + c;
    for (int64_t k = 0; k < count; ++k) {
      const T factor = static_cast<uint32_t>(r[k]) >= threshold ? alpha : T(0);
      dst[k] = static_cast<scalar_t>(values[k] * factor);
    }
  }
};

template <typename I, typename scalar_t, typename T>
struct BiasStore {
  const scalar_t* bias;  // null: no bias
  scalar_t* out;
  int64_t ld_out;

  FUSED_LORA_INLINE void vec(int64_t i, int64_t c, const Vec<T, I>& values) const {
    using V = Vec<T, I>;
    if constexpr (std::is_same_v<scalar_t, T>) {
      store_vec(out + i * ld_out + c, bias == nullptr ? values : values + load_vec<V>(bias + c));
    } else {
      vec_through_tail<I, T>(*this, i, c, values);
    }
  }

  FUSED_LORA_INLINE void tail(int64_t i, int64_t c, const T* values, int64_t count) const {
    scalar_t* dst = out + i * ld_out + c;
    if (bias == nullptr) {
      for (int64_t k = 0; k < count; ++k) {
        dst[k] = static_cast<scalar_t>(values[k]);
      }
      return;
    }
    // fp16/bf16: the LoRA term and the bias are summed in fp32 and rounded once.
    for (int64_t k = 0; k < count; ++k) {
      dst[k] = static_cast<scalar_t>(values[k] + static_cast<T>(bias[c + k]));
    }
  }
};

// IB rows x SV vectors of columns c .. of one panel; `count` of its columns are
// inside the matrix (the rest is the zero padding of the last panel).
template <typename I, int IB, int SV, typename T, typename Epilogue>
FUSED_LORA_INLINE void expand_block(const T* coef, int64_t rank, const T* panel, int64_t i0,
                                    int64_t c, int64_t count, const Epilogue& epilogue) {
  using V = Vec<T, I>;
  constexpr int L = kLanes<T, I>;
  constexpr int64_t C = kPanelCols<T>;
  V acc[IB][SV] = {};
  for (int64_t j = 0; j < rank; ++j) {
    V mv[SV];
    for (int q = 0; q < SV; ++q) {
      mv[q] = load_vec<V>(panel + j * C + q * L);
    }
    for (int a = 0; a < IB; ++a) {
      const T s = coef[a * rank + j];
      for (int q = 0; q < SV; ++q) {
        acc[a][q] += s * mv[q];
      }
    }
  }
  if (count >= SV * L) {
    for (int a = 0; a < IB; ++a) {
      for (int q = 0; q < SV; ++q) {
        epilogue.vec(i0 + a, c + q * L, acc[a][q]);
      }
    }
    return;
  }
  alignas(64) T lanes[SV * L];
  for (int a = 0; a < IB; ++a) {
    for (int q = 0; q < SV; ++q) {
      store_vec(lanes + q * L, acc[a][q]);
    }
    epilogue.tail(i0 + a, c, lanes, count);
  }
}

// IB rows (i0 ..), all columns: every panel, in parts of SV vectors.
template <typename I, int IB, int SV, typename T, typename Epilogue>
FUSED_LORA_INLINE void expand_rows(const T* coef, const T* packed, int64_t rank, int64_t n,
                                   int64_t i0, const Epilogue& epilogue) {
  constexpr int64_t C = kPanelCols<T>;
  constexpr int64_t part_cols = SV * kLanes<T, I>;
  static_assert(C % part_cols == 0, "a panel splits into whole parts");
  for (int64_t c = 0; c < n; c += part_cols) {
    const T* part = packed + (c / C) * rank * C + c % C;
    expand_block<I, IB, SV>(coef, rank, part, i0, c, std::min<int64_t>(part_cols, n - c), epilogue);
  }
}

template <typename I, typename T, typename Epilogue>
FUSED_LORA_INLINE void expand_impl(const T* coef, const T* packed, int64_t rows, int64_t rank,
                                   int64_t n, const Epilogue& epilogue) {
  constexpr int IB = kExpandRows<I>;
  constexpr int SV = std::min<int>(kExpandVectors, kPanelCols<T> / kLanes<T, I>);
  // NOTE: rows outer, panels inner: each block of IB rows is written whole, in
  // address order (a stream the prefetchers follow), while the packed panels
  // (r x n, L2-sized) are read again for every block. Panels outer wrote the
  // output a column strip at a time, one row stride apart.
  int64_t i = 0;
  for (; i + IB <= rows; i += IB) {
    expand_rows<I, IB, SV>(coef + i * rank, packed, rank, n, i, epilogue);
  }
  for (; i < rows; ++i) {
    expand_rows<I, 1, SV>(coef + i * rank, packed, rank, n, i, epilogue);
  }
}

template <typename I, typename scalar_t, typename T>
FUSED_LORA_INLINE void expand_masked_store_impl(const T* coef, const T* packed, int64_t rows,
                                                int64_t rank, int64_t n, const uint16_t* rnd,
                                                int64_t ld_rnd, uint32_t threshold, T alpha,
                                                scalar_t* out, int64_t ld_out) {
  const MaskedStore<I, scalar_t, T> epilogue{rnd, ld_rnd, threshold, alpha, out, ld_out};
  expand_impl<I>(coef, packed, rows, rank, n, epilogue);
}

template <typename I, typename scalar_t, typename T>
FUSED_LORA_INLINE void expand_bias_store_impl(const T* coef, const T* packed, int64_t rows,
                                              int64_t rank, int64_t n, const scalar_t* bias,
                                              scalar_t* out, int64_t ld_out) {
  const BiasStore<I, scalar_t, T> epilogue{bias, out, ld_out};
  expand_impl<I>(coef, packed, rows, rank, n, epilogue);
}

}  // namespace

#define FUSED_LORA_DEFINE_RANK_KERNELS_ACC(acc_t)                                              \
  FUSED_LORA_DISPATCH(void, row_dots,                                                          \
                      (const acc_t* in, int64_t ld_in, const acc_t* m_t, int64_t rows,         \
                       int64_t rank, int64_t n, acc_t* out),                                   \
                      row_dots_impl, (in, ld_in, m_t, rows, rank, n, out))                     \
  FUSED_LORA_DISPATCH(void, outer_accumulate,                                                  \
                      (const acc_t* coef, const acc_t* in, int64_t ld_in, int64_t rows,        \
                       int64_t rank, int64_t n, acc_t* out, int64_t ld_out),                   \
                      outer_accumulate_impl, (coef, in, ld_in, rows, rank, n, out, ld_out))

FUSED_LORA_DEFINE_RANK_KERNELS_ACC(float)
FUSED_LORA_DEFINE_RANK_KERNELS_ACC(double)

#define FUSED_LORA_DEFINE_RANK_KERNELS_OUT(scalar_t, acc_t)                                    \
  FUSED_LORA_DISPATCH(void, expand_masked_store,                                               \
                      (const acc_t* coef, const acc_t* packed, int64_t rows, int64_t rank,     \
                       int64_t n, const uint16_t* rnd, int64_t ld_rnd, uint32_t threshold,     \
                       acc_t alpha, scalar_t* out, int64_t ld_out),                            \
                      expand_masked_store_impl,                                                \
                      (coef, packed, rows, rank, n, rnd, ld_rnd, threshold, alpha, out, ld_out)) \
  FUSED_LORA_DISPATCH(void, expand_bias_store,                                                 \
                      (const acc_t* coef, const acc_t* packed, int64_t rows, int64_t rank,     \
                       int64_t n, const scalar_t* bias, scalar_t* out, int64_t ld_out),        \
                      expand_bias_store_impl, (coef, packed, rows, rank, n, bias, out, ld_out))

FUSED_LORA_DEFINE_RANK_KERNELS_OUT(float, float)
FUSED_LORA_DEFINE_RANK_KERNELS_OUT(double, double)
FUSED_LORA_DEFINE_RANK_KERNELS_OUT(c10::BFloat16, float)
FUSED_LORA_DEFINE_RANK_KERNELS_OUT(c10::Half, float)

}  // namespace fused_lora
