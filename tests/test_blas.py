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
