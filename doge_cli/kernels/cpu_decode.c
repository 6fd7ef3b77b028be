/* One decoding step of a dense Doge model on a CPU, in one call: see cpu_decode.py for what it computes,
 * when it is used and how it is built. Weights (the big matrices) are read in the model's own dtype
 * (float32 or bfloat16, widened to float32 in registers); every sum is in float32. The threads of the
 * caller's OpenMP runtime (torch's) share the work: each matrix product splits its output rows among
 * them, and everything between products is small and split by (row, head) or done by one thread.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DOGE_AVX2 1
/* Weights stream from memory once per token: asking for them this far ahead (non-temporal: they are not
 * needed again this step) keeps more reads in flight than the hardware prefetcher alone (measured on a
 * 2-core EPYC: a bf16 product 7.5 -> 14.7 GB/s). */
#define PREFETCH 2048
#define PREFETCH_AHEAD(p) _mm_prefetch((const char *)(p) + PREFETCH, _MM_HINT_NTA)
#endif
#if defined(DOGE_AVX2) && defined(__AVX512F__) && !defined(DOGE_NO_AVX512)
/* 512-bit products for one input row (AVX-512 CPUs: Zen 4, Xeons since Skylake-SP). */
#define DOGE_AVX512 1
/* They read a block of four weight rows as one stream and ask for the stream this many bytes ahead of the
 * block's start (at least one block), four cache lines for each four they consume. */
#define STREAM_AHEAD 8192
#endif

enum { F32 = 0, BF16 = 1 };

/* Built with -DDOGE_PROFILE (benchmarks/decode_profile.py, never for decoding otherwise), the step adds the
 * wall seconds of each of its sections, as thread 0 sees them, to doge_profile[section]: a product's section
 * ends at its closing barrier, so it holds the slowest thread's share and the wait for it. */
enum { S_EMBED, S_NORM1, S_QKV, S_HEADS, S_ATTN, S_O, S_NORM2, S_GU, S_SILU, S_DOWN, S_RESID, S_HEAD, S_COUNT };
#ifdef DOGE_PROFILE
double doge_profile[S_COUNT];
int doge_profile_sections(void) { return S_COUNT; }
#define PROFILE_START double mark_ = omp_get_wtime();
#define SECTION(i) do { if (omp_get_thread_num() == 0) { double t_ = omp_get_wtime(); doge_profile[i] += t_ - mark_; \
                                                        mark_ = t_; } } while (0)
#else
#define PROFILE_START
#define SECTION(i) do { } while (0)
#endif

typedef struct {
    const void *qkv_w; const float *qkv_b;   /* (q_out + 2 kv_out, H), (q_out + 2 kv_out) or NULL */
    const float *qk_norm;                     /* (hq + hkv, d) or NULL: each head's norm weight */
    const float *dt_w; const float *dt_b;     /* (hb, kv_out), (hb) or NULL */
    const float *a;                           /* (hb) */
    const void *o_w; const float *o_b;        /* (H, hq d), (H) or NULL */
    const float *ln1, *ln2, *res1, *res2;     /* (H) */
    const void *gu_w; const float *gu_b;      /* (2 I, H): gate rows then up rows; (2 I) or NULL */
    const void *down_w; const float *down_b;  /* (H, I), (H) or NULL */
    void *keys, *values, *biases;             /* the cache: (rows, hkv, cap, d), same, (rows, hb, cap) */
    float ln1_eps, ln2_eps, qk_eps, pad;
} Layer;

typedef struct {
    int32_t layers, hidden, inter, hq, hkv, d, hb, vocab;
    int32_t wdtype;        /* of the matrices and the embedding: F32 or BF16 */
    int32_t cdtype;        /* of the cache */
    int32_t cap;           /* the cache's positions per row */
    int32_t pad0;
    float norm_eps, rope_scaling, scale, pad1;
    const float *inv_freq; /* (d / 2) */
    const void *embed;     /* (vocab, H) */
    const float *norm;     /* (H) */
    const void *head_w; const float *head_b; /* (vocab, H), (vocab) or NULL */
    const Layer *layer;
} Model;

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float load1(const void *p, int dtype, int64_t i) {
    return dtype == F32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

static inline void store1(void *p, int dtype, int64_t i, float v) {
    if (dtype == F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = f32_to_bf16(v);
}

#ifdef DOGE_AVX2
static inline __m256 load8(const void *p, int dtype, int64_t i) {
    if (dtype == F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* y[r, o] = x[r] . W[o] (+ b[o]) for output rows o in [o0, o1) and every input row r < n; W (out, k) in
 * dtype, x (n, k) and y (n, out) float32. Four output rows at a time for one input row (four independent
 * sums to hide the adds' latency), each weight row read once for all n input rows otherwise. */
static inline __attribute__((always_inline)) void product_rows(const void *w, int dtype, const float *b, const float *x, float *y, int n, int k,
                         int out, int o0, int o1) {
    int o = o0;
#ifdef DOGE_AVX512
    if (n == 1 && k >= 32) {
        int es = dtype == F32 ? 4 : 2, step = dtype == F32 ? 16 : 32, kw = k & ~(step - 1);
        int64_t ahead = (int64_t)4 * k * es > STREAM_AHEAD ? (int64_t)4 * k * es : STREAM_AHEAD;
        /* bf16: a 32-bit lane holds elements 2j (low half) and 2j+1 (high half); x is split into its even
         * and odd elements once per product, so 32 weights are two float vectors by a shift and a mask. */
        float xs[dtype == F32 ? 1 : kw];
        if (dtype != F32)
            for (int i = 0; i < kw; i += 32)
                for (int j = 0; j < 16; j++) {
                    xs[i + j] = x[i + 2 * j];
                    xs[i + 16 + j] = x[i + 2 * j + 1];
                }
        const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
        for (; o + 4 <= o1; o += 4) {
            __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
                   s3 = _mm512_setzero_ps();
            int64_t base = (int64_t)o * k;
            const char *r0 = (const char *)w + base * es, *r1 = r0 + (int64_t)k * es, *r2 = r1 + (int64_t)k * es,
                       *r3 = r2 + (int64_t)k * es, *pf = r0 + ahead;
            if (dtype == F32) {
                for (int i = 0; i < kw; i += 16, pf += 256) {
                    _mm_prefetch(pf, _MM_HINT_T0); _mm_prefetch(pf + 64, _MM_HINT_T0);
                    _mm_prefetch(pf + 128, _MM_HINT_T0); _mm_prefetch(pf + 192, _MM_HINT_T0);
                    __m512 xv = _mm512_loadu_ps(x + i);
                    s0 = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)r0 + i), xv, s0);
                    s1 = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)r1 + i), xv, s1);
                    s2 = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)r2 + i), xv, s2);
                    s3 = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)r3 + i), xv, s3);
                }
            } else {
#define DOGE_PAIRS512(row, acc) { \
                __m512i v_ = _mm512_loadu_si512((const void *)((const uint16_t *)(row) + i)); \
                acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v_, 16)), x0, acc); \
                acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v_, high)), x1, acc); }
                for (int i = 0; i < kw; i += 32, pf += 256) {
                    _mm_prefetch(pf, _MM_HINT_T0); _mm_prefetch(pf + 64, _MM_HINT_T0);
                    _mm_prefetch(pf + 128, _MM_HINT_T0); _mm_prefetch(pf + 192, _MM_HINT_T0);
                    __m512 x0 = _mm512_loadu_ps(xs + i), x1 = _mm512_loadu_ps(xs + i + 16);
                    DOGE_PAIRS512(r0, s0) DOGE_PAIRS512(r1, s1) DOGE_PAIRS512(r2, s2) DOGE_PAIRS512(r3, s3)
                }
#undef DOGE_PAIRS512
            }
            float t[4] = {_mm512_reduce_add_ps(s0), _mm512_reduce_add_ps(s1), _mm512_reduce_add_ps(s2),
                          _mm512_reduce_add_ps(s3)};
            for (int i = kw; i < k; i++)
                for (int j = 0; j < 4; j++) t[j] += load1(w, dtype, base + (int64_t)j * k + i) * x[i];
            for (int j = 0; j < 4; j++) y[o + j] = t[j] + (b ? b[o + j] : 0.0f);
        }
    }
#endif
#ifdef DOGE_AVX2
    int kv = k & ~7;
    /* (o + 4 <= o1: rows the 512-bit loops above left, if any; else skip even the bf16 split of x) */
    if (n == 1 && dtype == F32 && o + 4 <= o1) {
        for (; o + 4 <= o1; o += 4) {
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
                   s3 = _mm256_setzero_ps();
            int64_t base = (int64_t)o * k;
            const float *w0 = (const float *)w + base, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
            for (int i = 0; i < kv; i += 8) {
                if (!(i & 15)) { /* one cache line of each row, PREFETCH bytes ahead */
                    PREFETCH_AHEAD(w0 + i); PREFETCH_AHEAD(w1 + i); PREFETCH_AHEAD(w2 + i); PREFETCH_AHEAD(w3 + i);
                }
                __m256 xv = _mm256_loadu_ps(x + i);
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, s1);
                s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, s2);
                s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, s3);
            }
            float t[4] = {hsum8(s0), hsum8(s1), hsum8(s2), hsum8(s3)};
            for (int i = kv; i < k; i++)
                for (int j = 0; j < 4; j++) t[j] += load1(w, dtype, base + (int64_t)j * k + i) * x[i];
            for (int j = 0; j < 4; j++) y[o + j] = t[j] + (b ? b[o + j] : 0.0f);
        }
    } else if (n == 1 && o + 4 <= o1) {
        /* bf16 pairs: a 32-bit lane holds elements 2j (low half) and 2j+1 (high half), so a 256-bit load of 16
         * weights is two float vectors by a shift and a mask, against x split into its even and odd
         * elements once per product (xs). */
        int k16 = k & ~15;
        float xs[k16 > 0 ? k16 : 1];
        for (int i = 0; i < k16; i += 16)
            for (int j = 0; j < 8; j++) {
                xs[i + j] = x[i + 2 * j];
                xs[i + 8 + j] = x[i + 2 * j + 1];
            }
        const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
        for (; o + 4 <= o1; o += 4) {
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
                   s3 = _mm256_setzero_ps();
            int64_t base = (int64_t)o * k;
            const uint16_t *w0 = (const uint16_t *)w + base, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
#define DOGE_PAIRS(row, acc) { \
                __m256i v_ = _mm256_loadu_si256((const __m256i *)((row) + i)); \
                acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v_, 16)), x0, acc); \
                acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v_, high)), x1, acc); }
            for (int i = 0; i < k16; i += 16) {
                if (!(i & 31)) {
                    PREFETCH_AHEAD(w0 + i); PREFETCH_AHEAD(w1 + i); PREFETCH_AHEAD(w2 + i); PREFETCH_AHEAD(w3 + i);
                }
                __m256 x0 = _mm256_loadu_ps(xs + i), x1 = _mm256_loadu_ps(xs + i + 8);
                DOGE_PAIRS(w0, s0) DOGE_PAIRS(w1, s1) DOGE_PAIRS(w2, s2) DOGE_PAIRS(w3, s3)
            }
#undef DOGE_PAIRS
            float t[4] = {hsum8(s0), hsum8(s1), hsum8(s2), hsum8(s3)};
            for (int i = k16; i < k; i++)
                for (int j = 0; j < 4; j++) t[j] += load1(w, dtype, base + (int64_t)j * k + i) * x[i];
            for (int j = 0; j < 4; j++) y[o + j] = t[j] + (b ? b[o + j] : 0.0f);
        }
    }
    for (; o < o1; o++) {
        int64_t base = (int64_t)o * k;
        for (int r0 = 0; r0 < n; r0 += 4) {
            int rb = n - r0 < 4 ? n - r0 : 4;
            __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int i = 0; i < kv; i += 8) {
                __m256 wv = load8(w, dtype, base + i);
                for (int r = 0; r < rb; r++)
                    s[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (int64_t)(r0 + r) * k + i), s[r]);
            }
            for (int r = 0; r < rb; r++) {
                float t = hsum8(s[r]);
                for (int i = kv; i < k; i++) t += load1(w, dtype, base + i) * x[(int64_t)(r0 + r) * k + i];
                y[(int64_t)(r0 + r) * out + o] = t + (b ? b[o] : 0.0f);
            }
        }
    }
#else
    for (; o < o1; o++) {
        int64_t base = (int64_t)o * k;
        for (int r = 0; r < n; r++) {
            float t = 0.0f;
            for (int i = 0; i < k; i++) t += load1(w, dtype, base + i) * x[(int64_t)r * k + i];
            y[(int64_t)r * out + o] = t + (b ? b[o] : 0.0f);
        }
    }
#endif
}

/* The product split among the team: each thread takes a contiguous run of output rows (a multiple of 4). */
static void product(const void *w, int dtype, const float *b, const float *x, float *y, int n, int k, int out) {
    int threads = omp_get_num_threads(), me = omp_get_thread_num();
    int blocks = (out + 3) / 4;
    int per = (blocks + threads - 1) / threads;
    int o0 = me * per * 4, o1 = (me + 1) * per * 4;
    if (o1 > out) o1 = out;
    if (o0 < o1) { /* one copy of the loops per dtype, so the inner loop has no branch on it */
        if (dtype == F32) product_rows(w, F32, b, x, y, n, k, out, o0, o1);
        else product_rows(w, BF16, b, x, y, n, k, out, o0, o1);
    }
#pragma omp barrier
}

/* q . row i of a (?, d) cache buffer in dtype */
static inline float dot_cached(const float *q, const void *buf, int dtype, int64_t base, int d) {
    int i = 0;
    float t = 0.0f;
#ifdef DOGE_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= d; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(buf, dtype, base + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(buf, dtype, base + i + 8), s1);
    }
    t = hsum8(_mm256_add_ps(s0, s1));
#endif
    for (; i < d; i++) t += q[i] * load1(buf, dtype, base + i);
    return t;
}

/* o += w * row of a cache buffer in dtype */
static inline void axpy_cached(float *o, float w, const void *buf, int dtype, int64_t base, int d) {
    int i = 0;
#ifdef DOGE_AVX2
    __m256 wv = _mm256_set1_ps(w);
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, load8(buf, dtype, base + i), _mm256_loadu_ps(o + i)));
#endif
    for (; i < d; i++) o[i] += w * load1(buf, dtype, base + i);
}

static inline void rms(const float *x, const float *w, float eps, float *y, int k) {
    float ss = 0.0f;
    for (int i = 0; i < k; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)k + eps);
    for (int i = 0; i < k; i++) y[i] = x[i] * r * w[i];
}

static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* tokens, positions (n): the fed token and its RoPE position per row; at (n): the cache position each row
 * writes; end: keys 0 .. end-1 are attended; valid: (rows, cap) bytes (1 = a real key) or NULL when every
 * key below end is real; logits (n, vocab) float32; work: float32 scratch of doge_work_floats(). */
int doge_decode_step(const Model *m, int n, int threads, const int64_t *tokens, const int64_t *positions,
                     const int64_t *at, int64_t end, const uint8_t *valid, float *logits, float *work) {
    const int H = m->hidden, I = m->inter, hq = m->hq, hkv = m->hkv, d = m->d, hb = m->hb, cap = m->cap;
    const int half = d / 2, q_out = hq * d, kv_out = hkv * d, qkv_n = q_out + 2 * kv_out, group = hq / hkv;
    float *h = work;                        /* (n, H) the residual stream */
    float *x = h + (int64_t)n * H;          /* (n, H) normed input of a block */
    float *qkv = x + (int64_t)n * H;        /* (n, qkv_n) */
    float *att = qkv + (int64_t)n * qkv_n;  /* (n, hq d) attention output */
    float *gu = att + (int64_t)n * q_out;   /* (n, 2 I) */
    float *mid = gu + (int64_t)n * 2 * I;   /* (n, I) */
    float *rope = mid + (int64_t)n * I;     /* (n, 2, d) cos then sin */
    float *bias = rope + (int64_t)n * 2 * d;/* (n, hb) */
    float *score = bias + (int64_t)n * hb;  /* (n, hq, end) */
    if (threads < 1) threads = 1;

#pragma omp parallel num_threads(threads)
    {
        PROFILE_START
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) {
            for (int i = 0; i < H; i++) h[(int64_t)r * H + i] = load1(m->embed, m->wdtype, tokens[r] * H + i);
            float *c = rope + (int64_t)r * 2 * d, *s = c + d;
            for (int j = 0; j < half; j++) {
                float f = (float)positions[r] * m->inv_freq[j];
                c[j] = c[j + half] = cosf(f) * m->rope_scaling;
                s[j] = s[j + half] = sinf(f) * m->rope_scaling;
            }
        }
        SECTION(S_EMBED);
        for (int l = 0; l < m->layers; l++) {
            const Layer *L = &m->layer[l];
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) rms(h + (int64_t)r * H, L->ln1, L->ln1_eps, x + (int64_t)r * H, H);
            SECTION(S_NORM1);
            product(L->qkv_w, m->wdtype, L->qkv_b, x, qkv, n, H, qkv_n);
            SECTION(S_QKV);
            /* q|k heads: norm, rotate; the dynamic-mask bias from v; write k, v, bias into the cache */
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) {
                float *row = qkv + (int64_t)r * qkv_n, *v = row + q_out + kv_out;
                const float *c = rope + (int64_t)r * 2 * d, *s = c + d;
                for (int head = 0; head < hq + hkv; head++) {
                    float *t = row + (int64_t)head * d, tmp[1024];
                    if (L->qk_norm) rms(t, L->qk_norm + (int64_t)head * d, L->qk_eps, t, d);
                    for (int j = 0; j < half; j++) {
                        tmp[j] = t[j] * c[j] - t[j + half] * s[j];
                        tmp[j + half] = t[j + half] * c[j + half] + t[j] * s[j + half];
                    }
                    memcpy(t, tmp, sizeof(float) * d);
                }
                for (int g = 0; g < hb; g++) {
                    float dt = dot_cached(v, L->dt_w, F32, (int64_t)g * kv_out, kv_out) + (L->dt_b ? L->dt_b[g] : 0.0f);
                    bias[(int64_t)r * hb + g] = expf(L->a[g] * softplus(dt));
                }
                for (int g = 0; g < hkv; g++) {
                    int64_t dst = (((int64_t)r * hkv + g) * cap + at[r]) * d;
                    for (int j = 0; j < d; j++) {
                        store1(L->keys, m->cdtype, dst + j, row[q_out + g * d + j]);
                        store1(L->values, m->cdtype, dst + j, v[g * d + j]);
                    }
                }
                for (int g = 0; g < hb; g++)
                    store1(L->biases, m->cdtype, ((int64_t)r * hb + g) * cap + at[r], bias[(int64_t)r * hb + g]);
            }
            SECTION(S_HEADS);
            /* attention of each (row, query head) over keys 0 .. end-1, read back from the cache */
#pragma omp for schedule(static) collapse(2)
            for (int r = 0; r < n; r++) {
                for (int qh = 0; qh < hq; qh++) {
                    int g = qh / group, bh = hb == hq ? qh : g;
                    const float *q = qkv + (int64_t)r * qkv_n + (int64_t)qh * d;
                    float *p = score + ((int64_t)r * hq + qh) * end, *o = att + (int64_t)r * q_out + (int64_t)qh * d;
                    int64_t kbase = ((int64_t)r * hkv + g) * cap, bbase = ((int64_t)r * hb + bh) * cap;
                    float top = -INFINITY;
                    for (int64_t j = 0; j < end; j++) {
                        if (valid && !valid[(int64_t)r * cap + j]) { p[j] = -INFINITY; continue; }
                        float dot = dot_cached(q, L->keys, m->cdtype, (kbase + j) * d, d);
                        p[j] = dot * m->scale + load1(L->biases, m->cdtype, bbase + j);
                        if (p[j] > top) top = p[j];
                    }
                    float sum = 0.0f;
                    for (int64_t j = 0; j < end; j++) {
                        p[j] = p[j] == -INFINITY ? 0.0f : expf(p[j] - top);
                        sum += p[j];
                    }
                    for (int i = 0; i < d; i++) o[i] = 0.0f;
                    for (int64_t j = 0; j < end; j++) {
                        float w = p[j] / sum;
                        if (w == 0.0f) continue;
                        axpy_cached(o, w, L->values, m->cdtype, (kbase + j) * d, d);
                    }
                }
            }
            SECTION(S_ATTN);
            product(L->o_w, m->wdtype, L->o_b, att, x, n, q_out, H);
            SECTION(S_O);
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) {
                float *hr = h + (int64_t)r * H, *xr = x + (int64_t)r * H;
                for (int i = 0; i < H; i++) hr[i] = L->res1[i] * hr[i] + xr[i];
                rms(hr, L->ln2, L->ln2_eps, xr, H);
            }
            SECTION(S_NORM2);
            product(L->gu_w, m->wdtype, L->gu_b, x, gu, n, H, 2 * I);
            SECTION(S_GU);
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) {
                const float *gate = gu + (int64_t)r * 2 * I, *up = gate + I;
                float *mr = mid + (int64_t)r * I;
                for (int i = 0; i < I; i++) mr[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
            }
            SECTION(S_SILU);
            product(L->down_w, m->wdtype, L->down_b, mid, x, n, I, H);
            SECTION(S_DOWN);
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) {
                float *hr = h + (int64_t)r * H, *xr = x + (int64_t)r * H;
                for (int i = 0; i < H; i++) hr[i] = L->res2[i] * hr[i] + xr[i];
            }
            SECTION(S_RESID);
        }
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) rms(h + (int64_t)r * H, m->norm, m->norm_eps, x + (int64_t)r * H, H);
        product(m->head_w, m->wdtype, m->head_b, x, logits, n, H, m->vocab);
        SECTION(S_HEAD);
    }
    return 0;
}

/* Floats of scratch doge_decode_step needs for n rows attending over up to `keys` positions. */
int64_t doge_work_floats(const Model *m, int n, int64_t keys) {
    int64_t per_row = 2 * (int64_t)m->hidden + (m->hq + 2 * m->hkv) * (int64_t)m->d + (int64_t)m->hq * m->d
                      + 3 * (int64_t)m->inter + 2 * (int64_t)m->d + m->hb + (int64_t)m->hq * keys;
    return per_row * n;
}

int doge_layer_size(void) { return (int)sizeof(Layer); }
int doge_model_size(void) { return (int)sizeof(Model); }
