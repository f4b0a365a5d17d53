import os

import numpy as np
import pytest

from sti import checksums as C


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 32, 33, 4096, 100_003])
def test_c_kernel_equals_numpy_reference(n):
    if C._c_sum64 is None:
        pytest.skip("C kernels not built")
    b = os.urandom(n)
    assert C._c_sum64(b) == C._sum_numpy(b)


def test_reference_definition_on_a_small_buffer():
    b = bytes(range(1, 20))  # two full words and a 3-byte tail
    words = [int.from_bytes(b[i:i + 8].ljust(8, b"\0"), "little") for i in range(0, len(b), 8)]
    s = sum(w * (2 * i + 1) * C.K for i, w in enumerate(words)) & C.MASK
    assert C.sum64_int(b) == s
    assert C.sum64(b) == f"{C._fmix64(s ^ ((len(b) * C.K2) & C.MASK)):016x}"


def test_any_changed_byte_truncation_or_zero_padding_changes_the_sum():
    rng = np.random.default_rng(0)
    b = bytearray(rng.integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    ref = C.sum64(b)
    for pos in rng.integers(0, len(b), 200):
        for flip in (1, 0x80, 0xFF):
            b[pos] ^= flip
            assert C.sum64(b) != ref
            b[pos] ^= flip
    assert C.sum64(b[:-1]) != ref
    assert C.sum64(b + bytes(8)) != ref  # trailing zeros change the length term
    assert C.sum64(bytes(4096)) != C.sum64(bytes(8192))
