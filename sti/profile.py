"""Offline profiling: how much each shard matters, and how fast this device reads and computes.

``profile`` is the step between ``pack`` and ``plan``. It measures the three inputs of the
planner (``sti.plan``) and stores them beside the shard store:

* :func:`model_shape` -- bytes of one shard at each bitwidth, and the bytes the runtime keeps
  resident whatever the plan (``fixed_bytes``: globals and per-layer norms/biases, exactly as
  ``StreamingEncoder.fixed_bytes`` counts them; ``scratch_bytes``: the float32 buffer that
  dequantizes one chunk of ``chunk_shards`` shards, exactly ``StreamingEncoder.scratch_bytes``).
* :func:`profile_importance` -- ``Importance.loss[l][s][b]``: the KL divergence
  KL(p_full || p_perturbed) of the task head's class probabilities, averaged over calibration
  texts, when only shard (l, s) is changed to b bits (b = 0: dropped) and every other shard
  is fp32. For BBC News the texts are an evenly spaced subsample of the *calib* split (held out
  from the head's training data and from the test split; the test split is never read).
* :func:`profile_device` -- cold IO (per-request latency + bytes / bandwidth, fitted by least
  squares on plan-like read sequences run as the runtime runs a cold request: evict with
  ``posix_fadvise(DONTNEED)``, then the reads in stream order), the per-layer compute time of the
  runtime's own chunked layer (``sti.models.bert.streamed_layer``) fitted as
  ``c0 + c1*w*n + c2*w*n^2`` (w active shards, n tokens, one sequence; medians: the planner
  predicts the median request), the seconds per stored byte to check + dequantize a shard at
  each bitwidth (``Store.decode_shard``, called as the runtime calls it), and from the real
  runtime a per-shard overhead, the slowdown of reads while compute shares the cores, and the
  deadline margin with which the planner turns a deadline into a median bound, per request
  length: the 95th percentile of the model's error on plan-like configurations it was not
  fitted on (their medians over its predictions at that length) times the spread of requests'
  latencies over their medians (pooled over lengths, and over those configurations' requests
  and the calibration's, streamed among other engines' requests); and per length the compute
  margin, by which planners stretch compute times where that margin, measured on requests that
  mostly wait for reads, leaves the compute's own spread out (compute-only configurations'
  mean error over the length and its neighbours times the preloaded engines' spread, over the
  deadline margin). ``storage="emmc" | "ufs" |
  "<N>MBps"`` replaces the measured IO by an emulated device that the runtime reproduces with
  the same :func:`parse_storage` throttle.

How the importance is computed fast
-----------------------------------
The hidden states entering every layer are computed once for the full-precision model and
cached, with each layer's per-head attention context and its pre-LayerNorm residual sum.
Changing shard (l, s) changes head s's contribution to layer l's attention output and its slice
of layer l's FFN, so the perturbed layer is computed exactly as: residual = cached residual -
head s's cached contribution + head s's contribution under the new weights (0 when dropped),
then LayerNorm, the FFN with shard s's slice replaced (removed when dropped), LayerNorm; then
layers l+1 .. L-1 are recomputed in full. Every shard version is decoded once. The layer math
is the same as ``sti.models.bert.layer`` (same ops, 2-D matrix products over all tokens and
contiguous attention operands, which NumPy runs several times faster than the runtime's
batched views; ``tests/test_profile.py`` checks the two agree).

The additivity assumption
-------------------------
The planner predicts the loss of a whole plan as the *sum* of its shards' single-shard losses.
That is an approximation: perturbations interact (dropping two heads of one layer is not twice
one head; LayerNorm rescales). :func:`check_additivity` measures it: for random multi-shard
configurations (uniform low bitwidths, random per-shard bitwidths, random bitwidths with ~15%
dropped, a quarter of the shards of half the layers dropped) it computes the true KL of the
configuration and compares it with the sum of the single-shard KLs. Measured on MiniLM with the
default calibration (16 configurations, true KL 0.002 .. 0.30): rank correlation 0.95, Pearson
correlation of log KL 0.95, actual / predicted median 1.04, range 0.49 .. 3.7 (the worst: random
bitwidths with 9 dropped shards, predicted 0.081, actual 0.30 -- interactions add up when many
shards are degraded at once). So the sum ranks plans well, which is what the planner needs,
and is within a factor ~2 in absolute terms for plan-like configurations.

Calibration size
----------------
The cost is set by the forward passes: every (shard, version) recomputes its own layer (most
of it) and every later layer, ~3.3 layer passes on average for a 6-layer model, ~1,600 layer
passes over the calibration tokens for MiniLM (72 shards x 7 versions). On the 2-core reference
machine that is ~30-60 us per token per layer pass, so the budget is ~3,000 tokens for a
profile of a few minutes. Per-text KLs are heavy-tailed (a few texts near a decision boundary
dominate), so more texts beat longer texts: the split-half rank reliability of the
dropped-shard importance, 64 texts at 128 tokens, was 0.65 between two halves of 32 texts but
only 0.39 between halves of 16; importance at 64 tokens ranked shards like importance at 128
tokens on the same texts (rank correlation 0.86, about the split-half level). Hence the
default: 48 calib texts truncated to 64 tokens (``n_calib``, ``seq_len`` change it);
``meta["importance_info"]["split_half"]`` reports the reliability of every profile.

Profiles are JSON (``profile.json``, or ``profile-<storage>.json`` for emulated storage) in
the store directory, written atomically, with the STI version, the date, the store's manifest
fingerprint (a profile of a re-packed store is refused as stale), the task, the calibration
split and sizes, and the timings of each part.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sti import blas
from sti.errors import STIError
from sti.plan import DeviceProfile, Importance, ModelShape

# 17: compute times at the machine's median speed over a window of a minute (a probe request
# timed in bursts through the calibration and after the validation), not at the calibration's
# moment of it;
# 16: the time before the first layer (the embedding rows, which the runtime now reads before any
# shard) measured on the runtime as fixed + per token, and reads timed from its end;
# 15: each bitwidth's int8 products priced from paired requests at every int8 length, a line
# weighted by their standard errors (14 drew it through two lengths' differences of medians);
# compute margins from two compute-only plans per length, their errors averaged with the
# neighbouring lengths' (14: one plan's);
# 14: compute margins by length (a compute-only validation plan's error x the compute's spread,
# over the streamed plans' margin), which planners stretch compute times by;
# 13: deadline margins as the validation's error by length x the requests' spread, pooled over
# lengths and the calibration, the validation run in rounds over the lengths;
# 12: int8 products on two threads where there are two cores (runtime.INT8_THREADS);
# 11: each bitwidth's int8 products priced per token too (timed at two lengths); 10: cold and
# emulated reads fitted with compute per streamed byte beside the read factor, on
# reads announced to the device a batch at once; the embedding rows timed; deadline margins per
# length, validated on plan-like configurations; 9: warm streaming priced per byte apart for int8
# and dequantized shards; 8: as 7, the runtime and the IO sequences reading a layer's shards by
# one call, int8 timed back to back;
# 7: as 6, measured on a runtime whose int8 products take a layer's quantized shards in one
# call per part (13-15% faster than 6's chunks of four); 6: int8 products cost
# int8_shard[bits] + int8_per_token n, the streaming cost and tail_ratio
# (pooled over lengths) measured on the engine plans run; 5: int8_shard + (c1 + int8_delta) n;
# 4, 3: a slope only; 2: medians and tail_ratio; 1: best-of
PROFILE_VERSION = 17
PROFILE_FILE = "profile.json"
# the validation's plan that reads nothing: its error and its requests' spread are the compute's
COMPUTE_PLAN = "random, all preloaded"
# seconds over which the device profile samples the machine's speed (see _SpeedProbe): on a
# shared 2-vCPU VM the same request's median over 10 s ranged 4.4-8.1 ms within 7 minutes, over
# 60 s 4.6-5.9 ms, over 120 s 4.7-5.0 ms (MiniLM, every shard preloaded at 4 bits, 32 tokens)
DEFAULT_SPEED_WINDOW_S = 60.0
DEFAULT_TASK = "bbc-news"
DEFAULT_N_CALIB = 48
DEFAULT_SEQ_LEN = 64
FP32 = 32
DROP = 0

# Emulated storage devices: key -> (bandwidth B/s, latency s per read request, label).
STORAGE_PRESETS = {
    "emmc": (200e6, 0.5e-3, "emulated eMMC (200 MB/s, 0.5 ms per read)"),
    "ufs": (1e9, 0.1e-3, "emulated UFS (1 GB/s, 0.1 ms per read)"),
}
WARM = "warm"  # the real storage with the store in the page cache (a server that keeps it warm)
_STORAGE_FORMS = "'emmc' (200 MB/s, 0.5 ms per read), 'ufs' (1 GB/s, 0.1 ms), '<N>MBps' (N MB/s, e.g. 50MBps), " \
                 "'<N>MBps:<L>ms' (with L ms per read), 'warm' (the real storage, the store in the page cache), " \
                 "or 'real' / none for the real storage read cold"
_CUSTOM = re.compile(r"^(\d+(?:\.\d+)?)\s*mb(?:ps|/s)(?:\s*[:@,]\s*(\d+(?:\.\d+)?)\s*ms)?$", re.IGNORECASE)

_ATTN = ("wq", "bq", "wk", "bk", "wv", "bv", "wo_t")
_FFN = ("w_up", "b_up", "w_down_t")


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _open(store):
    from sti.store.reader import Store

    if isinstance(store, Store):
        return store, False
    return Store.open(store), True


def _bert_only(store) -> None:
    if store.family != "bert":
        raise STIError(f"profiling {store.family} stores is not supported yet",
                       "profile a BERT-family store such as one packed from minilm")


# ============================================================================================
# Storage emulation
# ============================================================================================


def storage_key(storage: str | None) -> str | None:
    """The canonical name of a storage spec (None for the real storage); raises like parse_storage."""
    if storage is None:
        return None
    s = str(storage).strip()
    low = s.lower()
    if low in ("", "real", "none"):
        return None
    if low in STORAGE_PRESETS:
        return low
    if low in (WARM, "page-cache", "pagecache"):
        return WARM
    m = _CUSTOM.match(s)
    if m and float(m.group(1)) > 0:
        mb = float(m.group(1))
        key = f"{mb:g}MBps"
        if m.group(2) is not None:
            key += f"-{float(m.group(2)):g}ms"
        return key
    raise STIError(f"unknown storage {storage!r}", f"use one of: {_STORAGE_FORMS}")


def parse_storage(storage: str | None):
    """A storage spec -> the ``sti.runtime.Throttle`` that emulates it, or None for the real
    storage. Accepted: ``emmc``, ``ufs``, ``<N>MBps`` and ``<N>MBps:<L>ms`` (megabytes per
    second, optional milliseconds per read), ``warm`` (the real storage with the store in the
    page cache: no throttle), ``real`` / None. Anything else is an STIError that lists these
    forms. The profile and the runtime use the same throttle, so a plan made for an emulated
    profile is run under the same emulation."""
    from sti.runtime import Throttle

    key = storage_key(storage)
    if key is None or key == WARM:
        return None
    if key in STORAGE_PRESETS:
        bw, lat, label = STORAGE_PRESETS[key]
        return Throttle(bw, lat, label)
    m = _CUSTOM.match(str(storage).strip())
    bw = float(m.group(1)) * 1e6
    lat = float(m.group(2)) * 1e-3 if m.group(2) is not None else 0.0
    label = f"emulated {float(m.group(1)):g} MB/s" + (f", {lat * 1e3:g} ms per read" if lat else "")
    return Throttle(bw, lat, label)


# ============================================================================================
# Model shape (the planner's memory model = the runtime's accounting)
# ============================================================================================


def model_shape(store, chunk_shards: int = 4, input_tokens: int = 0, int8_max_tokens: int = 0) -> ModelShape:
    """The planner's ``ModelShape`` of a store, with the runtime's memory accounting: that of an
    engine (``StreamingEncoder``) for inputs of up to ``input_tokens`` tokens (0: the model's
    positions) whose schedule runs int8 products up to ``int8_max_tokens`` (the device profile's).

    ``shard_bytes[b]``: bytes of one stored shard version at b bits (the 4096-aligned length the
    runtime reads and holds; the largest over shards, which are all the same size for BERT).
    ``fixed_bytes``: ``StreamingEncoder.fixed_bytes`` (globals but the word-embedding table, the
    position rows such inputs use, every layer's unsharded norms/biases) plus, when
    ``input_tokens`` > 0, the word-embedding rows the runtime holds for an input of that many
    tokens (``tokens * hidden * 4``). ``scratch_bytes``: ``StreamingEncoder.scratch_bytes`` for
    ``chunk_shards`` (a chunk's part decoded, or only biases where every such input runs int8
    products on quantized shards: the planner offers no float32 version there)."""
    from sti.runtime import Schedule, StreamingEncoder

    store, opened = _open(store)
    try:
        _bert_only(store)
        if chunk_shards < 1:
            raise STIError(f"chunk_shards must be >= 1, got {chunk_shards}", "pass a positive number of shards")
        L = store.num_layers
        S = {len(store.shard_indices(layer)) for layer in range(L)}
        if len(S) != 1:
            raise STIError(f"the store's layers have different numbers of shards ({sorted(S)})",
                           "the planner needs the same shards per layer; re-pack the model")
        shard_bytes = {}
        for b in store.bits:
            shard_bytes[b] = max(store.shard_nbytes(layer, s, b)
                                 for layer in range(L) for s in store.shard_indices(layer))
        # The runtime's own accounting, from an engine with an empty schedule (reads only globals).
        enc = StreamingEncoder(store, Schedule([{} for _ in range(L)], chunk_shards=chunk_shards,
                                               int8_max_tokens=int8_max_tokens), max_tokens=input_tokens or None)
        fixed = int(enc.fixed_bytes) + int(input_tokens) * store.config.hidden_size * 4
        return ModelShape(num_layers=L, shards_per_layer=S.pop(), shard_bytes=shard_bytes,
                          fixed_bytes=fixed, scratch_bytes=int(enc.scratch_bytes))
    finally:
        if opened:
            store.close()


# ============================================================================================
# The layer math, fast (same ops as sti.models.bert.layer)
# ============================================================================================


def _prep_layer(common: Mapping[str, np.ndarray], shards: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Decoded shards (in shard index order) + the layer's unsharded tensors -> the fast layout:
    wqkv (H, 3A) = [Q heads | K heads | V heads], wo (A, H), up (H, F), down (F, H)."""
    H = common["ln1_w"].shape[0]
    cat = lambda name, tail: (np.concatenate([d[name] for d in shards]) if shards  # noqa: E731
                              else np.zeros((0,) + tail, np.float32))
    wq, wk, wv = (cat(n, (H,)) for n in ("wq", "wk", "wv"))
    bq, bk, bv = (cat(n, ()) for n in ("bq", "bk", "bv"))
    return {
        "wqkv": np.ascontiguousarray(np.concatenate([wq, wk, wv]).T), "bqkv": np.concatenate([bq, bk, bv]),
        "wo": cat("wo_t", (H,)), "up": np.ascontiguousarray(cat("w_up", (H,)).T), "b_up": cat("b_up", ()),
        "down": cat("w_down_t", (H,)), **{k: common[k] for k in ("bo", "b_down", "ln1_w", "ln1_b", "ln2_w", "ln2_b")},
    }


def _attention(cfg, x2, B, T, bias, wqkv, bqkv):
    """Per-head attention context (B*T, A) of the heads in wqkv (H, 3A)."""
    hd = cfg.head_dim
    A = wqkv.shape[1] // 3
    nh = A // hd
    qkv = x2 @ wqkv
    qkv += bqkv
    qkv = qkv.reshape(B, T, 3, nh, hd)
    q = np.ascontiguousarray(qkv[:, :, 0].transpose(0, 2, 1, 3))  # (B, nh, T, hd)
    k = np.ascontiguousarray(qkv[:, :, 1].transpose(0, 2, 3, 1))  # (B, nh, hd, T)
    v = np.ascontiguousarray(qkv[:, :, 2].transpose(0, 2, 1, 3))  # (B, nh, T, hd)
    scores = q @ k
    scores *= np.float32(1.0 / np.sqrt(hd))
    if bias is not None:
        scores += bias
    # sti.ops.softmax, in place (the scores are the largest array of the profile)
    scores -= scores.max(-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(-1, keepdims=True)
    return (scores @ v).transpose(0, 2, 1, 3).reshape(B * T, A)  # (B*T, nh*hd)


def _finish(cfg, r, P, up, b_up, down):
    """Pre-LN1 residual sum r (N, H) -> the layer's output (N, H): LN, FFN, residual, LN."""
    from sti.ops import gelu_, layer_norm

    x1 = layer_norm(r, P["ln1_w"], P["ln1_b"], cfg.layer_norm_eps)
    if up.shape[1]:
        h = x1 @ up
        h += b_up
        f = gelu_(h) @ down
        f += P["b_down"]
    else:
        f = np.broadcast_to(P["b_down"], x1.shape)
    return layer_norm(x1 + f, P["ln2_w"], P["ln2_b"], cfg.layer_norm_eps)


def _layer(cfg, x2, B, T, bias, P, cache: dict | None = None):
    """One layer on flattened states x2 (B*T, H); optionally caches the attention context and
    the pre-LN1 residual sum (what a single-shard perturbation of this layer needs)."""
    if P["wqkv"].shape[1]:
        ctx = _attention(cfg, x2, B, T, bias, P["wqkv"], P["bqkv"])
        r = ctx @ P["wo"]
        r += x2
    else:
        ctx, r = None, x2.copy()
    r += P["bo"]
    if cache is not None:
        cache["ctx"], cache["r"] = ctx, r
    return _finish(cfg, r, P, P["up"], P["b_up"], P["down"])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class _Calib:
    """Calibration inputs (right-padded, as tokenizers pad) in batches, with the full model's
    cached states per batch."""

    def __init__(self, store, ids, mask, head_W, head_b, labels, batch):
        from sti.models import bert

        self.cfg = cfg = store.config
        ids, mask = np.asarray(ids), np.asarray(mask)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] == 0:
            raise STIError(f"calibration ids and mask must be equal (N, T) arrays with N >= 1, got "
                           f"{ids.shape} and {mask.shape}", "tokenize the calibration texts first")
        if ids.shape[1] > cfg.max_position:
            raise STIError(f"calibration inputs have {ids.shape[1]} tokens; the model takes at most "
                           f"{cfg.max_position}", "truncate them")
        self.W = np.asarray(head_W, np.float32)
        self.b = np.asarray(head_b, np.float32)
        if self.W.ndim != 2 or self.W.shape[1] != cfg.hidden_size or self.b.shape != (self.W.shape[0],):
            raise STIError(f"the head must be W (C, {cfg.hidden_size}) and b (C,), got {self.W.shape} and "
                           f"{self.b.shape}", "use a head trained on this model's embeddings")
        self.labels = None if labels is None else np.asarray(labels)
        self.N = ids.shape[0]
        g = store.globals()
        order = np.argsort(mask.sum(1), kind="stable")  # batch similar lengths together
        batch = -(-self.N // -(-self.N // max(1, batch)))  # equal batches of at most ``batch``
        self.batches = []
        for i in range(0, self.N, batch):
            sel = order[i:i + batch]
            m = mask[sel]
            T = max(int(m.sum(1).max()), 1)
            bi, bm = ids[sel][:, :T], m[:, :T]
            bias = None if bm.all() else bert.attention_bias(bm)
            x = bert.embed(cfg, g, bi).reshape(len(sel) * T, cfg.hidden_size)
            self.batches.append({"sel": sel, "B": len(sel), "T": T, "mask": bm, "bias": bias, "h": [x], "cache": []})

    def logp(self, bt, out2):
        from sti.models import bert

        pooled = bert.mean_pool(out2.reshape(bt["B"], bt["T"], -1), bt["mask"])
        return _log_softmax(pooled @ self.W.T + self.b)

    def forward_full(self, P_layers):
        for bt in self.batches:
            h = bt["h"][0]
            bt["h"], bt["cache"] = [h], []
            for P in P_layers:
                c = {}
                h = _layer(self.cfg, h, bt["B"], bt["T"], bt["bias"], P, c)
                bt["h"].append(h)
                bt["cache"].append(c)
            bt["logp"] = self.logp(bt, h)

    def score(self, outs: list, per_text: np.ndarray | None = None) -> tuple[float, int]:
        """Per-batch log-probabilities of a perturbed model -> (mean KL(full || perturbed), correct);
        fills ``per_text`` (N,) with each text's KL when given."""
        kl, correct = 0.0, 0
        for bt, lq in zip(self.batches, outs):
            lp = bt["logp"]
            k = (np.exp(lp) * (lp - lq)).sum(-1)
            kl += float(k.sum())
            if per_text is not None:
                per_text[bt["sel"]] = k
            if self.labels is not None:
                correct += int((lq.argmax(-1) == self.labels[bt["sel"]]).sum())
        return max(kl / self.N, 0.0), correct

    def run(self, P_layers, start: int = 0, first=None) -> list:
        """Per-batch log-probabilities of layers P_layers[start:]; ``first(i, batch)`` (optional) gives
        layer ``start``'s output instead of computing it."""
        outs = []
        for i, bt in enumerate(self.batches):
            if first is not None:
                h, begin = first(i, bt), start + 1
            else:
                h, begin = bt["h"][start], start
            for P in P_layers[begin:]:
                h = _layer(self.cfg, h, bt["B"], bt["T"], bt["bias"], P)
            outs.append(self.logp(bt, h))
        return outs


def _versions(store, layer: int, bits) -> dict[int, dict[int, dict]]:
    """{shard: {bits: decoded tensors}} of one layer (each version read, checked and decoded once)."""
    names = _ATTN + _FFN
    out = {}
    for s in store.shard_indices(layer):
        out[s] = {}
        for b in (FP32, *bits):
            raw = store.read_shard_bytes(layer, s, b)
            dec = store.decode_shard(layer, s, b, raw, verify=True, names=names)
            out[s][b] = {k: np.array(v, np.float32, copy=True) for k, v in dec.items()}
    return out


def _check_bits(store, bits) -> tuple[int, ...]:
    stored = tuple(b for b in store.bits if b != FP32)
    if bits is None:
        return stored
    bits = tuple(sorted({int(b) for b in bits}))
    missing = [b for b in bits if b not in stored]
    if missing:
        raise STIError(f"the store has no {missing}-bit versions (stored: {list(store.bits)})",
                       "profile the stored bitwidths, or re-pack with them")
    return bits


def shard_importance(store, ids, mask, head_W, head_b, *, bits=None, labels=None, batch: int = 16,
                     progress: bool = False, additivity_checks: int = 0, seed: int = 0, keep_per_text: bool = False):
    """Single-shard KL importance of every shard of a BERT store on calibration inputs.

    ``ids``, ``mask`` (N, T): tokenized calibration texts; ``head_W`` (C, H), ``head_b`` (C,): a
    linear head on the L2-normalised mean-pooled embedding (the ``sti.heads`` recipe); ``bits``:
    the bitwidths to profile (default: every stored k-bit version); ``labels`` (N,) optional class
    ids for accuracies. Returns ``(Importance, info)``: ``Importance.loss[l][s][b]`` is the mean
    over texts of KL(p_full || p) in nats with only shard (l, s) at b bits (0: dropped), made
    non-increasing in b (a measured value below a higher bitwidth's -- noise among tiny values --
    is raised to it; ``info["kl_raw"]`` keeps the measured ones). ``info`` also has
    ``full_accuracy`` / ``accuracy`` [l][s][b] when ``labels`` are given, timings and, with
    ``additivity_checks`` > 0, :func:`check_additivity`'s result."""
    store, opened = _open(store)
    try:
        _bert_only(store)
        bits = _check_bits(store, bits)
        load0 = _loadavg()
        t0 = time.perf_counter()
        cal = _Calib(store, ids, mask, head_W, head_b, labels, batch)
        cfg, L = store.config, store.num_layers
        commons = [store.layer_common(layer) for layer in range(L)]
        # Full-precision layers, then the cached full forward pass.
        full_dec = [{s: store.read_shard(layer, s, FP32) for s in store.shard_indices(layer)} for layer in range(L)]
        P_full = [_prep_layer(commons[layer], [full_dec[layer][s] for s in sorted(full_dec[layer])])
                  for layer in range(L)]
        del full_dec
        cal.forward_full(P_full)
        t_cache = time.perf_counter() - t0
        full_correct = None
        if labels is not None:
            full_correct = sum(int((bt["logp"].argmax(-1) == cal.labels[bt["sel"]]).sum()) for bt in cal.batches)
        versions = (DROP, *bits)
        kl_rows, acc_rows, per_text = [], [], []
        pairs = [(layer, s) for layer in range(L) for s in store.shard_indices(layer)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), desc="importance", unit="shard", file=sys.stderr)
        for layer in range(L):
            P = P_full[layer]
            idx = store.shard_indices(layer)
            dec = _versions(store, layer, bits)
            row_kl, row_acc = [], []
            # offsets of each shard's head columns and FFN neurons in the layer (index order)
            a_off, f_off, a, f = {}, {}, 0, 0
            for s in sorted(idx):
                a_off[s], f_off[s] = a, f
                a += dec[s][FP32]["wq"].shape[0]
                f += dec[s][FP32]["w_up"].shape[0]
            for s in idx:
                asl = slice(a_off[s], a_off[s] + dec[s][FP32]["wq"].shape[0])
                fsl = slice(f_off[s], f_off[s] + dec[s][FP32]["w_up"].shape[0])
                keep = np.r_[0:fsl.start, fsl.stop:P["up"].shape[1]]
                # head s's cached contribution to the attention output, per batch
                old = [bt["cache"][layer]["ctx"][:, asl] @ P["wo"][asl] for bt in cal.batches]
                s_kl, s_acc = [], []
                for b in versions:
                    if b == DROP:
                        up, b_up, down = np.ascontiguousarray(P["up"][:, keep]), P["b_up"][keep], P["down"][keep]
                        new_w = None
                    else:
                        d = dec[s][b]
                        up = P["up"].copy()
                        up[:, fsl] = d["w_up"].T
                        b_up = P["b_up"].copy()
                        b_up[fsl] = d["b_up"]
                        down = P["down"].copy()
                        down[fsl] = d["w_down_t"]
                        new_w = (np.ascontiguousarray(np.concatenate([d["wq"], d["wk"], d["wv"]]).T),
                                 np.concatenate([d["bq"], d["bk"], d["bv"]]), d["wo_t"])
                    def first(i, bt, new_w=new_w, up=up, b_up=b_up, down=down, old=old):
                        r = bt["cache"][layer]["r"] - old[i]
                        if new_w is not None:
                            x2 = bt["h"][layer]
                            r += _attention(cfg, x2, bt["B"], bt["T"], bt["bias"], new_w[0], new_w[1]) @ new_w[2]
                        return _finish(cfg, r, P, up, b_up, down)

                    per = np.empty(cal.N)
                    v, c = cal.score(cal.run(P_full, layer, first), per)
                    per_text.append(per)
                    s_kl.append(v)
                    s_acc.append(c)
                row_kl.append(s_kl)
                row_acc.append(s_acc)
                if bar is not None:
                    bar.update(1)
            kl_rows.append(row_kl)
            acc_rows.append(row_acc)
            del dec
        if bar is not None:
            bar.close()
        t_shards = time.perf_counter() - t0 - t_cache
        kl = np.asarray(kl_rows, np.float64)  # (L, S, V)
        mono = kl.copy()
        for j in range(len(versions) - 2, -1, -1):  # non-increasing in bits: loss[b] >= loss[b'] for b < b'
            mono[..., j] = np.maximum(mono[..., j], mono[..., j + 1])
        raised = int((mono > kl).sum())
        imp = Importance([[{b: float(mono[layer, s, j]) for j, b in enumerate(versions)}
                           for s in range(kl.shape[1])] for layer in range(L)])
        info = {
            "unit": "KL(p_full || p_perturbed) in nats, mean over calibration texts",
            "versions": list(versions),
            "kl_raw": kl.tolist(),
            "monotone_raised": raised,
            "n_texts": int(cal.N),
            "tokens": int(np.asarray(mask).sum()),
            "seconds": {"cache": round(t_cache, 3), "shards": round(t_shards, 3)},
        }
        per_text = np.asarray(per_text).reshape(kl.shape + (cal.N,))
        info["split_half"] = _split_half(per_text, versions)
        if keep_per_text:
            info["kl_per_text"] = per_text
        if labels is not None:
            acc = np.asarray(acc_rows, np.float64) / cal.N
            info["full_accuracy"] = full_correct / cal.N
            info["accuracy"] = acc.round(6).tolist()
            info["accuracy_vs_kl"] = _acc_vs_kl(kl, acc, full_correct / cal.N)
        if additivity_checks:
            t1 = time.perf_counter()
            info["additivity"] = _additivity(store, cal, commons, P_full, kl, versions, additivity_checks, seed)
            info["seconds"]["additivity"] = round(time.perf_counter() - t1, 3)
        info["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        info["load_average_before_after"] = [load0, _loadavg()]
        return imp, info
    finally:
        if opened:
            store.close()


def _acc_vs_kl(kl, acc, full) -> dict:
    """How accuracy on the calibration texts falls with single-shard KL (binned by KL)."""
    k, a = kl.reshape(-1), acc.reshape(-1)
    edges = [0, 1e-4, 1e-3, 1e-2, 1e-1, math.inf]
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (k >= lo) & (k < hi)
        if sel.any():
            bins.append({"kl_from": lo, "kl_to": hi if math.isfinite(hi) else None, "perturbations": int(sel.sum()),
                         "mean_accuracy": float(a[sel].mean()), "min_accuracy": float(a[sel].min())})
    return {"full_accuracy": float(full), "bins": bins}


def _split_half(per_text: np.ndarray, versions) -> dict | None:
    """Reliability of the importance estimate: rank correlation, over shards, of the mean KL on
    two halves of the calibration texts (alternate texts), per version."""
    N = per_text.shape[-1]
    if N < 4:
        return None
    a, b = per_text[..., 0::2].mean(-1), per_text[..., 1::2].mean(-1)
    lab = lambda v: "dropped" if v == DROP else f"{v}-bit"  # noqa: E731
    out = {lab(v): _spearman(a[..., j].ravel(), b[..., j].ravel()) for j, v in enumerate(versions)}
    pos = (a > 0) & (b > 0)
    out["all_versions_log_pearson"] = _pearson(np.log(a[pos]), np.log(b[pos])) if pos.sum() >= 3 else None
    return out


def _pearson(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x, y) -> float | None:
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable")  # noqa: E731
    return _pearson(rank(np.asarray(x)), rank(np.asarray(y)))


def _random_configs(L, S, bits, n, rng) -> list[tuple[str, list[list[int]]]]:
    """Plan-like multi-shard configurations (bits matrices, 0 = dropped, 32 = fp32)."""
    out = []
    kinds = ["uniform", "mixed", "narrow", "mixed-drop"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "uniform":  # every shard at one low bitwidth
            b = int(bits[min(i // len(kinds), len(bits) - 1)])
            m = [[b] * S for _ in range(L)]
        elif kind == "mixed":  # random bitwidth per shard
            m = [[int(rng.choice([*bits, FP32])) for _ in range(S)] for _ in range(L)]
        elif kind == "narrow":  # drop a few shards of a few layers, the rest fp32
            m = [[FP32] * S for _ in range(L)]
            for layer in rng.choice(L, size=max(1, L // 2), replace=False):
                for s in rng.choice(S, size=max(1, S // 4), replace=False):
                    m[layer][s] = DROP
        else:  # random bitwidths and ~15% dropped
            m = [[DROP if rng.random() < 0.15 else int(rng.choice([*bits, FP32])) for _ in range(S)] for _ in range(L)]
        out.append((kind, m))
    return out


def _additivity(store, cal, commons, P_full, kl, versions, n, seed) -> dict:
    rng = np.random.default_rng(seed)
    L = store.num_layers
    S = len(store.shard_indices(0))
    col = {b: j for j, b in enumerate(versions)}
    rows = []
    for kind, m in _random_configs(L, S, [b for b in versions if b != DROP], n, rng):
        P_layers = []
        for layer in range(L):
            idx = store.shard_indices(layer)
            act = {s: m[layer][j] for j, s in enumerate(idx) if m[layer][j] != DROP}
            if all(v == FP32 for v in act.values()) and len(act) == len(idx):
                P_layers.append(P_full[layer])
                continue
            dec = [store.read_shard(layer, s, b) for s, b in sorted(act.items())]
            P_layers.append(_prep_layer(commons[layer], dec))
        actual, correct = cal.score(cal.run(P_layers, 0))
        pred = float(sum(kl[layer, j, col[b]] for layer in range(L) for j, b in enumerate(m[layer]) if b != FP32))
        rec = {"kind": kind, "predicted_kl": pred, "actual_kl": actual,
               "dropped": sum(b == DROP for r in m for b in r),
               "mean_bits_active": float(np.mean([b for r in m for b in r if b != DROP] or [0]))}
        if cal.labels is not None:
            rec["accuracy"] = correct / cal.N
        rows.append(rec)
    pred = np.array([r["predicted_kl"] for r in rows])
    act = np.array([r["actual_kl"] for r in rows])
    pos = (pred > 0) & (act > 0)
    out = {
        "configs": rows,
        "spearman": _spearman(pred, act),
        "pearson": _pearson(pred, act),
        "pearson_log": _pearson(np.log(pred[pos]), np.log(act[pos])) if pos.sum() >= 3 else None,
        "ratio_actual_over_predicted": {
            "median": float(np.median(act[pos] / pred[pos])) if pos.any() else None,
            "min": float((act[pos] / pred[pos]).min()) if pos.any() else None,
            "max": float((act[pos] / pred[pos]).max()) if pos.any() else None,
        },
    }
    return out


def check_additivity(store, ids, mask, head_W, head_b, n: int = 8, **kw) -> dict:
    """Measure the planner's additivity assumption: true KL of random multi-shard configurations
    against the sum of their single-shard KLs (runs the single-shard profile first)."""
    _, info = shard_importance(store, ids, mask, head_W, head_b, additivity_checks=n, **kw)
    return info["additivity"]


# --------------------------------------------------------------------------------------------
# The BBC News task
# --------------------------------------------------------------------------------------------


def _tokenize(store, texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> ids, mask (N, T<=seq_len), truncated as ``sti.api.Encoder.tokenize`` truncates
    (keeping the closing [SEP])."""
    tok = store.tokenizer()
    rows = []
    for e in tok.encode_batch(list(texts)):
        ids = e.ids
        if len(ids) > seq_len:
            ids = ids[: seq_len - 1] + ids[-1:]
        rows.append(ids)
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), store.config.pad_token_id, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def calibration_set(store, task: str = DEFAULT_TASK, n_calib: int = DEFAULT_N_CALIB,
                    seq_len: int = DEFAULT_SEQ_LEN):
    """(ids, mask, labels, head, description) of a task's calibration texts -- never test texts."""
    if task != "bbc-news":
        raise STIError(f"unknown task {task!r}", "use --task bbc-news")
    from sti.heads import load_head
    from sti.tasks import bbc

    cfg = store.config
    head = load_head(task)
    if head.dim != cfg.hidden_size:
        raise STIError(f"the {task} head takes {head.dim}-dimensional embeddings; this store's model has "
                       f"hidden size {cfg.hidden_size}",
                       f"profile a store of the model the head was trained on ({head.record.get('model', 'minilm')})")
    if not 2 <= seq_len <= cfg.max_position:
        raise STIError(f"seq_len must be in 2..{cfg.max_position}, got {seq_len}", "pass a smaller --seq-len")
    arts, split = bbc.load_split()
    idx = bbc.subsample(split["calib"], n_calib)
    assert not set(idx.tolist()) & set(split["test"].tolist())
    ids, mask = _tokenize(store, [arts.texts[i] for i in idx], seq_len)
    labels = arts.y[idx]
    desc = {
        "task": task,
        "split": f"calib split of sti.tasks.bbc (seed {bbc.SEED}; {bbc.CALIB_FRACTION:.0%} per topic, disjoint "
                 f"from train and test), evenly spaced subsample",
        "calib_split_size": int(len(split["calib"])),
        "n_texts": int(len(idx)),
        "per_label": {arts.labels[c]: int((labels == c).sum()) for c in range(len(arts.labels))},
        "seq_len": int(seq_len),
        "tokens": int(mask.sum()),
        "head": task,
    }
    return ids, mask, labels, head, desc


def _profile_importance(store, task=DEFAULT_TASK, n_calib=DEFAULT_N_CALIB, seq_len=DEFAULT_SEQ_LEN, bits=None,
                        progress=True, additivity_checks=0):
    ids, mask, labels, head, desc = calibration_set(store, task, n_calib, seq_len)
    imp, info = shard_importance(store, ids, mask, head.W, head.b, bits=bits, labels=labels, progress=progress,
                                 additivity_checks=additivity_checks)
    info["calibration"] = desc
    return imp, info


def profile_importance(store, task: str = DEFAULT_TASK, n_calib: int = DEFAULT_N_CALIB,
                       seq_len: int = DEFAULT_SEQ_LEN, bits=None, progress: bool = True) -> Importance:
    """Importance of every shard of ``store`` for ``task`` (KL of the task head's class
    probabilities on ``n_calib`` calibration texts truncated to ``seq_len`` tokens), see
    :func:`shard_importance`."""
    store, opened = _open(store)
    try:
        return _profile_importance(store, task, n_calib, seq_len, bits, progress)[0]
    finally:
        if opened:
            store.close()


# ============================================================================================
# Device profile
# ============================================================================================


def _nnls_rel(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of *relative* errors: min sum ((X c - y) / y)^2, c >= 0
    (exhaustive over active sets; X has few columns)."""
    Xw, yw = X / y[:, None], np.ones_like(y)
    k = X.shape[1]
    best, best_res = np.zeros(k), float(np.sum(yw ** 2))
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        c, *_ = np.linalg.lstsq(Xw[:, cols], yw, rcond=None)
        if (c < 0).any():
            continue
        full = np.zeros(k)
        full[cols] = c
        res = float(np.sum((Xw @ full - yw) ** 2))
        if res < best_res:
            best, best_res = full, res
    return best


def _fit_report(X, y, c) -> dict:
    pred = X @ c
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    rel = np.abs(pred - y) / y
    return {"r2": 1 - ss_res / ss_tot if ss_tot > 0 else None, "max_rel_error": float(rel.max()),
            "median_rel_error": float(np.median(rel))}


def _fsync_store(store) -> None:
    """Write back the store's data files so that DONTNEED can drop their pages (dirty pages of a
    freshly packed store are not dropped)."""
    for name in store.manifest.files:
        try:
            fd = os.open(store.path / name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _stream_reads(store, plan, warm: bool = False) -> tuple[float, int, int]:
    """Evict (``warm``: read once untimed instead), then read ``plan`` [(layer, shard, bits)] in
    order as the runtime's IO worker does: a layer's shards by one call (``Store.read_many``),
    into read buffers used before, each shard checked against its checksum when cold (a warm
    engine checked them on its first reads): (seconds, bytes, shards read)."""
    pool: dict[int, list[bytearray]] = {}  # per size, as many buffers as one layer needs

    def buffers(group):
        out, used = [], {}
        for r in group:
            n = store.shard_nbytes(*r)
            k = used[n] = used.get(n, -1) + 1
            if len(have := pool.setdefault(n, [])) <= k:
                have.append(bytearray(n))
            out.append(have[k])
        return out

    groups = [list(g) for _, g in itertools.groupby(plan, key=lambda r: r[0])]
    bufs = [buffers(g) for g in groups]
    if warm:
        for g, b in zip(groups, bufs):
            store.read_many(g, b, verify=True)
    else:
        store.evict()
    t0 = time.perf_counter()
    for g, b in zip(groups, bufs):
        store.read_many(g, b, verify=not warm)
    return time.perf_counter() - t0, sum(store.shard_nbytes(*r) for r in plan), len(plan)


def _io_plans(store, rng) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """Plan-like read sequences in the runtime's stream order (layer-major, shard ascending):
    uniform at each of four bitwidths, uniform with ~20% of shards upgraded, and random
    bitwidths with 0, 25 and 50% of shards dropped."""
    L = store.num_layers
    pairs = [(layer, s) for layer in range(L) for s in store.shard_indices(layer)]
    kbits = [b for b in store.bits if b != FP32]
    uni = [b for b in (FP32, 8, 4, 2) if b in store.bits] or list(store.bits)
    out = [(f"uniform {b}", [(layer, s, b) for layer, s in pairs]) for b in uni]
    for lo, hi in ((4, 8), (3, FP32)):
        if lo in store.bits and hi in store.bits:
            out.append((f"{lo}-bit + 20% {hi}", [(layer, s, hi if rng.random() < 0.2 else lo) for layer, s in pairs]))
    for p_drop in (0.0, 0.25, 0.5):
        out.append((f"random bits, {p_drop:.0%} dropped",
                    [(layer, s, int(rng.choice(kbits or store.bits))) for layer, s in pairs if rng.random() >= p_drop]))
    return [(k, p) for k, p in out if p]


def _measure_io(store, rng, reads_per_bits: int = 24, repeats: int = 2, warm: bool = False) -> dict:
    """Cold IO in the runtime's access pattern: ``StreamingEncoder(cold=True)`` evicts the store
    from the page cache, then its IO worker reads the plan's shards one request each in stream
    order (``warm``: the same reads from the page cache, as a server that keeps the store warm sees them). Each plan-like sequence of :func:`_io_plans` is run that way (``repeats`` times,
    median), and ``seconds = reads * io_latency + bytes / io_bandwidth`` is fitted over the
    sequences (non-negative least squares of relative errors); each sequence's predicted /
    actual is kept. The pattern matters: the kernel's read-ahead makes a uniform plan (every
    read follows the previous one in the same file) much faster than a mixed one (reads hop
    between the bitwidth files and read-ahead fetches bytes never used), and one linear model
    is a compromise between them -- see ``by_sequence``. Also measured, for reference: isolated
    reads (one shard version per eviction, four sizes), where read-ahead cannot help."""
    _fsync_store(store)
    L = store.num_layers
    pairs = [(layer, s) for layer in range(L) for s in store.shard_indices(layer)]
    seqs = []
    for name, plan in _io_plans(store, rng):
        runs = [_stream_reads(store, plan, warm) for _ in range(repeats)]
        seqs.append({"plan": name, "seconds": float(np.median([r[0] for r in runs])), "bytes": runs[0][1],
                     "reads": runs[0][2]})
    X = np.array([[q["reads"], q["bytes"]] for q in seqs], float)
    y = np.array([q["seconds"] for q in seqs])
    c = _nnls_rel(X, y)
    if c[1] <= 0:
        c = np.array([0.0, float(y.sum() / X[:, 1].sum())])
    for q, pred in zip(seqs, X @ c):
        q["MBps"] = round(q["bytes"] / q["seconds"] / 1e6, 1)
        q["predicted_over_actual"] = round(float(pred / q["seconds"]), 3)
    # isolated reads, for reference
    bits = [b for b in (FP32, 8, 4, 2) if b in store.bits] or list(store.bits)
    jobs = [(*pairs[j], b) for b in bits for j in rng.choice(len(pairs), size=min(reads_per_bits, len(pairs)),
                                                              replace=False)]
    jobs = [jobs[i] for i in rng.permutation(len(jobs))]
    cold, hot, nb = [], [], []
    for layer, s, b in jobs:
        store.evict()
        t0 = time.perf_counter()
        raw = store.read_shard_bytes(layer, s, b)
        t1 = time.perf_counter()
        store.read_shard_bytes(layer, s, b)
        hot.append(time.perf_counter() - t1)
        cold.append(t1 - t0)
        nb.append(len(raw))
    store.evict()
    cold, hot, nb = np.array(cold), np.array(hot), np.array(nb, float)
    sizes = sorted(set(nb.tolist()))
    med = np.array([np.median(cold[nb == z]) for z in sizes])
    Xi = np.stack([np.ones(len(sizes)), np.array(sizes)], 1)
    ci = _nnls_rel(Xi, med)
    if ci[1] <= 0:
        ci = np.array([0.0, float(cold.sum() / nb.sum())])
    ratio = float(np.median(cold / np.maximum(hot, 1e-9)))
    return {
        "io_bandwidth": 1.0 / float(c[1]), "io_latency": float(c[0]),
        "pattern": ("the plan's reads in stream order from the page cache (the runtime's warm request)" if warm else
                    "evict, then the plan's reads in stream order (the runtime's cold request)"),
        "by_sequence": seqs, "fit": _fit_report(X, y, c),
        "isolated": {"io_latency": float(ci[0]), "io_bandwidth": 1.0 / float(ci[1]), "reads": int(len(jobs)),
                     "median_s_by_size": {int(z): float(m) for z, m in zip(sizes, med)},
                     "fit_on_medians": _fit_report(Xi, med, ci)},
        "sizes": [int(z) for z in sizes],
        "cold_over_warm": ratio, "eviction_effective": bool(ratio >= 1.5),
    }


def _measure_embed(store, seq_lens, rng, cold: bool, repeats: int = 9) -> dict:
    """Seconds per input token to read a request's word-embedding rows alone (``Store.embedding_rows``,
    checksums included): from the page cache, and with ``cold`` also cold (the store evicted
    first). Medians per length, then a slope through the origin. A reference: the runtime takes
    longer before its first layer (MiniLM, 32 tokens, warm: 0.11 ms alone, 0.36-0.48 in a request;
    see ``_calibrate_runtime``)."""
    out = {}
    for mode in ("warm", "cold") if cold else ("warm",):
        ns, med = [], []
        for n in seq_lens:
            ts = []
            for _ in range(repeats):
                ids = rng.integers(0, store.config.vocab_size, n)
                if mode == "cold":
                    store.evict()
                else:
                    store.embedding_rows(ids)
                t0 = time.perf_counter()
                store.embedding_rows(ids)
                ts.append(time.perf_counter() - t0)
            ns.append(n)
            med.append(float(np.median(ts)))
        ns_a, med_a = np.array(ns, float), np.array(med)
        out[f"{mode}_per_token"] = float(ns_a @ med_a / (ns_a @ ns_a))
        out[f"{mode}_ms_by_length"] = {int(n): round(m * 1e3, 4) for n, m in zip(ns, med)}
    return out


def _measure_compute(store, seq_lens, repeats, chunk_shards, rng) -> dict:
    from sti.models import bert

    cfg = store.config
    layer = 0
    idx = store.shard_indices(layer)
    S = len(idx)
    dec = {s: store.read_shard(layer, s, FP32) for s in idx}
    common = store.layer_common(layer)
    widths = sorted({w for w in (1, 2, 3, 4, S // 2, (3 * S) // 4, S - 2, S) if 1 <= w <= S})
    seq_lens = sorted({int(n) for n in seq_lens if 1 <= int(n) <= cfg.max_position})
    if not seq_lens:
        raise STIError(f"no usable sequence length for the compute profile (the model takes at most "
                       f"{cfg.max_position} tokens)", "pass seq_lens within the model's positions")
    configs = []
    for n in seq_lens:
        x = rng.standard_normal((1, n, cfg.hidden_size)).astype(np.float32)
        bias = bert.attention_bias(np.ones((1, n), np.int64))
        for w in widths:
            sel = idx[:w]
            chunks = [tuple(sel[i:i + chunk_shards]) for i in range(0, w, chunk_shards)]
            pre = {c: {part: {name: np.concatenate([dec[s][t] for t in tensors for s in c])
                              for name, tensors in arrays.items()}
                       for part, arrays in bert.STREAM_PARTS.items()} for c in chunks}
            configs.append((w, n, x, bias, chunks, pre))
    times = {(w, n): [] for w, n, *_ in configs}
    for rep in range(repeats + 1):  # round-robin over configurations; the first round warms up
        for w, n, x, bias, chunks, pre in configs:
            load = lambda c, part, pre=pre: pre[c][part]  # noqa: E731
            t0 = time.perf_counter()
            bert.streamed_layer(cfg, x, bias, common, chunks, load)
            dt = time.perf_counter() - t0
            if rep:
                times[(w, n)].append(dt)
    keys = sorted(times)
    # The median of the repeats: the planner predicts the median request (its tail is
    # ``tail_ratio``). A busy neighbour inflates medians (3-10x was seen during a pip install),
    # so profile on a quiet machine; the best times are kept for reference.
    y = np.array([float(np.median(times[k])) for k in keys])
    X = np.array([[1.0, w * n, w * n * n] for w, n in keys])
    c = _nnls_rel(X, y)
    # The same fit with a per-shard term independent of n (weights streamed through the cache,
    # per-chunk overhead), which the planner's model lacks: how much would it help?
    X4 = np.array([[1.0, w, w * n, w * n * n] for w, n in keys])
    c4 = _nnls_rel(X4, y)
    X5 = np.array([[1.0, n, w, w * n, w * n * n] for w, n in keys])
    c5 = _nnls_rel(X5, y)
    return {"c0": float(c[0]), "c1": float(c[1]), "c2": float(c[2]), "widths": widths, "seq_lens": seq_lens,
            "repeats": repeats, "chunk_shards": chunk_shards, "batch": 1,
            "statistic": f"median of {repeats}",
            "best_ms": {f"w{w}_n{n}": round(float(min(times[(w, n)])) * 1e3, 4) for w, n in keys},
            "median_ms": {f"w{w}_n{n}": round(float(np.median(times[(w, n)])) * 1e3, 4) for w, n in keys},
            "fit": _fit_report(X, y, c),
            "with_per_shard_term": {"c0": float(c4[0]), "cw": float(c4[1]), "c1": float(c4[2]), "c2": float(c4[3]),
                                    "fit": _fit_report(X4, y, c4)},
            "with_per_shard_and_per_token_terms": {"c0": float(c5[0]), "cn": float(c5[1]), "cw": float(c5[2]),
                                                   "c1": float(c5[3]), "c2": float(c5[4]),
                                                   "fit": _fit_report(X5, y, c5)}}


def _measure_dequant(store, repeats, rng) -> dict:
    """Seconds per stored byte to dequantize a shard as the runtime does it: its three parts
    (attention, up and down projections) each decoded by one program call into the runtime's
    scratch arena (best of ``repeats`` per shard, median over six shards). The checksum is
    not included: the IO worker computes it (see ``_stream_reads``)."""
    from sti.runtime import Schedule, StreamingEncoder

    from sti.models import bert

    L = store.num_layers
    eng = StreamingEncoder(store, Schedule([{} for _ in range(L)], chunk_shards=1))
    pairs = [(layer, s) for layer in range(L) for s in store.shard_indices(layer)]
    pick = [pairs[j] for j in rng.choice(len(pairs), size=min(6, len(pairs)), replace=False)]
    out, detail = {}, {}
    for b in store.bits:
        per = []
        for layer, s in pick:
            raw = store.read_shard_bytes(layer, s, b)
            calls = [(eng._program(layer, s, b, part), eng._chunk_views(1, part)[1][0]) for part in bert.STREAM_PARTS]
            ts = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                for prog, dst in calls:
                    prog(raw, dst)
                ts.append(time.perf_counter() - t0)
            per.append(float(min(ts[1:])) / len(raw))
        out[b] = float(np.median(per))
        detail[b] = round(out[b] * store.shard_nbytes(pick[0][0], pick[0][1], b) * 1e3, 4)
    return {"per_byte": out, "ms_per_shard": detail}


def _calibration_bits(store) -> int:
    """The bitwidth the runtime is calibrated at: 4 where stored, else the widest quantized one."""
    return 4 if 4 in store.bits else max(b for b in store.bits if b != FP32)


class _SpeedProbe:
    """The machine's speed as a plan's request sees it, sampled over a window: one fixed request
    (every shard preloaded at the calibration's bitwidth, with int8 products where the kernels
    have them, at the calibration length nearest 32 tokens) timed in bursts: a pause as between
    requests arriving, one untimed request, then ``per_burst`` timed ones.

    A shared VM's speed moves by tens of percent over seconds to minutes, and the calibration
    measures it at one moment: profiles made minutes apart timed the same preloaded requests at
    4.2 to 6.7 ms (MiniLM, 32 tokens), and every plan's prediction moved with them. Bursts run
    between the calibration's lengths (``burst``, its moments), between the validation's, and
    then until ``window_s`` since the first (``fill``); ``factor`` is the median of all over the
    median of the calibration's, ``speed(tag)`` one phase's over the calibration's.

    Known limit: this VM runs a request ~20% faster right after other work than after a pause
    (MiniLM, 32 tokens, shuffled bursts: 4.33 ms after 0.25 s of requests, 5.27-5.36 ms after
    0.1-1 s idle). The window's bursts follow pauses and most of the calibration's and
    validation's follow work, so ``factor`` carries part of that regime change with the drift
    (it prices the idle regime, conservative for the benchmark's turns), and ``speed
    ("validation")`` overstates how much faster the validation's plans ran. Bursts after a lead
    of requests instead priced the busy regime, 20-40% optimistic for the benchmark's turns."""

    def __init__(self, store, bits: int, chunk_shards: int, seq_lens, rng, per_burst: int = 5, gap_s: float = 0.25):
        from sti.runtime import Schedule, StreamingEncoder

        L = store.num_layers
        layers = [{s: bits for s in store.shard_indices(layer)} for layer in range(L)]
        preload = {(layer, s) for layer in range(L) for s in store.shard_indices(layer)}
        self.engine = StreamingEncoder(store, Schedule(layers, preload=preload, chunk_shards=chunk_shards,
                                                       int8_max_tokens=store.config.max_position))
        self.tokens = min((min(int(n), store.config.max_position) for n in seq_lens), key=lambda n: (abs(n - 32), n))
        self.ids = rng.integers(0, store.config.vocab_size, (1, self.tokens))
        self.per_burst, self.gap_s = per_burst, gap_s
        self.t0: float | None = None
        self.bursts: list[tuple[float, str, list[float]]] = []  # (seconds since the first, tag, latencies)
        self.ended_s: float | None = None  # when the window's last burst ended

    def burst(self, tag: str = "calibration") -> None:
        mask = np.ones_like(self.ids)
        if self.t0 is None:
            self.t0 = time.perf_counter()
        at = time.perf_counter() - self.t0  # the burst's start, its pause included
        time.sleep(self.gap_s)
        self.engine.run(self.ids, mask)  # untimed: the machine last ran other work
        self.bursts.append((at, tag, [self.engine.run(self.ids, mask)[1].latency for _ in range(self.per_burst)]))

    def fill(self, window_s: float) -> None:
        """Bursts until ``window_s`` seconds since the first burst."""
        while self.t0 is None or time.perf_counter() - self.t0 < window_s:
            self.burst("window")
        self.ended_s = time.perf_counter() - self.t0

    def speed(self, tag: str | None = None) -> float:
        """The median latency of ``tag``'s bursts (every burst's: None) over the calibration's."""
        cal = [t for _, tg, ts in self.bursts if tg == "calibration" for t in ts]
        got = [t for _, tg, ts in self.bursts if tag is None or tg == tag for t in ts]
        return float(np.median(got) / np.median(cal)) if cal and got else 1.0

    def factor(self) -> tuple[float, dict]:
        """(median of every burst's latencies / median of the calibration's, the record)."""
        cal = [t for _, tag, ts in self.bursts if tag == "calibration" for t in ts]
        every = [t for _, _, ts in self.bursts for t in ts]
        f = self.speed()
        span = self.bursts[-1][0] if self.bursts else 0.0
        return f, {"tokens": self.tokens, "per_burst": self.per_burst, "gap_s": self.gap_s,
                   "span_s": round(span, 3), "ended_s": None if self.ended_s is None else round(self.ended_s, 3),
                   "calibration_median_ms": round(float(np.median(cal)) * 1e3, 4) if cal else None,
                   "median_ms": round(float(np.median(every)) * 1e3, 4) if every else None, "factor": f,
                   "bursts": [{"at_s": round(at, 3), "tag": tag, "median_ms": round(float(np.median(ts)) * 1e3, 4)}
                              for at, tag, ts in self.bursts]}


def _at_speed(dev: DeviceProfile, f: float, warm: bool) -> DeviceProfile:
    """``dev`` with every compute time x ``f`` (the machine ``f`` x slower than when they were
    measured): the layers, dequantization, int8 products, the compute per streamed byte and the
    time before the first layer; reads too where they are copies from the page cache (``warm``),
    not a device's (or an emulated device's) time."""
    scaled = {"c0": dev.c0 * f, "c1": dev.c1 * f, "c2": dev.c2 * f,
              "dequant_per_byte": {b: v * f for b, v in dev.dequant_per_byte.items()},
              "int8_shard": {b: v * f for b, v in dev.int8_shard.items()},
              "int8_per_token": dev.int8_per_token * f,
              "int8_per_token_bits": {b: v * f for b, v in dev.int8_per_token_bits.items()},
              "stream_compute_per_byte": dev.stream_compute_per_byte * f,
              "stream_compute_per_byte_int8": dev.stream_compute_per_byte_int8 * f,
              "embed_fixed": dev.embed_fixed * f, "embed_per_token": dev.embed_per_token * f}
    if warm:
        scaled.update(io_bandwidth=dev.io_bandwidth / f, io_latency=dev.io_latency * f)
    return DeviceProfile(**{**dev.__dict__, **scaled})


def _calibrate_runtime(store, dev: DeviceProfile, seq_lens, chunk_shards, rng, throttle=None,
                       repeats: int = 21, warm: bool = False, probe=None) -> dict:
    """What the isolated measurements miss, measured on the real ``StreamingEncoder`` (both
    engines run interleaved, so they see the same machine), and the device profile corrected
    for it:

    * compute side: every shard preloaded at 4 bits (no IO). The median latency's excess over
      the model, per shard, is fitted as ``overhead + delta * n`` (the IO handshake, decode
      calls and scratch traffic per shard; a per-token correction of ``c1``);
    * IO side: every shard streamed at 4 bits through the IO worker (with ``throttle``, as plans
      run; without one, cold: the store evicted from the page cache before every request), by
      the engine plans run at each length: with int8 products up to ``int8_max_tokens`` (their
      streaming cost is fitted apart: warm MiniLM, 32 tokens, the streaming cost per byte fitted
      on the dequantizing engine overpriced such plans by 10-27%), without beyond.
      On a 2-core machine the IO worker shares the cores with the compute, so reads finish
      later than the device alone would, and the kernel's work for cold reads slows the
      compute: the factor ``io_slowdown`` >= 1 on read times and the compute time per streamed
      byte (``stream_compute_per_byte``, ``..._int8`` for the int8 engine) that make the
      model's timelines match the measured medians at all lengths best (least squares of
      relative errors) are kept. From the page cache (``warm``) a read is CPU work beside the
      compute, not a wait: the factor is 1 and only the compute per streamed byte is fitted;
    * ``tail_ratio``: the 95th percentile of streamed requests' latencies (the int8 engine's
      where plans run it), each over its length's median, all lengths pooled (with ~20 requests
      per length, one length's own 95th percentile is its second-slowest request: a single slow
      burst of this machine made it 1.75 against 1.16-1.20 at the other lengths). These
      requests run between the dequantizing engines' requests, whose BLAS threads and reads
      disturb them as other work on a server does: back to back, on a quiet moment of a shared
      VM, the ratio came out 1.04, and plans aimed at T / 1.04 missed T in 33-100% of the
      benchmark's requests minutes later (MiniLM, 32 tokens). Its samples (``spread``) join the
      pool of spreads the deadline margin is taken from (:func:`_validate`); the preloaded
      engine's requests (with int8 products where plans run them), over their length's median,
      are the compute's spread (``compute_spread``), which the compute margin is taken from;
    * int8 products (where the C kernels have them): the same preloaded 4-bit engine with int8
      products, in rounds alternating with the one without and nothing else between them (a cold
      streamed request in between slowed the int8 engine's next request by a third, and would
      be charged to int8): medians ``int8_alternating_ms`` and ``int8_dequant_ms``, best times
      ``..._best_ms``. ``int8_max_tokens`` is the longest length up to which they are faster at
      every measured length, by the best times (:func:`_int8_max`). The int8 engines, preloaded
      and streamed, are then timed back to back, as plans run them (``int8_ms``,
      ``streamed_int8_median_ms``; the dequantizing engine's BLAS threads, left spinning on the
      other core, slowed the next int8 request by ~10%).
      Their own cost per shard is fitted on ``int8_ms`` as ``const + int8_per_token * n``
      (beside the layer constant ``c0`` and attention's ``c2 * n^2``); each other bitwidth's
      constant and per-token cost are the 4-bit ones plus the difference its preloaded int8
      engine makes, timed in requests adjacent to the 4-bit one's at every length int8 products
      run at and fitted as a line weighted by their standard errors (``int8_bits``,
      :func:`_bits_line`): 8-bit codes cost more than 4-bit ones, a little more the longer the
      input (MiniLM, every shard: +0.85 ms at 16 tokens, +1.04 at 128).

    ``probe`` (a :class:`_SpeedProbe`'s ``burst``) is called after every length of every round:
    the machine's speed at the moments these requests ran.

    Returns (the corrected profile, the measurements)."""
    from sti.plan import simulate
    from sti.runtime import Schedule, StreamingEncoder

    bits = _calibration_bits(store)
    L = store.num_layers
    layers = [{s: bits for s in store.shard_indices(layer)} for layer in range(L)]
    w = len(layers[0])
    preload = {(layer, s) for layer in range(L) for s in store.shard_indices(layer)}
    pre = StreamingEncoder(store, Schedule(layers, preload=preload, chunk_shards=chunk_shards))
    pre8 = StreamingEncoder(store, Schedule(layers, preload=preload, chunk_shards=chunk_shards,
                                            int8_max_tokens=store.config.max_position))
    if not pre8.uses_int8(1):
        pre8 = None
    # as the device profile models reads: cold (page cache evicted per request), warm or emulated
    streamed = StreamingEncoder(store, Schedule(layers, chunk_shards=chunk_shards), throttle=throttle,
                                cold=throttle is None and not warm)
    # and with int8 products (runtime.INT8_THREADS threads), whose streaming costs differ
    streamed8 = None if pre8 is None else StreamingEncoder(
        store, Schedule(layers, chunk_shards=chunk_shards, int8_max_tokens=store.config.max_position),
        throttle=throttle, cold=throttle is None and not warm)
    shard_bytes = store.shard_nbytes(0, min(layers[0]), bits)
    rows, relative = [], []  # relative: per length, the streamed requests' latencies / their median
    lengths = sorted({min(int(n), store.config.max_position) for n in seq_lens})
    inputs = {n: rng.integers(0, store.config.vocab_size, (1, n)) for n in lengths}
    times = {n: {"pre": [], "str": [], "str8": [], "pre8": [], "busy8": [], "pair": []} for n in lengths}
    fills = {n: {"pre": [], "str": []} for n in lengths}  # seconds before the first layer (Trace.fill)
    # The repeats run in rounds over the lengths: a burst of a shared VM (seconds) then slows some
    # requests of every length instead of all of one length's, which bent the fitted costs per
    # token (MiniLM: the preloaded int8 engine at 64 tokens 16.5 ms in one profile, 11.2-11.8 in
    # others, all lengths' requests run one length after another).
    rounds = max(1, min(3, repeats // 5))
    for k in [repeats // rounds + (r < repeats % rounds) for r in range(rounds)]:
        for n in lengths:
            ids = inputs[n]
            mask = np.ones_like(ids)
            got = times[n]
            pre.run(ids, mask)  # warm-up (the previous request was of another length)
            streamed.run(ids, mask)
            for _ in range(k):
                for eng, key in ((pre, "pre"), (streamed, "str")):
                    trace = eng.run(ids, mask)[1]
                    got[key].append(trace.latency)
                    fills[n][key].append(trace.fill)
                if streamed8 is not None:  # its tail among other work (see tail_ratio)
                    got["busy8"].append(streamed8.run(ids, mask)[1].latency)
            if pre8 is not None:  # with and without int8 products in alternating rounds, nothing else between
                pre8.run(ids, mask)
                for _ in range(k):
                    got["pair"].append((pre.run(ids, mask)[1].latency, pre8.run(ids, mask)[1].latency))
                # and each int8 engine back to back, as a server runs it, once the BLAS threads the
                # dequantizing requests woke sleep again: spinning on the other core they slow
                # int8 requests (MiniLM, 32 tokens: 7.16 ms a preloaded int8 request between
                # dequantizing ones, 6.42 back to back; and the first ~0.1 s of those 10-17%
                # slower than after a pause, see sti.blas)
                blas.settle()
                for eng, out in ((pre8, got["pre8"]), (streamed8, got["str8"])):
                    eng.run(ids, mask)
                    out += [eng.run(ids, mask)[1].latency for _ in range(k)]
            if probe is not None:
                probe()
    for n in lengths:
        got = times[n]
        t_pre, t_str, t_str8, t_pre8, t_busy8, pair = (got[k] for k in ("pre", "str", "str8", "pre8", "busy8", "pair"))
        # the layers' model after the preloaded engine's own fill (its embedding rows)
        fill = float(np.median(fills[n]["pre"]))
        predicted = fill + L * (dev.compute_time(w, n) + w * dev.dequant_time(bits, shard_bytes))
        med = float(np.median(t_str))
        med8 = float(np.median(t_str8)) if t_str8 else 0.0
        busy8 = float(np.median(t_busy8)) if t_busy8 else 0.0
        relative.append(([t / med for t in t_str], [t / busy8 for t in t_busy8]))
        rows.append({"seq_len": n, "measured_ms": round(float(np.median(t_pre)) * 1e3, 3), "fill_ms": round(fill * 1e3, 4),
                     "streamed_fill_ms": round(float(np.median(fills[n]["str"])) * 1e3, 4),
                     "predicted_ms": round(predicted * 1e3, 3), "streamed_median_ms": round(med * 1e3, 3),
                     "streamed_p95_ms": round(float(np.percentile(t_str, 95)) * 1e3, 3),
                     "tail_ratio": round(float(np.percentile(t_str, 95)) / med, 4),
                     **({"streamed_int8_median_ms": round(med8 * 1e3, 3),
                         "streamed_int8_tail_ratio": round(float(np.percentile(t_busy8, 95)) / busy8, 4),
                         "streamed_int8_alone_tail_ratio": round(float(np.percentile(t_str8, 95)) / med8, 4)}
                        if t_str8 else {}),
                     **({"int8_ms": round(float(np.median(t_pre8)) * 1e3, 3),
                         "int8_alternating_ms": round(float(np.median([b for _, b in pair])) * 1e3, 3),
                         "int8_dequant_ms": round(float(np.median([a for a, _ in pair])) * 1e3, 3),
                         "int8_alternating_best_ms": round(min(b for _, b in pair) * 1e3, 3),
                         "int8_dequant_best_ms": round(min(a for a, _ in pair) * 1e3, 3)} if pair else {})})
    # compute side: excess per shard = overhead + delta * n (least squares; overhead >= 0, c1 + delta >= 0)
    ns = np.array([r["seq_len"] for r in rows], float)
    ex = np.array([(r["measured_ms"] - r["predicted_ms"]) / 1e3 / (L * w) for r in rows])
    if len(rows) >= 2:
        delta, overhead = np.polyfit(ns, ex, 1)
    else:
        delta, overhead = 0.0, float(ex[0])
    if overhead < 0:  # refit with the constant at 0
        overhead, delta = 0.0, float(ns @ ex / (ns @ ns))
    delta = max(float(delta), -dev.c1)
    per_byte = {b: v + overhead / store.shard_nbytes(0, min(store.shard_indices(0)), b)
                for b, v in dev.dequant_per_byte.items()}
    # the embedding rows, as plans' requests read them: from the device where the store is cold
    # (the streamed engine evicts it), else from the page cache (an emulated device paces shards)
    embed_fixed, embed_per_token = _line_at_least_0([(r["seq_len"], r["streamed_fill_ms" if throttle is None and not warm
                                                                  else "fill_ms"] / 1e3) for r in rows])
    fixed = DeviceProfile(**{**dev.__dict__, "c1": dev.c1 + delta, "dequant_per_byte": per_byte,
                             "embed_fixed": embed_fixed, "embed_per_token": embed_per_token})
    # int8 products: where they win, and their own cost (against the layer model just corrected)
    int8_max = _int8_max(rows)
    int8_const, int8_per_token = _int8_cost(rows, L, w, fixed.c0, fixed.c2) if int8_max else (0.0, 0.0)
    int8_bits = _int8_by_bits(store, bits, pre8, rows, repeats, chunk_shards, rng, int8_max) if int8_max else {}
    # each bitwidth's difference from ``bits``, d(n) = a + s n fitted through the lengths measured, per shard
    int8_shard, int8_bits_token = {}, {}
    for b, by_n in {bits: {}, **int8_bits}.items():
        a, slope = _bits_line(by_n)
        int8_shard[b] = int8_const + a / (L * w)
        int8_bits_token[b] = slope / (L * w)
    if not int8_max:
        int8_shard, int8_bits_token = {}, {}
    fixed = DeviceProfile(**{**fixed.__dict__, "int8_max_tokens": int8_max, "int8_per_token": int8_per_token,
                             "int8_shard": int8_shard, "int8_per_token_bits": int8_bits_token})
    # IO side: what makes the streamed plan's timeline match its medians (the engine with int8
    # products at the lengths where plans run them): a factor on read times and compute time per
    # streamed byte (below).
    shape = model_shape(store, chunk_shards=chunk_shards)
    matrix = [[bits] * w for _ in range(L)]

    def with_knobs(k: float, c: float, int8: bool) -> DeviceProfile:
        """Reads k x slower than the device alone (1 from the page cache) and c s of compute per
        streamed byte (of the int8 engine, or of the dequantizing one, int8 products then off)."""
        key = "stream_compute_per_byte_int8" if int8 else "stream_compute_per_byte"
        return DeviceProfile(**{**fixed.__dict__, "io_bandwidth": fixed.io_bandwidth / k,
                                "io_latency": fixed.io_latency * k, key: c, **({} if int8 else {"int8_max_tokens": 0})})

    def predicted_streamed(k, c, n, int8):
        return simulate(matrix, shape, with_knobs(k, c, int8), n).latency

    # the medians to match: per length, the engine plans run there; from the page cache both
    cases, pooled, computing = [], [], []  # cases: (row, int8 engine?, measured s)
    for r, (rel, rel8) in zip(rows, relative):
        int8 = fixed.int8_applies(r["seq_len"]) and "streamed_int8_median_ms" in r
        pooled += rel8 if int8 else rel
        # the compute's own spread: the preloaded engine plans run at this length (no reads)
        t = times[r["seq_len"]]["pre8" if int8 and times[r["seq_len"]]["pre8"] else "pre"]
        computing += [x / float(np.median(t)) for x in t]
        for eng8 in ([False, True] if warm and int8 else [int8]):
            cases.append((r, eng8, r["streamed_int8_median_ms" if eng8 else "streamed_median_ms"] / 1e3))

    def best_c(k, eng8):
        """The compute per streamed byte that matches the ``eng8`` engine's medians best at read
        factor k (least squares of relative errors, on a grid up to 10 ns/B), and that error."""
        mine = [(r, m) for r, e, m in cases if e == eng8]
        if not mine:
            return 0.0, 0.0
        err = lambda c: sum((predicted_streamed(k, c, r["seq_len"], eng8) / m - 1) ** 2 for r, m in mine)  # noqa: E731
        grid = [0.0] + list(np.geomspace(1e-12, 1e-8, 25))
        i = int(np.argmin([err(c) for c in grid]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        fine = np.linspace(lo, hi, 9)
        c = float(min(fine, key=err))
        return c, err(c)

    # From the page cache (warm) a read is CPU work beside the compute: only the compute per
    # streamed byte is fitted (k = 1). From a device (cold, or emulated), both: reads run slower
    # beside the compute (on a 2-core machine the IO worker shares the cores with it), and the
    # compute runs slower beside cold reads (the kernel's work for each read: MiniLM, 4 bits, cold,
    # a streamed request over a preloaded one 2.5 ms at 32 tokens and 3.4 ms at 128, where the
    # reads hide behind 22 ms of compute; one factor on read times fitted per length came out
    # 1.13 / 1.70 / 3.20 at 32 / 64 / 128 tokens and priced plans -30..+30%).
    ks = [1.0] if warm else list(np.linspace(1.0, 4.0, 31))
    fits = []
    for k in ks:
        (c, e), (c8, e8) = best_c(k, False), best_c(k, True)
        fits.append((e + e8, k, c, c8))
    _, k, c, c8 = min(fits)
    if not warm:  # refine k
        step = ks[1] - ks[0]
        for kk in np.linspace(max(1.0, k - step), k + step, 9):
            (cc, e), (cc8, e8) = best_c(kk, False), best_c(kk, True)
            if e + e8 < min(fits)[0]:
                fits.append((e + e8, float(kk), cc, cc8))
        _, k, c, c8 = min(fits)
    for r, eng8, m in cases:
        tag = "_int8" if eng8 else ""
        r["stream_compute_ns_per_byte" + tag] = round((c8 if eng8 else c) * 1e9, 4)
        r["streamed_predicted_ms" + tag] = round(predicted_streamed(k, c8 if eng8 else c, r["seq_len"], eng8) * 1e3, 3)
    tuned = DeviceProfile(**{**fixed.__dict__, "io_bandwidth": fixed.io_bandwidth / k,
                             "io_latency": fixed.io_latency * k,
                             "stream_compute_per_byte": c, "stream_compute_per_byte_int8": c8})
    tail = max(1.0, round(float(np.percentile(pooled, 95)), 4))
    out = DeviceProfile(**{**tuned.__dict__, "tail_ratio": tail})
    return out, {"bits": bits, "repeats": repeats, "rows": rows, "per_shard_overhead": float(overhead),
                 "spread": [round(float(x), 4) for x in pooled],
                 "compute_spread": [round(float(x), 4) for x in computing],
                 "c1_correction": float(delta), "io_slowdown": k, "tail_ratio": tail,
                 "embed_fixed": embed_fixed, "embed_per_token": embed_per_token,
                 "int8_max_tokens": int8_max, "int8_per_token": int8_per_token, "int8_shard": int8_shard,
                 "int8_bits_minus_4bit_s": int8_bits, "int8_per_token_bits": out.int8_per_token_bits,
                 "stream_compute_per_byte": out.stream_compute_per_byte,
                 "stream_compute_per_byte_int8": out.stream_compute_per_byte_int8}


def _validate(store, dev: DeviceProfile, seq_lens, chunk_shards, rng, throttle=None, cold: bool = False,
              repeats: int = 12, rounds: int = 3, spread: list[float] = (), compute_spread: list[float] = (),
              probe: _SpeedProbe | None = None) -> dict:
    """The profiled model against the runtime on plan-like configurations it was not fitted on,
    and the deadline margin that follows. At each length, three plans (of the bitwidths plans
    offer there): (1) random bitwidths, ~15% of shards dropped, a third preloaded, an unbounded
    buffer; (2) one random bitwidth, every shard streamed through a buffer of 1.5 layers; (3)
    random bitwidths, ~15% dropped, streamed through 2.5 layers. Each runs ``repeats`` requests
    in ``rounds`` rounds over all lengths' plans, each plan's share of a round back to back, as
    an engine serves them and as the model's int8 costs are timed, in the stream order the
    model assumes (in turns with the other plans request by request, each engine's requests ran
    slower after the others': warm, 16 tokens, up to +35% over the model against -21..+5% back
    to back); the rounds spread a burst of a shared VM (seconds) over every length's requests
    instead of a few of one length's.

    Two more plans per length preload every shard of random bitwidths (``COMPUTE_PLAN``): they
    read nothing, and their mean error over the length and the ones measured beside it
    (:func:`_neighbourhoods`), times the compute's spread (their requests and the preloaded
    engines' of the calibration, ``compute_spread``), over the streamed plans' margin, is the
    compute margin at that length (``compute_margin_by_tokens``, >= 1). Where reads are slow the
    streamed plans' requests mostly wait for them, and their spread is the device's (an
    emulated one paces reads exactly: 200 MB/s, margins 1.04); the compute margin puts back the
    compute's, in proportion to the time a plan computes (planners stretch compute times by it).

    The margin at a length n (``tail_by_tokens``) is the 95th percentile of ``error x spread``
    over the plans p at n and every spread s: ``error`` is p's median over its prediction (the
    model's own error, which differs by length), ``spread`` a request's latency over its
    plan's median, pooled over every plan and length and the ``spread`` samples given (the
    calibration's streamed requests among other engines'). A deadline T planned as a median of
    T / margin is then met by 95% of such requests, the model's error included, which one
    plan's spread (p95 / median) leaves out. The spread is pooled (~230 requests) because it is
    the machine's, not a length's: the 95th percentile of one length's 36 requests is their
    second-slowest, one slow second of a shared VM. That direct estimate is kept as
    ``direct_by_tokens``. Margins still move between profiles with the model's error (MiniLM,
    warm, three profiles minutes apart: validation medians -19..-3%, -5..+20% and -19..-1% of
    the predictions; largest margins 1.12, 1.47, 1.13).

    With a ``probe`` (:class:`_SpeedProbe`), its bursts run after each length's plans of every
    round, and each plan's error is taken against its prediction at the machine's speed then
    (``speed``: the probe's median over the calibration's): the model's error, not the
    machine's move since the calibration (warm MiniLM: a profile whose validation ran 27%
    faster than its calibration had every plan at -39..-9% of the unmoved predictions, and
    margins of 1.00)."""
    from sti.plan import simulate
    from sti.runtime import Schedule, StreamingEncoder

    L = store.num_layers
    idx = [store.shard_indices(layer) for layer in range(L)]
    S = len(idx[0])
    engines = []  # (length, name, engine, predicted s, latencies)
    configs_run = []  # and each one's (shape, bits, preload, buffer, stream order)
    for n in seq_lens:
        shape = model_shape(store, chunk_shards=chunk_shards, input_tokens=n, int8_max_tokens=dev.int8_max_tokens)
        offered = [b for b in shape.bits if b != FP32] if dev.int8_applies(n) else list(shape.bits)
        layer_max = S * max(shape.shard_bytes[b] for b in offered)

        def random_bits(p_drop):
            out = [[int(rng.choice(offered)) if rng.random() >= p_drop else 0 for _ in range(S)] for _ in range(L)]
            for row in out:  # every layer keeps a shard
                if not any(row):
                    row[int(rng.integers(S))] = int(rng.choice(offered))
            return out

        one = int(rng.choice(offered))
        configs = []
        bits = random_bits(0.15)
        pre = [(layer, s) for layer in range(L) for s in range(S) if bits[layer][s] and rng.random() < 1 / 3]
        configs.append(("random, a third preloaded", bits, pre, None))
        configs.append((f"{one}-bit, 1.5 layers of buffer", [[one] * S for _ in range(L)], [],
                        shape.base_bytes + int(1.5 * layer_max)))
        configs.append(("random, 2.5 layers of buffer", random_bits(0.15), [], shape.base_bytes + int(2.5 * layer_max)))
        for _ in range(2):  # no reads: the compute's own error (COMPUTE_PLAN)
            bits = random_bits(0.15)
            configs.append((COMPUTE_PLAN, bits,
                            [(layer, s) for layer in range(L) for s in range(S) if bits[layer][s]], None))
        for name, bits, pre, M in configs:
            tl = simulate(bits, shape, dev, n, preload=pre, memory_budget=M)
            if not tl.feasible:
                continue
            layers = [{idx[layer][s]: b for s, b in enumerate(row) if b} for layer, row in enumerate(bits)]
            sched = Schedule(layers, preload={(layer, idx[layer][s]) for layer, s in pre}, memory_budget=M or 0,
                             chunk_shards=chunk_shards, int8_max_tokens=dev.int8_max_tokens,
                             order=[(r.layer, idx[r.layer][r.shard], r.bits) for r in tl.reads])
            try:
                eng = StreamingEncoder(store, sched, cold=cold, throttle=throttle, max_tokens=n)
            except STIError:  # the runtime's accounting wants more than the model's: not a plan
                continue
            engines.append((int(n), name, eng, tl.latency, []))
            configs_run.append((shape, bits, pre, M, [(r.layer, r.shard, r.bits) for r in tl.reads]))
    inputs = {n: rng.integers(0, store.config.vocab_size, (1, n)) for n in seq_lens}
    rounds = max(1, min(rounds, repeats))
    dequantized = False  # the last engine ran BLAS products (its threads may still spin)
    for k in [repeats // rounds + (r < repeats % rounds) for r in range(rounds)]:
        for i, (n, _, eng, _, got) in enumerate(engines):
            ids = inputs[n]
            mask = np.ones_like(ids)
            if dequantized and eng.uses_int8(n):
                blas.settle()  # as a server of int8 requests alone runs them (see _calibrate_runtime)
            eng.run(ids, mask)  # warm-up: the previous request was another engine's
            got += [eng.run(ids, mask)[1].latency for _ in range(k)]
            dequantized = not eng.uses_int8(n)
            if probe is not None and (i + 1 == len(engines) or engines[i + 1][0] != n):
                probe.burst("validation")
                dequantized = False  # the probe's requests let the BLAS threads sleep
    speed = probe.speed("validation") if probe is not None else 1.0
    now = _at_speed(dev, speed, warm=throttle is None and not cold)
    plans, own, own_compute = [], [], []
    for (n, name, _, pred, got), (shape, bits, pre, M, order) in zip(engines, configs_run):
        med = float(np.median(got))
        (own_compute if name == COMPUTE_PLAN else own).extend(round(t / med, 4) for t in got)
        at_speed = simulate(bits, shape, now, n, preload=pre, memory_budget=M, stream_order=order).latency
        plans.append({"seq_len": n, "plan": name, "predicted_ms": round(pred * 1e3, 3),
                      "predicted_at_speed_ms": round(at_speed * 1e3, 3),
                      "median_ms": round(med * 1e3, 3), "p95_ms": round(float(np.percentile(got, 95)) * 1e3, 3),
                      "error": round(med / at_speed - 1, 4)})
    pooled = np.asarray([*spread, *own])
    spread_p95 = max(1.0, round(float(np.percentile(pooled, 95)), 4)) if len(pooled) else 1.0
    pooled_compute = np.asarray([*compute_spread, *own_compute])

    def p95(ratios) -> float:
        return max(1.0, round(float(np.percentile(np.concatenate(ratios), 95)), 4))

    streamed = [q for q in plans if q["plan"] != COMPUTE_PLAN]
    lengths = sorted({q["seq_len"] for q in streamed})
    by_len = {n: p95([(1 + q["error"]) * pooled for q in streamed if q["seq_len"] == n]) for n in lengths}
    direct = {n: p95([np.asarray(got) / pred for m, name, _, pred, got in engines if m == n and name != COMPUTE_PLAN])
              for n in lengths}
    compute = {}  # the compute-only plans' margin over the streamed plans' (>= 1)
    for n, near in _neighbourhoods(lengths).items():
        errors = [q["error"] for q in plans if q["seq_len"] in near and q["plan"] == COMPUTE_PLAN]
        if errors and len(pooled_compute):
            compute[n] = max(1.0, round(p95([(1 + float(np.mean(errors))) * pooled_compute]) / by_len[n], 4))
    errors = [q["error"] for q in plans]
    return {"plans": plans, "repeats": repeats, "rounds": rounds, "speed": speed,
            "spread": own, "spread_p95": spread_p95, "spread_samples": int(len(pooled)),
            "compute_spread": own_compute, "compute_spread_samples": int(len(pooled_compute)),
            "compute_spread_p95": (max(1.0, round(float(np.percentile(pooled_compute, 95)), 4))
                                   if len(pooled_compute) else 1.0),
            "tail_ratio": max(by_len.values(), default=spread_p95),
            "tail_by_tokens": by_len, "direct_by_tokens": direct, "compute_margin_by_tokens": compute,
            "median_abs_error": round(float(np.median(np.abs(errors))), 4) if errors else None,
            "error_range": [min(errors), max(errors)] if errors else None}


def _neighbourhoods(lengths: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Each length with the measured lengths beside it (sorted): the compute-only plans' errors
    are averaged over them. One random plan's error moved the compute margin +-20% between
    profiles minutes apart (MiniLM, 200 MB/s, 32 tokens: 1.26 / 1.41 / 1.56); the model's compute
    error changes slowly with the length, the noise of one plan's median does not."""
    ns = sorted(lengths)
    return {n: tuple(ns[max(0, i - 1):i + 2]) for i, n in enumerate(ns)}


def _int8_max(rows: list[dict]) -> int:
    """The longest calibration length (rows sorted by length) up to which the preloaded engine
    with int8 products was faster than without at every measured length, by their best times in
    the alternating rounds (``int8_alternating_best_ms``, ``int8_dequant_best_ms``; the medians
    where a row has no best times); 0 where it never was or was not measured.

    Best times, because which path is faster is a property of the machine and the medians of a
    shared VM's bursts are not: MiniLM at 128 tokens, int8 products ran 23.8 / 22.9 ms against
    26.0 / 25.6 dequantizing in two profiles and 35.3 against 31.3 in a third taken minutes
    later, whose plans then dequantized at 128 tokens (their int8 products are compute-bound,
    dequantization memory-bound: a neighbour's burst need not slow both alike)."""
    reach = 0
    for r in rows:
        int8, dequant = r.get("int8_alternating_best_ms", r.get("int8_alternating_ms")), \
            r.get("int8_dequant_best_ms", r.get("int8_dequant_ms"))
        if int8 is None or dequant is None or int8 >= dequant:
            break
        reach = r["seq_len"]
    return reach


def _int8_cost(rows: list[dict], layers: int, width: int, c0: float, c2: float) -> tuple[float, float]:
    """(const, per_token): one shard's cost with int8 products, ``const + per_token * n``, fitted
    by least squares on the preloaded int8 engine's medians (``int8_ms``, ``layers`` x ``width``
    shards) after the layer constant ``c0``, attention's ``c2 * n^2`` and the preloaded engines'
    time before the first layer (``fill_ms``: the embedding rows); both kept >= 0."""
    return _line_at_least_0([(r["seq_len"], (r["int8_ms"] - layers * c0 * 1e3 - r.get("fill_ms", 0.0)) / 1e3
                              / (layers * width) - c2 * r["seq_len"] ** 2) for r in rows if "int8_ms" in r])


def _line_at_least_0(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(const, per_token) of ``const + per_token * n`` through (length, seconds) points, by least
    squares, both kept >= 0: through the origin where the free line's constant is negative, flat
    at the mean where its slope is (or where one length was measured)."""
    n = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    if len(n) >= 2 and np.ptp(n) > 0:
        per_token, const = np.polyfit(n, y, 1)
    else:
        per_token, const = 0.0, float(y.mean())
    if const < 0:
        const, per_token = 0.0, float(n @ y / (n @ n))
    if per_token < 0:
        const, per_token = float(y.mean()), 0.0
    return max(0.0, float(const)), max(0.0, float(per_token))


def _int8_by_bits(store, bits: int, pre8, rows: list[dict], repeats: int, chunk_shards: int, rng,
                  int8_max: int) -> dict[int, dict[int, dict[str, float]]]:
    """{bitwidth: {length: {"diff_s", "se_s"}}}: what int8 products at each other quantized
    bitwidth take per request beyond ``bits`` (the preloaded engine ``pre8``), every shard
    preloaded, at every calibration length int8 products run at: the median of ``repeats``
    differences of adjacent requests of the two engines, and its standard error (from the
    differences' median absolute deviation).

    Adjacent pairs, because the machine's speed drifts between them less than over a round: a
    difference of two medians swung 8-bit's cost at 128 tokens by +-0.5 ms per request, and a
    line through two lengths priced 6-bit shards at 128 tokens 2.5 ms over 4-bit ones where
    paired requests at four lengths measured 0.46 (MiniLM, every shard: 8-bit +0.85 / +0.87 /
    +0.97 / +1.04 ms at 16 / 32 / 64 / 128 tokens, the unpacking mostly per call, not per
    token)."""
    from sti.runtime import Schedule, StreamingEncoder

    ns = [r["seq_len"] for r in rows if r["seq_len"] <= int8_max]
    L = store.num_layers
    preload = {(layer, s) for layer in range(L) for s in store.shard_indices(layer)}
    out: dict[int, dict[int, dict[str, float]]] = {}
    for b in store.bits:
        if b in (bits, FP32):
            continue
        layers = [{s: b for s in store.shard_indices(layer)} for layer in range(L)]
        eng = StreamingEncoder(store, Schedule(layers, preload=preload, chunk_shards=chunk_shards,
                                               int8_max_tokens=max(ns)))
        for n in ns:
            ids = rng.integers(0, store.config.vocab_size, (1, n))
            mask = np.ones_like(ids)
            eng.run(ids, mask)
            diffs = []
            for _ in range(repeats):
                t_ref = pre8.run(ids, mask)[1].latency
                diffs.append(eng.run(ids, mask)[1].latency - t_ref)
            diffs = np.array(diffs)
            med = float(np.median(diffs))
            # the median's standard error: 1.2533 sigma / sqrt(k), sigma from the MAD
            se = 1.2533 * 1.4826 * float(np.median(np.abs(diffs - med))) / np.sqrt(len(diffs))
            out.setdefault(int(b), {})[int(n)] = {"diff_s": med, "se_s": se}
    return out


def _bits_line(by_n: Mapping[int, Mapping[str, float]]) -> tuple[float, float]:
    """(a, s) of ``d(n) = a + s n`` through a bitwidth's per-request differences by length
    (:func:`_int8_by_bits`), least squares weighted by their standard errors (floored at 1 us, so
    that one repeat per length is an unweighted fit): the longest lengths' differences are the
    noisiest, and a line through the two ends followed them. One length: a constant."""
    if not by_n:
        return 0.0, 0.0
    n = np.array(sorted(by_n), float)
    d = np.array([by_n[k]["diff_s"] for k in sorted(by_n)])
    if len(n) == 1:
        return float(d[0]), 0.0
    se = np.maximum([by_n[k]["se_s"] for k in sorted(by_n)], 1e-6)
    slope, a = np.polyfit(n, d, 1, w=1 / se)
    return float(a), float(slope)


def _loadavg() -> float | None:
    """The 1-minute load average (other processes compete for the cores when it exceeds ours)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_name() -> str:
    from sti.machine import cpu_model

    return cpu_model()


def _profile_device(store, storage=None, seq_lens=(16, 32, 64, 128), repeats=15, chunk_shards=4, seed=0,
                    progress=False, speed_window: float = DEFAULT_SPEED_WINDOW_S):
    throttle = parse_storage(storage)
    warm = storage_key(storage) == WARM
    rng = np.random.default_rng(seed)
    load0 = _loadavg()
    t0 = time.perf_counter()
    _say(progress, f"profiling IO ({'page-cache' if warm else 'cold'} reads) ...")
    io = _measure_io(store, rng, warm=warm)
    t_io = time.perf_counter() - t0
    _say(progress, "profiling compute per layer ...")
    comp = _measure_compute(store, seq_lens, repeats, chunk_shards, rng)
    t_comp = time.perf_counter() - t0 - t_io
    _say(progress, "profiling dequantization ...")
    deq = _measure_dequant(store, repeats, rng)
    t_deq = time.perf_counter() - t0 - t_io - t_comp
    cpu = f"{_cpu_name()}, {os.cpu_count()} CPUs"
    if warm:
        bw, lat = io["io_bandwidth"], io["io_latency"]
        label = (f"warm (page cache) reads of {store.path} ({bw / 1e6:.0f} MB/s, {lat * 1e3:.3g} ms per read); "
                 f"compute on {cpu}")
    elif throttle is None:
        bw, lat = io["io_bandwidth"], io["io_latency"]
        label = (f"cold (posix_fadvise DONTNEED) reads of {store.path} "
                 f"({bw / 1e6:.0f} MB/s, {lat * 1e3:.3g} ms per read); compute on {cpu}")
        if not io["eviction_effective"]:
            label += "; eviction had no measurable effect (cold ~ warm reads): IO numbers are page-cache speed"
    else:
        bw, lat = throttle.bandwidth, throttle.latency
        label = f"{throttle.label} (runtime Throttle); compute on {cpu}"
        shard = max(io["sizes"]) if io["sizes"] else 0
        real = io["io_latency"] + shard / io["io_bandwidth"]
        emul = lat + shard / bw
        io["real_slower_than_emulated"] = bool(real > emul)
        if real > emul:
            label += (f"; note: measured cold reads are slower than the emulation ({real * 1e3:.3g} vs "
                      f"{emul * 1e3:.3g} ms per {shard} B read), so emulation is exact only for warm reads")
    # the input's embedding rows read alone, for reference (the profile's cost of them is the
    # runtime's time before its first layer, measured by the calibration)
    cold = not warm and throttle is None
    emb = _measure_embed(store, seq_lens, rng, cold=cold)
    dev = DeviceProfile(io_bandwidth=float(bw), io_latency=float(lat), c0=comp["c0"], c1=comp["c1"], c2=comp["c2"],
                        dequant_per_byte=deq["per_byte"], label=label)
    _say(progress, "calibrating per-layer overhead on the streaming runtime ...")
    probe = _SpeedProbe(store, _calibration_bits(store), chunk_shards, seq_lens, rng)
    dev, calib = _calibrate_runtime(store, dev, seq_lens, chunk_shards, rng, throttle, warm=warm, probe=probe.burst)
    _say(progress, "validating the model on plan-like configurations ...")
    # the deadline margin, per measured length: the model's error on plans it was not fitted on
    # there, times the spread of requests' latencies, pooled over the validation's requests and
    # the calibration's (streamed among other engines' requests)
    val = _validate(store, dev, seq_lens, chunk_shards, rng, throttle, cold=cold, spread=calib["spread"],
                    compute_spread=calib["compute_spread"], probe=probe)
    dev = DeviceProfile(**{**dev.__dict__, "tail_ratio": val["tail_ratio"], "tail_by_tokens": val["tail_by_tokens"],
                           "compute_margin_by_tokens": val["compute_margin_by_tokens"]})
    # The model was fitted and validated at the calibration's moments of the machine; its times
    # move to the machine's median speed over the window (the margins, ratios, stay)
    left = speed_window - (time.perf_counter() - probe.t0)
    if left > 0:
        _say(progress, f"sampling the machine's speed for {left:.0f} s more (a {speed_window:.0f} s window) ...")
    probe.fill(speed_window)
    speed, speed_info = probe.factor()
    dev = _at_speed(dev, speed, warm)
    dev.label += (f"; compute times x{speed:.3f}: the machine's median speed over {speed_info['span_s']:.0f} s "
                  f"against the calibration's moments")
    if calib["io_slowdown"] > 1.0:
        dev.label += (f"; reads {calib['io_slowdown']:.2f}x slower than the device alone while the runtime "
                      f"computes beside them (measured on the streaming runtime)")
    meta = {"io_measured": io, "compute": comp, "dequant": deq, "embedding_rows": emb, "runtime_calibration": calib,
            "validation": val, "speed_window": speed_info,
            "storage": storage_key(storage),
            "seconds": {"io": round(t_io, 3), "compute": round(t_comp, 3), "dequant": round(t_deq, 3),
                        "total": round(time.perf_counter() - t0, 3)},
            "cpu": cpu, "platform": platform.platform(), "numpy": np.__version__,
            "load_average_before_after": [load0, _loadavg()]}
    return dev, meta


def profile_device(store, storage: str | None = None, seq_lens=(16, 32, 64, 128), repeats: int = 15,
                   chunk_shards: int = 4, seed: int = 0) -> DeviceProfile:
    """Measure this device: cold IO latency and bandwidth, per-layer compute, dequantization.

    IO: plan-like read sequences, each run as the runtime runs a cold request (``Store.evict()``,
    posix_fadvise DONTNEED, then the reads in stream order), ``time = reads * io_latency + bytes
    / io_bandwidth`` fitted by non-negative least squares of relative errors (see
    ``_measure_io``: the fit and every sequence's predicted / actual are kept in the profile's
    meta, with isolated one-read-per-eviction numbers for reference). Compute: ``bert.streamed_layer``
    (the runtime's chunked layer, ``chunk_shards`` shards per chunk, already-decoded fp32 shards,
    one sequence) at several widths w and each ``seq_lens`` n, median of ``repeats``, fitted as
    ``c0 + c1*w*n + c2*w*n^2``. Dequantization: seconds per stored byte at each stored bitwidth
    (decode into scratch, as the runtime does; fp32 is a copy). Then the
    real runtime calibrates both (``_calibrate_runtime``): a per-shard overhead, and the
    ``tail_ratio`` (95th percentile / median request latency) the planner turns deadlines with.
    ``storage`` (see :func:`parse_storage`) replaces the IO numbers by the emulated device's."""
    store, opened = _open(store)
    try:
        _bert_only(store)
        return _profile_device(store, storage, seq_lens, repeats, chunk_shards, seed)[0]
    finally:
        if opened:
            store.close()


# ============================================================================================
# Saving and loading
# ============================================================================================


def profile_path(store_path, storage: str | None = None) -> Path:
    """``STORE/profile.json``, or ``STORE/profile-<storage>.json`` for emulated or warm storage."""
    key = storage_key(storage)
    return Path(store_path).expanduser() / (PROFILE_FILE if key is None else f"profile-{key}.json")


def store_fingerprint(store_path) -> str:
    """A short hash of the store's manifest: changes whenever the store is re-packed."""
    from sti.store import format as fmt

    m = Path(store_path).expanduser() / fmt.MANIFEST
    try:
        return hashlib.sha256(m.read_bytes()).hexdigest()[:16]
    except OSError:
        raise STIError(f"{Path(store_path)} is not an STI store (no manifest.json)",
                       "run sti pack MODEL -o STORE to create one") from None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def save_profile(store_path, importance: Importance, device: DeviceProfile, meta: dict | None = None,
                 storage: str | None = None) -> Path:
    """Write the profile atomically (temporary file + os.replace) into the store directory."""
    from sti import __version__

    meta = dict(meta or {})
    if storage is None:
        storage = meta.get("storage")
    path = profile_path(store_path, storage)
    doc = {
        "format": "sti-profile",
        "profile_version": PROFILE_VERSION,
        "sti_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "store_fingerprint": store_fingerprint(store_path),
        "storage": storage_key(storage),
        "importance": {"loss": importance.loss},
        "device": dataclasses.asdict(device),
        "meta": meta,
    }
    text = json.dumps(_jsonable(doc), indent=1)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise STIError(f"cannot write the profile {path}: {exc}", "make the store directory writable") from None
    return path


def load_profile(store_path, storage: str | None = None) -> tuple[Importance, DeviceProfile, dict]:
    """(Importance, DeviceProfile, meta) of a store's saved profile. meta holds everything else in
    the file (version, date, task, calibration, timings, fits, additivity)."""
    path = profile_path(store_path, storage)
    flag = "" if storage_key(storage) is None else f" --storage {storage_key(storage)}"
    fix = f"run sti profile {store_path}{flag}"
    if not path.is_file():
        raise STIError(f"the store {store_path} has no profile ({path.name})", fix)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != "sti-profile":
            raise ValueError("not an STI profile")
        if doc.get("profile_version") != PROFILE_VERSION:
            raise STIError(f"{path} has profile version {doc.get('profile_version')}, this STI reads "
                           f"{PROFILE_VERSION}", fix)
        imp = Importance.from_dict(doc["importance"])
        dev = DeviceProfile.from_dict(doc["device"])
    except STIError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise STIError(f"{path} is damaged: {type(exc).__name__}: {exc}", fix) from None
    if doc.get("store_fingerprint") != store_fingerprint(store_path):
        raise STIError(f"the profile {path} is stale: the store was re-packed after it was made", fix)
    meta = {k: v for k, v in doc.items() if k not in ("importance", "device")}
    return imp, dev, meta


def _reusable_importance(store_path, key: dict):
    """An importance already profiled for this store with the same task and calibration
    (from any of its profile files), or None."""
    fp = store_fingerprint(store_path)
    for f in sorted(Path(store_path).expanduser().glob("profile*.json")):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            if doc.get("store_fingerprint") == fp and doc.get("meta", {}).get("importance_key") == key:
                return Importance.from_dict(doc["importance"]), doc["meta"], f
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


# ============================================================================================
# The front door
# ============================================================================================


def _summary_importance(imp: Importance, versions) -> dict:
    arr = np.array([[[d[b] for b in versions] for d in row] for row in imp.loss])  # (L, S, V)
    lab = lambda b: "dropped" if b == DROP else f"{b}-bit"  # noqa: E731
    return {
        "mean_kl_by_bits": {lab(b): float(arr[..., j].mean()) for j, b in enumerate(versions)},
        "mean_kl_dropped_by_layer": [float(x) for x in arr[..., 0].mean(1)],
        "mean_kl_4bit_by_layer": ([float(x) for x in arr[..., versions.index(4)].mean(1)] if 4 in versions else None),
        "most_important_dropped": [
            {"layer": int(layer), "shard": int(s), "kl": float(arr[layer, s, 0])}
            for layer, s in sorted(np.ndindex(arr.shape[:2]), key=lambda p: -arr[p[0], p[1], 0])[:5]],
        "least_important_dropped": [
            {"layer": int(layer), "shard": int(s), "kl": float(arr[layer, s, 0])}
            for layer, s in sorted(np.ndindex(arr.shape[:2]), key=lambda p: arr[p[0], p[1], 0])[:5]],
    }


def format_summary(summary: dict) -> str:
    """:func:`run_profile`'s summary as a few lines for the terminal (``--json`` prints it whole)."""
    d, sec, cal, imp = summary["device"], summary["seconds"], summary["calibration"], summary["importance"]
    pct = lambda x: f"{x * 100:.0f}%"  # noqa: E731
    lines = [f"encoder profile: {summary['profile']}",
             f"task {summary['task']}, storage {summary['storage'] or 'real (cold reads)'}; took {sec['total']:.0f} s "
             f"(importance {sec['importance']:.0f} s, device {sec['device']:.0f} s)",
             "",
             f"device: {d['label']}",
             f"  reads, as plans are priced: {d['io_bandwidth_MBps']:.0f} MB/s + {d['io_latency_ms']:.3f} ms per read "
             f"(plan-like sequences: median error {pct(d['io_fit']['median_rel_error'])})",
             f"  compute per layer: {d['c0_ms']:.3f} ms + {d['c1_us']:.2f} us per shard-token "
             f"+ {d['c2_ns']:.2f} ns per shard-token^2; full width at 128 tokens {d['layer_ms_full_width_128']:.2f} ms "
             f"(median error {pct(d['compute_fit']['median_rel_error'])})",
             "  dequantization, ns per stored byte: " + ", ".join(f"{_bits_label(b)} {v:.2f}"
                                                                 for b, v in d["dequant_ns_per_byte"].items())]
    if d["int8_max_tokens"]:
        lines.append(f"  int8 products up to {d['int8_max_tokens']} tokens, per shard (us): "
                     + ", ".join(f"{_bits_label(b)} {v:.1f}" for b, v in d["int8_shard_us"].items())
                     + f", + {d['int8_per_token_us']:.2f} us per token"
                     + "".join(f" ({_bits_label(b)} {v:+.2f})" for b, v in (d.get("int8_per_token_bits_us") or {}).items()
                               if abs(v) >= 0.005))
    else:
        lines.append("  int8 products: never faster here (or not built), quantized shards are dequantized")
    int8_part = (f" ({d['stream_compute_ns_per_byte_int8']:.2f} where int8 products read it)"
                 if d["int8_max_tokens"] else "")
    beside = f"{d['stream_compute_ns_per_byte']:.2f} ns of compute per streamed byte{int8_part}"
    if summary["storage"] != WARM:
        beside = f"reads {d['io_slowdown']:.2f}x slower beside the compute, {beside}"
    lines.append(f"  streaming: {beside}")
    v = d.get("validation") or {}
    if v.get("plans"):
        lo, hi = v["error_range"]
        lines.append(f"  validation on {v['plans']} plan-like configurations: median over predicted (at the machine's speed "
                     f"then, x{v.get('speed', 1.0):.3f}) {lo:+.0%}..{hi:+.0%} "
                     f"(median |error| {v['median_abs_error']:.0%}); requests' p95 / median "
                     f"{v['spread_p95']:.2f} ({v['spread_samples']} pooled)")
    by = d.get("tail_by_tokens") or {}
    margins = (", ".join(f"{v:.2f} at {n}" for n, v in sorted(by.items(), key=lambda kv: int(kv[0])))
               + " tokens" if by else f"{d['tail_ratio']:.2f}")
    lines.append(f"  deadlines: a deadline T is planned as a median of T / {margins} (p95 of the "
                 "validation's median / predicted there x requests' latency / median, pooled)")
    cm = {n: g for n, g in (d.get("compute_margin_by_tokens") or {}).items() if g > 1.0}
    if cm:
        lines.append("  compute: planners stretch compute times by "
                     + ", ".join(f"{g:.2f} at {n}" for n, g in sorted(cm.items(), key=lambda kv: int(kv[0])))
                     + f" tokens (the compute-only plans' mean error near there x the compute's p95 / median "
                     f"{v.get('compute_spread_p95', 1.0):.2f}, over the margin above)")
    sw = d.get("speed_window")
    if sw and sw.get("median_ms"):
        lines.append(f"  speed: a probe request ({sw['tokens']} tokens, every shard preloaded) {sw['median_ms']:.2f} ms "
                     f"median over {sw['span_s']:.0f} s against {sw['calibration_median_ms']:.2f} ms at the calibration's "
                     f"moments: compute times x{sw['factor']:.3f}")
    if d.get("embed_us_per_token"):
        lines.append(f"  input: its word-embedding rows {d['embed_us_per_token']:.1f} us per token before the first layer")
    lines += ["",
              f"importance: KL of the {cal.get('head', summary['task'])} head's probabilities on {cal['n_texts']} "
              f"calibration texts x {cal['seq_len']} tokens (full model's accuracy there "
              f"{summary['full_accuracy']:.3f})" if summary.get("full_accuracy") is not None else
              f"importance: KL on {cal['n_texts']} calibration texts x {cal['seq_len']} tokens",
              "  mean per shard: " + ", ".join(f"{k} {v:.2g}" for k, v in imp["mean_kl_by_bits"].items()),
              "  dropped, mean by layer: " + " ".join(f"{v:.2g}" for v in imp["mean_kl_dropped_by_layer"]),
              "  most important to keep: " + ", ".join(f"layer {r['layer']} shard {r['shard']} ({r['kl']:.2g})"
                                                       for r in imp["most_important_dropped"][:3])]
    add = summary.get("additivity")
    if add and add.get("spearman") is not None:
        lines.append(f"  additivity (summed single-shard KLs vs measured, random plans): Spearman {add['spearman']:.2f}")
    return "\n".join(lines)


def _bits_label(b) -> str:
    return "fp32" if int(b) == FP32 else f"{int(b)}-bit"


def run_profile(store_path, task: str = DEFAULT_TASK, storage: str | None = None, progress: bool = True, *,
                n_calib: int = DEFAULT_N_CALIB, seq_len: int = DEFAULT_SEQ_LEN, chunk_shards: int = 4,
                additivity_checks: int = 16, reuse: bool = True, repeats: int = 15,
                speed_window: float = DEFAULT_SPEED_WINDOW_S) -> dict:
    """Profile a store (importance on ``task``'s calibration texts + this device, or an emulated
    ``storage``), save it as ``STORE/profile[-<storage>].json`` and return a JSON-able summary.

    With ``reuse``, an importance already measured for this store, task and calibration (in any
    profile file of the store) is reused, so profiling another emulated storage takes seconds
    (and ``speed_window``: the device profile's compute times are the machine's median speed over
    that many seconds, see :class:`_SpeedProbe`)."""
    if not speed_window >= 0:
        raise STIError(f"the speed window must be a non-negative number of seconds, got {speed_window!r}",
                       "pass --speed-window 60 (the default), or 0 to price compute at the calibration's moments")
    from sti.store.reader import Store

    storage_key(storage)  # refuse a bad spec before any work
    t0 = time.perf_counter()
    with Store.open(store_path) as store:
        _bert_only(store)
        bits = _check_bits(store, None)
        key = {"task": task, "n_calib": int(n_calib), "seq_len": int(seq_len), "bits": list(bits)}
        found = _reusable_importance(store.path, key) if reuse else None
        if found is not None:
            imp, old_meta, f = found
            imp_info = dict(old_meta.get("importance_info", {}), reused_from=f.name)
            calib = old_meta.get("calibration")
            t_imp = 0.0
            _say(progress, f"reusing the importance profile of {f.name}")
        else:
            _say(progress, f"profiling shard importance on {task} calibration texts ...")
            t1 = time.perf_counter()
            imp, imp_info = _profile_importance(store, task, n_calib, seq_len, bits, progress, additivity_checks)
            t_imp = time.perf_counter() - t1
            calib = imp_info.pop("calibration")
        t1 = time.perf_counter()
        dev, dev_meta = _profile_device(store, storage, repeats=repeats, chunk_shards=chunk_shards, progress=progress,
                                        speed_window=speed_window)
        t_dev = time.perf_counter() - t1
        shape = model_shape(store, chunk_shards)
        imp.check(shape)
        meta = {
            "task": task,
            "storage": storage_key(storage),
            "store": str(store.path),
            "model": store.manifest.source.get("model"),
            "importance_key": key,
            "calibration": calib,
            "importance_info": imp_info,
            "device_info": dev_meta,
            "model_shape": dataclasses.asdict(shape),
            "chunk_shards": chunk_shards,
            "seconds": {"importance": round(t_imp, 3), "device": round(t_dev, 3),
                        "total": round(time.perf_counter() - t0, 3)},
        }
        path = save_profile(store.path, imp, dev, meta, storage)
    versions = imp_info.get("versions", [DROP, *bits])
    summary = {
        "profile": str(path),
        "store": str(store.path),
        "task": task,
        "storage": storage_key(storage),
        "seconds": meta["seconds"],
        "device": {"label": dev.label, "io_bandwidth_MBps": dev.io_bandwidth / 1e6,
                   "io_latency_ms": dev.io_latency * 1e3,
                   "c0_ms": dev.c0 * 1e3, "c1_us": dev.c1 * 1e6, "c2_ns": dev.c2 * 1e9,
                   "layer_ms_full_width_128": dev.compute_time(shape.shards_per_layer, 128) * 1e3,
                   "compute_fit": dev_meta["compute"]["fit"], "io_fit": dev_meta["io_measured"]["fit"],
                   "io_by_plan": {q["plan"]: {"MBps": q["MBps"], "predicted_over_actual": q["predicted_over_actual"]}
                                  for q in dev_meta["io_measured"]["by_sequence"]},
                   "dequant_ns_per_byte": {str(b): v * 1e9 for b, v in dev.dequant_per_byte.items()},
                   "int8_max_tokens": dev.int8_max_tokens,
                   "int8_shard_us": {str(b): v * 1e6 for b, v in dev.int8_shard.items()},
                   "int8_per_token_us": dev.int8_per_token * 1e6,
                   "int8_per_token_bits_us": {str(b): v * 1e6 for b, v in dev.int8_per_token_bits.items()},
                   "tail_ratio": dev.tail_ratio, "tail_by_tokens": dev.tail_by_tokens,
                   "compute_margin_by_tokens": dev.compute_margin_by_tokens,
                   "stream_compute_ns_per_byte": dev.stream_compute_per_byte * 1e9,
                   "stream_compute_ns_per_byte_int8": dev.stream_compute_per_byte_int8 * 1e9,
                   "embed_us": dev.embed_fixed * 1e6, "embed_us_per_token": dev.embed_per_token * 1e6,
                   "io_slowdown": dev_meta["runtime_calibration"]["io_slowdown"],
                   "speed_window": {k: v for k, v in dev_meta["speed_window"].items() if k != "bursts"},
                   "validation": {k: v for k, v in (dev_meta.get("validation") or {}).items()
                                  if k not in ("plans", "spread", "compute_spread")}
                   | {"plans": len((dev_meta.get("validation") or {}).get("plans", []))}},
        "calibration": calib,
        "full_accuracy": imp_info.get("full_accuracy"),
        "importance": _summary_importance(imp, list(versions)),
        "additivity": {k: v for k, v in (imp_info.get("additivity") or {}).items() if k != "configs"} or None,
        "model_shape": meta["model_shape"],
    }
    return _jsonable(summary)
