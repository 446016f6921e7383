// The three small-rank products of the fused loops, on row blocks in task-local
// memory (the big GEMMs go to ATen). acc_t is float or double; all arithmetic is
// in acc_t, and each output element is summed in an order fixed by its position
// (never by the thread, the block path or the ISA level), so results do not
// depend on threads, and the avx2 and avx512 builds give the same bits.
//
//   row_dots:         out[i, j]  = sum_k in[i, k] * m[j, k]      xa = D(x) A^T, dxa = dy B
//   outer_accumulate: out[j, c] += sum_i coef[i, j] * in[i, c]   dA = dxa^T D(x), dB^T = xa^T dy
//   expand_*:         out[i, c]  = f(sum_j coef[i, j] * m[j, c]) dx's s D(dxa A), y's b + xa (sB)^T
//
// Row-major pointers with explicit leading dimensions (ld_*); coef and the
// row_dots output are (rows, r) with leading dimension r. row_dots reads m
// packed by pack_transposed (packing.h): m^T (n, r_pad), r padded with zeros to
// whole 64-byte vectors. The expand kernels read m packed by pack_panels: panels
// of kPanelBytes of columns, each panel's r rows contiguous (so they stay in L1
// with no cache-set conflicts), the last panel zero-padded. Columns c0.. of m start
// at packed + (c0 / panel_cols) * r * panel_cols for c0 a multiple of panel_cols.
//
// Each function runs the build of active_isa() (isa.h, simd.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fused_lora {

constexpr int64_t kPanelBytes = 256;

// Columns per panel, and the packed sizes in elements, for elements of elem_size bytes.
constexpr int64_t panel_cols(int64_t elem_size) { return kPanelBytes / elem_size; }
constexpr int64_t packed_rank(int64_t rank, int64_t elem_size) {
  return (rank + 64 / elem_size - 1) / (64 / elem_size) * (64 / elem_size);
}
constexpr int64_t packed_transposed_size(int64_t rank, int64_t n, int64_t elem_size) {
  return packed_rank(rank, elem_size) * n;
}
constexpr int64_t packed_panels_size(int64_t rank, int64_t n, int64_t elem_size) {
  return (n + panel_cols(elem_size) - 1) / panel_cols(elem_size) * panel_cols(elem_size) * rank;
}

#define FUSED_LORA_DECLARE_RANK_KERNELS_ACC(acc_t)                                           \
  /* m_t: m (r, n) packed by pack_transposed */                                              \
  void row_dots(const acc_t* in, int64_t ld_in, const acc_t* m_t, int64_t rows, int64_t rank, \
                int64_t n, acc_t* out);                                                      \
  void outer_accumulate(const acc_t* coef, const acc_t* in, int64_t ld_in, int64_t rows,     \
                        int64_t rank, int64_t n, acc_t* out, int64_t ld_out);

FUSED_LORA_DECLARE_RANK_KERNELS_ACC(float)
FUSED_LORA_DECLARE_RANK_KERNELS_ACC(double)

#define FUSED_LORA_DECLARE_RANK_KERNELS_OUT(scalar_t, acc_t)                                   \
  /* out[i, c] = scalar(sum_j coef[i, j] m[j, c] * (keep ? alpha : 0)); rnd null: no mask */   \
  void expand_masked_store(const acc_t* coef, const acc_t* packed, int64_t rows, int64_t rank, \
                           int64_t n, const uint16_t* rnd, int64_t ld_rnd, uint32_t threshold, \
                           acc_t alpha, scalar_t* out, int64_t ld_out);                        \
  /* out[i, c] = scalar(sum_j coef[i, j] m[j, c] + bias[c]); bias may be null */               \
  void expand_bias_store(const acc_t* coef, const acc_t* packed, int64_t rows, int64_t rank,   \
                         int64_t n, const scalar_t* bias, scalar_t* out, int64_t ld_out);

FUSED_LORA_DECLARE_RANK_KERNELS_OUT(float, float)
FUSED_LORA_DECLARE_RANK_KERNELS_OUT(double, double)
FUSED_LORA_DECLARE_RANK_KERNELS_OUT(c10::BFloat16, float)
FUSED_LORA_DECLARE_RANK_KERNELS_OUT(c10::Half, float)

}  // namespace fused_lora
