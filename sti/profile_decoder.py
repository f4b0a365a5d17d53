"""Profiling a decoder shard store, and choosing the version of every shard for a per-token target.

``sti profile STORE`` on a LLaMA-family store runs :func:`run_decoder_profile`, which measures
what the planner (``sti.plan_decoder``) needs to pick per-shard bitwidths, and writes it as
``STORE/profile-decoder.json`` (``profile-decoder-<storage>.json`` for an emulated storage):

* **importance** -- for every shard version below the lossless one: the mean KL divergence
  KL(lossless || perturbed) of the next-token distributions (nats per token) on calibration
  text (BBC News *calib* split, never the test split) when only that shard runs at that version;
* **device** -- per version, the seconds to stream one shard (read + checksum, as the IO worker
  of ``sti.decoder_runtime`` does it): from a warm page cache (latency + bytes / bandwidth,
  fitted over every version), cold (after ``Store.evict()``, for reference), and paced as the
  emulated storage paces it; the seconds of one shard's matrix-vector products in decode at
  batch 1 and 16 (the runtime's operators over the stored bytes, with the kernels chosen by
  measurement: each layer's matrices timed as decode multiplies them -- one kernel call per
  matrix over all of the layer's shards where the version tiles, GGML blocks -- and the layer's
  time split between its shards by their bytes; versions timed round-robin, best round of the
  median over shards); the per-step time that is not a shard's product (attention, norms, the
  runtime's bookkeeping); and a check of the resulting latency model against the streaming
  runtime itself. The kernel choices are this machine's (the user cache ``sti.api.Generator``
  reads; the profile measures the store's shapes there on a miss); ``STORE/kernels.json``
  records the ones the timings used.

:func:`choose_versions` turns the profile into versions for a target: it starts with every shard
lossless and greedily lowers the shard version with the smallest importance increase per second
saved until the predicted per-token time meets the target (:func:`greedy_versions`, a pure
function of the tables, so tests can call it with synthetic numbers).

How the importance is measured in minutes
-----------------------------------------
Measuring every (shard, version) exactly needs a forward pass from the shard's layer to the
logits for each: 540 partial passes for SmolLM2 (30 layers x 3 shards x 6 versions), ~15 layer
passes and the 49152-row LM head each: about 15 minutes on an idle 2-core machine, much more on a
shared one. Exact per-shard KLs on SmolLM2 (4 texts x 64 tokens; layers 0, 5, 15, 28, 29;
2, 3 and 4 bits; 45 partial passes) showed three regularities that make a ~15x cheaper estimate
accurate:

1. *Within a shard, KL follows the squared weight error across bitwidths*: KL / ||W_b - W||^2
   (summed over the shard's matrices; no forward pass needed) stayed within a factor 1.0-2.2
   (median 1.3) across 2, 3 and 4 bits for each shard, while KL itself spans 14-42x.
2. *Within a layer, the shards' KLs follow their local output error* measured after the next
   RMSNorm (the error the next layer, or the LM head, actually sees): KL / error between a
   layer's shards spread 1.1-2.4x (median 1.4), against 1.0-3.4x (median 2.1) for an equal
   split. (The raw residual-stream error misleads: in late layers a few massive dimensions
   dominate it, a 16x spread.)
3. *Single-shard KLs add up within a layer*: the exact KL with all of a layer's shards lowered
   was 0.8-1.5x the sum of its single-shard KLs.

So per layer l: one exact KL with all of its shards at an anchor bitwidth b* (3-bit by default),
propagated to the logits (30 partial passes in all); one single-layer pass per shard at b* for
its local error; and the weight errors of every version. Then

    importance(l, s, b) = KL(l, all at b*) * err(l, s, b*) / sum_s' err(l, s', b*)
                                           * ||W_b - W||^2(l, s) / ||W_b* - W||^2(l, s)

The LM-head shards are measured exactly, and cheaply: a head shard changes only the logits of its
vocabulary rows, and KL(p || p') = -sum_r p_r d_r + log1p(sum_r p_r expm1(d_r)) with d = z' - z
over those rows alone. Every profile re-checks the estimate against a few exact per-shard KLs
(``importance.check``: estimated / measured for random shards and versions).

The latency model
-----------------
A decode step streams every shard that is not preloaded while the compute thread runs the layers
(the IO worker prefetches across layers and tokens). Its time is predicted as

    max(IO, compute) + contention * min(IO, compute) + overhead

where IO sums the streamed shards' read + checksum seconds, compute every shard's products, and
the overhead is the rest of a step (a step of the lossless model with every shard resident, minus
its products); the preload set is the one the plan chooses for those versions
(``plan_decoder_shape``: what the budget leaves after the read buffers and the KV cache preloads
shards in pass order). A perfect pipeline has ``contention`` 0; on a small machine the IO
worker's copy from the page cache and its checksum are CPU work that competes with the kernels
(and evicts their cache lines), so the profile fits it (0..2) on streamed steps of
``StreamingDecoder`` itself, at several versions, and ``device.check`` lists each run's
predicted / measured step. On the shared 2-core reference machine it comes out at 1 or a little
above: there, streaming from the page cache does not overlap with compute at all. Real storage is
modelled by its warm page cache -- a decoder re-reads the same shards every token, so where the
store fits in the page cache they stay there; profile with ``--storage`` to emulate a device whose
storage is slower.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sti.errors import STIError
from sti.store import format as fmt

HEAD = fmt.HEAD
PROFILE_FORMAT = "sti-decoder-profile"
PROFILE_VERSION = 2  # 2: batches of Q4_1/Q8_0 shards may run int8 products (version 1 timed them without)
KERNELS_FILE = "kernels.json"
DEFAULT_TASK = "bbc-news"
DEFAULT_N_TEXTS = 4
DEFAULT_SEQ_LEN = 48
DEFAULT_ANCHOR_BITS = 3
BATCHES = (1, 16)  # decode batch sizes the compute times are measured at (others interpolate)
IMPORTANCE_METHOD = 1  # bump when the estimate changes: a saved importance is reused only if equal
_EPS = 1e-12  # seconds: smaller savings are no savings
MAX_CONTENTION = 2.0  # see step_time


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _lossless(store) -> int:
    from sti.decoder_runtime import lossless_bits

    return lossless_bits(store)


def _lossy_bits(store) -> list[int]:
    return [b for b in store.bits if b < fmt.FP32]


def _kind(layer: int) -> str:
    return "head" if layer == HEAD else "layer"


# ============================================================================================
# Files
# ============================================================================================


def profile_path(store_path, storage: str | None = None) -> Path:
    """``STORE/profile-decoder.json``, or ``STORE/profile-decoder-<storage>.json`` when emulated."""
    from sti.profile import storage_key

    key = storage_key(storage)
    return Path(store_path).expanduser() / ("profile-decoder.json" if key is None else f"profile-decoder-{key}.json")


def _store_kernels(store):
    """(this machine's kernel profile, the JSON of its choices for the store's shapes): every
    packed matrix shape of the store x version x batch of :data:`BATCHES` is looked up in the
    machine's profile in the user cache -- the one ``sti.api.Generator`` runs with -- and measured
    on a miss (fused low-bit kernel vs dequantize + BLAS, 1 vs 2 threads); the profile is saved
    back, so that the runtime multiplies with exactly the kernels these timings were made with."""
    from sti import lowbit
    from sti.api import _kernel_profile, _save_kernel_profile

    kernels = _kernel_profile()
    mine = [kernels.choose(kind, shape, bits, batch) for kind, shape, bits in _kernel_shapes(store) for batch in BATCHES]
    _save_kernel_profile(kernels)  # a read-only cache: the runtime measures again on first use
    return kernels, lowbit.KernelProfile(mine, kernels.machine).to_json()


def load_kernel_profile(store_path):
    """The kernel choices ``sti profile STORE`` timed the store with (``STORE/kernels.json``) as a
    :class:`sti.lowbit.KernelProfile`, or None when the store has none (or an unreadable one).
    The runtime itself reads this machine's profile from the user cache, which the profile fills."""
    from sti import lowbit

    path = Path(store_path).expanduser() / KERNELS_FILE
    if not path.is_file():
        return None
    try:
        return lowbit.load_profile(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` atomically (a temporary file, then ``os.replace``)."""
    from sti.profile import _jsonable

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_jsonable(doc), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise STIError(f"cannot write {path}: {exc}", "make the store directory writable") from None


def load_decoder_profile(store_path, storage: str | None = None) -> dict:
    """The saved decoder profile of a store (the JSON document); an STIError naming
    ``sti profile STORE`` when it is missing, damaged, of another version or stale."""
    from sti.profile import storage_key, store_fingerprint

    path = profile_path(store_path, storage)
    flag = "" if storage_key(storage) is None else f" --storage {storage_key(storage)}"
    fix = f"run sti profile {store_path}{flag} (a few minutes)"
    if not path.is_file():
        what = "" if storage_key(storage) is None else f" for storage {storage_key(storage)}"
        raise STIError(f"the store {store_path} has no decoder profile{what} ({path.name}), which a per-token "
                       "latency target needs", fix)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != PROFILE_FORMAT:
            raise ValueError("not an STI decoder profile")
    except (OSError, ValueError) as exc:
        raise STIError(f"{path} is damaged: {exc}", fix) from None
    if doc.get("profile_version") != PROFILE_VERSION:
        raise STIError(f"{path} has profile version {doc.get('profile_version')}, this STI reads {PROFILE_VERSION}",
                       fix)
    if doc.get("store_fingerprint") != store_fingerprint(store_path):
        raise STIError(f"the profile {path} is stale: the store was re-packed after it was made", fix)
    return doc


# ============================================================================================
# Calibration text
# ============================================================================================


def calibration_ids(store, task: str = DEFAULT_TASK, n_texts: int = DEFAULT_N_TEXTS,
                    seq_len: int = DEFAULT_SEQ_LEN) -> tuple[np.ndarray, dict]:
    """(ids (n_texts, T), description): the first ``T`` tokens of evenly spaced articles of the
    BBC News *calib* split (disjoint from the test split); T = ``seq_len``, or less when an
    article or the model's context is shorter."""
    if task != DEFAULT_TASK:
        raise STIError(f"unknown task {task!r}", f"use --task {DEFAULT_TASK}")
    if n_texts < 1 or seq_len < 2:
        raise STIError(f"calibration needs at least 1 text of 2 tokens, got {n_texts} x {seq_len}",
                       "pass n_texts >= 1 and seq_len >= 2")
    from sti.tasks import bbc

    arts, split = bbc.load_split()
    idx = bbc.subsample(split["calib"], n_texts)
    tok = store.tokenizer()
    bos = store.special.get("bos_id")
    rows = []
    for i in idx:
        ids = tok.encode(arts.texts[i], add_special_tokens=False).ids
        if store.special.get("add_bos") and bos is not None:
            ids = [bos] + ids
        rows.append(ids)
    T = min(seq_len, store.config.max_position, *(len(r) for r in rows))
    if T < 2:
        raise STIError("the calibration texts are too short", "use a longer seq_len or other texts")
    ids = np.array([r[:T] for r in rows], dtype=np.int64)
    desc = {"task": task, "split": f"calib split of sti.tasks.bbc (seed {bbc.SEED}), evenly spaced subsample",
            "n_texts": len(idx), "seq_len": int(T), "tokens": int(ids.size)}
    return ids, desc


# ============================================================================================
# Importance
# ============================================================================================


class _Calibrated:
    """The lossless model in memory (float32), run once over the calibration tokens: every layer's
    input and the output distribution are kept, so that a perturbation at layer l reruns only
    layers l..L-1 (and a head shard only its own rows of the logits)."""

    def __init__(self, store, ids: np.ndarray, lossless: int):
        from sti.models import llama

        self.store, self.cfg = store, store.config
        cfg = self.cfg
        self.B, self.T = ids.shape
        self.cos, self.sin = llama.rope_tables(cfg, llama.positions(0, self.T))
        L = store.num_layers
        self.shards = [{s: store.read_shard(layer, s, lossless) for s in store.shard_indices(layer)}
                       for layer in range(L)]
        self.weights = [store.combine_shards(layer, self.shards[layer]) for layer in range(L)]
        self.norm = store.globals()["norm"]
        # each layer's output as the next consumer sees it: RMSNorm'ed by the next layer (or the final norm)
        self.next_norm = [self.weights[layer + 1]["attn_norm"] for layer in range(L - 1)] + [self.norm]
        x = store.embedding_rows(ids.reshape(-1)).reshape(self.B, self.T, cfg.hidden_size)
        self.inputs = [x]
        for layer in range(L):
            x = self.layer(layer, x, self.weights[layer])
            self.inputs.append(x)
        self.head = {}  # head shard -> (first row, lossless rows (n, H))
        for s in store.shard_indices(HEAD):
            a, _ = store.shard_ranges(HEAD, s)["vocab"]
            self.head[s] = (a, store.read_shard(HEAD, s, lossless)["lm_head"])
        self.E = np.concatenate([w for _, w in sorted(self.head.values(), key=lambda t: t[0])])
        self.h = self.final_hidden(x)
        z = self.h @ self.E.T  # (N, V)
        self.lse = _logsumexp(z)
        self.z = z
        self.p = np.exp(z - self.lse[:, None])

    def layer(self, layer: int, x: np.ndarray, w: dict) -> np.ndarray:
        from sti.models import llama

        cfg = self.cfg
        n_kv = w["wk"].shape[0] // cfg.head_dim
        k = np.zeros((self.B, n_kv, self.T, cfg.head_dim), np.float32)
        return llama.layer(cfg, x, w, k, np.zeros_like(k), 0, self.cos, self.sin)

    def final_hidden(self, x: np.ndarray) -> np.ndarray:
        from sti.models import llama

        return np.ascontiguousarray(llama.rms_norm(x, self.norm, self.cfg.rms_eps).reshape(-1, self.cfg.hidden_size))

    def with_shards(self, layer: int, replaced: dict[int, dict]) -> dict:
        """Layer ``layer``'s weights with the shards in ``replaced`` ({shard: decoded tensors}) swapped in."""
        return self.store.combine_shards(layer, {**self.shards[layer], **replaced})

    def kl_from(self, layer: int, w: dict) -> float:
        """Mean KL(lossless || perturbed) per token when layer ``layer`` runs with weights ``w``."""
        x = self.layer(layer, self.inputs[layer], w)
        for nxt in range(layer + 1, len(self.weights)):
            x = self.layer(nxt, x, self.weights[nxt])
        z = self.final_hidden(x) @ self.E.T
        lse = _logsumexp(z)
        z -= self.z  # z' - z: KL = sum p (z - z') + lse' - lse
        return float(max(np.mean(lse - self.lse - np.einsum("ij,ij->i", self.p, z)), 0.0))

    def local_error(self, layer: int, w: dict) -> float:
        """Mean squared error per token of layer ``layer``'s output, as the next layer (or the LM
        head) sees it after RMSNorm, when the layer runs with weights ``w``."""
        from sti.models import llama

        eps = self.cfg.rms_eps
        y = llama.rms_norm(self.layer(layer, self.inputs[layer], w), self.next_norm[layer], eps)
        ref = llama.rms_norm(self.inputs[layer + 1], self.next_norm[layer], eps)
        return float(np.mean(np.sum((y - ref).astype(np.float64) ** 2, -1)))

    def head_kl(self, s: int, rows: np.ndarray) -> float:
        """Exact mean KL when head shard ``s`` computes its logits with ``rows`` (n, H) instead."""
        a, w = self.head[s]
        n = w.shape[0]
        d = (self.h @ rows.T - self.z[:, a:a + n]).astype(np.float64)  # z' - z on the shard's rows
        p = self.p[:, a:a + n].astype(np.float64)
        kl = -(p * d).sum(-1) + np.log1p((p * np.expm1(d)).sum(-1))
        return float(max(kl.mean(), 0.0))


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(-1)
    return (np.log(np.exp(z - m[:, None]).sum(-1, dtype=np.float64)) + m).astype(np.float64)


def _weight_error(decoded: dict, ref: dict) -> float:
    return float(sum(np.sum((decoded[n].astype(np.float64) - ref[n]) ** 2) for n in ref if ref[n].ndim == 2))


def profile_importance(store, ids: np.ndarray, *, anchor_bits: int | None = None, checks: int = 4,
                       seed: int = 0, progress: bool = False) -> dict:
    """Importance of every shard version below the lossless one (see the module docstring):
    ``{"layers": [{shard: {bits: kl}}], "head": {shard: {bits: kl}}, ...}`` with the per-layer
    anchor KLs, the local errors and weight errors it was computed from, and a check against
    exact per-shard KLs (``checks`` random shard versions, each a partial forward pass)."""
    from tqdm import tqdm

    lossless = _lossless(store)
    lossy = _lossy_bits(store)
    L = store.num_layers
    if not lossy:
        return {"layers": [{} for _ in range(L)], "head": {}, "anchor_bits": None, "note": "no lossy versions"}
    anchor = anchor_bits if anchor_bits in lossy else min(lossy, key=lambda b: (abs(b - DEFAULT_ANCHOR_BITS), b))
    t0 = time.perf_counter()
    cal = _Calibrated(store, ids, lossless)
    t_base = time.perf_counter() - t0
    layers, anchors, local, werr = [], [], [], []
    bar = tqdm(range(L), desc="importance", unit="layer", file=sys.stderr, disable=not progress, leave=False)
    for layer in bar:
        shards = store.shard_indices(layer)
        dec = {b: {s: store.read_shard(layer, s, b) for s in shards} for b in lossy}
        kl_all = cal.kl_from(layer, store.combine_shards(layer, dec[anchor]))
        err = {s: cal.local_error(layer, cal.with_shards(layer, {s: dec[anchor][s]})) for s in shards}
        dw = {s: {b: _weight_error(dec[b][s], cal.shards[layer][s]) for b in lossy} for s in shards}
        total = sum(err.values())
        row = {}
        for s in shards:
            at_anchor = kl_all * (err[s] / total if total > 0 else 1 / len(shards))
            row[s] = {b: at_anchor * (dw[s][b] / dw[s][anchor] if dw[s][anchor] > 0 else 1.0) for b in lossy}
        layers.append(row)
        anchors.append(kl_all)
        local.append(err)
        werr.append(dw)
    head = {}
    for s in store.shard_indices(HEAD):
        head[s] = {b: cal.head_kl(s, store.read_shard(HEAD, s, b)["lm_head"]) for b in lossy}
    t_est = time.perf_counter() - t0 - t_base
    rng = np.random.default_rng(seed)
    check = []
    for _ in range(checks):
        layer = int(rng.integers(L))
        s = int(rng.choice(store.shard_indices(layer)))
        b = int(rng.choice(lossy))
        exact = cal.kl_from(layer, cal.with_shards(layer, {s: store.read_shard(layer, s, b)}))
        check.append({"layer": layer, "shard": s, "bits": b, "estimated": layers[layer][s][b], "measured": exact,
                      "ratio": layers[layer][s][b] / exact if exact > 0 else None})
    ratios = [c["ratio"] for c in check if c["ratio"]]
    return {
        "metric": "mean KL(lossless || perturbed) of the next-token distribution, nats per token",
        "method": (f"layer shards: exact KL of each layer with all its shards at {fmt.label(anchor)}, split between "
                   "the shards by their local output error (after the next RMSNorm) and scaled to other versions "
                   "by the shards' squared weight error; LM-head shards: exact"),
        "method_version": IMPORTANCE_METHOD,
        "anchor_bits": anchor,
        "layers": layers,
        "head": head,
        "layer_kl_at_anchor": anchors,
        "local_error_at_anchor": local,
        "weight_error": werr,
        "check": {"shards": check,
                  "ratio_geomean": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,
                  "ratio_range": [float(min(ratios)), float(max(ratios))] if ratios else None},
        "seconds": {"lossless_pass": round(t_base, 2), "estimate": round(t_est, 2),
                    "check": round(time.perf_counter() - t0 - t_base - t_est, 2)},
    }


# ============================================================================================
# Device: IO, compute, overhead
# ============================================================================================


def _pass_items(store) -> list[tuple[int, int]]:
    """Every shard of a pass, in pass order: the layers', then the LM head's."""
    items = [(layer, s) for layer in range(store.num_layers) for s in store.shard_indices(layer)]
    return items + [(HEAD, s) for s in store.shard_indices(HEAD)]


def _per_kind(items, per_byte: dict, sizes: dict) -> dict[str, float]:
    """Seconds of each shard kind's reference (first) shard, from seconds per byte of every shard
    in rounds (``per_byte[item][round]``): the best round's median over the kind's shards. The
    median discards a shard hit by a hiccup, the best round a round the machine's load slowed."""
    out = {}
    for kind in ("layer", "head"):
        rows = [it for it in items if _kind(it[0]) == kind]
        rounds = min(len(per_byte[it]) for it in rows)
        best = min(float(np.median([per_byte[it][r] for it in rows])) for r in range(rounds))
        out[kind] = best * sizes[rows[0]]
    return out


def _fit_reads(points) -> tuple[float, float]:
    """(seconds per read, seconds per byte) fitted to [(bytes, seconds)] by least squares, both >= 0."""
    n = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    (a, c), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), t, rcond=None)
    if a < 0 or c <= 0:  # a line through the origin
        a, c = 0.0, float(np.dot(n, t) / np.dot(n, n))
    return float(a), float(c)


def _time_reads(store, items, bits: int, buf) -> dict[tuple[int, int], float]:
    """Seconds to read and check each shard of a pass at ``bits``, in pass order, as the IO worker does."""
    out = {}
    for it in items:
        t0 = time.perf_counter()
        store.read_shard_bytes(*it, bits, verify=True, out=buf)
        out[it] = time.perf_counter() - t0
    return out


def _apply(op, x: np.ndarray) -> np.ndarray:
    return x @ op.T if isinstance(op, np.ndarray) else op.apply(x)


def _layer_matrices(store, layer: int, bits: int, raw: dict, kernels=None, scratch=None) -> list:
    """Layer ``layer``'s matrices at ``bits`` over its shards' bytes (``raw``: {shard: bytes}, every
    shard of the layer), as ``StreamingDecoder`` multiplies them in decode
    (``sti.decoder_runtime.layer_matrices``): for GGML versions each one C matrix read in place
    from every shard, else the composite of the shards' operators."""
    from sti.decoder_runtime import layer_matrices, shard_operators

    ops = [shard_operators(store, layer, s, bits, raw[s], kernels, scratch) for s in sorted(raw)]  # the runtime's order
    return list(layer_matrices(store.tensors(layer), ops, whole=True).values())


class _PassOps:
    """The runtime's decode operators over every shard of a pass at one version, packed over the
    stored bytes with the measured kernel choices, for timing the products of decode steps. They
    are timed in units as the runtime runs them: a layer's matrices together (one kernel call per
    matrix where the version tiles, :func:`_layer_matrices`), each LM-head shard on its own. A
    timed pass multiplies every unit in pass order, so that weights come from memory as in a real
    step, not from a cache a few shards would fit in."""

    def __init__(self, store, items, bits: int, kernels, scratch):
        from sti.decoder_runtime import shard_operators

        raw = {it: store.read_shard_bytes(*it, bits, verify=True) for it in items}
        self.nbytes = {it: store.shard_nbytes(*it, bits) for it in items}
        self.units: list[tuple[list, list]] = []  # in pass order: (its shards, its operators)
        for layer, group in itertools.groupby(items, key=lambda it: it[0]):
            shards = list(group)
            if layer == HEAD:  # the runtime multiplies every head shard on its own
                self.units += [([it], [shard_operators(store, *it, bits, raw[it], kernels, scratch)["lm_head"]])
                               for it in shards]
            else:
                self.units.append((shards, _layer_matrices(store, layer, bits, {s: raw[(layer, s)] for _, s in shards},
                                                           kernels, scratch)))
        self._x: dict = {}

    def time_pass(self, batch: int) -> dict[tuple[int, int], float]:
        """Seconds of each shard's products in one pass over the model at ``batch``: a unit's time
        split between its shards by their stored bytes (the latency model charges compute per
        shard, in proportion to its bytes)."""
        rng = np.random.default_rng(0)
        out = {}
        for shards, ops in self.units:
            t0 = time.perf_counter()
            for op in ops:
                x = self._x.get((batch, op.shape[1]))
                if x is None:
                    x = self._x[(batch, op.shape[1])] = rng.standard_normal((batch, op.shape[1])).astype(np.float32)
                _apply(op, x)
            t = time.perf_counter() - t0
            total = sum(self.nbytes[it] for it in shards)
            out.update({it: t * self.nbytes[it] / total for it in shards})
        return out


def _kernel_shapes(store) -> list[tuple[str, tuple[int, int], int | None]]:
    """(kind, shape, bits) of every packed matrix of the store's shard versions, and of every
    layer matrix decode multiplies as one (``sti.linops.tiled``), bits None for GGML kinds, which
    imply theirs."""
    from sti import lowbit

    seen = set()
    layer_layouts: dict[tuple[int, int], list[int]] = {}  # (bits, layer) -> its shards' layouts
    for shard in store.manifest.shards:
        for b, version in shard.versions.items():
            for e in store.manifest.layouts[version.layout]:
                kind = e.meta["layout"] if e.dtype == "quant" else e.dtype
                if len(e.shape) == 2 and kind in lowbit.KINDS:
                    seen.add((kind, (int(e.shape[0]), int(e.shape[1])), b if kind == "sti-q1" else None))
            if shard.layer != HEAD:
                layer_layouts.setdefault((b, shard.layer), []).append(version.layout)
    # a tiled matrix's shape follows from its shards' layouts: the runtime's operators of one layer
    # per version and combination of layouts show every one
    built = {}
    for (b, layer), layouts in layer_layouts.items():
        built.setdefault((b, tuple(layouts)), layer)
    for (b, _), layer in built.items():
        raw = {s: store.read_shard_bytes(layer, s, b) for s in store.shard_indices(layer)}
        for op in _layer_matrices(store, layer, b, raw):
            whole = getattr(op, "small", None)  # sti.linops.BySize: the one matrix decode multiplies
            if whole is not None:
                seen.add((whole.t.kind, tuple(whole.shape), None))
    return sorted(seen, key=lambda k: (k[0], k[1], k[2] or 0))


class _Stepper:
    """Decode steps of one engine on one request, timed in rounds. The request's KV cache is
    marked filled to ``context`` positions instead of prefilled (what it holds does not change a
    step's cost, and a batch-16 prefill would cost more than all the steps timed)."""

    def __init__(self, eng, batch: int, context: int, capacity: int):
        self.eng = eng
        self.cache = eng.new_cache(batch, capacity)
        self.cache.length = context
        self.tok = np.random.default_rng(1).integers(3, eng.cfg.vocab_size, (batch, 1))
        eng.forward(self.tok, self.cache)  # warms the kernels and the IO worker

    def time(self, steps: int) -> tuple[float, dict]:
        """(median seconds of ``steps`` decode steps, the IO worker's stats per step)."""
        io0 = dict(self.eng._io.stats)
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.eng.forward(self.tok, self.cache)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)), {k: (self.eng._io.stats[k] - io0[k]) / steps for k in io0}

    def close(self) -> None:
        self.eng.free_cache(self.cache)


def _pass_costs(store, device: dict, schedule_items, batch: int, preloaded=frozenset()) -> tuple[float, float]:
    """(streamed IO seconds, compute seconds) of one pass over ``schedule_items`` per the device tables."""
    io = comp = 0.0
    for layer, s, b in schedule_items:
        io_t, comp_t = _item_costs(device, _kind(layer), b, store.shard_nbytes(layer, s, b), batch)
        comp += comp_t
        if (layer, s) not in preloaded:
            io += io_t
    return io, comp


def profile_device(store, storage: str | None = None, *, repeats: int = 3, rounds: int = 3, steps: int = 5,
                   context: int = 64, progress: bool = False) -> tuple[dict, dict]:
    """(device tables, kernel profile JSON): per version and shard kind ("layer", "head") the IO
    and compute seconds of one shard; the per-step overhead at each batch of :data:`BATCHES` and
    the IO/compute contention, fitted on ``StreamingDecoder`` (decode steps after ``context``
    tokens); and the model's predicted / measured step for streamed runs at several versions.
    ``repeats``: timed rounds of the per-version tables; ``rounds`` x ``steps``: timed decode
    steps of each runtime configuration."""
    from sti.decoder_runtime import DecoderSchedule, StreamingDecoder, scratch_elements
    from sti.plan_decoder import read_slots
    from sti.profile import _fsync_store, parse_storage

    throttle = parse_storage(storage)
    lossless = _lossless(store)
    capacity = min(store.config.max_position, context + rounds * steps + 2)
    context = max(1, capacity - rounds * steps - 2)
    t0 = time.perf_counter()
    _say(progress, "choosing kernels (fused low-bit vs dequantize + BLAS, per shape, version and batch) ...")
    kernels, kjson = _store_kernels(store)
    t_kernels = time.perf_counter() - t0

    _say(progress, f"measuring shard IO and compute per version ({len(store.bits)} versions) ...")
    store.read_pattern(sequential=True)  # as the streaming decoder reads it (and leaves the page cache)
    _fsync_store(store)
    items = _pass_items(store)
    # the runtime's scratch: a matrix too large for it runs the fused kernel (sti.linops.Packed), there and here
    scratch = np.empty(scratch_elements(store), np.float32)
    # versions round-robin, so that a change of the machine's load falls on all of them alike;
    # round 0 reads each version cold (after evicting the store) and warms the kernels up
    sizes = {b: {it: store.shard_nbytes(*it, b) for it in items} for b in store.bits}
    buf = bytearray(max(n for by in sizes.values() for n in by.values()))
    cold = {b: {} for b in store.bits}
    warm = {b: {it: [] for it in items} for b in store.bits}
    products = {(b, batch): {it: [] for it in items} for b in store.bits for batch in BATCHES}
    for rnd in range(repeats + 1):
        for b in store.bits:
            if rnd == 0:
                store.evict()
            for it, t in _time_reads(store, items, b, buf).items():
                if rnd == 0:
                    cold[b][it] = [t / sizes[b][it]]
                else:
                    warm[b][it].append(t / sizes[b][it])
            ops = _PassOps(store, items, b, kernels, scratch)
            for batch in BATCHES:
                for it, t in ops.time_pass(batch).items():
                    if rnd:
                        products[(b, batch)][it].append(t / sizes[b][it])
    # a read from the page cache is a copy and a checksum: seconds = latency + bytes / bandwidth,
    # fitted over every version and kind (the per-version medians scatter more than they differ)
    io: dict[str, dict] = {"layer": {}, "head": {}}
    compute: dict[str, dict] = {"layer": {}, "head": {}}
    for b in store.bits:
        warm_s, cold_s = _per_kind(items, warm[b], sizes[b]), _per_kind(items, cold[b], sizes[b])
        for kind, by_bits in io.items():
            ref = sizes[b][next(it for it in items if _kind(it[0]) == kind)]
            by_bits[b] = {"bytes": ref, "warm_s": warm_s[kind], "cold_s": cold_s[kind]}
            compute[kind][b] = {batch: _per_kind(items, products[(b, batch)], sizes[b])[kind] for batch in BATCHES}
    latency, per_byte = _fit_reads([(v["bytes"], v["warm_s"]) for by in io.values() for v in by.values()])
    for by in io.values():
        for v in by.values():
            v["io_s"] = latency + v["bytes"] * per_byte
            if throttle is not None:  # the runtime paces every read to at least this
                v["io_s"] = max(v["io_s"], throttle.latency + v["bytes"] / throttle.bandwidth)
    device = {"io": io, "compute": compute,
              "io_fit": {"latency_s": latency, "bandwidth_Bps": 1 / per_byte if per_byte > 0 else None,
                         "what": "warm page-cache reads with checksum, fitted over every version and shard kind"}}
    t_shards = time.perf_counter() - t0 - t_kernels

    _say(progress, "measuring the per-step overhead and the IO/compute overlap on the streaming runtime ...")
    # overhead: a step of the lossless model with every shard resident minus a pass of its products;
    # streamed: every shard streamed, at several versions. Timed interleaved, round by round, so
    # that a change of the machine's load falls on all of them alike.
    full = DecoderSchedule.uniform(store, lossless)
    full.preload = {(layer, s) for layer, s, _ in full.items()}
    resident = StreamingDecoder(store, full, kernel_profile=kernels, batch=max(BATCHES), context=capacity)
    products = _PassOps(store, items, lossless, kernels, scratch)
    versions = [lossless] + [k for k in (8, 4, 3, 2) if k in store.bits]
    streamed = {b: StreamingDecoder(store, DecoderSchedule.uniform(store, b), throttle=throttle, kernel_profile=kernels,
                                    batch=1, context=capacity, slots=read_slots(len(store.shard_indices(0))))
                for b in versions}
    steppers = {("resident", batch): _Stepper(resident, batch, context, capacity) for batch in BATCHES}
    steppers.update({("streamed", b): _Stepper(eng, 1, context, capacity) for b, eng in streamed.items()})
    samples = {key: [] for key in steppers}  # per round: (median step, IO stats)
    passes = {batch: [] for batch in BATCHES}  # per round: seconds of a pass of lossless products
    try:
        for _ in range(rounds):
            for (mode, key), stepper in steppers.items():
                samples[(mode, key)].append(stepper.time(steps))
                if mode == "resident":
                    passes[key].append(sum(products.time_pass(key).values()))
    finally:
        for stepper in steppers.values():
            stepper.close()
        for eng in [resident, *streamed.values()]:
            eng.stop()
    # best of rounds, as for the tables: the machine when the rest of its load leaves it alone
    overhead = {batch: min(t for t, _ in samples[("resident", batch)]) - min(passes[batch]) for batch in BATCHES}
    device["overhead"] = {batch: max(v, 0.0) for batch, v in overhead.items()}
    device["overhead_measured"] = {
        "what": "best decode step of the lossless model with every shard resident, minus its best pass of "
                "products (each layer's matrices as decode multiplies them, tiled where the version allows): "
                "attention, norms, the runtime's bookkeeping",
        "context": context, "seconds": overhead}
    runs = []
    for b in versions:
        io_s, comp_s = _pass_costs(store, device, DecoderSchedule.uniform(store, b).items(), 1)
        step, stats = min(samples[("streamed", b)], key=lambda r: r[0])
        runs.append((b, step, io_s, comp_s, stats))
    # how much the shorter of IO and compute adds to the longer: least squares over the runs
    longer = np.array([max(r[2], r[3]) + device["overhead"][1] for r in runs])
    shorter = np.array([min(r[2], r[3]) for r in runs])
    measured = np.array([r[1] for r in runs])
    alpha = float(np.clip(np.dot(measured - longer, shorter) / max(np.dot(shorter, shorter), 1e-30), 0.0,
                          MAX_CONTENTION))
    device["contention"] = alpha
    device["check"] = []
    for b, step, io_s, comp_s, stats in runs:
        pred = float(step_time(io_s, comp_s, alpha)) + device["overhead"][1]
        device["check"].append({"run": f"{fmt.label(b)}, all streamed", "batch": 1, "measured_s": step,
                                "predicted_s": pred, "predicted_over_measured": pred / step,
                                "predicted_io_s": io_s, "predicted_compute_s": comp_s,
                                "runtime_io_s": stats["io_s"], "runtime_stall_s": stats["stall_s"]})
    device["io_source"] = throttle.label if throttle is not None else "warm page cache (measured)"
    device["kernels"] = KERNELS_FILE
    device["seconds"] = {"kernels": round(t_kernels, 2), "shards": round(t_shards, 2),
                         "runtime": round(time.perf_counter() - t0 - t_kernels - t_shards, 2)}
    return device, kjson


# ============================================================================================
# The chooser
# ============================================================================================


def step_time(io_s, compute_s, contention: float):
    """A decode step's IO and compute: the longer, plus ``contention`` times the shorter. 0 is a
    perfect pipeline, 1 no overlap at all; above 1, streaming also slows the compute down (the IO
    worker's copies evict the kernels' cache lines and take memory bandwidth; every streamed shard
    is a hand-over between threads)."""
    return np.maximum(io_s, compute_s) + contention * np.minimum(io_s, compute_s)


def _interp_batch(table: dict, batch: int) -> float:
    """A per-batch measurement at ``batch``: linear between the measured batch sizes, linear
    extrapolation beyond (keys may be ints or the strings of a loaded JSON)."""
    pts = sorted((int(k), float(v)) for k, v in table.items())
    if len(pts) == 1:
        return pts[0][1]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if batch <= xs[0]:
        return ys[0]
    j = min(max(int(np.searchsorted(xs, batch)), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)


def _item_costs(device: dict, kind: str, bits: int, nbytes: int, batch: int) -> tuple[float, float]:
    """(IO seconds, compute seconds) of one shard of ``kind`` at ``bits`` and ``nbytes``, scaled
    from the measured reference shard of that kind by bytes."""
    io = _get(device["io"][kind], bits)
    scale = nbytes / io["bytes"]
    return io["io_s"] * scale, _interp_batch(_get(device["compute"][kind], bits), batch) * scale


def _get(d: dict, key):
    return d[key] if key in d else d[str(key)]


@dataclass(frozen=True)
class VersionCosts:
    """What the chooser knows per shard (rows, in pass order) and version (columns).

    ``kl``: the importance of running the shard at that version (0 for lossless); ``io_s``: seconds
    to stream it; ``compute_s``: seconds of its products in a decode step; NaN where the shard has
    no such version. ``overhead_s``: the rest of a decode step, whatever the versions;
    ``contention``: how much the shorter of IO and compute adds to the longer (:func:`step_time`)."""

    items: list[tuple[int, int]]
    bits: list[int]
    kl: np.ndarray
    io_s: np.ndarray
    compute_s: np.ndarray
    overhead_s: float = 0.0
    contention: float = 0.0  # see step_time

    def step(self, io_s, compute_s):
        """The predicted decode step for (arrays of) streamed IO and compute seconds."""
        return step_time(io_s, compute_s, self.contention) + self.overhead_s

    def versions(self, index) -> tuple[list[dict[int, int]], dict[int, int]]:
        """Column indices per shard -> (per-layer {shard: bits}, {head shard: bits}), as plans take them."""
        layers: list[dict[int, int]] = [{} for _ in range(1 + max((lay for lay, _ in self.items), default=-1))]
        head: dict[int, int] = {}
        for (layer, s), j in zip(self.items, index):
            (head if layer == HEAD else layers[layer])[s] = self.bits[int(j)]
        return layers, head


@dataclass(frozen=True)
class Choice:
    """Versions chosen for a target: column index into ``VersionCosts.bits`` per shard, and the
    predicted decode step (``io_s`` streamed, ``compute_s``, ``predicted_s`` with overhead) and
    importance (``kl``, the sum over shards)."""

    index: np.ndarray
    predicted_s: float
    io_s: float
    compute_s: float
    kl: float
    steps: int


PreloadFn = Callable[[np.ndarray], "np.ndarray | None"]


def _state(c: VersionCosts, idx: np.ndarray, pre: np.ndarray) -> tuple[float, float]:
    """(streamed IO seconds, compute seconds) of a decode step at versions ``idx``."""
    rows = np.arange(len(idx))
    io = float(np.sum(np.where(pre, 0.0, c.io_s[rows, idx])))
    return io, float(np.sum(c.compute_s[rows, idx]))


def _moves(c: VersionCosts, idx, pre, io, comp, banned):
    """For every (shard, version): the reduction of the predicted step (with the current preload
    set), the importance increase, and whether the move is a candidate. When IO and compute tie, no
    single move shortens the step; then a move counts by how much it reduces IO + compute without
    raising either."""
    rows = np.arange(len(idx))
    d_io = np.where(pre[:, None], 0.0, c.io_s - c.io_s[rows, idx][:, None])
    d_comp = c.compute_s - c.compute_s[rows, idx][:, None]
    valid = np.isfinite(d_io) & np.isfinite(d_comp) & ~banned
    valid[rows, idx] = False
    with np.errstate(invalid="ignore"):
        gain = c.step(io, comp) - c.step(io + d_io, comp + d_comp)
        if not np.any(valid & (gain > _EPS)):
            gain = np.where((d_io <= 0) & (d_comp <= 0), -(d_io + d_comp), 0.0)
    return gain, c.kl - c.kl[rows, idx][:, None], valid & (gain > _EPS)


def _potential(c: VersionCosts, idx, pre) -> tuple[float, float]:
    """What every accepted step strictly lowers: (predicted step, IO + compute)."""
    io, comp = _state(c, idx, pre)
    return float(c.step(io, comp)), io + comp


def _descend(c: VersionCosts, idx, pre, preloaded: PreloadFn, pick, stop) -> tuple[np.ndarray, np.ndarray, int]:
    """Apply the move ``pick(gain, d_kl, valid)`` chooses until ``stop(idx, pre)`` or no move is
    left. A move is kept only if, with the preload set re-planned for it, it fits the memory and
    lowers :func:`_potential`; otherwise it is banned. So the descent ends (the potential takes
    finitely many values) whatever the tables hold."""
    banned = np.zeros(c.kl.shape, bool)
    steps = 0
    while not stop(idx, pre):
        io, comp = _state(c, idx, pre)
        gain, d_kl, valid = _moves(c, idx, pre, io, comp, banned)
        if not valid.any():
            break
        i, v = pick(gain, d_kl, valid)
        trial = idx.copy()
        trial[i] = v
        new_pre = preloaded(trial)
        before = _potential(c, idx, pre)
        if new_pre is None or not _lower(_potential(c, trial, new_pre), before):
            banned[i, v] = True
            continue
        idx, pre = trial, new_pre
        steps += 1
    return idx, pre, steps


def _lower(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[0] - _EPS or (a[0] <= b[0] + _EPS and a[1] < b[1] - _EPS)


def _cheapest_kl_per_second(gain, d_kl, valid):
    score = np.where(valid, d_kl / np.where(valid, gain, 1.0), np.inf)
    return np.unravel_index(int(np.argmin(score)), score.shape)


def _largest_saving(gain, d_kl, valid):
    return np.unravel_index(int(np.argmax(np.where(valid, gain, -np.inf))), gain.shape)


def greedy_versions(costs: VersionCosts, target_s: float, preloaded: PreloadFn, start: np.ndarray) -> Choice:
    """Lower shard versions from ``start`` until the predicted decode step meets ``target_s``.

    The prediction is :meth:`VersionCosts.step` of the streamed IO and the compute, where the
    shards that ``preloaded(index)`` marks (a bool per shard; None when the versions do not fit the
    memory) stream nothing. Each step takes the (shard, version) with the smallest importance increase per
    second of predicted step saved (an importance decrease first) among the versions that make the
    step faster. Pure: the tables and ``preloaded`` are all it reads. Raises STIError, naming the
    smallest predicted step the memory allows, when the target cannot be met."""
    idx = np.array(start, dtype=np.int64)
    pre = preloaded(idx)
    if pre is None:
        raise STIError("the starting versions do not fit the memory budget", "start from versions that fit")

    def met(idx, pre):
        return costs.step(*_state(costs, idx, pre)) <= target_s

    idx, pre, steps = _descend(costs, idx, pre, preloaded, _cheapest_kl_per_second, met)
    io, comp = _state(costs, idx, pre)
    if not met(idx, pre):
        fastest = min(float(costs.step(io, comp)), fastest_step(costs, preloaded, start))
        more = ", or raise the memory budget (more shards preloaded, less IO per token)" if io > 0 else ""
        raise STIError(f"no choice of versions meets the per-token target of {target_s * 1e3:.1f} ms under this "
                       f"memory budget: the fastest decode step the profile predicts is {fastest * 1e3:.1f} ms",
                       f"raise the target to at least {fastest * 1e3:.1f} ms{more}")
    return Choice(idx, float(costs.step(io, comp)), io, comp, _kl(costs, idx), steps)


def _kl(c: VersionCosts, idx) -> float:
    return float(np.sum(c.kl[np.arange(len(idx)), idx]))


def fastest_step(costs: VersionCosts, preloaded: PreloadFn, start: np.ndarray) -> float:
    """The smallest predicted decode step found (importance ignored): the best of every uniform
    version that fits the memory and of descending from ``start`` by the largest saving."""
    best = math.inf
    n, V = costs.kl.shape
    for v in range(V):
        idx = np.full(n, v)
        if np.all(np.isfinite(costs.io_s[:, v])) and (pre := preloaded(idx)) is not None:
            best = min(best, float(costs.step(*_state(costs, idx, pre))))
    idx = np.array(start, dtype=np.int64)
    pre = preloaded(idx)
    if pre is not None:
        idx, pre, _ = _descend(costs, idx, pre, preloaded, _largest_saving, lambda *_: False)
        best = min(best, float(costs.step(*_state(costs, idx, pre))))
    return best


def version_costs(doc: dict, shape, batch: int = 1) -> VersionCosts:
    """The chooser's tables for a store of ``shape`` (``sti.plan_decoder.DecoderShape``) from a
    loaded decoder profile, at decode batch ``batch``."""
    items = [(layer, s) for layer, shards in enumerate(shape.layers) for s in shards]
    items += [(HEAD, s) for s in shape.head]
    bits = list(shape.bits)
    n, V = len(items), len(bits)
    kl, io, comp = (np.full((n, V), np.nan) for _ in range(3))
    imp, dev = doc["importance"], doc["device"]
    for i, (layer, s) in enumerate(items):
        table = _get(imp["head"], s) if layer == HEAD else _get(imp["layers"][layer], s)
        for j, b in enumerate(bits):
            if (layer, s, b) not in shape.shard_bytes:
                continue
            kl[i, j] = 0.0 if b >= fmt.FP32 else _get(table, b)
            io[i, j], comp[i, j] = _item_costs(dev, _kind(layer), b, shape.shard_bytes[(layer, s, b)], batch)
    return VersionCosts(items, bits, kl, io, comp, _interp_batch(dev["overhead"], batch), dev.get("contention", 0.0))


def choose(store, shape, token_latency: float, memory: int, batch: int = 1, storage: str | None = None, *,
           context: int | None = None, preload: bool = True) -> tuple[Choice, VersionCosts]:
    """The versions for ``token_latency`` seconds per decode step (see :func:`choose_versions`),
    with the chooser's prediction: ``choice.predicted_s``, ``choice.kl`` (summed importance, nats
    per token), and ``costs.versions(choice.index)`` for the plan."""
    from sti.plan_decoder import plan_decoder_shape

    doc = load_decoder_profile(store.path, storage)
    costs = version_costs(doc, shape, batch)

    def preloaded(idx) -> np.ndarray | None:
        try:
            plan = plan_decoder_shape(shape, memory, batch=batch, context=context, preload=preload,
                                      versions=costs.versions(idx))
        except STIError:
            return None
        pre = set(plan.preload)
        return np.array([it in pre for it in costs.items])

    # start from every shard lossless, or else from the largest uniform version that fits the memory
    n = len(costs.items)
    total = [sum(shape.shard_bytes.get((*it, b), 0) for it in costs.items) for b in costs.bits]
    lossless = _lossless(store)
    order = sorted(range(len(costs.bits)), key=lambda j: (costs.bits[j] != lossless, -total[j]))
    start = next((np.full(n, j) for j in order
                  if np.all(np.isfinite(costs.io_s[:, j])) and preloaded(np.full(n, j)) is not None), None)
    if start is None:  # the plan's own error names the smallest budget
        plan_decoder_shape(shape, memory, batch=batch, context=context, preload=preload,
                           versions=costs.versions(np.full(n, order[-1])))
        raise STIError(f"the memory budget {memory:,} B fits no version of the store", "raise --memory")
    return greedy_versions(costs, token_latency, preloaded, start), costs


def choose_versions(store, shape, token_latency: float, memory: int, batch: int = 1, storage: str | None = None,
                    *, context: int | None = None, preload: bool = True) -> tuple[list[dict[int, int]], dict[int, int]]:
    """Per-layer ``{shard: bits}`` and ``{head shard: bits}`` whose predicted decode step (from
    the store's decoder profile for ``storage``) is at most ``token_latency`` seconds under the
    ``memory`` budget at batch ``batch``, with the least total importance the greedy finds.
    Raises STIError when the store has no profile, or when no versions meet the target (naming
    the smallest per-token latency the profile predicts for this memory)."""
    choice, costs = choose(store, shape, token_latency, memory, batch, storage, context=context, preload=preload)
    return costs.versions(choice.index)


# ============================================================================================
# The front door
# ============================================================================================


def _reusable_importance(store_path, key: dict):
    from sti.profile import store_fingerprint

    fp = store_fingerprint(store_path)
    for f in sorted(Path(store_path).expanduser().glob("profile-decoder*.json")):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if doc.get("store_fingerprint") == fp and doc.get("importance_key") == key:
            return doc["importance"], doc.get("calibration"), f
    return None


def run_decoder_profile(store_path, storage: str | None = None, progress: bool = True, *, task: str = DEFAULT_TASK,
                        n_texts: int = DEFAULT_N_TEXTS, seq_len: int = DEFAULT_SEQ_LEN,
                        anchor_bits: int = DEFAULT_ANCHOR_BITS, checks: int = 4, repeats: int = 3,
                        reuse: bool = True) -> dict:
    """Profile a decoder store (importance on ``task``'s calibration text + this device, or an
    emulated ``storage``), save ``STORE/profile-decoder[-<storage>].json`` and ``STORE/kernels.json``
    and return a JSON-able summary (:func:`format_summary` prints it as a table). With ``reuse``,
    an importance already measured for this store and calibration is reused, so profiling another
    emulated storage takes only the device part."""
    from sti import __version__, lowbit
    from sti.profile import storage_key, store_fingerprint
    from sti.store import Store

    storage_key(storage)  # refuse a bad spec before any work
    t0 = time.perf_counter()
    with Store.open(store_path) as store:
        if store.family != "llama":
            raise STIError(f"{store.path} holds a {store.family} model, not a decoder",
                           "profile it with sti profile (the encoder profile) or pack a LLaMA-family model")
        key = {"task": task, "n_texts": int(n_texts), "seq_len": int(seq_len), "anchor_bits": int(anchor_bits),
               "bits": list(store.bits), "method_version": IMPORTANCE_METHOD}
        found = _reusable_importance(store.path, key) if reuse else None
        if found is not None:
            imp, calib, f = found
            _say(progress, f"reusing the importance profile of {f.name}")
        else:
            ids, calib = calibration_ids(store, task, n_texts, seq_len)
            _say(progress, f"profiling shard importance on {calib['n_texts']} x {calib['seq_len']} tokens of "
                           f"{task} calibration text ...")
            imp = profile_importance(store, ids, anchor_bits=anchor_bits, checks=checks, progress=progress)
        t_imp = time.perf_counter() - t0
        device, kjson = profile_device(store, storage, repeats=repeats, progress=progress)
        t_dev = time.perf_counter() - t0 - t_imp
        lowbit.save_profile(kjson, store.path / KERNELS_FILE)
        doc = {
            "format": PROFILE_FORMAT,
            "profile_version": PROFILE_VERSION,
            "sti_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "store_fingerprint": store_fingerprint(store.path),
            "storage": storage_key(storage),
            "model": store.manifest.source.get("model"),
            "lossless": _lossless(store),
            "calibration": calib,
            "importance_key": key,
            "importance": imp,
            "device": device,
            "seconds": {"importance": round(t_imp, 1), "device": round(t_dev, 1),
                        "total": round(time.perf_counter() - t0, 1)},
        }
        path = profile_path(store.path, storage)
        _write_json(path, doc)
    return summarize(load_decoder_profile(path.parent, storage), path)


def summarize(doc: dict, path=None) -> dict:
    """The headline numbers of a (loaded) decoder profile: per version and shard kind the bytes,
    IO and compute milliseconds of one shard and the mean importance; the overhead; the checks."""
    imp, dev = doc["importance"], doc["device"]
    versions = {}
    for b in sorted({int(k) for k in dev["io"]["layer"]}):
        row = {"label": fmt.label(b)}
        for kind in ("layer", "head"):
            io, comp = _get(dev["io"][kind], b), _get(dev["compute"][kind], b)
            if kind == "layer":
                kls = [_get(shards[s], b) for shards in imp["layers"] for s in shards] if b < fmt.FP32 else [0.0]
            else:
                kls = [_get(imp["head"][s], b) for s in imp["head"]] if b < fmt.FP32 else [0.0]
            row[kind] = {"bytes": io["bytes"], "io_ms": io["io_s"] * 1e3, "io_warm_ms": io["warm_s"] * 1e3,
                         "io_cold_ms": io["cold_s"] * 1e3,
                         **{f"compute_ms_b{k}": v * 1e3 for k, v in comp.items()},
                         "mean_kl": float(np.mean(kls)) if kls else None}
        versions[str(b)] = row
    return {
        "profile": str(path) if path is not None else None,
        "storage": doc.get("storage"),
        "io_source": dev.get("io_source"),
        "calibration": doc.get("calibration"),
        "seconds": doc.get("seconds"),
        "versions": versions,
        "overhead_ms": {k: v * 1e3 for k, v in dev["overhead"].items()},
        "contention": dev.get("contention", 0.0),
        "model_check": [{k: c[k] for k in ("run", "batch", "measured_s", "predicted_s", "predicted_over_measured")}
                        for c in dev.get("check", [])],
        "importance_check": {k: imp.get("check", {}).get(k) for k in ("ratio_geomean", "ratio_range")},
        "importance_method": imp.get("method"),
    }


def format_summary(summary: dict) -> str:
    """A short table of :func:`summarize`'s numbers, for the terminal."""
    cal, sec = summary["calibration"], summary["seconds"]
    columns = f"{'IO ms':>6} {'cmp b1':>6} {'cmp b16':>7} {'mean KL':>8}"
    lines = [f"decoder profile: {summary['profile']}",
             (f"IO: {summary['io_source']}; calibration: {cal['n_texts']} x {cal['seq_len']} tokens; took "
              f"{sec['total']:.0f} s (importance {sec['importance']:.0f} s, device {sec['device']:.0f} s)"),
             "",
             f"{'version':>8} | {'layer shard':>11} {columns} | {'head shard':>10} {columns}"]
    for row in summary["versions"].values():
        cells = []
        for kind, width in (("layer", 11), ("head", 10)):
            r = row[kind]
            cells.append(f"{r['bytes'] / 1e3:>{width - 3}.0f} KB {r['io_ms']:>6.3f} {r['compute_ms_b1']:>6.3f} "
                         f"{r['compute_ms_b16']:>7.3f} {r['mean_kl']:>8.2g}")
        lines.append(f"{row['label']:>8} | {cells[0]} | {cells[1]}")
    oh = summary["overhead_ms"]
    lines.append("")
    lines.append("overhead per decode step (attention, norms, runtime): "
                 + ", ".join(f"batch {b}: {v:.2f} ms" for b, v in oh.items()))
    lines.append(f"IO/compute contention (share of the shorter added to the longer; 0: perfect pipeline, 1: serial), "
                 f"fitted: {summary['contention']:.2f}")
    for c in summary["model_check"]:
        lines.append(f"model check, {c['run']}, batch {c['batch']}: predicted {c['predicted_s'] * 1e3:.1f} ms, "
                     f"measured {c['measured_s'] * 1e3:.1f} ms per step ({c['predicted_over_measured']:.2f}x)")
    ic = summary["importance_check"]
    if ic.get("ratio_geomean"):
        lo, hi = ic["ratio_range"]
        lines.append(f"importance estimate vs exact single-shard KL: geometric mean {ic['ratio_geomean']:.2f}x "
                     f"(range {lo:.2f}-{hi:.2f}x)")
    return "\n".join(lines)
