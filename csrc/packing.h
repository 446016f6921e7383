// Packing the adapters for the rank-r kernels, straight from the caller's tensors
// (any strides, any adapter dtype, the scaling folded in), and the ordered sum of
// per-task partials into the gradient tensors: plain loops over r * (K or N)
// elements, with no ATen ops in between (each would cost microseconds per call
// at tiny sizes).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "rank_kernels.h"

namespace fused_lora {

// packed[k * r_pad + j] = j < rank ? acc(m(j, k)) : 0, m(j, k) = m[j * stride_j + k * stride_k]:
// the (n, r_pad) layout row_dots reads.
template <typename acc_t, typename src_t>
void pack_transposed(const src_t* m, int64_t stride_j, int64_t stride_k, int64_t rank, int64_t n,
                     acc_t* packed) {
  const int64_t ld = packed_rank(rank, sizeof(acc_t));
  if (stride_k == 1 && stride_j != 1) {
    // NOTE: a transpose of row-major m (lora_A): tiles of 16 k, so each row of m is
    // read a cache line at a time; k outer, j inner read r rows a power-of-2 stride
    // apart per k, all in one L1 set. Packing still costs r * K element moves per
    // call: with fewer rows than the rank, cpu_ops takes the ATen path instead.
    constexpr int64_t kTile = 16;
    for (int64_t k0 = 0; k0 < n; k0 += kTile) {
      const int64_t k1 = std::min(n, k0 + kTile);
      for (int64_t j = 0; j < rank; ++j) {
        const src_t* src = m + j * stride_j;
        for (int64_t k = k0; k < k1; ++k) {
          packed[k * ld + j] = static_cast<acc_t>(src[k]);
        }
      }
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t j = rank; j < ld; ++j) {
          packed[k * ld + j] = acc_t(0);
        }
      }
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    acc_t* dst = packed + k * ld;
    for (int64_t j = 0; j < rank; ++j) {
      dst[j] = static_cast<acc_t>(m[j * stride_j + k * stride_k]);
    }
    for (int64_t j = rank; j < ld; ++j) {
      dst[j] = acc_t(0);
    }
  }
}

// Panel p, row j, column c: acc(m(j, p * C + c)) * scale (0 past n), m(j, c) = m[j * stride_j +
// c * stride_c]: the layout the expand kernels read. scale = 1 is exact.
template <typename acc_t, typename src_t>
void pack_panels(const src_t* m, int64_t stride_j, int64_t stride_c, int64_t rank, int64_t n,
                 acc_t scale, acc_t* packed) {
  const int64_t C = panel_cols(sizeof(acc_t));
  for (int64_t c0 = 0; c0 < n; c0 += C) {
    acc_t* panel = packed + (c0 / C) * rank * C;
    const int64_t count = std::min<int64_t>(C, n - c0);
    for (int64_t j = 0; j < rank; ++j) {
      const src_t* src = m + j * stride_j + c0 * stride_c;
      for (int64_t c = 0; c < count; ++c) {
        panel[j * C + c] = static_cast<acc_t>(src[c * stride_c]) * scale;
      }
      for (int64_t c = count; c < C; ++c) {
        panel[j * C + c] = acc_t(0);
      }
    }
  }
}

// The same from an adapter tensor (float, double, bfloat16 or half) and its strides.
template <typename acc_t>
void pack_transposed_from(const at::Tensor& m, int64_t stride_j, int64_t stride_k, int64_t rank,
                          int64_t n, acc_t* packed) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(), "pack_transposed", [&] {
    pack_transposed(m.const_data_ptr<scalar_t>(), stride_j, stride_k, rank, n, packed);
  });
}

template <typename acc_t>
void pack_panels_from(const at::Tensor& m, int64_t stride_j, int64_t stride_c, int64_t rank,
                      int64_t n, acc_t scale, acc_t* packed) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(), "pack_panels", [&] {
    pack_panels(m.const_data_ptr<scalar_t>(), stride_j, stride_c, rank, n, scale, packed);
  });
}

// out(j, c) = out_t((partials[0](j, c) + partials[1](j, c) + ...) * scale), summed in task
// order; partials are (tasks, rank, cols) contiguous, out(j, c) = out[j * stride_j + c * stride_c].
// Columns [c_begin, c_end) only, so the caller may split the columns over threads.
template <typename out_t, typename acc_t>
void sum_partials(const acc_t* partials, int64_t tasks, int64_t rank, int64_t cols, int64_t c_begin,
                  int64_t c_end, acc_t scale, out_t* out, int64_t stride_j, int64_t stride_c) {
  constexpr int64_t kChunk = 256;  // columns summed at a time: each partial is read as a stream
  acc_t sum[kChunk];
  for (int64_t j = 0; j < rank; ++j) {
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kChunk) {
      const int64_t count = std::min(kChunk, c_end - c0);
      const acc_t* first = partials + j * cols + c0;
      for (int64_t c = 0; c < count; ++c) {
        sum[c] = first[c];
      }
      for (int64_t t = 1; t < tasks; ++t) {
        const acc_t* p = first + t * rank * cols;
        for (int64_t c = 0; c < count; ++c) {
          sum[c] += p[c];
        }
      }
      out_t* dst = out + j * stride_j + c0 * stride_c;
      for (int64_t c = 0; c < count; ++c) {
        dst[c * stride_c] = static_cast<out_t>(sum[c] * scale);
      }
    }
  }
}

}  // namespace fused_lora
