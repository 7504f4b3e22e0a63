// CSR sparse linear layer y = x @ W.T + b for CPU, parallelised with at::parallel_for
// (torch's own thread pool, no second OpenMP runtime). Values fp32/fp16/bf16, fp32
// accumulation, row pointers int32 or int64, column indices one of:
//   uint8  -- a bitmap: per row ceil(in / 64) little-endian 64-bit words, bit b of word j set
//             when column 64 j + b holds the row's next value;
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
constexpr int64_t kPrefetchRows = 8;   // bitmap rows prefetched ahead (per stream)
constexpr int kStreams = 2;            // interleaved row ranges per thread when decoding
constexpr int64_t kPadding = 64;       // zero floats after x: bitmap rows read x in whole words
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

// Column formats. position(row, first) is where a row's index data starts in the format's
// own array (`first` = the row's first entry), used to prefetch it.
template <typename I>
struct Absolute {  // entry k's column is c[k]
  const I* c;
  const I* data() const { return c; }
  int64_t position(int64_t, int64_t first) const { return first; }
};

inline int64_t bitmap_words(int64_t in) { return (in + 63) / 64; }  // 64-bit words per bitmap row

struct Bitmap {  // nw words per row; a row's values follow its set bits in column order
  const uint64_t* words;
  int64_t nw;
  const uint64_t* data() const { return words; }
  int64_t position(int64_t row, int64_t) const { return row * nw; }
  const uint64_t* row(int64_t r) const { return words + r * nw; }
};

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

// Dot product of one CSR row (n nonzeros, absolute column indices) with the dense fp32 vector x.
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

// Dot product of one bitmap row (words[j] bit b set: column 64 j + b holds the next value)
// with x, which must be readable (zero-padded) up to x[64 * nw - 1]. With AVX-512 each 16
// columns cost one load of values, one expand of their popcount first values into the set
// lanes and one FMA against 16 contiguous x: no per-nonzero index work, no gather. Whole
// 16-value loads (Whole) read past the row's values, so the last rows use masked loads.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
template <bool Whole, typename V>
inline float bitmap_dot(const V* v, const uint64_t* words, const int64_t nw, const float* x) {
  gvec acc[4] = {gzero(), gzero(), gzero(), gzero()};
  for (int64_t j = 0; j < nw; ++j, x += 64) {
    const uint64_t m = words[j];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const gmask lanes = static_cast<gmask>(m >> (16 * q));
      const int n = __builtin_popcount(lanes);
      const gvec values = Whole ? gload(v) : gload(v, tail_mask(n));
      acc[q] = gfma(_mm512_maskz_expand_ps(lanes, values), gload(x + 16 * q), acc[q]);
      v += n;
    }
  }
  return gsum(gadd(gadd(acc[0], acc[1]), gadd(acc[2], acc[3])));
}
#endif

template <typename V>
inline float row_dot(const V* v, const Bitmap& b, int64_t row, int64_t first, int64_t, const float* x, const V* v_end) {
  const uint64_t* words = b.row(row);
  v += first;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if (v + 64 * b.nw <= v_end) return bitmap_dot<true>(v, words, b.nw, x);  // a row holds <= 64 nw values
  return bitmap_dot<false>(v, words, b.nw, x);
#else
  float s0 = 0.f, s1 = 0.f;
  for (int64_t j = 0; j < b.nw; ++j, x += 64) {
    for (uint64_t m = words[j]; m; m &= m - 1) {
      s0 += to_float(*v++) * x[__builtin_ctzll(m)];
      std::swap(s0, s1);
    }
  }
  return s0 + s1;
#endif
}

// Software-prefetch the cache lines of p[done, until) and advance done.
template <typename T>
inline void prefetch_until(const T* p, int64_t& done, int64_t until) {
  for (; done < until; done += 64 / sizeof(T)) __builtin_prefetch(p + done);
}

template <typename V, typename I>
inline float row_dot(const V* v, const Absolute<I>& a, int64_t, int64_t first, int64_t n, const float* x, const V*) {
  return row_dot(v + first, a.c + first, n, x);
}

// One token: y[r] = row r . x (+ bias) for rows [r0, r1). The range is read as kStreams
// interleaved parts (row i of each part in turn): independent streams of weights keep more
// memory requests in flight, and the core gets independent rows to overlap. The weights are
// read once, so each part prefetches its values kPrefetch entries ahead and its index data
// kPrefetchRows rows (bitmaps) or kPrefetch entries (absolute indices) ahead.
template <typename V, typename C, typename P>
void decode_rows(int64_t r0, int64_t r1, const V* v, const V* v_end, const C& cols, const P* rp, const float* x,
                 const float* bias, float* y) {
  int64_t lo[kStreams], hi[kStreams], v_done[kStreams], c_done[kStreams], longest = 0;
  for (int k = 0; k < kStreams; ++k) {
    lo[k] = r0 + (r1 - r0) * k / kStreams;
    hi[k] = r0 + (r1 - r0) * (k + 1) / kStreams;
    v_done[k] = rp[lo[k]];
    c_done[k] = cols.position(lo[k], rp[lo[k]]);
    longest = std::max(longest, hi[k] - lo[k]);
  }
  for (int64_t i = 0; i < longest; ++i) {
#pragma GCC unroll 2
    for (int k = 0; k < kStreams; ++k) {
      const int64_t r = lo[k] + i;
      if (r >= hi[k]) continue;
      const int64_t ahead = std::min<int64_t>(rp[hi[k]], rp[r + 1] + kPrefetch);
      prefetch_until(v, v_done[k], ahead);
      prefetch_until(cols.data(), c_done[k], cols.position(std::min(hi[k], r + kPrefetchRows), ahead));
      y[r] = row_dot(v, cols, r, rp[r], rp[r + 1] - rp[r], x, v_end) + (bias ? bias[r] : 0.f);
    }
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

// acc[u] += v[e] * xb[column(e)] (a vector of TT tokens per column) for entries e < n,
// spread over U independent accumulator sets.
template <int NV, int U, typename V, typename Column>
inline void accumulate(vfloat (&acc)[U][NV], const V* v, int64_t n, const Column& column, const float* xb) {
  constexpr int TT = NV * kLanes;
  int64_t k = 0;
  for (; k + U <= n; k += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const vfloat w = splat(to_float(v[k + u]));
      const float* xp = xb + column(k + u) * TT;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[u][j] += w * vload(xp + j * kLanes);
    }
  }
  for (; k < n; ++k) {
    const vfloat w = splat(to_float(v[k]));
    const float* xp = xb + column(k) * TT;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[0][j] += w * vload(xp + j * kLanes);
  }
}

// The entries of row r in columns [c0, c1), which start at entry k (before k1, the row's
// end), accumulated into acc; returns how many there were. `columns` is scratch for c1 - c0
// + 16 column numbers (c0 and c1 are multiples of 64, or c1 >= in).
template <int NV, int U, typename V, typename I>
inline int64_t accumulate_block(vfloat (&acc)[U][NV], const V* v, const Absolute<I>& a, int64_t, int64_t k,
                                int64_t k1, int64_t, int64_t c1, int32_t*, const float* xb) {
  const I* c = a.c + k;
  const int64_t n = std::partition_point(c, a.c + k1, [c1](I col) { return to_index(col) < c1; }) - c;
  accumulate<NV, U>(acc, v + k, n, [c](int64_t e) { return to_index(c[e]); }, xb);
  return n;
}

template <int NV, int U, typename V>
inline int64_t accumulate_block(vfloat (&acc)[U][NV], const V* v, const Bitmap& b, int64_t r, int64_t k,
                                int64_t, int64_t c0, int64_t c1, int32_t* columns, const float* xb) {
  const uint64_t* words = b.row(r);
  int64_t n = 0;
  for (int64_t j = c0 / 64; j < std::min(b.nw, bitmap_words(c1)); ++j) {
#if defined(__AVX512F__)
    const __m512i first = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(64 * j)),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __mmask16 lanes = static_cast<__mmask16>(words[j] >> (16 * q));
      const __m512i cols = _mm512_add_epi32(first, _mm512_set1_epi32(16 * q));
      _mm512_storeu_si512(columns + n, _mm512_maskz_compress_epi32(lanes, cols));
      n += __builtin_popcount(lanes);
    }
#else
    for (uint64_t m = words[j]; m; m &= m - 1) columns[n++] = static_cast<int32_t>(64 * j + __builtin_ctzll(m));
#endif
  }
  accumulate<NV, U>(acc, v + k, n, [columns](int64_t e) { return columns[e]; }, xb);
  return n;
}

// Several tokens: y[t][r] = row r . x[t] (+ bias) for rows [r0, r1) and the chunk's tokens.
// xt is [tiles, in, TT] (tokens innermost): each nonzero is loaded once per tile and
// multiplied into NV vectors of tokens. Columns are swept in blocks (multiples of 64) whose
// slice of xt stays in L1, keeping per-row partial sums in `partial` and each row's next
// entry in `cursor`. Finished rows are staged 16 at a time and written to y transposed.
template <int NV, typename V, typename C, typename P>
void tiled_rows(int64_t r0, int64_t r1, const V* v, const C& cols, const P* rp, const float* xt, int64_t in,
                int64_t tokens, int64_t out, const float* bias, float* y) {
  constexpr int TT = NV * kLanes;
  constexpr int U = NV >= 4 ? 2 : 8 / NV;  // independent accumulator sets
  const int64_t rows = r1 - r0, tiles = (tokens + TT - 1) / TT;
  const int64_t blocks = (in * TT + kL1Floats - 1) / kL1Floats;
  const int64_t block_cols = bitmap_words((in + blocks - 1) / blocks) * 64;  // whole bitmap words
  vfloat* partial = reinterpret_cast<vfloat*>(scratch(1, rows * TT));
  std::vector<int64_t> cursor(rows);
  std::vector<int32_t> columns(block_cols + kLanes);
  vfloat stage[kLanes][NV];
  for (int64_t b = 0; b < tiles; ++b) {
    const float* xb = xt + b * in * TT;
    for (int64_t i = 0; i < rows; ++i) cursor[i] = rp[r0 + i];
    for (int64_t c0 = 0; c0 < in; c0 += block_cols) {
      const bool first = c0 == 0, last = c0 + block_cols >= in;
      for (int64_t i = 0; i < rows; ++i) {
        vfloat acc[U][NV] = {};
        cursor[i] += accumulate_block<NV, U>(acc, v, cols, r0 + i, cursor[i], rp[r0 + i + 1], c0, c0 + block_cols,
                                             columns.data(), xb);
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

// Calls f(Tag<V>, columns, Tag<P>) for the value dtype, the column format and the row-pointer dtype.
template <typename F>
void dispatch(const torch::Tensor& values, const torch::Tensor& cols, const torch::Tensor& rp, int64_t in, F&& f) {
  auto with_columns = [&](auto vt) {
    auto with_ptr = [&](const auto& columns) {
      if (rp.scalar_type() == at::kInt) f(vt, columns, Tag<int32_t>{});
      else f(vt, columns, Tag<int64_t>{});
    };
    if (cols.scalar_type() == at::kByte) with_ptr(Bitmap{reinterpret_cast<const uint64_t*>(cols.data_ptr()), bitmap_words(in)});
    else if (cols.scalar_type() == at::kShort) with_ptr(Absolute<int16_t>{cols.data_ptr<int16_t>()});
    else with_ptr(Absolute<int32_t>{cols.data_ptr<int32_t>()});
  };
  switch (values.scalar_type()) {
    case at::kFloat: return with_columns(Tag<float>{});
    case at::kHalf: return with_columns(Tag<at::Half>{});
    case at::kBFloat16: return with_columns(Tag<at::BFloat16>{});
    default: TORCH_CHECK(false, "sparse_linear: values must be float32, float16 or bfloat16");
  }
}

template <typename V, typename C, typename P>
void run(const V* v, const C& c, const P* rp, int64_t nnz, const float* x, int64_t tokens, int64_t in,
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
      for (int64_t p = p0; p < p1; ++p) decode_rows(bounds[p], bounds[p + 1], v, v + nnz, c, rp, padded, bias, y);
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

// t as float32, without a dispatcher call when it already is one (decode calls are short).
inline torch::Tensor as_float(const torch::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

}  // namespace

torch::Tensor sparse_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& cols,
                            const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias,
                            int64_t out_features, int64_t in_features) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && cols.device().is_cpu() && row_ptr.device().is_cpu(),
              "sparse_linear: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "sparse_linear: x must be [..., ", in_features, "]");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && cols.dim() == 1 && cols.is_contiguous(),
              "sparse_linear: values and col_indices must be contiguous 1-D tensors");
  TORCH_CHECK(cols.scalar_type() == at::kByte || cols.scalar_type() == at::kShort || cols.scalar_type() == at::kInt,
              "sparse_linear: col_indices must be uint8 (a bitmap), int16 (uint16 bits) or int32");
  if (cols.scalar_type() == at::kByte) {
    TORCH_CHECK(cols.numel() == out_features * bitmap_words(in_features) * 8 &&
                    reinterpret_cast<uintptr_t>(cols.data_ptr()) % 8 == 0,
                "sparse_linear: a bitmap needs ceil(in_features / 64) 8-byte-aligned 64-bit words per row");
  } else {
    TORCH_CHECK(values.numel() == cols.numel(), "sparse_linear: values and col_indices must have equal length");
  }
  TORCH_CHECK(cols.scalar_type() != at::kShort || in_features <= 65536,
              "sparse_linear: int16 col_indices need in_features <= 65536");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.is_contiguous() && row_ptr.numel() == out_features + 1 &&
                  (row_ptr.scalar_type() == at::kInt || row_ptr.scalar_type() == at::kLong),
              "sparse_linear: row_ptr must be a contiguous int32/int64 tensor of out_features + 1 entries");
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "sparse_linear: bias must have out_features entries");
    b = as_float(*bias).contiguous();
  }
  const torch::Tensor x2 = as_float(x.reshape({-1, in_features})).contiguous();
  const int64_t tokens = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  torch::Tensor y = at::empty(out_shape, x2.options());  // contiguous: [tokens, out] in memory
  if (tokens > 0 && out_features > 0) {
    const int64_t nv = tokens <= 16 ? 1 : tokens <= 32 ? 2 : 4;  // token vectors per tile
    dispatch(values, cols, row_ptr, in_features, [&](auto vt, const auto& columns, auto pt) {
      using V = typename decltype(vt)::type;
      using P = typename decltype(pt)::type;
      const P* rp = row_ptr.data_ptr<P>();
      TORCH_CHECK(rp[0] >= 0 && rp[out_features] <= values.numel(), "sparse_linear: row_ptr exceeds the values");
      run(values.data_ptr<V>(), columns, rp, values.numel(),
          x2.data_ptr<float>(), tokens, in_features, out_features, b.defined() ? b.data_ptr<float>() : nullptr,
          y.data_ptr<float>(), nv);
    });
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear, "CSR sparse linear layer (CPU)", py::call_guard<py::gil_scoped_release>());
}
