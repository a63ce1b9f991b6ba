// The JAX twin's CPU attention kernel: dense (no mask, optionally top-left causal) scaled dot-product
// attention, forward and backward, fp32, for the engine's dense plan (jax_attn/engine.py, `native`).
//
// Why it exists: XLA:CPU runs the engine's blocked loops one small op at a time and splits each op
// across the cores; on the 2-core CPU of docs/performance.md that scaled 1.3-1.6x from one core to two,
// where torch's fused kernel (one parallel loop over batch, heads and query blocks) scales 2.0x. This
// kernel does what torch's does: whole independent work items per thread, each an online softmax over
// key blocks on register-tiled GEMMs.
//
// Layouts (row-major): q (R, T, H), k (Rk, S, H), v (Rk, S, V), R = Rk * groups; query row r reads key
// row r / groups (grouped-query attention). out (R, T, V); stats (R, T, 3): the row's max of the scaled
// logits, the sum of their exponentials shifted by it, and lse = max + log(sum), the natural-log sum of the
// exponentiated scaled logits. Causal is top-left: query t sees keys s <= t.
//
// Written for this project; compiled on first use by jax_attn/native/__init__.py with -O3 -march=native.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <sched.h>

#if defined(__AVX__)
#include <immintrin.h>
// An empty asm that takes x in a vector register: keeps x alive to this point (see tile)
#define KEEP_ALIVE(x) asm("" ::"v"(x))
#else
#define KEEP_ALIVE(x) ((void)0)
#endif

#include "xla/ffi/api/ffi.h"

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;  // floats per vector register
constexpr int NR = 4;  // vectors per register tile row: a 6 x 64 tile, 24 accumulators of 32 registers
#else
constexpr int W = 8;
constexpr int NR = 2;  // a 6 x 16 tile, 12 accumulators of 16 registers
#endif
constexpr int MR = 6;

typedef float vf __attribute__((vector_size(W * 4), aligned(4)));
typedef int vi __attribute__((vector_size(W * 4)));

inline vf vload(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void vstore(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }
// x in every lane (one broadcast; GCC 12 builds a generic splat lane by lane)
inline vf splat(float x) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(x);
#else
  vf v;
  for (int l = 0; l < W; ++l) v[l] = x;
  return v;
#endif
}

// C[M x NV*W] (+)= A[M x k] . B[k x NV*W]: A's element (m, d) at A[m * lda + d * acs] (acs = 1: row-major;
// lda = 1: A stored transposed), B and C row-major with leading dimensions ldb, ldc. With rmax (a vector per
// row), also rmax[m] = max(rmax[m], C's row m in this tile) lane by lane: the softmax's row max without
// another pass, reduced across lanes once per row and key block (hmax).
template <int M, int NV>
inline void tile(int k, const float* A, long lda, long acs, const float* B, long ldb, float* C, long ldc, bool acc,
                 float* rmax) {
  vf c[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) c[m][j] = acc ? vload(C + m * ldc + j * W) : vf{};
  for (int d = 0; d < k; ++d) {
    vf b[NV];
    for (int j = 0; j < NV; ++j) b[j] = vload(B + d * ldb + j * W);
    for (int m = 0; m < M; ++m) {
      const vf a = splat(A[m * lda + d * acs]);
      for (int j = 0; j < NV; ++j) c[m][j] += b[j] * a;
      KEEP_ALIVE(a);  // a, and below b, live past their last product: otherwise GCC 12 writes that product
    }                 // into the dying register and spends a register move per step on the accumulator
    for (int j = 0; j < NV; ++j) KEEP_ALIVE(b[j]);
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) vstore(C + m * ldc + j * W, c[m][j]);
  if (rmax)
    for (int m = 0; m < M; ++m) {
      vf x = vload(rmax + m * W);
      for (int j = 0; j < NV; ++j) x = c[m][j] > x ? c[m][j] : x;
      vstore(rmax + m * W, x);
    }
}

// The largest and the sum of a vector's lanes: a tree of halvings with constant shuffles (lanes ignore a
// NaN, as std::max does). Written out: GCC 12 builds a shuffle index computed in a loop lane by lane at run
// time, which made the forward 12% slower. clang spells the shuffle differently.
#if defined(__clang__)
#define SHUFFLE(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define SHUFFLE(x, ...) __builtin_shuffle(x, vi{__VA_ARGS__})
#endif
#if defined(__AVX512F__)
#define LANES_8 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7
#define LANES_4 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11
#define LANES_2 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13
#define LANES_1 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#else
#define LANES_4 4, 5, 6, 7, 0, 1, 2, 3
#define LANES_2 2, 3, 0, 1, 6, 7, 4, 5
#define LANES_1 1, 0, 3, 2, 5, 4, 7, 6
#endif

inline vf lane_max(vf a, vf b) { return b > a ? b : a; }

inline float hmax(vf x) {
#if defined(__AVX512F__)
  x = lane_max(x, SHUFFLE(x, LANES_8));
#endif
  x = lane_max(x, SHUFFLE(x, LANES_4));
  x = lane_max(x, SHUFFLE(x, LANES_2));
  x = lane_max(x, SHUFFLE(x, LANES_1));
  return x[0];
}

inline float hsum(vf x) {
#if defined(__AVX512F__)
  x += SHUFFLE(x, LANES_8);
#endif
  x += SHUFFLE(x, LANES_4);
  x += SHUFFLE(x, LANES_2);
  x += SHUFFLE(x, LANES_1);
  return x[0];
}

template <int M>
inline void tile_rows(int nv, int k, const float* A, long lda, long acs, const float* B, long ldb, float* C,
                      long ldc, bool acc, float* rmax) {
  if (nv == 1) tile<M, 1>(k, A, lda, acs, B, ldb, C, ldc, acc, rmax);
  if constexpr (NR >= 2) if (nv == 2) tile<M, 2>(k, A, lda, acs, B, ldb, C, ldc, acc, rmax);
  if constexpr (NR >= 4) {
    if (nv == 3) tile<M, 3>(k, A, lda, acs, B, ldb, C, ldc, acc, rmax);
    if (nv == 4) tile<M, 4>(k, A, lda, acs, B, ldb, C, ldc, acc, rmax);
  }
}

// C[m x n] (+)= A[m x k] . B[k x n] (A's element (m, d) at A[m * lda + d * acs]); n a multiple of W. With
// rmax (m floats), each row's max over C is folded into it (see tile).
void gemm(int m, int n, int k, const float* A, long lda, long acs, const float* B, long ldb, float* C, long ldc,
          bool acc, float* rmax = nullptr) {
  for (int j0 = 0; j0 < n; j0 += NR * W) {
    const int nv = std::min(NR, (n - j0) / W);
    int i0 = 0;
    for (; i0 + MR <= m; i0 += MR)
      tile_rows<MR>(nv, k, A + i0 * lda, lda, acs, B + j0, ldb, C + i0 * ldc + j0, ldc, acc, rmax ? rmax + i0 * W : nullptr);
    const float* a = A + i0 * lda;
    float* c = C + i0 * ldc + j0;
    float* rm = rmax ? rmax + i0 * W : nullptr;
    switch (m - i0) {
      case 1: tile_rows<1>(nv, k, a, lda, acs, B + j0, ldb, c, ldc, acc, rm); break;
      case 2: tile_rows<2>(nv, k, a, lda, acs, B + j0, ldb, c, ldc, acc, rm); break;
      case 3: tile_rows<3>(nv, k, a, lda, acs, B + j0, ldb, c, ldc, acc, rm); break;
      case 4: tile_rows<4>(nv, k, a, lda, acs, B + j0, ldb, c, ldc, acc, rm); break;
      case 5: tile_rows<5>(nv, k, a, lda, acs, B + j0, ldb, c, ldc, acc, rm); break;
    }
  }
}

// exp(x) for a vector: 2^n * e^f with n = round(x / ln 2) (by the 1.5 * 2^23 rounding trick),
// |f| <= ln 2 / 2 and a degree-5 polynomial fitted to e^f there for the least maximum relative error
// (7.5e-8 in float64 arithmetic, about one float32 ulp); exactly 0 at or below -87.3 (and for -inf), so
// masked logits give exact zeros; NaN stays NaN. x <= 88.
inline vf exp_poly(vf f) {
  vf p = splat(0.008297655172536026f);
  p = p * f + 0.041915381966471946f;
  p = p * f + 0.1666757472684628f;
  p = p * f + 0.49998894851454057f;
  p = p * f + 0.9999996919925661f;
  return p * f + 1.000000071654677f;
}

#if defined(__AVX512F__)
// AVX-512: vscalefps multiplies by 2^n and a compare mask gives the zeros, 13 vector instructions instead of
// 16 (the softmax's exp pass is about a tenth of the forward)
inline vf vexp(vf x) {
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.3f), _CMP_NLE_UQ);
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vf f = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  return (vf)_mm512_maskz_scalef_ps(keep, (__m512)exp_poly(f), (__m512)n);
}
#else
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f);
  const vf xc = x < lo ? lo : x;
  const vf t = xc * 1.44269504088896341f + 12582912.0f;
  const vf n = t - 12582912.0f;
  const vf f = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  vi e;
  std::memcpy(&e, &t, sizeof(e));
  e = (e + 127) << 23;
  vf sc;
  std::memcpy(&sc, &e, sizeof(sc));
  const vf r = exp_poly(f) * sc;
  return x <= lo ? vf{} : r;
}
#endif

// s[i] = exp((s[i] - shift) - shift2) for i < n (n a multiple of W); returns their sum.
inline float exp_row(float* s, int n, float shift, float shift2) {
  vf acc{};
  for (int c = 0; c < n; c += W) {
    const vf e = vexp((vload(s + c) - shift) - shift2);
    vstore(s + c, e);
    acc += e;
  }
  return hsum(acc);
}

// max of s[i] for i < n (n a multiple of W).
inline float max_row(const float* s, int n) {
  vf m = splat(-INFINITY);
  for (int c = 0; c < n; c += W) {
    const vf x = vload(s + c);
    m = x > m ? x : m;
  }
  return hmax(m);
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// dst[d * ld + c] = src[c * H + d]: a key block (cols x H) transposed to (H x cols), zero columns up to ld.
// Whole vectors of W columns at a time: the W source rows stay in L1 and every store is a full vector.
void transpose_block(const float* src, int cols, int H, float* dst, int ld) {
  int c0 = 0;
  for (; c0 + W <= cols; c0 += W)
    for (int d = 0; d < H; ++d) {
      vf x;
      for (int l = 0; l < W; ++l) x[l] = src[(long)(c0 + l) * H + d];
      vstore(dst + (long)d * ld + c0, x);
    }
  for (int d = 0; d < H; ++d) std::memset(dst + (long)d * ld + c0, 0, sizeof(float) * (ld - c0));
  for (int c = c0; c < cols; ++c)
    for (int d = 0; d < H; ++d) dst[(long)d * ld + c] = src[(long)c * H + d];
}

// Threads: the cores this process may run on (sched_getaffinity: taskset and cgroup cpusets count), or
// $JAX_ATTN_NUM_THREADS.
int worker_count() {
  static const int count = [] {
    if (const char* env = std::getenv("JAX_ATTN_NUM_THREADS")) {
      const int n = std::atoi(env);
      if (n > 0) return n;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return (int)std::max(1u, std::thread::hardware_concurrency());
  }();
  return count;
}

// Runs body(item) for item in [0, n) on up to worker_count() threads; `fma`, the call's multiply-adds, caps
// the threads at one per 2^21 (starting a thread costs about as much). Each thread owns a contiguous share of
// the items and takes them from its front, so that neighbouring items (the same key row) stay in its caches;
// a thread that runs out takes items from the back of the others' shares (measured: 3% faster than handing
// out items one by one in order, for the forward of B2 N8 T2048 on 2 cores).
template <class F>
void parallel_items(long n, double fma, F body) {
  const long by_work = std::max(1L, (long)(fma / (1 << 21)));
  const int workers = (int)std::min<long>(std::min<long>(n, worker_count()), by_work);
  // (the shares hold 32-bit item numbers; 2^31 items would be far more than any q fits in memory)
  if (workers <= 1 || n >= (1L << 31)) {
    for (long i = 0; i < n; ++i) body(i);
    return;
  }
  // share w: items [front, back), packed as front << 32 | back
  std::vector<std::atomic<uint64_t>> shares(workers);
  for (int w = 0; w < workers; ++w) shares[w].store((uint64_t)(w * n / workers) << 32 | (uint64_t)((w + 1) * n / workers));
  auto take = [&](int w, bool front, long* item) {
    uint64_t cur = shares[w].load();
    for (;;) {
      const uint64_t f = cur >> 32, b = cur & 0xffffffffu;
      if (f >= b) return false;
      const uint64_t next = front ? (f + 1) << 32 | b : f << 32 | (b - 1);
      if (shares[w].compare_exchange_weak(cur, next)) {
        *item = (long)(front ? f : b - 1);
        return true;
      }
    }
  };
  auto run = [&](int w) {
    long item;
    while (take(w, true, &item)) body(item);
    for (int o = 1; o < workers; ++o)
      while (take((w + o) % workers, false, &item)) body(item);
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < workers; ++t) threads.emplace_back(run, t);
  run(0);
  for (auto& t : threads) t.join();
}

// Per-thread scratch: buffer `slot` of at least n floats (contents undefined), kept for the thread's life
// so that work items do not allocate (a 128 KiB block would be an mmap and fresh pages each time).
float* scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[12];
  if (buffers[slot].size() < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

// Block sizes: the forward's query rows per work item and keys per block, the backward's. Measured on
// the 2-core CPU (B2 N8 T2048 H64): forward 128 x 256 0.070 s full, 0.046 s causal (64 x 256: 0.079,
// 0.043); backward 64 x 128 0.144 / 0.079 s (64 x 256: 0.144 / 0.097). After later tuning, 120, 126, 132
// and 144 query rows per item were all within noise of 128.
constexpr int FQ = 128, FK = 256;
constexpr int BQ = 64, BK = 128;

struct Dims {
  long R, T, S, H, V, groups;
  float scale;
  bool causal;
};

// The keys query rows [t0, t0 + rows) may see: [0, end).
inline int key_end(const Dims& d, int t0, int rows) {
  return d.causal ? (int)std::min<long>(d.S, t0 + rows) : (int)d.S;
}

// Visible keys of query row t within a block starting at key j0 of `cols` keys.
inline int visible(const Dims& d, int t, int j0, int cols) {
  if (!d.causal) return cols;
  return std::max(0, std::min(cols, t - j0 + 1));
}

// Leading dimension of a transposed key block of n keys: a multiple of W plus one vector, so that the
// rows of a tall panel do not all fall into the same L1 sets (a 2^k-float stride would).
inline int t_ld(int n) { return round_up(n, W) + W; }

// Multiply-adds of one pass over the logits (q.k or p.v), for the thread count.
inline double pass_fma(const Dims& d) {
  return (double)d.R * d.T * d.S * std::max(d.H, d.V) * (d.causal ? 0.5 : 1.0);
}

void forward(const Dims& d, const float* q, const float* k, const float* v, float* out, float* stats) {
  const int n_qb = (int)((d.T + FQ - 1) / FQ);
  const long Rk = d.R / d.groups;
  const int Vp = round_up((int)d.V, W), ldk = t_ld(FK), n_kb = (int)((d.S + FK - 1) / FK);
  const bool v_padded = Vp != d.V;
  // every key row transposed once, (H, ldk): the logits' GEMM reads key columns as vectors
  std::unique_ptr<float[]> kt_(new float[(size_t)Rk * n_kb * d.H * ldk]);  // every element written below
  float* const kt = kt_.get();
  parallel_items(Rk * n_kb, (double)Rk * d.S * d.H * 4, [&](long kb) {
    const long kr = kb / n_kb, j0 = kb % n_kb * FK;
    transpose_block(k + (kr * d.S + j0) * d.H, (int)std::min<long>(FK, d.S - j0), (int)d.H, kt + kb * d.H * ldk, ldk);
  });
  parallel_items(d.R * n_qb, 2 * pass_fma(d), [&](long item) {
    const long r = item / n_qb;
    // causal: each row's query blocks last to first, so the lightest items come last and even out the threads
    const int t0 = (int)(d.causal ? n_qb - 1 - item % n_qb : item % n_qb) * FQ;
    const int rows = (int)std::min<long>(FQ, d.T - t0);
    const long kr = r / d.groups;
    float* sb = scratch(0, (size_t)FQ * FK);
    float* acc = scratch(1, (size_t)FQ * Vp);
    float* mx = scratch(2, FQ);
    float* sum = scratch(3, FQ);
    float* vb = v_padded ? scratch(4, (size_t)FK * Vp) : nullptr;
    float* bmax = scratch(5, (size_t)FQ * W);
    float* qs = scratch(6, (size_t)FQ * d.H);
    std::fill(acc, acc + (size_t)rows * Vp, 0.f);
    std::fill(mx, mx + rows, -INFINITY);
    std::fill(sum, sum + rows, 0.f);
    if (v_padded) std::fill(vb, vb + (size_t)FK * Vp, 0.f);
    // the query block times the scale: the logits come out scaled (one multiply per query element)
    for (long x = 0, n = (long)rows * d.H, o = (r * d.T + t0) * d.H; x < n; ++x) qs[x] = q[o + x] * d.scale;
    const float* ktr = kt + kr * n_kb * d.H * ldk;
    const float* vr = v + kr * d.S * d.V;
    const int end = key_end(d, t0, rows);
    // row i's online-softmax step over the block's logits s[0, n) (masked ones -inf) with block max bm
    auto update = [&](int i, float* s, int n, float bm) {
      const float m_new = std::max(mx[i], bm);
      const float alpha = std::exp(mx[i] - m_new);
      mx[i] = m_new;
      sum[i] = sum[i] * alpha + exp_row(s, n, m_new, 0.f);
      if (alpha != 1.f) {
        float* a = acc + (long)i * Vp;
        for (int c = 0; c < Vp; c += W) vstore(a + c, vload(a + c) * alpha);
      }
    };
    for (int j0 = 0; j0 < end; j0 += FK) {
      const int cols = std::min(FK, end - j0), colsp = round_up(cols, W);
      const float* kblk = ktr + (long)(j0 / FK) * d.H * ldk;
      const float* vblk = vr + (long)j0 * d.V;
      long ldv = d.V;
      if (v_padded) {
        for (int c = 0; c < cols; ++c) std::memcpy(vb + (long)c * Vp, vblk + (long)c * d.V, sizeof(float) * d.V);
        vblk = vb;
        ldv = Vp;
      }
      if (cols == colsp && visible(d, t0, j0, cols) == cols) {
        // every row sees every column of the block: one GEMM over all rows (its key panel stays in L1),
        // which folds in the row max
        std::fill(bmax, bmax + (size_t)rows * W, -INFINITY);
        gemm(rows, colsp, (int)d.H, qs, d.H, 1, kblk, ldk, sb, FK, false, bmax);
        for (int i = 0; i < rows; ++i) update(i, sb + (long)i * FK, colsp, hmax(vload(bmax + (long)i * W)));
        gemm(rows, Vp, cols, sb, FK, 1, vblk, ldv, acc, Vp, true);
        continue;
      }
      // a block cut by the causal diagonal or by the end of the keys: strip by strip of MR rows, each over
      // the columns its last row sees (causal: the others see fewer), masked after the GEMM; the max is
      // taken after masking (a masked logit must not raise the shift, or exp could underflow)
      for (int i0 = 0; i0 < rows; i0 += MR) {
        const int mr = std::min(MR, rows - i0), hi = visible(d, t0 + i0 + mr - 1, j0, cols);
        if (hi <= 0) continue;  // none of these rows sees a key of this block
        const int n = round_up(hi, W);
        float* ss = sb + (long)i0 * FK;
        gemm(mr, n, (int)d.H, qs + (long)i0 * d.H, d.H, 1, kblk, ldk, ss, FK, false);
        for (int i = i0; i < i0 + mr; ++i) {
          float* s = sb + (long)i * FK;
          const int lim = visible(d, t0 + i, j0, cols);
          if (lim <= 0) {
            std::memset(s, 0, sizeof(float) * n);
            continue;
          }
          for (int c = lim; c < n; ++c) s[c] = -INFINITY;
          update(i, s, n, max_row(s, n));
        }
        gemm(mr, Vp, hi, ss, FK, 1, vblk, ldv, acc + (long)i0 * Vp, Vp, true);
      }
    }
    for (int i = 0; i < rows; ++i) {
      float* o = out + (r * d.T + t0 + i) * d.V;
      const float inv = sum[i] > 0 ? 1.f / sum[i] : 0.f;
      for (int c = 0; c < d.V; ++c) o[c] = acc[(long)i * Vp + c] * inv;
      float* st = stats + (r * d.T + t0 + i) * 3;  // a row with nothing kept: shift 0, sum 1, lse -inf
      st[0] = sum[i] > 0 ? mx[i] : 0.f;
      st[1] = sum[i] > 0 ? sum[i] : 1.f;
      st[2] = sum[i] > 0 ? mx[i] + std::log(sum[i]) : -INFINITY;
    }
  });
}

// Gradients of forward's output (cotangent dout) and lse (folded into delta = rowsum(dout * out) - dlse,
// computed by the caller). A work item is a key row, or where key rows are fewer than the threads, a share
// of its key blocks (every n-th): it owns those blocks' dk and dv and all of its groups' query rows, whose
// dq it accumulates in its own buffer (dq itself for a whole row; shares are summed afterwards).
// Per key block: p = exp((s - max) - log sum) with s = (scale * q).k, the forward's logits to the bit (the
// same pre-scaled query, the same GEMM order: logits of 1e4 scaled after the product instead differ by
// a rounding of 1e4, and dv of tests/test_native.py's large_logits by 8e-3), max and sum kept apart as
// the XLA engine keeps them; ds = p * (dout.v - delta); dq += scale * ds . k,
// dk += scale * ds^T . q, dv += p^T . dout (the transposed products read p and ds column-wise).
void backward(const Dims& d, const float* q, const float* k, const float* v, const float* stats, const float* dout,
              const float* delta, float* dq, float* dk, float* dv) {
  const long Rk = d.R / d.groups, rows_k = d.groups * d.T * d.H;  // dq floats per key row
  const int Hp = round_up((int)d.H, W), Vp = round_up((int)d.V, W), ldt = t_ld(BK);
  const bool hpad = Hp != d.H, vpad = Vp != d.V;
  const int n_kb = (int)((d.S + BK - 1) / BK);
  const int shares = (int)std::min<long>(n_kb, (worker_count() + Rk - 1) / Rk);
  std::vector<float> dq_shares(shares > 1 ? (size_t)Rk * shares * rows_k : 0);
  parallel_items(Rk * shares, 5 * pass_fma(d), [&](long item) {
    const long kr = item / shares;
    const int share = (int)(item % shares);
    float* kt = scratch(0, (size_t)d.H * ldt);
    float* vt = scratch(1, (size_t)d.V * ldt);
    float* p = scratch(2, (size_t)BQ * BK);
    float* ds = scratch(3, (size_t)BQ * BK);
    float* dkb = scratch(4, (size_t)BK * Hp);
    float* dvb = scratch(5, (size_t)BK * Vp);
    float* dqb = scratch(6, (size_t)BQ * Hp);
    float* qpad = hpad ? scratch(7, (size_t)BQ * Hp) : nullptr;
    float* kpad = hpad ? scratch(8, (size_t)BK * Hp) : nullptr;
    float* dopad = vpad ? scratch(9, (size_t)BQ * Vp) : nullptr;
    float* qs = scratch(10, (size_t)BQ * d.H);
    if (hpad) std::fill(qpad, qpad + (size_t)BQ * Hp, 0.f), std::fill(kpad, kpad + (size_t)BK * Hp, 0.f);
    if (vpad) std::fill(dopad, dopad + (size_t)BQ * Vp, 0.f);
    float* dq_own = shares > 1 ? dq_shares.data() + item * rows_k : dq + kr * rows_k;
    std::fill(dq_own, dq_own + rows_k, 0.f);
    const float* kr_ = k + kr * d.S * d.H;
    const float* vr = v + kr * d.S * d.V;
    for (int jb = share; jb < n_kb; jb += shares) {
      const int j0 = jb * BK;
      const int cols = (int)std::min<long>(BK, d.S - j0), colsp = round_up(cols, W);
      transpose_block(kr_ + (long)j0 * d.H, cols, (int)d.H, kt, ldt);
      transpose_block(vr + (long)j0 * d.V, cols, (int)d.V, vt, ldt);
      std::fill(dkb, dkb + (size_t)BK * Hp, 0.f);
      std::fill(dvb, dvb + (size_t)BK * Vp, 0.f);
      if (hpad)
        for (int c = 0; c < cols; ++c)
          std::memcpy(kpad + (long)c * Hp, kr_ + (long)(j0 + c) * d.H, sizeof(float) * d.H);
      const int t_first = d.causal ? j0 / BQ * BQ : 0;  // query rows t < j0 see none of these keys
      for (long g = 0; g < d.groups; ++g) {
        const long r = kr * d.groups + g;
        for (int t0 = t_first; t0 < d.T; t0 += BQ) {
          const int rows = (int)std::min<long>(BQ, d.T - t0);
          const float* qi = q + (r * d.T + t0) * d.H;
          const float* doi = dout + (r * d.T + t0) * d.V;
          for (long x = 0, n = (long)rows * d.H; x < n; ++x) qs[x] = qi[x] * d.scale;  // as the forward
          gemm(rows, colsp, (int)d.H, qs, d.H, 1, kt, ldt, p, BK, false);
          gemm(rows, colsp, (int)d.V, doi, d.V, 1, vt, ldt, ds, BK, false);
          for (int i = 0; i < rows; ++i) {
            const long t = t0 + i;
            float* pi = p + (long)i * BK;
            float* dsi = ds + (long)i * BK;
            const int lim = visible(d, (int)t, j0, cols);
            const float* st = stats + (r * d.T + t) * 3;
            if (lim <= 0 || !std::isfinite(st[2])) {
              std::memset(pi, 0, sizeof(float) * colsp);
              std::memset(dsi, 0, sizeof(float) * colsp);
              continue;
            }
            for (int c = lim; c < colsp; ++c) pi[c] = -INFINITY;
            exp_row(pi, colsp, st[0], std::log(st[1]));
            const float de = delta[r * d.T + t];
            for (int c = 0; c < colsp; c += W) vstore(dsi + c, vload(pi + c) * (vload(dsi + c) - de));
          }
          float* dqi = dq_own + (g * d.T + t0) * d.H;
          if (hpad) {
            gemm(rows, Hp, cols, ds, BK, 1, kpad, Hp, dqb, Hp, false);
            for (int i = 0; i < rows; ++i)
              for (int c = 0; c < d.H; ++c) dqi[(long)i * d.H + c] += dqb[(long)i * Hp + c];
          } else {
            gemm(rows, (int)d.H, cols, ds, BK, 1, kr_ + (long)j0 * d.H, d.H, dqi, d.H, true);
          }
          const float* qa = qi;
          long ldq = d.H;
          if (hpad) {
            for (int i = 0; i < rows; ++i) std::memcpy(qpad + (long)i * Hp, qi + (long)i * d.H, sizeof(float) * d.H);
            qa = qpad;
            ldq = Hp;
          }
          gemm(cols, Hp, rows, ds, 1, BK, qa, ldq, dkb, Hp, true);
          const float* da = doi;
          long ldo = d.V;
          if (vpad) {
            for (int i = 0; i < rows; ++i)
              std::memcpy(dopad + (long)i * Vp, doi + (long)i * d.V, sizeof(float) * d.V);
            da = dopad;
            ldo = Vp;
          }
          gemm(cols, Vp, rows, p, 1, BK, da, ldo, dvb, Vp, true);
        }
      }
      for (int c = 0; c < cols; ++c) {
        float* dkr = dk + (kr * d.S + j0 + c) * d.H;
        float* dvr = dv + (kr * d.S + j0 + c) * d.V;
        for (int x = 0; x < d.H; ++x) dkr[x] = dkb[(long)c * Hp + x] * d.scale;
        for (int x = 0; x < d.V; ++x) dvr[x] = dvb[(long)c * Vp + x];
      }
    }
    if (shares == 1)
      for (long i = 0; i < rows_k; ++i) dq_own[i] *= d.scale;
  });
  if (shares > 1) {  // sum the shares' dq (in share order: the same rounding every run)
    parallel_items(d.R, (double)d.R * d.T * d.H * shares, [&](long r) {
      const long kr = r / d.groups, g = r % d.groups;
      float* out = dq + r * d.T * d.H;
      for (long i = 0; i < d.T * d.H; ++i) {
        float t = 0;
        for (int s = 0; s < shares; ++s) t += dq_shares[(kr * shares + s) * rows_k + g * d.T * d.H + i];
        out[i] = t * d.scale;
      }
    });
  }
}

}  // namespace

namespace ffi = xla::ffi;

// q (R, T, H), k (Rk, S, H), v (Rk, S, V) -> out (R, T, V), stats (R, T, 3). The Python side checked the shapes;
// they are checked again here, since a wrong one would read past a buffer.
ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> stats, int64_t groups, float scale,
                       int64_t causal) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || groups < 1 || kd[0] * groups != qd[0] ||
      vd[0] != kd[0] || vd[1] != kd[1] || kd[2] != qd[2])
    return ffi::Error::InvalidArgument("jax_attn_cpu_forward: inconsistent q, k, v shapes");
  const Dims d{qd[0], qd[1], kd[1], qd[2], vd[2], groups, scale, causal != 0};
  forward(d, q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(), stats->typed_data());
  return ffi::Error::Success();
}

// + stats (R, T, 3) from the forward, dout (R, T, V), delta (R, T) -> dq, dk, dv shaped like q, k, v.
ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::F32> delta,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, int64_t groups, float scale, int64_t causal) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || groups < 1 || kd[0] * groups != qd[0] ||
      vd[0] != kd[0] || vd[1] != kd[1] || kd[2] != qd[2] || stats.element_count() != (size_t)(qd[0] * qd[1] * 3) ||
      delta.element_count() != (size_t)(qd[0] * qd[1]) || dout.element_count() != (size_t)(qd[0] * qd[1] * vd[2]))
    return ffi::Error::InvalidArgument("jax_attn_cpu_backward: inconsistent shapes");
  const Dims d{qd[0], qd[1], kd[1], qd[2], vd[2], groups, scale, causal != 0};
  backward(d, q.typed_data(), k.typed_data(), v.typed_data(), stats.typed_data(), dout.typed_data(),
           delta.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxAttnCpuForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxAttnCpuBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("causal"));

extern "C" {

// Plain C entry points (tests and benchmarks without XLA).
void jax_attn_cpu_forward(const float* q, const float* k, const float* v, float* out, float* stats, long R, long T,
                          long S, long H, long V, long groups, float scale, int causal) {
  forward(Dims{R, T, S, H, V, groups, scale, causal != 0}, q, k, v, out, stats);
}

void jax_attn_cpu_backward(const float* q, const float* k, const float* v, const float* stats, const float* dout,
                           const float* delta, float* dq, float* dk, float* dv, long R, long T, long S, long H,
                           long V, long groups, float scale, int causal) {
  backward(Dims{R, T, S, H, V, groups, scale, causal != 0}, q, k, v, stats, dout, delta, dq, dk, dv);
}
}
