// 4-bit blocks to values on x86-64 CPUs, as two XLA FFI handlers (see cpu_kernel.py for why).
//
// qlora_decode_4bit(packed: u8[rows * half], absmax: f32[rows]; table: f32[16]) -> out[rows, 2 * half]
// out[r, 2j] = table[packed[r, j] >> 4] * absmax[r] and out[r, 2j + 1] = table[packed[r, j] & 15] * absmax[r],
// computed in f32 and rounded to the output's dtype (f32, bf16 or f16) the way XLA's CPU backend rounds:
// the product is one f32 multiply under the caller's floating-point mode, bf16 rounds to nearest even
// with a NaN kept as the quiet NaN of its sign, f16 goes through the hardware conversion.
// Any shapes with those element counts (leading batch dimensions fold into rows); half must be a multiple
// of 16 (blocksize >= 32). XLA passes packed flat: a dynamic slice of a stacked layer's codes copies
// 6x faster into a 1-D buffer than into [rows, half] (the copy a custom call's operand needs).
//
// qlora_decode_4bit_dq(packed, absmax_codes: u8[rows], nested_absmax: f32[ceil(rows / 256)], offset: f32[];
//                      table, dynamic_map: f32[256]) -> out: the same, with the double-quantized absmax decoded
// row by row in here (blockwise.double_dequantize) instead of by XLA beforehand.

#if !defined(__AVX2__)
#error "the 4-bit decode kernel needs AVX2 (or AVX-512); the XLA path decodes elsewhere"
#endif

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Each step decodes kLanes bytes: the values of their high nibbles (elements 0, 2, 4, ...) and of their low
// nibbles (elements 1, 3, 5, ...) as two f32 vectors, times the block's absmax; a store puts them in order.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
using Vec = __m512;
using Bits = __m512i;
using Table = __m512;

inline Table LoadTable(const float* table) { return _mm512_loadu_ps(table); }
inline Vec Broadcast(float scale) { return _mm512_set1_ps(scale); }

inline void DecodeBytes(const uint8_t* bytes, const Table& table, Vec scale, Vec* high, Vec* low) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  *high = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table), scale);
  *low = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(codes, _mm512_set1_epi32(15)), table), scale);
}

inline void StoreFloat32(float* out, Vec high, Vec low) {
  const __m512i head = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i tail = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(high, head, low));
  _mm512_storeu_ps(out + kLanes, _mm512_permutex2var_ps(high, tail, low));
}

// f32 -> bf16 bits, rounded to nearest even, in the upper 16 bits of each lane (the lower 16 are garbage);
// where NaNs may occur (a row whose absmax is not finite), a NaN becomes the quiet NaN of its sign.
// Denormals round like any other value, as XLA's conversion does.
template <bool kMayBeNan>
inline Bits Bfloat16High(Vec v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  if (!kMayBeNan) return rounded;
  const __m512i quiet_nan = _mm512_or_si512(bits, _mm512_set1_epi32(0x7fc00000));  // sign kept; |= 0x7fc0 << 16
  const __m512i nan_bits = _mm512_and_si512(quiet_nan, _mm512_set1_epi32(0xffc00000));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, nan_bits);
}

template <bool kMayBeNan>
inline void StoreBfloat16(uint16_t* out, Vec high, Vec low) {
  // little-endian: each u32 word holds element 2i in its low half and element 2i + 1 in its high half
  const __m512i words = _mm512_or_si512(_mm512_srli_epi32(Bfloat16High<kMayBeNan>(high), 16),
                                        _mm512_and_si512(Bfloat16High<kMayBeNan>(low), _mm512_set1_epi32(0xffff0000)));
  _mm512_storeu_si512(out, words);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Rows of ordinary scale only (no NaN, no infinity, no denormal among the values), where the hardware's
// conversion (round to nearest even; it would flush denormals) gives the same bits as Bfloat16High.
inline void StoreBfloat16Ordinary(uint16_t* out, Vec high, Vec low) {
  const __m512i in_order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                            6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);  // lane i: i/2 (+16 if odd)
  const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(low, high));  // high's 16, then low's
  _mm512_storeu_si512(out, _mm512_permutexvar_epi16(in_order, halves));
}
#else
inline void StoreBfloat16Ordinary(uint16_t* out, Vec high, Vec low) { StoreBfloat16<false>(out, high, low); }
#endif

inline void StoreFloat16(uint16_t* out, Vec high, Vec low) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i words = _mm512_or_si512(_mm512_cvtepu16_epi32(_mm512_cvtps_ph(high, kRound)),
                                        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_cvtps_ph(low, kRound)), 16));
  _mm512_storeu_si512(out, words);
}
#else
constexpr int kLanes = 8;
using Vec = __m256;
using Bits = __m256i;

struct Table {
  __m256 low_half, high_half;  // entries 0-7 and 8-15
};

inline Table LoadTable(const float* table) { return {_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8)}; }
inline Vec Broadcast(float scale) { return _mm256_set1_ps(scale); }

inline Vec Lookup(__m256i codes, const Table& table) {
  const __m256 low = _mm256_permutevar8x32_ps(table.low_half, codes);
  const __m256 high = _mm256_permutevar8x32_ps(table.high_half, codes);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));  // bit 3 picks the half
}

inline void DecodeBytes(const uint8_t* bytes, const Table& table, Vec scale, Vec* high, Vec* low) {
  const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  *high = _mm256_mul_ps(Lookup(_mm256_srli_epi32(codes, 4), table), scale);
  *low = _mm256_mul_ps(Lookup(_mm256_and_si256(codes, _mm256_set1_epi32(15)), table), scale);
}

inline void StoreFloat32(float* out, Vec high, Vec low) {
  const __m256 pairs_a = _mm256_unpacklo_ps(high, low);  // h0 l0 h1 l1 | h4 l4 h5 l5
  const __m256 pairs_b = _mm256_unpackhi_ps(high, low);  // h2 l2 h3 l3 | h6 l6 h7 l7
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(pairs_a, pairs_b, 0x20));
  _mm256_storeu_ps(out + kLanes, _mm256_permute2f128_ps(pairs_a, pairs_b, 0x31));
}

template <bool kMayBeNan>
inline Bits Bfloat16High(Vec v) {  // as in the AVX-512 path
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  if (!kMayBeNan) return rounded;
  const __m256i nan_bits = _mm256_and_si256(_mm256_or_si256(bits, _mm256_set1_epi32(0x7fc00000)),
                                            _mm256_set1_epi32(0xffc00000));
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(nan_bits),
                                              _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

template <bool kMayBeNan>
inline void StoreBfloat16(uint16_t* out, Vec high, Vec low) {
  const __m256i words = _mm256_or_si256(_mm256_srli_epi32(Bfloat16High<kMayBeNan>(high), 16),
                                        _mm256_and_si256(Bfloat16High<kMayBeNan>(low), _mm256_set1_epi32(0xffff0000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), words);
}

inline void StoreBfloat16Ordinary(uint16_t* out, Vec high, Vec low) { StoreBfloat16<false>(out, high, low); }

inline void StoreFloat16(uint16_t* out, Vec high, Vec low) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m128i high_bits = _mm256_cvtps_ph(high, kRound), low_bits = _mm256_cvtps_ph(low, kRound);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi16(high_bits, low_bits));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + kLanes), _mm_unpackhi_epi16(high_bits, low_bits));
}
#endif

constexpr int kBytesPerStep = kLanes;  // each step decodes kLanes bytes into 2 * kLanes values

template <typename Out, typename StorePair>
inline void DecodeRow(const uint8_t* row, Vec scale, const Table& table, int64_t half, Out* out, StorePair store) {
  for (int64_t j = 0; j < half; j += kBytesPerStep) {
    Vec high, low;
    DecodeBytes(row + j, table, scale, &high, &low);
    store(out + 2 * j, high, low);
  }
}

// ForEachRow(begin, end, visit) calls visit(r, absmax[r]) for rows begin..end-1 in order; absmax in f32.
struct PlainAbsmax {
  const float* values;
  template <typename Visit>
  void ForEachRow(int64_t begin, int64_t end, Visit visit) const {
    for (int64_t r = begin; r < end; ++r) visit(r, values[r]);
  }
};

// absmax[r] decoded from double quantization as blockwise.double_dequantize does it: the product
// map[code] * nested_absmax rounded to f32 (a NaN product made the canonical quiet NaN), then + offset.
// Leading batch dimensions: each of `batches` tensors has rows_per rows and groups_per nested scales.
struct DoubleQuantAbsmax {
  static constexpr int64_t kNestedBlocksize = 256;
  const uint8_t* codes;
  const float* nested;
  const float* offset;
  const float* map;
  int64_t rows_per, groups_per;
  template <typename Visit>
  void ForEachRow(int64_t begin, int64_t end, Visit visit) const {
    int64_t batch = begin / rows_per, local = begin % rows_per;
    for (int64_t r = begin; r < end; ++r) {
      float product = map[codes[r]] * nested[batch * groups_per + local / kNestedBlocksize];
      if (std::isnan(product)) product = std::numeric_limits<float>::quiet_NaN();
      visit(r, product + offset[batch]);  // built with -ffp-contract=off: never one FMA
      if (++local == rows_per) local = 0, ++batch;
    }
  }
};

// body(begin, end) over rows 0..rows-1, split into chunks that the calling thread and XLA's intra-op
// pool claim one at a time; returns when all are done. The caller only waits for chunks a thread has
// claimed, so a busy pool costs parallelism, never a deadlock; a task that starts late finds no chunk
// left and touches only the counters, which it co-owns. Small outputs decode on the calling thread.
constexpr int64_t kParallelValues = 1 << 18;

template <typename Body>
void ParallelRows(ffi::ThreadPool& pool, int64_t rows, int64_t values, Body body) {
  const int64_t threads = values < kParallelValues ? 1 : pool.num_threads();
  if (threads <= 1) {
    body(0, rows);
    return;
  }
  const int64_t chunks = std::min(4 * threads, rows);  // several per thread: threads run at uneven speeds
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, chunks, rows, body] {
    for (int64_t c; (c = counters->next.fetch_add(1)) < chunks;) {
      body(rows * c / chunks, rows * (c + 1) / chunks);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));  // each task its own copy
  work();
  while (counters->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// A store for rows of ordinary scale, 1e-30 <= |absmax| < inf (every value a normal float or zero: the
// smallest nonzero |table| entry, FP4's, is 0.0052), and one for the others (NaN, infinite, tiny absmax).
template <typename Out, typename Absmax, typename OrdinaryStore, typename AnyStore>
void DecodeRows(ffi::ThreadPool& pool, const uint8_t* packed, const Absmax& absmax, const float* table_values,
                int64_t rows, int64_t half, Out* out, OrdinaryStore ordinary_store, AnyStore any_store) {
  ParallelRows(pool, rows, 2 * rows * half, [=](int64_t begin, int64_t end) {
    const Table table = LoadTable(table_values);
    absmax.ForEachRow(begin, end, [&](int64_t r, float scale) {
      if (std::fabs(scale) >= 1e-30f && std::isfinite(scale)) {
        DecodeRow(packed + r * half, Broadcast(scale), table, half, out + r * 2 * half, ordinary_store);
      } else {
        DecodeRow(packed + r * half, Broadcast(scale), table, half, out + r * 2 * half, any_store);
      }
    });
  });
}

template <typename Absmax>
ffi::Error DecodeAll(const char* name, ffi::ThreadPool& pool, ffi::Buffer<ffi::U8> packed, int64_t rows, Absmax absmax,
                     ffi::Span<const float> table, ffi::Result<ffi::AnyBuffer> out) {
  const int64_t bytes = static_cast<int64_t>(packed.element_count());
  const int64_t half = rows == 0 ? 0 : bytes / rows;
  if (table.size() != 16 || half * rows != bytes || half % 16 != 0 ||
      static_cast<int64_t>(out->element_count()) != 2 * bytes) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string(name) + ": expects rows * half packed bytes (half a multiple of 16), rows absmax, "
                      "a 16-entry table and an output of 2 * rows * half values");
  }
  if (rows == 0) return ffi::Error::Success();  // nothing to decode (and no row count to divide by)
  const uint8_t* codes = packed.typed_data();
  switch (out->element_type()) {
    case ffi::DataType::F32:
      DecodeRows(pool, codes, absmax, table.begin(), rows, half, static_cast<float*>(out->untyped_data()), StoreFloat32,
                 StoreFloat32);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      DecodeRows(pool, codes, absmax, table.begin(), rows, half, static_cast<uint16_t*>(out->untyped_data()),
                 StoreBfloat16Ordinary, StoreBfloat16<true>);
      return ffi::Error::Success();
    case ffi::DataType::F16:
      DecodeRows(pool, codes, absmax, table.begin(), rows, half, static_cast<uint16_t*>(out->untyped_data()), StoreFloat16,
                 StoreFloat16);
      return ffi::Error::Success();
    default:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(name) + ": output must be f32, bf16 or f16");
  }
}

ffi::Error Decode4bit(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> absmax,
                      ffi::Span<const float> table, ffi::Result<ffi::AnyBuffer> out) {
  return DecodeAll("qlora_decode_4bit", pool, packed, static_cast<int64_t>(absmax.element_count()),
                   PlainAbsmax{absmax.typed_data()}, table, out);
}

ffi::Error Decode4bitDoubleQuant(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::U8> absmax_codes,
                                 ffi::Buffer<ffi::F32> nested_absmax, ffi::Buffer<ffi::F32> offset,
                                 ffi::Span<const float> table, ffi::Span<const float> dynamic_map,
                                 ffi::Result<ffi::AnyBuffer> out) {
  const int64_t rows = static_cast<int64_t>(absmax_codes.element_count());
  const int64_t batches = static_cast<int64_t>(offset.element_count());
  const int64_t rows_per = batches == 0 ? 0 : rows / batches;
  const int64_t groups_per = batches == 0 ? 0 : static_cast<int64_t>(nested_absmax.element_count()) / batches;
  if (dynamic_map.size() != 256 || rows_per * batches != rows ||
      groups_per != (rows_per + DoubleQuantAbsmax::kNestedBlocksize - 1) / DoubleQuantAbsmax::kNestedBlocksize) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "qlora_decode_4bit_dq: expects u8[rows] absmax codes, f32[ceil(rows / 256)] nested absmax, "
                      "an f32 offset (per leading batch index) and a 256-entry dynamic map");
  }
  const DoubleQuantAbsmax absmax{absmax_codes.typed_data(), nested_absmax.typed_data(), offset.typed_data(),
                                 dynamic_map.begin(), rows_per, groups_per};
  return DecodeAll("qlora_decode_4bit_dq", pool, packed, rows, absmax, table, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(qlora_decode_4bit, Decode4bit,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const float>>("table")
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(qlora_decode_4bit_dq, Decode4bitDoubleQuant,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const float>>("table")
                                  .Attr<ffi::Span<const float>>("dynamic_map")
                                  .Ret<ffi::AnyBuffer>());
