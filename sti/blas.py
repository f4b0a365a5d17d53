"""The thread count of the BLAS NumPy runs on (OpenBLAS), set at run time where the library allows.

OpenBLAS keeps its worker threads spinning for a while after every multi-threaded call (about 0.1 s),
waiting for the next one. On a 2-core machine streaming a decoder, a prefill's matrix products
would leave a spinner on the core the IO worker needs for the first decode steps: SmolLM2 at a 10 %
budget decoded 58-61 tokens/s after a 128-token prefill with two BLAS threads and 76 with one
(measured here, ``OPENBLAS_NUM_THREADS=1`` against the default, alternating processes). The
streaming decoder therefore runs BLAS on one thread while its IO worker runs (:func:`limited`).
The in-memory model lost as much: its fused decode kernels run on two threads of their own, and
the first ~10 decode steps after a 128-token SmolLM2 prefill took 10 ms instead of 7. So
prefill's products (:func:`matmul_t`) split their rows between the calling thread and one helper
thread of this module, each running BLAS on one thread: both cores work, and no BLAS thread is
left spinning when the products end.

Best effort: where no OpenBLAS with a thread-count setter is loaded (another BLAS, another OS),
:func:`threads` is None and the functions change nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from contextlib import contextmanager

import numpy as np


# (setter, getter) symbol pairs of the OpenBLAS builds NumPy wheels bundle, newest first
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))
_lock = threading.Lock()
_holders = 0  # limited() contexts open now
_saved: int | None = None
_api: tuple | None | bool = False  # False: not looked up yet; None: none found


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries this process has loaded (NumPy's, once NumPy is imported)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []


def _find():
    global _api
    if _api is False:
        _api = None
        for path in _loaded_openblas():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for set_name, get_name in _SYMBOLS:
                if hasattr(lib, set_name) and hasattr(lib, get_name):
                    setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                    setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                    _api = (setter, getter)
                    break
            if _api:
                break
    return _api


def threads() -> int | None:
    """BLAS threads now, or None where they cannot be read."""
    api = _find()
    return int(api[1]()) if api else None


def set_threads(n: int) -> bool:
    """Run BLAS on ``n`` threads from now on; False where that cannot be set."""
    api = _find()
    if not api:
        return False
    api[0](max(1, int(n)))
    return True


@contextmanager
def limited(n: int = 1):
    """BLAS on at most ``n`` threads inside the block (nested and concurrent blocks share the
    limit; the first to enter saves the count, the last to leave restores it)."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = threads()
        _holders += 1
        if _saved is not None and _saved > n:
            set_threads(n)
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _saved is not None:
                set_threads(_saved)


# Seconds after which the worker threads a multi-threaded call woke are asleep again (OpenBLAS
# spins 2^28 cycles, ~0.1 s here). MiniLM, 32 / 128 tokens: a preloaded engine with int8 products
# (two threads of their own) took 6.2 / 21.3 ms per request right after three dequantizing
# requests (BLAS on two threads), 6.2 / 19.5 after 0.05 s idle and 5.5 / 17.7 after 0.2 s.
SPIN_S = 0.2


def settle() -> None:
    """Idle until BLAS threads woken by earlier calls sleep (:data:`SPIN_S`), so that what is
    timed next has the cores to itself."""
    time.sleep(SPIN_S)


SPLIT_MIN_MACS = 1 << 22  # smaller products run whole: handing half to the helper costs ~30 us
_helper = None  # concurrent.futures.ThreadPoolExecutor of one thread, made on first use


def _reset_helper() -> None:  # a forked child has no helper thread, only its handle
    global _helper
    _helper = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_helper)


def matmul_t(x: np.ndarray, w: np.ndarray, out: np.ndarray, accumulate: bool = False, threads: int = 1) -> np.ndarray:
    """``out = x @ w.T`` (``accumulate``: ``out += x @ w.T``) for x (N, K), w (R, K), out (N, R)
    C-contiguous. With ``threads`` > 1 and a large enough product, the rows of x are split between
    the calling thread and this module's helper thread, BLAS on one thread in each (see the module
    docstring); rows are independent, so the result is each row's own single-threaded product."""
    n = x.shape[0]
    if threads < 2 or n < 2 or n * w.shape[0] * w.shape[1] < SPLIT_MIN_MACS:
        return _product(x, w, out, accumulate)
    global _helper
    with _lock:
        if _helper is None:
            from concurrent.futures import ThreadPoolExecutor

            _helper = ThreadPoolExecutor(1, thread_name_prefix="sti-blas")
        helper = _helper
    h = n // 2
    with limited(1):
        job = helper.submit(_product, x[h:], w, out[h:], accumulate)
        try:
            _product(x[:h], w, out[:h], accumulate)
        finally:
            job.result()
    return out


def _product(x, w, out, accumulate):
    if accumulate:
        out += x @ w.T
    else:
        np.matmul(x, w.T, out=out)
    return out
