/* STI element-wise kernels that benefit from vectorised libm (glibc's libmvec).
 * Built with -ffast-math so GCC calls the SIMD erff; results agree with the NumPy
 * fallback in sti/ops.py to within 3e-7 absolute (both are within float32 rounding
 * of the exact GELU), not bit for bit. Kernels whose fallback must be bit-identical
 * (dequantisation) live in a separate extension built without fast-math. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

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

static PyMethodDef methods[] = {
    {"layer_norm_", py_layer_norm_, METH_VARARGS, "In-place LayerNorm over rows of len(w) float32 values."},
    {"gelu_", py_gelu_, METH_VARARGS, "In-place exact GELU on a float32 buffer."},
    {"softmax_", py_softmax_, METH_VARARGS, "In-place softmax over runs of n float32 values."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmath(void) { return PyModule_Create(&module); }
