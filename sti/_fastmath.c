/* STI element-wise kernels that benefit from vectorised libm (glibc's libmvec).
 * Built with -ffast-math so GCC calls the SIMD erff; results agree with the NumPy
 * fallback in sti/ops.py to within 3e-7 absolute (both are within float32 rounding
 * of the exact GELU), not bit for bit. Kernels whose fallback must be bit-identical
 * (dequantisation) live in a separate extension built without fast-math. The one exception here,
 * the float16 KV-cache write of attend_one, only converts with exact instructions or integer code
 * and forces its float32 roundings (see "float16 KV cache" below). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_parallel.h"

static void gelu_f32(float *x, Py_ssize_t n) {
#pragma omp simd
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

/* gelu_(buf): exact-erf GELU in place on a writable C-contiguous float32 buffer. */
static PyObject *py_gelu_(PyObject *self, PyObject *args) {
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "w*", &b)) return NULL;
    if (b.itemsize != 4 || b.len % 4 || !PyBuffer_IsContiguous(&b, 'C')) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_TypeError, "gelu_ needs a C-contiguous float32 buffer");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    gelu_f32((float *)b.buf, b.len / 4);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static void softmax_rows_f32(float *x, Py_ssize_t rows, Py_ssize_t n) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *row = x + r * n;
        float m = row[0];
        for (Py_ssize_t i = 1; i < n; i++) m = row[i] > m ? row[i] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (Py_ssize_t i = 0; i < n; i++) {
            float e = expf(row[i] - m);
            row[i] = e;
            sum += e;
        }
        float inv = 1.0f / sum;
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) row[i] *= inv;
    }
}

/* softmax_(buf, n): softmax in place over each run of n float32 values (the last axis). */
static PyObject *py_softmax_(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "w*n", &b, &n)) return NULL;
    if (b.itemsize != 4 || n <= 0 || b.len % (4 * n) || !PyBuffer_IsContiguous(&b, 'C')) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_TypeError, "softmax_ needs a C-contiguous float32 buffer whose size is a multiple of n");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    softmax_rows_f32((float *)b.buf, b.len / (4 * n), n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static void layer_norm_rows_f32(float *x, const float *w, const float *b, Py_ssize_t rows, Py_ssize_t n,
                                float eps) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *row = x + r * n;
        float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (Py_ssize_t i = 0; i < n; i++) sum += row[i];
        float mu = sum / (float)n;
#pragma omp simd reduction(+ : sq)
        for (Py_ssize_t i = 0; i < n; i++) {
            float d = row[i] - mu;
            sq += d * d;
        }
        float inv = 1.0f / sqrtf(sq / (float)n + eps);
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) row[i] = (row[i] - mu) * inv * w[i] + b[i];
    }
}

/* layer_norm_(buf, w, b, eps): LayerNorm in place over each run of len(w) float32 values. */
static PyObject *py_layer_norm_(PyObject *self, PyObject *args) {
    Py_buffer x, w, b;
    float eps;
    if (!PyArg_ParseTuple(args, "w*y*y*f", &x, &w, &b, &eps)) return NULL;
    Py_ssize_t n = w.len / 4;
    int ok = x.itemsize == 4 && n > 0 && w.len == b.len && w.len % 4 == 0 && x.len % (4 * n) == 0 &&
             PyBuffer_IsContiguous(&x, 'C') && PyBuffer_IsContiguous(&w, 'C') && PyBuffer_IsContiguous(&b, 'C');
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        layer_norm_rows_f32((float *)x.buf, (const float *)w.buf, (const float *)b.buf, x.len / (4 * n), n, eps);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&b);
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "layer_norm_ needs C-contiguous float32 x (rows of len(w)), w and b");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------- LLaMA decode step
 * Decode runs every layer on one token per sequence; in NumPy that is some forty small array
 * operations per layer, which cost more than the layer's matrix-vector products. These kernels
 * fuse them: rms_norm, the whole attention of one token (RoPE, KV-cache write, scores, softmax,
 * weighted values) and SiLU(gate) * up. Agreement with the NumPy path in sti/models/llama.py is to
 * float32 rounding (tests/models/test_llama.py); the float16 values written into an fp16 KV cache
 * are bit-identical. */

static void rms_norm_rows_f32(const float *x, const float *w, float *out, Py_ssize_t rows, Py_ssize_t n, float eps) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n, sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (Py_ssize_t i = 0; i < n; i++) sq += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(sq / (float)n + eps);
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) o[i] = xr[i] * inv * w[i];
    }
}

static int check_f32(const Py_buffer *b, Py_ssize_t floats, const char *what) {
    if (b->itemsize != 4 || b->len != 4 * floats || !PyBuffer_IsContiguous(b, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous float32 buffer of %zd values", what, floats);
        return -1;
    }
    return 0;
}

/* rms_norm(x, w, eps, out): out = x / sqrt(mean(x^2) + eps) * w over each row of len(w) values. */
static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    Py_buffer x, w, out;
    float eps;
    if (!PyArg_ParseTuple(args, "y*y*fw*", &x, &w, &eps, &out)) return NULL;
    Py_ssize_t n = w.len / 4, rows = n ? x.len / (4 * n) : 0;
    int ok = n > 0 && !check_f32(&w, n, "w") && !check_f32(&x, rows * n, "x") && !check_f32(&out, rows * n, "out");
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        rms_norm_rows_f32(x.buf, w.buf, out.buf, rows, n, eps);
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: w is empty");
    }
    PyBuffer_Release(&x), PyBuffer_Release(&w), PyBuffer_Release(&out);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* RoPE over the two halves of a head: out_i = x_i cos_i - x_{i+h} sin_i (i < h),
 * x_i cos_i + x_{i-h} sin_i (i >= h). */
static void rope_head(const float *x, const float *c, const float *s, Py_ssize_t hd, float *out) {
    Py_ssize_t h = hd / 2;
    for (Py_ssize_t i = 0; i < h; i++) {
        out[i] = x[i] * c[i] - x[i + h] * s[i];
        out[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
    }
}

/* ------------------------------------------------------------------------- float16 KV cache
 * An fp16 cache (llama.cpp's default KV type) holds IEEE binary16 bit patterns as uint16. Writes
 * round float32 to nearest even, as numpy's astype(np.float16) does, and must give the same bits:
 * the NumPy path of sti/models/llama.py is the reference. Where the compiler targets F16C the
 * hardware converts (exact IEEE conversions, unaffected by fast math); otherwise the integer
 * conversions below, which only move bits, so -ffast-math cannot change them either. Both agree with
 * numpy for every non-NaN value; a NaN stays a NaN (the integer path keeps numpy's payload bits, the
 * hardware also quiets a signalling NaN). */

static uint16_t f16_bits_portable(float x) {
    uint32_t f;
    memcpy(&f, &x, sizeof f);
    const uint16_t sign = (uint16_t)((f >> 16) & 0x8000u);
    const uint32_t mag = f & 0x7fffffffu;
    if (mag >= 0x7f800000u) { /* inf; a NaN keeps its top 10 payload bits and never becomes inf */
        if (mag == 0x7f800000u) return sign | 0x7c00u;
        const uint32_t m = (mag >> 13) & 0x3ffu;
        return sign | 0x7c00u | (m ? m : 1u);
    }
    if (mag >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520, half-way above 65504: overflows to inf */
    if (mag >= 0x38800000u) {                       /* >= 2^-14: a normal half */
        uint32_t r = mag - 0x38000000u;             /* exponent bias 127 -> 15 */
        r += 0x0fffu + ((r >> 13) & 1u);            /* round the 13 dropped bits to nearest even; a carry */
        return sign | (uint16_t)(r >> 13);          /* into the exponent is the correctly rounded result */
    }
    const uint32_t e = mag >> 23;
    if (e < 102) return sign; /* below 2^-25 (float32 subnormals included): rounds to a signed zero */
    /* a half subnormal: m 2^-24 with m = round(significand >> shift), ties to even (m = 1024 is 2^-14) */
    const uint32_t sig = (mag & 0x7fffffu) | 0x800000u, shift = 126 - e; /* 14 .. 24 */
    uint32_t m = sig >> shift;
    const uint32_t rest = sig & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (m & 1u))) m++;
    return sign | (uint16_t)m;
}

static inline float f32_from_f16_portable(uint16_t h) { /* exact; branches the compiler can if-convert */
    const uint32_t mag = h & 0x7fffu;
    uint32_t f = (mag << 13) + 0x38000000u; /* a normal half: exponent bias 15 -> 127 */
    if (mag >= 0x7c00u) f += 0x38000000u;   /* inf, NaN: exponent all ones, payload kept */
    if (mag < 0x0400u) {                    /* zero, subnormal: mag 2^-24, exact in float32 */
        const float sub = (float)mag * 0x1p-24f;
        memcpy(&f, &sub, sizeof f);
    }
    f |= (uint32_t)(h & 0x8000u) << 16;
    float x;
    memcpy(&x, &f, sizeof x);
    return x;
}

#if defined(__F16C__)
#include <immintrin.h>
#define F16_ROUND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define f16_bits(x) _cvtss_sh((x), F16_ROUND)
#define f32_from_f16(h) _cvtsh_ss(h)
#define load_f16x8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#if defined(__FMA__)
#define fmadd8(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#else
#define fmadd8(a, b, c) _mm256_add_ps(_mm256_mul_ps((a), (b)), (c))
#endif
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#define f16_bits(x) f16_bits_portable(x)
#define f32_from_f16(h) f32_from_f16_portable(h)
#endif

static void f16_from_f32_row(const float *x, uint16_t *h, Py_ssize_t n) {
    Py_ssize_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), F16_ROUND));
#endif
    for (; i < n; i++) h[i] = f16_bits(x[i]);
}

static void f32_from_f16_row(const uint16_t *h, float *x, Py_ssize_t n) {
    Py_ssize_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, load_f16x8(h + i));
#endif
    for (; i < n; i++) x[i] = f32_from_f16(h[i]);
}

/* q . k for a float32 query and a float16 key */
static inline float dot_f16(const float *q, const uint16_t *k, Py_ssize_t n) {
    Py_ssize_t i = 0;
    float d = 0.0f;
#if defined(__F16C__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(); /* two chains: hd 64 is 8 FMAs */
    for (; i + 16 <= n; i += 16) {
        acc0 = fmadd8(_mm256_loadu_ps(q + i), load_f16x8(k + i), acc0);
        acc1 = fmadd8(_mm256_loadu_ps(q + i + 8), load_f16x8(k + i + 8), acc1);
    }
    if (i + 8 <= n) acc0 = fmadd8(_mm256_loadu_ps(q + i), load_f16x8(k + i), acc0), i += 8;
    d = hsum8(_mm256_add_ps(acc0, acc1));
#endif
#pragma omp simd reduction(+ : d)
    for (Py_ssize_t r = i; r < n; r++) d += q[r] * f32_from_f16(k[r]);
    return d;
}

/* o += p v for a float16 value row */
static inline void axpy_f16(float *o, float p, const uint16_t *v, Py_ssize_t n) {
    Py_ssize_t i = 0;
#if defined(__F16C__)
    const __m256 pp = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, fmadd8(pp, load_f16x8(v + i), _mm256_loadu_ps(o + i)));
#endif
#pragma omp simd
    for (Py_ssize_t r = i; r < n; r++) o[r] += p * f32_from_f16(v[r]);
}

#if defined(__AVX512F__) && defined(__F16C__)
#define FM_AVX512 1
/* The query heads of one KV head against its float16 keys and values with AVX-512, for head sizes
 * of 16 N16 (a constant at each call, so the query and the context stay in registers). The keys
 * and values are converted to float32 once for all the group's query heads (the conversions, not
 * the products, bound this kernel: two per 16 values). The scores of 16 keys at a time: each
 * key's 16 lanes of partial products are summed across lanes by a transposing tree (45 shuffles
 * and adds for 16 keys, instead of 16 full reductions); the context adds p_t v_t into N16
 * registers. The sums run in another order than the AVX2 loops' (the last bits differ). */
static inline __m512 load_f16x16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* lane t: the sum of p[t]'s 16 lanes */
static inline __m512 hsum16x16(const __m512 *p) {
    __m512 q[8], r[4], s[2];
    for (int u = 0; u < 8; u++) /* 128-bit chunks 0, 1: key 2u; 2, 3: key 2u+1 */
        q[u] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * u], p[2 * u + 1], 0x44),
                             _mm512_shuffle_f32x4(p[2 * u], p[2 * u + 1], 0xEE));
    for (int u = 0; u < 4; u++) /* chunk c: key 4u + c */
        r[u] = _mm512_add_ps(_mm512_shuffle_f32x4(q[2 * u], q[2 * u + 1], 0x88),
                             _mm512_shuffle_f32x4(q[2 * u], q[2 * u + 1], 0xDD));
    for (int u = 0; u < 2; u++) /* chunk c, elements 0-1: key 8u + c; 2-3: key 8u + 4 + c */
        s[u] = _mm512_add_ps(_mm512_shuffle_ps(r[2 * u], r[2 * u + 1], 0x44),
                             _mm512_shuffle_ps(r[2 * u], r[2 * u + 1], 0xEE));
    /* chunk c, element e: key 4e + c */
    const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), f);
}

/* GH query heads (rotated, q[h] at qs + h hd) of one KV head against its n float16 keys and values
 * (rows of 16 N16 at kh, vh): each key and value row is converted once for all GH heads, in
 * registers (the conversion, ~3 cycles per 16 values here, bounds the kernel). scores: GH rows of
 * n floats; the contexts go to o + h hd. */
static inline __attribute__((always_inline)) void heads_f16_512(const int N16, const int GH, const float *qs,
                                                                 const uint16_t *kh, const uint16_t *vh,
                                                                 Py_ssize_t n, float scale, float *scores,
                                                                 float *o) {
    const Py_ssize_t hd = 16 * N16;
    __m512 q[4][8], acc[4][8], x[8];
    float inv[4];
    for (int h = 0; h < GH; h++)
        for (int i = 0; i < N16; i++) q[h][i] = _mm512_loadu_ps(qs + h * hd + 16 * i);
    Py_ssize_t t = 0;
    for (; t + 16 <= n; t += 16) {
        __m512 p[4][16];
        for (int u = 0; u < 16; u++) {
            for (int i = 0; i < N16; i++) x[i] = load_f16x16(kh + (t + u) * hd + 16 * i);
            for (int h = 0; h < GH; h++) {
                __m512 a = _mm512_mul_ps(q[h][0], x[0]);
                for (int i = 1; i < N16; i++) a = _mm512_fmadd_ps(q[h][i], x[i], a);
                p[h][u] = a;
            }
        }
        for (int h = 0; h < GH; h++)
            _mm512_storeu_ps(scores + h * n + t, _mm512_mul_ps(hsum16x16(p[h]), _mm512_set1_ps(scale)));
    }
    for (; t < n; t++) {
        for (int i = 0; i < N16; i++) x[i] = load_f16x16(kh + t * hd + 16 * i);
        for (int h = 0; h < GH; h++) {
            __m512 a = _mm512_mul_ps(q[h][0], x[0]);
            for (int i = 1; i < N16; i++) a = _mm512_fmadd_ps(q[h][i], x[i], a);
            scores[h * n + t] = _mm512_reduce_add_ps(a) * scale;
        }
    }
    for (int h = 0; h < GH; h++) {
        float *sc = scores + h * n, m = -FLT_MAX, sum = 0.0f;
        for (t = 0; t < n; t++) m = sc[t] > m ? sc[t] : m;
        for (t = 0; t < n; t++) {
            sc[t] = expf(sc[t] - m);
            sum += sc[t];
        }
        inv[h] = 1.0f / sum;
        for (int i = 0; i < N16; i++) acc[h][i] = _mm512_setzero_ps();
    }
    for (t = 0; t < n; t++) {
        for (int i = 0; i < N16; i++) x[i] = load_f16x16(vh + t * hd + 16 * i);
        for (int h = 0; h < GH; h++) {
            const __m512 pb = _mm512_set1_ps(scores[h * n + t] * inv[h]);
            for (int i = 0; i < N16; i++) acc[h][i] = _mm512_fmadd_ps(pb, x[i], acc[h][i]);
        }
    }
    for (int h = 0; h < GH; h++)
        for (int i = 0; i < N16; i++) _mm512_storeu_ps(o + h * hd + 16 * i, acc[h][i]);
}

/* The g query heads from row + h0 hd against keys and values first .. end-1 of float16 caches kh,
 * vh, up to 16 / N16 heads at a time (their queries and contexts take 32 registers); q: room for
 * g rotated queries, scores for g rows of end - first. */
static void group_f16_512(const int N16, const float *row, Py_ssize_t h0, Py_ssize_t g, const float *c,
                          const float *s, const uint16_t *kh, const uint16_t *vh, Py_ssize_t first, Py_ssize_t end,
                          float scale, float *scores, float *q, float *out) {
    const Py_ssize_t hd = 16 * N16, n = end - first, most = 16 / N16;
    for (Py_ssize_t h = 0; h < g; h++) rope_head(row + (h0 + h) * hd, c, s, hd, q + h * hd);
    kh += first * hd, vh += first * hd;
    for (Py_ssize_t h = 0; h < g; h += most) {
        const int GH = (int)(g - h < most ? g - h : most);
        const float *qs = q + h * hd;
        float *o = out + (h0 + h) * hd;
        if (N16 == 4) {
            switch (GH) {
            case 1: heads_f16_512(4, 1, qs, kh, vh, n, scale, scores, o); break;
            case 2: heads_f16_512(4, 2, qs, kh, vh, n, scale, scores, o); break;
            case 3: heads_f16_512(4, 3, qs, kh, vh, n, scale, scores, o); break;
            default: heads_f16_512(4, 4, qs, kh, vh, n, scale, scores, o); break;
            }
        } else {
            if (GH == 1) heads_f16_512(8, 1, qs, kh, vh, n, scale, scores, o);
            else heads_f16_512(8, 2, qs, kh, vh, n, scale, scores, o);
        }
    }
}
#else
#define FM_AVX512 0
#endif

/* RoPE of a key bound for an fp16 cache, rounded exactly as the NumPy reference rounds it:
 * x*cos + rotate_half(x)*sin with each product and the sum rounded to float32. Fast math would fuse
 * a product into an FMA (one rounding fewer), and a key one float32 ulp off can round to a different
 * float16; the volatile temporaries force every rounding. hd values per KV head and token: cheap. */
static void rope_head_rounded(const float *x, const float *c, const float *s, Py_ssize_t hd, float *out) {
    Py_ssize_t h = hd / 2;
    for (Py_ssize_t i = 0; i < h; i++) {
        volatile float a = x[i] * c[i], b = x[i + h] * s[i], a2 = x[i + h] * c[i + h], b2 = x[i] * s[i + h];
        out[i] = a - b;
        out[i + h] = a2 + b2;
    }
}

typedef struct {
    Py_ssize_t B, n_q, n_kv, hd, cap, start, cos_rows;
    const float *qkv, *cos, *sin;
    const int64_t *pad; /* (B,) or NULL */
    void *k, *v;        /* caches: float32, or float16 bits (uint16) */
    float *out;
    int f16;
    float *scratch; /* per slot: attend_scratch floats */
} Attend;

/* One task: sequence b's KV head j. Its key (rotated) and value go into the cache, then each of
 * its query heads attends over slots pad[b] .. start. f16 is a constant in each caller, so each
 * cache type gets its own code and the float32 one is the loop it always was. */
static inline __attribute__((always_inline)) void attend_kv_head(const Attend *a, Py_ssize_t b, Py_ssize_t j,
                                                                 float *scores, const int f16) {
    const Py_ssize_t hd = a->hd, g = a->n_q / a->n_kv, end = a->start + 1, width = (a->n_q + 2 * a->n_kv) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *q = scores + end, *kr = q + hd; /* kr: the rotated key before it is rounded to float16 */
    const float *row = a->qkv + b * width;
    const float *c = a->cos + (a->cos_rows > 1 ? b : 0) * hd, *s = a->sin + (a->cos_rows > 1 ? b : 0) * hd;
    Py_ssize_t first = a->pad ? (Py_ssize_t)a->pad[b] : 0;
    if (first < 0) first = 0;
    if (first > a->start) first = a->start;
    const Py_ssize_t base = ((b * a->n_kv + j) * a->cap) * hd;
    float *kc = NULL, *vc = NULL;
    uint16_t *kh = NULL, *vh = NULL;
    if (f16) {
        kh = (uint16_t *)a->k + base, vh = (uint16_t *)a->v + base;
        rope_head_rounded(row + (a->n_q + j) * hd, c, s, hd, kr);
        f16_from_f32_row(kr, kh + a->start * hd, hd);
        f16_from_f32_row(row + (a->n_q + a->n_kv + j) * hd, vh + a->start * hd, hd);
    } else {
        kc = (float *)a->k + base, vc = (float *)a->v + base;
        rope_head(row + (a->n_q + j) * hd, c, s, hd, kc + a->start * hd);
        memcpy(vc + a->start * hd, row + (a->n_q + a->n_kv + j) * hd, (size_t)hd * sizeof(float));
    }
#if FM_AVX512
    if (f16 && (hd == 64 || hd == 128)) { /* after kr: g rotated queries, then g rows of scores */
        float *qs = kr + hd;
        group_f16_512(hd / 16, row, j * g, g, c, s, kh, vh, first, end, scale, qs + g * hd, qs,
                      a->out + b * a->n_q * hd);
        return;
    }
#endif
    for (Py_ssize_t h = j * g; h < (j + 1) * g; h++) {
        rope_head(row + h * hd, c, s, hd, q);
        float m = -FLT_MAX, sum = 0.0f; /* finite: this file is built with fast math */
        for (Py_ssize_t t = first; t < end; t++) {
            float d = 0.0f;
            if (f16) {
                d = dot_f16(q, kh + t * hd, hd);
            } else {
                const float *kt = kc + t * hd;
#pragma omp simd reduction(+ : d)
                for (Py_ssize_t i = 0; i < hd; i++) d += q[i] * kt[i];
            }
            scores[t] = d * scale;
            m = scores[t] > m ? scores[t] : m;
        }
        for (Py_ssize_t t = first; t < end; t++) {
            scores[t] = expf(scores[t] - m);
            sum += scores[t];
        }
        float inv = 1.0f / sum, *o = a->out + b * a->n_q * hd + h * hd;
        for (Py_ssize_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (Py_ssize_t t = first; t < end; t++) {
            const float p = scores[t] * inv;
            if (f16) {
                axpy_f16(o, p, vh + t * hd, hd);
            } else {
                const float *vt = vc + t * hd;
#pragma omp simd
                for (Py_ssize_t i = 0; i < hd; i++) o[i] += p * vt[i];
            }
        }
    }
}

/* floats of a task's scratch: scores, q, the rotated key; the AVX-512 path, after them: the rotated
 * queries of the group's g heads, then their g rows of scores; 64-byte multiples */
static Py_ssize_t attend_scratch(const Attend *a) {
    const Py_ssize_t end = a->start + 1, g = a->n_q / a->n_kv, n = (end + 2 * a->hd) * (1 + g);
    return (n + 15) / 16 * 16;
}

static void attend_task(void *ctx, Py_ssize_t task, int slot) {
    const Attend *a = ctx;
    float *scores = a->scratch + slot * attend_scratch(a);
    if (a->f16) attend_kv_head(a, task / a->n_kv, task % a->n_kv, scores, 1);
    else attend_kv_head(a, task / a->n_kv, task % a->n_kv, scores, 0);
}

/* sti._lowbit's thread pool (_parallel.h), imported on first use; NULL where it is not built. */
static const StiParallel *parallel(void) {
    static int tried = 0;
    static const StiParallel *api = NULL;
    if (!tried) {
        tried = 1;
        api = PyCapsule_Import(STI_PARALLEL_CAPSULE, 0);
        if (!api || api->version != STI_PARALLEL_VERSION) api = NULL, PyErr_Clear();
    }
    return api;
}

/* Every (sequence, KV head) task, on up to `threads` threads of the pool (one without it). The
 * tasks are independent and each computes the same thing on any thread. Needs no GIL. */
static int attend_one(Attend *a, int threads, const StiParallel *pool) {
    const Py_ssize_t ntask = a->B * a->n_kv;
    if (!pool || ntask < 2) threads = 1;
    a->scratch = malloc((size_t)(threads * attend_scratch(a)) * sizeof(float));
    if (!a->scratch) return -1;
    int err = 0;
    if (threads > 1) {
        err = pool->parallel_for(attend_task, a, ntask, threads);
    } else {
        for (Py_ssize_t t = 0; t < ntask; t++) attend_task(a, t, 0);
    }
    free(a->scratch);
    return err;
}

static int check_kv(const Py_buffer *b, Py_ssize_t values, int elsize, const char *what) {
    if (b->itemsize != elsize || b->len != elsize * values || !PyBuffer_IsContiguous(b, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous float%d buffer of %zd values", what, 8 * elsize,
                     values);
        return -1;
    }
    return 0;
}

/* attend_one(qkv, k_cache, v_cache, start, cos, sin, pad, n_q, out): one token per sequence.
 * qkv (B, (n_q + 2 n_kv) hd): its q, k, v before RoPE; k_cache, v_cache (B, n_kv, cap, hd): the
 * rotated k and v are written at slot `start`, then each query head attends over slots
 * pad[b] .. start of its KV head; cos, sin (1 or B, hd); pad (B,) int64 or None; out (B, n_q hd).
 * kv_elsize (default 4): the caches' element size, 4 for float32 or 2 for float16 (both caches alike).
 * threads (default 1): threads of sti._lowbit's pool (one where that module is not built); the
 * result does not depend on it. */
static PyObject *py_attend_one(PyObject *self, PyObject *args) {
    Py_buffer qkv, k, v, cs, sn, out, pad = {0};
    PyObject *pad_obj;
    Py_ssize_t start, n_q, B, n_kv, cap, hd;
    int elsize = 4, threads = 1;
    if (!PyArg_ParseTuple(args, "y*w*w*ny*y*Onw*(nnnn)|ii", &qkv, &k, &v, &start, &cs, &sn, &pad_obj, &n_q, &out, &B,
                          &n_kv, &cap, &hd, &elsize, &threads))
        return NULL;
    int has_pad = pad_obj != Py_None, ok = 0;
    if (has_pad && PyObject_GetBuffer(pad_obj, &pad, PyBUF_C_CONTIGUOUS) < 0) goto done;
    Py_ssize_t cos_rows = hd > 0 ? cs.len / (4 * hd) : 0;
    if (B < 1 || n_kv < 1 || n_q % n_kv || hd < 2 || hd % 2 || start < 0 || start >= cap ||
        (cos_rows != 1 && cos_rows != B)) {
        PyErr_SetString(PyExc_ValueError, "attend_one: inconsistent shapes");
        goto done;
    }
    if (elsize != 4 && elsize != 2) {
        PyErr_SetString(PyExc_ValueError, "attend_one: kv_elsize must be 4 (float32 caches) or 2 (float16 caches)");
        goto done;
    }
    if (check_f32(&qkv, B * (n_q + 2 * n_kv) * hd, "qkv") || check_kv(&k, B * n_kv * cap * hd, elsize, "k_cache") ||
        check_kv(&v, B * n_kv * cap * hd, elsize, "v_cache") || check_f32(&cs, cos_rows * hd, "cos") ||
        check_f32(&sn, cos_rows * hd, "sin") || check_f32(&out, B * n_q * hd, "out"))
        goto done;
    if (has_pad && (pad.itemsize != 8 || pad.len != 8 * B)) {
        PyErr_SetString(PyExc_ValueError, "attend_one: pad must be B int64 values");
        goto done;
    }
    Attend a = {B, n_q, n_kv, hd, cap, start, cos_rows, qkv.buf, cs.buf, sn.buf, has_pad ? pad.buf : NULL,
                k.buf, v.buf, out.buf, elsize == 2, NULL};
    const StiParallel *pool = threads > 1 ? parallel() : NULL;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = attend_one(&a, threads, pool);
    Py_END_ALLOW_THREADS
    if (err) PyErr_NoMemory();
    else ok = 1;
done:
    PyBuffer_Release(&qkv), PyBuffer_Release(&k), PyBuffer_Release(&v), PyBuffer_Release(&cs);
    PyBuffer_Release(&sn), PyBuffer_Release(&out);
    if (has_pad && pad.obj) PyBuffer_Release(&pad);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* f16_convert(src, dst, portable): float32 -> float16 bits (src itemsize 4, dst 2) or back (2 -> 4), n
 * values, with the conversions the fp16 KV cache uses (F16C where built) or, portable=1, with the
 * integer conversions a build without F16C uses. For tests: numpy is the reference for both. */
static PyObject *py_f16_convert(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int portable;
    if (!PyArg_ParseTuple(args, "y*w*p", &src, &dst, &portable)) return NULL;
    Py_ssize_t n = src.itemsize ? src.len / src.itemsize : 0;
    int down = src.itemsize == 4 && dst.itemsize == 2, up = src.itemsize == 2 && dst.itemsize == 4;
    int ok = (down || up) && dst.len == n * dst.itemsize && PyBuffer_IsContiguous(&src, 'C') &&
             PyBuffer_IsContiguous(&dst, 'C');
    if (ok) {
        const float *f = src.buf;
        const uint16_t *h = src.buf;
        Py_BEGIN_ALLOW_THREADS
        if (down && portable)
            for (Py_ssize_t i = 0; i < n; i++) ((uint16_t *)dst.buf)[i] = f16_bits_portable(f[i]);
        else if (down)
            f16_from_f32_row(f, dst.buf, n);
        else if (portable)
            for (Py_ssize_t i = 0; i < n; i++) ((float *)dst.buf)[i] = f32_from_f16_portable(h[i]);
        else
            f32_from_f16_row(h, dst.buf, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src), PyBuffer_Release(&dst);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "f16_convert: float32 -> uint16/float16 or back, contiguous, same length");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* silu_mul(gate_up, out): out = silu(gate) * up for rows [gate (n) | up (n)] of gate_up, n = len(out row). */
static PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    Py_buffer gu, out;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*w*n", &gu, &out, &n)) return NULL;
    Py_ssize_t rows = n > 0 ? out.len / (4 * n) : 0;
    int ok = n > 0 && !check_f32(&out, rows * n, "out") && !check_f32(&gu, 2 * rows * n, "gate_up");
    if (ok) {
        const float *g = gu.buf;
        float *o = out.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            const float *gr = g + 2 * r * n, *ur = gr + n;
            float *orow = o + r * n;
#pragma omp simd
            for (Py_ssize_t i = 0; i < n; i++) orow[i] = gr[i] / (1.0f + expf(-gr[i])) * ur[i];
        }
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "silu_mul: n must be positive");
    }
    PyBuffer_Release(&gu), PyBuffer_Release(&out);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"layer_norm_", py_layer_norm_, METH_VARARGS, "In-place LayerNorm over rows of len(w) float32 values."},
    {"gelu_", py_gelu_, METH_VARARGS, "In-place exact GELU on a float32 buffer."},
    {"softmax_", py_softmax_, METH_VARARGS, "In-place softmax over runs of n float32 values."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(x, w, eps, out): RMSNorm over rows of len(w) values."},
    {"attend_one", py_attend_one, METH_VARARGS,
     "attend_one(qkv, k_cache, v_cache, start, cos, sin, pad, n_q, out, (B, n_kv, cap, hd)[, kv_elsize[, threads]]): "
     "decode attention over float32 (kv_elsize 4) or float16 (2) caches, on up to `threads` threads of sti._lowbit's "
     "pool."},
    {"f16_convert", py_f16_convert, METH_VARARGS,
     "f16_convert(src, dst, portable): float32 <-> float16 as the fp16 KV cache converts (tests)."},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(gate_up, out, n): out = silu(gate) * up."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmath(void) {
    PyObject *m = PyModule_Create(&module);
#if defined(__F16C__)
    const int f16c = 1;
#else
    const int f16c = 0;
#endif
    /* whether the fp16 KV cache converts with F16C instructions (1) or the portable integer code (0) */
    if (m && PyModule_AddIntConstant(m, "F16C", f16c) < 0) Py_CLEAR(m);
    return m;
}
