/* STI element-wise kernels that benefit from vectorised libm (glibc's libmvec).
 * Built with -ffast-math so GCC calls the SIMD erff; results agree with the NumPy
 * fallback in sti/ops.py to within 3e-7 absolute (both are within float32 rounding
 * of the exact GELU), not bit for bit. Kernels whose fallback must be bit-identical
 * (dequantisation) live in a separate extension built without fast-math. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
 * float32 rounding (tests/models/test_llama.py). */

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

typedef struct {
    Py_ssize_t B, n_q, n_kv, hd, cap, start, cos_rows;
    const float *qkv, *cos, *sin;
    const int64_t *pad; /* (B,) or NULL */
    float *k, *v, *out;
} Attend;

static int attend_one(const Attend *a) {
    const Py_ssize_t hd = a->hd, g = a->n_q / a->n_kv, end = a->start + 1, width = (a->n_q + 2 * a->n_kv) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *scores = malloc((size_t)(end + hd) * sizeof(float));
    if (!scores) return -1;
    float *q = scores + end;
    for (Py_ssize_t b = 0; b < a->B; b++) {
        const float *row = a->qkv + b * width;
        const float *c = a->cos + (a->cos_rows > 1 ? b : 0) * hd, *s = a->sin + (a->cos_rows > 1 ? b : 0) * hd;
        Py_ssize_t first = a->pad ? (Py_ssize_t)a->pad[b] : 0;
        if (first < 0) first = 0;
        if (first > a->start) first = a->start;
        for (Py_ssize_t j = 0; j < a->n_kv; j++) { /* this token's key (rotated) and value into the cache */
            float *kc = a->k + ((b * a->n_kv + j) * a->cap) * hd, *vc = a->v + ((b * a->n_kv + j) * a->cap) * hd;
            rope_head(row + (a->n_q + j) * hd, c, s, hd, kc + a->start * hd);
            memcpy(vc + a->start * hd, row + (a->n_q + a->n_kv + j) * hd, (size_t)hd * sizeof(float));
            for (Py_ssize_t h = j * g; h < (j + 1) * g; h++) {
                rope_head(row + h * hd, c, s, hd, q);
                float m = -FLT_MAX, sum = 0.0f; /* finite: this file is built with fast math */
                for (Py_ssize_t t = first; t < end; t++) {
                    const float *kt = kc + t * hd;
                    float d = 0.0f;
#pragma omp simd reduction(+ : d)
                    for (Py_ssize_t i = 0; i < hd; i++) d += q[i] * kt[i];
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
                    const float *vt = vc + t * hd, p = scores[t] * inv;
#pragma omp simd
                    for (Py_ssize_t i = 0; i < hd; i++) o[i] += p * vt[i];
                }
            }
        }
    }
    free(scores);
    return 0;
}

/* attend_one(qkv, k_cache, v_cache, start, cos, sin, pad, n_q, out): one token per sequence.
 * qkv (B, (n_q + 2 n_kv) hd): its q, k, v before RoPE; k_cache, v_cache (B, n_kv, cap, hd): the
 * rotated k and v are written at slot `start`, then each query head attends over slots
 * pad[b] .. start of its KV head; cos, sin (1 or B, hd); pad (B,) int64 or None; out (B, n_q hd). */
static PyObject *py_attend_one(PyObject *self, PyObject *args) {
    Py_buffer qkv, k, v, cs, sn, out, pad = {0};
    PyObject *pad_obj;
    Py_ssize_t start, n_q, B, n_kv, cap, hd;
    if (!PyArg_ParseTuple(args, "y*w*w*ny*y*Onw*(nnnn)", &qkv, &k, &v, &start, &cs, &sn, &pad_obj, &n_q, &out, &B,
                          &n_kv, &cap, &hd))
        return NULL;
    int has_pad = pad_obj != Py_None, ok = 0;
    if (has_pad && PyObject_GetBuffer(pad_obj, &pad, PyBUF_C_CONTIGUOUS) < 0) goto done;
    Py_ssize_t cos_rows = hd > 0 ? cs.len / (4 * hd) : 0;
    if (B < 1 || n_kv < 1 || n_q % n_kv || hd < 2 || hd % 2 || start < 0 || start >= cap ||
        (cos_rows != 1 && cos_rows != B)) {
        PyErr_SetString(PyExc_ValueError, "attend_one: inconsistent shapes");
        goto done;
    }
    if (check_f32(&qkv, B * (n_q + 2 * n_kv) * hd, "qkv") || check_f32(&k, B * n_kv * cap * hd, "k_cache") ||
        check_f32(&v, B * n_kv * cap * hd, "v_cache") || check_f32(&cs, cos_rows * hd, "cos") ||
        check_f32(&sn, cos_rows * hd, "sin") || check_f32(&out, B * n_q * hd, "out"))
        goto done;
    if (has_pad && (pad.itemsize != 8 || pad.len != 8 * B)) {
        PyErr_SetString(PyExc_ValueError, "attend_one: pad must be B int64 values");
        goto done;
    }
    Attend a = {B, n_q, n_kv, hd, cap, start, cos_rows, qkv.buf, cs.buf, sn.buf, has_pad ? pad.buf : NULL,
                k.buf, v.buf, out.buf};
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = attend_one(&a);
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
     "attend_one(qkv, k_cache, v_cache, start, cos, sin, pad, n_q, out, (B, n_kv, cap, hd)): decode attention."},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(gate_up, out, n): out = silu(gate) * up."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmath(void) { return PyModule_Create(&module); }
