"""BLAS thread limits: set inside the block, restored after it, shared by nested blocks."""

import threading

import numpy as np
import pytest

from sti import blas


def test_limited_sets_and_restores_the_thread_count():
    before = blas.threads()
    if before is None:
        pytest.skip("no OpenBLAS with a thread-count setter is loaded: sti.blas changes nothing here")
    blas.set_threads(2)
    try:
        with blas.limited(1):
            assert blas.threads() == 1
            with blas.limited(1):  # nested: the outer block restores
                assert blas.threads() == 1
            assert blas.threads() == 1
            a = np.ones((64, 64), np.float32)
            np.testing.assert_array_equal(a @ a, np.full((64, 64), 64, np.float32))  # BLAS still works
        assert blas.threads() == 2
    finally:
        blas.set_threads(before)


def test_concurrent_blocks_restore_once_the_last_leaves():
    if blas.threads() is None:
        pytest.skip("no OpenBLAS with a thread-count setter is loaded")
    before = blas.threads()
    blas.set_threads(2)
    entered, release = threading.Event(), threading.Event()

    def other():
        with blas.limited(1):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    try:
        with blas.limited(1):
            t.start()
            assert entered.wait(10)
        assert blas.threads() == 1  # the other block is still open
        release.set()
        t.join(10)
        assert blas.threads() == 2
    finally:
        release.set()
        blas.set_threads(before)


@pytest.mark.parametrize("accumulate", [False, True])
def test_split_product_is_the_product_and_uses_the_helper(accumulate, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 300)).astype(np.float32)  # odd row count: halves of 18 and 19
    w = rng.standard_normal((500, 300)).astype(np.float32)
    base = rng.standard_normal((37, 500)).astype(np.float32)
    want = (base if accumulate else 0) + x @ w.T
    seen = []
    product = blas._product

    def spy(x_, w_, out_, acc_):
        seen.append((threading.current_thread().name.startswith("sti-blas"), x_.shape[0]))
        return product(x_, w_, out_, acc_)

    monkeypatch.setattr(blas, "_product", spy)
    monkeypatch.setattr(blas, "SPLIT_MIN_MACS", 1)
    before = blas.threads()
    out = base.copy()
    assert blas.matmul_t(x, w, out, accumulate, threads=2) is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    assert sorted(seen) == [(False, 18), (True, 19)]  # half on the caller, half on the helper thread
    assert blas.threads() == before  # BLAS's own thread count is back
    seen.clear()
    out = base.copy()
    blas.matmul_t(x, w, out, accumulate, threads=1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    assert seen == [(False, 37)]  # one thread: one product, on the caller
