/* STI dequantisation kernels (sti._kernels): packed k-bit codes -> float32 weights.
 *
 * Layout (sti/quant.py): a (rows, cols) matrix is cut into groups of G = group_size columns per
 * row (G a multiple of 8; the last group of a row is padded). Codes run row-major over the
 * (rows, n_groups * G) grid, 8 codes of k bits in k bytes, little-endian bit order: code i of a
 * run of 8 occupies bits k*i .. k*i+k-1 of the 8k-bit little-endian integer. Every group starts
 * on a byte boundary (G*k/8 bytes per group). scale and offset are float32 per group.
 *
 * out[r, c] = (float)code * scale + offset, computed as two float32 operations (multiply,
 * round; add, round). This file must be compiled with -ffp-contract=off and without
 * -ffast-math so the compiler neither fuses them into an FMA nor reassociates: the result is
 * then bit-identical to the NumPy reference, sti.quant.dequantize_numpy. Outliers are
 * scattered by the caller.
 *
 * The inner loops are specialised per k with compile-time shifts and masks so that GCC/Clang
 * vectorise them; only the buffer protocol is used (no NumPy C API), and the GIL is released
 * while computing. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* preadv2 and RWF_NOWAIT */
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>
#define STI_HAVE_MADVISE 1
#endif

#define BLOCK 2048 /* codes unpacked per block: a multiple of 8; tmp[] stays in L1 */

/* Decode n codes (n a multiple of 8) of K bits from src into t[0..n). */
static inline void unpack8(const uint8_t *restrict src, uint8_t *restrict t, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) t[i] = src[i];
}

static inline void unpack4(const uint8_t *restrict src, uint8_t *restrict t, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n / 2; j++) {
        uint8_t b = src[j];
        t[2 * j] = b & 15u;
        t[2 * j + 1] = b >> 4;
    }
}

/* k = 2: split bytes into nibbles, then nibbles into 2-bit codes (two interleave-by-2 passes,
 * each of which vectorises well, rather than one interleave-by-4). */
static inline void unpack2(const uint8_t *restrict src, uint8_t *restrict t, Py_ssize_t n) {
    uint8_t nib[BLOCK / 2];
    unpack4(src, nib, n / 2);
    for (Py_ssize_t j = 0; j < n / 2; j++) {
        uint8_t b = nib[j];
        t[2 * j] = b & 3u;
        t[2 * j + 1] = b >> 2;
    }
}

/* k = 3: 8 codes in every 3 bytes; gather each run into a 32-bit word (scalar), then split the
 * words with constant shifts (vectorisable). */
static inline void unpack3(const uint8_t *restrict src, uint8_t *restrict t, Py_ssize_t n) {
    uint32_t w[BLOCK / 8];
    Py_ssize_t nw = n / 8;
    for (Py_ssize_t c = 0; c < nw; c++) {
        const uint8_t *p = src + 3 * c;
        w[c] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
    }
    for (Py_ssize_t c = 0; c < nw; c++) {
        uint32_t v = w[c];
        for (int i = 0; i < 8; i++) t[8 * c + i] = (uint8_t)((v >> (3 * i)) & 7u);
    }
}

/* k = 6: 4 codes in every 3 bytes (grouped loads of 3, stores of 4: vectorisable). */
static inline void unpack6(const uint8_t *restrict src, uint8_t *restrict t, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n / 4; j++) {
        unsigned b0 = src[3 * j], b1 = src[3 * j + 1], b2 = src[3 * j + 2];
        t[4 * j] = (uint8_t)(b0 & 63u);
        t[4 * j + 1] = (uint8_t)((b0 >> 6) | ((b1 & 15u) << 2));
        t[4 * j + 2] = (uint8_t)((b1 >> 4) | ((b2 & 3u) << 4));
        t[4 * j + 3] = (uint8_t)(b2 >> 2);
    }
}

/* k = 5: gather each run's 5 bytes into a 64-bit word first (scalar), then split the words
 * into codes with constant shifts (a vectorisable loop over words). */
static inline void unpack5(const uint8_t *restrict src, uint8_t *restrict t, Py_ssize_t n) {
    uint64_t w[BLOCK / 8];
    Py_ssize_t nw = n / 8;
    for (Py_ssize_t c = 0; c < nw; c++) {
        const uint8_t *p = src + 5 * c;
        w[c] = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
               (uint64_t)p[4] << 32;
    }
    for (Py_ssize_t c = 0; c < nw; c++) {
        uint64_t v = w[c];
        for (int i = 0; i < 8; i++) t[8 * c + i] = (uint8_t)((v >> (5 * i)) & 31u);
    }
}

/* out[i] = (float)t[i] * s + o for i < n: two roundings (no FMA under -ffp-contract=off). */
static inline void affine(const uint8_t *restrict t, float *restrict out, Py_ssize_t n, float s, float o) {
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = (float)t[i] * s;
        out[i] = v + o;
    }
}

/* Codes are one stream over the (rows, n_groups * G) grid, so a block of whole groups (which
 * may span rows) is unpacked by one long loop, then each group's valid columns get their affine
 * map. Groups longer than BLOCK codes are done in pieces. */
#define DEQUANT_K(K)                                                                       \
    static void dequant##K(const uint8_t *restrict codes, const float *restrict scale,    \
                           const float *restrict offset, Py_ssize_t G, Py_ssize_t rows,   \
                           Py_ssize_t cols, float *restrict out) {                         \
        uint8_t tmp[BLOCK];                                                                \
        Py_ssize_t ng = (cols + G - 1) / G, ngroups = rows * ng;                           \
        Py_ssize_t per = G <= BLOCK ? BLOCK / G : 1; /* groups per block */               \
        Py_ssize_t r = 0, g = 0; /* row and group-in-row of group gi */                    \
        for (Py_ssize_t gi0 = 0; gi0 < ngroups; gi0 += per) {                              \
            Py_ssize_t gn = ngroups - gi0 < per ? ngroups - gi0 : per;                     \
            if (G <= BLOCK) unpack##K(codes + gi0 * G / 8 * (K), tmp, gn * G);             \
            for (Py_ssize_t gi = gi0; gi < gi0 + gn; gi++) {                               \
                float s = scale[gi], o = offset[gi];                                       \
                float *dst = out + r * cols + g * G;                                       \
                Py_ssize_t n = cols - g * G < G ? cols - g * G : G; /* valid columns */    \
                if (G <= BLOCK) {                                                          \
                    affine(tmp + (gi - gi0) * G, dst, n, s, o);                            \
                } else {                                                                   \
                    for (Py_ssize_t a = 0; a < n; a += BLOCK) {                            \
                        Py_ssize_t m = n - a < BLOCK ? n - a : BLOCK;                      \
                        unpack##K(codes + (gi * G + a) / 8 * (K), tmp, (m + 7) & ~(Py_ssize_t)7); \
                        affine(tmp, dst + a, m, s, o);                                     \
                    }                                                                      \
                }                                                                          \
                if (++g == ng) g = 0, r++;                                                 \
            }                                                                              \
        }                                                                                  \
    }
DEQUANT_K(2)
DEQUANT_K(3)
DEQUANT_K(4)
DEQUANT_K(5)
DEQUANT_K(6)
DEQUANT_K(8)

/* dequant(codes, bits, scale, offset, group_size, rows, cols, out) */
static PyObject *py_dequant(PyObject *self, PyObject *args) {
    Py_buffer codes, scale, offset, out;
    int bits;
    Py_ssize_t G, rows, cols;
    if (!PyArg_ParseTuple(args, "y*iy*y*nnnw*", &codes, &bits, &scale, &offset, &G, &rows, &cols, &out))
        return NULL;
    PyObject *ret = NULL;
    char msg[256];
    msg[0] = 0;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8) {
        snprintf(msg, sizeof msg, "dequant: bits must be one of 2, 3, 4, 5, 6, 8, got %d", bits);
    } else if (G <= 0 || G % 8) {
        snprintf(msg, sizeof msg, "dequant: group_size must be a positive multiple of 8, got %zd", G);
    } else if (rows < 0 || cols < 0) {
        snprintf(msg, sizeof msg, "dequant: rows and cols must be >= 0, got %zd, %zd", rows, cols);
    } else {
        Py_ssize_t ng = cols ? (cols - 1) / G + 1 : 0;
        /* overflow-safe sizes: every product below stays under PY_SSIZE_T_MAX / 8 */
        Py_ssize_t lim = PY_SSIZE_T_MAX / 16;
        if ((rows && ng > lim / rows) || (ng && G > lim / ng) || (rows && ng * G > lim / rows)) {
            snprintf(msg, sizeof msg, "dequant: shape (%zd, %zd) with group_size %zd is too large", rows, cols, G);
        } else {
            Py_ssize_t ngroups = rows * ng;
            Py_ssize_t need_codes = ngroups * G * bits / 8;
            if (codes.len != need_codes)
                snprintf(msg, sizeof msg, "dequant: codes has %zd bytes, expected %zd for shape (%zd, %zd), "
                         "bits %d, group_size %zd", codes.len, need_codes, rows, cols, bits, G);
            else if (scale.len != 4 * ngroups)
                snprintf(msg, sizeof msg, "dequant: scale has %zd bytes, expected %zd (float32 per group, "
                         "%zd groups)", scale.len, 4 * ngroups, ngroups);
            else if (offset.len != 4 * ngroups)
                snprintf(msg, sizeof msg, "dequant: offset has %zd bytes, expected %zd (float32 per group, "
                         "%zd groups)", offset.len, 4 * ngroups, ngroups);
            else if (out.len != 4 * rows * cols)
                snprintf(msg, sizeof msg, "dequant: out has %zd bytes, expected %zd (float32 rows * cols)",
                         out.len, 4 * rows * cols);
            else if (out.itemsize != 4)
                snprintf(msg, sizeof msg, "dequant: out must hold float32 items, got itemsize %zd", out.itemsize);
            else if (((uintptr_t)scale.buf | (uintptr_t)offset.buf | (uintptr_t)out.buf) % 4)
                snprintf(msg, sizeof msg, "dequant: scale, offset and out must be 4-byte aligned");
        }
    }
    if (msg[0]) {
        PyErr_SetString(PyExc_ValueError, msg);
        goto done;
    }
    {
        const uint8_t *c = codes.buf;
        const float *s = scale.buf, *o = offset.buf;
        float *d = out.buf;
        Py_BEGIN_ALLOW_THREADS
        switch (bits) {
        case 2: dequant2(c, s, o, G, rows, cols, d); break;
        case 3: dequant3(c, s, o, G, rows, cols, d); break;
        case 4: dequant4(c, s, o, G, rows, cols, d); break;
        case 5: dequant5(c, s, o, G, rows, cols, d); break;
        case 6: dequant6(c, s, o, G, rows, cols, d); break;
        default: dequant8(c, s, o, G, rows, cols, d); break;
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&offset);
    PyBuffer_Release(&out);
    return ret;
}

/* ------------------------------------------------------------------------------------------
 * decode(raw, program, outs): every tensor of one shard version in one call.
 *
 * A streamed layer decodes a few hundred tensors per request; through Python each costs
 * microseconds of argument handling. `program` is an int64 array of rows of PROG_FIELDS
 * describing the tensors of one shard layout (sti.quant.Program builds it once per layout),
 * `outs` a tuple of writable float32 buffers, one per row. Row fields:
 *   kind (0: sti-q1 quantized matrix, 1: raw float32), bits, group_size, rows, cols,
 *   offset of codes (kind 1: of the floats), scale, offset, outlier_idx, outlier_val, n_outliers
 * Offsets are relative to raw. Outliers are written after the affine map in index order
 * (a later duplicate index wins), exactly as the NumPy reference scatters them. */
enum { F_KIND, F_BITS, F_G, F_ROWS, F_COLS, F_CODES, F_SCALE, F_OFFSET, F_OIDX, F_OVAL, F_NOUT, PROG_FIELDS };

static int check_span(const char *what, Py_ssize_t i, long long off, long long len, Py_ssize_t total,
                      long long align, char *msg, size_t msgn) {
    if (off < 0 || len < 0 || off > total || len > total - off) {
        snprintf(msg, msgn, "decode: tensor %zd: %s [%lld, +%lld) lies outside the %zd-byte buffer", i, what, off,
                 len, total);
        return -1;
    }
    if (off % align) {
        snprintf(msg, msgn, "decode: tensor %zd: %s offset %lld is not %lld-byte aligned", i, what, off, align);
        return -1;
    }
    return 0;
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer raw, prog;
    PyObject *outs;
    if (!PyArg_ParseTuple(args, "y*y*O!", &raw, &prog, &PyTuple_Type, &outs)) return NULL;
    PyObject *ret = NULL;
    char msg[320];
    msg[0] = 0;
    Py_ssize_t n = prog.len / (Py_ssize_t)(PROG_FIELDS * sizeof(long long));
    Py_buffer *ob = NULL;
    Py_ssize_t got = 0;
    if (prog.len % (PROG_FIELDS * sizeof(long long)) || ((uintptr_t)prog.buf % sizeof(long long))) {
        snprintf(msg, sizeof msg, "decode: program must be an aligned int64 array of rows of %d fields", PROG_FIELDS);
    } else if (PyTuple_GET_SIZE(outs) != n) {
        snprintf(msg, sizeof msg, "decode: %zd output buffers for %zd program rows", PyTuple_GET_SIZE(outs), n);
    }
    if (msg[0]) goto fail;
    ob = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (!ob) {
        PyErr_NoMemory();
        goto done;
    }
    const long long *P = prog.buf;
    for (got = 0; got < n; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(outs, got), &ob[got], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        const long long *r = P + got * PROG_FIELDS;
        long long kind = r[F_KIND], bits = r[F_BITS], G = r[F_G], rows = r[F_ROWS], cols = r[F_COLS];
        if (rows < 0 || cols < 0 || rows > (1LL << 31) || cols > (1LL << 31)) {
            snprintf(msg, sizeof msg, "decode: tensor %zd: bad shape (%lld, %lld)", got, rows, cols);
            goto fail;
        }
        if (ob[got].len != 4 * rows * cols || ((uintptr_t)ob[got].buf % 4)) {
            snprintf(msg, sizeof msg, "decode: tensor %zd: output has %zd bytes, expected an aligned %lld", got,
                     ob[got].len, 4 * rows * cols);
            goto fail;
        }
        if (kind == 1) {
            if (check_span("floats", got, r[F_CODES], 4 * rows * cols, raw.len, 4, msg, sizeof msg)) goto fail;
            continue;
        }
        if (kind != 0 || !(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8) || G <= 0 ||
            G % 8 || G > (1 << 20)) {
            snprintf(msg, sizeof msg, "decode: tensor %zd: bad kind %lld / bits %lld / group_size %lld", got, kind,
                     bits, G);
            goto fail;
        }
        long long ngroups = rows * ((cols + G - 1) / G);
        if (check_span("codes", got, r[F_CODES], ngroups * G * bits / 8, raw.len, 1, msg, sizeof msg) ||
            check_span("scale", got, r[F_SCALE], 4 * ngroups, raw.len, 4, msg, sizeof msg) ||
            check_span("offset", got, r[F_OFFSET], 4 * ngroups, raw.len, 4, msg, sizeof msg) ||
            check_span("outlier_idx", got, r[F_OIDX], 4 * r[F_NOUT], raw.len, 4, msg, sizeof msg) ||
            check_span("outlier_val", got, r[F_OVAL], 4 * r[F_NOUT], raw.len, 4, msg, sizeof msg))
            goto fail;
    }
    long long bad_idx = -1;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *base = raw.buf;
    for (Py_ssize_t i = 0; i < n && bad_idx < 0; i++) {
        const long long *r = P + i * PROG_FIELDS;
        float *d = ob[i].buf;
        Py_ssize_t G = r[F_G], rows = r[F_ROWS], cols = r[F_COLS];
        if (r[F_KIND] == 1) {
            memcpy(d, base + r[F_CODES], 4 * (size_t)rows * (size_t)cols);
            continue;
        }
        const uint8_t *c = base + r[F_CODES];
        const float *s = (const float *)(base + r[F_SCALE]), *o = (const float *)(base + r[F_OFFSET]);
        switch (r[F_BITS]) {
        case 2: dequant2(c, s, o, G, rows, cols, d); break;
        case 3: dequant3(c, s, o, G, rows, cols, d); break;
        case 4: dequant4(c, s, o, G, rows, cols, d); break;
        case 5: dequant5(c, s, o, G, rows, cols, d); break;
        case 6: dequant6(c, s, o, G, rows, cols, d); break;
        default: dequant8(c, s, o, G, rows, cols, d); break;
        }
        const uint32_t *idx = (const uint32_t *)(base + r[F_OIDX]);
        const float *val = (const float *)(base + r[F_OVAL]);
        uint64_t size = (uint64_t)rows * (uint64_t)cols;
        for (long long k = 0; k < r[F_NOUT]; k++) {
            if (idx[k] >= size) {
                bad_idx = i;
                break;
            }
            d[idx[k]] = val[k];
        }
    }
    Py_END_ALLOW_THREADS
    if (bad_idx >= 0) {
        snprintf(msg, sizeof msg, "decode: tensor %lld: an outlier index lies outside the matrix", bad_idx);
        goto fail;
    }
    ret = Py_None;
    Py_INCREF(ret);
    goto done;
fail:
    PyErr_SetString(PyExc_ValueError, msg);
done:
    for (Py_ssize_t i = 0; i < got + (ob && got < n && ob[got].obj ? 1 : 0); i++) PyBuffer_Release(&ob[i]);
    PyMem_Free(ob);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&prog);
    return ret;
}

/* ------------------------------------------------------------------------------------------
 * sum64(buf) -> int: the "sum64" checksum of sti.checksums. The buffer is read as little-endian
 * uint64 words w_i (the tail zero-padded); s = sum_i w_i * (2i + 1) * K (mod 2^64), with K the
 * 64-bit golden-ratio constant, so every multiplier is odd and any change to one word changes
 * s. Four independent accumulators keep the multiplier busy; the sum is order-free, so the
 * NumPy reference computes the same value. The caller mixes s with the length. */
#define SUM64_K 0x9E3779B97F4A7C15ULL

static PyObject *py_sum64(PyObject *self, PyObject *args) {
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*", &b)) return NULL;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *p = b.buf;
    Py_ssize_t n = b.len / 8, i = 0;
    uint64_t m = SUM64_K, step = 2 * SUM64_K;
    for (; i + 4 <= n; i += 4) {
        uint64_t w[4];
        memcpy(w, p + 8 * i, 32); /* little-endian host (x86-64, aarch64) */
        s0 += w[0] * m;
        s1 += w[1] * (m + step);
        s2 += w[2] * (m + 2 * step);
        s3 += w[3] * (m + 3 * step);
        m += 4 * step;
    }
    for (; i < n; i++, m += step) {
        uint64_t w;
        memcpy(&w, p + 8 * i, 8);
        s0 += w * m;
    }
    Py_ssize_t tail = b.len - 8 * n;
    if (tail) {
        uint64_t w = 0;
        memcpy(&w, p + 8 * n, (size_t)tail);
        s0 += w * m;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(s0 + s1 + s2 + s3);
}

/* ------------------------------------------------------------------------------------------
 * advise(buf, advice): madvise(2) over the pages of buf (a view of a memory-mapped file), with
 * the GIL released. The streaming decoder's IO worker faults shards in (MADV_POPULATE_READ) and
 * drops them (MADV_DONTNEED) this way while the compute thread runs Python; mmap.madvise holds
 * the GIL for the whole call. buf must start on a page boundary. */
static PyObject *py_advise(PyObject *self, PyObject *args) {
    Py_buffer b;
    int advice;
    if (!PyArg_ParseTuple(args, "y*i", &b, &advice)) return NULL;
#ifdef STI_HAVE_MADVISE
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || ((uintptr_t)b.buf % (uintptr_t)page) != 0) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "advise: the buffer must start on a page boundary");
        return NULL;
    }
    int rc, err = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = madvise(b.buf, (size_t)b.len, advice);
    if (rc != 0) err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (rc != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
#else
    PyBuffer_Release(&b);
    PyErr_SetString(PyExc_OSError, "advise: madvise is not available on this platform");
    return NULL;
#endif
}

/* pread_many(fds, offsets, bufs): item i fills the writable buffer bufs[i] with len(bufs[i]) bytes
 * of file descriptor fds[i] from offsets[i], one item after another with the GIL released (an IO
 * thread's reads of many shards cost the compute thread one GIL hand-over, not one per shard).
 * Returns -1 when every item was read in full, else the index of the first one the file ended
 * within (the items after it are not read); OSError on a read error.
 *
 * Items not in the page cache are read with all of them queued at the device: each item is first
 * tried without blocking (preadv2 RWF_NOWAIT, which reads only cached pages); at the first that is
 * not cached in full, every item from it on is announced (posix_fadvise WILLNEED starts their reads
 * at once), then read. One blocking read after another keeps one request in flight: a cold MiniLM
 * layer's twelve 3-bit shards took 1.6 ms that way and 1.0 ms announced, and the request's 32
 * word-embedding rows 1.5 and 0.45 ms. Cached items cost no announcement. */
#if defined(STI_HAVE_MADVISE) && defined(POSIX_FADV_WILLNEED)
static void announce(const int *fd, const long long *off, const Py_buffer *views, Py_ssize_t from, Py_ssize_t n) {
    for (Py_ssize_t i = from; i < n; i++)
        if (views[i].len) (void)posix_fadvise(fd[i], (off_t)off[i], (off_t)views[i].len, POSIX_FADV_WILLNEED);
}
#endif

#ifdef STI_HAVE_MADVISE
/* One item's bytes [p, p + left) from fd at `at`: 0 when read in full, -1 at the end of the file,
 * else an errno. While *probing, try without blocking first; at the first byte that is not in the
 * page cache, *probing is cleared and items i..n-1 are announced. */
static int read_item(int fd, char *p, size_t left, off_t at, int *probing, const int *fds, const long long *off,
                     const Py_buffer *views, Py_ssize_t i, Py_ssize_t n) {
    while (left) {
        ssize_t r;
#if defined(RWF_NOWAIT) && defined(POSIX_FADV_WILLNEED)
        if (*probing) {
            struct iovec v = {p, left};
            r = preadv2(fd, &v, 1, at, RWF_NOWAIT);
            if (r > 0) {
                p += r, left -= (size_t)r, at += r;
                if (!left) break;
            } else if (r < 0 && errno == EINTR) {
                continue;
            }
            /* not cached (EAGAIN), partly cached, at the end of the file (0; the blocking read
             * below tells), or no RWF_NOWAIT here: read the rest blocking, announced */
            *probing = 0;
            if (r < 0 && errno != EAGAIN) continue; /* unsupported: plain reads from here on */
            announce(fds, off, views, i, n);
            continue;
        }
#else
        (void)probing, (void)fds, (void)off, (void)views, (void)i, (void)n;
#endif
        r = pread(fd, p, left, at);
        if (r < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (r == 0) return -1;
        p += r, left -= (size_t)r, at += r;
    }
    return 0;
}
#endif

static PyObject *py_pread_many(PyObject *self, PyObject *args) {
#ifdef STI_HAVE_MADVISE
    PyObject *fo, *oo, *bo;
    if (!PyArg_ParseTuple(args, "OOO", &fo, &oo, &bo)) return NULL;
    PyObject *fs = PySequence_Fast(fo, "fds must be a sequence"), *os_ = NULL, *bs = NULL;
    Py_buffer *views = NULL;
    int *fd = NULL;
    long long *off = NULL;
    Py_ssize_t n = 0, got = 0, result = -1;
    int err = 0;
    PyObject *ret = NULL;
    if (!fs) goto done;
    if (!(os_ = PySequence_Fast(oo, "offsets must be a sequence")) || !(bs = PySequence_Fast(bo, "bufs must be a sequence")))
        goto done;
    n = PySequence_Fast_GET_SIZE(fs);
    if (PySequence_Fast_GET_SIZE(os_) != n || PySequence_Fast_GET_SIZE(bs) != n) {
        PyErr_SetString(PyExc_ValueError, "pread_many: fds, offsets and bufs must have one item each");
        goto done;
    }
    views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    fd = PyMem_Calloc(n ? (size_t)n : 1, sizeof(int));
    off = PyMem_Calloc(n ? (size_t)n : 1, sizeof(long long));
    if (!views || !fd || !off) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        fd[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fs, i));
        off[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(os_, i));
        if (PyErr_Occurred()) goto done;
        if (off[i] < 0) {
            PyErr_Format(PyExc_ValueError, "pread_many: offset %zd is negative", i);
            goto done;
        }
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(bs, i), &views[i], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        got = i + 1;
    }
    Py_BEGIN_ALLOW_THREADS
    int probing = n > 1;
    for (Py_ssize_t i = 0; i < n && result < 0 && !err; i++) {
        int rc = read_item(fd[i], views[i].buf, (size_t)views[i].len, (off_t)off[i], &probing, fd, off, views, i, n);
        if (rc < 0)
            result = i;
        else if (rc > 0)
            err = rc;
    }
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    ret = PyLong_FromSsize_t(result);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(fd);
    PyMem_Free(off);
    Py_XDECREF(fs);
    Py_XDECREF(os_);
    Py_XDECREF(bs);
    return ret;
#else
    (void)args;
    PyErr_SetString(PyExc_OSError, "pread_many: pread is not available on this platform");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"pread_many", py_pread_many, METH_VARARGS,
     "pread_many(fds, offsets, bufs): fill each writable buffer from its fd at its offset, with the GIL\n"
     "released; -1 when all were read in full, else the index of the first one the file ended within."},
    {"advise", py_advise, METH_VARARGS,
     "advise(buf, advice): madvise(2) over buf's pages with the GIL released (buf page-aligned)."},
    {"dequant", py_dequant, METH_VARARGS,
     "dequant(codes, bits, scale, offset, group_size, rows, cols, out): packed k-bit codes to float32.\n"
     "out[r, c] = float32(code) * scale[group] + offset[group] (two float32 roundings), written into the\n"
     "writable C-contiguous buffer out of rows * cols float32. Outliers are not applied here."},
    {"sum64", py_sum64, METH_VARARGS,
     "sum64(buf): sum of little-endian uint64 words times odd multipliers (2i+1)*K mod 2^64 (sti.checksums)."},
    {"decode", py_decode, METH_VARARGS,
     "decode(raw, program, outs): every tensor a program (int64 rows, see sti.quant.Program) describes,\n"
     "from raw into the float32 buffers of the tuple outs: k-bit matrices dequantized as dequant() does,\n"
     "outliers applied; float32 tensors copied."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
