"""Generation from a decoder shard store under a memory budget: every weight that is not resident
is streamed from storage on every forward pass (each decode step is one pass over the model).

The runtime owns one IO thread and a fixed pool of read buffers ("slots"). The IO worker reads
the streamed shard versions in pass order (layers 0..L-1, then the LM-head shards) into free
slots and checks their checksums; it never stops at a token boundary, so while the compute
thread finishes the last layers and the head of token t, the first layers of token t+1 are
already being read (prefetch across the token boundary), as far as free slots allow. The
compute thread runs a layer once all of its shards are present, multiplying straight from the
packed bytes in the slots (``sti.linops`` operators over ``sti.lowbit`` kernels: fused
matrix-vector products for decode, dequantize + BLAS into a fixed scratch for prefill), then
hands the slots back. Shards in the schedule's preload set are read once and stay resident.

Every byte the engine holds is in ``Residency`` (``sti.runtime``): the unsharded tensors, the
preloaded shards, the slot pool, the dequantization scratch, the KV cache and the activations'
embedding rows. Its peak never exceeds the budget: a schedule or a request that could not fit is
refused up front with the smallest budget that would.

Several sequences (a batch) share every streamed pass, so the IO cost per token falls with the
batch size (the FlexGen idea).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from sti.errors import STIError
from sti.linops import ColSum, Packed, RowStack
from sti.models import llama
from sti.runtime import Residency, Throttle
from sti.store import format as fmt

HEAD = fmt.HEAD


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
                 kernel_profile=None, batch: int = 1, context: int | None = None, slots: int | None = None):
        """``batch`` x ``context`` tokens (prompt + generated; default: the model's context, or
        what the budget allows) is the largest request the engine reserves KV cache for.
        ``slots``: read buffers (default: one layer's shards plus two, or every streamed shard
        when the budget is unbounded)."""
        if store.family != "llama":
            raise STIError(f"the store holds a {store.family} model; the streaming decoder runs LLaMA-family stores",
                           "pack a decoder such as smollm2")
        if len(schedule.layers) != store.num_layers:
            raise STIError(f"the schedule has {len(schedule.layers)} layers, the store {store.num_layers}",
                           "plan against this store")
        self.store, self.schedule, self.throttle, self.profile = store, schedule, throttle, kernel_profile
        self.cfg = store.config
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
            slots = (self.min_slots + 2 if schedule.memory_budget else len(order)) if order else 0
        self.n_slots = min(max(slots, self.min_slots), len(order))
        # prefill dequantizes one shard matrix at a time into this (decode never does)
        self.scratch_bytes = 4 * max((int(np.prod(e.shape)) for lay in store.manifest.layouts for e in lay
                                      if len(e.shape) == 2 and e.name != "lm_head"), default=0)
        self.preload_bytes = sum(store.shard_nbytes(layer, s, self._bits(layer, s)) for layer, s in schedule.preload)
        self.weight_bytes = self.fixed_bytes + self.preload_bytes + self.n_slots * self.slot_bytes + self.scratch_bytes
        self.batch = batch
        self.context = self._fit_context(batch, context)
        self.res = Residency(schedule.memory_budget)
        self.res.hold(self.weight_bytes)
        self._slots = [bytearray(self.slot_bytes) for _ in range(self.n_slots)]
        self._scratch = np.empty(self.scratch_bytes // 4, np.float32)
        self._ops: dict[tuple, dict] = {}  # (slot or ("pre", layer, s), layout) -> {name: operator}
        self.preloaded = {}
        for layer, s in sorted(schedule.preload):
            raw = store.read_shard_bytes(layer, s, self._bits(layer, s), verify=True)
            self.preloaded[(layer, s)] = self._operators(("pre", layer, s), layer, s, raw)
        self._io: _Stream | None = None

    # ------------------------------------------------------------------ sizes

    def _bits(self, layer: int, s: int) -> int:
        return self.schedule.head[s] if layer == HEAD else self.schedule.layers[layer][s]

    def request_bytes(self, batch: int, tokens: int) -> int:
        """What a request holds besides weights: its KV cache and its tokens' embedding rows."""
        c = self.cfg
        return 4 * batch * tokens * (2 * c.num_layers * c.num_kv_heads * c.head_dim + c.hidden_size)

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
        cache = llama.KVCache(self.cfg, batch, tokens)
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
        layout = self.store._version(layer, s, self._bits(layer, s)).layout
        ops = self._ops.get((key, layout))
        if ops is None:
            raw_t = self.store.shard_tensors_raw(layer, s, self._bits(layer, s), raw, verify=False)
            ops = {}
            for name, t in raw_t.items():
                if t.kind == "f32":
                    ops[name] = np.asarray(t.buf) if t.buf.ndim == 1 else t.buf
                else:
                    ops[name] = Packed(t, self.profile, scratch=self._scratch)
            self._ops[(key, layout)] = ops
        return ops

    def _layer_weights(self, layer: int, shard_ops: list[dict]) -> dict:
        """The dict ``llama.layer`` runs on, from the operators of every shard of the layer."""
        w = dict(self.common[layer])
        for name, st in self.tensors.items():
            parts = [ops[name] for ops in shard_ops]
            w[st.target] = ColSum(parts) if st.stored_axis == 1 else RowStack(parts)
        return w

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start the IO worker (the first pass's reads begin now)."""
        if self._io is None:
            self._io = _Stream(self)

    def stop(self) -> None:
        if self._io is not None:
            self._io.close()
            self._io = None

    def forward(self, ids: np.ndarray, cache: llama.KVCache, all_logits: bool = False) -> np.ndarray:
        """One pass: ids (B, T) appended at cache.length -> logits (B, V) of the last token
        (``all_logits``: (B, T, V)). Streams every non-resident shard once."""
        with self._lock:
            self.start()
            try:
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
            ops = [self.preloaded[(layer, s)] if slot is None else self._operators(slot, layer, s, self._slots[slot])
                   for s, slot in zip(sorted(shards), got)]
            x = llama.layer(cfg, x, self._layer_weights(layer, ops), cache.k[layer], cache.v[layer], start, cos, sin,
                            cache.pad)
            io.give_back([slot for slot in got if slot is not None])
        cache.length = start + T
        h = llama.rms_norm(x if all_logits else x[:, -1:], self.norm, cfg.rms_eps)  # (B, T', H)
        h2 = np.ascontiguousarray(h.reshape(-1, cfg.hidden_size))
        logits = np.empty((h2.shape[0], cfg.vocab_size), np.float32)
        row = 0
        for s in sorted(self.schedule.head):
            slot = io.take(HEAD, s) if (HEAD, s) not in self.preloaded else None
            op = (self.preloaded[(HEAD, s)] if slot is None else self._operators(slot, HEAD, s, self._slots[slot]))["lm_head"]
            n = op.shape[0]
            logits[:, row:row + n] = op.apply(h2) if not isinstance(op, np.ndarray) else h2 @ op.T
            row += n
            if slot is not None:
                io.give_back([slot])
        io.end_pass()
        return logits.reshape(B, T, -1) if all_logits else logits.reshape(B, -1)


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
                    eng.store.read_shard_bytes(layer, s, bits, verify=True, out=eng._slots[slot])
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
        for slot in slots:
            self.free.put(slot)

    def end_pass(self) -> None:
        self.pass_no += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
