/* STI low-bit matrix-vector kernels (sti._lowbit): Y = X @ W.T read straight from packed weights.
 *
 * Decode multiplies every weight matrix by one activation vector (or a small batch of them), so
 * its cost is reading the weights. These kernels read the packed low-bit bytes once and turn them
 * into float32 in registers; no float32 copy of W is ever written. Weight layouts, W (rows, cols)
 * row-major:
 *
 *   ggml-q4_1  rows * cols/32 blocks of 20 bytes: f16 d, f16 m, 16 bytes qs. Element i of a block
 *              is d * q_i + m with q_i = qs[i] & 15 for i < 16 and qs[i - 16] >> 4 for i >= 16
 *              (low nibbles are elements 0..15, high nibbles 16..31).
 *   ggml-q8_0  blocks of 34 bytes: f16 d, 32 int8 q; element i is d * q_i.
 *   sti-q1     (sti/quant.py) codes of k in {2,3,4,5,6,8} bits, 8 codes per k bytes, code i of a
 *              run of 8 in bits k*i .. k*i+k-1 of the little-endian 8k-bit word; codes run row-major
 *              over (rows, pc), pc = ng * G, ng = ceil(cols / G) groups of G columns (G a multiple
 *              of 8; the padding columns of a row's last group are ignored). float32 scale and
 *              offset per group: w = code * scale + offset. Outliers (uint32 flat index, float32
 *              value) replace the quantized weight at their position.
 *
 * Every row is a sequence of segments (a GGML block, an sti-q1 group) sharing one affine map
 * w = a * q + c, so the fused kernels factor it out of the segment:
 *
 *     y[b, r] = sum_s  a_s * (sum_{i in s} q_i x[b, i])  +  c_s * (sum_{i in s} x[b, i])
 *
 * GGML kinds: x is rounded to int16 per block of 32 (scale max|x| / 32767: a relative error of
 * 1.5e-5 of the block's largest |x|, 80 times below the float32 weights' own f16 scale rounding),
 * so the block sum of q_i x_i is an exact integer dot product (vpmaddwd: 32 products in one
 * AVX-512 instruction, where the float path needs two widenings, two conversions and two FMAs),
 * scaled by a * d16; c_s meets the exact float sum of x. A block's weights are widened once for
 * up to 4 vectors of a batch.
 *
 * sti-q1: the inner loop is "integer code -> float, one FMA with x"; the sums of x over each
 * segment are computed once per call and shared by every row. Outliers are applied afterwards as
 * y[b, r] += (value - quantized weight) * x[b, c]. For a batch (B > 1) a tile of 4 rows is first
 * dequantized exactly (as `dequant` does) into an L1-resident buffer and a register-blocked
 * 4 x 3 micro-kernel multiplies it with the batch, so each weight is decoded once per call
 * whatever B is.
 *
 * The results equal the NumPy references (dequantize-then-matmul for sti-q1, the same int8 blocks
 * for GGML) up to float32 summation order (not bitwise: no two BLAS builds agree bitwise either);
 * sti/lowbit.py states the bound the tests hold them to. `dequant` (ggml kinds) is bit-identical to the gguf package's NumPy dequantizer:
 * d * q then + m as two float32 roundings. That is why this file is compiled with
 * -ffp-contract=off: the compiler must not fuse that multiply and add, while the FMAs wanted in
 * the dot products are written explicitly (_mm256_fmadd_ps, _mm512_fmadd_ps).
 *
 * qmm (sti-q1, a batch of vectors): x rounded to int8 per vector and segment, exact integer
 * products by AVX-512 VNNI with the batch across the lanes; see "int8 products" below.
 *
 * Paths: AVX2 + FMA + F16C intrinsics (any x86-64 from 2013 on), AVX-512 for the batch-1 row
 * dots where the compiler targets it, else portable C. Rows are split across `threads` threads of
 * a small pool built for shared machines (see "thread pool"); whether 2 threads pay off for a
 * shape is measured by sti.lowbit.choose, not assumed. The GIL is released while computing. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "_parallel.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LB_AVX2 1
#include <immintrin.h>
#else
#define LB_AVX2 0
#endif
/* AVX-512 (F + BW): the GGML rows and the sti-q1 B = 1 row dots, where it halves the instructions
 * per weight; elsewhere the AVX2 code serves. */
#if LB_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__)
#define LB_AVX512 1
#else
#define LB_AVX512 0
#endif
/* AVX-512 VNNI: vpdpbusd (64 unsigned-byte x signed-byte products summed into 16 int32 lanes) for
 * the int8 products (qmm); elsewhere they run as portable C with the same integer sums. */
#if LB_AVX512 && defined(__AVX512VNNI__)
#define LB_VNNI 1
#else
#define LB_VNNI 0
#endif
#if !defined(_WIN32)
#define LB_THREADS 1 /* the pthread pool below; elsewhere everything runs on the calling thread */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#else
#define LB_THREADS 0
#endif

#define LB_SIMD (LB_AVX512 ? "avx512+avx2+fma+f16c" : LB_AVX2 ? "avx2+fma+f16c" : "portable-c")
/* Bumped whenever a kernel's speed or arithmetic changes, so that kernel choices measured with an
 * older build are measured again (sti.lowbit.machine_profile compares it). 2: GGML kinds multiply
 * int16-rounded activations. 3: dequantize + BLAS on N threads splits the BLAS product too (sti.blas).
 * 4: sti-q1 batches may take the int8 products (qmm). 5: qmm stores its tiles by gathers, prefetches
 * the next tile's rows and unpacks GGML rows without divisions (a batch-16 decode step's products
 * 1.3x faster). 6: the transposed int8 product (qmmt) adds outliers inside its tiles and transposes
 * x and the code quads in registers (MiniLM's down projection, 32 tokens: 254 -> 200 us at 4 bits,
 * 330 -> 226 at 8). 7: qmm stores its tiles by register transposes, not gathers; with VBMI it
 * copies 8-bit rows into its tile too; qmmt takes its outliers' codes from the unpacked rows.
 * 8: qmmt prepares its code words and activations on the product's threads (MiniLM's down
 * projection on 2 threads, 4 bits: 250 -> 154 us at 32 tokens, ~700 -> 470 us at 128). */
#define KERNEL_REVISION 8

enum { K_Q41 = 0, K_Q80 = 1, K_STI = 2 };
#define QK 32            /* elements per GGML block */
#define Q41_BYTES 20     /* f16 d, f16 m, 16 bytes of nibbles */
#define Q80_BYTES 34     /* f16 d, 32 int8 */
#define RT 4             /* rows per dequantized tile (batched path) */

typedef struct {
    int kind;
    Py_ssize_t rows, cols;
    const uint8_t *w;     /* GGML blocks, or sti-q1 codes */
    Py_ssize_t row_bytes; /* bytes of one row of w */
    Py_ssize_t w_len;     /* bytes of w (reads never go past it) */
    Py_ssize_t seg;       /* columns per segment: 32, or G */
    Py_ssize_t nseg;      /* segments per row */
    Py_ssize_t pc;        /* nseg * seg: the padded row length */
    int bits;             /* sti-q1 only from here on */
    const float *scale, *offset; /* (rows, nseg) */
    const uint32_t *oidx; /* outliers: flat indices into (rows, cols) ... */
    const float *oval;    /* ... and their exact values */
    Py_ssize_t nout;
    /* GGML kinds put together from tiles of other matrices (_lowbit.tiled), else band_base is
     * NULL and P is 1: rows band_start[k] .. band_start[k+1]-1 form band k, and row i of band k is
     * P tiles of nseg / P blocks, tile p at band_base[k * P + p] + i * tile_bytes */
    const uint8_t *const *band_base;
    const Py_ssize_t *band_start;
    Py_ssize_t nband, P, tile_bytes;
} Weights;

#define MAX_TILES 64 /* column tiles per row of a tiled matrix */

typedef struct {
    Py_ssize_t B;
    float *x;   /* (B, pc), zero beyond cols */
    float *xs;  /* (B, nseg): sum of x over each segment */
    int16_t *q16; /* GGML kinds: (B, pc) x rounded to int16 per block of 32 ... */
    float *dxs;   /* ... (B, nseg, 2): that block's scale d16 (x ~ d16 * q16) and its exact sum xs */
    /* qmm (int8 activations, see "int8 products"): x rounded to int8 per (vector, segment), stored
     * for vpdpbusd with the batch across lanes: xv[(k/4 * nv + v) * 64 + 4 * lane + k%4] holds
     * vector 16 v + lane, column k; dxv/xsv[(s * nv + v) * 16 + lane]: its scale and the sum of its rounded x */
    int8_t *xv;
    float *dxv, *xsv;
    Py_ssize_t nv;  /* vectors of 16 lanes: ceil(B / 16) */
    float *xt;      /* outliers: x transposed, xt[k * nv * 16 + b] (exact, not rounded) ... */
    Py_ssize_t *orow; /* ... and each row's first outlier (rows + 1), or NULL: apply_outliers */
} Acts;

/* The transposed int8 product's activations and code words (see "int8 products, transposed"). */
#define TKB 32 /* input rows per activation block; an item's rows start a block */

struct TActs {
    Py_ssize_t N, NP, NQ, NK, H, ng, G, B, nv; /* inputs (padded to TKB; quads; blocks), outputs, groups */
    int8_t *xv;    /* [g][iq][v][64]: q_g, four inputs of 16 vectors per 64 bytes */
    float *dz;     /* [g][k][v][16] */
    float *ox;     /* [g][v][16]: sum_i x offset, vector 16 v + lane */
    uint32_t *w4;  /* [iq][H]: column j's codes of inputs 4 iq .. 4 iq + 3, one byte each */
    /* x, exact: xl[p * nv * 16 + b] (AVX-512: the batch across lanes), else xp[b * NP + p] */
    const float *xl, *xp;
    /* outliers by output column: column j's are ocol[j] .. ocol[j + 1] - 1, each its padded input
     * row op[o] and exact - quantized weight od[o] */
    Py_ssize_t *ocol, *op;
    float *od;
    void *buf;     /* the one allocation behind the arrays above */
};

/* One spare scratch block, reused by the next transposed product: its arrays are ~0.5 MB for an
 * encoder chunk, and a fresh allocation of that size is a new mapping whose page faults cost more
 * than the product. A block starts with its capacity; jobs may end on any thread (atomic swap). */
static _Atomic(void *) spare_block;

static void *block_get(size_t bytes) {
    void *b = atomic_exchange(&spare_block, NULL);
    if (b && *(size_t *)b >= bytes) return (uint8_t *)b + 64;
    free(b);
    b = aligned_alloc(64, ((bytes + 64) + 63) & ~(size_t)63);
    if (!b) return NULL;
    *(size_t *)b = bytes;
    return (uint8_t *)b + 64;
}

static void block_put(void *data) {
    if (data) free(atomic_exchange(&spare_block, (uint8_t *)data - 64));
}

/* ------------------------------------------------------------------------- small helpers */

static inline float half_to_float(uint16_t h) {
#if LB_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u, bits;
    if (e == 31u) bits = sign | 0x7f800000u | (m << 13); /* inf, nan */
    else if (e) bits = sign | ((e + 112u) << 23) | (m << 13);
    else if (!m) bits = sign;
    else { /* subnormal: normalise */
        e = 113u;
        while (!(m & 1024u)) m <<= 1, e--;
        bits = sign | (e << 23) | ((m & 1023u) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

#if LB_AVX512
/* The 4 x 4 matrix of 128-bit blocks of (v0, v1, v2, v3) transposed: block L of vk becomes
 * block k of vL. */
static inline void transpose_blocks(__m512 *v0, __m512 *v1, __m512 *v2, __m512 *v3) {
    const __m512 e0 = _mm512_shuffle_f32x4(*v0, *v1, 0x44), e1 = _mm512_shuffle_f32x4(*v0, *v1, 0xEE);
    const __m512 e2 = _mm512_shuffle_f32x4(*v2, *v3, 0x44), e3 = _mm512_shuffle_f32x4(*v2, *v3, 0xEE);
    *v0 = _mm512_shuffle_f32x4(e0, e2, 0x88), *v1 = _mm512_shuffle_f32x4(e0, e2, 0xDD);
    *v2 = _mm512_shuffle_f32x4(e1, e3, 0x88), *v3 = _mm512_shuffle_f32x4(e1, e3, 0xDD);
}

/* r[i][j] -> r[j][i] for a 16 x 16 float tile in registers: pairs, then quads within 128-bit
 * blocks (unpack), then the blocks themselves. */
static inline void transpose16(__m512 *r) {
    __m512 a[16], b[16];
    for (int k = 0; k < 8; k++)
        a[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]), a[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    for (int k = 0; k < 4; k++)
        for (int h = 0; h < 2; h++) {
            const __m512d x = _mm512_castps_pd(a[4 * k + h]), y = _mm512_castps_pd(a[4 * k + h + 2]);
            b[4 * k + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
            b[4 * k + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
        }
    /* b[4 k + m], block L: column 4 L + m of rows 4 k .. 4 k + 3 */
    for (int m = 0; m < 4; m++) transpose_blocks(&b[m], &b[4 + m], &b[8 + m], &b[12 + m]);
    for (int i = 0; i < 16; i++) r[i] = b[i];
}
#endif

/* One sti-q1 code: row r, padded column c. Reads only the bytes that hold it. */
static inline unsigned sti_code(const Weights *W, Py_ssize_t r, Py_ssize_t c) {
    Py_ssize_t bit = (r * W->pc + c) * W->bits;
    const uint8_t *p = W->w + (bit >> 3);
    unsigned sh = (unsigned)(bit & 7), v = p[0];
    if (sh + (unsigned)W->bits > 8) v |= (unsigned)p[1] << 8;
    return (v >> sh) & ((1u << W->bits) - 1u);
}

#if LB_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sti-q1 unpacking. Runs of 8 codes are k bytes long, so two consecutive runs (16 codes) lie in
 * one 16-byte load; it is broadcast to both 128-bit lanes, and one vpshufb per run moves to dword
 * lane i the two bytes that hold code i (bits k*i .. k*i+k-1 span at most two bytes); a variable
 * shift by (k*i) % 8 and a mask leave the code. 5 instructions per 8 codes, for every k. */
static __m256i sti_ctl[9][2]; /* [k][run]: vpshufb controls */
static __m256i sti_shift[9];  /* [k]: (k*i) % 8 per lane */
#if LB_AVX512
static __m512i sti_ctl512[9], sti_shift512[9]; /* the two runs of a window at once */
#endif

#if LB_AVX512 && defined(__AVX512VBMI__)
static __m512i u8_perm[9], u8_shift[9]; /* [k]: unpack_row_u8's vpermb and vpmultishiftqb controls */
#endif

static void init_sti_tables(void) {
    static const int ks[] = {2, 3, 4, 5, 6, 8};
    for (int t = 0; t < 6; t++) {
        int k = ks[t];
        for (int run = 0; run < 2; run++) {
            int8_t ctl[32];
            for (int i = 0; i < 8; i++) {
                int byte = run * k + (k * i) / 8; /* first byte of code i in the 16-byte window */
                for (int j = 0; j < 4; j++) {
                    int src = byte + j;
                    /* bytes 2 and 3 of the dword are never needed; byte 1 only when the code
                     * crosses a byte boundary, and then it is always inside the window */
                    ctl[4 * i + j] = (int8_t)(j < 2 && src < 16 ? src : 0x80);
                }
            }
            sti_ctl[k][run] = _mm256_loadu_si256((const __m256i *)ctl);
        }
        sti_shift[k] = _mm256_setr_epi32(0, k % 8, (2 * k) % 8, (3 * k) % 8, (4 * k) % 8, (5 * k) % 8,
                                         (6 * k) % 8, (7 * k) % 8);
#if LB_AVX512
        /* 16 lanes: run 0 in lanes 0..7, run 1 in 8..15; each run starts on a byte, so the shifts repeat */
        sti_ctl512[k] = _mm512_inserti64x4(_mm512_castsi256_si512(sti_ctl[k][0]), sti_ctl[k][1], 1);
        sti_shift512[k] = _mm512_inserti64x4(_mm512_castsi256_si512(sti_shift[k]), sti_shift[k], 1);
#endif
#if LB_AVX512 && defined(__AVX512VBMI__)
        uint8_t perm[64], shift[64]; /* byte b of qword j: byte k*j + b of the window; code b at bit k*b */
        for (int j = 0; j < 8; j++)
            for (int b = 0; b < 8; b++) perm[8 * j + b] = (uint8_t)(k * j + b), shift[8 * j + b] = (uint8_t)(k * b);
        u8_perm[k] = _mm512_loadu_si512(perm);
        u8_shift[k] = _mm512_loadu_si512(shift);
#endif
    }
}

/* The 16 bytes at p. With CHECKED, bytes at or past `end` read as zero (only the last windows of
 * the code stream come that close to its end; callers pass CHECKED = 0 for rows that cannot). */
static inline __m128i load16(const uint8_t *p, const uint8_t *end, const int CHECKED) {
    if (!CHECKED || end - p >= 16) return _mm_loadu_si128((const __m128i *)p);
    uint8_t tmp[16] = {0};
    memcpy(tmp, p, (size_t)(end - p));
    return _mm_loadu_si128((const __m128i *)tmp);
}

static inline __m256i load16_bcast(const uint8_t *p, const uint8_t *end) {
    return _mm256_broadcastsi128_si256(load16(p, end, 1));
}

static inline __m256 sti_run(__m256i win, int k, int run, __m256i mask) {
    __m256i c = _mm256_shuffle_epi8(win, sti_ctl[k][run]);
    c = _mm256_and_si256(_mm256_srlv_epi32(c, sti_shift[k]), mask);
    return _mm256_cvtepi32_ps(c);
}
#endif

/* ------------------------------------------------------------------------- activations */

/* x rounded to int16 per block of 32, as the GGML kernels use it: d = max|x| / 32767,
 * q = rint(x * (1 / d)) (0 where d is 0). The same float32 operations as lowbit.quantize_acts, so
 * the NumPy fallback rounds every element identically. */
static void quantize_block(const float *x, int16_t *q, float *dxs, float sum) {
    float amax = 0.0f;
    for (int i = 0; i < QK; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float d = amax / 32767.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < QK; i++) q[i] = (int16_t)nearbyintf(x[i] * id);
    dxs[0] = d, dxs[1] = sum;
}

/* x (B vectors ldx apart) copied into A, zero-padded to pc; with `sums` (the fused kernels), also
 * each segment's sum and, for GGML kinds, the blocks rounded to int16. The int8 products take
 * only the copy (acts_i8): the rest cost them half a call of 16 vectors x 1536 columns. */
static int prepare_acts_ld(const Weights *W, const float *X, Py_ssize_t ldx, Py_ssize_t B, Acts *A, int sums) {
    A->B = B;
    size_t nx = (size_t)(B * W->pc), ns = (size_t)(B * W->nseg), ggml = sums && W->kind != K_STI;
    size_t floats = nx + (sums ? ns : 0) + (ggml ? 2 * ns + nx / 2 : 0); /* x, xs, dxs, q16 (2 codes per float) */
    size_t bytes = (floats * sizeof(float) + 63) & ~(size_t)63;
    A->x = aligned_alloc(64, bytes ? bytes : 64);
    if (!A->x) return -1;
    A->xs = sums ? A->x + nx : NULL;
    A->dxs = ggml ? A->xs + ns : NULL;
    A->q16 = ggml ? (int16_t *)(A->dxs + 2 * ns) : NULL;
    for (Py_ssize_t b = 0; b < B; b++) {
        float *xb = A->x + b * W->pc;
        memcpy(xb, X + b * ldx, (size_t)W->cols * sizeof(float));
        memset(xb + W->cols, 0, (size_t)(W->pc - W->cols) * sizeof(float));
        for (Py_ssize_t s = 0; s < W->nseg && sums; s++) {
            float t = 0.0f;
            for (Py_ssize_t i = 0; i < W->seg; i++) t += xb[s * W->seg + i];
            A->xs[b * W->nseg + s] = t;
            if (ggml) quantize_block(xb + s * QK, A->q16 + b * W->pc + s * QK, A->dxs + 2 * (b * W->nseg + s), t);
        }
    }
    return 0;
}

static int prepare_acts(const Weights *W, const float *X, Py_ssize_t B, Acts *A, int sums) {
    return prepare_acts_ld(W, X, W->cols, B, A, sums);
}

/* ------------------------------------------------------------------------- exact dequantization
 * One row into out[0 .. pc): the same two float32 roundings as the NumPy references (d * q, then
 * + m), bit for bit. sti-q1 rows leave outliers and padding columns to the caller. */

static void deq_row_q41(const uint8_t *blk, Py_ssize_t nb, float *out) {
    for (Py_ssize_t b = 0; b < nb; b++, blk += Q41_BYTES, out += QK) {
#if LB_AVX2
        __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(blk))), m = _mm256_set1_ps(_cvtsh_ss(rd16(blk + 2)));
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4)), lo4 = _mm_set1_epi8(15);
        __m128i lo = _mm_and_si128(q, lo4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), lo4);
        __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int j = 0; j < 4; j++) {
            __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[j]));
            _mm256_storeu_ps(out + 8 * j, _mm256_add_ps(_mm256_mul_ps(f, d), m));
        }
#else
        float d = half_to_float(rd16(blk)), m = half_to_float(rd16(blk + 2));
        for (int i = 0; i < 16; i++) {
            float lo = (float)(blk[4 + i] & 15) * d, hi = (float)(blk[4 + i] >> 4) * d;
            out[i] = lo + m;
            out[i + 16] = hi + m;
        }
#endif
    }
}

static void deq_row_q80(const uint8_t *blk, Py_ssize_t nb, float *out) {
    for (Py_ssize_t b = 0; b < nb; b++, blk += Q80_BYTES, out += QK) {
#if LB_AVX2
        __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(blk)));
        for (int j = 0; j < 4; j++) {
            __m128i q = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * j));
            _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
        }
#else
        float d = half_to_float(rd16(blk));
        for (int i = 0; i < QK; i++) out[i] = (float)(int8_t)blk[2 + i] * d;
#endif
    }
}

static void deq_row_sti(const Weights *W, Py_ssize_t r, float *out) {
    const int k = W->bits;
    const Py_ssize_t G = W->seg, gbytes = G * k / 8;
    const uint8_t *codes = W->w + r * W->row_bytes, *end = W->w + W->w_len;
    const float *sc = W->scale + r * W->nseg, *of = W->offset + r * W->nseg;
    for (Py_ssize_t g = 0; g < W->nseg; g++, out += G) {
        const uint8_t *p = codes + g * gbytes;
#if LB_AVX2
        const __m256 s = _mm256_set1_ps(sc[g]), o = _mm256_set1_ps(of[g]);
        const __m256i mask = _mm256_set1_epi32((1 << k) - 1);
        Py_ssize_t i = 0;
        for (; i + 16 <= G; i += 16, p += 2 * k) {
            __m256i win = load16_bcast(p, end);
            _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(sti_run(win, k, 0, mask), s), o));
            _mm256_storeu_ps(out + i + 8, _mm256_add_ps(_mm256_mul_ps(sti_run(win, k, 1, mask), s), o));
        }
        if (i < G) /* G % 16 == 8: one run left */
            _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(sti_run(load16_bcast(p, end), k, 0, mask), s), o));
#else
        (void)end;
        const float s = sc[g], o = of[g];
        const unsigned mask = (1u << k) - 1u;
        for (Py_ssize_t run = 0; run < G / 8; run++, p += k) {
            uint64_t word = 0;
            for (int j = 0; j < k; j++) word |= (uint64_t)p[j] << (8 * j);
            for (int i = 0; i < 8; i++) {
                float v = (float)((unsigned)(word >> (k * i)) & mask) * s;
                out[8 * run + i] = v + o;
            }
        }
#endif
    }
}

/* The P tiles of row r of a GGML matrix into tp (one, the row itself, for a matrix in one piece).
 * *k: a band at or before row r's, advanced to it (rows are visited in order). */
static inline void row_tiles(const Weights *W, Py_ssize_t r, Py_ssize_t *k, const uint8_t **tp) {
    if (!W->band_base) {
        tp[0] = W->w + r * W->row_bytes;
        return;
    }
    while (r >= W->band_start[*k + 1]) ++*k;
    const Py_ssize_t off = (r - W->band_start[*k]) * W->tile_bytes;
    for (Py_ssize_t p = 0; p < W->P; p++) tp[p] = W->band_base[*k * W->P + p] + off;
}

static void deq_row(const Weights *W, Py_ssize_t r, float *out) {
    if (W->kind == K_STI) {
        deq_row_sti(W, r, out);
        return;
    }
    const uint8_t *tiles[MAX_TILES];
    Py_ssize_t k = 0;
    row_tiles(W, r, &k, tiles);
    const Py_ssize_t nbp = W->nseg / W->P;
    for (Py_ssize_t p = 0; p < W->P; p++, out += nbp * QK)
        W->kind == K_Q41 ? deq_row_q41(tiles[p], nbp, out) : deq_row_q80(tiles[p], nbp, out);
}

/* ------------------------------------------------------------------------- fused rows, B = 1
 * y[r] = sum_s a_s * dot(q_s, x_s) + c_s * xs_s. Per segment the partial dot is a short FMA chain
 * and is folded into the row accumulator with one more FMA by the segment's scale. */


/* GGML rows against int16 activations, NB (1..4) vectors at a time: a block's codes are widened
 * to int16 once for all NB vectors, its integer dot product with each vector's q16 is exact
 * (vpmaddwd; |sum| <= 32 * 127 * 32767 < 2^31), then acc += (d * d16) * isum and macc += m * xs
 * in float32. Every vector keeps two accumulator chains (even and odd blocks), which hides the FMA
 * latency at NB = 1 and makes each vector's result independent of NB and of the rest of the batch. */
#if LB_AVX2
static inline __m128 load_dm(const uint8_t *blk) { /* [d, m, 0, 0] of a block's two f16 (m: junk for Q8_0) */
    int32_t v;
    memcpy(&v, blk, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(v));
}
static inline __m128 load_pair(const float *p) { return _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)); }

#if LB_AVX512
typedef __m512i wvec; /* a block's 32 codes as int16 */
typedef __m512 facc;
static inline __attribute__((always_inline)) wvec ggml_widen(const int Q41, const uint8_t *blk) {
    if (Q41) {
        const __m128i lo4 = _mm_set1_epi8(15);
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
        return _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), lo4), _mm_and_si128(q, lo4)));
    }
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 2)));
}
static inline __m512i ggml_idot(wvec w, const int16_t *x) { return _mm512_madd_epi16(w, _mm512_loadu_si512(x)); }
#define FACC_ZERO _mm512_setzero_ps()
#define FACC_FMA(p, s, acc) _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_broadcastss_ps(s), (acc))
#define FACC_SUM(a, b) _mm512_reduce_add_ps(_mm512_add_ps((a), (b)))
#else
typedef struct { __m256i lo, hi; } wvec;
typedef __m256 facc;
static inline __attribute__((always_inline)) wvec ggml_widen(const int Q41, const uint8_t *blk) {
    wvec w;
    if (Q41) {
        const __m128i lo4 = _mm_set1_epi8(15);
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
        w.lo = _mm256_cvtepu8_epi16(_mm_and_si128(q, lo4));
        w.hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), lo4));
    } else {
        w.lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
        w.hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));
    }
    return w;
}
static inline __m256i ggml_idot(wvec w, const int16_t *x) {
    return _mm256_add_epi32(_mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i *)x)),
                            _mm256_madd_epi16(w.hi, _mm256_loadu_si256((const __m256i *)(x + 16))));
}
#define FACC_ZERO _mm256_setzero_ps()
#define FACC_FMA(p, s, acc) _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcastss_ps(s), (acc))
#define FACC_SUM(a, b) hsum8(_mm256_add_ps((a), (b)))
#endif

/* One block into chain acc/macc of each of the NB vectors. */
static inline __attribute__((always_inline)) void ggml_block(const int Q41, const int NB, wvec w, __m128 dm,
                                                            const int16_t *x, const float *dxs, Py_ssize_t pc,
                                                            Py_ssize_t dstride, facc *acc, __m128 *macc) {
    for (int j = 0; j < NB; j++) {
        __m128 s = _mm_mul_ps(dm, load_pair(dxs + j * dstride)); /* [d * d16, m * xs] */
        acc[j] = FACC_FMA(ggml_idot(w, x + j * pc), s, acc[j]);
        if (Q41) macc[j] = _mm_add_ps(macc[j], s);
    }
}

/* Blocks b .. b+n-1 of a row, their bytes from blk on: block b goes into chain b & 1 whatever
 * tile it lies in, so a row cut into tiles sums exactly as the same row in one piece. */
static inline __attribute__((always_inline)) void ggml_span(const int Q41, const int NB, const uint8_t *blk,
                                                           Py_ssize_t b, Py_ssize_t n, const int16_t *x,
                                                           const float *dxs, Py_ssize_t pc, Py_ssize_t dstride,
                                                           facc *a0, facc *a1, __m128 *m0, __m128 *m1) {
    const Py_ssize_t bytes = Q41 ? Q41_BYTES : Q80_BYTES, end = b + n;
    if ((b & 1) && b < end) {
        ggml_block(Q41, NB, ggml_widen(Q41, blk), load_dm(blk), x + b * QK, dxs + 2 * b, pc, dstride, a1, m1);
        b++, blk += bytes;
    }
    for (; b + 2 <= end; b += 2, blk += 2 * bytes) {
        ggml_block(Q41, NB, ggml_widen(Q41, blk), load_dm(blk), x + b * QK, dxs + 2 * b, pc, dstride, a0, m0);
        ggml_block(Q41, NB, ggml_widen(Q41, blk + bytes), load_dm(blk + bytes), x + (b + 1) * QK, dxs + 2 * (b + 1),
                   pc, dstride, a1, m1);
    }
    if (b < end) ggml_block(Q41, NB, ggml_widen(Q41, blk), load_dm(blk), x + b * QK, dxs + 2 * b, pc, dstride, a0, m0);
}

/* One row, its nb blocks in P tiles of nb / P blocks, against NB vectors. */
static inline __attribute__((always_inline)) void ggml_row(const int Q41, const int NB, const uint8_t *const *tiles,
                                                          Py_ssize_t P, Py_ssize_t nb, const int16_t *x,
                                                          const float *dxs, Py_ssize_t pc, float *out) {
    const Py_ssize_t dstride = 2 * nb, nbp = nb / P;
    facc a0[4], a1[4];
    __m128 m0[4], m1[4]; /* lane 1: sum of m * xs */
    for (int j = 0; j < NB; j++) a0[j] = a1[j] = FACC_ZERO, m0[j] = m1[j] = _mm_setzero_ps();
    for (Py_ssize_t p = 0; p < P; p++) ggml_span(Q41, NB, tiles[p], p * nbp, nbp, x, dxs, pc, dstride, a0, a1, m0, m1);
    for (int j = 0; j < NB; j++)
        out[j] = FACC_SUM(a0[j], a1[j]) + (Q41 ? _mm_cvtss_f32(_mm_movehdup_ps(_mm_add_ps(m0[j], m1[j]))) : 0.0f);
}
#else
/* Portable: the same integer sums; the float sums run in block order. */
static void ggml_row(const int Q41, const int NB, const uint8_t *const *tiles, Py_ssize_t P, Py_ssize_t nb,
                     const int16_t *q16, const float *dxs, Py_ssize_t pc, float *out) {
    const Py_ssize_t nbp = nb / P, bytes = Q41 ? Q41_BYTES : Q80_BYTES;
    for (int j = 0; j < NB; j++) {
        const int16_t *x = q16 + j * pc;
        const float *ds = dxs + 2 * j * nb;
        float acc = 0.0f, macc = 0.0f;
        for (Py_ssize_t b = 0; b < nb; b++, x += QK, ds += 2) {
            const uint8_t *bk = tiles[b / nbp] + (b % nbp) * bytes;
            int32_t p = 0;
            if (Q41) {
                for (int i = 0; i < 16; i++) p += (bk[4 + i] & 15) * x[i] + (bk[4 + i] >> 4) * x[i + 16];
                macc += half_to_float(rd16(bk + 2)) * ds[1];
            } else {
                for (int i = 0; i < QK; i++) p += (int8_t)bk[2 + i] * x[i];
            }
            acc += half_to_float(rd16(bk)) * ds[0] * (float)p;
        }
        out[j] = acc + macc;
    }
}
#endif

/* K and CHECKED are compile-time constants at every call site (see dot_row_sti), so the shuffle
 * controls, shifts and masks are hoisted and the group loop is specialised per bitwidth. */
static inline __attribute__((always_inline)) float dot_row_sti_k(const Weights *W, Py_ssize_t r, const float *x,
                                                                const float *xs, const int K, const int CHECKED) {
    const Py_ssize_t G = W->seg, ng = W->nseg;
    const uint8_t *p = W->w + r * W->row_bytes, *end = W->w + W->w_len;
    const float *sc = W->scale + r * ng, *of = W->offset + r * ng;
    float oacc = 0.0f;
    for (Py_ssize_t g = 0; g < ng; g++) oacc += of[g] * xs[g];
#if LB_AVX512
    const __m512i mask = _mm512_set1_epi32((1 << K) - 1), ctl = sti_ctl512[K], shift = sti_shift512[K];
#define CODES16(q) /* the 16 codes of the window at q, as floats */                                   \
    _mm512_cvtepi32_ps(_mm512_and_si512(                                                             \
        _mm512_srlv_epi32(_mm512_shuffle_epi8(_mm512_broadcast_i32x4(load16(q, end, CHECKED)), ctl), shift), mask))
    __m512 acc = _mm512_setzero_ps();
    for (Py_ssize_t g = 0; g < ng; g++, p += G * K / 8, x += G) {
        const uint8_t *q = p;
        __m512 pa = _mm512_setzero_ps(), pb = _mm512_setzero_ps(); /* two chains: the FMA latency */
        Py_ssize_t i = 0;
        for (; i + 32 <= G; i += 32, q += 4 * K) {
            pa = _mm512_fmadd_ps(CODES16(q), _mm512_loadu_ps(x + i), pa);
            pb = _mm512_fmadd_ps(CODES16(q + 2 * K), _mm512_loadu_ps(x + i + 16), pb);
        }
        if (i + 16 <= G) pa = _mm512_fmadd_ps(CODES16(q), _mm512_loadu_ps(x + i), pa), i += 16, q += 2 * K;
        if (i < G) { /* G % 16 == 8: the last run with 8 lanes */
            __m256i win = _mm256_broadcastsi128_si256(load16(q, end, CHECKED));
            __m256 c = sti_run(win, K, 0, _mm256_set1_epi32((1 << K) - 1));
            pb = _mm512_add_ps(pb, _mm512_zextps256_ps512(_mm256_mul_ps(c, _mm256_loadu_ps(x + i))));
        }
        acc = _mm512_fmadd_ps(_mm512_add_ps(pa, pb), _mm512_set1_ps(sc[g]), acc);
    }
#undef CODES16
    return _mm512_reduce_add_ps(acc) + oacc;
#elif LB_AVX2
    const __m256i mask = _mm256_set1_epi32((1 << K) - 1);
    __m256 acc = _mm256_setzero_ps();
    for (Py_ssize_t g = 0; g < ng; g++, p += G * K / 8, x += G) {
        const uint8_t *q = p;
        __m256 pa = _mm256_setzero_ps(), pb = _mm256_setzero_ps(); /* two chains: the FMA latency */
        Py_ssize_t i = 0;
        for (; i + 16 <= G; i += 16, q += 2 * K) {
            __m256i win = _mm256_broadcastsi128_si256(load16(q, end, CHECKED));
            pa = _mm256_fmadd_ps(sti_run(win, K, 0, mask), _mm256_loadu_ps(x + i), pa);
            pb = _mm256_fmadd_ps(sti_run(win, K, 1, mask), _mm256_loadu_ps(x + i + 8), pb);
        }
        if (i < G)
            pa = _mm256_fmadd_ps(sti_run(_mm256_broadcastsi128_si256(load16(q, end, CHECKED)), K, 0, mask),
                                 _mm256_loadu_ps(x + i), pa);
        acc = _mm256_fmadd_ps(_mm256_add_ps(pa, pb), _mm256_set1_ps(sc[g]), acc);
    }
    return hsum8(acc) + oacc;
#else
    (void)end, (void)CHECKED;
    float acc = 0.0f;
    const unsigned mask = (1u << K) - 1u;
    for (Py_ssize_t g = 0; g < ng; g++, x += G) {
        float pd = 0.0f;
        for (Py_ssize_t run = 0; run < G / 8; run++, p += K) {
            uint64_t word = 0;
            for (int j = 0; j < K; j++) word |= (uint64_t)p[j] << (8 * j);
            for (int i = 0; i < 8; i++) pd += (float)((unsigned)(word >> (K * i)) & mask) * x[8 * run + i];
        }
        acc += sc[g] * pd;
    }
    return acc + oacc;
#endif
}

#define DOT_STI(K)                                                                                       \
    static float dot_row_sti##K(const Weights *W, Py_ssize_t r, const float *x, const float *xs) {     \
        /* 16-byte loads from this row can pass the end of the code stream only in its last rows */    \
        if ((r + 1) * W->row_bytes + 16 <= W->w_len) return dot_row_sti_k(W, r, x, xs, K, 0);         \
        return dot_row_sti_k(W, r, x, xs, K, 1);                                                       \
    }
DOT_STI(2)
DOT_STI(3)
DOT_STI(4)
DOT_STI(5)
DOT_STI(6)
DOT_STI(8)

static float dot_row_sti(const Weights *W, Py_ssize_t r, const float *x, const float *xs) {
    switch (W->bits) {
    case 2: return dot_row_sti2(W, r, x, xs);
    case 3: return dot_row_sti3(W, r, x, xs);
    case 4: return dot_row_sti4(W, r, x, xs);
    case 5: return dot_row_sti5(W, r, x, xs);
    case 6: return dot_row_sti6(W, r, x, xs);
    default: return dot_row_sti8(W, r, x, xs);
    }
}

static void rows_b1(const Weights *W, const Acts *A, float *y, int accumulate, Py_ssize_t r0, Py_ssize_t r1) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        float v = dot_row_sti(W, r, A->x, A->xs);
        y[r] = accumulate ? y[r] + v : v;
    }
}

/* GGML kinds, any B: rows times groups of up to 4 vectors (ggml_row). TILED is a compile-time
 * constant: a matrix in one piece runs ggml_row with P = 1 known, as fast as before tiles existed. */
static inline __attribute__((always_inline)) void rows_ggml_k(const Weights *W, const Acts *A, float *y,
                                                             int accumulate, Py_ssize_t r0, Py_ssize_t r1,
                                                             const int TILED) {
    const Py_ssize_t nb = W->nseg, R = W->rows, pc = W->pc, P = TILED ? W->P : 1;
    const int q41 = W->kind == K_Q41;
    const uint8_t *tiles[TILED ? MAX_TILES : 1];
    Py_ssize_t band = 0;
    for (Py_ssize_t r = r0; r < r1; r++) {
        if (TILED)
            row_tiles(W, r, &band, tiles);
        else
            tiles[0] = W->w + r * W->row_bytes;
        for (Py_ssize_t b0 = 0; b0 < A->B; b0 += 4) {
            const int16_t *q16 = A->q16 + b0 * pc;
            const float *dxs = A->dxs + 2 * b0 * nb;
            float v[4] = {0};
            int n = A->B - b0 >= 4 ? 4 : (int)(A->B - b0);
#define GGML_CASE(N) \
    case N: q41 ? ggml_row(1, N, tiles, P, nb, q16, dxs, pc, v) : ggml_row(0, N, tiles, P, nb, q16, dxs, pc, v); break
            switch (n) {
                GGML_CASE(4);
                GGML_CASE(3);
                GGML_CASE(2);
                default: q41 ? ggml_row(1, 1, tiles, P, nb, q16, dxs, pc, v) : ggml_row(0, 1, tiles, P, nb, q16, dxs, pc, v);
            }
#undef GGML_CASE
            for (int j = 0; j < n; j++) {
                float *dst = y + (b0 + j) * R + r;
                *dst = accumulate ? *dst + v[j] : v[j];
            }
        }
    }
}

static void rows_ggml(const Weights *W, const Acts *A, float *y, int accumulate, Py_ssize_t r0, Py_ssize_t r1) {
    if (W->band_base)
        rows_ggml_k(W, A, y, accumulate, r0, r1, 1);
    else
        rows_ggml_k(W, A, y, accumulate, r0, r1, 0);
}

/* ------------------------------------------------------------------------- batched rows, B > 1
 * A tile of RT rows is dequantized into `tile` (RT * pc floats: 24 KB at pc = 1536, in L1/L2),
 * then the micro-kernel computes RT x NB dot products at once: per 8 columns it loads RT weight
 * and NB activation vectors and issues RT * NB FMAs (12 accumulators + 3 x + 1 w = the 16 AVX2
 * registers at NB = 3). */

#if LB_AVX2
#define MICRO(NB)                                                                                        \
    static void micro_4x##NB(const float *tile, Py_ssize_t pc, const float *x, float out[RT][3]) {     \
        __m256 acc[RT][NB];                                                                              \
        for (int r = 0; r < RT; r++)                                                                     \
            for (int b = 0; b < NB; b++) acc[r][b] = _mm256_setzero_ps();                                \
        for (Py_ssize_t i = 0; i < pc; i += 8) {                                                         \
            __m256 xv[NB];                                                                               \
            for (int b = 0; b < NB; b++) xv[b] = _mm256_loadu_ps(x + b * pc + i);                        \
            for (int r = 0; r < RT; r++) {                                                               \
                __m256 w = _mm256_loadu_ps(tile + r * pc + i);                                           \
                for (int b = 0; b < NB; b++) acc[r][b] = _mm256_fmadd_ps(w, xv[b], acc[r][b]);           \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < RT; r++)                                                                     \
            for (int b = 0; b < NB; b++) out[r][b] = hsum8(acc[r][b]);                                   \
    }
#else
#define MICRO(NB)                                                                                        \
    static void micro_4x##NB(const float *tile, Py_ssize_t pc, const float *x, float out[RT][3]) {     \
        for (int r = 0; r < RT; r++)                                                                     \
            for (int b = 0; b < NB; b++) {                                                               \
                float s = 0.0f;                                                                          \
                for (Py_ssize_t i = 0; i < pc; i++) s += tile[r * pc + i] * x[b * pc + i];               \
                out[r][b] = s;                                                                           \
            }                                                                                            \
    }
#endif
MICRO(1)
MICRO(2)
MICRO(3)

static void rows_batched(const Weights *W, const Acts *A, float *y, int accumulate, Py_ssize_t r0,
                         Py_ssize_t r1, float *tile) {
    const Py_ssize_t pc = W->pc, B = A->B, R = W->rows;
    for (Py_ssize_t t0 = r0; t0 < r1; t0 += RT) {
        Py_ssize_t nr = r1 - t0 < RT ? r1 - t0 : RT;
        for (Py_ssize_t r = 0; r < RT; r++) {
            if (r < nr) {
                deq_row(W, t0 + r, tile + r * pc);
                /* sti-q1 padding columns decode to some value; x is zero there, zero w too (no 0 * inf) */
                for (Py_ssize_t c = W->cols; c < pc; c++) tile[r * pc + c] = 0.0f;
            } else {
                memset(tile + r * pc, 0, (size_t)pc * sizeof(float));
            }
        }
        for (Py_ssize_t b0 = 0; b0 < B; b0 += 3) {
            float out[RT][3];
            const float *xb = A->x + b0 * pc;
            switch (B - b0 >= 3 ? 3 : B - b0) {
            case 3: micro_4x3(tile, pc, xb, out); break;
            case 2: micro_4x2(tile, pc, xb, out); break;
            default: micro_4x1(tile, pc, xb, out); break;
            }
            for (Py_ssize_t r = 0; r < nr; r++)
                for (Py_ssize_t b = 0; b < 3 && b0 + b < B; b++) {
                    float *dst = y + (b0 + b) * R + t0 + r;
                    *dst = accumulate ? *dst + out[r][b] : out[r][b];
                }
        }
    }
}

/* Outlier j of W (row r, column c): exact - quantized, the quantized weight being code * scale +
 * offset (two roundings). */
static inline float outlier_delta(const Weights *W, Py_ssize_t j, Py_ssize_t r, Py_ssize_t c) {
    const Py_ssize_t g = r * W->nseg + c / W->seg;
    return W->oval[j] - ((float)sti_code(W, r, c) * W->scale[g] + W->offset[g]);
}

/* sti-q1 outliers: the passes above used the quantized weight at each outlier's position; add
 * (exact - quantized) * x. Serial and after the row passes, so no two threads touch a y. */
static void apply_outliers(const Weights *W, const Acts *A, float *y) {
    for (Py_ssize_t j = 0; j < W->nout; j++) {
        Py_ssize_t r = W->oidx[j] / W->cols, c = W->oidx[j] % W->cols;
        float delta = outlier_delta(W, j, r, c);
        for (Py_ssize_t b = 0; b < A->B; b++) y[b * W->rows + r] += delta * A->x[b * W->pc + c];
    }
}

/* ------------------------------------------------------------------------- int8 products (qmm)
 * Y (B, rows) = X (B, cols) @ W.T for sti-q1 weights (codes of 2-8 bits) or GGML blocks (Q4_1's
 * nibbles, Q8_0's q + 128: unpack_row_ggml) and a batch of B vectors: many tokens of one sequence. Each vector's
 * segment s (the G columns sharing one weight scale and offset) is rounded to int8:
 * dx = max|x| / 127, q = rint(x * (127 / max|x|)); then
 *
 *     y[b, r] = sum_s (scale[r, s] * dx[b, s]) * (sum_{i in s} code[r, i] q[b, i])  +  offset[r, s] * xs[b, s]
 *
 * with xs = dx * sum_{i in s} q[b, i], the sum of the rounded x: y is then exactly W times the
 * rounded x, whose error is sum_i W_i (x_i - dx q_i). With the exact sum of x instead, the error
 * would be sum_i scale code_i (x_i - dx q_i): the codes are unsigned, so scale * code is W minus
 * the offset, about twice |W|, and so is the error (measured on SmolLM2's activations: 2x, and
 * 2.7% of perplexity against 0.6%). The inner sums are exact integers; the rounding of x is at
 * most 1/254 of its segment's largest |x|. The batch runs across the 16
 * lanes of a register (vpdpbusd: one broadcast 4-code word of a row times 4 columns of 16
 * vectors), so a row's codes are read straight from the matrix, in order, and an R x VC
 * register tile (rows x 16-vector groups) reuses every load of x for R rows. The portable path
 * computes the same integers; the float steps agree up to FMA rounding. */

#define QMM_ACC 12 /* R * VC accumulator pairs (int32 + float32 each): 24 of the 32 zmm registers */

static int acts_i8(const Weights *W, Acts *A) {
    const Py_ssize_t B = A->B, nv = (B + 15) / 16, pc = W->pc, G = W->seg, ns = W->nseg, nkq = pc / 4;
    A->nv = nv;
    size_t xbytes = (size_t)(nkq * nv * 64), fl = (size_t)(ns * nv * 16);
    A->xv = aligned_alloc(64, (xbytes + 2 * fl * sizeof(float) + 63) & ~(size_t)63);
    if (!A->xv) return -1;
    A->dxv = (float *)(A->xv + xbytes);
    A->xsv = A->dxv + fl;
    memset(A->xv, 0, xbytes + 2 * fl * sizeof(float));
    for (Py_ssize_t b = 0; b < B; b++) {
        const Py_ssize_t v = b / 16, lane = b % 16;
        for (Py_ssize_t s = 0; s < ns; s++) {
            const float *x = A->x + b * pc + s * G;
            float amax = 0.0f;
            Py_ssize_t i = 0;
#if LB_AVX512
            __m512 m = _mm512_setzero_ps();
            for (; i + 16 <= G; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
            amax = _mm512_reduce_max_ps(m);
#endif
            for (; i < G; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
            float id = amax != 0.0f ? 127.0f / amax : 0.0f;
            int8_t *dst = A->xv + (s * G / 4 * nv + v) * 64 + 4 * lane; /* column s * G of vector b */
            int32_t qsum = 0; /* |qsum| <= 127 * G */
            i = 0;
#if LB_AVX512
            /* 16 columns: rint(x * id) (the rounding mode is round-to-nearest-even, as rint's), to
             * int8, then each 4 columns as one dword into its column quad */
            for (; i + 16 <= G; i += 16) {
                __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(id)));
                __m128i q = _mm512_cvtsepi32_epi8(qi);
                qsum += _mm512_reduce_add_epi32(qi);
                int32_t d[4];
                memcpy(d, &q, 16);
                for (int j = 0; j < 4; j++) memcpy(dst + (i / 4 + j) * nv * 64, &d[j], 4);
            }
#endif
            for (; i < G; i++) {
                const int8_t q = (int8_t)nearbyintf(x[i] * id);
                dst[(i / 4) * nv * 64 + i % 4] = q;
                qsum += q;
            }
            const float dx = amax / 127.0f;
            A->dxv[(s * nv + v) * 16 + lane] = dx;
            A->xsv[(s * nv + v) * 16 + lane] = dx * (float)qsum;
        }
    }
    return 0;
}

static int outliers_sorted(const Weights *W) {
    int sorted = 1;
    for (Py_ssize_t j = 1; j < W->nout && sorted; j++) sorted = W->oidx[j] > W->oidx[j - 1];
    return sorted;
}

/* x transposed for the outlier corrections (xt), with `extra` Py_ssize_t after it (a row index). */
static int acts_xt(const Weights *W, Acts *A, Py_ssize_t extra) {
    const Py_ssize_t pc = W->pc, nv = A->nv;
    size_t nx = (size_t)(pc * nv * 16);
    A->xt = aligned_alloc(64, ((nx * sizeof(float) + (size_t)extra * sizeof(Py_ssize_t)) + 63) & ~(size_t)63);
    if (!A->xt) return -1;
    memset(A->xt, 0, nx * sizeof(float));
    for (Py_ssize_t b = 0; b < A->B; b++)
        for (Py_ssize_t k = 0; k < W->cols; k++) A->xt[k * nv * 16 + b] = A->x[b * pc + k];
    return 0;
}

/* orow[r] (r = 0 .. rows): the first of W's sorted outliers in row r or later. */
static void outlier_rows(const Weights *W, Py_ssize_t *orow) {
    Py_ssize_t r = 0; /* one division per outlier: rows without outliers point at the next one */
    for (Py_ssize_t j = 0; j < W->nout; j++)
        for (const Py_ssize_t rj = (Py_ssize_t)(W->oidx[j] / W->cols); r <= rj; r++) orow[r] = j;
    for (; r <= W->rows; r++) orow[r] = W->nout;
}

/* Outliers sorted by index (as sti.quant writes them) are applied per row inside the row tasks,
 * with x laid out like the products' lanes; unsorted ones afterwards (apply_outliers). */
static int prepare_acts_i8(const Weights *W, Acts *A) {
    if (acts_i8(W, A)) return -1;
    if (!W->nout || !outliers_sorted(W)) return 0;
    if (acts_xt(W, A, W->rows + 1)) return -1;
    A->orow = (Py_ssize_t *)(A->xt + (size_t)(W->pc * A->nv * 16));
    outlier_rows(W, A->orow);
    return 0;
}

/* out (the tile of rows r .. r+nr-1, VC vector groups from v0) += (exact - quantized) * x at
 * each outlier of those rows: the quantized weight is code * scale + offset, two roundings. */
static void qmm_outliers(const Weights *W, const Acts *A, Py_ssize_t r, int nr, Py_ssize_t v0, int VC, float *out) {
    const Py_ssize_t nv = A->nv;
    for (int i = 0; i < nr; i++)
        for (Py_ssize_t j = A->orow[r + i]; j < A->orow[r + i + 1]; j++) {
            Py_ssize_t c = W->oidx[j] % W->cols;
            float delta = outlier_delta(W, j, r + i, c);
            const float *x = A->xt + c * nv * 16 + v0 * 16;
            float *o = out + i * VC * 16;
            for (int l = 0; l < VC * 16; l++) o[l] += delta * x[l];
        }
}

#if LB_VNNI
#define UNROLL _Pragma("GCC unroll 12")
/* R rows from r0 times VC 16-vector groups from v0 into out[R][VC * 16] (vector-major lanes).
 * R and VC are constants after inlining; the fixed-size arrays and full unrolling keep the tile
 * in registers. */
static inline __attribute__((always_inline)) void qmm_tile(const int R, const int VC, const Weights *W,
                                                           const Acts *A, const float *sc, const float *of,
                                                           Py_ssize_t v0, const uint8_t *codes, float *out) {
    const Py_ssize_t nv = A->nv, G4 = W->seg / 4, ns = W->nseg, pc = W->pc;
    __m512 f[QMM_ACC][2];
    __m512i acc[QMM_ACC][2];
    const uint8_t *w[QMM_ACC];
    UNROLL for (int i = 0; i < R; i++) {
        w[i] = codes + i * pc;
        UNROLL for (int v = 0; v < VC; v++) f[i][v] = _mm512_setzero_ps();
    }
    for (Py_ssize_t s = 0; s < ns; s++) {
        UNROLL for (int i = 0; i < R; i++)
            UNROLL for (int v = 0; v < VC; v++) acc[i][v] = _mm512_setzero_si512();
        const int8_t *xq = A->xv + (s * G4 * nv + v0) * 64;
        const Py_ssize_t k0 = s * G4 * 4;
        for (Py_ssize_t kq = 0; kq < G4; kq++, xq += nv * 64) {
            __m512i xa[2];
            UNROLL for (int v = 0; v < VC; v++) xa[v] = _mm512_load_si512((const void *)(xq + v * 64));
            UNROLL for (int i = 0; i < R; i++) {
                int32_t word;
                memcpy(&word, w[i] + k0 + 4 * kq, 4);
                __m512i wb = _mm512_set1_epi32(word);
                UNROLL for (int v = 0; v < VC; v++) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], wb, xa[v]);
            }
        }
        UNROLL for (int v = 0; v < VC; v++) {
            __m512 dx = _mm512_load_ps(A->dxv + (s * nv + v0 + v) * 16);
            __m512 xs = _mm512_load_ps(A->xsv + (s * nv + v0 + v) * 16);
            UNROLL for (int i = 0; i < R; i++) {
                __m512 d = _mm512_mul_ps(dx, _mm512_set1_ps(sc[i * ns + s]));
                f[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][v]), d, f[i][v]);
                f[i][v] = _mm512_fmadd_ps(xs, _mm512_set1_ps(of[i * ns + s]), f[i][v]);
            }
        }
    }
    UNROLL for (int i = 0; i < R; i++)
        UNROLL for (int v = 0; v < VC; v++) _mm512_storeu_ps(out + (i * VC + v) * 16, f[i][v]);
}
#undef UNROLL
#else
static void qmm_tile(const int R, const int VC, const Weights *W, const Acts *A, const float *sc, const float *of,
                     Py_ssize_t v0, const uint8_t *codes, float *out) {
    const Py_ssize_t nv = A->nv, G = W->seg, ns = W->nseg, pc = W->pc;
    for (int i = 0; i < R; i++)
        for (int v = 0; v < VC; v++)
            for (int lane = 0; lane < 16; lane++) {
                float f = 0.0f;
                for (Py_ssize_t s = 0; s < ns; s++) {
                    int32_t acc = 0;
                    for (Py_ssize_t k = s * G; k < (s + 1) * G; k++)
                        acc += (int32_t)codes[i * pc + k] *
                               (int32_t)A->xv[((k / 4) * nv + v0 + v) * 64 + 4 * lane + k % 4];
                    Py_ssize_t j = (s * nv + v0 + v) * 16 + lane;
                    f = fmaf((float)acc, A->dxv[j] * sc[i * ns + s], f);
                    f = fmaf(A->xsv[j], of[i * ns + s], f);
                }
                out[(i * VC + v) * 16 + lane] = f;
            }
}
#endif

/* Row r's pc codes as bytes into dst. AVX-512 VBMI: 64 codes (8 runs of 8 codes in k bytes each)
 * per step: vpermb moves run j's bytes to qword j, vpmultishiftqb takes code i's bits k*i ..
 * k*i+7 of its qword into byte i, and a mask keeps k of them. */
static void unpack_row_u8(const Weights *W, Py_ssize_t r, uint8_t *dst) {
    const int k = W->bits;
    const Py_ssize_t pc = W->pc;
    const uint8_t *src = W->w + r * W->row_bytes;
#if LB_AVX2
    /* the same row of the next tile of rows, and its scales and offsets: fetched while this tile
     * computes (streamed weights come from memory; prefetches past the end are harmless) */
    for (Py_ssize_t c = 0; c < W->row_bytes; c += 64) _mm_prefetch((const char *)src + QMM_ACC * W->row_bytes + c, _MM_HINT_T0);
    _mm_prefetch((const char *)(W->scale + (r + QMM_ACC) * W->nseg), _MM_HINT_T0);
    _mm_prefetch((const char *)(W->offset + (r + QMM_ACC) * W->nseg), _MM_HINT_T0);
#endif
#if LB_AVX512 && defined(__AVX512VBMI__)
    const __m512i P = u8_perm[k], S = u8_shift[k];
    const __m512i M = _mm512_set1_epi8((char)((1u << k) - 1u));
    for (Py_ssize_t c = 0; c < pc; c += 64) {
        Py_ssize_t n = pc - c < 64 ? pc - c : 64; /* a multiple of 8 codes */
        __mmask64 in = n * k / 8 >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n * k / 8)) - 1);
        __m512i win = _mm512_maskz_loadu_epi8(in, src + c / 8 * k);
        __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(S, _mm512_permutexvar_epi8(P, win)), M);
        _mm512_mask_storeu_epi8(dst + c, n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1), codes);
    }
#else
    (void)k, (void)src;
    for (Py_ssize_t c = 0; c < pc; c++) dst[c] = (uint8_t)sti_code(W, r, c);
#endif
}

/* GGML row r as qmm reads it: one unsigned code per element, and per block of 32 a scale and an
 * offset with element = code * scale + offset. Q4_1: its nibbles, d and m. Q8_0: q + 128 (a byte),
 * d and -128 d: exact, since d * (q + 128) - 128 d = d * q in the integer sums. */
static void unpack_row_ggml(const Weights *W, Py_ssize_t r, uint8_t *dst, float *sc, float *of) {
    const uint8_t *tiles[MAX_TILES];
    Py_ssize_t k = 0;
    row_tiles(W, r, &k, tiles);
    const Py_ssize_t nbp = W->nseg / W->P;
    /* the same row of the next tile of rows: fetched while this tile computes (a prefetch past
     * the matrix's end is harmless, and past a band's end merely wasted) */
#if LB_AVX2
    const Py_ssize_t ahead = QMM_ACC * (W->band_base ? W->tile_bytes : W->row_bytes);
#endif
    for (Py_ssize_t p = 0; p < W->P; p++) {
        const uint8_t *blk = tiles[p];
#if LB_AVX2
        for (Py_ssize_t c = 0; c < nbp * (W->kind == K_Q41 ? Q41_BYTES : Q80_BYTES); c += 64)
            _mm_prefetch((const char *)blk + ahead + c, _MM_HINT_T0);
#endif
        if (W->kind == K_Q41) {
            for (Py_ssize_t b = 0; b < nbp; b++, blk += Q41_BYTES, dst += QK, sc++, of++) {
#if LB_AVX2
                float dm[4];
                _mm_storeu_ps(dm, load_dm(blk));
                *sc = dm[0], *of = dm[1];
                const __m128i v = _mm_loadu_si128((const __m128i *)(blk + 4)), lo4 = _mm_set1_epi8(15);
                _mm_storeu_si128((__m128i *)dst, _mm_and_si128(v, lo4));
                _mm_storeu_si128((__m128i *)(dst + 16), _mm_and_si128(_mm_srli_epi16(v, 4), lo4));
#else
                *sc = half_to_float(rd16(blk)), *of = half_to_float(rd16(blk + 2));
                for (int j = 0; j < 16; j++) dst[j] = blk[4 + j] & 15, dst[16 + j] = blk[4 + j] >> 4;
#endif
            }
        } else {
            for (Py_ssize_t b = 0; b < nbp; b++, blk += Q80_BYTES, dst += QK, sc++, of++) {
                const float d = half_to_float(rd16(blk));
                *sc = d, *of = -128.0f * d;
#if LB_AVX2 /* q + 128 as a byte is q with its top bit flipped */
                _mm256_storeu_si256((__m256i *)dst, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)),
                                                                     _mm256_set1_epi8((char)0x80)));
#else
                for (int j = 0; j < QK; j++) dst[j] = (uint8_t)((int8_t)blk[2 + j] + 128);
#endif
            }
        }
    }
}

/* The register tile's results into y: out[i * stride + lane] is row i of vector `lane`, which goes to
 * dst[lane * ldy + i] (nr <= 16 rows, nl lanes). AVX-512: the tile transposed in registers, then
 * one masked store per lane into its contiguous run of y, instead of nr * nl scalar stores ldy
 * apart (and faster than gathering each lane's rows: MiniLM's q/k/v product at 32 tokens, 158 ->
 * 129 us). */
static inline void store_tile(const float *out, int stride, int nr, Py_ssize_t nl, float *dst, Py_ssize_t ldy,
                              int accumulate) {
#if LB_AVX512
    const __mmask16 m = (__mmask16)((1u << nr) - 1u);
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = i < nr ? _mm512_loadu_ps(out + i * stride) : _mm512_setzero_ps();
    transpose16(r);
    for (Py_ssize_t lane = 0; lane < nl; lane++, dst += ldy) {
        __m512 val = r[lane];
        if (accumulate) val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(m, dst));
        _mm512_mask_storeu_ps(dst, m, val);
    }
#else
    for (Py_ssize_t lane = 0; lane < nl; lane++, dst += ldy)
        for (int i = 0; i < nr; i++) dst[i] = accumulate ? dst[i] + out[i * stride + lane] : out[i * stride + lane];
#endif
}

/* Whether qmm reads an sti-q1 matrix's codes in place: 8-bit codes are bytes already, but where
 * unpack_row_u8 has its one-instruction-per-64-codes path it copies them into the L1 tile and
 * fetches the next tile's rows, which the in-place reads lacked (the preloaded 8-bit MiniLM engine
 * at 32 tokens: 7.2 -> 6.8 ms). */
#if LB_AVX512 && defined(__AVX512VBMI__)
#define QMM_IN_PLACE(W) 0
#else
#define QMM_IN_PLACE(W) ((W)->bits == 8)
#endif

/* Rows r0 .. r1-1 of a qmm into y (row b of the batch at y + b * ldy): 8-bit codes are read in place; other widths are unpacked a tile
 * of rows at a time into `tile` (QMM_ACC * pc bytes, L1/L2-resident). */
static void rows_qmm(const Weights *W, const Acts *A, float *y, Py_ssize_t ldy, int accumulate, Py_ssize_t r0,
                     Py_ssize_t r1, uint8_t *tile) {
    const Py_ssize_t B = A->B, pc = W->pc, ns = W->nseg;
    float out[QMM_ACC * 16];
    float *tsc = (float *)(tile + QMM_ACC * pc), *tof = tsc + QMM_ACC * ns; /* GGML: the tile's scales */
    for (Py_ssize_t r = r0; r < r1; r += QMM_ACC) {
        const int nt = r1 - r < QMM_ACC ? (int)(r1 - r) : QMM_ACC; /* rows of this tile */
        const uint8_t *codes = W->w + r * pc;
        const float *sc = W->scale + r * ns, *of = W->offset + r * ns;
        if (W->kind != K_STI) {
            for (int i = 0; i < nt; i++) unpack_row_ggml(W, r + i, tile + i * pc, tsc + i * ns, tof + i * ns);
            codes = tile, sc = tsc, of = tof;
        } else if (!QMM_IN_PLACE(W)) {
            for (int i = 0; i < nt; i++) unpack_row_u8(W, r + i, tile + i * pc);
            codes = tile;
        }
        for (Py_ssize_t v0 = 0; v0 < A->nv; v0 += 2) {
            const int VC = A->nv - v0 >= 2 ? 2 : 1, RMAX = QMM_ACC / VC;
            for (int i0 = 0; i0 < nt; i0 += RMAX) {
                const int nr = nt - i0 < RMAX ? nt - i0 : RMAX;
                const uint8_t *c = codes + i0 * pc;
                const float *s_ = sc + i0 * ns, *o_ = of + i0 * ns;
#define QMM_CASE(N) \
    case N: VC == 2 ? qmm_tile(N, 2, W, A, s_, o_, v0, c, out) : qmm_tile(N, 1, W, A, s_, o_, v0, c, out); break
                switch (nr) {
                    QMM_CASE(1); QMM_CASE(2); QMM_CASE(3); QMM_CASE(4); QMM_CASE(5); QMM_CASE(6);
                    case 7: qmm_tile(7, 1, W, A, s_, o_, v0, c, out); break;
                    case 8: qmm_tile(8, 1, W, A, s_, o_, v0, c, out); break;
                    case 9: qmm_tile(9, 1, W, A, s_, o_, v0, c, out); break;
                    case 10: qmm_tile(10, 1, W, A, s_, o_, v0, c, out); break;
                    case 11: qmm_tile(11, 1, W, A, s_, o_, v0, c, out); break;
                    default: qmm_tile(12, 1, W, A, s_, o_, v0, c, out); break;
                }
#undef QMM_CASE
                if (A->orow) qmm_outliers(W, A, r + i0, nr, v0, VC, out);
                for (int v = 0; v < VC; v++) {
                    const Py_ssize_t b0 = (v0 + v) * 16, nl = B - b0 < 16 ? B - b0 : 16;
                    store_tile(out + v * 16, VC * 16, nr, nl, y + b0 * ldy + r + i0, ldy, accumulate);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------- thread pool
 * A call splits its rows into tasks and publishes them as a Job. The calling thread claims tasks
 * itself from the start and never waits for a helper that has not claimed one: on a loaded
 * machine a helper may not be scheduled for milliseconds, and with fork/join (OpenMP) a 20 us
 * product then takes as long as that delay (measured on this 2-core machine at load average 9:
 * 0.05 ms -> 12 ms). Nor does it wait long for a helper preempted in the middle of a task:
 * helpers write their rows into the job's own buffer, and once the caller has run out of tasks
 * it waits only until a helper's task is due (its claim time plus the caller's own longest task,
 * +25%), then recomputes any task still out ("steals" it). Such a job outlives the call: it owns
 * its copy of x and holds a reference to the Matrix whose buffers it reads until the late helper
 * is done; the next call into the module frees it. Dequantization writes the caller's output
 * directly, so it waits for its helpers instead.
 *
 * Helpers poll for the next job for SPIN_NS before sleeping: decode issues the next product
 * within microseconds, and waking a sleeping thread costs tens of them. Every wait pauses a few
 * times, then yields: on a loaded machine the thread waited for may share this core. A second
 * concurrent caller does not queue behind a running job: it runs its own alone. Claims take a
 * mutex; tasks are sized to a few microseconds and more. */

#define MAX_THREADS 16
#define SPIN_NS 100000L

typedef struct Job Job;
typedef void (*task_fn)(Job *J, Py_ssize_t task, int slot);
enum { T_FREE, T_CALLER, T_HELPER, T_HELPER_DONE, T_STOLEN }; /* task states, changed under pool.mu */

struct Job {
    task_fn fn;
    Weights W; /* a copy: the job may outlive the call */
    Acts A;    /* owned */
    float *y;  /* the caller's output; only the caller writes it */
    float *yh; /* owned, (B, rows): rows computed by helpers, merged into y by the caller */
    float *out; /* dequant: the output, written by every thread */
    int accumulate, may_steal, int8; /* int8: qmm, else matvec */
    int own_as; /* qmm_cols: every As[i] owns its buffers */
    Py_ssize_t rows_per_task, ntask, next;
    unsigned char *state;   /* per task */
    long *claimed_at;       /* per task: when a helper claimed it (now_ns) */
    atomic_long running;    /* tasks in state T_HELPER */
    int want, joined, refs; /* helpers wanted and joined; refs: the caller and helpers inside */
    float *buf[MAX_THREADS]; /* per slot: the batched path's tile, or dequant's padded row */
    atomic_int nomem;
    PyObject *owner; /* the Matrix, kept alive while a helper may read its buffers */
    Job *dead_next;
    /* qmm of several matrices side by side (qmm_prog): item i is Ws[i] with activations As[i]
     * (copies of A with the item's own outlier rows), its output columns from ycol[i] of a
     * (B, ldy) y; task t computes rows task_r0[t] .. + rows_per_task of item task_item[t] */
    Weights *Ws;
    Acts *As;
    Py_ssize_t nW, ldy, *ycol, *task_item, *task_r0, *orows;
    struct TActs *T; /* qmmt_prog: the transposed product's activations and code words (owned) */
    sti_task_fn loop; /* parallel_for: another module's task and its context */
    void *loop_ctx;
};

static long now_ns(void) {
#if LB_THREADS
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
#else
    return 0;
#endif
}

#if LB_THREADS
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, idle;
    atomic_uint gen; /* bumped per published job, under mu; spinning helpers watch it without mu */
    int started, sleeping;
    Job *job;  /* the job helpers may join, or NULL */
    Job *dead; /* jobs whose caller left before their last helper: freed by the next caller (GIL) */
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .idle = PTHREAD_COND_INITIALIZER};

/* One step of a wait loop: a pause for the first iterations, then a yield, so that a thread we
 * wait for that shares our core (a loaded machine) gets it. */
static inline void wait_step(int i) {
    if (i < 64) {
#if LB_AVX2
        _mm_pause();
#endif
    } else {
        sched_yield();
    }
}

/* Tests only (_test_helper_delay): helpers sleep this long before each task, standing in for a
 * helper preempted mid-task, so that the caller's take-over path runs deterministically. */
static atomic_long helper_delay_ns;
static atomic_long n_helper_tasks, n_stolen_tasks; /* counters for _pool_state */

static void *helper_main(void *unused) {
    (void)unused;
    unsigned done = 0; /* the last job this helper joined */
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        Job *J = pool.job;
        unsigned g = atomic_load(&pool.gen);
        if (J && g != done && J->joined < J->want && J->next < J->ntask) {
            done = g;
            int slot = ++J->joined;
            J->refs++;
            while (J->next < J->ntask) {
                Py_ssize_t t = J->next++;
                J->state[t] = T_HELPER;
                J->claimed_at[t] = now_ns();
                J->running++;
                pthread_mutex_unlock(&pool.mu);
                long delay = atomic_load_explicit(&helper_delay_ns, memory_order_relaxed);
                if (delay) nanosleep(&(struct timespec){delay / 1000000000L, delay % 1000000000L}, NULL);
                J->fn(J, t, slot);
                pthread_mutex_lock(&pool.mu);
                if (J->state[t] == T_HELPER) J->state[t] = T_HELPER_DONE, n_helper_tasks++; /* else: stolen */
                if (--J->running == 0) pthread_cond_signal(&pool.idle);
            }
            if (--J->refs == 0) J->dead_next = pool.dead, pool.dead = J; /* its caller has left */
            continue;
        }
        pthread_mutex_unlock(&pool.mu);
        long until = now_ns() + SPIN_NS;
        for (int i = 0; atomic_load_explicit(&pool.gen, memory_order_relaxed) == g; i++) {
            wait_step(i);
            if (!(i & 15) && now_ns() > until) break;
        }
        pthread_mutex_lock(&pool.mu);
        if (atomic_load(&pool.gen) == g) {
            pool.sleeping++;
            while (atomic_load(&pool.gen) == g) pthread_cond_wait(&pool.wake, &pool.mu);
            pool.sleeping--;
        }
    }
    return NULL;
}

static void pool_after_fork(void) { /* the child has only the forking thread: start afresh */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.started = pool.sleeping = 0;
    pool.job = pool.dead = NULL; /* leaked in the child, where their helpers do not exist */
}
#endif

/* Run every task of J on up to `threads` threads: slot 0 is the caller, helpers are 1 ..
 * threads-1. On return every task has run to completion on the caller (T_CALLER, T_STOLEN) or a
 * helper (T_HELPER_DONE); J->state no longer changes. The caller still holds its ref on J. */
static void pool_run(Job *J, int threads) {
#if LB_THREADS
    if (threads > 1 && J->ntask > 1) {
        pthread_mutex_lock(&pool.mu);
        if (!pool.job) {
            while (pool.started < threads - 1) {
                pthread_t th;
                pthread_attr_t attr;
                pthread_attr_init(&attr);
                pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
                int err = pthread_create(&th, &attr, helper_main, NULL);
                pthread_attr_destroy(&attr);
                if (err) break; /* fewer helpers: the caller does the rest */
                pool.started++;
            }
            J->want = threads - 1;
            pool.job = J;
            atomic_fetch_add(&pool.gen, 1u);
            if (pool.sleeping) pthread_cond_broadcast(&pool.wake);
            long longest = 0; /* the caller's longest task: the yardstick of a helper's lateness */
            while (J->next < J->ntask) {
                Py_ssize_t t = J->next++;
                J->state[t] = T_CALLER;
                pthread_mutex_unlock(&pool.mu);
                long t0 = now_ns();
                J->fn(J, t, 0);
                t0 = now_ns() - t0;
                longest = t0 > longest ? t0 : longest;
                pthread_mutex_lock(&pool.mu);
            }
            pool.job = NULL; /* no more joins */
            if (J->running) {
                /* a helper's task is due `longest` after its claim (+25% and 2 us): wait until then */
                long due = 0;
                for (Py_ssize_t t = 0; t < J->ntask; t++)
                    if (J->state[t] == T_HELPER && J->claimed_at[t] > due) due = J->claimed_at[t];
                due += longest + longest / 4 + 2000;
                long until = J->may_steal ? due : now_ns() + SPIN_NS; /* dequant: then sleep until done */
                pthread_mutex_unlock(&pool.mu);
                for (int i = 0; atomic_load(&J->running); i++) {
                    wait_step(i);
                    if (!(i & 15) && now_ns() > until) break;
                }
                pthread_mutex_lock(&pool.mu);
                if (!J->may_steal)
                    while (J->running) pthread_cond_wait(&pool.idle, &pool.mu);
            }
            Py_ssize_t stolen = 0;
            for (Py_ssize_t t = 0; t < J->ntask; t++)
                if (J->state[t] == T_HELPER) J->state[t] = T_STOLEN, stolen++, n_stolen_tasks++;
            pthread_mutex_unlock(&pool.mu);
            for (Py_ssize_t t = 0; stolen && t < J->ntask; t++)
                if (J->state[t] == T_STOLEN) J->fn(J, t, 0);
            return;
        }
        pthread_mutex_unlock(&pool.mu);
    }
#endif
    (void)threads;
    for (Py_ssize_t t = 0; t < J->ntask; t++) J->fn(J, t, 0);
}

/* Rows per task: about 4 tasks per thread (balance on a shared machine), at most 256 rows (a late
 * helper's task is recomputed, so keep it short), at least 16 (a claim costs ~0.1 us). */
static Py_ssize_t task_rows(Py_ssize_t rows, int threads) {
    if (threads <= 1) return rows > 0 ? rows : 1;
    Py_ssize_t r = (rows + 4 * threads - 1) / (4 * threads);
    r = r > 256 ? 256 : r < 16 ? 16 : r;
    return (r + RT - 1) / RT * RT;
}

/* ------------------------------------------------------------------------- jobs */

static void job_free(Job *J) {
    if (!J) return;
    for (int i = 0; i < MAX_THREADS; i++) free(J->buf[i]);
    free(J->A.x);
    free(J->A.xv);
    free(J->A.xt);
    free(J->yh);
    free(J->state);
    free(J->claimed_at);
    free(J->Ws);
    if (J->own_as && J->As)
        for (Py_ssize_t i = 0; i < J->nW; i++) free(J->As[i].x), free(J->As[i].xv), free(J->As[i].xt);
    free(J->As);
    free(J->ycol);
    free(J->task_item);
    free(J->task_r0);
    free(J->orows);
    if (J->T) {
        block_put(J->T->buf);
        free(J->T);
    }
    free(J);
}

static Job *job_alloc(const Weights *W, task_fn fn, PyObject *owner, Py_ssize_t rows_per_task, Py_ssize_t ntask) {
    Job *J = calloc(1, sizeof *J);
    if (!J) return NULL;
    J->fn = fn, J->W = *W, J->refs = 1, J->owner = owner;
    J->rows_per_task = rows_per_task, J->ntask = ntask;
    J->state = calloc((size_t)J->ntask + 1, 1);
    J->claimed_at = calloc((size_t)J->ntask + 1, sizeof(long));
    if (!J->state || !J->claimed_at) return job_free(J), NULL;
    return J;
}

static Job *job_new(const Weights *W, task_fn fn, int threads, PyObject *owner) {
    Py_ssize_t rpt = task_rows(W->rows, threads);
    return job_alloc(W, fn, owner, rpt, (W->rows + rpt - 1) / rpt);
}

/* The caller lets go of J: 1 if a late helper still holds it (it is freed later), else 0. */
static int job_leave(Job *J) {
#if LB_THREADS
    pthread_mutex_lock(&pool.mu);
    int left_behind = --J->refs > 0;
    pthread_mutex_unlock(&pool.mu);
    return left_behind;
#else
    return --J->refs > 0;
#endif
}

/* Free the jobs late helpers have finished since; needs the GIL (drops their Matrix references). */
static void bury_dead(void) {
#if LB_THREADS
    pthread_mutex_lock(&pool.mu);
    Job *d = pool.dead;
    pool.dead = NULL;
    pthread_mutex_unlock(&pool.mu);
    while (d) {
        Job *next = d->dead_next;
        PyObject *owner = d->owner;
        job_free(d);
        Py_XDECREF(owner);
        d = next;
    }
#endif
}

static float *slot_buf(Job *J, int slot, Py_ssize_t floats) {
    if (!J->buf[slot]) J->buf[slot] = aligned_alloc(64, ((size_t)floats * sizeof(float) + 63) & ~(size_t)63);
    if (!J->buf[slot]) atomic_store(&J->nomem, 1);
    return J->buf[slot];
}

/* floats of a qmm row tile: QMM_ACC rows of codes (bytes), and for GGML their scales and offsets */
#define QMM_TILE_FLOATS(W) ((QMM_ACC * (W)->pc + 3) / 4 + 2 * QMM_ACC * (W)->nseg)

static void matvec_task(Job *J, Py_ssize_t t, int slot) {
    Py_ssize_t r0 = t * J->rows_per_task, r1 = r0 + J->rows_per_task;
    if (r1 > J->W.rows) r1 = J->W.rows;
    float *y = slot ? J->yh : J->y; /* helpers never touch the caller's memory */
    int accumulate = slot ? 0 : J->accumulate;
    if (J->int8) {
        const int in_place = J->W.kind == K_STI && QMM_IN_PLACE(&J->W);
        uint8_t *tile = in_place ? NULL : (uint8_t *)slot_buf(J, slot, QMM_TILE_FLOATS(&J->W));
        if (in_place || tile) rows_qmm(&J->W, &J->A, y, J->W.rows, accumulate, r0, r1, tile);
    } else if (J->W.kind != K_STI) {
        rows_ggml(&J->W, &J->A, y, accumulate, r0, r1);
    } else if (J->A.B == 1) {
        rows_b1(&J->W, &J->A, y, accumulate, r0, r1);
    } else {
        float *tile = slot_buf(J, slot, RT * J->W.pc);
        if (tile) rows_batched(&J->W, &J->A, y, accumulate, r0, r1, tile);
    }
}

static void dequant_task(Job *J, Py_ssize_t t, int slot) {
    const Weights *W = &J->W;
    Py_ssize_t r0 = t * J->rows_per_task, r1 = r0 + J->rows_per_task;
    if (r1 > W->rows) r1 = W->rows;
    float *row = W->pc != W->cols ? slot_buf(J, slot, W->pc) : NULL; /* sti-q1 with padded groups */
    if (W->pc != W->cols && !row) return;
    for (Py_ssize_t r = r0; r < r1; r++) {
        deq_row(W, r, row ? row : J->out + r * W->cols);
        if (row) memcpy(J->out + r * W->cols, row, (size_t)W->cols * sizeof(float));
    }
}

/* ------------------------------------------------------------------------- other kernels' loops
 * parallel_for (see _parallel.h): the tasks write the caller's memory, so like dequantization the
 * caller waits for every helper's task instead of recomputing a late one. */
static void loop_task(Job *J, Py_ssize_t t, int slot) { J->loop(J->loop_ctx, t, slot); }

static int parallel_for(sti_task_fn fn, void *ctx, Py_ssize_t ntask, int threads) {
    const Weights none = {0};
    Job *J = job_alloc(&none, loop_task, NULL, 1, ntask);
    if (!J) return -1;
    J->loop = fn, J->loop_ctx = ctx;
    pool_run(J, threads > MAX_THREADS ? MAX_THREADS : threads);
    if (!job_leave(J)) job_free(J); /* else a helper that joined too late for a task puts it on pool.dead */
    return 0;
}

static const StiParallel parallel_api = {STI_PARALLEL_VERSION, parallel_for};

/* y (B, rows) (+)= X (B, cols) @ W.T on up to `threads` threads. Returns 0, or -1 when out of
 * memory; *J_out is the job (or NULL), which the caller must job_leave and, unless a late helper
 * still holds it, job_free. */
static int run_matvec(const Weights *W, const float *X, Py_ssize_t B, float *y, int accumulate, int threads,
                      int int8, PyObject *owner, Job **J_out) {
    Job *J = *J_out = job_new(W, matvec_task, threads, owner);
    if (!J || prepare_acts(W, X, B, &J->A, !int8) || (int8 && prepare_acts_i8(W, &J->A))) return -1;
    J->y = y, J->accumulate = accumulate, J->may_steal = 1, J->int8 = int8;
    if (threads > 1 && J->ntask > 1 && !(J->yh = malloc((size_t)(B * W->rows) * sizeof(float) + 4))) return -1;
    pool_run(J, threads);
    if (atomic_load(&J->nomem)) return -1;
    for (Py_ssize_t t = 0; t < J->ntask; t++) { /* the helpers' rows */
        if (J->state[t] != T_HELPER_DONE) continue;
        Py_ssize_t r0 = t * J->rows_per_task, n = (r0 + J->rows_per_task < W->rows ? J->rows_per_task : W->rows - r0);
        for (Py_ssize_t b = 0; b < B; b++) {
            float *dst = y + b * W->rows + r0;
            const float *src = J->yh + b * W->rows + r0;
            for (Py_ssize_t i = 0; i < n; i++) dst[i] = accumulate ? dst[i] + src[i] : src[i];
        }
    }
    if (W->nout && !J->A.orow) apply_outliers(W, &J->A, y);
    return 0;
}

static void qmm_many_task(Job *J, Py_ssize_t t, int slot) {
    const Py_ssize_t i = J->task_item[t], r0 = J->task_r0[t];
    const Weights *W = &J->Ws[i];
    const Py_ssize_t r1 = r0 + J->rows_per_task < W->rows ? r0 + J->rows_per_task : W->rows;
    if (!J->int8) { /* one vector: the fused products */
        rows_b1(W, &J->As[i], (slot ? J->yh : J->y) + J->ycol[i], slot ? 0 : J->accumulate, r0, r1);
        return;
    }
    uint8_t *tile = NULL;
    if (!QMM_IN_PLACE(W) && !(tile = (uint8_t *)slot_buf(J, slot, QMM_TILE_FLOATS(&J->W)))) return;
    rows_qmm(W, &J->As[i], (slot ? J->yh : J->y) + J->ycol[i], J->ldy, slot ? 0 : J->accumulate, r0, r1, tile);
}

/* y (B, ldy) (+)= X (B, cols) @ [Ws[0]; Ws[1]; ...].T: the n sti-q1 matrices (same cols and
 * group size, sorted outliers) side by side, x rounded once. `fused` (B = 1): the fused products
 * instead, each matrix's outliers added after its rows, as run_matvec does. Returns 0, or -1 when
 * out of memory; *J_out as for run_matvec. */
static int run_qmm_many(const Weights *Ws, Py_ssize_t n, const float *X, Py_ssize_t B, float *y, Py_ssize_t ldy,
                        int accumulate, int threads, int fused, PyObject *owner, Job **J_out) {
    const Py_ssize_t rpt = task_rows(ldy, threads);
    Py_ssize_t ntask = 0, nrow = 0;
    int any_out = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        ntask += (Ws[i].rows + rpt - 1) / rpt;
        nrow += Ws[i].nout && !fused ? Ws[i].rows + 1 : 0;
        any_out |= Ws[i].nout > 0 && !fused;
    }
    Job *J = *J_out = job_alloc(&Ws[0], qmm_many_task, owner, rpt, ntask);
    if (!J) return -1;
    J->nW = n, J->ldy = ldy, J->y = y, J->accumulate = accumulate, J->may_steal = 1, J->int8 = !fused;
    J->Ws = malloc((size_t)n * sizeof(Weights));
    J->As = malloc((size_t)n * sizeof(Acts));
    J->ycol = malloc((size_t)n * sizeof(Py_ssize_t));
    J->task_item = malloc((size_t)ntask * sizeof(Py_ssize_t));
    J->task_r0 = malloc((size_t)ntask * sizeof(Py_ssize_t));
    J->orows = nrow ? malloc((size_t)nrow * sizeof(Py_ssize_t)) : NULL;
    if (!J->Ws || !J->As || !J->ycol || !J->task_item || !J->task_r0 || (nrow && !J->orows)) return -1;
    if (prepare_acts(&Ws[0], X, B, &J->A, fused) || (!fused && acts_i8(&Ws[0], &J->A)) ||
        (any_out && acts_xt(&Ws[0], &J->A, 0)))
        return -1;
    Py_ssize_t t = 0, col = 0, *orow = J->orows;
    for (Py_ssize_t i = 0; i < n; i++) {
        J->Ws[i] = Ws[i], J->As[i] = J->A, J->ycol[i] = col;
        col += Ws[i].rows;
        if (Ws[i].nout && !fused) {
            outlier_rows(&Ws[i], orow);
            J->As[i].orow = orow;
            orow += Ws[i].rows + 1;
        }
        for (Py_ssize_t r = 0; r < Ws[i].rows; r += rpt) J->task_item[t] = i, J->task_r0[t++] = r;
    }
    if (threads > 1 && ntask > 1 && !(J->yh = malloc((size_t)(B * ldy) * sizeof(float) + 4))) return -1;
    pool_run(J, threads);
    if (atomic_load(&J->nomem)) return -1;
    for (t = 0; t < ntask; t++) { /* the helpers' rows */
        if (J->state[t] != T_HELPER_DONE) continue;
        const Py_ssize_t i = J->task_item[t], r0 = J->task_r0[t];
        const Py_ssize_t c0 = J->ycol[i] + r0, nr = r0 + rpt < Ws[i].rows ? rpt : Ws[i].rows - r0;
        for (Py_ssize_t b = 0; b < B; b++) {
            float *dst = y + b * ldy + c0;
            const float *src = J->yh + b * ldy + c0;
            for (Py_ssize_t k = 0; k < nr; k++) dst[k] = accumulate ? dst[k] + src[k] : src[k];
        }
    }
    if (fused)
        for (Py_ssize_t i = 0; i < n; i++)
            if (Ws[i].nout) apply_outliers(&Ws[i], &J->A, y + J->ycol[i]); /* B = 1: y's rows are contiguous */
    return 0;
}

/* B = 1, rows r0 .. r1-1: each of W's outliers in them adds (exact - quantized) * x, in index order
 * (as apply_outliers adds them) */
static void band_outliers(const Weights *W, const Acts *A, float *y, Py_ssize_t r0, Py_ssize_t r1) {
    for (Py_ssize_t j = A->orow[r0]; j < A->orow[r1]; j++) {
        Py_ssize_t r = W->oidx[j] / W->cols, c = W->oidx[j] % W->cols;
        y[r] += outlier_delta(W, j, r, c) * A->x[c];
    }
}

static void qmm_cols_task(Job *J, Py_ssize_t t, int slot) {
    const Py_ssize_t rows = J->Ws[0].rows, r0 = t * J->rows_per_task;
    const Py_ssize_t r1 = r0 + J->rows_per_task < rows ? r0 + J->rows_per_task : rows;
    float *y = slot ? J->yh : J->y;
    uint8_t *tile = NULL;
    for (Py_ssize_t i = 0; i < J->nW; i++) {
        const Weights *W = &J->Ws[i];
        if (!J->int8) { /* one vector: the fused products, then the item's outliers in the band */
            rows_b1(W, &J->As[i], y, i ? 1 : J->accumulate, r0, r1);
            if (J->As[i].orow) band_outliers(W, &J->As[i], y, r0, r1);
            continue;
        }
        if (!QMM_IN_PLACE(W) && !tile && !(tile = (uint8_t *)slot_buf(J, slot, QMM_TILE_FLOATS(&J->W)))) return;
        rows_qmm(W, &J->As[i], y, rows, i ? 1 : J->accumulate, r0, r1, tile);
    }
}

/* y (B, rows) (+)= sum_i X[:, c_i : c_i + cols_i] @ Ws[i].T, c_i = cols_0 + ... + cols_(i-1): the
 * n sti-q1 matrices (same rows and group size, sorted outliers) side by side along the columns, as
 * a matrix cut along its input axis (a layer's output or down projection in shards). A task owns a
 * band of rows and sums every item into it, item by item, so every output is the sum in item order
 * of the items' own qmm results, whatever the thread count. Returns 0, or -1 when out of memory;
 * *J_out as for run_matvec. */
static int run_qmm_cols(const Weights *Ws, Py_ssize_t n, const float *X, Py_ssize_t B, float *y, int accumulate,
                        int threads, int fused, PyObject *owner, Job **J_out) {
    const Py_ssize_t rows = Ws[0].rows, rpt = task_rows(rows, threads), ntask = (rows + rpt - 1) / rpt;
    Py_ssize_t widest = 0, ldx = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (Ws[i].pc > Ws[widest].pc) widest = i;
        ldx += Ws[i].cols;
    }
    Job *J = *J_out = job_alloc(&Ws[widest], qmm_cols_task, owner, rpt, ntask); /* J->W: the widest tile */
    if (!J) return -1;
    J->y = y, J->accumulate = accumulate, J->may_steal = 1, J->int8 = !fused;
    J->Ws = malloc((size_t)n * sizeof(Weights));
    J->As = calloc((size_t)n, sizeof(Acts));
    Py_ssize_t nrow = 0;
    for (Py_ssize_t i = 0; i < n; i++) nrow += fused && Ws[i].nout ? rows + 1 : 0;
    J->orows = nrow ? malloc((size_t)nrow * sizeof(Py_ssize_t)) : NULL;
    if (!J->Ws || !J->As || (nrow && !J->orows)) return -1;
    J->nW = n, J->own_as = 1;
    Py_ssize_t *orow = J->orows;
    for (Py_ssize_t i = 0, col = 0; i < n; col += Ws[i].cols, i++) {
        Acts *A = &J->As[i];
        J->Ws[i] = Ws[i];
        if (prepare_acts_ld(&Ws[i], X + col, ldx, B, A, fused) || (!fused && prepare_acts_i8(&Ws[i], A)))
            return -1; /* sorted outliers: applied per row band */
        if (fused && Ws[i].nout) {
            A->orow = orow, orow += rows + 1;
            outlier_rows(&Ws[i], A->orow);
        }
    }
    if (threads > 1 && ntask > 1) {
        /* helpers sum into their own copy of y, so that a sum starts from y's value as the
         * caller's does: ((y + item 0) + item 1) + ..., the same bits on any thread */
        if (!(J->yh = malloc((size_t)(B * rows) * sizeof(float) + 4))) return -1;
        if (accumulate) memcpy(J->yh, y, (size_t)(B * rows) * sizeof(float));
    }
    pool_run(J, threads);
    if (atomic_load(&J->nomem)) return -1;
    for (Py_ssize_t t = 0; t < ntask; t++) { /* the helpers' rows */
        if (J->state[t] != T_HELPER_DONE) continue;
        const Py_ssize_t r0 = t * rpt, nr = r0 + rpt < rows ? rpt : rows - r0;
        for (Py_ssize_t b = 0; b < B; b++)
            memcpy(y + b * rows + r0, J->yh + b * rows + r0, (size_t)nr * sizeof(float));
    }
    return 0;
}

/* ------------------------------------------------------------------------- int8 products, transposed
 * Y (B, H) (+)= X (B, N) @ W for W (N, H): several sti-q1 matrices stacked along N (an encoder
 * chunk's output or down projection, stored input-major: a row is one input, its groups of G
 * columns are groups of outputs). A group's scale and offset belong to an input row, so they are
 * folded into x: for output group g, z_g[b, i] = x[b, i] * scale[i, g] is rounded to int8 per
 * (vector, g, block of TKB input rows of one item: their codes share a bitwidth, so the rounding
 * errors of z meet codes of one range), dz = max|z| / 127 as in qmm, and
 *
 *     y[b, j] = sum_k dz[b, g, k] * (sum_{i in block k} q_g[b, i] code[i, j])  +  sum_i x[b, i] offset[i, g]
 *
 * with g = j / G, plus each outlier's (exact - quantized) * x. The inner sums want four consecutive
 * inputs of one output column in a dword (vpdpbusd), so the codes of each quad of rows are unpacked
 * and interleaved into words w4[i / 4][j] first; then tiles of output columns x 16-vector groups run
 * as in qmm. Items' rows must be a multiple of 4 (a quad never spans two items). */



/* The preparation runs on the product's threads in two parallel_for phases: the codes (quads of
 * rows: scale and offset transposed, rows unpacked and interleaved into w4), then the activations
 * (16-vector groups: x padded, transposed and rounded per group and block); the outliers, which
 * need every quad's codes and a stable order by column, are sorted between the two, serially. */
struct Prep {
    const Weights *Ws;
    const float *X;
    struct TActs *T;
    const Py_ssize_t *p0; /* item k's first padded input row; p0[n] = NP */
    Py_ssize_t n, qpt;    /* items; quads per phase-one task */
    float *st, *ot, *xp;  /* scale and offset transposed, [g][p]; x, [b][p]; 0 in the padding */
    uint8_t *u;           /* per slot: a quad of rows unpacked to bytes, 4 pc each */
    Py_ssize_t ub;        /* bytes of one slot's u */
};

static void prep_codes(void *ctx, Py_ssize_t t, int slot) {
    const struct Prep *P = ctx;
    const struct TActs *T = P->T;
    const Py_ssize_t H = T->H, ng = T->ng, NP = T->NP;
    Py_ssize_t q1 = (t + 1) * P->qpt, k = 0;
    q1 = q1 < T->NQ ? q1 : T->NQ;
    uint8_t *u = P->u + slot * P->ub;
    for (Py_ssize_t iq = t * P->qpt; iq < q1; iq++) {
        const Py_ssize_t i = 4 * iq;
        while (P->p0[k + 1] <= i) k++;
        const Weights *W = &P->Ws[k];
        const Py_ssize_t r = i - P->p0[k], pc = W->pc;
        uint32_t *w = T->w4 + iq * H;
        if (r >= W->rows) { /* a padding quad: no codes, scale and offset 0 */
            memset(w, 0, (size_t)H * 4);
            for (Py_ssize_t g = 0; g < ng; g++)
                for (int q = 0; q < 4; q++) P->st[g * NP + i + q] = P->ot[g * NP + i + q] = 0.0f;
            continue;
        }
        for (int q = 0; q < 4; q++) {
            for (Py_ssize_t g = 0; g < ng; g++)
                P->st[g * NP + i + q] = W->scale[(r + q) * ng + g], P->ot[g * NP + i + q] = W->offset[(r + q) * ng + g];
            if (W->bits == 8)
                memcpy(u + q * pc, W->w + (r + q) * pc, (size_t)pc);
            else
                unpack_row_u8(W, r + q, u + q * pc);
        }
        Py_ssize_t j = 0;
#if LB_AVX512
        /* 64 columns at a time: bytes of rows 0/1 and 2/3 paired, then the pairs, which leaves
         * columns 16 L + 4 m .. + 3 in block L of word vector m: transpose those blocks */
        for (; j + 64 <= H; j += 64) {
            const __m512i r0 = _mm512_loadu_si512(u + j), r1 = _mm512_loadu_si512(u + pc + j);
            const __m512i r2 = _mm512_loadu_si512(u + 2 * pc + j), r3 = _mm512_loadu_si512(u + 3 * pc + j);
            const __m512i lo01 = _mm512_unpacklo_epi8(r0, r1), hi01 = _mm512_unpackhi_epi8(r0, r1);
            const __m512i lo23 = _mm512_unpacklo_epi8(r2, r3), hi23 = _mm512_unpackhi_epi8(r2, r3);
            __m512 m[4] = {_mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)),
                           _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)),
                           _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)),
                           _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23))};
            transpose_blocks(&m[0], &m[1], &m[2], &m[3]);
            for (int L = 0; L < 4; L++) _mm512_storeu_si512((void *)(w + j + 16 * L), _mm512_castps_si512(m[L]));
        }
        for (; j + 16 <= H; j += 16) {
            __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(u + j)));
            a = _mm512_or_si512(a, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(u + pc + j))), 8));
            a = _mm512_or_si512(a, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(u + 2 * pc + j))), 16));
            a = _mm512_or_si512(a, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(u + 3 * pc + j))), 24));
            _mm512_storeu_si512((void *)(w + j), a);
        }
#endif
        for (; j < H; j++)
            w[j] = (uint32_t)u[j] | (uint32_t)u[pc + j] << 8 | (uint32_t)u[2 * pc + j] << 16 | (uint32_t)u[3 * pc + j] << 24;
    }
}

/* Vectors 16 t .. 16 t + 15: their rows of xp (x, 0 in the padding), then z_g block by block.
 * AVX-512: the batch across the lanes (x transposed: xl[p][16 v + lane]), so a block's max and the
 * offset sums need no horizontal steps, and four inputs' int8 codes of 16 vectors are one 64-byte
 * store; a block is rounded for every group while it is in L1. Else vector by vector. Both:
 * z = x * scale, then rint(z * id) with id = 127 / max|z| (0 for an all-zero block), as
 * qmm_numpy rounds; the offset sums add inputs in ascending order. */
static void prep_acts(void *ctx, Py_ssize_t v, int slot) {
    (void)slot;
    const struct Prep *P = ctx;
    struct TActs *T = P->T;
    const Py_ssize_t B = T->B, NP = T->NP, N = T->N, ng = T->ng, nv = T->nv, NK = T->NK, NQ = T->NQ;
    const Py_ssize_t b1 = 16 * v + 16 < B ? 16 * v + 16 : B;
    for (Py_ssize_t b = 16 * v; b < b1; b++) {
        float *row = P->xp + b * NP;
        for (Py_ssize_t k = 0, x0 = 0; k < P->n; x0 += P->Ws[k].rows, k++) {
            const Py_ssize_t rows = P->Ws[k].rows;
            memcpy(row + P->p0[k], P->X + b * N + x0, (size_t)rows * sizeof(float));
            memset(row + P->p0[k] + rows, 0, (size_t)(P->p0[k + 1] - P->p0[k] - rows) * sizeof(float));
        }
    }
#if LB_AVX512
    float *xl = (float *)T->xl;
    for (Py_ssize_t i0 = 0; i0 < NP; i0 += 16) { /* 16 vectors x 16 inputs, transposed in registers */
        __m512 r[16];
        for (int l = 0; l < 16; l++)
            r[l] = 16 * v + l < B ? _mm512_loadu_ps(P->xp + (16 * v + l) * NP + i0) : _mm512_setzero_ps();
        transpose16(r);
        for (int i = 0; i < 16; i++) _mm512_store_ps(xl + ((i0 + i) * nv + v) * 16, r[i]);
    }
    for (Py_ssize_t g = 0; g < ng; g++) _mm512_store_ps(T->ox + (g * nv + v) * 16, _mm512_setzero_ps());
    const __m512i lo = _mm512_set1_epi32(255);
    for (Py_ssize_t k = 0; k < NK; k++)
        for (Py_ssize_t g = 0; g < ng; g++) {
            const float *sg = P->st + g * NP, *og = P->ot + g * NP;
            __m512 zb[TKB], mx = _mm512_setzero_ps(), oa = _mm512_load_ps(T->ox + (g * nv + v) * 16);
            for (int i = 0; i < TKB; i++) {
                const Py_ssize_t p = k * TKB + i;
                __m512 xi = _mm512_load_ps(xl + (p * nv + v) * 16);
                zb[i] = _mm512_mul_ps(xi, _mm512_set1_ps(sg[p]));
                mx = _mm512_max_ps(mx, _mm512_abs_ps(zb[i]));
                oa = _mm512_fmadd_ps(xi, _mm512_set1_ps(og[p]), oa);
            }
            _mm512_store_ps(T->ox + (g * nv + v) * 16, oa);
            __mmask16 nz = _mm512_cmp_ps_mask(mx, _mm512_setzero_ps(), _CMP_NEQ_OQ);
            __m512 id = _mm512_maskz_div_ps(nz, _mm512_set1_ps(127.0f), mx);
            _mm512_store_ps(T->dz + ((g * NK + k) * nv + v) * 16, _mm512_div_ps(mx, _mm512_set1_ps(127.0f)));
            for (int iq = 0; iq < TKB / 4; iq++) {
                __m512i w = _mm512_setzero_si512();
                for (int m = 0; m < 4; m++) {
                    __m512i q = _mm512_and_si512(_mm512_cvtps_epi32(_mm512_mul_ps(zb[4 * iq + m], id)), lo);
                    w = _mm512_or_si512(w, _mm512_slli_epi32(q, 8 * m));
                }
                _mm512_store_si512((void *)(T->xv + ((g * NQ + k * TKB / 4 + iq) * nv + v) * 64), w);
            }
        }
#else
    float z[TKB];
    for (Py_ssize_t b = 16 * v; b < b1; b++) {
        const float *x = P->xp + b * NP;
        const Py_ssize_t lane = b % 16;
        for (Py_ssize_t g = 0; g < ng; g++) {
            const float *sg = P->st + g * NP, *og = P->ot + g * NP;
            float oacc = 0.0f;
            for (Py_ssize_t k = 0; k < NK; k++) {
                const Py_ssize_t i0 = k * TKB;
                float amax = 0.0f;
                for (Py_ssize_t i = 0; i < TKB; i++) {
                    z[i] = x[i0 + i] * sg[i0 + i];
                    oacc += x[i0 + i] * og[i0 + i];
                    amax = fabsf(z[i]) > amax ? fabsf(z[i]) : amax;
                }
                float id = amax != 0.0f ? 127.0f / amax : 0.0f;
                int8_t *dst = T->xv + ((g * NQ + i0 / 4) * nv + v) * 64 + 4 * lane;
                for (Py_ssize_t i = 0; i < TKB; i++) dst[(i / 4) * nv * 64 + i % 4] = (int8_t)nearbyintf(z[i] * id);
                T->dz[((g * NK + k) * nv + v) * 16 + lane] = amax / 127.0f;
            }
            T->ox[(g * nv + v) * 16 + lane] = oacc;
        }
    }
#endif
}

static int tacts_prepare(const Weights *Ws, Py_ssize_t n, const float *X, Py_ssize_t B, int threads,
                         struct TActs *T) {
    const Py_ssize_t H = Ws[0].cols, G = Ws[0].seg, ng = Ws[0].nseg, pc = Ws[0].pc;
    Py_ssize_t N = 0, NP = 0; /* inputs, and in the padded space where every item starts a block */
    for (Py_ssize_t k = 0; k < n; k++) N += Ws[k].rows, NP += (Ws[k].rows + TKB - 1) / TKB * TKB;
    const Py_ssize_t NQ = NP / 4, NK = NP / TKB, nv = (B + 15) / 16;
    *T = (struct TActs){.N = N, .NP = NP, .NQ = NQ, .NK = NK, .H = H, .ng = ng, .G = G, .B = B, .nv = nv};
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    size_t xvb = (size_t)(ng * NQ * nv * 64), dzf = (size_t)(ng * NK * nv * 16), oxf = (size_t)(ng * nv * 16),
           w4b = (size_t)(NQ * H) * 4, sf = (size_t)(2 * ng * NP + B * NP), ub = ((size_t)(4 * pc) + 63) & ~(size_t)63;
    const size_t xlf = LB_AVX512 ? (size_t)(NP * nv * 16) : 0; /* xl */
    Py_ssize_t nout = 0;
    for (Py_ssize_t k = 0; k < n; k++) nout += Ws[k].nout;
    const size_t ocb = (size_t)(2 * (H + 1) + nout + n + 1) * sizeof(Py_ssize_t), odb = (size_t)nout * sizeof(float);
    size_t total = xvb + (dzf + oxf + sf + xlf) * sizeof(float) + w4b + ub * (size_t)threads + ocb + odb + 8 * 64;
    uint8_t *p = block_get(total);
    if (!p) return -1;
    T->buf = p;
    struct Prep P = {.Ws = Ws, .X = X, .T = T, .n = n, .ub = (Py_ssize_t)ub};
#define TAKE(ptr, type, bytes) (ptr = (type)p, p += ((bytes) + 63) & ~(size_t)63)
    TAKE(T->xv, int8_t *, xvb);
    TAKE(T->dz, float *, dzf * sizeof(float));
    TAKE(T->ox, float *, oxf * sizeof(float));
    TAKE(T->w4, uint32_t *, w4b);
    TAKE(P.st, float *, sf * sizeof(float));
    P.ot = P.st + ng * NP, P.xp = P.ot + ng * NP;
    TAKE(P.u, uint8_t *, ub * (size_t)threads);
    float *xl;
    TAKE(xl, float *, xlf * sizeof(float));
    Py_ssize_t *cur, *p0; /* the next free slot of each column's outliers; items' first padded rows */
    TAKE(T->ocol, Py_ssize_t *, ocb);
    cur = T->ocol + H + 1, T->op = cur + H + 1, p0 = T->op + nout;
    TAKE(T->od, float *, odb);
#undef TAKE
    p0[0] = 0;
    for (Py_ssize_t k = 0; k < n; k++) p0[k + 1] = p0[k] + (Ws[k].rows + TKB - 1) / TKB * TKB;
    P.p0 = p0;
    T->xp = P.xp, T->xl = LB_AVX512 ? xl : NULL;
    /* phase one: about 4 tasks per thread, of at least 16 quads */
    P.qpt = threads > 1 ? (NQ + 4 * threads - 1) / (4 * threads) : NQ;
    P.qpt = P.qpt < 16 ? 16 : P.qpt;
    if (parallel_for(prep_codes, &P, (NQ + P.qpt - 1) / P.qpt, threads)) return -1;
    /* outliers sorted by column (stable: item order, then row), their (exact - quantized) weight
     * computed once: the tiles add delta * x for their own columns; codes from w4 */
    memset(T->ocol, 0, (size_t)(H + 1) * sizeof(Py_ssize_t));
    for (Py_ssize_t k = 0; k < n; k++)
        for (Py_ssize_t o = 0; o < Ws[k].nout; o++) T->ocol[Ws[k].oidx[o] % Ws[k].cols + 1]++;
    for (Py_ssize_t j = 0; j < H; j++) T->ocol[j + 1] += T->ocol[j];
    memcpy(cur, T->ocol, (size_t)H * sizeof(Py_ssize_t));
    for (Py_ssize_t k = 0; k < n; k++) {
        const Weights *W = &Ws[k];
        for (Py_ssize_t o = 0; o < W->nout; o++) {
            const Py_ssize_t rr = W->oidx[o] / W->cols, c = W->oidx[o] % W->cols, g = c / W->seg, at = cur[c]++;
            const Py_ssize_t i = p0[k] + rr;
            const float qw = (float)((T->w4[(i / 4) * H + c] >> (8 * (i % 4))) & 255u) * W->scale[rr * ng + g];
            T->od[at] = W->oval[o] - (qw + W->offset[rr * ng + g]);
            T->op[at] = i;
        }
    }
#if !LB_AVX512
    memset(T->xv, 0, xvb); /* the portable path writes vector by vector */
#endif
    return parallel_for(prep_acts, &P, nv, threads);
}

#if LB_VNNI
#define UNROLL _Pragma("GCC unroll 12")
/* R output columns from j0 (all in group g) times VC 16-vector groups from v0 into out[R][VC * 16]. */
static inline __attribute__((always_inline)) void qmmt_tile(const int R, const int VC, const struct TActs *T,
                                                            Py_ssize_t g, Py_ssize_t j0, Py_ssize_t v0, float *out) {
    const Py_ssize_t nv = T->nv, NQ = T->NQ, H = T->H;
    __m512 f[QMM_ACC][2];
    __m512i acc[QMM_ACC][2];
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int v = 0; v < VC; v++) f[r][v] = _mm512_setzero_ps();
    for (Py_ssize_t k = 0; k < T->NK; k++) {
        UNROLL for (int r = 0; r < R; r++)
            UNROLL for (int v = 0; v < VC; v++) acc[r][v] = _mm512_setzero_si512();
        const int8_t *xq = T->xv + ((g * NQ + k * TKB / 4) * nv + v0) * 64;
        const uint32_t *w = T->w4 + (k * TKB / 4) * H + j0;
        for (int iq = 0; iq < TKB / 4; iq++, xq += nv * 64, w += H) {
            __m512i xa[2];
            UNROLL for (int v = 0; v < VC; v++) xa[v] = _mm512_load_si512((const void *)(xq + v * 64));
            UNROLL for (int r = 0; r < R; r++) {
                __m512i wb = _mm512_set1_epi32((int)w[r]);
                UNROLL for (int v = 0; v < VC; v++) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], wb, xa[v]);
            }
        }
        UNROLL for (int v = 0; v < VC; v++) {
            __m512 d = _mm512_load_ps(T->dz + ((g * T->NK + k) * nv + v0 + v) * 16);
            UNROLL for (int r = 0; r < R; r++) f[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][v]), d, f[r][v]);
        }
    }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int v = 0; v < VC; v++) _mm512_storeu_ps(out + (r * VC + v) * 16, f[r][v]);
}
#undef UNROLL
#else
static void qmmt_tile(const int R, const int VC, const struct TActs *T, Py_ssize_t g, Py_ssize_t j0, Py_ssize_t v0,
                      float *out) {
    const Py_ssize_t nv = T->nv, NQ = T->NQ, H = T->H;
    for (int r = 0; r < R; r++)
        for (int v = 0; v < VC; v++)
            for (int lane = 0; lane < 16; lane++) {
                float f = 0.0f;
                for (Py_ssize_t k = 0; k < T->NK; k++) {
                    int32_t acc = 0;
                    for (Py_ssize_t i = k * TKB; i < (k + 1) * TKB; i++) {
                        uint32_t word = T->w4[(i / 4) * H + j0 + r];
                        acc += (int32_t)((word >> (8 * (i % 4))) & 255u) *
                               (int32_t)T->xv[((g * NQ + i / 4) * nv + v0 + v) * 64 + 4 * lane + i % 4];
                    }
                    f = fmaf((float)acc, T->dz[((g * T->NK + k) * nv + v0 + v) * 16 + lane], f);
                }
                out[(r * VC + v) * 16 + lane] = f;
            }
}
#endif

/* Task t: output columns task_r0[t] .. + rows_per_task, within group task_item[t]. */
static void qmmt_task(Job *J, Py_ssize_t t, int slot) {
    const struct TActs *T = J->T;
    const Py_ssize_t g = J->task_item[t], c0 = J->task_r0[t], H = T->H, B = T->B;
    const Py_ssize_t gend = (g + 1) * T->G < H ? (g + 1) * T->G : H;
    const Py_ssize_t c1 = c0 + J->rows_per_task < gend ? c0 + J->rows_per_task : gend;
    float *y = slot ? J->yh : J->y;
    const int accumulate = slot ? 0 : J->accumulate;
    float out[QMM_ACC * 16];
    for (Py_ssize_t v0 = 0; v0 < T->nv; v0 += 2) {
        const int VC = T->nv - v0 >= 2 ? 2 : 1, RMAX = QMM_ACC / VC;
        for (Py_ssize_t j = c0; j < c1; j += RMAX) {
            const int nr = c1 - j < RMAX ? (int)(c1 - j) : RMAX;
#define QMMT_CASE(N) \
    case N: VC == 2 ? qmmt_tile(N, 2, T, g, j, v0, out) : qmmt_tile(N, 1, T, g, j, v0, out); break
            switch (nr) {
                QMMT_CASE(1); QMMT_CASE(2); QMMT_CASE(3); QMMT_CASE(4); QMMT_CASE(5); QMMT_CASE(6);
                case 7: qmmt_tile(7, 1, T, g, j, v0, out); break;
                case 8: qmmt_tile(8, 1, T, g, j, v0, out); break;
                case 9: qmmt_tile(9, 1, T, g, j, v0, out); break;
                case 10: qmmt_tile(10, 1, T, g, j, v0, out); break;
                case 11: qmmt_tile(11, 1, T, g, j, v0, out); break;
                default: qmmt_tile(12, 1, T, g, j, v0, out); break;
            }
#undef QMMT_CASE
            for (int r = 0; r < nr; r++) /* outliers: (exact - quantized) * x */
                for (Py_ssize_t o = T->ocol[j + r]; o < T->ocol[j + r + 1]; o++)
                    for (int v = 0; v < VC; v++) {
                        float *dst = out + (r * VC + v) * 16;
#if LB_AVX512
                        const __m512 x = _mm512_load_ps(T->xl + (T->op[o] * T->nv + v0 + v) * 16);
                        _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_set1_ps(T->od[o]), x, _mm512_loadu_ps(dst)));
#else
                        for (int lane = 0; lane < 16 && (v0 + v) * 16 + lane < B; lane++)
                            dst[lane] += T->od[o] * T->xp[((v0 + v) * 16 + lane) * T->NP + T->op[o]];
#endif
                    }
            for (int r = 0; r < nr; r++)
                for (int v = 0; v < VC; v++)
                    for (int lane = 0; lane < 16; lane++) {
                        Py_ssize_t b = (v0 + v) * 16 + lane;
                        if (b >= B) break;
                        float *dst = y + b * H + j + r;
                        float val = out[(r * VC + v) * 16 + lane] + T->ox[g * T->nv * 16 + b];
                        *dst = accumulate ? *dst + val : val;
                    }
        }
    }
}

/* y (B, H) (+)= X (B, N) @ [Ws[0]; Ws[1]; ...]: see above. Returns 0, or -1 when out of memory. */
static int run_qmmt(const Weights *Ws, Py_ssize_t n, const float *X, Py_ssize_t B, float *y, int accumulate,
                    int threads, PyObject *owner, Job **J_out) {
    const Py_ssize_t H = Ws[0].cols, G = Ws[0].seg, ng = Ws[0].nseg;
    /* tasks: column ranges inside one group, about 4 per thread in all */
    Py_ssize_t per = threads > 1 ? (H + 4 * threads - 1) / (4 * threads) : G;
    per = per < 16 ? 16 : per > G ? G : per;
    const Py_ssize_t tg = (G + per - 1) / per, ntask = tg * ng;
    Job *J = *J_out = job_alloc(&Ws[0], qmmt_task, owner, per, ntask);
    if (!J) return -1;
    J->y = y, J->accumulate = accumulate, J->may_steal = 1, J->int8 = 1;
    J->task_item = malloc((size_t)ntask * sizeof(Py_ssize_t));
    J->task_r0 = malloc((size_t)ntask * sizeof(Py_ssize_t));
    J->T = malloc(sizeof *J->T);
    if (!J->task_item || !J->task_r0 || !J->T) return -1;
    J->T->buf = NULL;
    if (tacts_prepare(Ws, n, X, B, threads, J->T)) return -1;
    Py_ssize_t t = 0;
    for (Py_ssize_t g = 0; g < ng; g++)
        for (Py_ssize_t c = g * G; c < (g + 1) * G && c < H; c += per) J->task_item[t] = g, J->task_r0[t++] = c;
    J->ntask = t;
    if (threads > 1 && t > 1 && !(J->yh = malloc((size_t)(B * H) * sizeof(float) + 4))) return -1;
    pool_run(J, threads);
    if (atomic_load(&J->nomem)) return -1;
    for (t = 0; t < J->ntask; t++) { /* the helpers' columns */
        if (J->state[t] != T_HELPER_DONE) continue;
        const Py_ssize_t c0 = J->task_r0[t], g = J->task_item[t];
        const Py_ssize_t gend = (g + 1) * G < H ? (g + 1) * G : H, nc = c0 + per < gend ? per : gend - c0;
        for (Py_ssize_t b = 0; b < B; b++)
            for (Py_ssize_t k = 0; k < nc; k++) {
                float *dst = y + b * H + c0 + k;
                float src = J->yh[b * H + c0 + k];
                *dst = accumulate ? *dst + src : src;
            }
    }
    return 0;
}

/* out (rows, cols) = W, outliers included. */
static int run_dequant(const Weights *W, float *out, int threads, PyObject *owner, Job **J_out) {
    Job *J = *J_out = job_new(W, dequant_task, threads, owner);
    if (!J) return -1;
    J->out = out, J->may_steal = 0;
    pool_run(J, threads);
    for (Py_ssize_t j = 0; j < W->nout; j++) out[W->oidx[j]] = W->oval[j];
    return atomic_load(&J->nomem) ? -1 : 0;
}

/* ------------------------------------------------------------------------- Python: Matrix
 * Matrix(kind, rows, cols, w, bits=0, group_size=0, scale=None, offset=None, outlier_idx=None,
 * outlier_val=None) validates a weight matrix once and keeps its buffers exported (zero-copy:
 * an mmap under it cannot be closed while the Matrix lives); matvec and dequant then cost one
 * check of x and out. Only the buffer protocol is used (no NumPy C API). */

enum { B_W, B_SCALE, B_OFFSET, B_OIDX, B_OVAL, NBUF };

typedef struct {
    PyObject_HEAD
    Weights W;
    Py_buffer buf[NBUF];
    int held[NBUF];
    Py_buffer *tbuf; /* a tiled matrix's buffers (ntbuf of them, all held) ... */
    Py_ssize_t ntbuf;
    const uint8_t **band_base; /* ... its (bands, P) tile pointers into them, and its band starts */
    Py_ssize_t *band_start;
} Matrix;

static int fail(const char *fmt, ...) {
    char msg[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}

static void Matrix_dealloc(Matrix *self) {
    for (int i = 0; i < NBUF; i++)
        if (self->held[i]) PyBuffer_Release(&self->buf[i]);
    for (Py_ssize_t i = 0; i < self->ntbuf; i++) PyBuffer_Release(&self->tbuf[i]);
    PyMem_Free(self->tbuf);
    PyMem_Free(self->band_base);
    PyMem_Free(self->band_start);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Export obj's bytes into slot i: C-contiguous, `n` bytes exactly (n < 0: any length), aligned. */
static int hold(Matrix *self, int i, PyObject *obj, Py_ssize_t n, int align, const char *what) {
    if (PyObject_GetBuffer(obj, &self->buf[i], PyBUF_C_CONTIGUOUS) < 0) return -1;
    self->held[i] = 1;
    if (n >= 0 && self->buf[i].len != n)
        return fail("%s has %zd bytes, expected %zd", what, self->buf[i].len, n);
    if ((uintptr_t)self->buf[i].buf % (uintptr_t)align) return fail("%s must be %d-byte aligned", what, align);
    return 0;
}

static int Matrix_init(Matrix *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"kind", "rows", "cols", "w", "bits", "group_size", "scale", "offset", "outlier_idx",
                            "outlier_val", NULL};
    int kind, bits = 0;
    Py_ssize_t rows, cols, G = 0;
    PyObject *w, *scale = NULL, *offset = NULL, *oidx = NULL, *oval = NULL;
    if (self->held[B_W] || self->band_base) return fail("Matrix is already initialised");
    if (!PyArg_ParseTupleAndKeywords(args, kw, "innO|inOOOO", names, &kind, &rows, &cols, &w, &bits, &G, &scale,
                                     &offset, &oidx, &oval))
        return -1;
    const Py_ssize_t lim = PY_SSIZE_T_MAX / 64;
    if (rows < 0 || cols < 0 || (rows && cols > lim / rows))
        return fail("Matrix: bad shape (%zd, %zd)", rows, cols);
    Weights *W = &self->W;
    if (kind == K_Q41 || kind == K_Q80) {
        if (cols % QK) return fail("Matrix: GGML rows hold a multiple of 32 columns, got %zd", cols);
        *W = (Weights){.kind = kind, .rows = rows, .cols = cols, .seg = QK, .nseg = cols / QK, .pc = cols, .P = 1};
        W->row_bytes = W->nseg * (kind == K_Q41 ? Q41_BYTES : Q80_BYTES);
    } else if (kind == K_STI) {
        if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8)
            return fail("Matrix: bits must be one of 2, 3, 4, 5, 6, 8, got %d", bits);
        if (G <= 0 || G % 8 || G > (1 << 20))
            return fail("Matrix: group_size must be a positive multiple of 8, got %zd", G);
        if (!scale || !offset || !oidx || !oval)
            return fail("Matrix: sti-q1 needs scale, offset, outlier_idx and outlier_val");
        Py_ssize_t ng = (cols + G - 1) / G;
        *W = (Weights){.kind = K_STI, .rows = rows, .cols = cols, .seg = G, .nseg = ng, .pc = ng * G, .bits = bits,
                        .P = 1};
        W->row_bytes = W->pc * bits / 8;
    } else {
        return fail("Matrix: kind must be 0 (Q4_1), 1 (Q8_0) or 2 (sti-q1), got %d", kind);
    }
    W->w_len = rows * W->row_bytes;
    if (hold(self, B_W, w, W->w_len, 1, "Matrix: the weight buffer")) return -1;
    W->w = self->buf[B_W].buf;
    if (kind != K_STI) return 0;
    if (hold(self, B_SCALE, scale, 4 * rows * W->nseg, 4, "Matrix: scale (float32 per group)") ||
        hold(self, B_OFFSET, offset, 4 * rows * W->nseg, 4, "Matrix: offset (float32 per group)") ||
        hold(self, B_OIDX, oidx, -1, 4, "Matrix: outlier_idx") ||
        hold(self, B_OVAL, oval, -1, 4, "Matrix: outlier_val"))
        return -1;
    if (self->buf[B_OIDX].len % 4 || self->buf[B_OVAL].len != self->buf[B_OIDX].len)
        return fail("Matrix: outlier_idx (uint32) and outlier_val (float32) must have equal lengths");
    W->scale = self->buf[B_SCALE].buf, W->offset = self->buf[B_OFFSET].buf;
    W->oidx = self->buf[B_OIDX].buf, W->oval = self->buf[B_OVAL].buf, W->nout = self->buf[B_OIDX].len / 4;
    for (Py_ssize_t j = 0; j < W->nout; j++)
        if ((Py_ssize_t)W->oidx[j] >= rows * cols)
            return fail("Matrix: outlier index %u out of range for shape (%zd, %zd)", W->oidx[j], rows, cols);
    return 0;
}

static int ready(Matrix *self) {
    if (!self->held[B_W] && !self->band_base) return fail("Matrix is not initialised");
    return 0;
}

/* A float32 C-contiguous buffer of shape (n,) or (B, n), writable if asked; its batch in *B. */
static int get_vecs(PyObject *obj, Py_buffer *v, Py_ssize_t n, int writable, Py_ssize_t *B, const char *what) {
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    const char *f = v->format ? v->format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    int ok = f[0] == 'f' && !f[1] && v->itemsize == 4 && (v->ndim == 1 || v->ndim == 2) &&
             v->shape[v->ndim - 1] == n && (v->ndim == 1 || v->shape[0] >= 1) && (uintptr_t)v->buf % 4 == 0;
    if (!ok) {
        PyBuffer_Release(v);
        return fail("%s must be a C-contiguous float32 array of shape (%zd,) or (batch, %zd)", what, n, n);
    }
    *B = v->ndim == 1 ? 1 : v->shape[0];
    return 0;
}

/* A matvec (x given) or a dequant (x NULL) with the GIL released. The job holds a reference to the
 * Matrix from the start: if a late helper keeps it beyond this call, bury_dead drops it later. */
static int run_job(Matrix *self, const Py_buffer *x, Py_ssize_t B, Py_buffer *y, int accumulate, int threads,
                   int int8) {
    bury_dead();
    Job *J = NULL;
    int err, left_behind = 0;
    Py_INCREF(self);
    Py_BEGIN_ALLOW_THREADS
    if (x)
        err = run_matvec(&self->W, x->buf, B, y->buf, accumulate, threads, int8, (PyObject *)self, &J);
    else
        err = run_dequant(&self->W, y->buf, threads, (PyObject *)self, &J);
    if (J) left_behind = job_leave(J);
    if (!left_behind) job_free(J);
    Py_END_ALLOW_THREADS
    if (!left_behind) Py_DECREF(self);
    if (err) PyErr_NoMemory();
    return err ? -1 : 0;
}

/* matvec / qmm (x, out, accumulate=False, threads=1): out (+)= x @ W.T */
static PyObject *product(Matrix *self, PyObject *const *args, Py_ssize_t nargs, int int8) {
    const char *name = int8 ? "qmm" : "matvec";
    if (ready(self)) return NULL;
    if (nargs < 2 || nargs > 4) return PyErr_Format(PyExc_TypeError, "%s(x, out, accumulate=False, threads=1)", name);
    int accumulate = nargs > 2 ? PyObject_IsTrue(args[2]) : 0;
    long threads = nargs > 3 ? PyLong_AsLong(args[3]) : 1;
    if (accumulate < 0 || (threads == -1 && PyErr_Occurred())) return NULL;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    Py_buffer x, y;
    Py_ssize_t bx, by;
    if (get_vecs(args[0], &x, self->W.cols, 0, &bx, "x")) return NULL;
    if (get_vecs(args[1], &y, self->W.rows, 1, &by, "out")) {
        PyBuffer_Release(&x);
        return NULL;
    }
    int err = 0;
    if (x.ndim != y.ndim || bx != by) {
        fail("out must be (%zd,) for x (%zd,), or (batch, %zd) for x (batch, %zd)", self->W.rows, self->W.cols,
             self->W.rows, self->W.cols);
        err = 1;
    } else {
        err = run_job(self, &x, bx, &y, accumulate, (int)threads, int8);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    if (err) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Matrix_matvec(Matrix *self, PyObject *const *args, Py_ssize_t nargs) {
    return product(self, args, nargs, 0);
}

static PyObject *Matrix_qmm(Matrix *self, PyObject *const *args, Py_ssize_t nargs) {
    return product(self, args, nargs, 1);
}

/* dequant(out, threads=1): out (rows, cols) = W */
static PyObject *Matrix_dequant(Matrix *self, PyObject *const *args, Py_ssize_t nargs) {
    if (ready(self)) return NULL;
    if (nargs < 1 || nargs > 2) return PyErr_Format(PyExc_TypeError, "dequant(out, threads=1)");
    long threads = nargs > 1 ? PyLong_AsLong(args[1]) : 1;
    if (threads == -1 && PyErr_Occurred()) return NULL;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    Py_buffer out;
    if (PyObject_GetBuffer(args[0], &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    int err = 0;
    if (out.len != 4 * self->W.rows * self->W.cols || (uintptr_t)out.buf % 4) {
        fail("out must be a 4-byte aligned float32 buffer of %zd x %zd items", self->W.rows, self->W.cols);
        err = 1;
    } else {
        err = run_job(self, NULL, 0, &out, 0, (int)threads, 0);
    }
    PyBuffer_Release(&out);
    if (err) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Matrix_methods[] = {
    {"matvec", (PyCFunction)(void (*)(void))Matrix_matvec, METH_FASTCALL,
     "matvec(x, out, accumulate=False, threads=1): out (+)= x @ W.T for x (cols,) -> out (rows,) or a batch\n"
     "x (B, cols) -> out (B, rows), float32 C-contiguous; W is read once whatever B is."},
    {"qmm", (PyCFunction)(void (*)(void))Matrix_qmm, METH_FASTCALL,
     "qmm(x, out, accumulate=False, threads=1): as matvec, with x rounded to int8 per (vector, group) and\n"
     "integer products (sti.lowbit.qmm_numpy is the reference); GGML blocks in their affine form (ggml_affine)."},
    {"dequant", (PyCFunction)(void (*)(void))Matrix_dequant, METH_FASTCALL,
     "dequant(out, threads=1): the float32 (rows, cols) matrix into out, bit-identical to the NumPy references\n"
     "(gguf.quants for Q4_1/Q8_0, sti.quant.dequantize_numpy for sti-q1), outliers included."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MatrixType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sti._lowbit.Matrix",
    .tp_basicsize = sizeof(Matrix),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Matrix(kind, rows, cols, w, bits=0, group_size=0, scale=None, offset=None, outlier_idx=None,\n"
              "outlier_val=None): a packed weight matrix (kind 0: GGML Q4_1, 1: GGML Q8_0, 2: sti-q1) over\n"
              "zero-copy buffers, validated once.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Matrix_init,
    .tp_dealloc = (destructor)Matrix_dealloc,
    .tp_methods = Matrix_methods,
};

/* tiled(kind, rows, cols, bufs, starts, index): a GGML Matrix whose rows are read in place from
 * several buffers (np.block for packed matrices; sti.lowbit.TiledTensor builds the arguments).
 * starts: int64 (bands + 1,), the first row of each row band, then rows. index: int64 (bands, P, 2),
 * the buffer number and byte offset of the first row of each band's P column tiles (cols / P
 * columns each; a tile's rows lie back to back). The kernels read a tiled row exactly as the same
 * row in one piece (same blocks, same sums). */
static PyObject *py_tiled(PyObject *mod, PyObject *args) {
    (void)mod;
    int kind;
    Py_ssize_t rows, cols;
    PyObject *bufs, *starts, *index;
    if (!PyArg_ParseTuple(args, "innOOO", &kind, &rows, &cols, &bufs, &starts, &index)) return NULL;
    if (kind != K_Q41 && kind != K_Q80) return fail("tiled: kind must be 0 (Q4_1) or 1 (Q8_0), got %d", kind), NULL;
    if (rows < 1 || cols < QK || cols % QK || rows > PY_SSIZE_T_MAX / 64 / cols)
        return fail("tiled: bad shape (%zd, %zd)", rows, cols), NULL;
    PyObject *seq = PySequence_Fast(bufs, "tiled: bufs must be a sequence of buffers");
    if (!seq) return NULL;
    Matrix *self = (Matrix *)PyType_GenericNew(&MatrixType, NULL, NULL);
    Py_buffer st = {0}, ix = {0};
    int have_st = 0, have_ix = 0;
    if (!self) goto error;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1) {
        fail("tiled: no buffers");
        goto error;
    }
    if (!(self->tbuf = PyMem_Calloc((size_t)n, sizeof(Py_buffer)))) {
        PyErr_NoMemory();
        goto error;
    }
    for (; self->ntbuf < n; self->ntbuf++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, self->ntbuf), &self->tbuf[self->ntbuf], PyBUF_C_CONTIGUOUS) < 0)
            goto error;
    if (PyObject_GetBuffer(starts, &st, PyBUF_C_CONTIGUOUS) < 0) goto error;
    have_st = 1;
    if (PyObject_GetBuffer(index, &ix, PyBUF_C_CONTIGUOUS) < 0) goto error;
    have_ix = 1;
    const Py_ssize_t nband = st.len / 8 - 1, nb = cols / QK;
    const int64_t *s0 = st.buf, *e = ix.buf;
    if (st.len % 8 || (uintptr_t)st.buf % 8 || nband < 1 || s0[0] != 0 || s0[nband] != rows) {
        fail("tiled: starts must be int64 (bands + 1,) from 0 to %zd rows", rows);
        goto error;
    }
    const Py_ssize_t P = ix.len / 16 / nband;
    if (ix.len % 16 || (uintptr_t)ix.buf % 8 || P < 1 || P * nband * 16 != ix.len || P > MAX_TILES || nb % P) {
        fail("tiled: index must be int64 (bands, P, 2) with P <= %d dividing the %zd blocks of a row, got %zd bytes",
             MAX_TILES, nb, ix.len);
        goto error;
    }
    const Py_ssize_t tile_bytes = nb / P * (kind == K_Q41 ? Q41_BYTES : Q80_BYTES);
    self->band_base = PyMem_Malloc((size_t)(nband * P) * sizeof(uint8_t *));
    self->band_start = PyMem_Malloc((size_t)(nband + 1) * sizeof(Py_ssize_t));
    if (!self->band_base || !self->band_start) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t k = 0; k <= nband; k++) {
        if (k && s0[k] <= s0[k - 1]) {
            fail("tiled: band %zd is empty or out of order (starts must increase)", k - 1);
            goto error;
        }
        self->band_start[k] = (Py_ssize_t)s0[k];
    }
    for (Py_ssize_t i = 0; i < nband * P; i++) {
        int64_t b = e[2 * i], off = e[2 * i + 1], k = i / P, len = (s0[k + 1] - s0[k]) * tile_bytes;
        if (b < 0 || b >= n || off < 0 || off > self->tbuf[b].len - len) {
            fail("tiled: tile %zd of band %lld (buffer %lld, bytes %lld..%lld) lies outside its buffer", i % P,
                 (long long)k, (long long)b, (long long)off, (long long)(off + len));
            goto error;
        }
        self->band_base[i] = (const uint8_t *)self->tbuf[b].buf + off;
    }
    PyBuffer_Release(&st);
    PyBuffer_Release(&ix);
    Py_DECREF(seq);
    self->W = (Weights){.kind = kind, .rows = rows, .cols = cols, .seg = QK, .nseg = nb, .pc = cols,
                        .row_bytes = P * tile_bytes, .band_base = self->band_base, .band_start = self->band_start,
                        .nband = nband, .P = P, .tile_bytes = tile_bytes};
    return (PyObject *)self;
error:
    if (have_st) PyBuffer_Release(&st);
    if (have_ix) PyBuffer_Release(&ix);
    Py_DECREF(seq);
    Py_XDECREF(self);
    return NULL;
}

/* qmm_prog(x, out, bufs, prog, accumulate=False, threads=1): out (B, R) (+)= x (B, cols) @ W.T, W the
 * sti-q1 matrices of the rows of `prog` stacked in order (R = their rows); qmm_cols: side by side
 * instead (one row count, x (B, their columns in all)); qmmt_prog: see run_qmmt. `prog` rows are the decode programs of
 * sti.quant.Program, int64 (n, 11) = kind (0), bits, group_size, rows, cols and the byte offsets
 * of codes, scale, offset, outlier_idx, outlier_val in bufs[i], then the number of outliers. One
 * rounding of x for all of them (same cols and group size), one job; the buffers are read in place
 * (an encoder's streamed shards: sti.runtime). */
static int in_buf(int64_t off, int64_t n, const Py_buffer *v, int align) {
    return off >= 0 && n >= 0 && off <= v->len && n <= v->len - off &&
           (uintptr_t)((const uint8_t *)v->buf + off) % (uintptr_t)align == 0;
}

enum { STACK_ROWS, STACK_TRANSPOSED, STACK_COLS, STACK_ROWS_FUSED, STACK_COLS_FUSED };
/* qmm_prog, qmmt_prog, qmm_cols, matvec_prog, matvec_cols */

static PyObject *stack_product(PyObject *const *args, Py_ssize_t nargs, int mode) {
    const int transposed = mode == STACK_TRANSPOSED, by_cols = mode == STACK_COLS || mode == STACK_COLS_FUSED;
    const int fused = mode == STACK_ROWS_FUSED || mode == STACK_COLS_FUSED;
    const char *const names[] = {"qmm_prog", "qmmt_prog", "qmm_cols", "matvec_prog", "matvec_cols"};
    const char *name = names[mode];
    if (nargs < 4 || nargs > 6)
        return PyErr_Format(PyExc_TypeError, "%s(x, out, bufs, prog, accumulate=False, threads=1)", name);
    int accumulate = nargs > 4 ? PyObject_IsTrue(args[4]) : 0;
    long threads = nargs > 5 ? PyLong_AsLong(args[5]) : 1;
    if (accumulate < 0 || (threads == -1 && PyErr_Occurred())) return NULL;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    PyObject *seq = PySequence_Fast(args[2], "bufs must be a sequence of buffers");
    if (!seq) return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), lim = PY_SSIZE_T_MAX / 64;
    PyObject *owner = PyTuple_New(n); /* memoryviews: the buffers stay exported while a helper may read them */
    Weights *Ws = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Weights));
    Py_buffer pg = {0}, x = {0}, y = {0};
    int have_pg = 0, have_x = 0, have_y = 0, err = -1;
    if (!owner || !Ws) {
        if (owner) PyErr_NoMemory(); /* else PyTuple_New set the error */
        goto done;
    }
    if (n < 1) {
        fail("%s: no matrices", name);
        goto done;
    }
    if (PyObject_GetBuffer(args[3], &pg, PyBUF_C_CONTIGUOUS) < 0) goto done;
    have_pg = 1;
    if (pg.len != n * 11 * 8 || (uintptr_t)pg.buf % 8) {
        fail("%s: prog must be int64 (%zd, 11), one row per buffer; got %zd bytes", name, n, pg.len);
        goto done;
    }
    Py_ssize_t R = 0, C = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *mv = PyMemoryView_FromObject(PySequence_Fast_GET_ITEM(seq, i));
        if (!mv) goto done;
        PyTuple_SET_ITEM(owner, i, mv);
        const Py_buffer *v = PyMemoryView_GET_BUFFER(mv);
        if (!PyBuffer_IsContiguous(v, 'C')) {
            fail("%s: buffer %zd is not C-contiguous", name, i);
            goto done;
        }
        const int64_t *f = (const int64_t *)pg.buf + 11 * i;
        const int64_t bits = f[1], G = f[2], rows = f[3], cols = f[4], nout = f[10];
        if (f[0] != 0) {
            fail("%s: matrix %zd is not quantized (kind %lld)", name, i, (long long)f[0]);
            goto done;
        }
        if ((bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8) || G <= 0 || G % 8 ||
            G > (1 << 20) || rows < 0 || cols < 1 || cols > lim || (rows && cols > lim / rows) || nout < 0) {
            fail("%s: matrix %zd: bad parameters (bits %lld, group %lld, shape %lld x %lld)", name, i,
                 (long long)bits, (long long)G, (long long)rows, (long long)cols);
            goto done;
        }
        const int64_t mine = by_cols ? rows : cols; /* what every matrix shares: rows side by side, else columns */
        if (i && (mine != (by_cols ? Ws[0].rows : Ws[0].cols) || G != Ws[0].seg)) {
            fail("%s: matrix %zd has %lld %s in groups of %lld columns; matrix 0 has %zd in groups of %zd", name, i,
                 (long long)mine, by_cols ? "rows" : "columns", (long long)G, by_cols ? Ws[0].rows : Ws[0].cols,
                 Ws[0].seg);
            goto done;
        }
        const Py_ssize_t ng = (cols + G - 1) / G, pc = ng * G;
        Weights *W = &Ws[i];
        *W = (Weights){.kind = K_STI, .rows = rows, .cols = cols, .seg = G, .nseg = ng, .pc = pc, .bits = (int)bits,
                       .row_bytes = pc * bits / 8, .P = 1, .nout = nout};
        W->w_len = rows * W->row_bytes;
        if (!in_buf(f[5], W->w_len, v, 1) || !in_buf(f[6], 4 * rows * ng, v, 4) || !in_buf(f[7], 4 * rows * ng, v, 4) ||
            !in_buf(f[8], 4 * nout, v, 4) || !in_buf(f[9], 4 * nout, v, 4)) {
            fail("%s: matrix %zd's sections lie outside its %zd-byte buffer or are misaligned", name, i, v->len);
            goto done;
        }
        const uint8_t *base = v->buf;
        W->w = base + f[5], W->scale = (const float *)(base + f[6]), W->offset = (const float *)(base + f[7]);
        W->oidx = (const uint32_t *)(base + f[8]), W->oval = (const float *)(base + f[9]);
        for (Py_ssize_t j = 0; j < nout; j++)
            if ((Py_ssize_t)W->oidx[j] >= rows * cols || (j && W->oidx[j] <= W->oidx[j - 1])) {
                fail("%s: matrix %zd's outlier indices must ascend within its %lld x %lld elements", name, i,
                     (long long)rows, (long long)cols);
                goto done;
            }
        if (transposed && rows % 4) {
            fail("%s: matrix %zd has %lld rows; the transposed product takes multiples of 4", name, i, (long long)rows);
            goto done;
        }
        R += rows;
        C += cols;
    }
    Py_ssize_t bx, by;
    const Py_ssize_t nx = transposed ? R : by_cols ? C : Ws[0].cols, ny = transposed ? Ws[0].cols : by_cols ? Ws[0].rows : R;
    if (get_vecs(args[0], &x, nx, 0, &bx, "x")) goto done;
    have_x = 1;
    if (get_vecs(args[1], &y, ny, 1, &by, "out")) goto done;
    have_y = 1;
    if (x.ndim != y.ndim || bx != by) {
        fail("out must be (%zd,) for x (%zd,), or (batch, %zd) for x (batch, %zd)", ny, nx, ny, nx);
        goto done;
    }
    if (fused && bx != 1) {
        fail("%s multiplies one vector; x holds %zd (qmm_prog / qmm_cols take batches)", name, bx);
        goto done;
    }
    bury_dead();
    Job *J = NULL;
    int left_behind = 0;
    Py_INCREF(owner); /* the job's reference */
    Py_BEGIN_ALLOW_THREADS
    if (transposed)
        err = run_qmmt(Ws, n, x.buf, bx, y.buf, accumulate, (int)threads, owner, &J);
    else if (by_cols)
        err = run_qmm_cols(Ws, n, x.buf, bx, y.buf, accumulate, (int)threads, fused, owner, &J);
    else
        err = run_qmm_many(Ws, n, x.buf, bx, y.buf, R, accumulate, (int)threads, fused, owner, &J);
    if (J) left_behind = job_leave(J);
    if (!left_behind) job_free(J);
    Py_END_ALLOW_THREADS
    if (!left_behind) Py_DECREF(owner);
    if (err) PyErr_NoMemory();
done:
    if (have_x) PyBuffer_Release(&x);
    if (have_y) PyBuffer_Release(&y);
    if (have_pg) PyBuffer_Release(&pg);
    PyMem_Free(Ws);
    Py_XDECREF(owner);
    Py_DECREF(seq);
    if (err) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_qmm_prog(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    return stack_product(args, nargs, STACK_ROWS);
}

static PyObject *py_qmmt_prog(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    return stack_product(args, nargs, STACK_TRANSPOSED);
}

static PyObject *py_qmm_cols(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    return stack_product(args, nargs, STACK_COLS);
}

static PyObject *py_matvec_prog(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    return stack_product(args, nargs, STACK_ROWS_FUSED);
}

static PyObject *py_matvec_cols(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    return stack_product(args, nargs, STACK_COLS_FUSED);
}

static PyObject *py_info(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    return Py_BuildValue("{s:s,s:s,s:i,s:i}", "simd", LB_SIMD, "threads", LB_THREADS ? "pthreads" : "none",
                         "max_threads", LB_THREADS ? MAX_THREADS : 1, "revision", KERNEL_REVISION);
}

static PyObject *py_test_helper_delay(PyObject *self, PyObject *arg) {
    (void)self;
    long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred()) return NULL;
#if LB_THREADS
    atomic_store(&helper_delay_ns, us > 0 ? us * 1000L : 0);
#endif
    Py_RETURN_NONE;
}

static PyObject *py_pool_state(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    long pending = 0, started = 0, helped = 0, stolen = 0;
#if LB_THREADS
    pthread_mutex_lock(&pool.mu);
    for (Job *d = pool.dead; d; d = d->dead_next) pending++;
    started = pool.started, helped = n_helper_tasks, stolen = n_stolen_tasks;
    pthread_mutex_unlock(&pool.mu);
#endif
    return Py_BuildValue("{s:l,s:l,s:l,s:l}", "helpers", started, "helper_tasks", helped, "stolen_tasks", stolen,
                         "jobs_awaiting_release", pending);
}

static PyMethodDef methods[] = {
    {"tiled", py_tiled, METH_VARARGS,
     "tiled(kind, rows, cols, bufs, starts, index): a GGML Matrix read in place from tiles of several buffers;\n"
     "starts int64 (bands + 1,): each row band's first row, then rows; index int64 (bands, P, 2): buffer number\n"
     "and byte offset of the first row of each band's P tiles of cols / P columns."},
    {"qmm_prog", (PyCFunction)(void (*)(void))py_qmm_prog, METH_FASTCALL,
     "qmm_prog(x, out, bufs, prog, accumulate=False, threads=1): out (+)= x @ W.T for the sti-q1 matrices\n"
     "described by prog (int64 (n, 11), sti.quant.Program rows) in bufs, stacked along the rows of W."},
    {"qmmt_prog", (PyCFunction)(void (*)(void))py_qmmt_prog, METH_FASTCALL,
     "qmmt_prog(x, out, bufs, prog, accumulate=False, threads=1): out (+)= x @ W for the same matrices\n"
     "stacked along the rows of W (x's columns); each has a multiple of 4 rows."},
    {"qmm_cols", (PyCFunction)(void (*)(void))py_qmm_cols, METH_FASTCALL,
     "qmm_cols(x, out, bufs, prog, accumulate=False, threads=1): out (+)= x @ W.T for the same matrices\n"
     "side by side along the columns of W (one row count; x's columns are theirs in order)."},
    {"matvec_prog", (PyCFunction)(void (*)(void))py_matvec_prog, METH_FASTCALL,
     "matvec_prog(x, out, bufs, prog, accumulate=False, threads=1): qmm_prog for one vector x, with the fused\n"
     "products (each output as the matrix's own matvec gives it)."},
    {"matvec_cols", (PyCFunction)(void (*)(void))py_matvec_cols, METH_FASTCALL,
     "matvec_cols(x, out, bufs, prog, accumulate=False, threads=1): qmm_cols for one vector x, with the fused\n"
     "products (each output the sum, in matrix order, of the matrices' own matvec results)."},
    {"info", py_info, METH_NOARGS,
     "info(): {'simd': ..., 'threads': 'pthreads' | 'none', 'max_threads': int, 'revision': int}"},
    {"_test_helper_delay", py_test_helper_delay, METH_O,
     "_test_helper_delay(microseconds): tests only; helpers sleep this long before each task (0: off)."},
    {"_pool_state", py_pool_state, METH_NOARGS,
     "_pool_state(): {'helpers': threads started, 'helper_tasks': tasks helpers completed, 'stolen_tasks':\n"
     "tasks the caller took over from a late helper, 'jobs_awaiting_release': jobs late helpers still hold}."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_lowbit", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__lowbit(void) {
#if LB_AVX2
    init_sti_tables();
#endif
#if LB_THREADS
    static int atfork_done = 0;
    if (!atfork_done) pthread_atfork(NULL, NULL, pool_after_fork), atfork_done = 1;
#endif
    if (PyType_Ready(&MatrixType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "VNNI", LB_VNNI) < 0) { /* 1: int8 products by AVX-512 VNNI */
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&MatrixType);
    if (PyModule_AddObject(m, "Matrix", (PyObject *)&MatrixType) < 0) {
        Py_DECREF(&MatrixType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *cap = PyCapsule_New((void *)&parallel_api, STI_PARALLEL_CAPSULE, NULL);
    if (!cap || PyModule_AddObject(m, "_parallel", cap) < 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
