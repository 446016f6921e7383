// The base GEMMs of a 4-bit (bitsandbytes NF4 / FP4) weight for few rows, dequantizing tile by
// tile into a per-thread buffer that stays in cache, instead of a whole dense (N, K) weight:
//
//   transposed:  out (T, N) += a (T, K) W^T     the forward's x W^T
//   otherwise:   out (T, K) += a (T, N) W       the backward's dy W
//
// fp32 only. Each W element is dequantized once per call, exactly as dequantize_4bit does
// (the same bits), then used for all T rows from cache. The reason: at small T the base GEMM
// reads W once per call, so dequantizing the whole weight into a buffer costs as much again
// (a 16 MB write and read for 2048 x 2048 in fp32); tile by tile it stays in L1/L2.
//
// Summation order fixed by the output element's position (never by threads or the ISA level;
// avx2 and avx512 give the same bits, the baseline build has no FMA): out[t, n] += the 16
// partial sums of k = l (mod 16), each in increasing k, added in lane order; out[t, k] += the
// terms in increasing n, each one fused multiply-add into out.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dequantize_4bit.h"
#include "lora_cpu.h"
#include "simd.h"

namespace fused_lora {
namespace {

using V16 = VecBytes<float, 64>;  // 16 partial sums on every ISA level (the fixed summation order)

// Register blocks per ISA level (accumulators + loads fit its vector registers).
template <typename I>
struct Tiles;
template <>
struct Tiles<Avx512Isa> {
  static constexpr int kRows = 4, kCols = 4;  // 16 zmm accumulators
};
template <>
struct Tiles<Avx2Isa> {
  static constexpr int kRows = 2, kCols = 2;  // 8 ymm accumulators
};
template <>
struct Tiles<BaselineIsa> {
  static constexpr int kRows = 2, kCols = 1;  // 8 xmm accumulators
};

FUSED_LORA_INLINE float lane_sum(const V16& v) {
  float sum = v[0];
  for (int l = 1; l < 16; ++l) {
    sum += v[l];
  }
  return sum;
}

// out[r, c] += sum_k a[r, k] w[c, k] for r < RT, c < CN; K a multiple of 16.
template <int RT, int CN>
FUSED_LORA_INLINE void nt_tile(const float* a, int64_t ld_a, const float* w, int64_t K, float* out,
                               int64_t ld_out) {
  V16 acc[RT][CN];
  for (int r = 0; r < RT; ++r) {
    for (int c = 0; c < CN; ++c) {
      acc[r][c] = V16{};
    }
  }
  for (int64_t k = 0; k < K; k += 16) {
    V16 wv[CN];
    for (int c = 0; c < CN; ++c) {
      wv[c] = load_vec<V16>(w + c * K + k);
    }
    for (int r = 0; r < RT; ++r) {
      const V16 av = load_vec<V16>(a + r * ld_a + k);
      for (int c = 0; c < CN; ++c) {
        acc[r][c] += av * wv[c];
      }
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int c = 0; c < CN; ++c) {
      out[r * ld_out + c] += lane_sum(acc[r][c]);
    }
  }
}

template <typename I>
FUSED_LORA_INLINE void nt_rows_impl(const float* a, int64_t ld_a, int64_t rows, const float* w, int64_t cols,
                                    int64_t K, float* out, int64_t ld_out) {
  constexpr int RT = Tiles<I>::kRows, CN = Tiles<I>::kCols;
  int64_t c = 0;
  for (; c + CN <= cols; c += CN) {
    int64_t r = 0;
    for (; r + RT <= rows; r += RT) {
      nt_tile<RT, CN>(a + r * ld_a, ld_a, w + c * K, K, out + r * ld_out + c, ld_out);
    }
    for (; r < rows; ++r) {
      nt_tile<1, CN>(a + r * ld_a, ld_a, w + c * K, K, out + r * ld_out + c, ld_out);
    }
  }
  for (; c < cols; ++c) {
    int64_t r = 0;
    for (; r + RT <= rows; r += RT) {
      nt_tile<RT, 1>(a + r * ld_a, ld_a, w + c * K, K, out + r * ld_out + c, ld_out);
    }
    for (; r < rows; ++r) {
      nt_tile<1, 1>(a + r * ld_a, ld_a, w + c * K, K, out + r * ld_out + c, ld_out);
    }
  }
}

// out[r, 16 v + l] += sum_j a[r, j] w[j, 16 v + l] for r < RT, v < CV, j < n (in increasing j).
template <int RT, int CV>
FUSED_LORA_INLINE void nn_tile(const float* a, int64_t ld_a, int64_t n, const float* w, int64_t ld_w, float* out,
                               int64_t ld_out) {
  V16 acc[RT][CV];
  for (int r = 0; r < RT; ++r) {
    for (int v = 0; v < CV; ++v) {
      acc[r][v] = load_vec<V16>(out + r * ld_out + 16 * v);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    V16 wv[CV];
    for (int v = 0; v < CV; ++v) {
      wv[v] = load_vec<V16>(w + j * ld_w + 16 * v);
    }
    for (int r = 0; r < RT; ++r) {
      const float coef = a[r * ld_a + j];
      for (int v = 0; v < CV; ++v) {
        acc[r][v] += coef * wv[v];
      }
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int v = 0; v < CV; ++v) {
      store_vec(out + r * ld_out + 16 * v, acc[r][v]);
    }
  }
}

// cols a multiple of 16.
template <typename I>
FUSED_LORA_INLINE void nn_rows_impl(const float* a, int64_t ld_a, int64_t rows, int64_t n, const float* w,
                                    int64_t ld_w, int64_t cols, float* out, int64_t ld_out) {
  constexpr int RT = Tiles<I>::kRows, CV = Tiles<I>::kCols;
  const int64_t vectors = cols / 16;
  int64_t v = 0;
  for (; v + CV <= vectors; v += CV) {
    int64_t r = 0;
    for (; r + RT <= rows; r += RT) {
      nn_tile<RT, CV>(a + r * ld_a, ld_a, n, w + 16 * v, ld_w, out + r * ld_out + 16 * v, ld_out);
    }
    for (; r < rows; ++r) {
      nn_tile<1, CV>(a + r * ld_a, ld_a, n, w + 16 * v, ld_w, out + r * ld_out + 16 * v, ld_out);
    }
  }
  for (; v < vectors; ++v) {
    int64_t r = 0;
    for (; r + RT <= rows; r += RT) {
      nn_tile<RT, 1>(a + r * ld_a, ld_a, n, w + 16 * v, ld_w, out + r * ld_out + 16 * v, ld_out);
    }
    for (; r < rows; ++r) {
      nn_tile<1, 1>(a + r * ld_a, ld_a, n, w + 16 * v, ld_w, out + r * ld_out + 16 * v, ld_out);
    }
  }
}

}  // namespace

FUSED_LORA_DISPATCH(void, nt_rows,
                    (const float* a, int64_t ld_a, int64_t rows, const float* w, int64_t cols, int64_t K, float* out,
                     int64_t ld_out),
                    nt_rows_impl, (a, ld_a, rows, w, cols, K, out, ld_out))
FUSED_LORA_DISPATCH(void, nn_rows,
                    (const float* a, int64_t ld_a, int64_t rows, int64_t n, const float* w, int64_t ld_w,
                     int64_t cols, float* out, int64_t ld_out),
                    nn_rows_impl, (a, ld_a, rows, n, w, ld_w, cols, out, ld_out))

namespace {

// W rows per forward task, W rows per backward step, columns per backward task (a multiple of 16).
constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kRowsPerStep = 16;
constexpr int64_t kColumnsPerTask = 256;

struct Buffers {
  std::vector<float> weight;
  std::vector<float> scales;
};

}  // namespace

at::Tensor gemm_4bit(const at::Tensor& a, const at::Tensor& packed, const at::Tensor& absmax,
                     const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                     int64_t nested_blocksize, int64_t out_features, int64_t in_features, bool transposed,
                     at::Tensor out) {
  TORCH_CHECK(out_features >= 1 && in_features >= 1, "out_features, in_features: expected ints >= 1, got ",
              out_features, ", ", in_features);
  const int64_t N = out_features, K = in_features;
  TORCH_CHECK(blocksize >= 16 && blocksize % 16 == 0 && K % blocksize == 0,
              "blocksize: expected a multiple of 16 that divides in_features (", K, "), got ", blocksize);
  TORCH_CHECK(a.defined() && a.device().is_cpu() && a.layout() == at::kStrided && a.dim() == 2 &&
                  a.scalar_type() == at::kFloat && a.stride(1) == 1,
              "a: expected a 2-D float32 CPU tensor with unit column stride");
  const int64_t rows = a.size(0);
  TORCH_CHECK(a.size(1) == (transposed ? K : N), "a: expected shape (T, ", transposed ? K : N, "), got ", a.sizes());
  TORCH_CHECK(out.defined() && out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == rows && out.size(1) == (transposed ? N : K),
              "out: expected a contiguous float32 CPU tensor of shape (", rows, ", ", transposed ? N : K, "), got ",
              out.sizes(), " ", out.scalar_type());
  const Weight4bitView w = checked_weight_view(packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
                                               nested_blocksize, N * K);
  if (rows == 0) {
    return out;
  }
  const float* a_data = a.const_data_ptr<float>();
  const int64_t ld_a = a.stride(0);
  float* out_data = out.data_ptr<float>();
  if (transposed) {
    // Tasks over row blocks of W: dequantize kRowsPerTask rows, multiply every row of a by them.
    const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Buffers buffers;
      buffers.weight.resize(kRowsPerTask * K);
      buffers.scales.resize(kRowsPerTask * K / blocksize + 1);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n0 = task * kRowsPerTask;
        const int64_t n1 = std::min(N, n0 + kRowsPerTask);
        dequantize_range(w, n0 * K, n1 * K, buffers.weight.data(), buffers.scales.data());
        nt_rows(a_data, ld_a, rows, buffers.weight.data(), n1 - n0, K, out_data + n0, N);
      }
    });
    return out;
  }
  // Tasks over column blocks of out: for every kRowsPerStep rows of W, dequantize their columns of the
  // block, and add a's matching columns times them.
  const int64_t columns = std::max<int64_t>(kColumnsPerTask, blocksize);  // a multiple of blocksize and 16
  const int64_t tasks = (K + columns - 1) / columns;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Buffers buffers;
    buffers.weight.resize(kRowsPerStep * columns);
    buffers.scales.resize(columns / blocksize + 1);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k0 = task * columns;
      const int64_t width = std::min(K, k0 + columns) - k0;
      for (int64_t n0 = 0; n0 < N; n0 += kRowsPerStep) {
        const int64_t count = std::min(kRowsPerStep, N - n0);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t start = (n0 + j) * K + k0;
          dequantize_range(w, start, start + width, buffers.weight.data() + j * columns, buffers.scales.data());
        }
        nn_rows(a_data + n0, ld_a, rows, count, buffers.weight.data(), columns, width, out_data + k0, K);
      }
    }
  });
  return out;
}

}  // namespace fused_lora
