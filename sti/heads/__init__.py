"""Linear classification heads over sentence embeddings, shipped as small ``.npz`` files.

A head file ``<name>.npz`` holds ``W`` (C, H) float32, ``b`` (C,) float32 and ``labels`` (C,)
strings; an optional ``<name>.json`` beside it records how the head was made and its held-out
accuracy. ``predict`` returns ``softmax(emb @ W.T + b)`` and the arg-max label.

    >>> from sti.heads import load_head
    >>> head = load_head("bbc-news")
    >>> labels, probs = head.predict(embeddings)   # embeddings (N, 384) from Encoder.embed
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sti.errors import STIError

HEADS_DIR = Path(__file__).resolve().parent


@dataclass
class LinearHead:
    name: str
    W: np.ndarray  # (C, H) float32
    b: np.ndarray  # (C,) float32
    labels: list[str]
    record: dict = field(default_factory=dict)  # the .json beside the .npz, if any

    @property
    def num_classes(self) -> int:
        return self.W.shape[0]

    @property
    def dim(self) -> int:
        return self.W.shape[1]

    def logits(self, emb: np.ndarray) -> np.ndarray:
        """Embeddings (N, H) -> logits (N, C) float32."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim == 1:
            emb = emb[None]
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise STIError(f"head {self.name!r} takes {self.dim}-dimensional embeddings, got shape {emb.shape}",
                           f"use the encoder the head was trained on"
                           f" ({self.record.get('model', 'see its .json record')})")
        return emb @ self.W.T + self.b

    def predict_proba(self, emb: np.ndarray) -> np.ndarray:
        """Embeddings (N, H) -> class probabilities (N, C) float32, rows summing to 1."""
        z = self.logits(emb).astype(np.float64)
        z -= z.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        return p.astype(np.float32)

    def predict(self, emb: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Embeddings (N, H) -> (label per row, probabilities (N, C))."""
        p = self.predict_proba(emb)
        return [self.labels[i] for i in p.argmax(-1)], p


def available_heads() -> list[str]:
    """Names of the heads shipped with STI."""
    return sorted(p.stem for p in HEADS_DIR.glob("*.npz"))


def _read(path: Path, name: str) -> LinearHead:
    try:
        with np.load(path, allow_pickle=False) as z:
            W, b, labels = z["W"], z["b"], [str(s) for s in z["labels"]]
    except (OSError, ValueError, KeyError) as e:
        raise STIError(f"cannot read head file {path}: {e}",
                       "a head is an .npz with arrays W (C, H), b (C,) and labels (C,)") from None
    if W.ndim != 2 or b.shape != (W.shape[0],) or len(labels) != W.shape[0]:
        raise STIError(f"head file {path} is malformed: W {W.shape}, b {b.shape}, {len(labels)} labels",
                       "a head is an .npz with arrays W (C, H), b (C,) and labels (C,)")
    record = {}
    js = path.with_suffix(".json")
    if js.exists():
        record = json.loads(js.read_text(encoding="utf-8"))
    return LinearHead(name, W.astype(np.float32), b.astype(np.float32), labels, record)


def load_head(name: str | Path) -> LinearHead:
    """A shipped head by name (e.g. ``"bbc-news"``), or a head ``.npz`` file by path."""
    key = str(name)
    if key in available_heads():
        return _read(HEADS_DIR / f"{key}.npz", key)
    path = Path(key).expanduser()
    if path.suffix == ".npz" and path.is_file():
        return _read(path, path.stem)
    heads = ", ".join(available_heads()) or "(none installed)"
    raise STIError(f"no such head: {key!r}", f"use one of: {heads}, or the path of a head .npz file")
