"""Tensor primitives of the NumPy runtime. Pure functions on float32 arrays (the decode attention
also reads and writes float16 KV caches)."""

from __future__ import annotations

import os

import numpy as np

from sti.machine import available_cpus

# erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution of GELU's
# output scale); NumPy has no erf ufunc and SciPy's costs ~4x more here and 250 ms to import.
_P = np.float32(0.3275911)
_A = [np.float32(c) for c in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)]


def erf(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    t = 1.0 / (1.0 + _P * a)
    poly = _A[0]
    for c in _A[1:]:
        poly = poly * t + c
    y = 1.0 - poly * t * np.exp(-a * a)
    return np.copysign(y, x)


try:  # vectorised C kernels (setup.py); the NumPy paths are the fallback (STI_NO_C=1 forces it)
    if os.environ.get("STI_NO_C", "") not in ("", "0"):
        raise ImportError("STI_NO_C set")
    from sti._fastmath import attend_one as _attend_one_c
    from sti._fastmath import gelu_ as _gelu_c
    from sti._fastmath import layer_norm_ as _layer_norm_c
    from sti._fastmath import rms_norm as _rms_norm_c
    from sti._fastmath import silu_mul as _silu_mul_c
    from sti._fastmath import softmax_ as _softmax_c
except ImportError:  # pragma: no cover - depends on the build
    _gelu_c = _softmax_c = _layer_norm_c = _rms_norm_c = _silu_mul_c = _attend_one_c = None


def gelu_numpy(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x * np.float32(0.7071067811865476)))


def gelu_(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as BERT uses, computed in place on x (a float32 array) and returned."""
    if _gelu_c is not None and x.flags.c_contiguous and x.flags.writeable:
        _gelu_c(x)
    else:
        x[...] = gelu_numpy(x)
    return x


def gelu(x: np.ndarray) -> np.ndarray:
    return gelu_(np.array(x, dtype=np.float32, order="C"))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def layer_norm_(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, in place on x (float32) and returned; the C kernel agrees
    with :func:`layer_norm` to ~1e-6."""
    if (_layer_norm_c is not None and x.flags.c_contiguous and x.flags.writeable and x.size
            and w.flags.c_contiguous and b.flags.c_contiguous and w.dtype == b.dtype == np.float32):
        _layer_norm_c(x, w, b, eps)
    else:
        x[...] = layer_norm(x, w, b, eps)
    return x


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, -1, keepdims=True)
    return xc * (1.0 / np.sqrt(var + np.float32(eps))) * w + b


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis (a new array); the C kernel agrees with :func:`rms_norm_numpy`
    to float32 rounding."""
    if (_rms_norm_c is not None and x.dtype == w.dtype == np.float32 and x.size and x.flags.c_contiguous
            and w.flags.c_contiguous):
        out = np.empty_like(x)
        _rms_norm_c(x, w, eps, out)
        return out
    return rms_norm_numpy(x, w, eps)


def rms_norm_numpy(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x * x, -1, keepdims=True)
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * w


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) * up for gate_up (..., 2n) holding [gate | up] (SwiGLU on stacked projections)."""
    n = gate_up.shape[-1] // 2
    if _silu_mul_c is not None and gate_up.dtype == np.float32 and gate_up.size and gate_up.flags.c_contiguous:
        out = np.empty(gate_up.shape[:-1] + (n,), np.float32)
        _silu_mul_c(gate_up, out, n)
        return out
    return silu(gate_up[..., :n]) * gate_up[..., n:]


# Element types of the KV caches :func:`attend_one` reads and writes (both caches alike).
ATTEND_ONE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def has_attend_one() -> bool:
    """Whether the C decode-attention kernel (:func:`attend_one`) is built."""
    return _attend_one_c is not None


# Decode attention runs its (sequence, KV head) tasks on two threads of sti._lowbit's pool (the
# products' threads) from this much work on: query heads x attended cache slots, summed over the
# batch. Measured between products as decode runs them (SmolLM2's 9 query and 3 KV heads of 64):
# 1 sequence over 16 slots is 0.86x on two threads, 2 sequences over 16 slots 1.1x, 1 over 140
# 1.4x, 16 over 140 1.45x.
ATTEND_PARALLEL_WORK = 256
ATTEND_THREADS = min(2, available_cpus())


def attend_one(qkv: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, cos: np.ndarray,
               sin: np.ndarray, pad: np.ndarray | None, n_q: int, threads: int | None = None) -> np.ndarray:
    """Attention of one new token per sequence, in C (sti/_fastmath.c): qkv (B, (n_q + 2 n_kv) hd)
    holds its q, k, v before RoPE; the rotated k and v are written into the caches (B, n_kv, cap,
    hd) at slot ``start``, and each query head attends over its KV head's slots ``pad[b]..start``.
    cos, sin (1 or B, hd). Returns the context (B, n_q hd). ``sti.models.llama.attention`` is the
    NumPy reference.

    The caches are both float32 or both float16 (:data:`ATTEND_ONE_DTYPES`). A float16 cache gets
    k and v rounded to nearest even, bit for bit as ``astype(np.float16)`` rounds them, and the
    scores and the weighted sum are computed in float32 from the stored values, this token's
    included.

    ``threads``: how many threads of sti._lowbit's pool share the work (default: two where the
    work is at least :data:`ATTEND_PARALLEL_WORK`); every thread count gives the same bits."""
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in ATTEND_ONE_DTYPES:
        raise ValueError(f"attend_one: k_cache and v_cache must both be float32 or both float16, "
                         f"not {k_cache.dtype} and {v_cache.dtype}")
    B, n_kv, cap, hd = k_cache.shape
    if threads is None:
        threads = ATTEND_THREADS if B * n_q * (start + 1) >= ATTEND_PARALLEL_WORK else 1
    out = np.empty((B, n_q * hd), np.float32)
    _attend_one_c(qkv, k_cache, v_cache, start, cos, sin, None if pad is None else np.asarray(pad, np.int64),
                  n_q, out, (B, n_kv, cap, hd), k_cache.itemsize, threads)
    return out


def softmax_numpy(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    e /= e.sum(axis, keepdims=True)
    return e


def softmax_(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed in place on x (float32) and returned. The C kernel
    agrees with the NumPy path to ~1e-7 relative. Inputs must be finite (mask with the float32
    minimum, not -inf: the kernel is built with fast math)."""
    if _softmax_c is not None and x.flags.c_contiguous and x.flags.writeable and x.size:
        _softmax_c(x, x.shape[-1])
    else:
        x[...] = softmax_numpy(x)
    return x


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return softmax_numpy(x, axis)


def matmul_add(out: np.ndarray, x: np.ndarray, w) -> None:
    """out += x @ w, with w (in, out) an array or an operator with ``matmul_add(x, out)`` (the
    streaming encoder's int8 products of input-major shards, ``sti.runtime``)."""
    if isinstance(w, np.ndarray):
        out += x @ w
    else:
        w.matmul_add(np.ascontiguousarray(x, dtype=np.float32), out)


def linear(x: np.ndarray, w, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T (+ b), with w stored (out, in) as checkpoints store it, or an operator of
    ``sti.linops`` (packed or sharded weights; ``w.apply`` multiplies). x (..., in) is flattened
    to 2-D: NumPy's matmul of a 3-D stack against a matrix is several times slower."""
    if not isinstance(w, np.ndarray):
        y = w.apply(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32))
        y = y.reshape(*x.shape[:-1], w.shape[0])
    elif x.ndim > 2:
        y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])
    else:
        y = x @ w.T
    if b is not None:
        y += b
    return y
