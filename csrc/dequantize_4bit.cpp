// Dequantization of a bitsandbytes 4-bit weight (NF4 / FP4, with or without double
// quantization) into a dense fp32 / fp16 / bf16 matrix, bit-exact against
// bitsandbytes.functional.dequantize_4bit (fused_lora/quantized.py documents the layout).
//
// Element i of the flattened (N, K) weight is code[nibble_i] * a[i / blocksize] in fp32,
// rounded once (to nearest even) to the output dtype; with double quantization
// a[b] = nested_code[absmax[b]] * nested_absmax[b / nested_blocksize] + offset, the
// product rounded to fp32 before the addition (never a fused multiply-add: the build
// contracts with -ffp-contract=fast, see block_scales).
//
// The nibble lookup is a 16-entry table held in registers: one vpermps (AVX-512) or two
// vpermps and a blend (AVX2) per vector, one build per ISA level (simd.h, isa.h).
// Parallel over chunks of whole absmax blocks on ATen's threads (weights of 16M elements and more).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dequantize_4bit.h"
#include "lora_cpu.h"
#include "simd.h"

#if FUSED_LORA_X86
#include <immintrin.h>
// NOTE: GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* placeholders of the
// unmasked intrinsics), a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fused_lora {
namespace {

// Elements per parallel chunk (a multiple of every blocksize it is rounded to).
constexpr int64_t kChunk = 1 << 15;
// Below this many elements the chunks run on the calling thread.
// NOTE: measured on this project's 2-core machines (2048 x 2048 NF4 to fp32, 4M elements): 0.76 ms on one
// thread; on two, 0.4 ms when the machine is otherwise idle but a median of 6-8 ms when other processes
// share the cores (the join waits for a descheduled thread; a plain 16 MB copy_ on two threads does the
// same). A memory-bound loop gains little from a second thread: only weights of 16M elements and more
// (about 3 ms on one thread) are split.
constexpr int64_t kMinParallelElements = 1 << 24;
// Outputs of at least this many bytes are written with non-temporal stores (larger than a core's L2).
constexpr int64_t kStreamBytes = 1 << 22;

// a[j] = the fp32 absmax of block first + j, for j < count.
// NOTE: without the volatile, -ffp-contract=fast may fuse the product and the sum into
// one FMA (one rounding), which bitsandbytes does not do: its result differs in the last bit.
void block_scales(const Weight4bitView& w, int64_t first, int64_t count, float* a) {
  if (w.absmax_u8 == nullptr) {
    std::memcpy(a, w.absmax_f32 + first, sizeof(float) * count);
    return;
  }
  for (int64_t j = 0; j < count; ++j) {
    const int64_t b = first + j;
    volatile float product = w.nested_code[w.absmax_u8[b]] * w.nested_absmax[b / w.nested_blocksize];
    a[j] = product + w.offset;
  }
}

// Output conversions, rounding to nearest even (as c10::Half / c10::BFloat16, torch's .to()
// and bitsandbytes).
template <typename out_t>
FUSED_LORA_INLINE out_t from_float(float v) {
  return static_cast<out_t>(v);
}

// Scalar: elements [begin, end) of the flattened weight, with scale a (one block or less).
template <typename out_t>
FUSED_LORA_INLINE void dequantize_scalar(const uint8_t* packed, const float* code, float a, int64_t begin,
                                         int64_t end, out_t* out) {
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t byte = packed[i >> 1];
    const int nibble = (i & 1) ? (byte & 15) : (byte >> 4);
    out[i] = from_float<out_t>(code[nibble] * a);
  }
}

#if FUSED_LORA_X86

// ---- AVX-512: 16 elements (8 bytes) per step -------------------------------------------------

FUSED_LORA_TARGET_AVX512 FUSED_LORA_INLINE __m512i nibbles16_avx512(const uint8_t* bytes) {
  // b0 b0 b1 b1 ... b7 b7 -> 16 int32 lanes; even lanes take the high nibble.
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m512i wide = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(raw, raw));
  const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  return _mm512_and_si512(_mm512_srlv_epi32(wide, shifts), _mm512_set1_epi32(15));
}

// Stream: non-temporal stores (out aligned to the vector), for outputs larger than the caches.
template <bool Stream>
FUSED_LORA_TARGET_AVX512 FUSED_LORA_INLINE void put256_avx512(void* out, __m256i v) {
  if constexpr (Stream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
  }
}

template <bool Stream>
FUSED_LORA_TARGET_AVX512 FUSED_LORA_INLINE void store16_avx512(float* out, __m512 v) {
  if constexpr (Stream) {
    _mm512_stream_ps(out, v);
  } else {
    _mm512_storeu_ps(out, v);
  }
}

template <bool Stream>
FUSED_LORA_TARGET_AVX512 FUSED_LORA_INLINE void store16_avx512(c10::Half* out, __m512 v) {
  put256_avx512<Stream>(out, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <bool Stream>
FUSED_LORA_TARGET_AVX512 FUSED_LORA_INLINE void store16_avx512(c10::BFloat16* out, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
  put256_avx512<Stream>(out, _mm512_cvtepi32_epi16(rounded));
}

template <bool Stream, typename out_t>
FUSED_LORA_TARGET_AVX512 void dequantize_blocks_avx512(const uint8_t* packed, const float* code, const float* a,
                                                        int64_t blocksize, int64_t begin, int64_t end, out_t* out) {
  const __m512 table = _mm512_loadu_ps(code);
  for (int64_t start = begin; start < end; start += blocksize) {
    const int64_t stop = std::min(end, start + blocksize);
    const float scale = a[(start - begin) / blocksize];
    const __m512 scale_v = _mm512_set1_ps(scale);
    int64_t i = start;
    for (; i + 16 <= stop; i += 16) {  // start is even: whole bytes
      const __m512 values = _mm512_permutexvar_ps(nibbles16_avx512(packed + (i >> 1)), table);
      store16_avx512<Stream>(out + i, _mm512_mul_ps(values, scale_v));
    }
    dequantize_scalar(packed, code, scale, i, stop, out);
  }
  if constexpr (Stream) {
    _mm_sfence();
  }
}

// ---- AVX2: 8 elements (4 bytes) per step ------------------------------------------------------

FUSED_LORA_TARGET_AVX2 FUSED_LORA_INLINE __m256i nibbles8_avx2(const uint8_t* bytes) {
  int32_t word;
  std::memcpy(&word, bytes, 4);
  const __m128i raw = _mm_cvtsi32_si128(word);
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(raw, raw));
  const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  return _mm256_and_si256(_mm256_srlv_epi32(wide, shifts), _mm256_set1_epi32(15));
}

template <bool Stream>
FUSED_LORA_TARGET_AVX2 FUSED_LORA_INLINE void put128_avx2(void* out, __m128i v) {
  if constexpr (Stream) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(out), v);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), v);
  }
}

template <bool Stream>
FUSED_LORA_TARGET_AVX2 FUSED_LORA_INLINE void store8_avx2(float* out, __m256 v) {
  if constexpr (Stream) {
    _mm256_stream_ps(out, v);
  } else {
    _mm256_storeu_ps(out, v);
  }
}

template <bool Stream>
FUSED_LORA_TARGET_AVX2 FUSED_LORA_INLINE void store8_avx2(c10::Half* out, __m256 v) {
  put128_avx2<Stream>(out, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <bool Stream>
FUSED_LORA_TARGET_AVX2 FUSED_LORA_INLINE void store8_avx2(c10::BFloat16* out, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  put128_avx2<Stream>(out, _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
}

template <bool Stream, typename out_t>
FUSED_LORA_TARGET_AVX2 void dequantize_blocks_avx2(const uint8_t* packed, const float* code, const float* a,
                                                    int64_t blocksize, int64_t begin, int64_t end, out_t* out) {
  const __m256 low_table = _mm256_loadu_ps(code);
  const __m256 high_table = _mm256_loadu_ps(code + 8);
  for (int64_t start = begin; start < end; start += blocksize) {
    const int64_t stop = std::min(end, start + blocksize);
    const float scale = a[(start - begin) / blocksize];
    const __m256 scale_v = _mm256_set1_ps(scale);
    int64_t i = start;
    for (; i + 8 <= stop; i += 8) {
      const __m256i index = nibbles8_avx2(packed + (i >> 1));
      // Entries 8..15 where bit 3 is set: blendv reads the sign bit, so move bit 3 there.
      const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
      const __m256 values = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_table, index),
                                             _mm256_permutevar8x32_ps(high_table, index), high);
      store8_avx2<Stream>(out + i, _mm256_mul_ps(values, scale_v));
    }
    dequantize_scalar(packed, code, scale, i, stop, out);
  }
  if constexpr (Stream) {
    _mm_sfence();
  }
}

#endif  // FUSED_LORA_X86

template <typename out_t>
void dequantize_blocks_baseline(const uint8_t* packed, const float* code, const float* a, int64_t blocksize,
                                int64_t begin, int64_t end, out_t* out) {
  for (int64_t start = begin; start < end; start += blocksize) {
    dequantize_scalar(packed, code, a[(start - begin) / blocksize], start, std::min(end, start + blocksize), out);
  }
}

// stream: non-temporal stores; only where out + begin is 64-byte aligned and blocksize a multiple of 16
// (every vector store then aligned).
template <typename out_t>
void dequantize_blocks(const uint8_t* packed, const float* code, const float* a, int64_t blocksize, int64_t begin,
                       int64_t end, out_t* out, bool stream = false) {
#if FUSED_LORA_X86
  switch (active_isa()) {
    case Isa::kAvx512:
      return stream ? dequantize_blocks_avx512<true>(packed, code, a, blocksize, begin, end, out)
                    : dequantize_blocks_avx512<false>(packed, code, a, blocksize, begin, end, out);
    case Isa::kAvx2:
      return stream ? dequantize_blocks_avx2<true>(packed, code, a, blocksize, begin, end, out)
                    : dequantize_blocks_avx2<false>(packed, code, a, blocksize, begin, end, out);
    default: break;
  }
#endif
  dequantize_blocks_baseline(packed, code, a, blocksize, begin, end, out);
}

// out[0 .. end - begin) = elements begin .. end - 1 of the flattened weight (begin a multiple of blocksize);
// scales: room for the range's blocks.
template <typename out_t>
void dequantize_chunk(const Weight4bitView& w, int64_t begin, int64_t end, out_t* out, float* scales,
                      bool stream = false) {
  block_scales(w, begin / w.blocksize, (end - begin + w.blocksize - 1) / w.blocksize, scales);
  // NOTE: begin is block-aligned and blocks are even-sized: the range starts on a whole byte.
  dequantize_blocks(w.packed + begin / 2, w.code, scales, w.blocksize, 0, end - begin, out, stream);
}

}  // namespace

void dequantize_range(const Weight4bitView& w, int64_t begin, int64_t end, float* out, float* scales) {
  dequantize_chunk(w, begin, end, out, scales);
}

namespace {

template <typename out_t>
void dequantize_all(const Weight4bitView& w, int64_t numel, out_t* out) {
  const int64_t blocksize = w.blocksize;
  const int64_t chunk = std::max<int64_t>(blocksize, kChunk / blocksize * blocksize);
  const int64_t chunks = (numel + chunk - 1) / chunk;
  const int64_t grain = numel < kMinParallelElements ? chunks : 1;
  // NOTE: an output larger than the caches is written with non-temporal stores: a cached store of a line
  // first reads it (the GEMM that follows evicted the buffer since the last call), doubling the traffic.
  // Measured inside a 2048x2048 fwd+bwd at T=4096 (fp32): 1.9 ms per dequantization with cached stores.
  const bool stream = numel * static_cast<int64_t>(sizeof(out_t)) >= kStreamBytes && blocksize % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0;
  at::parallel_for(0, chunks, grain, [&](int64_t first_chunk, int64_t last_chunk) {
    float scales[kChunk / 2 + 1];  // blocks per chunk: chunk / blocksize <= kChunk / 2
    for (int64_t c = first_chunk; c < last_chunk; ++c) {
      const int64_t begin = c * chunk;
      dequantize_chunk(w, begin, std::min(numel, begin + chunk), out + begin, scales, stream);
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t min_numel) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided && t.is_contiguous(), name, ": expected a contiguous dense tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() >= min_numel, name, ": expected at least ", min_numel, " elements, got ", t.numel());
}

}  // namespace

Weight4bitView checked_weight_view(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                                   int64_t nested_blocksize, int64_t numel) {
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  check_cpu(packed, "packed", at::kByte, (numel + 1) / 2);
  check_cpu(code, "code", at::kFloat, 16);
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(nested == nested_code.has_value(),
              "nested_absmax, nested_code: expected both (double quantization) or neither");
  if (nested) {
    TORCH_CHECK(nested_blocksize >= 1, "nested_blocksize: expected an int >= 1, got ", nested_blocksize);
    check_cpu(absmax, "absmax", at::kByte, blocks);
    check_cpu(*nested_code, "nested_code", at::kFloat, 256);
    check_cpu(*nested_absmax, "nested_absmax", at::kFloat, (blocks + nested_blocksize - 1) / nested_blocksize);
  } else {
    check_cpu(absmax, "absmax", at::kFloat, blocks);
  }
  return Weight4bitView{packed.const_data_ptr<uint8_t>(),
                        code.const_data_ptr<float>(),
                        nested ? absmax.const_data_ptr<uint8_t>() : nullptr,
                        nested ? nullptr : absmax.const_data_ptr<float>(),
                        nested ? nested_code->const_data_ptr<float>() : nullptr,
                        nested ? nested_absmax->const_data_ptr<float>() : nullptr,
                        nested_blocksize,
                        static_cast<float>(offset),
                        blocksize};
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                           int64_t nested_blocksize, at::Tensor out) {
  TORCH_CHECK(out.defined() && out.device().is_cpu() && out.layout() == at::kStrided && out.is_contiguous(),
              "out: expected a contiguous dense CPU tensor");
  const auto out_dtype = out.scalar_type();
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "out: expected dtype float32, float16 or bfloat16, got ", out_dtype);
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0 && blocksize <= kChunk,
              "blocksize: expected an even int in [2, ", kChunk, "], got ", blocksize);
  const int64_t numel = out.numel();
  const Weight4bitView w = checked_weight_view(packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
                                               nested_blocksize, numel);
  if (numel == 0) {
    return out;
  }
  auto run = [&](auto* out_data) { dequantize_all(w, numel, out_data); };
  if (out_dtype == at::kFloat) {
    run(out.data_ptr<float>());
  } else if (out_dtype == at::kHalf) {
    run(out.data_ptr<c10::Half>());
  } else {
    run(out.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace fused_lora
