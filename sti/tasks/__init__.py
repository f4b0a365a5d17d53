"""Accuracy tasks: held-out evaluation of an encoder with a shipped linear head.

    >>> from sti.tasks import evaluate
    >>> evaluate("minilm", "bbc-news")["accuracy"]

``evaluate`` embeds the task's held-out split with the encoder (STI's own runtime) and
applies the task's head from ``sti/heads``. ``split="calib"`` measures on the calibration
split instead (the one importance profiling uses; disjoint from test and unseen by the head).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import numpy as np

from sti.errors import STIError

# task name -> (head name, module holding the data and split)
TASKS = {"bbc-news": ("bbc-news", "sti.tasks.bbc")}
SPLITS = ("test", "calib", "train")


def available_tasks() -> list[str]:
    return sorted(TASKS)


@contextlib.contextmanager
def count_truncation_notices() -> Iterator[list[str]]:
    """Collect the encoder's per-text truncation notices instead of printing them.

    Long articles exceed the encoder's 512 positions and are truncated (as the head was
    trained); one notice per article would bury the progress bar. Yields the list the
    notices are appended to. Not thread-safe (it swaps ``sti.api._notice``).
    """
    import sti.api as api

    caught: list[str] = []
    original = api._notice

    def notice(msg: str) -> None:
        if "truncated" in msg:
            caught.append(msg)
        else:
            original(msg)

    api._notice = notice
    try:
        yield caught
    finally:
        api._notice = original


def _task(task: str):
    if task not in TASKS:
        raise STIError(f"no such task: {task!r}", f"use one of: {', '.join(available_tasks())}")
    import importlib

    head, module = TASKS[task]
    return head, importlib.import_module(module)


def evaluate(model="minilm", task: str = "bbc-news", progress: bool = True, split: str = "test",
             limit: int | None = None, batch_size: int = 16) -> dict:
    """Accuracy of ``model`` with the task's head on a split of the task's data.

    ``model`` is a model name or path (loaded with ``Encoder.load``) or an object with the
    Encoder's ``embed(texts, batch_size, progress)`` (e.g. an elastic/quantized runtime).
    ``limit`` evaluates an evenly spaced, class-proportional subset of the split.

    Returns {"task", "model", "head", "split", "accuracy", "n", "correct", "per_class"
    {label: {"n", "accuracy"}}, "confusion" (rows true, columns predicted, in "labels" order),
    "labels", "truncated", "seconds", "head_accuracy" (the test accuracy the head's record states)}.
    """
    head_name, mod = _task(task)
    if split not in SPLITS:
        raise STIError(f"no such split: {split!r}", f"use one of: {', '.join(SPLITS)}")
    from sti.heads import load_head

    head = load_head(head_name)
    arts, parts = mod.load_split()
    if list(arts.labels) != list(head.labels):
        raise STIError(f"head {head_name!r} has labels {head.labels}, the task has {list(arts.labels)}",
                       "retrain the head (scripts/train_bbc_head.py) or reinstall STI")
    idx = mod.subsample(parts[split], limit)

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from sti.api import Encoder

        enc, model_name = Encoder.load(model), str(model)
    else:
        enc = model
        ckpt = getattr(enc, "ckpt", None)
        model_name = str(getattr(ckpt, "source", type(enc).__name__))
    cfg = getattr(enc, "cfg", None)
    if cfg is not None and getattr(cfg, "hidden_size", head.dim) != head.dim:
        raise STIError(f"{model_name} makes {cfg.hidden_size}-dimensional embeddings; head {head_name!r} "
                       f"takes {head.dim} (it was trained on {head.record.get('model', 'another encoder')})",
                       f"evaluate {head.record.get('model', 'the encoder the head was trained on')}")

    t0 = time.perf_counter()
    with count_truncation_notices() as notices:
        emb = enc.embed([arts.texts[i] for i in idx], batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    _, probs = head.predict(emb)
    pred, true = probs.argmax(-1), arts.y[idx]
    C = len(head.labels)
    confusion = np.zeros((C, C), np.int64)
    np.add.at(confusion, (true, pred), 1)
    per_class = {}
    for c, lab in enumerate(head.labels):
        n_c = int(confusion[c].sum())
        per_class[lab] = {"n": n_c, "accuracy": float(confusion[c, c] / n_c) if n_c else None}
    correct = int(np.trace(confusion))
    return {
        "task": task,
        "model": model_name,
        "head": head_name,
        "split": split,
        "accuracy": correct / len(idx),
        "n": int(len(idx)),
        "correct": correct,
        "per_class": per_class,
        "labels": list(head.labels),
        "confusion": confusion.tolist(),
        "truncated": len(notices),
        "seconds": round(seconds, 2),
        "head_accuracy": head.record.get("accuracy"),
    }
