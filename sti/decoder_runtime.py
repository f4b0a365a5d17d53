"""Generation from a decoder shard store under a memory budget: every weight that is not resident
is streamed from storage on every forward pass (each decode step is one pass over the model).

The runtime owns one IO thread and a fixed number of read slots. The IO worker fetches the
streamed shard versions in pass order (layers 0..L-1, then the LM-head shards) into free slots;
it never stops at a token boundary, so while the compute thread finishes the last layers and
the head of token t, the first layers of token t+1 are already being fetched (prefetch across
the token boundary), as far as free slots allow. The compute thread runs a layer once all of
its shards are present, multiplying straight from the packed bytes (``sti.linops`` operators
over ``sti.lowbit`` kernels: fused matrix-vector products for decode, dequantize + BLAS into a
fixed scratch for prefill), then hands the slots back. Shards in the schedule's preload set are
read once into private buffers and stay resident.

Two ways to fetch (``io``):

- ``"mmap"`` (default on Linux): zero-copy. The store files are mapped read-only; a slot holds
  one shard's pages: the IO worker faults them in (``MADV_POPULATE_READ``, the read without the
  copy) and, when the slot is reused, drops them from the process again (``MADV_DONTNEED``).
  At most ``slots`` shards are mapped in at any time, so the process's resident set is bounded
  exactly as with buffers, and the CPU cost of a warm-cache fetch is about half of a copying
  read (~7.5 vs ~3.5 GB/s per core measured here), which matters when ~90 MB stream per token.
  A shard's checksum is verified on its first fetch by the engine; later passes map the same
  file pages (re-read from the device if the OS evicted them, under its own integrity checks).
- ``"read"``: ``pread`` into private slot buffers, every fetch checksummed (where mapping is
  unavailable, or to re-verify every pass).

Every byte the engine holds is in ``Residency`` (``sti.runtime``): the unsharded tensors, the
preloaded shards, the slot pool, the dequantization scratch, the KV cache and the activations'
embedding rows. Its peak never exceeds the budget: a schedule or a request that could not fit is
refused up front with the smallest budget that would.

Several sequences (a batch) share every streamed pass, so the IO cost per token falls with the
batch size (the FlexGen idea).
"""

from __future__ import annotations

import mmap
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from sti import blas
from sti.errors import STIError
from sti.checksums import sum64_int
from sti.linops import ColSum, Packed, Q1Stack, RowStack, SegmentStack, exact_products, stack_q1, tiled
from sti.lowbit import GGML, LowBitTensor
from sti.models import llama
from sti.plan_decoder import read_slots
from sti.runtime import Residency, Throttle
from sti.store import format as fmt

HEAD = fmt.HEAD
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14: fault pages in, no copy
IO_MODES = ("mmap", "read")
# Most streamed LM-head shards one product takes (and at most half the read slots, so that the
# IO worker reads the next run meanwhile): SmolLM2's 48 head shards of 1024 rows took 7.0 ms of a
# batch-16 decode step one product each, and 4.1 ms as one matrix (25 % budget, page cache,
# measured here); in runs, a step at 100 % took 25.7 ms instead of 27.5. Preloaded head shards
# run as one product.
HEAD_RUN = 16


try:
    if os.environ.get("STI_NO_C", "") not in ("", "0"):
        raise ImportError("STI_NO_C set")
    from sti._kernels import advise as _advise_c
except ImportError:  # pragma: no cover - depends on the build
    _advise_c = None


def advise(m: mmap.mmap, offset: int, length: int, advice: int) -> None:
    """madvise over a page-aligned range of a mapping: in C with the GIL released when built (the
    compute thread keeps running), else ``mmap.madvise`` (same effect, GIL held)."""
    if _advise_c is not None:
        _advise_c(memoryview(m)[offset:offset + length], advice)
    else:
        m.madvise(advice, offset, length)


def zero_copy_supported() -> bool:
    """Whether shards can be fetched by mapping (Linux: mmap with madvise)."""
    return sys.platform.startswith("linux") and hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


@dataclass
class DecoderSchedule:
    """Which version of every shard to run, which stay resident, and the memory budget."""

    layers: list[dict[int, int]]  # per layer: {shard index: bits}; every shard of the layer
    head: dict[int, int]  # LM-head shard -> bits
    preload: set[tuple[int, int]] = field(default_factory=set)  # (layer or HEAD, shard) kept resident
    memory_budget: int = 0  # bytes; 0 = unbounded

    @classmethod
    def uniform(cls, store, bits: int | None = None, head_bits: int | None = None, **kw) -> "DecoderSchedule":
        """Every shard at ``bits`` (default: the store's lossless version: source, else fp32)."""
        bits = lossless_bits(store) if bits is None else bits
        head_bits = bits if head_bits is None else head_bits
        return cls([{s: bits for s in store.shard_indices(layer)} for layer in range(store.num_layers)],
                   {s: head_bits for s in store.shard_indices(HEAD)}, **kw)

    def items(self) -> list[tuple[int, int, int]]:
        """(layer, shard, bits) of one pass, in pass order: the layers, then the head."""
        out = [(layer, s, b) for layer, shards in enumerate(self.layers) for s, b in sorted(shards.items())]
        return out + [(HEAD, s, b) for s, b in sorted(self.head.items())]

    def stream_order(self) -> list[tuple[int, int, int]]:
        return [it for it in self.items() if (it[0], it[1]) not in self.preload]


def lossless_bits(store) -> int:
    for b in (fmt.SOURCE, fmt.FP32):
        if b in store.bits:
            return b
    raise STIError(f"{store.path} has no lossless version (only {', '.join(fmt.label(b) for b in store.bits)})",
                   "pack it with the source or fp32 version, or choose a bitwidth")


class StreamingDecoder:
    """Runs a LLaMA-family store under a :class:`DecoderSchedule`. One request at a time (calls
    are serialised by a lock)."""

    def __init__(self, store, schedule: DecoderSchedule, throttle: Throttle | None = None,
                 kernel_profile=None, batch: int = 1, context: int | None = None, slots: int | None = None,
                 io: str = "auto", kv: str = "fp16"):
        """``batch`` x ``context`` tokens (prompt + generated; default: the model's context, or
        what the budget allows) is the largest request the engine reserves KV cache for.
        ``slots``: read slots (default: two layers' shards, ``sti.plan_decoder.read_slots``, or
        every streamed shard when the budget is unbounded). ``io``: "mmap", "read" or "auto"
        (mmap where supported); see the module docstring. ``kv``: the KV cache's element type,
        "fp16" or "fp32"."""
        if io == "auto":
            io = "mmap" if zero_copy_supported() else "read"
        if io not in IO_MODES:
            raise STIError(f"unknown io mode {io!r}", f"use one of {', '.join(IO_MODES)} or auto")
        if io == "mmap" and not zero_copy_supported():
            raise STIError("io='mmap' needs mmap with madvise (Linux)", "use io='read'")
        self.io_mode = io
        if store.family != "llama":
            raise STIError(f"the store holds a {store.family} model; the streaming decoder runs LLaMA-family stores",
                           "pack a decoder such as smollm2")
        if len(schedule.layers) != store.num_layers:
            raise STIError(f"the schedule has {len(schedule.layers)} layers, the store {store.num_layers}",
                           "plan against this store")
        self.store, self.schedule, self.throttle, self.profile = store, schedule, throttle, kernel_profile
        store.read_pattern(sequential=True)  # every pass reads the streamed shards in file order
        self.cfg = store.config
        self.kv = kv
        self.kv_token_bytes = llama.kv_bytes_per_token(self.cfg, kv)  # also validates kv
        self._lock = threading.Lock()
        g = store.globals()
        self.norm = g["norm"]
        self.common = [store.layer_common(layer) for layer in range(store.num_layers)]
        self.tensors = {t.name: t for t in store.tensors(0)}
        self.fixed_bytes = self.norm.nbytes + sum(a.nbytes for c in self.common for a in c.values())
        order = schedule.stream_order()
        self.slot_bytes = max((store.shard_nbytes(*it) for it in order), default=0)
        per_layer = max((sum(1 for it in order if it[0] == layer) for layer in range(store.num_layers)), default=0)
        self.min_slots = max(per_layer, 1) if order else 0
        if slots is None:
            slots = (read_slots(per_layer) if schedule.memory_budget else len(order)) if order else 0
        self.n_slots = min(max(slots, self.min_slots), len(order))
        self.scratch_bytes = 4 * scratch_elements(store)
        self.preload_bytes = sum(store.shard_nbytes(layer, s, self._bits(layer, s)) for layer, s in schedule.preload)
        self.weight_bytes = self.fixed_bytes + self.preload_bytes + self.n_slots * self.slot_bytes + self.scratch_bytes
        self.batch = batch
        self.context = self._fit_context(batch, context)
        self.res = Residency(schedule.memory_budget)
        self.res.hold(self.weight_bytes)
        self._scratch = np.empty(self.scratch_bytes // 4, np.float32)
        self._ops: dict[tuple, dict] = {}  # (slot or ("pre"|"map", layer, s), layout) -> {name: operator}
        self.preloaded = {}
        for layer, s in sorted(schedule.preload):
            raw = store.read_shard_bytes(layer, s, self._bits(layer, s), verify=True)
            self.preloaded[(layer, s)] = self._operators(("pre", layer, s), layer, s, raw)
        self._slots: list[bytearray] = []
        self.regions: dict[tuple[int, int], tuple[mmap.mmap, int, int]] = {}  # (layer, s) -> (map, offset, length)
        self.mapped_ops: dict[tuple[int, int], dict] = {}  # (layer, s) -> operators over the mapped bytes
        self.verified: set[tuple[int, int, int]] = set()  # shard versions checked by this engine
        if self.io_mode == "read":
            self._slots = [bytearray(self.slot_bytes) for _ in range(self.n_slots)]
        else:
            self._map_streamed(order)
        self._layer_w: dict[int, dict] = {}  # layer -> its weight dict, when its operators never change
        self._slot_w: dict[tuple, dict] = {}  # read mode: (layer, its shards' slots...) -> its weight dict
        self._head_plan = self._head_runs()
        self._head_ops: dict[int, object] = {}  # run -> its operator (preloaded or mapped shards)
        if self.io_mode == "mmap":  # mapped and preloaded shards: the same views every pass
            for layer, shards in enumerate(schedule.layers):
                self._layer_w[layer] = self._layer_weights(
                    layer, [self._shard_ops(layer, s, None if (layer, s) in self.preloaded else 0) for s in sorted(shards)],
                    whole=True)
        self._measure_kernels()
        self._io: _Stream | None = None

    def _map_streamed(self, order) -> None:
        maps: dict[str, mmap.mmap] = {}
        for layer, s, bits in order:
            path, off, n = self.store.shard_location(layer, s, bits)
            m = maps.get(path.name)
            if m is None:
                fd = os.open(path, os.O_RDONLY)
                try:
                    m = maps[path.name] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                finally:
                    os.close(fd)
            self.regions[(layer, s)] = (m, off, n)
            view = memoryview(m)[off:off + n]
            self.mapped_ops[(layer, s)] = self._operators(("map", layer, s), layer, s, view)

    def _measure_kernels(self) -> None:
        """Choose the one-token kernel of every packed shard shape now, before a request's BLAS
        threads spin (see ``sti.api.Generator._measure_decode_kernels``)."""
        if self.profile is None:
            return
        seen = set()
        heads = {k: self._head_op(k, run, [] if (HEAD, run[0]) in self.preloaded else [0] * len(run))
                 for k, run in enumerate(self._head_plan) if len(run) > 1}  # (mapped or preloaded)
        for ops in [*self.preloaded.values(), *self.mapped_ops.values(), *self._layer_w.values(), heads]:
            for op in ops.values():
                op = getattr(op, "small", op)  # sti.linops.BySize
                if isinstance(op, Packed) and (op.t.kind, op.shape, op.t.bits) not in seen:
                    seen.add((op.t.kind, op.shape, op.t.bits))
                    op._kernel(1)
                elif isinstance(op, Q1Stack) and (op.shape, op.bits) not in seen:
                    seen.add((op.shape, op.bits))
                    op._stack_threads(1)

    # ------------------------------------------------------------------ sizes

    def _bits(self, layer: int, s: int) -> int:
        return self.schedule.head[s] if layer == HEAD else self.schedule.layers[layer][s]

    def request_bytes(self, batch: int, tokens: int) -> int:
        """What a request holds besides weights: its KV cache and its tokens' embedding rows."""
        c = self.cfg
        return batch * tokens * (self.kv_token_bytes + 4 * c.hidden_size)

    def _fit_context(self, batch: int, context: int | None) -> int:
        budget = self.schedule.memory_budget
        limit = self.cfg.max_position if context is None else min(int(context), self.cfg.max_position)
        if not budget:
            return limit
        room = budget - self.weight_bytes
        fits = max(0, room) // self.request_bytes(batch, 1)
        if fits < 1 or (context is not None and fits < limit):
            want = limit if context is not None else 1
            raise STIError(f"memory budget {budget:,} B cannot run this schedule for {want} tokens x batch {batch}: "
                           f"weights need {self.weight_bytes:,} B ({self.n_slots} read buffers of "
                           f"{self.slot_bytes:,} B, {self.preload_bytes:,} B preloaded, {self.scratch_bytes:,} B "
                           f"scratch, {self.fixed_bytes:,} B norms) and the KV cache {self.request_bytes(batch, 1):,} B "
                           f"per token",
                           f"raise the budget to at least {self.weight_bytes + self.request_bytes(batch, want):,} B, "
                           f"or preload less / use lower bitwidths")
        return int(min(limit, fits))

    def new_cache(self, batch: int, tokens: int) -> llama.KVCache:
        """A KV cache for ``tokens`` positions of ``batch`` sequences, held in the budget (give it
        back with :meth:`free_cache`)."""
        if batch * tokens > self.batch * self.context:
            raise STIError(f"a request of {tokens} tokens x batch {batch} does not fit: the engine was sized for "
                           f"{self.context} tokens x batch {self.batch} under its memory budget",
                           "shorten the prompt or --max-tokens, lower --batch, or raise --memory")
        cache = llama.KVCache(self.cfg, batch, tokens, dtype=self.kv)
        cache.held = self.request_bytes(batch, tokens)
        self.res.hold(cache.held)
        return cache

    def free_cache(self, cache) -> None:
        self.res.release(getattr(cache, "held", 0))
        cache.held = 0

    # ------------------------------------------------------------------ operators over packed bytes

    def _operators(self, key, layer: int, s: int, raw) -> dict:
        """{shard tensor name: operator} over ``raw`` (a slot or a preloaded buffer), cached per
        (buffer, layout): a slot's bytes change, the views into it do not."""
        bits = self._bits(layer, s)
        layout = self.store._version(layer, s, bits).layout
        ops = self._ops.get((key, layout))
        if ops is None:
            ops = self._ops[(key, layout)] = shard_operators(self.store, layer, s, bits, raw, self.profile,
                                                             self._scratch)
        return ops

    def _layer_weights(self, layer: int, shard_ops: list[dict], whole: bool = False) -> dict:
        """The dict ``llama.layer`` runs on: the layer's unsharded tensors and its matrices
        (:func:`layer_matrices`) from the operators of every shard of the layer."""
        return {**self.common[layer], **layer_matrices(self.tensors.values(), shard_ops, whole)}

    def _shard_ops(self, layer: int, s: int, slot: int | None) -> dict:
        if slot is None:
            return self.preloaded[(layer, s)]
        if self.io_mode == "mmap":
            return self.mapped_ops[(layer, s)]
        return self._operators(slot, layer, s, self._slots[slot])

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start the IO worker (the first pass's reads begin now). While it runs, BLAS (prefill's
        products) runs on one thread: an idle OpenBLAS thread spins on the core the IO worker
        needs (``sti.blas``)."""
        if self._io is None:
            self._blas = blas.limited(1)
            self._blas.__enter__()
            self._io = _Stream(self)

    def stop(self) -> None:
        if self._io is not None:
            self._io.close()
            self._io = None
            self._blas.__exit__(None, None, None)

    def forward(self, ids: np.ndarray, cache: llama.KVCache, all_logits: bool = False) -> np.ndarray:
        """One pass: ids (B, T) appended at cache.length -> logits (B, V) of the last token
        (``all_logits``: (B, T, V)). Streams every non-resident shard once."""
        with self._lock:
            self.start()
            try:
                with exact_products(ids.shape[1] > 1):  # a prompt's tokens: no int8 products
                    return self._forward(ids, cache, all_logits)
            except BaseException:  # a pass left half-consumed: the stream restarts with the next call
                self.stop()
                raise

    def _forward(self, ids, cache, all_logits):
        cfg = self.cfg
        B, T = ids.shape
        start = cache.length
        if start + T > cache.capacity:
            raise STIError(f"the KV cache holds {cache.capacity} tokens; {start} + {T} do not fit",
                           "allocate the cache for the whole request")
        io = self._io
        cos, sin = llama.rope_tables(cfg, llama.positions(start, T, cache.pad))
        x = self.store.embedding_rows(ids.reshape(-1)).reshape(B, T, cfg.hidden_size)
        for layer, shards in enumerate(self.schedule.layers):
            got = [io.take(layer, s) if (layer, s) not in self.preloaded else None for s in sorted(shards)]
            w = self._layer_w.get(layer)
            if w is None:  # read mode: the operators over the slots this pass's shards are in
                w = self._slot_w.get((layer, *got))
                if w is None:
                    w = self._slot_w[(layer, *got)] = self._layer_weights(
                        layer, [self._shard_ops(layer, s, slot) for s, slot in zip(sorted(shards), got)], whole=True)
            x = llama.layer(cfg, x, w, cache.k[layer], cache.v[layer], start, cos, sin, cache.pad)
            io.give_back([slot for slot in got if slot is not None])
        cache.length = start + T
        h = llama.rms_norm(x if all_logits else x[:, -1:], self.norm, cfg.rms_eps)  # (B, T', H)
        h2 = np.ascontiguousarray(h.reshape(-1, cfg.hidden_size))
        logits = self._head_logits(h2, io)
        io.end_pass()
        return logits.reshape(B, T, -1) if all_logits else logits.reshape(B, -1)

    def _head_runs(self) -> list[list[int]]:
        """The head shards in the runs ``_head_logits`` multiplies as one matrix each: adjacent
        preloaded shards, and adjacent streamed ones in runs of up to ``HEAD_RUN`` and half the
        read slots (a run's shards are all held at once; read mode: one shard, whose slot varies). A
        fixed partition: which kernels run, and so the logits, never depend on IO timing."""
        most = max(1, min(HEAD_RUN, self.n_slots // 2)) if self.io_mode == "mmap" else 1
        runs: list[list[int]] = []
        for s in sorted(self.schedule.head):
            pre = (HEAD, s) in self.preloaded
            last = runs[-1] if runs else None
            if last and ((HEAD, last[0]) in self.preloaded) == pre and (pre or len(last) < most):
                last.append(s)
            else:
                runs.append([s])
        return runs

    def _head_logits(self, h2: np.ndarray, io: "_Stream") -> np.ndarray:
        """h2 (N, H) @ lm_head.T, run by run (``_head_runs``), each as one product over the
        shards' bytes in place (``tiled`` for GGML blocks, ``stack_q1`` for sti-q1 versions)."""
        logits = np.empty((h2.shape[0], self.cfg.vocab_size), np.float32)
        row = 0
        for k, run in enumerate(self._head_plan):
            slots = [io.take(HEAD, s) for s in run if (HEAD, s) not in self.preloaded]
            op = self._head_op(k, run, slots)
            n = op.shape[0]
            logits[:, row:row + n] = op.apply(h2) if not isinstance(op, np.ndarray) else h2 @ op.T
            row += n
            if slots:
                io.give_back(slots)
        return logits

    def _head_op(self, k: int, run: list[int], slots: list[int]):
        """The operator of run ``k`` (its shards' slots, if streamed): its one shard's, or the
        shards' rows as one matrix, built once (such runs are preloaded or mapped: fixed views)."""
        op = self._head_ops.get(k)
        if op is None:
            ops = [self._shard_ops(HEAD, s, slots[i] if slots else None)["lm_head"] for i, s in enumerate(run)]
            if len(ops) == 1:
                return ops[0]
            rows = RowStack(ops)
            op = self._head_ops[k] = tiled(rows) or stack_q1([rows]) or rows
        return op


def scratch_elements(store) -> int:
    """Float32 elements of a decoder's dequantization scratch: prefill dequantizes one shard
    matrix at a time into it (decode never does)."""
    return max((int(np.prod(e.shape)) for lay in store.manifest.layouts for e in lay
                if len(e.shape) == 2 and e.name != "lm_head"), default=0)


def shard_operators(store, layer: int, s: int, bits: int, raw, profile=None, scratch=None) -> dict:
    """{shard tensor name: operator} over ``raw``, the bytes of shard ``s`` of ``layer`` at
    ``bits``, without a copy: ``sti.linops.Packed`` for packed matrices (with the kernel choices of
    ``profile`` and the dequantization ``scratch``), float32 arrays as they lie; plus, under the
    names of ``llama.FUSED``, a shard's adjacent q/k/v (gate/up) rows as one matrix where they are
    GGML blocks (``_adjacent_rows``)."""
    ops = {}
    for name, t in store.shard_tensors_raw(layer, s, bits, raw, verify=False).items():
        if t.kind == "f32":
            ops[name] = np.asarray(t.buf) if t.buf.ndim == 1 else t.buf
        else:
            ops[name] = Packed(t, profile, scratch=scratch)
    entries = {e.name: e for e in store.manifest.layouts[store._version(layer, s, bits).layout]}
    for fused, names in llama.FUSED.items():  # e.g. q, k, v rows of the shard as one matrix
        t = _adjacent_rows(raw, [entries.get(n) for n in names])
        if t is not None:
            ops[fused] = Packed(t, profile, scratch=scratch)
    return ops


def layer_matrices(tensors, shard_ops: list[dict], whole: bool = False) -> dict:
    """{target name: operator}: a layer's matrices (``tensors``: the store's ``ShardTensor`` of a
    layer shard) from the operators of every shard of the layer (:func:`shard_operators`, in shard
    order): a shard's adjacent q/k/v (gate/up) rows run as one product per shard (``SegmentStack``).
    ``whole``: decode multiplies each layer matrix as one, read in place from the shards
    (``sti.linops.tiled``): one kernel call per matrix instead of one per shard, and every output
    the same sum as in the unsharded matrix; a matrix that cannot be tiled (sti-q1 versions, or no
    C kernels) stays the composite of its shards' operators, except that sti-q1 shards' q, k, v
    (gate, up) rows become one :class:`sti.linops.Q1Stack` under the ``llama.FUSED`` name, and
    their output (down) projection columns one more: a decode batch's int8 product over all of a
    matrix's shards in one call."""
    w = {}
    done = set()
    for fused, names in llama.FUSED.items():
        if all(fused in ops for ops in shard_ops):
            sizes = {tuple(ops[n].shape[0] for n in names) for ops in shard_ops}
            if len(sizes) == 1:
                unfused = [RowStack([ops[n] for ops in shard_ops]) for n in names]  # for prefill
                w[fused] = SegmentStack([ops[fused] for ops in shard_ops], sizes.pop(), unfused)
                done.update(names)
    for st in tensors:
        if st.target in done:
            continue
        parts = [ops[st.name] for ops in shard_ops]
        w[st.target] = ColSum(parts) if st.stored_axis == 1 else RowStack(parts)
    if whole:
        for name, op in w.items():
            w[name] = tiled(op) or op
        for fused, names in llama.FUSED.items():  # sti-q1 shards: q, k, v (gate, up) as one stack
            stack = stack_q1([w[n] for n in names]) if fused not in w and all(n in w for n in names) else None
            if stack is not None:
                w[fused] = stack
                for n in names:
                    del w[n]
        for name, op in w.items():  # and the output and down projections' column shards
            if isinstance(op, ColSum):
                w[name] = stack_q1([op]) or op
    return w


class _Stream:
    """The IO worker and its slot pool for one run of passes."""

    def __init__(self, eng: StreamingDecoder):
        self.eng = eng
        self.order = eng.schedule.stream_order()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(eng.n_slots):
            self.free.put(i)
        self.ready: dict[tuple[int, int, int], int] = {}  # (pass, layer, shard) -> slot
        self.cv = threading.Condition()
        self.pass_no = 0  # the compute thread's pass
        self.failure: list[BaseException] = []
        self.stats = {"bytes": 0, "reads": 0, "io_s": 0.0, "stall_s": 0.0}
        self.held: dict[int, tuple[int, int]] = {}  # mmap mode: slot -> the shard whose pages it holds
        self.holder: dict[tuple[int, int], int] = {}  # and back
        self.stale: set[int] = set()  # slots given back whose pages are still mapped in
        self._populate = True  # MADV_POPULATE_READ works here (else pages are touched by the checksum)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sti-io", daemon=True)
        self.thread.start()

    def _run(self):
        eng = self.eng
        try:
            p = 0
            while not self._stop.is_set():
                for layer, s, bits in self.order:
                    slot = self._get_free()
                    if slot is None:
                        return
                    n = eng.store.shard_nbytes(layer, s, bits)
                    t0 = time.perf_counter()
                    if eng.io_mode == "read":
                        eng.store.read_shard_bytes(layer, s, bits, verify=True, out=eng._slots[slot])
                    else:
                        self._map_in(slot, layer, s, bits)
                    if eng.throttle:
                        eng.throttle.pace(t0, n)
                    dt = time.perf_counter() - t0
                    with self.cv:
                        self.stats["bytes"] += n
                        self.stats["reads"] += 1
                        self.stats["io_s"] += dt
                        self.ready[(p, layer, s)] = slot
                        self.cv.notify_all()
                p += 1
                if not self.order:
                    return
        except BaseException as e:  # surfaced to the compute thread
            with self.cv:
                self.failure.append(e)
                self.cv.notify_all()

    def _map_in(self, slot: int, layer: int, s: int, bits: int) -> None:
        """Fault the shard's pages in as the slot's content (dropping what the slot held before),
        and verify its checksum on the engine's first fetch of this version."""
        eng = self.eng
        if slot in self.held:
            self._drop_stale()
        m, off, n = eng.regions[(layer, s)]
        first = (layer, s, bits) not in eng.verified
        if self._populate:
            try:
                advise(m, off, n, MADV_POPULATE_READ)
            except OSError:  # kernel < 5.14: touching every page (the checksum pass) faults them in
                self._populate = False
        if first:
            eng.store.check_shard(layer, s, bits, memoryview(m)[off:off + n])
            eng.verified.add((layer, s, bits))
        elif not self._populate:
            sum64_int(memoryview(m)[off:off + n])
        self.held[slot] = (layer, s)
        self.holder[(layer, s)] = slot

    def _drop_stale(self) -> None:
        """Unmap the pages of every slot given back since the last drop (unless a newer slot
        holds the same shard), adjacent shards as one range: a layer's shards lie back to back
        in a version file, so this is about one ``madvise`` per layer instead of one per shard.
        Each unmapping interrupts the other core for a TLB shootdown (an IPI, a VM exit on a
        virtual machine); SmolLM2 at a 10 % budget took 130 of them per token one by one."""
        with self.cv:
            slots, self.stale = self.stale, set()
        ranges = []
        for slot in slots:
            key = self.held.pop(slot, None)
            if key is not None and self.holder.get(key) == slot:
                del self.holder[key]
                ranges.append(self.eng.regions[key])
        for m, off, n in _merged(ranges):
            advise(m, off, n, mmap.MADV_DONTNEED)

    def _get_free(self):
        while not self._stop.is_set():
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def take(self, layer: int, s: int) -> int:
        key = (self.pass_no, layer, s)
        with self.cv:
            if key not in self.ready and not self.failure:
                t0 = time.perf_counter()
                while key not in self.ready and not self.failure:
                    self.cv.wait()
                self.stats["stall_s"] += time.perf_counter() - t0
            if self.failure:
                raise self.failure[0]
            return self.ready.pop(key)

    def give_back(self, slots) -> None:
        with self.cv:
            self.stale.update(slots)
        for slot in slots:
            self.free.put(slot)

    def end_pass(self) -> None:
        self.pass_no += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.stale.update(self.held)
        self._drop_stale()


def _merged(ranges) -> list[tuple[mmap.mmap, int, int]]:
    """(map, offset, length) ranges with the ones that touch (up to page padding) joined."""
    out: list[list] = []
    for m, off, n in sorted(ranges, key=lambda r: (id(r[0]), r[1])):
        if out and out[-1][0] is m and out[-1][1] + out[-1][2] <= off <= _page_up(out[-1][1] + out[-1][2]):
            out[-1][2] = off + n - out[-1][1]
        else:
            out.append([m, off, n])
    return [tuple(r) for r in out]


def _page_up(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _adjacent_rows(raw, entries) -> LowBitTensor | None:
    """Layout entries of GGML-block matrices with one kind and column count whose bytes lie back
    to back in ``raw`` (a shard version's bytes) as one matrix of all their rows, without a copy;
    None when they are not adjacent or not GGML blocks (sti-q1 sections do not concatenate)."""
    if any(e is None for e in entries):
        return None
    kind, cols = entries[0].dtype, entries[0].shape[1]
    if kind not in GGML or any(e.dtype != kind or e.shape[1] != cols for e in entries):
        return None
    if any(a.offset + a.nbytes != b.offset for a, b in zip(entries, entries[1:])):
        return None
    rows = sum(e.shape[0] for e in entries)
    nbytes = sum(e.nbytes for e in entries)
    buf = np.frombuffer(memoryview(raw).cast("B"), np.uint8, count=nbytes, offset=entries[0].offset)
    return LowBitTensor(kind, (rows, cols), buf.reshape(rows, -1))
