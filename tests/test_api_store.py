"""Encoder.from_store: plan from a saved profile, stream under it (tiny store, synthetic profile)."""

import shutil

import numpy as np
import pytest

from sti.api import Encoder
from sti.errors import STIError
from sti.plan import DeviceProfile, Importance
from sti.profile import model_shape, save_profile
from sti.store import Store


@pytest.fixture
def profiled(tiny_bert, tmp_path):
    dst = tmp_path / "tiny.sti"
    shutil.copytree(tiny_bert[2], dst)
    with Store.open(dst) as st:
        shape = model_shape(st, input_tokens=16)
        imp = Importance.synthetic(shape, seed=1)
    dev = DeviceProfile(io_bandwidth=1e9, io_latency=1e-5, c0=1e-4, c1=1e-6,
                        dequant_per_byte={b: 1e-9 for b in (2, 3, 4, 5, 6, 8, 32)}, label="synthetic")
    save_profile(dst, imp, dev, {"task": "synthetic"})
    return dst, shape


def test_streams_within_budget_under_a_plan(profiled):
    store, shape = profiled
    budget = shape.fixed_bytes + shape.scratch_bytes + 4 * shape.shard_bytes[32]
    enc = Encoder.from_store(store, latency="50ms", memory=budget, seq_len=16)
    emb = enc.embed(["the cat sat on the mat", "a big red dog ran fast"])
    assert emb.shape == (2, 48)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    assert len(enc.traces) == 2
    assert all(t.resident_peak <= budget for t in enc.traces)
    assert enc.plan.memory_budget == budget


def test_missing_profile_and_impossible_budget_are_clear_errors(tiny_bert, profiled):
    with pytest.raises(STIError, match="run sti profile"):
        Encoder.from_store(tiny_bert[2], latency="50ms", memory="1MB")  # packed, never profiled
    store, _ = profiled
    with pytest.raises(STIError, match="smallest"):
        Encoder.from_store(store, latency="50ms", memory=1000, seq_len=16)
