"""Weight matrices that are not float32 arrays: packed low-bit matrices and matrices cut into shards.

The model functions (``sti.models.llama.layer``) multiply activations by weights only through
``sti.ops.linear(x, w)``, which computes ``x @ w.T`` for an array and calls ``w.apply(x)`` for an
operator from this module. An operator has the ``shape`` (out, in) of the matrix it stands for, so
a layer runs unchanged on float32 arrays, on packed matrices read straight from a GGUF file or a
shard store, and on the shards of one layer streamed from storage:

``Packed``    one packed matrix (a :class:`sti.lowbit.LowBitTensor`): the fused low-bit
              matrix-vector kernel, dequantize + BLAS or (batches) int8 products, whichever
              measured faster for the batch (:class:`sti.lowbit.KernelProfile`); also gives rows
              (an embedding table).
``RowStack``  shards cut along the output axis (query heads, FFN neurons, vocabulary rows): their
              outputs side by side.
``ColSum``    shards cut along the input axis (the output projection of a group of heads, the
              down projection of a neuron slice): each reads its slice of x; the outputs add up.
``SegmentStack`` shards whose outputs interleave: each part stacks the same segments (the q, k
              and v rows of one KV-head group; the gate and up rows of one neuron slice), and the
              result is every part's first segment, then every part's second, and so on. One
              kernel call per part instead of one per segment and part.
``BySize``    one matrix as two operators: one for decode's small batches, one for prefill.
``Q1Stack``   sti-q1 shards stacked by rows (a layer's q, k and v, or gate and up) or side by side
              (its output or down projection): one int8 product over all of them for decode
              batches that measured int8 fastest.

:func:`tiled` turns any of the three composites of packed GGML shards into one ``Packed`` matrix
read in place from the shards (:class:`sti.lowbit.TiledTensor`): one kernel call, one rounding of
x and one thread hand-off for the whole layer matrix instead of one per shard, with every output
element the same sum as in the matrix the shards were cut from.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import numpy as np

from sti import lowbit

# Batches up to this many rows use the measured choice for their size; larger ones (prefill) are
# matrix-matrix products and always dequantize + BLAS.
FUSED_MAX_BATCH = 16

_EXACT = contextvars.ContextVar("sti_exact_products", default=False)


@contextlib.contextmanager
def exact_products(on: bool = True):
    """Within this context (``on``), packed matrices never take int8 products, which round x
    (~4e-3 of |W||x|): the models run a prompt's tokens under it, so that prompt logits stay
    within 1e-5 of the float product and only decode steps of several sequences go int8."""
    token = _EXACT.set(on)
    try:
        yield
    finally:
        _EXACT.reset(token)


class Packed:
    """A packed (out, in) matrix. ``profile``: the :class:`sti.lowbit.KernelProfile` that says
    which kernel (fused, dequantize + BLAS, or int8 for batches) on how many threads is fastest for this shape and
    batch on this machine, measured there on a miss (without one: the fused kernel on one thread
    for batches up to ``FUSED_MAX_BATCH``, dequantize + BLAS above). ``scratch``: a float32 buffer the
    dequantize + BLAS path reuses (a runtime under a memory budget owns it); a matrix larger than
    it is multiplied by the fused kernel in batches of ``FUSED_MAX_BATCH`` rows of x instead."""

    def __init__(self, t, profile: lowbit.KernelProfile | None = None, scratch: np.ndarray | None = None):
        self.t = lowbit.as_lowbit(t)
        self.shape = self.t.shape
        self.profile = profile
        self.scratch = scratch
        n = self.shape[0] * self.shape[1]
        self._fits = scratch is None or scratch.size >= n
        self._choice: dict[tuple, lowbit.KernelChoice] = {}  # (batch, exact) -> choice
        self._direct: dict[tuple, tuple] = {}  # (batch, exact) -> (C method, threads) where the choice is a C kernel

    @property
    def nbytes(self) -> int:
        return self.t.nbytes

    def _kernel(self, batch: int, exact: bool = False) -> lowbit.KernelChoice:
        c = self._choice.get((batch, exact))
        if c is None:
            t = self.t
            if batch > FUSED_MAX_BATCH:  # prefill: dequantize and the BLAS product on every core (sti.blas)
                c = lowbit.KernelChoice(t.kind, t.shape, t.bits, batch, "dequant", max(lowbit.thread_candidates()))
            elif self.profile is not None:  # measured on a miss (and kept in the profile)
                c = self.profile.choose(t.kind, t.shape, t.bits, batch, measure=True)
            else:
                c = lowbit.KernelChoice(t.kind, t.shape, t.bits, batch,
                                        "fused" if lowbit.has_c_kernels() else "dequant", 1)
            if (c.method == "dequant" and not self._fits and batch <= FUSED_MAX_BATCH) or (exact and c.method == "int8"):
                # no room to dequantize, or a prompt's tokens (exact_products)
                c = lowbit.KernelChoice(t.kind, t.shape, t.bits, batch, "fused", c.threads)
            self._choice[(batch, exact)] = c
            if c.method in ("fused", "int8") and self.t._m is not None:
                m = self.t._m
                self._direct[(batch, exact)] = (m.qmm if c.method == "int8" else m.matvec, c.threads)
        return c

    def apply(self, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
        """x (N, in) -> x @ W.T (N, out)."""
        n, exact = x.shape[0], _EXACT.get()
        direct = self._direct.get((n, exact))
        if direct is not None and x.dtype == np.float32 and x.flags.c_contiguous and (out is not None or not accumulate):
            # decode's common case, straight into the C kernel (it checks x and out itself)
            if out is None:
                out = np.empty((n, self.shape[0]), np.float32)
            direct[0](x, out, accumulate, direct[1])
            return out
        if n > FUSED_MAX_BATCH and not self._fits:
            # prefill with no room to dequantize: the fused kernel, FUSED_MAX_BATCH rows of x at a
            # time, never int8 (a resident matrix is dequantized here, and a lossless stream's
            # tokens must equal the resident ones; the fused kernel is within 1e-5 of it)
            if out is None:
                out, accumulate = np.empty((n, self.shape[0]), np.float32), False
            threads = self._kernel(FUSED_MAX_BATCH).threads
            for a in range(0, n, FUSED_MAX_BATCH):
                lowbit.matvec(self.t, x[a:a + FUSED_MAX_BATCH], out[a:a + FUSED_MAX_BATCH], accumulate, threads)
            return out
        c = self._kernel(n, exact)
        scratch = None
        if c.method == "dequant" and self.scratch is not None:
            scratch = self.scratch[:self.shape[0] * self.shape[1]].reshape(self.shape)
        return c.matvec(self.t, x, out, accumulate, scratch=scratch)

    def __getitem__(self, ids) -> np.ndarray:
        """Rows ``ids`` (any integer array shape) dequantized: ids.shape + (in,)."""
        t = self.t
        if t.kind not in lowbit.GGML:
            raise TypeError(f"row lookup needs GGML blocks, not {t.kind}")
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        rows, cols = t.shape
        if flat.size and (flat.min() < 0 or flat.max() >= rows):
            raise IndexError(f"row ids must lie in [0, {rows})")
        rb = cols // lowbit.QK * lowbit.GGML[t.kind][1]  # bytes per row
        raw = np.frombuffer(t.buf, np.uint8).reshape(rows, rb)
        picked = lowbit.LowBitTensor(t.kind, (flat.size, cols), np.ascontiguousarray(raw[flat]))
        return lowbit.dequantize(picked).reshape(ids.shape + (cols,))


class RowStack:
    """Matrices with the same input, their rows one after another: outputs concatenated."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        cols = {p.shape[1] for p in self.parts}
        if len(cols) > 1:
            raise ValueError(f"RowStack: parts have different input sizes {sorted(cols)}")
        self.bounds = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.shape = (int(self.bounds[-1]), cols.pop() if cols else 0)

    def apply(self, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
        n = x.shape[0]
        y = np.empty((n, self.shape[0]), np.float32) if out is None or n > 1 else out
        for p, a, b in zip(self.parts, self.bounds, self.bounds[1:]):
            if n == 1:  # a (1, k) slice of a row is contiguous: the kernel writes in place
                _apply(p, x, y[:, a:b], accumulate and y is out)
            else:
                y[:, a:b] = _apply(p, x, None, False)
        if y is not out and out is not None:
            if accumulate:
                out += y
            else:
                out[...] = y
            return out
        return y


class ColSum:
    """A matrix cut along its input axis: part k multiplies columns ``bounds[k]:bounds[k+1]`` of x."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        rows = {p.shape[0] for p in self.parts}
        if len(rows) > 1:
            raise ValueError(f"ColSum: parts have different output sizes {sorted(rows)}")
        self.bounds = np.cumsum([0] + [p.shape[1] for p in self.parts])
        self.shape = (rows.pop() if rows else 0, int(self.bounds[-1]))

    def apply(self, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
        if out is None:
            out = np.zeros((x.shape[0], self.shape[0]), np.float32)
            accumulate = True
        for k, (p, a, b) in enumerate(zip(self.parts, self.bounds, self.bounds[1:])):
            _apply(p, np.ascontiguousarray(x[:, a:b]), out, accumulate or k > 0)
        return out


class SegmentStack:
    """Parts with the same input and the same row segments ``sizes`` (e.g. [q, k, v] rows of one
    KV group): the output is segment 0 of every part, then segment 1 of every part, ... — the
    order of the canonical matrix the parts were cut from (all of wq, then wk, then wv)."""

    def __init__(self, parts: Sequence, sizes: Sequence[int], unfused: Sequence | None = None):
        """``unfused``: optional operators, one per segment (all parts' rows of it), that batches
        larger than ``FUSED_MAX_BATCH`` (prefill: matrix-matrix products) run instead."""
        self.parts = list(parts)
        self.unfused = list(unfused) if unfused else None
        self.sizes = [int(n) for n in sizes]
        per_part = sum(self.sizes)
        shapes = {tuple(p.shape) for p in self.parts}
        if len(shapes) != 1 or next(iter(shapes))[0] != per_part:
            raise ValueError(f"SegmentStack: parts must share one shape with {per_part} rows, got {sorted(shapes)}")
        self.src = np.cumsum([0] + self.sizes)  # segment k: rows src[k]:src[k+1] of every part
        self.shape = (len(self.parts) * per_part, next(iter(shapes))[1])
        # output column j is row perm[j] of the parts' outputs side by side (part k at k * per_part)
        self.perm = np.concatenate([np.arange(a, b) + k * per_part for a, b in zip(self.src, self.src[1:])
                                    for k in range(len(self.parts))]).astype(np.intp)

    def apply(self, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
        n, S, R = x.shape[0], len(self.parts), self.shape[0] // max(len(self.parts), 1)
        if n > FUSED_MAX_BATCH and self.unfused:
            res = np.concatenate([_apply(u, x, None, False) for u in self.unfused], axis=1)
            if out is None:
                return res
            if accumulate:
                out += res
            else:
                out[...] = res
            return out
        y = np.empty((n, S, R), np.float32)  # (n, part, its rows)
        for k, p in enumerate(self.parts):
            if n == 1:  # y[:, k] is one contiguous row: the kernel writes in place
                _apply(p, x, y[:, k], False)
            else:
                y[:, k] = _apply(p, x, None, False)
        res = np.empty((n, self.shape[0]), np.float32) if out is None or accumulate else out
        np.take(y.reshape(n, -1), self.perm, axis=1, out=res)
        if out is not None and accumulate:
            out += res
            return out
        return res


class BySize:
    """One matrix, two operators: ``small`` for batches up to ``FUSED_MAX_BATCH`` rows (decode),
    ``large`` above (prefill)."""

    def __init__(self, small, large):
        if tuple(small.shape) != tuple(large.shape):
            raise ValueError(f"BySize: {tuple(small.shape)} and {tuple(large.shape)} are not one matrix")
        self.small, self.large, self.shape = small, large, tuple(large.shape)

    def apply(self, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
        op = self.small if x.shape[0] <= FUSED_MAX_BATCH else self.large
        return op.apply(x, out, accumulate)


class Q1Stack:
    """sti-q1 matrices as one operator, read in place: stacked along the rows with one input (a
    layer's shards of the query, key and value projections, or of gate and up), or, ``by_cols``,
    side by side along the columns, each multiplying its slice of x (a matrix cut along its input
    axis: the output or down projection). A decode batch whose measured kernel for the whole
    matrix is int8 runs one :func:`sti.lowbit.qmm_stack` (:func:`sti.lowbit.qmm_cols`) call over
    every part's bytes: x rounded to int8 once, one thread hand-off, the threads splitting all the
    rows, and every output the same as part by part; one token whose measured kernel is the fused
    one runs :func:`sti.lowbit.matvec_stack` (:func:`sti.lowbit.matvec_cols`) likewise (SmolLM2 at
    2 bits, 10 % budget: 678 fused products per token become 136); anything else runs ``composite``, the
    operator the parts make otherwise (same shape, same outputs).

    The kernel for the stack is chosen as for one matrix of its shape and most common bitwidth
    (``profile``); without a profile, or without the C kernels, the composite always runs."""

    def __init__(self, parts: Sequence[Packed], composite, profile: lowbit.KernelProfile | None = None,
                 by_cols: bool = False):
        from sti import quant

        self.parts, self.composite, self.profile, self.by_cols = list(parts), composite, profile, by_cols
        ts = [p.t for p in self.parts]
        if not ts or any(t.kind != "sti-q1" for t in ts):
            raise ValueError("Q1Stack: every part must be an sti-q1 matrix")
        shared = {(t.shape[0] if by_cols else t.shape[1], t._q.group_size) for t in ts}
        if len(shared) != 1:
            raise ValueError(f"Q1Stack: parts need one {'row' if by_cols else 'column'} count and group size, "
                             f"got {sorted(shared)}")
        self.shape = ((ts[0].shape[0], sum(t.shape[1] for t in ts)) if by_cols
                      else (sum(t.shape[0] for t in ts), ts[0].shape[1]))
        if tuple(composite.shape) != self.shape:
            raise ValueError(f"Q1Stack: the composite is {tuple(composite.shape)}, the parts {self.shape}")
        self.bufs = [t.buf for t in ts]
        self.prog = np.concatenate([quant.Program([("quant", 0, t.shape, t.meta)]).prog for t in ts])
        bits = [t.bits for t in ts]
        self.bits = max(set(bits), key=bits.count)
        self._product = lowbit.qmm_cols if by_cols else lowbit.qmm_stack
        self._fused = lowbit.matvec_cols if by_cols else lowbit.matvec_stack
        self._threads: dict[int, int] = {}  # batch -> threads of the stack's product (1: fused, >1: int8), 0: the composite

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def _stack_threads(self, n: int) -> int:
        t = self._threads.get(n)
        if t is None:
            t = 0
            if self.profile is not None and n <= FUSED_MAX_BATCH:
                c = self.profile.choose("sti-q1", self.shape, self.bits, n, measure=True)
                t = c.threads if c.method == ("fused" if n == 1 else "int8") else 0
            self._threads[n] = t
        return t

    def apply(self, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
        n = x.shape[0] if x.ndim == 2 else 1
        threads = 0 if _EXACT.get() else self._stack_threads(n)
        if not threads:
            return self.composite.apply(x, out, accumulate)
        if out is None:
            out, accumulate = np.empty(x.shape[:-1] + self.shape[:1], np.float32), False
        return (self._fused if n == 1 else self._product)(x, out, self.bufs, self.prog, accumulate, threads)


def stack_q1(ops: Sequence, profile: lowbit.KernelProfile | None = None) -> Q1Stack | None:
    """``ops`` as one :class:`Q1Stack`: RowStacks of sti-q1 ``Packed`` matrices with one input (in
    output order), or a single ColSum of them; None when they are anything else or the C kernels
    are not built."""
    by_cols = len(ops) == 1 and isinstance(ops[0], ColSum)
    parts = [p for op in ops for p in getattr(op, "parts", [None])]
    if (not lowbit.has_c_kernels() or not parts or not (by_cols or all(isinstance(op, RowStack) for op in ops))
            or not all(isinstance(p, Packed) and p.t.kind == "sti-q1" for p in parts)):
        return None
    try:
        composite = ops[0] if len(ops) == 1 else RowStack(list(ops))
        return Q1Stack(parts, composite, profile or parts[0].profile, by_cols)
    except ValueError:  # the parts do not share a column (row) count and group size
        return None


def tiled(op) -> BySize | None:
    """``op`` (a RowStack, ColSum or SegmentStack of ``Packed`` GGML matrices of one kind, with the C
    kernels built) as :class:`BySize`: one ``Packed`` over a :class:`sti.lowbit.TiledTensor` of the
    parts' bytes for decode, ``op`` itself for prefill (which dequantizes part by part into a
    scratch the size of one part). None when ``op`` is anything else."""
    parts = getattr(op, "parts", None)
    if (not lowbit.has_c_kernels() or not parts or not all(isinstance(p, Packed) for p in parts)
            or len({p.t.kind for p in parts}) != 1 or parts[0].t.kind not in lowbit.GGML):
        return None
    ts = [p.t for p in parts]
    if isinstance(op, SegmentStack):
        bands = [[lowbit.row_range(t, a, b)] for a, b in zip(op.src, op.src[1:]) for t in ts]
    elif isinstance(op, RowStack):
        bands = [[t] for t in ts]
    elif isinstance(op, ColSum) and len({t.shape[1] for t in ts}) == 1 and ts[0].shape[1] % lowbit.QK == 0:
        bands = [ts]
    else:
        return None
    whole = Packed(lowbit.TiledTensor(bands), parts[0].profile, scratch=parts[0].scratch)
    return BySize(whole, op)


def stack_rows(ts) -> lowbit.LowBitTensor | None:
    """GGML-block matrices with the same kind and columns as one matrix of all their rows (a
    copy), or None when they cannot be stacked (other kinds: sti-q1 sections do not concatenate)."""
    ts = [lowbit.as_lowbit(t) for t in ts]
    kind, cols = ts[0].kind, ts[0].shape[1]
    if kind not in lowbit.GGML or any(t.kind != kind or t.shape[1] != cols for t in ts):
        return None
    buf = np.concatenate([np.frombuffer(t.buf, np.uint8).reshape(-1) for t in ts])
    return lowbit.LowBitTensor(kind, (sum(t.shape[0] for t in ts), cols), buf)


def _apply(w, x: np.ndarray, out: np.ndarray | None, accumulate: bool) -> np.ndarray:
    """x @ w.T for an operator or a float32 array, into ``out`` when given."""
    if isinstance(w, np.ndarray):
        y = x @ w.T
        if out is None:
            return y
        if accumulate:
            out += y
        else:
            out[...] = y
        return out
    return w.apply(x, out, accumulate)
