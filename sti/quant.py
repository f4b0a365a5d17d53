"""Outlier-aware group-wise k-bit quantization of weight matrices, and its execution-ready layout.

A weight matrix ``w`` (rows, cols) becomes a :class:`QuantizedTensor` at k in {2, 3, 4, 5, 6, 8}
bits: every row is cut into groups of ``group_size`` consecutive columns (the last group of a
row is padded); each group has a float32 ``scale`` and ``offset`` (its minimum) and every
weight a k-bit code, so that ``w ~= code * scale + offset``. A small fraction of weights — those
farthest from their group's mean — are *outliers*: they are kept exactly (a uint32 flat index
and a float32 value each) and do not stretch their group's range. At 2 and 3 bits each group's
range is then clipped to the one, on a grid of shrink factors, that minimises the group's
squared error; at every bitwidth scale and offset are then refitted by least squares
(alternating with nearest codes). ``docs/quantization.md`` has the measurements behind every
default.

Codes are packed 8 per k bytes, little-endian bit order: code i of a run of 8 occupies bits
k*i .. k*i+k-1 of the 8k-bit little-endian integer formed by the k bytes; codes run row-major
over the (rows, padded_cols) grid. ``group_size`` is a multiple of 8, so every group and every
row starts on a byte boundary and the same unpacking serves every k.

:func:`to_bytes` / :func:`from_buffer` give the layout a shard file holds per fidelity version:
sections codes | scale | offset | outlier_idx | outlier_val, each starting at a multiple of 64
bytes; :func:`from_buffer` returns zero-copy NumPy views of the buffer (bytes, mmap, memoryview).

:func:`dequantize` uses the C kernel ``sti._kernels.dequant`` when it is built, else the NumPy
reference :func:`dequantize_numpy`; both compute ``float32(code) * scale`` then ``+ offset`` in
float32 (two roundings, no fused multiply-add), so their outputs are bit-identical. Set the
environment variable ``STI_NO_C=1`` (before importing ``sti.quant``) to force the NumPy path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

BITS = (2, 3, 4, 5, 6, 8)
ALIGN = 64  # every section of the serialized layout starts at a multiple of this many bytes
SECTIONS = ("codes", "scale", "offset", "outlier_idx", "outlier_val")
LAYOUT = "sti-q1"

# Fraction of a tensor's weights kept exactly as outliers, per bitwidth (each costs 64 bits).
# Measured on MiniLM's layer weights (scripts/quant_error_report.py --sweep, docs/quantization.md):
# outlier steps are taken while the squared error they remove per bit spent at least roughly
# matches (ratio >= 0.9) what promoting some shards to the next fidelity version removes per bit
# (the chord to it): 0.1% at 2-5 bits, 0.2% at 6 bits; at 8 bits (next: float32) capped at 0.4%.
OUTLIER_FRAC = {2: 0.001, 3: 0.001, 4: 0.001, 5: 0.001, 6: 0.002, 8: 0.004}
# Per-group search of the clipping range minimising squared error: measurably better at 2-3
# bits only. The least-squares refit of scale/offset that follows helps at every bitwidth.
CLIP_BITS = frozenset({2, 3})
CLIP_GRID = tuple(1.0 - 0.04 * i for i in range(13))  # range shrink factors 1.00 .. 0.52
REFIT_ITERS = 3

_CHUNK = 1 << 14  # groups per block in quantize(): bounds temporary memory (~10 MB per float64 array)

try:  # C kernel (setup.py: sti._kernels); the NumPy path is the reference and the fallback
    if os.environ.get("STI_NO_C", "") not in ("", "0"):
        raise ImportError("STI_NO_C set")
    from sti import _kernels as _ck
except ImportError:  # pragma: no cover - depends on the build
    _ck = None


def has_c_kernel() -> bool:
    return _ck is not None


# --------------------------------------------------------------------------- the data


@dataclass
class QuantizedTensor:
    """A (rows, cols) float32 matrix at ``bits`` bits: packed codes, per-group scale and offset,
    exact outliers. Arrays may be read-only views of a shard file (see :func:`from_buffer`)."""

    bits: int
    shape: tuple[int, int]
    group_size: int
    codes: np.ndarray  # uint8 (rows * padded_cols * bits / 8,)
    scale: np.ndarray  # float32 (rows, n_groups)
    offset: np.ndarray  # float32 (rows, n_groups), the value of code 0 (the group minimum unless clipped/refitted)
    outlier_idx: np.ndarray  # uint32 (n_outliers,), flat indices into (rows, cols), ascending
    outlier_val: np.ndarray  # float32 (n_outliers,)

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        _check_params(self.shape, self.bits, self.group_size)
        rows, cols = self.shape
        ng = self.n_groups
        want = {"codes": (np.uint8, (_codes_nbytes(self.shape, self.bits, self.group_size),)),
                "scale": (np.float32, (rows, ng)), "offset": (np.float32, (rows, ng)),
                "outlier_idx": (np.uint32, (len(self.outlier_idx),)),
                "outlier_val": (np.float32, (len(self.outlier_idx),))}
        for name, (dtype, shp) in want.items():
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shp:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"QuantizedTensor.{name}: expected {np.dtype(dtype)} {shp}, got {got}")
        if len(self.outlier_idx) and int(self.outlier_idx.max()) >= rows * cols:
            raise ValueError(f"QuantizedTensor.outlier_idx: index {int(self.outlier_idx.max())} "
                             f"out of range for shape {self.shape}")

    @property
    def n_groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @property
    def padded_cols(self) -> int:
        return self.n_groups * self.group_size

    @property
    def n_outliers(self) -> int:
        return len(self.outlier_idx)

    @property
    def nbytes(self) -> int:
        """Bytes of the serialized layout (:func:`to_bytes`), alignment padding included."""
        return nbytes_for(self.shape, self.bits, self.group_size, self.n_outliers)

    @property
    def bits_per_weight(self) -> float:
        """Payload bits per weight: codes (padding included), scales, offsets and outliers."""
        return payload_bits(self.shape, self.bits, self.group_size, self.n_outliers) / max(1, self.size)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def meta(self) -> dict:
        """The JSON-able description :func:`from_buffer` needs next to the bytes."""
        offs, total = _layout(self.shape, self.bits, self.group_size, self.n_outliers)
        return {"layout": LAYOUT, "bits": self.bits, "shape": list(self.shape), "group_size": self.group_size,
                "n_outliers": self.n_outliers, "offsets": offs, "nbytes": total}


def _check_params(shape, bits, group_size):
    if not isinstance(bits, (int, np.integer)) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")
    if len(shape) != 2 or shape[0] < 0 or shape[1] < 0:
        raise ValueError(f"shape must be (rows, cols) with rows, cols >= 0, got {shape!r}")
    if shape[0] * shape[1] >= 2**32:
        raise ValueError(f"shape {shape}: more than 2**32 - 1 weights (outlier indices are uint32); split the tensor")


def _codes_nbytes(shape, bits, group_size) -> int:
    return shape[0] * (-(-shape[1] // group_size)) * group_size * bits // 8


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _section_sizes(shape, bits, group_size, n_outliers) -> dict:
    ng = shape[0] * (-(-shape[1] // group_size))
    return {"codes": _codes_nbytes(shape, bits, group_size), "scale": 4 * ng, "offset": 4 * ng,
            "outlier_idx": 4 * n_outliers, "outlier_val": 4 * n_outliers}


def _layout(shape, bits, group_size, n_outliers) -> tuple[dict, int]:
    offs, pos = {}, 0
    for name, size in _section_sizes(shape, bits, group_size, n_outliers).items():
        offs[name] = pos
        pos = _align(pos + size)
    return offs, pos


def payload_bits(shape, bits, group_size=64, n_outliers=None) -> int:
    """Bits of codes + scales + offsets + outliers, without alignment padding."""
    if n_outliers is None:
        n_outliers = outlier_count(shape, bits)
    return 8 * sum(_section_sizes(tuple(shape), bits, group_size, n_outliers).values())


def nbytes_for(shape, bits, group_size=64, n_outliers=None) -> int:
    """Bytes a version of a (rows, cols) tensor occupies in the serialized layout (a multiple of 64).
    ``n_outliers=None`` means what :func:`quantize` picks by default for this shape and bitwidth."""
    shape = (int(shape[0]), int(shape[1]))
    _check_params(shape, bits, group_size)
    if n_outliers is None:
        n_outliers = outlier_count(shape, bits)
    return _layout(shape, bits, group_size, int(n_outliers))[1]


def outlier_count(shape, bits, outlier_frac=None) -> int:
    """Number of outliers :func:`quantize` keeps for this shape (deterministic in shape and bits)."""
    frac = OUTLIER_FRAC[bits] if outlier_frac is None else float(outlier_frac)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"outlier_frac must be in [0, 1], got {frac}")
    return int(round(frac * int(shape[0]) * int(shape[1])))


# --------------------------------------------------------------------------- packing


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (< 2**bits; length a multiple of 8) into len * bits / 8 bytes."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if codes.size % 8:
        raise ValueError(f"pack_codes needs a multiple of 8 codes, got {codes.size}")
    if codes.size and int(codes.max()) >> bits:
        raise ValueError(f"pack_codes: code {int(codes.max())} does not fit in {bits} bits")
    c = codes.reshape(-1, 8)  # (n8, 8)
    word = np.zeros(len(c), dtype="<u8")
    for i in range(8):
        word |= c[:, i].astype("<u8") << np.uint64(bits * i)
    return np.ascontiguousarray(word.view(np.uint8).reshape(-1, 8)[:, :bits]).reshape(-1)  # (n8 * bits,)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: len * 8 / bits uint8 codes."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if packed.size % bits:
        raise ValueError(f"unpack_codes: {packed.size} bytes is not a multiple of bits={bits}")
    b = packed.reshape(-1, bits)  # (n8, bits): the bytes of each run of 8 codes
    codes = np.empty((len(b), 8), dtype=np.uint8)  # (n8, 8)
    mask = np.uint8((1 << bits) - 1)
    for i in range(8):  # code i: bits k*i .. k*i+k-1, i.e. from byte k*i//8 at bit k*i%8, maybe spilling over
        byte, sh = divmod(bits * i, 8)
        c = b[:, byte] >> np.uint8(sh)
        if sh + bits > 8:
            c |= b[:, byte + 1] << np.uint8(8 - sh)  # uint8 arithmetic: the bits above 8 fall off
        codes[:, i] = c & mask
    return codes.reshape(-1)  # (n8 * 8,)


# --------------------------------------------------------------------------- quantize


def quantize(w: np.ndarray, bits: int, group_size: int = 64, outlier_frac: float | None = None,
             clip: bool | None = None) -> QuantizedTensor:
    """Quantize a (rows, cols) matrix to ``bits`` bits. Deterministic: equal input, equal bytes.

    ``outlier_frac``: fraction of weights kept exactly; None takes :data:`OUTLIER_FRAC` [bits].
    ``clip``: None (default) searches each group's clipping range at :data:`CLIP_BITS` and refits
    scale/offset by least squares at every bitwidth; True does both at any bitwidth; False does
    neither, so every non-outlier lies within half a quantization step of its value.
    """
    if clip is None:
        search, refit = bits in CLIP_BITS, REFIT_ITERS
    else:
        search, refit = bool(clip), REFIT_ITERS if clip else 0
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize needs a 2-D (rows, cols) matrix, got shape {w.shape}")
    _check_params(w.shape, bits, group_size)
    return quantize_with(w, bits, group_size, outlier_count(w.shape, bits, outlier_frac),
                         CLIP_GRID if search else (1.0,), refit)


def quantize_with(w: np.ndarray, bits: int, group_size: int, n_outliers: int, grid=(1.0,), refit_iters: int = 0,
                  score=None) -> QuantizedTensor:
    """:func:`quantize` with every choice explicit (for measurements, scripts/quant_error_report.py):
    ``n_outliers`` exact weights chosen by the largest ``score`` (default :func:`group_mean_score`),
    range shrink factors ``grid`` searched per group (``(1.0,)``: the plain min..max range), then
    ``refit_iters`` alternations of least-squares (scale, offset) and nearest codes."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize needs a 2-D (rows, cols) matrix, got shape {w.shape}")
    shape = w.shape
    _check_params(shape, bits, group_size)
    if not np.isfinite(w).all():
        raise ValueError("quantize: the matrix holds NaN or infinite values")
    rows, cols = shape
    G = group_size
    ng = -(-cols // G)
    pc = ng * G

    # (rows * ng, G) groups; padding columns are excluded everywhere through `valid`
    x = np.zeros((rows, pc), dtype=np.float32)
    x[:, :cols] = w
    x = x.reshape(rows * ng, G)  # (groups, G)
    valid = np.zeros((rows, pc), dtype=bool)
    valid[:, :cols] = True
    valid = valid.reshape(rows * ng, G)

    sc = (score or group_mean_score)(x, valid, rows)  # (groups, G), -1 on padding
    idx = _top_n(sc.reshape(rows, pc)[:, :cols].reshape(-1), int(n_outliers))
    keep = valid.copy()
    if len(idx):
        r, c = np.divmod(idx.astype(np.int64), cols)
        keep.reshape(rows, pc)[r, c] = False

    codes = np.empty((rows * ng, G), dtype=np.uint8)
    scale = np.empty(rows * ng, dtype=np.float32)
    offset = np.empty(rows * ng, dtype=np.float32)
    for a in range(0, rows * ng, _CHUNK):
        s = slice(a, a + _CHUNK)
        codes[s], scale[s], offset[s] = _quantize_groups(x[s], keep[s], bits, grid, refit_iters)
    return QuantizedTensor(bits=bits, shape=shape, group_size=G, codes=pack_codes(codes.reshape(-1), bits),
                           scale=scale.reshape(rows, ng), offset=offset.reshape(rows, ng),
                           outlier_idx=idx, outlier_val=w.reshape(-1)[idx.astype(np.int64)].copy())


def group_mean_score(x: np.ndarray, valid: np.ndarray, rows: int) -> np.ndarray:
    """Outlier score: |w - mean of its group| (the distance by which it stretches the group's range
    around the group's centre). x, valid: (groups, G); -1 on padding."""
    n = valid.sum(1, keepdims=True)
    mean = np.where(valid, x, 0).sum(1, keepdims=True, dtype=np.float64) / np.maximum(n, 1)
    return np.where(valid, np.abs(x - mean.astype(np.float32)), np.float32(-1))


def _top_n(score: np.ndarray, n: int) -> np.ndarray:
    """Ascending uint32 indices of the n largest scores; ties go to the lower index (deterministic)."""
    n = min(max(n, 0), score.size)
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    kth = score.size - n
    thr = np.partition(score, kth)[kth]
    above = np.flatnonzero(score > thr)
    ties = np.flatnonzero(score == thr)[: n - len(above)]
    return np.sort(np.concatenate([above, ties])).astype(np.uint32)


def _codes_for(x, lo, s, maxq):
    """Nearest codes, clamped to [0, maxq], of x under offset lo and scale s (broadcast (n, 1))."""
    inv = np.divide(1, s, out=np.zeros_like(s), where=s > 0)
    q = np.rint((x - lo) * inv)
    return np.clip(q, 0, maxq, out=q)


def _sqerr(x, keep, q, s, lo):
    d = (q * s + lo) - x
    d *= keep
    return np.einsum("ij,ij->i", d, d)


def _quantize_groups(x, keep, bits, grid, refit_iters):
    """Codes (uint8 (n, G)), scale and offset (float32 (n,)) for a block of n groups."""
    maxq = (1 << bits) - 1
    lo = np.where(keep, x, np.inf).min(1)
    hi = np.where(keep, x, -np.inf).max(1)
    empty = ~np.isfinite(lo)  # every weight of the group is an outlier (or padding)
    lo[empty] = 0
    hi[empty] = 0
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    s = (hi - lo) / maxq
    if len(grid) > 1 or refit_iters:
        x64, k64 = x.astype(np.float64), keep.astype(np.float64)
        best_err = np.full(len(x), np.inf)
        best_lo, best_s = lo.copy(), s.copy()
        mid = 0.5 * (lo + hi)
        for p in grid:  # shrink the range about its midpoint; keep the best per group
            clo, cs = mid - p * (mid - lo), p * s
            err = _sqerr(x64, k64, _codes_for(x64, clo[:, None], cs[:, None], maxq), cs[:, None], clo[:, None])
            better = err < best_err
            best_err[better], best_lo[better], best_s[better] = err[better], clo[better], cs[better]
        lo, s = best_lo, best_s
        for _ in range(refit_iters):  # alternate: least-squares (scale, offset) given codes, then codes
            lo, s, best_err = _refit(x64, k64, _codes_for(x64, lo[:, None], s[:, None], maxq), lo, s, best_err, maxq)
    s32, lo32 = s.astype(np.float32), lo.astype(np.float32)
    # final codes: nearest under the float32 parameters that are stored
    q = _codes_for(x.astype(np.float64), lo32[:, None].astype(np.float64), s32[:, None].astype(np.float64), maxq)
    return q.astype(np.uint8), s32, lo32


def _refit(x, k, q, lo, s, err0, maxq):
    """One least-squares step: (s, lo) minimising sum k * (x - q*s - lo)^2, then nearest codes;
    groups where that does not lower the squared error keep their previous parameters."""
    n = k.sum(1)
    qk = q * k
    sq, sx = qk.sum(1), np.einsum("ij,ij->i", x, k)
    sqq, sqx = np.einsum("ij,ij->i", qk, q), np.einsum("ij,ij->i", qk, x)
    det = n * sqq - sq * sq
    ok = det > 1e-9 * np.maximum(n * sqq, 1e-300)
    det = np.where(ok, det, 1.0)
    s_new = (n * sqx - sq * sx) / det
    ok &= s_new > 0
    s_new = np.where(ok, s_new, s)
    lo_new = np.where(ok, (sx - s_new * sq) / np.maximum(n, 1), lo)
    err = _sqerr(x, k, _codes_for(x, lo_new[:, None], s_new[:, None], maxq), s_new[:, None], lo_new[:, None])
    better = ok & (err < err0)
    return np.where(better, lo_new, lo), np.where(better, s_new, s), np.where(better, err, err0)


# --------------------------------------------------------------------------- dequantize


def dequantize_numpy(q: QuantizedTensor, out: np.ndarray | None = None) -> np.ndarray:
    """Reference dequantization: float32(code) * scale, then + offset (float32), then outliers."""
    rows, cols = q.shape
    codes = unpack_codes(q.codes, q.bits).reshape(rows, q.n_groups, q.group_size)  # (rows, ng, G)
    full = codes.astype(np.float32) * q.scale[:, :, None]
    full += q.offset[:, :, None]
    full = full.reshape(rows, q.padded_cols)[:, :cols]
    if out is None:
        out = np.ascontiguousarray(full)
    else:
        _check_out(out, q.shape)
        out[...] = full
    _scatter(out, q)
    return out


def dequantize(q: QuantizedTensor, out: np.ndarray | None = None) -> np.ndarray:
    """(rows, cols) float32 weights of ``q``, written into ``out`` when given (C-contiguous
    float32 of q.shape). Bit-identical to :func:`dequantize_numpy`; uses the C kernel if built."""
    if _ck is None:
        return dequantize_numpy(q, out)
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    else:
        _check_out(out, q.shape)
    c = np.ascontiguousarray  # no copy for arrays that already are (from_buffer views, quantize output)
    _ck.dequant(c(q.codes), q.bits, c(q.scale), c(q.offset), q.group_size, q.shape[0], q.shape[1], out)
    _scatter(out, q)
    return out


def _check_out(out, shape):
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == tuple(shape)
            and out.flags.c_contiguous and out.flags.writeable):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape {tuple(shape)}, got {got}")


def _scatter(out, q):
    if q.n_outliers:
        out.reshape(-1)[q.outlier_idx] = q.outlier_val


# --------------------------------------------------------------------------- serialized layout


def to_bytes(q: QuantizedTensor) -> bytes:
    """The execution-ready layout: codes | scale | offset | outlier_idx | outlier_val, each
    section at a multiple of 64 bytes, zero padding between, total length a multiple of 64."""
    offs, total = _layout(q.shape, q.bits, q.group_size, q.n_outliers)
    buf = bytearray(total)
    for name in SECTIONS:
        a = np.ascontiguousarray(getattr(q, name)).view(np.uint8).reshape(-1)
        buf[offs[name]: offs[name] + a.size] = a.tobytes()
    return bytes(buf)


def from_buffer(buf, meta: dict) -> QuantizedTensor:
    """Zero-copy :class:`QuantizedTensor` over ``buf`` (bytes, bytearray, memoryview, mmap, uint8
    array) laid out as :func:`to_bytes` writes it and described by ``meta`` (:meth:`QuantizedTensor.meta`).
    The arrays are views of ``buf``: keep it alive, and it is read-only if ``buf`` is."""
    try:
        bits, group_size = int(meta["bits"]), int(meta["group_size"])
        shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        n_out = int(meta["n_outliers"])
        offs = {name: int(meta["offsets"][name]) for name in SECTIONS}
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise ValueError(f"from_buffer: bad meta ({exc!r}); expected the dict QuantizedTensor.meta() returns") from exc
    if meta.get("layout", LAYOUT) != LAYOUT:
        raise ValueError(f"from_buffer: layout {meta.get('layout')!r} is not {LAYOUT!r}")
    _check_params(shape, bits, group_size)
    if n_out < 0:
        raise ValueError(f"from_buffer: n_outliers must be >= 0, got {n_out}")
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("from_buffer: the buffer must be C-contiguous")
    nbytes = mv.nbytes
    sizes = _section_sizes(shape, bits, group_size, n_out)
    dtypes = {"codes": np.uint8, "scale": np.float32, "offset": np.float32,
              "outlier_idx": np.uint32, "outlier_val": np.float32}
    arrs = {}
    spans = []
    for name in SECTIONS:
        o, size = offs[name], sizes[name]
        if o < 0 or o % ALIGN:
            raise ValueError(f"from_buffer: section {name} offset {o} is not a non-negative multiple of {ALIGN}")
        if o + size > nbytes:
            raise ValueError(f"from_buffer: section {name} needs bytes [{o}, {o + size}) but the buffer "
                             f"holds {nbytes} bytes (shape {shape}, bits {bits}, group_size {group_size})")
        spans.append((o, o + size, name))
        arrs[name] = np.frombuffer(mv, dtype=dtypes[name], count=size // np.dtype(dtypes[name]).itemsize, offset=o)
    spans = sorted(sp for sp in spans if sp[1] > sp[0])
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError(f"from_buffer: sections {an} and {bn} overlap")
    ng = -(-shape[1] // group_size)
    return QuantizedTensor(bits=bits, shape=shape, group_size=group_size, codes=arrs["codes"],
                           scale=arrs["scale"].reshape(shape[0], ng), offset=arrs["offset"].reshape(shape[0], ng),
                           outlier_idx=arrs["outlier_idx"], outlier_val=arrs["outlier_val"])


class Decoder:
    """A serialized layout parsed and validated once, to dequantize many buffers laid out the
    same way (every shard of a store version shares its layouts) without per-call parsing.
    ``decoder(buf, out)`` equals ``dequantize(from_buffer(buf, meta), out)``."""

    def __init__(self, meta: dict):
        q = from_buffer(bytes(int(meta.get("nbytes") or _layout(
            tuple(meta["shape"]), int(meta["bits"]), int(meta["group_size"]), int(meta["n_outliers"]))[1])), meta)
        self.meta, self.bits, self.shape, self.group_size = meta, q.bits, q.shape, q.group_size
        sizes = _section_sizes(q.shape, q.bits, q.group_size, q.n_outliers)
        self.spans = {n: (int(meta["offsets"][n]), int(meta["offsets"][n]) + sizes[n]) for n in SECTIONS}
        self.n_outliers = q.n_outliers
        self.nbytes = max(b for _, b in self.spans.values())

    def __call__(self, buf, out: np.ndarray | None = None) -> np.ndarray:
        mv = memoryview(buf).cast("B")
        if mv.nbytes < self.nbytes:
            raise ValueError(f"Decoder: buffer holds {mv.nbytes} bytes, the layout needs {self.nbytes}")
        if _ck is None:
            return dequantize_numpy(from_buffer(mv, self.meta), out)
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        else:
            _check_out(out, self.shape)
        sp = self.spans
        _ck.dequant(mv[slice(*sp["codes"])], self.bits, mv[slice(*sp["scale"])], mv[slice(*sp["offset"])],
                    self.group_size, self.shape[0], self.shape[1], out)
        if self.n_outliers:
            idx = np.frombuffer(mv[slice(*sp["outlier_idx"])], dtype=np.uint32)
            out.reshape(-1)[idx] = np.frombuffer(mv[slice(*sp["outlier_val"])], dtype=np.float32)
        return out


def from_program_row(buf, row) -> QuantizedTensor:
    """The k-bit tensor one row of a :class:`Program` table describes (kind 0), as zero-copy
    views of ``buf``."""
    kind, bits, G, rows, cols, codes, scale, offset, oidx, oval, n = (int(v) for v in row)
    if kind != 0:
        raise ValueError(f"from_program_row: the row describes a float32 tensor, not a quantized one (kind {kind})")
    ng = -(-cols // G)
    mv = memoryview(buf).cast("B")
    return QuantizedTensor(bits, (rows, cols), G, np.frombuffer(mv, np.uint8, _codes_nbytes((rows, cols), bits, G), codes),
                           np.frombuffer(mv, np.float32, rows * ng, scale).reshape(rows, ng),
                           np.frombuffer(mv, np.float32, rows * ng, offset).reshape(rows, ng),
                           np.frombuffer(mv, np.uint32, n, oidx), np.frombuffer(mv, np.float32, n, oval))


class Program:
    """Decoding of several tensors of one buffer layout in one step: the tensors a streamed
    shard version holds (k-bit matrices in this module's layout, or raw float32 ones), each
    written into its own float32 output. Built once per layout; ``program(buf, outs)`` with
    ``outs`` a tuple of C-contiguous float32 arrays of the tensors' shapes.

    ``entries``: (kind, offset, shape, meta) per tensor, kind "quant" (meta as
    :meth:`QuantizedTensor.meta`, offsets relative to the tensor's ``offset``) or "float32".
    With the C kernel this is one call (``sti._kernels.decode``); the NumPy path decodes each
    tensor as :func:`dequantize_numpy` does, so both are bit-identical to :func:`dequantize`."""

    FIELDS = 11  # kind, bits, group_size, rows, cols, codes, scale, offset, outlier_idx, outlier_val, n_outliers

    def __init__(self, entries):
        rows = []
        self.shapes, self._numpy = [], []
        for kind, off, shape, meta in entries:
            shape = tuple(int(n) for n in shape)
            if kind == "quant":
                d = Decoder(meta)
                if d.shape != (shape[0], int(np.prod(shape[1:]))):
                    raise ValueError(f"Program: quantized shape {d.shape} does not match {shape}")
                sp = d.spans
                rows.append((0, d.bits, d.group_size, *d.shape, *(off + sp[n][0] for n in SECTIONS), d.n_outliers))
                self._numpy.append((off, d.nbytes, d))
            elif kind == "float32":
                n = int(np.prod(shape))
                rows.append((1, 32, 8, 1, n, off, 0, 0, 0, 0, 0))
                self._numpy.append((off, 4 * n, None))
            else:
                raise ValueError(f"Program: unknown tensor kind {kind!r}")
            self.shapes.append(shape)
        self.prog = np.array(rows, dtype=np.int64).reshape(-1, self.FIELDS)

    def __len__(self) -> int:
        return len(self.shapes)

    def tensor(self, buf, i: int) -> QuantizedTensor:
        """Tensor ``i`` (a "quant" one) of ``buf`` as zero-copy views: its row of ``prog``."""
        return from_program_row(buf, self.prog[i])

    def __call__(self, buf, outs: tuple) -> None:
        if _ck is not None:
            _ck.decode(buf, self.prog, outs)
            return
        mv = memoryview(buf).cast("B")
        for (off, n, dec), out in zip(self._numpy, outs):
            if dec is None:
                out.reshape(-1)[...] = np.frombuffer(mv, dtype="<f4", count=n // 4, offset=off)
            else:
                dequantize_numpy(from_buffer(mv[off: off + n], dec.meta), out.reshape(dec.shape))


# --------------------------------------------------------------------------- errors and speed


def error_stats(w: np.ndarray, q: QuantizedTensor) -> dict:
    """Relative Frobenius error, max absolute error and payload bits per weight of ``q`` vs ``w``."""
    d = dequantize_numpy(q).astype(np.float64) - w
    return {"rel_fro": float(np.linalg.norm(d) / max(np.linalg.norm(w.astype(np.float64)), 1e-300)),
            "max_abs": float(np.abs(d).max()) if d.size else 0.0, "bits_per_weight": q.bits_per_weight}


def bench_dequant(bits_list=(2, 3, 4, 5, 6, 8), rows: int = 1536, cols: int = 384, repeats: int = 20,
                  group_size: int = 64, seed: int = 0) -> list[dict]:
    """Single-thread dequantization throughput (GB/s of float32 output, median of ``repeats``) of
    the C kernel and the NumPy reference, per bitwidth, on a random (rows, cols) matrix; both write
    into a preallocated output and include the outlier scatter. ``c_*`` are None without the kernel."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    out = np.empty((rows, cols), dtype=np.float32)
    res = []
    for bits in bits_list:
        q = quantize(w, bits, group_size, clip=False)
        row = {"bits": bits, "rows": rows, "cols": cols, "group_size": group_size, "n_outliers": q.n_outliers,
               "out_mb": out.nbytes / 1e6, "repeats": repeats}
        fns = {"numpy": lambda: dequantize_numpy(q, out)}
        if _ck is not None:
            fns["c"] = lambda: dequantize(q, out)
        for name in ("c", "numpy"):
            if name not in fns:
                row.update({f"{name}_ms": None, f"{name}_gbps": None, f"{name}_spread_ms": None})
                continue
            fns[name]()  # warm-up
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fns[name]()
                ts.append(time.perf_counter() - t0)
            med = float(np.median(ts))
            row.update({f"{name}_ms": med * 1e3, f"{name}_gbps": out.nbytes / med / 1e9,
                        f"{name}_spread_ms": (float(np.percentile(ts, 10)) * 1e3, float(np.percentile(ts, 90)) * 1e3)})
        row["speedup"] = row["numpy_ms"] / row["c_ms"] if row["c_ms"] else None
        res.append(row)
    return res
