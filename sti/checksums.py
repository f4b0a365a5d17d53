"""Checksums of shard data: ``crc32`` (zlib) and ``sum64``, STI's fast one.

A streamed decoder re-reads and re-checks its shards on every token (~100 MB per token for
SmolLM2), so the checksum's speed is part of the token latency: zlib's crc32 runs at about
1.4 GB/s per core here. ``sum64`` runs at the speed of a 64-bit multiply-add per 8 bytes
(several GB/s, C kernel ``sti._kernels.sum64``; NumPy fallback gives the same value) and still
detects what a store must notice — any changed 8-byte word, a truncated or zero-filled file:

    s = sum_i w_i * (2i + 1) * K  (mod 2^64),  w_i the little-endian uint64 words (tail zero-padded)
    sum64 = fmix64(s ^ (nbytes * K2))  as 16 hex digits

Every multiplier (2i + 1) * K is odd, hence invertible mod 2^64: changing one word always
changes s. K is the 64-bit golden-ratio constant; fmix64 is the MurmurHash3 finaliser, which
spreads the length and the sum over all bits. They guard against damage, not tampering.
"""

from __future__ import annotations

import os

import numpy as np

K = 0x9E3779B97F4A7C15
K2 = 0xC2B2AE3D27D4EB4F
MASK = (1 << 64) - 1
_CHUNK = 1 << 20  # words per NumPy block (8 MB)

try:
    if os.environ.get("STI_NO_C", "") not in ("", "0"):
        raise ImportError("STI_NO_C set")
    from sti._kernels import sum64 as _c_sum64
except ImportError:  # pragma: no cover - depends on the build
    _c_sum64 = None


def _fmix64(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK
    return x ^ (x >> 33)


def _sum_numpy(buf) -> int:
    mv = memoryview(buf).cast("B")
    n = mv.nbytes // 8
    s = np.uint64(0)
    with np.errstate(over="ignore"):
        for a in range(0, n, _CHUNK):
            w = np.frombuffer(mv, dtype="<u8", count=min(_CHUNK, n - a), offset=8 * a)
            m = (np.arange(a, a + len(w), dtype=np.uint64) * np.uint64(2) + np.uint64(1)) * np.uint64(K)
            s += (w * m).sum(dtype=np.uint64)
        total = int(s)
    tail = mv.nbytes - 8 * n
    if tail:
        w = int.from_bytes(bytes(mv[8 * n:]) + bytes(8 - tail), "little")
        total += w * (((2 * n + 1) * K) & MASK)
    return total & MASK


def sum64_int(buf) -> int:
    """The raw word sum s (C kernel when built; identical NumPy reference otherwise)."""
    return _c_sum64(buf) if _c_sum64 is not None else _sum_numpy(buf)


def sum64(buf) -> str:
    """The ``sum64`` checksum of ``buf`` (bytes-like) as 16 hex digits."""
    nbytes = memoryview(buf).nbytes
    return f"{_fmix64(sum64_int(buf) ^ ((nbytes * K2) & MASK)):016x}"
