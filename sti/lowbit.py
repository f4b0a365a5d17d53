"""Matrix-vector products straight from packed low-bit weights, and the measured choice of kernel.

Decode multiplies each weight matrix by one activation vector (or a small batch of them, when
several sequences are generated together), so its speed is the speed of reading the weights. The
C kernels of ``sti._lowbit`` read the packed bytes once and turn them into float32 in registers:
no float32 copy of a weight matrix is ever written. Prefill, with many tokens, is faster the other
way round (dequantize once, then one BLAS matrix-matrix product); which of the two runs for a
shape and batch size, and on how many threads, is decided by timing both on this machine
(:func:`choose`, the NNV12 idea), not hard-coded.

Weight kinds (:data:`KINDS`), each a :class:`LowBitTensor` ``(kind, shape, buf, meta)`` over a
zero-copy buffer (bytes, mmap, memoryview, uint8 array):

``"sti-q1"``
    STI's outlier-aware group-wise k-bit layout, k in {2, 3, 4, 5, 6, 8}: ``buf`` is the layout
    :func:`sti.quant.to_bytes` writes, ``meta`` what :meth:`sti.quant.QuantizedTensor.meta` returns.
``"ggml-q4_1"``, ``"ggml-q8_0"``
    GGML blocks of 32 along each row, rows * cols / 32 blocks in row-major order: Q4_1 is f16 d,
    f16 m and 16 bytes of nibbles (low nibbles are elements 0..15, high nibbles 16..31), element
    = d * q + m; Q8_0 is f16 d and 32 int8, element = d * q. ``meta`` is unused.
    (:func:`from_gguf` wraps a tensor of a GGUF file.)

What "the same" means, C kernels against the NumPy fallback (set ``STI_NO_C=1`` before importing
to force the fallback, as for :mod:`sti.quant`):

* :func:`dequantize` is **bit-identical**: GGML kinds to ``gguf.quants.dequantize`` (float32
  ``d * q`` then ``+ m``, two roundings, no fused multiply-add), sti-q1 to
  :func:`sti.quant.dequantize_numpy`.
* :func:`matvec` is **not** bit-identical, and cannot cheaply be made so: float32 sums run in
  different orders (BLAS has its own, which differs between builds and thread counts). For sti-q1
  the fallback is dequantize then ``x @ W.T``; the fused kernel factors each segment's affine map
  out of its sum — ``sum_s a_s * sum_i q_i x_i + c_s * sum_i x_i`` — and applies outliers as
  ``(exact - quantized) * x`` corrections. For GGML kinds both sides round x to int16 per block of
  32 (:func:`quantize_acts`, identical on both sides), take each block's integer dot product with
  the weight codes exactly, and differ only in the order of the float32 sum of
  ``d * d16 * isum (+ m * xs)`` over blocks. The tests hold every element to
  ``|y_c - y_numpy| <= 1e-5 * (|W| @ |x|)``; the largest ratio seen is about 3e-7. Rounding x to
  int16 moves the product by about 1e-5 of ``|W| @ |x|`` against float32 x (the ``dequant``
  method), 400 times less than the weights' own 4-bit rounding (4e-3, median; 4 bits, 576x576
  Gaussian weights); it buys a kernel that widens and multiplies integers instead of converting
  every weight to float (see sti/_lowbit.c).

* :func:`qmm` ("int8" in a kernel choice, batches only; GGML blocks in their affine form,
  :func:`ggml_affine`) rounds x to int8 per vector and weight group on both sides
  (:func:`quantize_acts_i8`, identical), takes each group's code . x sum exactly, and differs
  from :func:`qmm_numpy` only in the float32 combination (the same ``1e-5 * (|W| @ |x|)``
  bound; ~3e-7 seen). y is W times the rounded x (offsets included), so rounding moves y by at
  most ``sum_s dx_s / 2 * sum_{i in s} |W_i|`` (tests/test_lowbit.py checks it); in exchange
  AVX-512 VNNI multiplies 64 code/activation byte pairs per instruction with the batch across
  the lanes, 2.5-2.8x the fused kernel at batch 16 (576 x 576, 2-6 bits; Q4_1 2.2x). Whether
  it runs is measured like the other methods: per shape for sti-q1, per kind and batch size for
  the lossless GGML kinds (:data:`INT8_REF_SHAPE`). :func:`qmm_stack` is the same product for
  several matrices read in place from several buffers (an encoder chunk's shards, stacked along
  the rows), with x rounded once.

Threads: ``threads=2`` splits rows between the calling thread and a helper of a small pthread
pool inside ``sti._lowbit``. The caller never waits for a helper that has not started (a loaded
machine may not schedule it for milliseconds) and recomputes a task a preempted helper holds for
too long, so two threads are never much slower than one; whether they are faster for a given
shape is what :func:`choose` measures.

Results of :func:`profile_kernels` are plain JSON (:class:`KernelProfile` saves and loads it), so
a store's profile directory can hold the measurements made at profile time (as
:data:`PROFILE_NAME`) and a later run loads them instead of measuring again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sti import blas, quant
from sti.machine import available_cpus

KINDS = ("sti-q1", "ggml-q4_1", "ggml-q8_0")
GGML = {"ggml-q4_1": (0, 20, 4), "ggml-q8_0": (1, 34, 8)}  # kind -> (C kind code, bytes per block, bits)
QK = 32  # elements per GGML block
METHODS = ("fused", "dequant", "int8")  # int8: qmm, batches only
# Batches of every kind may run int8 products (qmm). For STI's k-bit kinds int8 competes per shape,
# like fused against dequantize + BLAS. The GGML blocks are the lossless versions, whose
# streamed tokens must equal the in-memory ones: int8 activations move a product by ~4e-3 of
# |W||x| (the 4-bit weights' own error; the other kernels by 1e-5), so an engine whose shard shapes
# chose int8 and one whose whole matrices did not could pick different greedy tokens. For them
# int8 is decided per kind and batch size, once, on INT8_REF_SHAPE, and every shape of the kind
# follows that decision (only its thread count, or fused against dequantize, is measured per
# shape). x is rounded per block of 32 inputs, so a product cut into shards along its inputs
# rounds x exactly as the whole matrix does.
INT8_REF_SHAPE = (1536, 576)  # (rows, cols) the lossless kinds' int8 decision is measured on
PROFILE_SCHEMA = 2  # 2: GGML batches may choose int8 (schema 1 profiles never measured it)
# A choice whose runner-up thread count timed within CLOSE_CALL of it, or that runs on fewer threads
# than a rival, is measured again in a later process, up to CONFIRM_ROUNDS measurements in all
# (KernelChoice.doubtful, KernelProfile.choose).
CLOSE_CALL = 0.10
CONFIRM_ROUNDS = 2
PROFILE_NAME = "kernels.json"  # the file name a store's profile directory keeps the measurements under
# Bytes of distinct weight copies a timing cycles through, so that every call reads its weights
# from memory as decode does (30 layers of SmolLM2 are 66 MB at Q4_1) instead of from a warm
# cache, which would flatter the fused kernels on small matrices.
STREAM_BYTES = 64 << 20

try:  # C kernels (setup.py: sti._lowbit); the NumPy path below is the reference and the fallback
    if os.environ.get("STI_NO_C", "") not in ("", "0"):
        raise ImportError("STI_NO_C set")
    from sti import _lowbit as _lb
except ImportError:  # pragma: no cover - depends on the build
    _lb = None


def has_c_kernels() -> bool:
    return _lb is not None


def has_int8_kernel() -> bool:
    """Whether :func:`qmm` runs on AVX-512 VNNI (elsewhere it is portable C: exact, not fast)."""
    return _lb is not None and bool(getattr(_lb, "VNNI", 0))


def kernel_info() -> dict:
    """How the C kernels were built: ``{"simd", "threads", "max_threads", "revision"}`` (``simd`` None
    without them; ``revision`` changes with the kernels' speed or arithmetic)."""
    return dict(_lb.info()) if _lb is not None else {"simd": None, "threads": "none", "max_threads": 1}


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True, eq=False)
class LowBitTensor:
    """A (rows, cols) weight matrix of kind ``kind`` over ``buf`` (zero-copy: keep ``buf`` alive).
    Validated once here, so that :func:`matvec` does no per-call parsing."""

    kind: str
    shape: tuple[int, int]
    buf: Any
    meta: dict | None = None
    _q: quant.QuantizedTensor | None = field(default=None, init=False, repr=False)
    _raw: Any = field(default=None, init=False, repr=False)
    _m: Any = field(default=None, init=False, repr=False)  # the sti._lowbit.Matrix over buf

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LowBitTensor: kind must be one of {KINDS}, got {self.kind!r}")
        rows, cols = (int(n) for n in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        if self.kind == "sti-q1":
            q = quant.from_buffer(self.buf, self.meta or {})
            if q.shape != self.shape:
                raise ValueError(f"LowBitTensor: shape {self.shape} but meta describes {q.shape}")
            object.__setattr__(self, "_q", q)
            if _lb is not None:
                object.__setattr__(self, "_m", _lb.Matrix(2, rows, cols, q.codes, q.bits, q.group_size, q.scale,
                                                          q.offset, q.outlier_idx, q.outlier_val))
            return
        mv = memoryview(self.buf)
        if not mv.c_contiguous:
            raise ValueError("LowBitTensor: the buffer must be C-contiguous")
        mv = mv.cast("B")
        _, block_bytes, _ = GGML[self.kind]
        if cols % QK:
            raise ValueError(f"LowBitTensor: {self.kind} rows hold a multiple of {QK} columns, got shape {self.shape}")
        need = rows * cols // QK * block_bytes
        if mv.nbytes != need:
            raise ValueError(f"LowBitTensor: {self.kind} {self.shape} needs {need} bytes, the buffer holds {mv.nbytes}")
        object.__setattr__(self, "_raw", mv)
        if _lb is not None:
            object.__setattr__(self, "_m", _lb.Matrix(GGML[self.kind][0], rows, cols, mv))

    @property
    def bits(self) -> int:
        return self._q.bits if self._q is not None else GGML[self.kind][2]

    @property
    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads: codes/blocks, scales and offsets, outliers."""
        if self._q is None:
            return self._raw.nbytes
        q = self._q
        return q.codes.nbytes + q.scale.nbytes + q.offset.nbytes + q.outlier_idx.nbytes + q.outlier_val.nbytes

    @classmethod
    def from_quantized(cls, q: quant.QuantizedTensor) -> LowBitTensor:
        """An sti-q1 tensor over the serialized layout of ``q`` (one copy, into that layout)."""
        return cls("sti-q1", q.shape, quant.to_bytes(q), q.meta())

    def copy(self) -> LowBitTensor:
        """The same tensor over a private copy of the buffer."""
        return LowBitTensor(self.kind, self.shape, bytearray(memoryview(self.buf).cast("B")), self.meta)


def row_range(t, start: int, stop: int) -> LowBitTensor:
    """Rows ``start:stop`` of a GGML matrix, over the same bytes (no copy)."""
    t = as_lowbit(t)
    if t.kind not in GGML:
        raise ValueError(f"row_range needs GGML blocks, not {t.kind}")
    rows, cols = t.shape
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"row_range: rows {start}:{stop} of a matrix with {rows}")
    rb = cols // QK * GGML[t.kind][1]
    return LowBitTensor(t.kind, (stop - start, cols), t._raw[start * rb:stop * rb])


class TiledTensor:
    """A GGML matrix put together from others in place, as ``np.block`` puts arrays together:
    ``bands`` are row bands top to bottom, each a list of P tiles side by side (GGML matrices of one
    kind with the band's rows and cols / P columns each; :func:`row_range` cuts rows out of a
    matrix without a copy). The C kernels read every tile where it lies, so a layer's shards, each
    holding some rows or columns of its matrices, multiply as one matrix: one kernel call and one
    rounding of x for all of them, and every output element the same sum, bit for bit, as in the
    matrix the shards were cut from. Without the C kernels, :func:`matvec` and :func:`dequantize`
    read a contiguous copy (made on first use)."""

    def __init__(self, bands):
        bands = [[as_lowbit(t) for t in band] for band in bands]
        if not bands or any(not band for band in bands):
            raise ValueError("TiledTensor: needs at least one band of at least one tile")
        kind, P = bands[0][0].kind, len(bands[0])
        if kind not in GGML or any(t.kind != kind for band in bands for t in band):
            raise ValueError(f"TiledTensor: every tile must be one GGML kind, got "
                             f"{sorted({t.kind for band in bands for t in band})}")
        tcols = bands[0][0].shape[1]
        for band in bands:
            if len(band) != P or any(t.shape[1] != tcols or t.shape[0] != band[0].shape[0] for t in band):
                raise ValueError(f"TiledTensor: every band needs {P} tiles of {tcols} columns and one row count, got "
                                 f"{[t.shape for t in band]}")
        self.kind, self.bands, self.meta, self._q = kind, bands, None, None
        self.shape = (sum(band[0].shape[0] for band in bands), P * tcols)
        self._contig = None
        self._m = None
        if _lb is not None:
            bufs = [t._raw for band in bands for t in band]  # tile p of band k: buffer k * P + p, from byte 0
            index = np.stack([np.arange(len(bufs)), np.zeros(len(bufs), np.int64)], axis=1).astype(np.int64)
            starts = np.cumsum([0] + [band[0].shape[0] for band in bands]).astype(np.int64)
            self._m = _lb.tiled(GGML[kind][0], self.shape[0], self.shape[1], bufs, starts, index)

    @property
    def bits(self) -> int:
        return GGML[self.kind][2]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for band in self.bands for t in band)

    @property
    def _raw(self) -> memoryview:
        """The matrix's bytes in one piece (a copy, for the NumPy paths)."""
        if self._contig is None:
            self._contig = memoryview(np.concatenate(
                [np.concatenate([np.frombuffer(t._raw, np.uint8).reshape(t.shape[0], -1) for t in band], axis=1)
                 for band in self.bands]).reshape(-1))
        return self._contig

    @property
    def buf(self) -> memoryview:
        return self._raw


def from_gguf(gf, name: str) -> LowBitTensor:
    """A Q4_1 or Q8_0 tensor of an open :class:`sti.loaders.gguf.GGUFFile`, over its mapped bytes."""
    from gguf import GGMLQuantizationType as T

    info = gf.tensors[name]
    kinds = {T.Q4_1: "ggml-q4_1", T.Q8_0: "ggml-q8_0"}
    kind = kinds.get(T(info.ggml_type))
    if kind is None or len(info.shape) != 2:
        raise ValueError(f"from_gguf: {name} is {info.type_name} {info.shape}; only 2-D Q4_1 and Q8_0 are supported")
    return LowBitTensor(kind, info.shape, gf.raw(name))


def as_lowbit(t) -> LowBitTensor:
    """``t`` itself (a :class:`LowBitTensor` or :class:`TiledTensor`), or a :class:`LowBitTensor`
    built from any object with kind, shape, buf, meta."""
    if isinstance(t, (LowBitTensor, TiledTensor)):
        return t
    return LowBitTensor(t.kind, tuple(t.shape), t.buf, getattr(t, "meta", None))


def random_tensor(kind: str, shape, bits: int | None = None, group_size: int = 64, seed: int = 0,
                  scale: float = 0.02) -> LowBitTensor:
    """A random tensor of ``kind`` (codes uniform, scales ~``scale``; sti-q1 with the default
    number of outliers, placed at random), for tests and timings: built directly, not quantized."""
    rng = np.random.default_rng(seed)
    rows, cols = int(shape[0]), int(shape[1])
    if kind in GGML:
        _, block_bytes, _ = GGML[kind]
        nb = rows * cols // QK if cols % QK == 0 else -1
        if nb < 0:
            raise ValueError(f"random_tensor: {kind} needs cols % {QK} == 0, got {cols}")
        blocks = rng.integers(0, 256, size=(nb, block_bytes), dtype=np.uint8)
        blocks[:, 0:2] = (rng.uniform(0.5, 1.5, nb) * scale / 8).astype("<f2").view(np.uint8).reshape(nb, 2)
        if kind == "ggml-q4_1":
            blocks[:, 2:4] = (-rng.uniform(0.5, 1.5, nb) * scale).astype("<f2").view(np.uint8).reshape(nb, 2)
        return LowBitTensor(kind, (rows, cols), blocks.reshape(-1))
    if kind != "sti-q1":
        raise ValueError(f"random_tensor: kind must be one of {KINDS}, got {kind!r}")
    bits = 4 if bits is None else int(bits)
    ng = -(-cols // group_size)
    n_out = quant.outlier_count((rows, cols), bits)
    q = quant.QuantizedTensor(
        bits=bits, shape=(rows, cols), group_size=group_size,
        codes=rng.integers(0, 256, size=rows * ng * group_size * bits // 8, dtype=np.uint8),
        scale=(rng.uniform(0.5, 1.5, (rows, ng)) * 2 * scale / (1 << bits)).astype(np.float32),
        offset=(-rng.uniform(0.5, 1.5, (rows, ng)) * scale).astype(np.float32),
        outlier_idx=np.sort(rng.choice(rows * cols, n_out, replace=False)).astype(np.uint32),
        outlier_val=(rng.standard_normal(n_out) * 4 * scale).astype(np.float32))
    return LowBitTensor.from_quantized(q)


# --------------------------------------------------------------------------- dequantize


def dequantize(t, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """The (rows, cols) float32 matrix, written into ``out`` when given; bit-identical to
    :func:`dequantize_numpy` (the C kernel when built, on ``threads`` threads)."""
    t = as_lowbit(t)
    out = _out_matrix(out, t.shape)
    if t._m is None:
        return dequantize_numpy(t, out)
    t._m.dequant(out, threads)
    return out


def dequantize_numpy(t, out: np.ndarray | None = None) -> np.ndarray:
    """Reference dequantization: ``gguf.quants.dequantize`` for GGML kinds,
    :func:`sti.quant.dequantize_numpy` for sti-q1."""
    t = as_lowbit(t)
    out = _out_matrix(out, t.shape)
    if t._q is not None:
        return quant.dequantize_numpy(t._q, out)
    from gguf import GGMLQuantizationType, quants

    if out.size == 0:
        return out
    qtype = GGMLQuantizationType.Q4_1 if t.kind == "ggml-q4_1" else GGMLQuantizationType.Q8_0
    raw = np.frombuffer(t._raw, dtype=np.uint8).reshape(t.shape[0], -1)
    out[...] = quants.dequantize(raw, qtype).reshape(t.shape)
    return out


def _out_matrix(out, shape):
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == tuple(shape)
            and out.flags.c_contiguous and out.flags.writeable):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape {tuple(shape)}, got {got}")
    return out


# --------------------------------------------------------------------------- matvec


def matvec(t, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False,
           threads: int = 1) -> np.ndarray:
    """``x @ W.T`` for x (cols,) -> (rows,) or a batch X (B, cols) -> (B, rows), reading the
    packed weights once whatever B is. ``out`` receives the result (``accumulate``: is added to).
    The fused C kernel on ``threads`` threads; :func:`matvec_numpy` without it."""
    t = t if type(t) is LowBitTensor else as_lowbit(t)
    if t._m is None:
        return matvec_numpy(t, x, out, accumulate)
    if type(x) is not np.ndarray or x.dtype != np.float32:
        x = np.asarray(x, dtype=np.float32)
    if out is None:
        if accumulate:
            raise ValueError("matvec: accumulate=True needs out")
        out = np.empty(x.shape[:-1] + t.shape[:1], dtype=np.float32)
    # the C side checks x and out (float32, C-contiguous, (cols,)/(rows,) or (B, cols)/(B, rows))
    t._m.matvec(x if x.flags.c_contiguous else np.ascontiguousarray(x), out, accumulate, threads)
    return out


def matvec_numpy(t, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """Reference. sti-q1: :func:`dequantize_numpy`, then ``x @ W.T`` (BLAS). GGML kinds: x rounded
    to int16 blocks (:func:`quantize_acts`) and, per block, the exact integer dot product with the
    weight codes, scaled by ``d * d16`` (plus ``m * xs`` for Q4_1), as the C kernel computes it."""
    t = as_lowbit(t)
    x, out, _ = _check_matvec(t, x, out, accumulate)
    if t._q is not None or 0 in t.shape:
        return _finish(x @ dequantize_numpy(t).T, out, accumulate)
    q16, d16, xs = quantize_acts(x.reshape(-1, t.shape[1]))  # (B, nb, 32), (B, nb), (B, nb)
    rows, nb = t.shape[0], t.shape[1] // QK
    blocks = np.frombuffer(t._raw, dtype=np.uint8).reshape(rows, nb, GGML[t.kind][1])
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, nb)
    if t.kind == "ggml-q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # (rows, nb, 32): low nibbles first
    else:
        codes = blocks[..., 2:].view(np.int8)
    # integer dot products per block, exact in float64 (|sum| <= 32 * 128 * 32767 < 2**53)
    isum = np.matmul(codes.transpose(1, 0, 2).astype(np.float64),
                     q16.transpose(1, 2, 0).astype(np.float64)).astype(np.float32)  # (nb, rows, B)
    y = ((d.T[:, :, None] * d16.T[:, None, :]) * isum).sum(axis=0)  # (rows, B)
    if t.kind == "ggml-q4_1":
        y += m @ xs.T
    return _finish(y.T.reshape(out.shape), out, accumulate)


def quantize_acts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (B, cols) float32, cols a multiple of 32 -> int16 codes (B, cols/32, 32), scales d16 and
    sums xs (B, cols/32), x ~ d16 * codes per block: d16 = max|x| / 32767, codes = rint(x * (1 /
    d16)) (0 where d16 is 0). The float32 operations of the C kernels, so both round every element
    alike."""
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(x.shape[0], -1, QK)
    d16 = np.abs(xb).max(axis=-1) / np.float32(32767)
    with np.errstate(divide="ignore"):
        inv = np.where(d16 != 0, np.float32(1) / d16, np.float32(0)).astype(np.float32)
    q16 = np.rint(xb * inv[..., None]).astype(np.int16)
    return q16, d16, xb.sum(axis=-1, dtype=np.float32)


def quantize_acts_i8(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (B, cols) float32 -> int8 codes (B, ng, G), scales dx and sums xs (B, ng): each
    vector's groups of G = ``group_size`` columns (zero-padded to ng * G) rounded as :func:`qmm`
    rounds them, dx = max|x| / 127, codes = rint(x * (127 / max|x|)) (0 where max|x| is 0), and
    xs = dx * sum(codes), the sum of the rounded x (so that a weight's offset multiplies the same
    x as its codes do; see :func:`qmm`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    B, cols = x.shape
    ng = -(-cols // group_size)
    xb = np.zeros((B, ng * group_size), np.float32)
    xb[:, :cols] = x
    xb = xb.reshape(B, ng, group_size)
    amax = np.abs(xb).max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int8)
    dx = amax / np.float32(127)
    return q, dx, dx * q.sum(axis=-1, dtype=np.int32).astype(np.float32)


def qmm(t, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False, threads: int = 1) -> np.ndarray:
    """``x @ W.T`` for a batch X (B, cols) -> (B, rows) with integer products: W sti-q1 (its codes
    are unsigned, at most 8 bits) or GGML blocks (:func:`ggml_affine`: Q4_1's nibbles, Q8_0's
    q + 128, blocks of 32 as the groups), x rounded to int8 per vector and weight group
    (:func:`quantize_acts_i8`), each group's code . x sum exact, then scaled:
    ``y = sum_s scale_s * dx_s * isum_s + offset_s * xs_s`` with xs_s the sum of the rounded x,
    plus outlier corrections: y is W times the rounded x, so rounding x moves y by at most
    ``sum_s dx_s / 2 * sum_{i in s} |W_i|``. The AVX-512 VNNI kernel of
    ``sti._lowbit`` (portable C elsewhere) on ``threads`` threads; :func:`qmm_numpy` without it."""
    t = t if type(t) in (LowBitTensor, TiledTensor) else as_lowbit(t)
    x, out, _ = _check_matvec(t, x, out, accumulate)
    if t._m is None or x.ndim == 1:
        return qmm_numpy(t, x, out, accumulate)
    t._m.qmm(x, out, accumulate, threads)
    return out


def qmm_stack(x: np.ndarray, out: np.ndarray, bufs, prog: np.ndarray, accumulate: bool = False,
              threads: int = 1) -> np.ndarray:
    """:func:`qmm` of several sti-q1 matrices at once, stacked along the rows: out (B, R) (+)= x (B, cols)
    @ W.T, where W's rows are those of the matrix ``prog[0]`` describes in ``bufs[0]``, then of
    ``prog[1]`` in ``bufs[1]``, and so on. ``prog``: int64 (n, 11), rows of :class:`sti.quant.Program`
    tables (the tensors of a shard file, read in place); every matrix has x's columns and one group
    size, so x is rounded once. :func:`qmm_numpy` per matrix without the C kernels."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _lb is not None:
        _lb.qmm_prog(x, out, bufs, prog, accumulate, threads)
        return out
    return _rows_numpy("qmm_stack", _qmm_numpy, x, out, bufs, prog, accumulate)


def qmm_cols(x: np.ndarray, out: np.ndarray, bufs, prog: np.ndarray, accumulate: bool = False,
             threads: int = 1) -> np.ndarray:
    """:func:`qmm` of a matrix cut along its input axis into sti-q1 matrices (``bufs`` / ``prog`` as
    for :func:`qmm_stack`; one row count and group size): out (B, R) (+)= sum_i x[:, c_i:c_i +
    cols_i] @ W_i.T, c_i the columns of the matrices before i. Every output is the sum, in matrix
    order, of each matrix's own :func:`qmm` of its slice of x (bit for bit, any thread count); one
    call and one thread hand-off instead of one per matrix. :func:`qmm_numpy` per matrix without the
    C kernels."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _lb is not None:
        _lb.qmm_cols(x, out, bufs, prog, accumulate, threads)
        return out
    return _cols_numpy("qmm_cols", _qmm_numpy, x, out, bufs, prog, accumulate)


def matvec_stack(x: np.ndarray, out: np.ndarray, bufs, prog: np.ndarray, accumulate: bool = False,
                 threads: int = 1) -> np.ndarray:
    """:func:`qmm_stack` for one vector x (cols,) or (1, cols), with the fused products: every
    output as the matrix's own :func:`matvec` gives it, in one call instead of one per matrix.
    :func:`matvec_numpy` per matrix without the C kernels."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _lb is not None:
        _lb.matvec_prog(x, out, bufs, prog, accumulate, threads)
        return out
    return _rows_numpy("matvec_stack", _matvec_q, x, out, bufs, prog, accumulate)


def matvec_cols(x: np.ndarray, out: np.ndarray, bufs, prog: np.ndarray, accumulate: bool = False,
                threads: int = 1) -> np.ndarray:
    """:func:`qmm_cols` for one vector x, with the fused products: every output the sum, in matrix
    order, of each matrix's own :func:`matvec` of its slice of x (bit for bit, any thread count).
    :func:`matvec_numpy` per matrix without the C kernels."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _lb is not None:
        _lb.matvec_cols(x, out, bufs, prog, accumulate, threads)
        return out
    return _cols_numpy("matvec_cols", _matvec_q, x, out, bufs, prog, accumulate)


def _matvec_q(q: quant.QuantizedTensor, x: np.ndarray) -> np.ndarray:
    return matvec_numpy(LowBitTensor.from_quantized(q), x)


def _rows_numpy(name: str, product, x, out, bufs, prog, accumulate) -> np.ndarray:
    """The NumPy path of a rows-stacked product: ``product(q, x)`` of each matrix of ``bufs`` /
    ``prog`` into its columns of out."""
    col = 0
    for buf, row in zip(bufs, prog):
        y = product(quant.from_program_row(buf, row), x.reshape(-1, x.shape[-1]))
        _finish(y, out.reshape(-1, out.shape[-1])[:, col:col + y.shape[1]], accumulate)
        col += y.shape[1]
    if col != out.shape[-1]:
        raise ValueError(f"{name}: the matrices have {col} rows in all, out has {out.shape[-1]} columns")
    return out


def _cols_numpy(name: str, product, x, out, bufs, prog, accumulate) -> np.ndarray:
    """The NumPy path of a column-cut product: each matrix's ``product`` of its slice of x, summed
    into out in matrix order."""
    col = 0
    flat = out.reshape(-1, out.shape[-1])
    for k, (buf, row) in enumerate(zip(bufs, prog)):
        q = quant.from_program_row(buf, row)
        _finish(product(q, x.reshape(-1, x.shape[-1])[:, col:col + q.shape[1]]), flat, accumulate or k > 0)
        col += q.shape[1]
    if col != x.shape[-1]:
        raise ValueError(f"{name}: the matrices have {col} columns in all, x has {x.shape[-1]}")
    return out


def qmmt_stack(x: np.ndarray, out: np.ndarray, bufs, prog: np.ndarray, accumulate: bool = False,
               threads: int = 1) -> np.ndarray:
    """out (B, H) (+)= x (B, N) @ W for W (N, H) stacked from the sti-q1 matrices of ``bufs`` / ``prog``
    along its rows (as :func:`qmm_stack`; N is their rows in all, each a multiple of 4): the
    product of a matrix stored input-major, whose weight groups run along the outputs (an encoder's
    output and down projections as shards hold them). A group's scale belongs to an input row, so it
    is folded into x: for output group g, ``z = x * scale[:, g]`` is rounded to int8 per vector and
    block of 64 inputs (dz = max|z| / 127), the block sums of q . code are exact, and
    ``y[:, j] = sum_k dz_k * isum_k + x @ offset[:, g]`` plus the outliers' corrections. Rounding z
    moves y by at most ``sum_k dz_k / 2 * sum_{i in k} code_ij``. NumPy reference without the C
    kernels (:func:`qmmt_numpy`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _lb is not None:
        _lb.qmmt_prog(x, out, bufs, prog, accumulate, threads)
        return out
    y = qmmt_numpy([quant.from_program_row(b, r) for b, r in zip(bufs, prog)], x.reshape(-1, x.shape[-1]))
    return _finish(y.reshape(out.shape), out, accumulate)


QMMT_BLOCK = 32  # inputs per int8 block of the transposed product (TKB in sti/_lowbit.c); items start blocks


def qmmt_numpy(qs: list, x: np.ndarray) -> np.ndarray:
    """Reference of :func:`qmmt_stack`: x (B, N) @ the quantized tensors ``qs`` stacked along their
    rows -> (B, H), with the same rounding of z and exact integer sums (float64)."""
    H, G, ng = qs[0].shape[1], qs[0].group_size, qs[0].n_groups
    codes = np.concatenate([quant.unpack_codes(q.codes, q.bits).reshape(q.shape[0], -1)[:, :H] for q in qs])
    scale = np.concatenate([q.scale.reshape(q.shape[0], ng) for q in qs])
    offset = np.concatenate([q.offset.reshape(q.shape[0], ng) for q in qs])
    N, B = codes.shape[0], x.shape[0]
    if x.shape[1] != N:
        raise ValueError(f"qmmt: x has {x.shape[1]} columns, the matrices {N} rows in all")
    # every item's rows start a block: the padded row of each stacked row
    pad = [-(-q.shape[0] // QMMT_BLOCK) * QMMT_BLOCK for q in qs]
    at = np.concatenate([np.arange(q.shape[0]) + p0 for q, p0 in zip(qs, np.cumsum([0] + pad[:-1]))]).astype(np.int64)
    NP = sum(pad)
    cp = np.zeros((NP, H), np.float64)
    cp[at] = codes
    cp = cp.reshape(NP // QMMT_BLOCK, QMMT_BLOCK, H)
    y = np.empty((B, H), np.float32)
    for g in range(ng):
        cols = slice(g * G, min((g + 1) * G, H))
        z = np.zeros((B, NP), np.float32)
        z[:, at] = x * scale[:, g][None]
        z = z.reshape(B, -1, QMMT_BLOCK)
        amax = np.abs(z).max(axis=-1)
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(z * inv[..., None]).astype(np.int8).astype(np.float64)
        isum = np.einsum("bki,kic->bkc", q, cp[:, :, cols]).astype(np.float32)  # exact integers
        y[:, cols] = (isum * (amax / np.float32(127))[..., None]).sum(axis=1) + (x @ offset[:, g])[:, None]
    i0 = 0
    for q in qs:
        if q.n_outliers:
            r, c = np.divmod(q.outlier_idx.astype(np.int64), H)
            wq = codes[i0 + r, c].astype(np.float32) * scale[i0 + r, c // G] + offset[i0 + r, c // G]
            np.add.at(y.T, c, (q.outlier_val - wq)[:, None] * x[:, i0 + r].T)
        i0 += q.shape[0]
    return y


def qmm_numpy(t, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """Reference of :func:`qmm`: the same int8 rounding of x, the same exact integer sums (in
    float64, exact below 2**53), the float32 combination summed over groups by NumPy."""
    t = as_lowbit(t)
    x, out, _ = _check_matvec(t, x, out, accumulate)
    q = t._q if t.kind == "sti-q1" else ggml_affine(t)
    y = _qmm_numpy(q, x.reshape(-1, t.shape[1]))
    return _finish(y.reshape(out.shape), out, accumulate)


def ggml_affine(t) -> quant.QuantizedTensor:
    """A GGML matrix as the affine form the int8 products use, exactly: one unsigned 8-bit code
    per element and, per block of 32, a scale and an offset (element = code * scale + offset).
    Q4_1: its nibbles, d, m. Q8_0: q + 128, d, -128 d (d * (q + 128) - 128 d = d * q)."""
    rows, cols = t.shape
    nb = cols // QK
    blocks = np.frombuffer(memoryview(t._raw).cast("B"), np.uint8).reshape(rows, nb, GGML[t.kind][1])
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if t.kind == "ggml-q4_1":
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[:, :, 4:]
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # elements 0..15, then 16..31
    else:
        m = np.float32(-128) * d
        codes = (blocks[:, :, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    packed = np.ascontiguousarray(codes.reshape(rows, cols))
    none = np.zeros(0, np.uint32)
    return quant.QuantizedTensor(8, (rows, cols), QK, packed.reshape(-1), d, m, none, none.view(np.float32))


def _qmm_numpy(q: quant.QuantizedTensor, x: np.ndarray) -> np.ndarray:
    """x (B, cols) @ W.T -> (B, rows) as :func:`qmm_numpy` computes it."""
    rows, cols = q.shape
    G, ng = q.group_size, q.n_groups
    xq, dx, xs = quantize_acts_i8(x, G)  # (B, ng, G), (B, ng), (B, ng)
    codes = quant.unpack_codes(q.codes, q.bits).reshape(rows, ng, G)
    isum = np.matmul(codes.transpose(1, 0, 2).astype(np.float64),
                     xq.transpose(1, 2, 0).astype(np.float64)).astype(np.float32)  # (ng, rows, B)
    scale, offset = q.scale.reshape(rows, ng), q.offset.reshape(rows, ng)
    y = ((scale.T[:, :, None] * dx.T[:, None, :]) * isum + offset.T[:, :, None] * xs.T[:, None, :]).sum(axis=0)
    if q.n_outliers:  # (exact - quantized weight) * x at each outlier
        r, c = np.divmod(q.outlier_idx.astype(np.int64), cols)
        wq = codes.reshape(rows, ng * G)[r, c].astype(np.float32) * scale[r, c // G] + offset[r, c // G]
        np.add.at(y, r, (q.outlier_val - wq)[:, None] * x[:, c].T)
    return y.T


def dequant_matmul(t, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False, threads: int = 1,
                   scratch: np.ndarray | None = None) -> np.ndarray:
    """:func:`matvec` computed the prefill way: :func:`dequantize` into ``scratch`` (a float32
    (rows, cols) buffer to reuse, else a new one) on ``threads`` threads, then the BLAS product,
    its rows split between ``threads`` threads (:func:`sti.blas.matmul_t`)."""
    t = as_lowbit(t)
    x, out, _ = _check_matvec(t, x, out, accumulate)
    w = dequantize(t, scratch, threads)
    blas.matmul_t(x.reshape(-1, t.shape[1]), w, out.reshape(-1, t.shape[0]), accumulate, threads)  # views
    return out


def _finish(y, out, accumulate):
    if accumulate:
        out += y
    else:
        out[...] = y
    return out


def _check_matvec(t: LowBitTensor, x, out, accumulate):
    rows, cols = t.shape
    x = np.asarray(x, dtype=np.float32)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    if x.ndim not in (1, 2) or x.shape[-1] != cols:
        raise ValueError(f"matvec: x must be ({cols},) or (batch, {cols}) for a {t.shape} matrix, got {x.shape}")
    batch = 1 if x.ndim == 1 else x.shape[0]
    want = (rows,) if x.ndim == 1 else (batch, rows)
    if out is None:
        if accumulate:
            raise ValueError("matvec: accumulate=True needs out")
        out = np.empty(want, dtype=np.float32)
    elif not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == want
              and out.flags.c_contiguous and out.flags.writeable):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"matvec: out must be a writable C-contiguous float32 array of shape {want}, got {got}")
    if batch < 1:
        raise ValueError("matvec: the batch is empty")
    return x, out, batch


# --------------------------------------------------------------------------- kernel choice


def batch_bucket(batch: int) -> int:
    """The batch size measured for ``batch``: the next power of two (1, 2, 4, 8, 16, ...)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (int(batch) - 1).bit_length()


def thread_candidates() -> tuple[int, ...]:
    """Thread counts worth timing: 1 and, on a machine with several cores, 2 (STI's default)."""
    return (1, 2) if available_cpus() >= 2 and kernel_info()["max_threads"] >= 2 else (1,)


@dataclass(frozen=True)
class KernelChoice:
    """How to multiply a (rows, cols) ``kind``/``bits`` matrix by a batch of ``batch`` vectors:
    ``method`` "fused" (:func:`matvec`), "dequant" (:func:`dequant_matmul`) or, for batches,
    "int8" (:func:`qmm`), on ``threads`` threads, and the median milliseconds of every
    candidate timed (``"fused/1"``, ...); ``rounds``: how many measurements (in different
    processes) went into them, each candidate keeping its fastest median."""

    kind: str
    shape: tuple[int, int]
    bits: int
    batch: int
    method: str
    threads: int
    times_ms: dict = field(default_factory=dict)
    rounds: int = 1

    def __post_init__(self):
        if (self.kind not in KINDS or self.method not in METHODS or self.threads < 1
                or (self.method == "int8" and self.batch == 1)):
            raise ValueError(f"KernelChoice: bad kind/method/threads {self.kind!r}/{self.method!r}/{self.threads!r}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))

    def matvec(self, t, x, out=None, accumulate=False, scratch=None) -> np.ndarray:
        """Run the chosen kernel (``scratch``: the dequant method's reusable float32 (rows, cols) buffer)."""
        if self.method == "fused":
            return matvec(t, x, out, accumulate, self.threads)
        if self.method == "int8":
            return qmm(t, x, out, accumulate, self.threads)
        return dequant_matmul(t, x, out, accumulate, self.threads, scratch)

    def close_call(self) -> bool:
        """Whether another thread count of the chosen method timed within :data:`CLOSE_CALL` of
        the choice (one measurement could not tell them apart)."""
        mine = self.times_ms.get(f"{self.method}/{self.threads}")
        rivals = [v for k, v in self.times_ms.items()
                  if k.split("/")[0] == self.method and k != f"{self.method}/{self.threads}"]
        return mine is not None and any(v <= mine * (1 + CLOSE_CALL) for v in rivals)

    def doubtful(self) -> bool:
        """Whether one measurement is not enough for this choice: a close call, or fewer threads
        than another timed thread count of its method, by any margin. A busy moment on the other
        core makes a second thread look useless, and by more than a close call: SmolLM2's
        576x1536 down projection at batch 16 timed 0.18 vs 0.23 ms on 1 and 2 threads in one
        measurement and 0.19 vs 0.13 ms in the next, and two threads are 1.5x faster in decode."""
        fewer = any(k.split("/")[0] == self.method and int(k.split("/")[1]) > self.threads for k in self.times_ms)
        return fewer or self.close_call()

    def confirmed(self, again: KernelChoice) -> KernelChoice:
        """This choice with a later measurement ``again`` of the same method merged in: every
        candidate keeps its fastest median, and the method's fastest thread count wins."""
        times = dict(self.times_ms)
        for k, v in again.times_ms.items():
            times[k] = min(v, times.get(k, v))
        mine = {k: v for k, v in times.items() if k.split("/")[0] == self.method}
        threads = int(min(mine, key=mine.get).split("/")[1]) if mine else self.threads
        return replace(self, threads=threads, times_ms=times, rounds=self.rounds + again.rounds)

    def to_json(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "bits": self.bits, "batch": self.batch,
                "method": self.method, "threads": self.threads, "times_ms": dict(self.times_ms),
                "rounds": self.rounds}

    @classmethod
    def from_json(cls, d: dict) -> KernelChoice:
        return cls(d["kind"], tuple(d["shape"]), int(d["bits"]), int(d["batch"]), d["method"], int(d["threads"]),
                   {k: float(v) for k, v in d.get("times_ms", {}).items()}, int(d.get("rounds", 1)))


def _key(kind, shape, bits, batch):
    bits = GGML[kind][2] if kind in GGML else int(bits)
    return kind, int(shape[0]), int(shape[1]), bits, batch_bucket(batch)


class KernelProfile:
    """Measured :class:`KernelChoice` per (kind, shape, bits, batch bucket); plain JSON on disk."""

    def __init__(self, choices=(), machine: dict | None = None):
        self.machine = dict(machine) if machine else _machine()
        self.choices: dict[tuple, KernelChoice] = {}
        self.changes = 0  # choices added or replaced since construction (a caller's cue to save)
        self._measured: set[tuple] = set()  # keys measured by this object (this process)
        for c in choices:
            self.add(c)
        self.changes = 0

    def add(self, c: KernelChoice) -> None:
        self.choices[_key(c.kind, c.shape, c.bits, c.batch)] = c
        self.changes += 1

    def get(self, kind: str, shape, bits: int | None = None, batch: int = 1) -> KernelChoice | None:
        return self.choices.get(_key(kind, shape, bits, batch))

    def choose(self, kind: str, shape, bits: int | None = None, batch: int = 1, measure: bool = True,
               repeats: int = 5) -> KernelChoice:
        """The recorded choice; on a miss, measured now (and recorded) unless ``measure`` is False,
        in which case the fused kernel on one thread is returned unmeasured.

        A doubtful choice (:meth:`KernelChoice.doubtful`: a close call between thread counts, or
        fewer threads than another thread count timed) recorded by another process is measured
        once more before it is used: the other core being busy for a moment makes a second thread
        look useless (one such measurement left SmolLM2's gate/up matrix on one thread: 10.3
        instead of 7.5 ms per decode token), and that must not stick.
        Only the thread count may change then, never the method (the int8 decisions stay one
        per kind)."""
        k = _key(kind, shape, bits, batch)
        c = self.choices.get(k)
        if (c is not None and measure and c.rounds < CONFIRM_ROUNDS and k not in self._measured
                and c.doubtful()):
            c = c.confirmed(measure_choice(kind, shape, k[3], k[4], repeats=repeats, methods=(c.method,)))
            self._measured.add(k)
            self.add(c)
        if c is None:
            if not measure:
                return KernelChoice(kind, shape, k[3], k[4], "fused" if _lb is not None else "dequant", 1)
            methods = None
            if kind in GGML and k[4] > 1:  # int8 or not: the kind's decision, made on the reference shape
                ref = self.choose(kind, INT8_REF_SHAPE, batch=batch, repeats=repeats) \
                    if tuple(shape) != INT8_REF_SHAPE else None
                if ref is not None:
                    methods = ("int8",) if ref.method == "int8" else ("fused", "dequant")
            c = measure_choice(kind, shape, k[3], k[4], repeats=repeats, methods=methods)
            self._measured.add(k)
            self.add(c)
        return c

    def int8(self, kind: str, batch: int) -> bool | None:
        """Whether ``kind``'s batches of ``batch`` run int8 products everywhere (GGML kinds: the
        decision on :data:`INT8_REF_SHAPE`); None where not measured yet or decided per shape."""
        c = self.get(kind, INT8_REF_SHAPE, batch=batch) if kind in GGML else None
        return None if c is None else c.method == "int8"

    def to_json(self) -> dict:
        return {"schema": PROFILE_SCHEMA, "machine": self.machine,
                "choices": [c.to_json() for c in sorted(self.choices.values(),
                                                        key=lambda c: _key(c.kind, c.shape, c.bits, c.batch))]}

    @classmethod
    def from_json(cls, d: dict) -> KernelProfile:
        if d.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"kernel profile schema {d.get('schema')!r}, expected {PROFILE_SCHEMA}")
        return cls([KernelChoice.from_json(c) for c in d.get("choices", [])], d.get("machine"))

    def save(self, path) -> Path:
        return save_profile(self, path)


def save_profile(profile, path) -> Path:
    """Write a :class:`KernelProfile` (or its JSON dict) to ``path`` atomically."""
    d = profile.to_json() if isinstance(profile, KernelProfile) else profile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_profile(path) -> KernelProfile:
    return KernelProfile.from_json(json.loads(Path(path).read_text()))


def machine_profile(path) -> KernelProfile:
    """The profile saved at ``path`` if it was measured on this machine (same CPU, core count and
    kernel build), else an empty one (to be filled by measurement and saved back)."""
    try:
        prof = load_profile(path)
    except (OSError, ValueError, KeyError, TypeError):
        return KernelProfile()
    return prof if prof.machine == _machine() else KernelProfile()


_DEFAULT = None


def default_profile() -> KernelProfile:
    """The process-wide profile :func:`choose` fills (empty until something is measured or set)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = KernelProfile()
    return _DEFAULT


def set_default_profile(profile: KernelProfile | None) -> None:
    global _DEFAULT
    _DEFAULT = profile


def choose(kind: str, shape, bits: int | None = None, batch: int = 1, profile: KernelProfile | None = None,
           measure: bool = True) -> KernelChoice:
    """The fastest way on this machine to multiply a ``kind`` (rows, cols) matrix at ``bits``
    (sti-q1; GGML kinds imply theirs) by ``batch`` vectors: looked up in ``profile`` (default:
    :func:`default_profile`), measured on a miss (:func:`measure_choice`)."""
    return (profile or default_profile()).choose(kind, shape, bits, batch, measure=measure)


def profile_kernels(shapes, batches=(1, 16), repeats: int = 5) -> dict:
    """Measure a :class:`KernelChoice` for every (kind, (rows, cols), bits) in ``shapes`` and every
    batch in ``batches``; returns the JSON dict of the :class:`KernelProfile` (``save_profile``)."""
    prof = KernelProfile()
    for kind, shape, bits in shapes:
        for b in batches:
            prof.choose(kind, shape, bits, b, repeats=repeats)
    return prof.to_json()


def _machine() -> dict:
    from sti.machine import cpu_model

    return {"cpu": cpu_model(), "cpus": available_cpus(), **kernel_info()}


def stream_copies(nbytes: int, stream_bytes: int = STREAM_BYTES, cap: int = 256) -> int:
    """How many distinct copies of an ``nbytes`` matrix make a timing read from memory, not cache."""
    return max(1, min(cap, -(-stream_bytes // max(1, nbytes))))


def time_interleaved(fns: dict, repeats: int, prune: float | None = 4.0,
                     burst_s: float = 1e-3, max_burst: int = 8) -> dict[str, list[float]]:
    """Seconds per call of each function, the candidates interleaved (A, B, C, A, B, C, ...) and
    the order rotated each round, after one warm-up call each. A short call runs in a burst of
    back-to-back calls (up to ``max_burst``, about ``burst_s`` in all) and only the calls after the
    first count, as decode issues them: a pool thread that went to sleep while another candidate
    ran must not be charged to this one. With ``prune``, candidates slower than ``prune`` times
    the fastest in the first timed round are not timed again (a fused kernel at batch 1 is ~10x
    faster than dequantize + matmul; timing the loser 5 times is wasted)."""
    names = list(fns)
    burst = {}
    for n in names:
        t0 = time.perf_counter()
        fns[n]()
        burst[n] = 1 + max(0, min(max_burst - 1, int(burst_s / max(time.perf_counter() - t0, 1e-9))))
    times: dict[str, list[float]] = {n: [] for n in names}
    live = list(names)
    for rep in range(repeats):
        order = live[rep % len(live):] + live[:rep % len(live)]
        for n in order:
            for i in range(burst[n]):
                t0 = time.perf_counter()
                fns[n]()
                if i or burst[n] == 1:
                    times[n].append(time.perf_counter() - t0)
        if rep == 0 and prune:
            best = min(min(times[n]) for n in live)
            live = [n for n in live if min(times[n]) <= prune * best]
    return times


def measure_choice(kind: str, shape, bits: int | None = None, batch: int = 1, repeats: int = 5,
                   threads=None, seed: int = 0, methods=None) -> KernelChoice:
    """Time the fused kernel, dequantize + BLAS and for batches the int8 products (:func:`qmm`), or
    only ``methods`` of :data:`METHODS`, on a random ``kind`` matrix of ``shape`` (cycling through
    enough copies that the weights come from memory, as in decode), on each thread count of
    ``threads`` (default :func:`thread_candidates`); the median fastest wins."""
    methods = METHODS if methods is None else tuple(methods)
    if not methods or set(methods) - set(METHODS) or (batch == 1 and methods == ("int8",)):
        raise ValueError(f"measure_choice: methods must be some of {METHODS} (int8 for batches only), "
                         f"got {methods!r}")
    rows, cols = int(shape[0]), int(shape[1])
    bits = GGML[kind][2] if kind in GGML else int(bits if bits is not None else 4)
    if _lb is None:  # without the C kernels matvec *is* dequantize + matmul: nothing to choose
        return KernelChoice(kind, (rows, cols), bits, batch, "int8" if methods == ("int8",) else "dequant", 1, {})
    base = random_tensor(kind, (rows, cols), bits, seed=seed)
    ts = [base] + [base.copy() for _ in range(stream_copies(base.nbytes) - 1)]
    x = np.random.default_rng(seed).standard_normal((batch, cols)).astype(np.float32)
    if batch == 1:
        x = x[0]
    out = np.empty((rows,) if batch == 1 else (batch, rows), dtype=np.float32)
    scratch = np.empty((rows, cols), dtype=np.float32)
    fused, deq = {}, {}
    for th in (threads or thread_candidates()):
        if "fused" in methods:
            fused[f"fused/{th}"] = cycling(lambda t, th=th: matvec(t, x, out, threads=th), ts)
        if batch > 1 and "int8" in methods:
            fused[f"int8/{th}"] = cycling(lambda t, th=th: qmm(t, x, out, threads=th), ts)
        if "dequant" in methods:
            deq[f"dequant/{th}"] = cycling(lambda t, th=th: dequant_matmul(t, x, out, threads=th, scratch=scratch), ts)
    # The fused kernels first, on a quiet machine: OpenBLAS's threads spin for a while after each
    # BLAS call (dequantize + matmul here, or any NumPy matmul before this call), and a spinning
    # thread takes the core the pool's helper needs; decode makes no BLAS calls, so that is not
    # what it will see. Below BLAS_QUIET_ELEMS one thread wins anyway and the wait is skipped.
    if max(threads or thread_candidates()) > 1 and rows * cols >= BLAS_QUIET_ELEMS:
        time.sleep(BLAS_SPIN_S)
    times = time_interleaved(fused, max(1, repeats)) if fused else {}
    if deq:
        with blas.limited(1):  # as the models run it: dequant/N is BLAS on one thread in each of N (sti.blas)
            times.update(time_interleaved(deq, max(1, repeats)))
    med = {n: float(np.median(v)) * 1e3 for n, v in times.items()}
    best = min(med, key=med.get)  # a pruned candidate's one timing was 4x the best: it never wins
    method, th = best.split("/")
    return KernelChoice(kind, (rows, cols), bits, batch, method, int(th), {n: round(v, 5) for n, v in med.items()})


BLAS_SPIN_S = 0.15  # how long after a BLAS call its threads may still spin (OpenBLAS: 2^28 cycles, ~0.1 s)
BLAS_QUIET_ELEMS = 1 << 16  # matrices from this size on are timed after that wait


def cycling(fn, items):
    """A no-argument function calling ``fn`` on the next item of ``items`` each time (round robin)."""
    state = [0]

    def call():
        i = state[0]
        state[0] = (i + 1) % len(items)
        return fn(items[i])

    return call
