// CSR sparse linear layer y = x @ W.T + b for CPU, parallelised with at::parallel_for
// (torch's own thread pool, no second OpenMP runtime). Values fp32/fp16/bf16, fp32
// accumulation, row pointers int32 or int64, column indices one of:
//   uint8  -- delta-coded: each entry is its column minus the previous entry's column in the
//             row (the first minus 0); gaps over 255 are bridged by explicit zero entries;
//   uint16 -- absolute, stored as int16 bits;
//   int32  -- absolute.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;             // floats per token vector (one AVX-512 register)
constexpr int64_t kL1Floats = 12288;   // 48 KiB: slice of packed x kept in L1 by the tiled path
constexpr int64_t kPrefetch = 512;     // nonzeros prefetched ahead when streaming weights
constexpr int64_t kPadding = 64;       // zero floats after x for the decode path's windows
constexpr int64_t kMinWorkPerThread = 16384;  // nonzero x token products worth a thread
constexpr int64_t kMaxChunkTokens = 256;     // tokens packed per pass (bounds the scratch buffer)

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline vfloat splat(float s) {  // a broadcast; vfloat{} + s would really add 0.0f
  return vfloat{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}

inline float to_float(float v) { return v; }

inline float to_float(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float to_float(at::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

inline int64_t to_index(int16_t c) { return static_cast<uint16_t>(c); }
inline int64_t to_index(int32_t c) { return c; }

// Column of an entry from the previous entry's column: absolute formats ignore `previous`.
inline int64_t next_col(int64_t, int16_t c) { return to_index(c); }
inline int64_t next_col(int64_t, int32_t c) { return c; }
inline int64_t next_col(int64_t previous, uint8_t delta) { return previous + delta; }

// ------------------------------------------------------------ vector gathers (one token)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int kGather = 16;
typedef __m512 gvec;
typedef __mmask16 gmask;
inline gmask tail_mask(int64_t n) { return static_cast<gmask>((1u << n) - 1u); }
inline gvec gzero() { return _mm512_setzero_ps(); }
inline gvec gadd(gvec a, gvec b) { return _mm512_add_ps(a, b); }
inline gvec gfma(gvec a, gvec b, gvec c) { return _mm512_fmadd_ps(a, b, c); }
inline float gsum(gvec v) { return _mm512_reduce_add_ps(v); }
inline __m512i bits16(const void* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512i bits16(const void* p, gmask m) { return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)); }
inline gvec bf16_bits(__m512i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }
inline gvec gload(const float* p) { return _mm512_loadu_ps(p); }
inline gvec gload(const float* p, gmask m) { return _mm512_maskz_loadu_ps(m, p); }
inline gvec gload(const at::BFloat16* p) { return bf16_bits(bits16(p)); }
inline gvec gload(const at::BFloat16* p, gmask m) { return bf16_bits(bits16(p, m)); }
inline gvec gload(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline gvec gload(const at::Half* p, gmask m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512i gindex(const int16_t* p) { return bits16(p); }
inline __m512i gindex(const int16_t* p, gmask m) { return bits16(p, m); }
inline __m512i gindex(const int32_t* p) { return _mm512_loadu_si512(p); }
inline __m512i gindex(const int32_t* p, gmask m) { return _mm512_maskz_loadu_epi32(m, p); }
inline gvec gather(const float* x, __m512i i) { return _mm512_i32gather_ps(i, x, 4); }
inline gvec gather(const float* x, __m512i i, gmask m) {
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i, x, 4);
}
#define SPARSE_HAVE_GATHER 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int kGather = 8;
typedef __m256 gvec;
inline gvec gzero() { return _mm256_setzero_ps(); }
inline gvec gadd(gvec a, gvec b) { return _mm256_add_ps(a, b); }
inline gvec gfma(gvec a, gvec b, gvec c) { return _mm256_fmadd_ps(a, b, c); }
inline float gsum(gvec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256i bits16(const void* p) { return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline gvec gload(const float* p) { return _mm256_loadu_ps(p); }
inline gvec gload(const at::BFloat16* p) { return _mm256_castsi256_ps(_mm256_slli_epi32(bits16(p), 16)); }
inline gvec gload(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline __m256i gindex(const int16_t* p) { return bits16(p); }
inline __m256i gindex(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline gvec gather(const float* x, __m256i i) { return _mm256_i32gather_ps(x, i, 4); }
#define SPARSE_HAVE_GATHER 1
#endif

// Dot product of one CSR row (n nonzeros) with the dense fp32 vector x.
template <typename V, typename I>
inline float row_dot(const V* v, const I* c, int64_t n, const float* x) {
  int64_t k = 0;
  float sum = 0.f;
#if defined(SPARSE_HAVE_GATHER)
  gvec a0 = gzero(), a1 = gzero(), a2 = gzero(), a3 = gzero();
  for (; k + 4 * kGather <= n; k += 4 * kGather) {
    a0 = gfma(gload(v + k), gather(x, gindex(c + k)), a0);
    a1 = gfma(gload(v + k + kGather), gather(x, gindex(c + k + kGather)), a1);
    a2 = gfma(gload(v + k + 2 * kGather), gather(x, gindex(c + k + 2 * kGather)), a2);
    a3 = gfma(gload(v + k + 3 * kGather), gather(x, gindex(c + k + 3 * kGather)), a3);
  }
  for (; k + kGather <= n; k += kGather) a0 = gfma(gload(v + k), gather(x, gindex(c + k)), a0);
#if defined(__AVX512F__)
  if (k < n) {
    const gmask m = tail_mask(n - k);
    a1 = gfma(gload(v + k, m), gather(x, gindex(c + k, m), m), a1);
    k = n;
  }
#endif
  sum = gsum(gadd(gadd(a0, a1), gadd(a2, a3)));
#endif
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  for (; k + 4 <= n; k += 4) {
    s0 += to_float(v[k]) * x[to_index(c[k])];
    s1 += to_float(v[k + 1]) * x[to_index(c[k + 1])];
    s2 += to_float(v[k + 2]) * x[to_index(c[k + 2])];
    s3 += to_float(v[k + 3]) * x[to_index(c[k + 3])];
  }
  for (; k < n; ++k) s0 += to_float(v[k]) * x[to_index(c[k])];
  return sum + ((s0 + s1) + (s2 + s3));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// row_dot for rows dense enough that 16 consecutive nonzeros usually span fewer than W
// (32 or 64) columns: x[base, base + W) is loaded contiguously and permuted into place,
// which is cheaper than a gather. Needs x readable up to x[in + 63] (zero padding).
template <int W, typename V>
inline float row_dot_window(const V* v, const int16_t* c, int64_t n, const float* x) {
  gvec a0 = gzero(), a1 = gzero();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512i idx = gindex(c + k);
    const int64_t base = to_index(c[k]);
    gvec xv;
    if (to_index(c[k + 15]) - base < W) {
      const __m512i rel = _mm512_sub_epi32(idx, _mm512_set1_epi32(static_cast<int>(base)));
      const float* xb = x + base;
      xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xb), rel, _mm512_loadu_ps(xb + 16));
      if (W == 64) {
        const gvec hi = _mm512_permutex2var_ps(_mm512_loadu_ps(xb + 32), rel, _mm512_loadu_ps(xb + 48));
        xv = _mm512_mask_blend_ps(_mm512_test_epi32_mask(rel, _mm512_set1_epi32(32)), xv, hi);
      }
    } else {
      xv = gather(x, idx);
    }
    a0 = gfma(gload(v + k), xv, a0);
    std::swap(a0, a1);
  }
  if (k < n) {
    const gmask m = tail_mask(n - k);
    a0 = gfma(gload(v + k, m), gather(x, gindex(c + k, m), m), a0);
  }
  return gsum(gadd(a0, a1));
}

// Picks the window width from the row's density (nonzeros per column).
template <typename V>
inline float row_dot_any(const V* v, const int16_t* c, int64_t n, const float* x, int64_t in) {
  if (n * 5 >= in * 3) return row_dot_window<32>(v, c, n, x);
  if (n * 10 >= in * 3) return row_dot_window<64>(v, c, n, x);
  return row_dot(v, c, n, x);
}
#endif

template <typename V, typename I>
inline float row_dot_any(const V* v, const I* c, int64_t n, const float* x, int64_t) {
  return row_dot(v, c, n, x);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// Inclusive prefix sum over the 16 int32 lanes.
inline __m512i prefix_sum16(__m512i d) {
  const __m512i z = _mm512_setzero_si512();
  d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, z, 15));
  d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, z, 14));
  d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, z, 12));
  return _mm512_add_epi32(d, _mm512_alignr_epi32(d, z, 8));
}

// Column offsets of 16 delta-coded entries: lane i = c[0] + ... + c[i].
#if defined(__AVX512VNNI__)
// Four dot products (vpdpbusd) of the broadcast 4-byte groups with 0/1 masks: no shuffles.
struct TriangleMasks {
  __m512i group[4];
  TriangleMasks() {
    for (int g = 0; g < 4; ++g) {
      alignas(64) int8_t bytes[64];
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 4; ++j) bytes[4 * i + j] = 4 * g + j <= i ? 1 : 0;
      group[g] = _mm512_load_si512(bytes);
    }
  }
};

inline __m512i delta_offsets(const uint8_t* c, const TriangleMasks& t, int64_t start) {
  __m512i sum = _mm512_set1_epi32(static_cast<int>(start));
  for (int g = 0; g < 4; ++g) {
    int32_t word;
    std::memcpy(&word, c + 4 * g, 4);
    sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi32(word), t.group[g]);
  }
  return sum;
}
#else
struct TriangleMasks {};

inline __m512i delta_offsets(const uint8_t* c, const TriangleMasks&, int64_t start) {
  const __m512i sums = prefix_sum16(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
  return _mm512_add_epi32(sums, _mm512_set1_epi32(static_cast<int>(start)));
}
#endif

// Sum of the 16 bytes at p, in scalar registers (keeps the vector shuffle port free).
inline int64_t byte_sum16(const uint8_t* p) {
  constexpr uint64_t kLow = 0x00FF00FF00FF00FFull;
  uint64_t a, b;
  std::memcpy(&a, p, 8);
  std::memcpy(&b, p + 8, 8);
  const uint64_t pairs = (a & kLow) + ((a >> 8) & kLow) + (b & kLow) + ((b >> 8) & kLow);  // 4 sums <= 1020
  return static_cast<int64_t>((pairs * 0x0001000100010001ull) >> 48);
}

// x[xb + rel[i]] for the 16 lanes, given span = rel[15] (the largest): a permute of the
// window xb[0, W) when it holds them all (W = 32 or 64), else a gather (always for W = 0).
template <int W>
inline gvec window_or_gather(const float* xb, __m512i rel, int64_t span) {
  if (W == 0 || span >= W) return _mm512_i32gather_ps(rel, xb, 4);
  const gvec lo = _mm512_permutex2var_ps(_mm512_loadu_ps(xb), rel, _mm512_loadu_ps(xb + 16));
  if (W == 32) return lo;
  const gvec hi = _mm512_permutex2var_ps(_mm512_loadu_ps(xb + 32), rel, _mm512_loadu_ps(xb + 48));
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(rel, _mm512_set1_epi32(32)), lo, hi);
}

// row_dot for delta-coded columns: 16 deltas are widened and prefix-summed into offsets
// from the running column `base`; x[base, base + W) is permuted into place when the 16
// entries fit in the window, gathered otherwise. Needs x readable up to x[in + 63].
template <int W, typename V>
inline float row_dot_delta(const V* v, const uint8_t* c, int64_t n, const float* x) {
  static const TriangleMasks masks;
  gvec a0 = gzero(), a1 = gzero();
  int64_t k = 0, base = 0;
  for (; k + 16 <= n; k += 16) {
    // The 64-wide window starts at a 64-byte boundary (x is aligned): whole cache lines, no split loads.
    const int64_t span = byte_sum16(c + k);  // in scalar registers: the branch need not wait for the vector sums
    const int64_t skew = W == 64 ? base & 15 : 0;
    a0 = gfma(gload(v + k), window_or_gather<W>(x + base - skew, delta_offsets(c + k, masks, skew), skew + span), a0);
    std::swap(a0, a1);
    base += span;
  }
  if (k < n) {  // masked-off deltas load as 0, so their lanes repeat the last offset; their values are 0
    const gmask m = tail_mask(n - k);
    const __m512i rel = prefix_sum16(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, c + k)));
    a0 = gfma(gload(v + k, m), window_or_gather<W>(x + base, rel, W == 0 ? 0 : _mm512_reduce_max_epi32(rel)), a0);
  }
  return gsum(gadd(a0, a1));
}

template <typename V>
inline float row_dot_any(const V* v, const uint8_t* c, int64_t n, const float* x, int64_t in) {
  if (n * 5 >= in * 3) return row_dot_delta<32>(v, c, n, x);
  if (n * 10 >= in * 3) return row_dot_delta<64>(v, c, n, x);
  return row_dot_delta<0>(v, c, n, x);
}
#else
template <typename V>
inline float row_dot_any(const V* v, const uint8_t* c, int64_t n, const float* x, int64_t) {
  float s0 = 0.f, s1 = 0.f;
  int64_t k = 0, col = 0;
  for (; k + 2 <= n; k += 2) {
    col += c[k];
    s0 += to_float(v[k]) * x[col];
    col += c[k + 1];
    s1 += to_float(v[k + 1]) * x[col];
  }
  if (k < n) s0 += to_float(v[k]) * x[col + c[k]];
  return s0 + s1;
}
#endif

// Software-prefetch the cache lines of p[done, until) and advance done.
template <typename T>
inline void prefetch_until(const T* p, int64_t& done, int64_t until) {
  for (; done < until; done += 64 / sizeof(T)) __builtin_prefetch(p + done);
}

// One token: y[r] = row r . x (+ bias) for rows [r0, r1). The weights are read once, so
// the nonzeros are prefetched kPrefetch elements ahead, across row boundaries.
template <typename V, typename I, typename P>
void decode_rows(int64_t r0, int64_t r1, const V* v, const I* c, const P* rp, const float* x, int64_t in,
                 const float* bias, float* y) {
  int64_t v_done = rp[r0], c_done = rp[r0];
  const int64_t last = rp[r1];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t ahead = std::min<int64_t>(last, rp[r + 1] + kPrefetch);
    prefetch_until(v, v_done, ahead);
    prefetch_until(c, c_done, ahead);
    y[r] = row_dot_any(v + rp[r], c + rp[r], rp[r + 1] - rp[r], x, in) + (bias ? bias[r] : 0.f);
  }
}

// dst[j * ds + i] = src[i * ss + j] (+ add[i]) for i < nr, j < nc: a transposed 16 x 16
// block. Each dst row gets `width` floats, zero beyond nr.
inline void transpose_block(const float* src, int64_t ss, int64_t nr, int64_t nc, float* dst, int64_t ds,
                            int64_t width, const float* add) {
#if defined(__AVX512F__)
  const __mmask16 cols = static_cast<__mmask16>((1u << nc) - 1u), keep = static_cast<__mmask16>((1u << width) - 1u);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    r[i] = i < nr ? _mm512_maskz_loadu_ps(cols, src + i * ss) : _mm512_setzero_ps();
    if (add && i < nr) r[i] = _mm512_add_ps(r[i], _mm512_set1_ps(add[i]));
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[4 * i + h]), b = _mm512_castps_pd(t[4 * i + h + 2]);
      r[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    t[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[8 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    t[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    if (j < nc) _mm512_mask_storeu_ps(dst + j * ds, keep, t[j]);
  }
#else
  for (int64_t j = 0; j < nc; ++j) {
    for (int64_t i = 0; i < width; ++i) dst[j * ds + i] = i < nr ? src[i * ss + j] + (add ? add[i] : 0.f) : 0.f;
  }
#endif
}

// x [tokens, in] -> xt [tiles, in, tt], tokens innermost, zero-padded to whole tiles.
void pack_tokens(const float* x, int64_t tokens, int64_t in, int64_t tt, float* xt) {
  const int64_t token_blocks = (tokens + tt - 1) / tt * (tt / kLanes);
  const int64_t col_blocks = (in + kLanes - 1) / kLanes;
  at::parallel_for(0, token_blocks * col_blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t0 = job / col_blocks * kLanes, c0 = job % col_blocks * kLanes;
      const int64_t nt = std::max<int64_t>(0, std::min<int64_t>(kLanes, tokens - t0));
      transpose_block(x + t0 * in + c0, in, nt, std::min<int64_t>(kLanes, in - c0),
                      xt + (t0 / tt * in + c0) * tt + t0 % tt, tt, kLanes, nullptr);
    }
  });
}

// Per-thread scratch buffer `slot` of at least n floats (64-byte aligned), reused across
// calls so that big temporaries do not page-fault fresh memory every time.
float* scratch(int slot, int64_t n) {
  static thread_local torch::Tensor buffers[2];
  torch::Tensor& buffer = buffers[slot];
  if (!buffer.defined() || buffer.numel() < n) buffer = at::empty({n}, at::kFloat);
  return buffer.data_ptr<float>();
}

// Several tokens: y[t][r] = row r . x[t] (+ bias) for rows [r0, r1) and the chunk's tokens.
// xt is [tiles, in, TT] (tokens innermost): each nonzero is loaded once per tile and
// multiplied into NV vectors of tokens. Columns are swept in blocks whose slice of xt stays
// in L1, keeping per-row partial sums in `partial` and a cursor per row (columns ascend
// within a row; any order gives the same result, only slower). Finished rows are staged
// 16 at a time and written to y transposed.
template <int NV, typename V, typename I, typename P>
void tiled_rows(int64_t r0, int64_t r1, const V* v, const I* c, const P* rp, const float* xt, int64_t in,
                int64_t tokens, int64_t out, const float* bias, float* y) {
  constexpr int TT = NV * kLanes;
  constexpr int U = NV >= 4 ? 2 : 8 / NV;  // independent accumulator sets
  const int64_t rows = r1 - r0, tiles = (tokens + TT - 1) / TT;
  const int64_t blocks = (in * TT + kL1Floats - 1) / kL1Floats, block_cols = (in + blocks - 1) / blocks;
  vfloat* partial = reinterpret_cast<vfloat*>(scratch(1, rows * TT));
  std::vector<int64_t> cursor(rows), column(rows);
  vfloat stage[kLanes][NV];
  for (int64_t b = 0; b < tiles; ++b) {
    const float* xb = xt + b * in * TT;
    for (int64_t i = 0; i < rows; ++i) cursor[i] = rp[r0 + i], column[i] = 0;
    for (int64_t cend = block_cols; cend - block_cols < in; cend += block_cols) {
      const bool first = cend == block_cols, last = cend >= in;
      for (int64_t i = 0; i < rows; ++i) {
        vfloat acc[U][NV] = {};
        int64_t k = cursor[i], col = column[i];
        const int64_t k1 = rp[r0 + i + 1];
        for (; k + U <= k1; k += U) {
          int64_t cols[U];
          int64_t next = col;
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) cols[u] = next = next_col(next, c[k + u]);
          if (next >= cend) break;
          col = next;
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) {
            const vfloat w = splat(to_float(v[k + u]));
            const float* xp = xb + cols[u] * TT;
#pragma GCC unroll 8
            for (int j = 0; j < NV; ++j) acc[u][j] += w * vload(xp + j * kLanes);
          }
        }
        for (; k < k1; ++k) {
          const int64_t next = next_col(col, c[k]);
          if (next >= cend) break;
          col = next;
          const vfloat w = splat(to_float(v[k]));
          const float* xp = xb + col * TT;
#pragma GCC unroll 8
          for (int j = 0; j < NV; ++j) acc[0][j] += w * vload(xp + j * kLanes);
        }
        cursor[i] = k, column[i] = col;
        vfloat* dst = last ? stage[i % kLanes] : partial + i * NV;
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) {
          vfloat sum = first ? vfloat{} : partial[i * NV + j];
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) sum += acc[u][j];
          dst[j] = sum;
        }
        if (last && (i % kLanes == kLanes - 1 || i == rows - 1)) {
          const int64_t g0 = r0 + i / kLanes * kLanes, nr = i % kLanes + 1;
          for (int64_t t0 = b * TT; t0 < std::min(tokens, (b + 1) * TT); t0 += kLanes) {
            transpose_block(reinterpret_cast<const float*>(stage) + t0 % TT, TT, nr,
                            std::min<int64_t>(kLanes, tokens - t0), y + t0 * out + g0, out, nr,
                            bias ? bias + g0 : nullptr);
          }
        }
      }
    }
  }
}

// Split rows [0, rows) into `parts` consecutive ranges holding about equal nonzeros.
template <typename P>
std::vector<int64_t> balanced_bounds(const P* rp, int64_t rows, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, rows);
  bounds[0] = 0;
  const int64_t first = rp[0], nnz = rp[rows] - rp[0];
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = first + nnz * p / parts;
    bounds[p] = std::max<int64_t>(bounds[p - 1], std::lower_bound(rp, rp + rows + 1, target) - rp);
  }
  return bounds;
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<V>, Tag<I>, Tag<P>) for the value, column-index and row-pointer dtypes.
template <typename F>
void dispatch(const torch::Tensor& values, const torch::Tensor& cols, const torch::Tensor& rp, F&& f) {
  auto with_index = [&](auto vt) {
    auto with_ptr = [&](auto it) {
      if (rp.scalar_type() == at::kInt) f(vt, it, Tag<int32_t>{});
      else f(vt, it, Tag<int64_t>{});
    };
    if (cols.scalar_type() == at::kByte) with_ptr(Tag<uint8_t>{});
    else if (cols.scalar_type() == at::kShort) with_ptr(Tag<int16_t>{});
    else with_ptr(Tag<int32_t>{});
  };
  switch (values.scalar_type()) {
    case at::kFloat: return with_index(Tag<float>{});
    case at::kHalf: return with_index(Tag<at::Half>{});
    case at::kBFloat16: return with_index(Tag<at::BFloat16>{});
    default: TORCH_CHECK(false, "sparse_linear: values must be float32, float16 or bfloat16");
  }
}

template <typename V, typename I, typename P>
void run(const V* v, const I* c, const P* rp, int64_t nnz, const float* x, int64_t tokens, int64_t in,
         int64_t out, const float* bias, float* y, int64_t nv) {
  const int64_t work = std::max<int64_t>(nnz, out) * std::min<int64_t>(tokens, kMaxChunkTokens);
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), work / kMinWorkPerThread, out}));
  const std::vector<int64_t> bounds = balanced_bounds(rp, out, parts);
  if (tokens == 1) {
    float* padded = scratch(0, in + kPadding);
    std::memcpy(padded, x, in * sizeof(float));
    std::fill(padded + in, padded + in + kPadding, 0.f);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) decode_rows(bounds[p], bounds[p + 1], v, c, rp, padded, in, bias, y);
    });
    return;
  }
  const int64_t tt = nv * kLanes, chunk = std::min<int64_t>(tokens, kMaxChunkTokens);
  float* xt = scratch(0, (chunk + tt - 1) / tt * tt * in);
  for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    const int64_t n = std::min(chunk, tokens - t0);
    pack_tokens(x + t0 * in, n, in, tt, xt);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t r0 = bounds[p], r1 = bounds[p + 1];
        float* yc = y + t0 * out;
        if (nv == 1) tiled_rows<1>(r0, r1, v, c, rp, xt, in, n, out, bias, yc);
        else if (nv == 2) tiled_rows<2>(r0, r1, v, c, rp, xt, in, n, out, bias, yc);
        else tiled_rows<4>(r0, r1, v, c, rp, xt, in, n, out, bias, yc);
      }
    });
  }
}

}  // namespace

torch::Tensor sparse_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& cols,
                            const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias,
                            int64_t out_features, int64_t in_features) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && cols.device().is_cpu() && row_ptr.device().is_cpu(),
              "sparse_linear: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "sparse_linear: x must be [..., ", in_features, "]");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && cols.dim() == 1 && cols.is_contiguous() &&
                  values.numel() == cols.numel(),
              "sparse_linear: values and col_indices must be contiguous 1-D tensors of equal length");
  TORCH_CHECK(cols.scalar_type() == at::kByte || cols.scalar_type() == at::kShort || cols.scalar_type() == at::kInt,
              "sparse_linear: col_indices must be uint8 (deltas), int16 (uint16 bits) or int32");
  TORCH_CHECK(cols.scalar_type() != at::kShort || in_features <= 65536,
              "sparse_linear: int16 col_indices need in_features <= 65536");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.is_contiguous() && row_ptr.numel() == out_features + 1 &&
                  (row_ptr.scalar_type() == at::kInt || row_ptr.scalar_type() == at::kLong),
              "sparse_linear: row_ptr must be a contiguous int32/int64 tensor of out_features + 1 entries");
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "sparse_linear: bias must have out_features entries");
    b = bias->to(at::kFloat).contiguous();
  }
  const torch::Tensor x2 = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  const int64_t tokens = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  torch::Tensor y = at::empty({tokens, out_features}, x2.options());
  if (tokens > 0 && out_features > 0) {
    const int64_t nv = tokens <= 16 ? 1 : tokens <= 32 ? 2 : 4;  // token vectors per tile
    dispatch(values, cols, row_ptr, [&](auto vt, auto it, auto pt) {
      using V = typename decltype(vt)::type;
      using I = typename decltype(it)::type;
      using P = typename decltype(pt)::type;
      const P* rp = row_ptr.data_ptr<P>();
      TORCH_CHECK(rp[0] >= 0 && rp[out_features] <= values.numel(), "sparse_linear: row_ptr exceeds the values");
      run(values.data_ptr<V>(), reinterpret_cast<const I*>(cols.data_ptr()), rp, values.numel(),
          x2.data_ptr<float>(), tokens, in_features, out_features, b.defined() ? b.data_ptr<float>() : nullptr,
          y.data_ptr<float>(), nv);
    });
  }
  return y.to(x.scalar_type()).view(out_shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear, "CSR sparse linear layer (CPU)", py::call_guard<py::gil_scoped_release>());
}
