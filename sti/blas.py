"""The thread count of the BLAS NumPy runs on (OpenBLAS), set at run time where the library allows.

OpenBLAS keeps its worker threads spinning for a while after every multi-threaded call (about 0.1 s),
waiting for the next one. On a 2-core machine streaming a decoder, a prefill's matrix products
would leave a spinner on the core the IO worker needs for the first decode steps: SmolLM2 at a 10 %
budget decoded 58-61 tokens/s after a 128-token prefill with two BLAS threads and 76 with one
(measured here, ``OPENBLAS_NUM_THREADS=1`` against the default, alternating processes). The
streaming decoder therefore runs BLAS on one thread while its IO worker runs (:func:`limited`).

Best effort: where no OpenBLAS with a thread-count setter is loaded (another BLAS, another OS),
:func:`threads` is None and the functions change nothing.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager


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
