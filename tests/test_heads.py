"""Linear heads: loading, prediction, errors, and the shipped bbc-news head's record."""

import hashlib
import json

import numpy as np
import pytest

from sti.errors import STIError
from sti.heads import HEADS_DIR, LinearHead, available_heads, load_head


@pytest.fixture
def tiny_head(tmp_path, rng):
    W = rng.standard_normal((3, 8)).astype(np.float32)
    b = np.array([0.1, -0.2, 0.0], np.float32)
    path = tmp_path / "tiny.npz"
    np.savez_compressed(path, W=W, b=b, labels=np.array(["a", "bb", "ccc"]))
    (tmp_path / "tiny.json").write_text(json.dumps({"accuracy": 0.5}))
    return path, W, b


def test_load_head_by_path(tiny_head, rng):
    path, W, b = tiny_head
    head = load_head(path)
    assert isinstance(head, LinearHead) and head.name == "tiny"
    assert head.labels == ["a", "bb", "ccc"] and head.record == {"accuracy": 0.5}
    assert (head.num_classes, head.dim) == (3, 8) and head.W.dtype == np.float32
    emb = rng.standard_normal((5, 8)).astype(np.float32)
    labels, probs = head.predict(emb)
    assert probs.shape == (5, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert np.all(probs >= 0)
    z = emb.astype(np.float64) @ W.T.astype(np.float64) + b
    ref = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(probs, ref / ref.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert labels == [head.labels[i] for i in z.argmax(1)]
    one_label, one = head.predict(emb[0])  # a single vector is a batch of one
    assert one.shape == (1, 3) and one_label == labels[:1]


def test_softmax_is_stable_for_large_logits(tiny_head):
    head = load_head(tiny_head[0])
    _, p = head.predict(np.full((1, 8), 1e4, np.float32))
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-6


def test_wrong_embedding_size_is_an_sti_error(tiny_head):
    head = load_head(tiny_head[0])
    with pytest.raises(STIError, match="8-dimensional"):
        head.predict(np.zeros((2, 384), np.float32))


def test_unknown_head_lists_the_available_ones():
    with pytest.raises(STIError) as e:
        load_head("no-such-head")
    assert "no-such-head" in e.value.problem
    for name in available_heads():
        assert name in e.value.fix


def test_malformed_head_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, W=np.zeros((3, 4), np.float32), b=np.zeros(2, np.float32), labels=np.array(["x", "y", "z"]))
    with pytest.raises(STIError, match="malformed"):
        load_head(bad)
    missing = tmp_path / "missing.npz"
    np.savez(missing, W=np.zeros((3, 4), np.float32))
    with pytest.raises(STIError, match="cannot read"):
        load_head(missing)


# ---------------------------------------------------------------- the shipped head
def shipped():
    if "bbc-news" not in available_heads():
        pytest.skip("bbc-news head not trained yet (scripts/train_bbc_head.py)")
    return load_head("bbc-news")


def test_bbc_news_head_matches_its_record():
    head = shipped()
    rec = head.record
    assert head.W.shape == (5, 384) and head.b.shape == (5,)
    assert head.labels == rec["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert rec["accuracy"] >= 0.95 and rec["n_test"] == 667
    assert set(rec["per_class"]) == set(head.labels)
    assert rec["model"] == "minilm" and rec["split"]["seed"] == 0
    npz = HEADS_DIR / "bbc-news.npz"
    assert hashlib.sha256(npz.read_bytes()).hexdigest() == rec["files"]["npz_sha256"]
    assert npz.stat().st_size < 20_000


def test_encoder_classify_uses_the_head():
    from conftest import builtin_or_skip
    from sti.api import Encoder

    builtin_or_skip("minilm")
    head = shipped()
    enc = Encoder.load("minilm")
    texts = ["The striker scored twice as United won the cup final at Wembley.",
             "The chip maker unveiled a faster processor for laptops and phones."]
    labels, probs = enc.classify(texts, head="bbc-news")
    assert probs.shape == (2, 5) and all(lab in head.labels for lab in labels)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert labels == ["sports", "tech"]
