"""Operators over packed and sharded weights equal the dense products they stand for."""

import numpy as np
import pytest

from sti import lowbit
from sti.linops import (BySize, ColSum, FUSED_MAX_BATCH, Packed, Q1Stack, RowStack, SegmentStack, exact_products,
                        stack_q1, stack_rows, tiled)
from sti.ops import linear


def dense(t):
    return lowbit.dequantize_numpy(t)


def close(a, b, w, x, ggml=True):
    """a = x @ w.T = b up to float32 rounding and, for GGML weights (whose fused kernel rounds x to
    int16 per block of 32), up to that rounding: |x - x16| <= max|x| of the block / 65534."""
    bound = 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-7
    if ggml:
        block_max = np.repeat(np.abs(x).reshape(x.shape[0], -1, 32).max(-1), 32, axis=-1)
        bound += (block_max / 65534) @ np.abs(w).T
    assert np.all(np.abs(a - b) <= bound)


@pytest.mark.parametrize("kind", ["ggml-q4_1", "ggml-q8_0", "sti-q1"])
@pytest.mark.parametrize("n", [1, 3, FUSED_MAX_BATCH + 5])
def test_packed_equals_dense_with_and_without_scratch(kind, n):
    t = lowbit.random_tensor(kind, (96, 128), seed=1)
    w = dense(t)
    x = np.random.default_rng(2).standard_normal((n, 128)).astype(np.float32)
    ggml = kind != "sti-q1"
    for scratch in (None, np.empty(96 * 128, np.float32), np.empty(10, np.float32)):  # too small: fused blocks
        close(Packed(t, scratch=scratch).apply(x), x @ w.T, w, x, ggml)
    close(linear(x[None], Packed(t))[0], x @ w.T, w, x, ggml)  # through ops.linear, 3-D input


def test_rowstack_and_colsum_equal_the_whole_matrix():
    rng = np.random.default_rng(3)
    parts = [lowbit.random_tensor("ggml-q4_1", (r, 64), seed=s) for s, r in enumerate((32, 64, 32))]
    whole = np.concatenate([dense(p) for p in parts])
    for n in (1, 4):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        close(RowStack([Packed(p) for p in parts]).apply(x), x @ whole.T, whole, x)
        acc = np.ones((n, 128), np.float32)
        RowStack([Packed(p) for p in parts]).apply(x, acc, accumulate=True)
        close(acc - 1, x @ whole.T, whole, x)
    cols = [lowbit.random_tensor("ggml-q8_0", (48, c), seed=9 + c) for c in (32, 96)]
    wide = np.concatenate([dense(c) for c in cols], axis=1)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    op = ColSum([Packed(cols[0]), dense(cols[1])])  # a float32 part mixes in
    assert op.shape == (48, 128)
    close(op.apply(x), x @ wide.T, wide, x)


@pytest.mark.parametrize("n", [1, 3, FUSED_MAX_BATCH + 2])
def test_segment_stack_puts_each_parts_segments_in_canonical_order(n):
    """Three "KV groups", each one matrix of its [q (48), k (16), v (16)] rows: the result is
    every group's q, then every group's k, then every group's v — as the unsharded wq, wk, wv."""
    sizes = (48, 16, 16)
    groups = [lowbit.random_tensor("ggml-q4_1", (sum(sizes), 64), seed=10 + g) for g in range(3)]
    dense_groups = [dense(t) for t in groups]
    bounds = np.cumsum((0,) + sizes)
    canonical = np.concatenate([d[a:b] for a, b in zip(bounds, bounds[1:]) for d in dense_groups])
    unfused = [RowStack([Packed(lowbit.LowBitTensor("ggml-q4_1", (b - a, 64),
                                                       np.frombuffer(t.buf, np.uint8).reshape(sum(sizes), -1)[a:b]))
                         for t in groups]) for a, b in zip(bounds, bounds[1:])]
    x = np.random.default_rng(4).standard_normal((n, 64)).astype(np.float32)
    want = x @ canonical.T
    for op in (SegmentStack([Packed(t) for t in groups], sizes),
               SegmentStack([Packed(t) for t in groups], sizes, unfused)):
        assert op.shape == canonical.shape
        close(op.apply(x), want, canonical, x)
        out = np.ones((n, op.shape[0]), np.float32)
        close(op.apply(x, out, accumulate=True), want + 1, canonical, x)
    with pytest.raises(ValueError, match="share one shape"):
        SegmentStack([Packed(groups[0]), Packed(lowbit.random_tensor("ggml-q4_1", (32, 64)))], sizes)


def test_stack_rows_and_row_lookup():
    parts = [lowbit.random_tensor("ggml-q8_0", (r, 64), seed=r) for r in (16, 48)]
    st = stack_rows(parts)
    assert st.shape == (64, 64)
    np.testing.assert_array_equal(dense(st), np.concatenate([dense(p) for p in parts]))
    assert stack_rows([parts[0], lowbit.random_tensor("sti-q1", (16, 64))]) is None
    ids = np.array([[3, 60], [0, 17]])
    np.testing.assert_array_equal(Packed(st)[ids], dense(st)[ids])
    with pytest.raises(IndexError):
        Packed(st)[np.array([64])]


@pytest.mark.skipif(not lowbit.has_c_kernels(), reason="tiled matrices need sti._lowbit (no C compiler)")
@pytest.mark.parametrize("n", [1, 5, FUSED_MAX_BATCH + 3])
def test_tiled_composites_are_one_matrix_read_in_place(n):
    """A SegmentStack, a RowStack and a ColSum of packed shards, as ``tiled`` makes them: one kernel
    call over the shards' own bytes for decode batches, equal bitwise to the contiguous matrix they
    stand for; prefill batches still run part by part (the composite)."""
    rng = np.random.default_rng(5)
    sizes = (48, 16, 16)
    groups = [lowbit.random_tensor("ggml-q4_1", (sum(sizes), 64), seed=20 + g) for g in range(3)]
    bounds = np.cumsum((0,) + sizes)
    raws = [np.frombuffer(t.buf, np.uint8).reshape(sum(sizes), -1) for t in groups]
    canonical = lowbit.LowBitTensor("ggml-q4_1", (3 * sum(sizes), 64), np.concatenate(
        [r[a:b] for a, b in zip(bounds, bounds[1:]) for r in raws]).reshape(-1))
    cols = [lowbit.random_tensor("ggml-q8_0", (40, 64), seed=30 + k) for k in range(3)]
    wide = lowbit.LowBitTensor("ggml-q8_0", (40, 192), np.concatenate(
        [np.frombuffer(c.buf, np.uint8).reshape(40, -1) for c in cols], axis=1).reshape(-1))
    rows = [lowbit.random_tensor("ggml-q4_1", (r, 64), seed=r) for r in (32, 64)]
    cases = [(SegmentStack([Packed(t) for t in groups], sizes), canonical),
             (ColSum([Packed(c) for c in cols]), wide),
             (RowStack([Packed(r) for r in rows]), stack_rows(rows))]
    for op, whole in cases:
        t = tiled(op)
        assert isinstance(t, BySize) and t.shape == op.shape == whole.shape and t.large is op
        x = rng.standard_normal((n, op.shape[1])).astype(np.float32)
        if n <= FUSED_MAX_BATCH:
            np.testing.assert_array_equal(t.apply(x), lowbit.matvec(whole, x))
        close(t.apply(x), x @ dense(whole).T, dense(whole), x)
        out = np.ones((n, op.shape[0]), np.float32)
        close(t.apply(x, out, accumulate=True), x @ dense(whole).T + 1, dense(whole), x)
    assert tiled(RowStack([Packed(rows[0]), Packed(lowbit.random_tensor("sti-q1", (16, 64)))])) is None
    assert tiled(ColSum([Packed(cols[0]), dense(cols[1])])) is None  # a float32 part
    assert tiled(np.zeros((4, 4), np.float32)) is None


@pytest.mark.skipif(not lowbit.has_c_kernels(), reason="stacked int8 products need sti._lowbit (no C compiler)")
def test_q1_stack_is_one_int8_product_equal_to_its_parts():
    """A layer's sti-q1 shards of q, k and v (mixed bitwidths, outliers) as one Q1Stack: where the
    stack's measured kernel is int8, one product equal bit for bit to every part's own int8 product
    side by side, on any thread count; one token whose choice is the fused kernel, one fused
    product over all parts, equal to the composite's; a prompt (exact_products), a batch whose
    choice is neither, and prefill batches run the composite."""
    rng = np.random.default_rng(7)
    segs = [[lowbit.random_tensor("sti-q1", (r, 128), bits=b, seed=10 * r + b) for b in (2, 3, 2)]
            for r in (48, 16, 16)]
    parts = [t for seg in segs for t in seg]
    composite = RowStack([RowStack([Packed(t) for t in seg]) for seg in segs])
    n_int8, n_fused = 4, 2  # batch buckets 4 and 2
    prof = lowbit.KernelProfile([lowbit.KernelChoice("sti-q1", (240, 128), 2, n_int8, "int8", 2),
                                 lowbit.KernelChoice("sti-q1", (240, 128), 2, n_fused, "fused", 1),
                                 lowbit.KernelChoice("sti-q1", (240, 128), 2, 1, "fused", 2)])
    op = stack_q1([RowStack([Packed(t) for t in seg]) for seg in segs], prof)  # parts: fused kernel, 1 thread
    assert isinstance(op, Q1Stack) and op.shape == (240, 128) and op.bits == 2
    x = rng.standard_normal((n_int8, 128)).astype(np.float32)
    want = np.concatenate([lowbit.qmm(t, x) for t in parts], axis=1)
    assert np.array_equal(op.apply(x), want) and not np.array_equal(want, composite.apply(x))
    for threads in (1, 3):
        assert np.array_equal(lowbit.qmm_stack(x, np.empty_like(want), op.bufs, op.prog, threads=threads), want)
    out = np.ones_like(want)
    assert np.array_equal(op.apply(x, out, accumulate=True), want + 1)
    with exact_products():
        assert np.array_equal(op.apply(x), composite.apply(x))
    for n in (1, n_fused, FUSED_MAX_BATCH + 1):
        xn = rng.standard_normal((n, 128)).astype(np.float32)
        assert np.array_equal(op.apply(xn), composite.apply(xn))
    assert op._threads == {n_int8: 2, 1: 2, n_fused: 0, FUSED_MAX_BATCH + 1: 0}  # one token: the fused stack
    mixed = [RowStack([Packed(parts[0])]), RowStack([Packed(lowbit.random_tensor("sti-q1", (16, 128), group_size=32))])]
    assert stack_q1(mixed) is None  # two group sizes
    assert stack_q1([RowStack([Packed(parts[0])]), RowStack([Packed(lowbit.random_tensor("sti-q1", (16, 64)))])]) is None
    assert stack_q1([RowStack([Packed(lowbit.random_tensor("ggml-q4_1", (32, 128)))])]) is None
    assert stack_q1([ColSum([Packed(parts[0])]), ColSum([Packed(parts[1])])]) is None


@pytest.mark.skipif(not lowbit.has_c_kernels(), reason="stacked int8 products need sti._lowbit (no C compiler)")
def test_q1_stack_by_columns_sums_its_parts_like_colsum():
    """A matrix cut along its input axis into sti-q1 shards (the output or down projection): one
    int8 product equal bit for bit to the ColSum of the parts' own int8 products, on any thread
    count, with or without accumulating; one token whose choice is the fused kernel, one fused
    product equal to the ColSum's; other batches run the ColSum."""
    rng = np.random.default_rng(8)
    parts = [lowbit.random_tensor("sti-q1", (200, c), bits=b, seed=c + b) for c, b in ((192, 2), (128, 3), (192, 2))]
    n = 16
    prof = lowbit.KernelProfile([lowbit.KernelChoice("sti-q1", (200, 512), 2, n, "int8", 2),
                                 lowbit.KernelChoice("sti-q1", (200, 512), 2, 1, "fused", 2)])
    int8_parts = lowbit.KernelProfile([lowbit.KernelChoice("sti-q1", t.shape, t.bits, n, "int8", 1) for t in parts])
    colsum = ColSum([Packed(t) for t in parts])
    op = stack_q1([colsum], prof)
    assert isinstance(op, Q1Stack) and op.by_cols and op.shape == (200, 512) and op.composite is colsum
    x = rng.standard_normal((n, 512)).astype(np.float32)
    want = ColSum([Packed(t, int8_parts) for t in parts]).apply(x)  # each part's own int8 product, summed
    assert np.array_equal(op.apply(x), want) and not np.array_equal(want, colsum.apply(x))
    for threads in (1, 3):
        assert np.array_equal(lowbit.qmm_cols(x, np.empty_like(want), op.bufs, op.prog, threads=threads), want)
    out = np.ones_like(want)
    assert np.array_equal(op.apply(x, out, accumulate=True), ColSum([Packed(t, int8_parts) for t in parts]).apply(
        x, np.ones_like(want), accumulate=True))
    for m in (1, FUSED_MAX_BATCH + 1):
        xm = rng.standard_normal((m, 512)).astype(np.float32)
        assert np.array_equal(op.apply(xm), colsum.apply(xm))
        assert np.array_equal(op.apply(xm, np.ones((m, 200), np.float32), accumulate=True),
                              colsum.apply(xm, np.ones((m, 200), np.float32), accumulate=True))
    assert op._threads[1] == 2 and op._threads[FUSED_MAX_BATCH + 1] == 0
    w = np.concatenate([dense(t) for t in parts], axis=1)
    dx = np.abs(x).reshape(n, -1, 64).max(-1) / 127  # x rounded to int8 per vector and group of 64
    bound = (dx / 2) @ np.abs(w).reshape(200, -1, 64).sum(-1).T + 1e-5 * (np.abs(x) @ np.abs(w).T)
    assert np.all(np.abs(op.apply(x) - x @ w.T) <= bound)  # W times the rounded x
    other_groups = lowbit.random_tensor("sti-q1", (200, 64), group_size=32)
    assert stack_q1([ColSum([Packed(parts[0]), Packed(other_groups)])]) is None


@pytest.mark.skipif(not lowbit.has_c_kernels(), reason="int8 products need sti._lowbit (no C compiler)")
def test_exact_products_keep_a_prompt_off_int8():
    """Where a batch size chose int8, its rows go through qmm, except within exact_products (a
    prompt's tokens), where the same rows take the fused kernel; the context restores on exit."""
    t = lowbit.random_tensor("ggml-q4_1", (96, 128), seed=1)
    prof = lowbit.KernelProfile([lowbit.KernelChoice("ggml-q4_1", (96, 128), 4, 4, "int8", 1)])
    op = Packed(t, prof)
    x = np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)
    assert np.array_equal(op.apply(x), lowbit.qmm(t, x))
    with exact_products():
        assert np.array_equal(op.apply(x), lowbit.matvec(t, x))
        with exact_products(False):
            assert np.array_equal(op.apply(x), lowbit.qmm(t, x))
    assert np.array_equal(op.apply(x), lowbit.qmm(t, x))
    assert not np.array_equal(lowbit.qmm(t, x), lowbit.matvec(t, x))  # the two differ at all
