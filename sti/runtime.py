"""Pipelined execution of an encoder from a shard store, under a memory budget.

One IO worker reads the streamed shards in plan order into a bounded buffer (off the compute
thread) while the caller's thread computes: a layer runs chunk by
chunk, each chunk as soon as its shards are present, dequantizing one part of one chunk at a
time into a fixed float32 scratch arena (one C call per shard and part), and frees a chunk's
streamed shards when it is done so the IO worker can read further ahead. Preloaded shards stay
in memory across requests. For short requests (``Schedule.int8_max_tokens``, measured by the
device profile) a layer's quantized shards are not dequantized at all: int8 products read their
k-bit codes straight from the shard bytes (``sti.lowbit.qmm_stack`` for q/k/v and up,
``qmmt_stack`` for the output and down projections, stored input-major), one call per part for
all of them, 1.3-3x faster than dequantization + BLAS at 32 tokens.

The IO worker reads a layer's shards by one call (``Store.read_many``: the C kernels read them
one after another with the GIL released), into buffers it keeps and reuses
(``Residency.take_buffers``), and checks a shard version's checksum on the engine's first read of
it, or on every read for a cold engine (``VERIFY_MODES``). All three matter because on a small
machine the worker takes CPU, and the GIL, from the compute: MiniLM's 2-8-bit and float32 shards
streamed from the page cache, 32 tokens, ran 3-22% faster per request than with a new buffer and
a checksum per read (measured here, alternating engines in one process; reuse alone 2-14%), and
one read call per layer instead of per shard took 3-9% more off warm 3-8-bit requests and 5-21%
off cold ones.

Every weight byte the engine holds is accounted in ``Residency``: the unsharded tensors
(position/type embeddings, LayerNorms, biases), the preload buffer, the read buffers (in flight
or spare), the dequantization scratch arena and the word-embedding rows of the current input.
Its peak never exceeds the budget: the IO worker waits for room, and a schedule that could not
fit is refused before it runs. An engine is built for requests of up to ``max_tokens`` tokens
and holds only the position rows those use, and no dequantization arena where all of them run
int8 products on quantized shards (MiniLM at 32 tokens: 0.17 MB before any shard, not 1.69).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from sti.errors import STIError
from sti.machine import available_cpus
from sti.models import bert

# When the IO worker checks a streamed shard's checksum: on every read ("always"), or on the
# engine's first read of each shard version ("first"); "auto": always for a cold engine (every
# read comes from the device), else first (later reads come from the page cache the first one
# was checked through, unless the OS evicted it and reads it again under its own checks).
VERIFY_MODES = ("auto", "always", "first")


@dataclass
class Schedule:
    """What the runtime needs from a plan: which shards at which bitwidth, what stays resident."""

    layers: list[dict[int, int]]  # per layer: {shard index: bits}
    preload: set[tuple[int, int]] = field(default_factory=set)  # (layer, shard) kept in memory
    memory_budget: int = 0  # bytes; 0 = unbounded
    chunk_shards: int = 4  # shards dequantized together
    order: list[tuple[int, int, int]] | None = None  # the IO worker's read order; default layer-major
    # requests of at most this many tokens multiply quantized shards' weights with int8 products
    # read straight from the shard bytes (sti.lowbit.qmm_stack, qmmt_stack) instead of
    # dequantizing them for BLAS; 0: never. The device profile measures where that is faster.
    int8_max_tokens: int = 0

    @classmethod
    def from_plan(cls, plan, chunk_shards: int = 4) -> "Schedule":
        """The runtime's view of a ``sti.plan.Plan``."""
        return cls([dict(zip(lp.shards, lp.bits)) for lp in plan.layers], preload=set(map(tuple, plan.preload)),
                   memory_budget=plan.memory_budget, chunk_shards=chunk_shards,
                   order=[tuple(r) for r in plan.stream_order], int8_max_tokens=plan.int8_max_tokens)

    @classmethod
    def full(cls, store, bits: int = 32, **kw) -> "Schedule":
        return cls([{i: bits for i in store.shard_indices(layer)} for layer in range(store.num_layers)], **kw)

    def stream_order(self) -> list[tuple[int, int, int]]:
        if self.order is not None:
            return list(self.order)
        return [(layer, s, b) for layer, shards in enumerate(self.layers)
                for s, b in sorted(shards.items()) if (layer, s) not in self.preload]


@dataclass
class Trace:
    """What one request did: IO and compute intervals (seconds from the request's start)."""

    io: list[tuple[int, int, int, float, float, int]] = field(default_factory=list)  # layer, shard, bits, t0, t1, bytes
    compute: list[tuple[int, float, float]] = field(default_factory=list)  # layer, t0, t1
    stalls: list[tuple[int, float, float]] = field(default_factory=list)  # layer waiting for its shards
    bytes_read: int = 0
    resident_peak: int = 0
    latency: float = 0.0
    cold: bool = False
    storage: str = "real"
    int8: bool = False  # quantized shards' products ran as int8 products

    @property
    def stall_time(self) -> float:
        return sum(t1 - t0 for _, t0, t1 in self.stalls)

    @property
    def fill(self) -> float:
        """Seconds before the first layer's compute: the input's embedding rows."""
        return min((t0 for _, t0, _ in self.compute), default=0.0)

    def to_chrome(self) -> dict:
        """Chrome trace-event JSON (chrome://tracing, Perfetto)."""
        ev = []
        for layer, shard, bits, t0, t1, n in self.io:
            ev.append({"name": f"read L{layer} S{shard} {bits}b", "ph": "X", "pid": 1, "tid": "io",
                       "ts": t0 * 1e6, "dur": (t1 - t0) * 1e6, "args": {"bytes": n}})
        for layer, t0, t1 in self.compute:
            ev.append({"name": f"layer {layer}", "ph": "X", "pid": 1, "tid": "compute", "ts": t0 * 1e6, "dur": (t1 - t0) * 1e6})
        for layer, t0, t1 in self.stalls:
            ev.append({"name": f"stall L{layer}", "ph": "X", "pid": 1, "tid": "stall", "ts": t0 * 1e6, "dur": (t1 - t0) * 1e6})
        return {"traceEvents": ev, "displayTimeUnit": "ms",
                "otherData": {"bytes_read": self.bytes_read, "resident_peak": self.resident_peak,
                              "latency_ms": self.latency * 1e3, "cold": self.cold, "storage": self.storage,
                              "int8": self.int8}}

    def save_png(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 2.4))
        ms = 1e3
        ax.broken_barh([(t0 * ms, (t1 - t0) * ms) for *_, t0, t1, _n in self.io], (20, 8), color="tab:blue")
        ax.broken_barh([(t0 * ms, (t1 - t0) * ms) for _, t0, t1 in self.compute], (10, 8), color="tab:green")
        ax.broken_barh([(t0 * ms, (t1 - t0) * ms) for _, t0, t1 in self.stalls], (0, 8), color="tab:red")
        ax.set_yticks([4, 14, 24], ["stall", "compute", "IO"])
        ax.set_xlabel("ms since request start")
        ax.set_title(f"latency {self.latency * ms:.1f} ms, {self.bytes_read / 1e6:.2f} MB read, "
                     f"peak resident weights {self.resident_peak / 1e6:.2f} MB ({self.storage} storage"
                     f"{', cold' if self.cold else ''})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


class Residency:
    """Bytes of weights held, by the engine's own accounting; blocks IO when the buffer is full."""

    def __init__(self, budget: int):
        self.budget = budget or (1 << 62)
        self.now = 0
        self.peak = 0
        self._cv = threading.Condition()
        self._spare: dict[int, list[bytearray]] = {}  # read buffers handed back, by size (still held)

    def hold(self, n: int) -> None:
        with self._cv:
            if self.now + n > self.budget:
                self._free_spares(self.now + n - self.budget)
            if self.now + n > self.budget:
                raise STIError(f"internal: holding {n} more bytes would exceed the {self.budget}-byte budget "
                               f"({self.now} held)", "report this; the schedule should have been refused")
            self._add(n)

    def release(self, n: int) -> None:
        with self._cv:
            self.now -= n
            self._cv.notify_all()

    # Read buffers. A buffer stays held from its first use to the engine's end and is reused by
    # later reads of its size. Alone, a read into a new buffer costs no more; beside the compute
    # it does: MiniLM's warm requests (32 tokens, uniform 2/4/8/32-bit at a 10 MB budget, every
    # read checksummed) ran 2-14% faster with reused buffers, alternating engines in one process
    # (a new large buffer is faulted in page by page, and freeing it unmaps its pages, which
    # interrupts the compute's core for a TLB shootdown).

    def take_buffers(self, sizes: list[int], stop: threading.Event) -> list[bytearray] | None:
        """Read buffers for the first of ``sizes`` and as many of the next ones as the budget has
        room for now, in order: spare ones of their sizes, else new ones (spare buffers of other
        sizes are freed to make room). Waits for room for the first; None when ``stop`` is set
        while waiting."""
        got: list = []
        with self._cv:
            while not self._reserve(sizes[0], got):
                if stop.is_set():
                    return None
                self._cv.wait(0.05)
            for n in sizes[1:]:
                if not self._reserve(n, got):
                    break
        return [bytearray(n) if b is None else b for b, n in zip(got, sizes)]

    def _reserve(self, n: int, got: list) -> bool:
        """Append a spare buffer of ``n`` bytes to ``got``, or None once ``n`` new bytes are counted
        within the budget (the caller allocates them, outside the lock); whether there was room.
        Called with the lock held."""
        spare = self._spare.get(n)
        if spare:
            got.append(spare.pop())
            return True
        if self.now + n <= self.budget or self._free_spares(self.now + n - self.budget, keep=n):
            self._add(n)
            got.append(None)
            return True
        return False

    def give_buffers(self, bufs) -> None:
        """Hand read buffers back for reuse, all at once (a waiting reader wakes once, to room for
        all of them); their bytes stay held."""
        with self._cv:
            for buf in bufs:
                self._spare.setdefault(len(buf), []).append(buf)
            self._cv.notify_all()

    @property
    def spare_bytes(self) -> int:
        with self._cv:
            return sum(len(b) for bufs in self._spare.values() for b in bufs)

    def _free_spares(self, need: int, keep: int = -1) -> bool:
        """Free spare buffers (not those of size ``keep``) until ``need`` bytes are released;
        whether that many were. Called with the lock held."""
        for size in sorted(self._spare, reverse=True):
            bufs = self._spare[size]
            while bufs and need > 0 and size != keep:
                bufs.pop()
                self.now -= size
                need -= size
        return need <= 0

    def _add(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)


class Throttle:
    """Emulated slower storage: a device that serves reads one after another, each taking
    latency + bytes / bandwidth of device time. A read issued at ``t_start`` completes at
    max(t_start, the previous read's completion) + latency + bytes / bandwidth, and the reader
    sleeps until then. The OS wakes a sleeper late (~0.1 ms measured on a small cloud VM, 20-30%
    of a 50 KB read at 200 MB/s); that delay belongs to the emulation, not to the device, so a read
    issued right after a late wake-up is charged from the previous completion: back-to-back
    reads run at exactly the emulated bandwidth."""

    def __init__(self, bandwidth: float, latency: float = 0.0, label: str | None = None):
        self.bandwidth, self.latency = bandwidth, latency
        self.label = label or f"emulated {bandwidth / 1e6:.0f} MB/s"
        self._free_at = 0.0  # when the device completes the reads issued so far (perf_counter s)
        self._late = 0.0  # how late the last sleeping reader woke
        self._lock = threading.Lock()

    def pace(self, t_start: float, nbytes: int, reads: int = 1) -> None:
        """Sleep until ``reads`` reads of ``nbytes`` in all, issued at ``t_start``, complete."""
        with self._lock:
            due = max(t_start - self._late, self._free_at) + self.latency * reads + nbytes / self.bandwidth
            self._free_at = due
        slept = False
        while (left := due - time.perf_counter()) > 0:
            time.sleep(left)
            slept = True
        with self._lock:
            self._late = time.perf_counter() - due if slept else 0.0


# Per chunk part (bert.STREAM_PARTS): the matrix int8 products compute, and whether it is stored
# input-major (wo_t, w_down_t: rows are inputs, weight groups run along the outputs, so the
# transposed product folds the scales into x; sti.lowbit.qmmt_stack).
INT8_PARTS = {"qkv": ("wqkv", False), "o": ("wo_t", True), "up": ("w_up", False), "down": ("w_down_t", True)}
# Threads of the int8 products: two where there are two cores. Measured on a 2-vCPU machine
# (MiniLM, 4 bits, medians of alternating runs): preloaded 5.9 -> 5.1 ms at 32 tokens and
# ~22 -> ~17 ms at 128; 30% preloaded, the rest read warm each request, 8.6-9.1 -> 6.2-7.0 ms
# at 32 tokens; read cold, no change (9.0 -> 8.7-9.0 ms: the reads bound it). Before kernel
# revision 8 a second thread made requests slower (the transposed product prepared its operands
# on one thread) and the IO worker's reads were thought to want the other core; they mostly
# wait on the kernel's copy or the device, and a product's caller takes back a late helper's tiles.
INT8_THREADS = min(2, available_cpus())


class _Int8Stack:
    """The matrix of one chunk part as an operator (``sti.ops.linear`` / ``sti.ops.matmul_add``):
    the chunk's shards' k-bit tensors read in place from their bytes (``bufs``, set before each
    use) by one int8 product call. ``prog``: their rows of the shards' decode programs, in the
    part's row order; ``shape``: the stacked matrix's."""

    def __init__(self, prog: np.ndarray, keys: list, threads: int):
        self.prog, self.keys, self.threads = prog, keys, threads
        self.shape = (int(prog[:, 3].sum()), int(prog[0, 4]))
        self.bufs: list = []

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for W stored output-major (q/k/v, up)."""
        from sti import lowbit

        out = np.empty((x.shape[0], self.shape[0]), np.float32)
        return lowbit.qmm_stack(x, out, self.bufs, self.prog, threads=self.threads)

    def matmul_add(self, x: np.ndarray, out: np.ndarray) -> None:
        """out += x @ W for W stored input-major (wo_t, w_down_t)."""
        from sti import lowbit

        lowbit.qmmt_stack(x, out, self.bufs, self.prog, accumulate=True, threads=self.threads)


class _IOThread:
    """An engine's IO worker thread, started once and kept for the engine's life: it runs one
    request's reads at a time (``submit``). A thread started per request cost the request
    0.2-0.3 ms here (MiniLM, warm, 32 tokens: ~4% of it), most of it the new thread taking the
    GIL before the request's own work could go on. It ends when the engine is collected."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_IOThread._serve, args=(self._jobs,), name="sti-io", daemon=True).start()

    @staticmethod
    def _serve(jobs) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            work, done = job
            job = None  # hold nothing of the engine while waiting for the next request
            try:
                work()
            finally:
                work = None
                done.set()

    def submit(self, work) -> threading.Event:
        """Run ``work()`` on the thread; the event is set when it has returned."""
        done = threading.Event()
        self._jobs.put((work, done))
        return done

    def close(self) -> None:
        self._jobs.put(None)


class StreamingEncoder:
    """Runs a BERT-family shard store under a ``Schedule``. Requests are serialised: one engine
    runs one request at a time (a second caller waits), so concurrent use is safe."""

    def __init__(self, store, schedule: Schedule, cold: bool = False, throttle: Throttle | None = None,
                 max_tokens: int | None = None, verify: str = "auto"):
        if store.family != "bert":
            raise STIError(f"the store holds a {store.family} model; the streaming encoder runs BERT-family stores",
                           "pack an encoder such as minilm")
        if len(schedule.layers) != store.num_layers:
            raise STIError(f"the schedule has {len(schedule.layers)} layers, the store {store.num_layers}",
                           "plan against this store")
        self.store, self.schedule, self.cold, self.throttle = store, schedule, cold, throttle
        if verify not in VERIFY_MODES:
            raise STIError(f"unknown verify mode {verify!r}", f"use one of {', '.join(VERIFY_MODES)}")
        self.verify_always = verify == "always" or (verify == "auto" and cold)
        self.verified: set[tuple[int, int, int]] = set()  # shard versions this engine has checked
        self.cfg = store.config
        # tokens per request (batch x length) the engine holds what they need for: position rows,
        # the dequantization arena, their embedding rows within the budget
        self.max_tokens = max_tokens or self.cfg.max_position
        self._lock = threading.Lock()
        self._io: _IOThread | None = None  # started by the first request
        self.res = Residency(schedule.memory_budget)
        g = store.globals()
        self.embed_table = g.pop("embed.word")
        # position rows past the longest request are never read: MiniLM's table is 786 KB, a
        # third of a 2.5% budget, of which a 32-token engine reads 49 KB
        g["embed.pos"] = g["embed.pos"][:self.max_tokens].copy()
        self.globals = g
        self.common = [store.layer_common(layer) for layer in range(store.num_layers)]
        self.fixed_bytes = sum(a.nbytes for a in g.values()) + sum(a.nbytes for c in self.common for a in c.values())
        self._shapes = self._shard_rows()
        self._int8_threads = self._int8_support()
        # every shard's rows of the transposed products' matrices come four at a time (equal shards)
        self._int8_whole = all(self._shapes[t][0] % 4 == 0 for part, (array, transposed) in INT8_PARTS.items()
                               if transposed for t in bert.STREAM_PARTS[part][array])
        self._arena_decodes = self._dequantizes()
        self.scratch_bytes = self._scratch_need()
        self._arena = np.empty(self.scratch_bytes // 4, np.float32)
        self._views: dict = {}
        self._programs: dict = {}
        self._calls: dict = {}
        # the IO worker's reads: the stream order, layer by layer
        self._reads = [list(g) for _, g in itertools.groupby(schedule.stream_order(), key=lambda r: r[0])]
        self._int8_ops: list[_Int8Stack] = []
        self.preload_bytes = sum(store.shard_nbytes(layer, s, schedule.layers[layer][s]) for layer, s in schedule.preload)
        self._check_fits()
        self.res.hold(self.fixed_bytes + self.scratch_bytes)
        self.preloaded: dict[tuple[int, int], bytes] = {}
        for layer, s in sorted(schedule.preload):
            raw = store.read_shard_bytes(layer, s, schedule.layers[layer][s], verify=True)
            self.res.hold(len(raw))
            self.preloaded[(layer, s)] = raw

    # ------------------------------------------------------------------ sizes and scratch

    def _shard_rows(self) -> dict[str, tuple[int, ...]]:
        """Shape of each tensor in one shard; every shard of the store has the same."""
        shapes = None
        for layer in range(self.store.num_layers):
            for s in self.store.shard_indices(layer):
                for bits in self.store.bits:
                    got = {e.name: tuple(e.shape) for e in self.store.manifest.layouts[self.store._version(layer, s, bits).layout]}
                    if shapes is None:
                        shapes = got
                    elif got != shapes:
                        raise STIError(f"shard (layer {layer}, index {s}) has tensor shapes {got}, others {shapes}",
                                       "the streaming encoder needs equal shards; re-pack the store with sti pack")
        return shapes

    def _part_floats(self, part: str, skip: str | None = None) -> int:
        """float32 elements one shard needs in the scratch arena for ``part`` (without the array ``skip``)."""
        return sum(int(np.prod(self._shapes[t])) for name, ts in bert.STREAM_PARTS[part].items() if name != skip
                   for t in ts)

    def _scratch_need(self) -> int:
        """The arena: the small arrays that int8 products leave to decode (the biases) of a whole
        layer's shards and, where some request dequantizes (``_arena_decodes``), a chunk's part
        decoded (``chunk_shards`` shards), whichever is larger. MiniLM: 6 KB for a 32-token engine
        whose shards all run int8 products, else 788 KB (four shards' up projections)."""
        most = max(len(self.store.shard_indices(layer)) for layer in range(self.store.num_layers))
        need = max(most * self._part_floats(p, skip=INT8_PARTS[p][0]) for p in bert.STREAM_PARTS)
        if self._arena_decodes:
            need = max(need, max(self.schedule.chunk_shards * self._part_floats(p) for p in bert.STREAM_PARTS))
        return 4 * need

    def _dequantizes(self) -> bool:
        """Whether a request of up to ``max_tokens`` tokens may decode a shard's matrices into the
        arena: one longer than int8 products run at, a float32 shard, or shards whose transposed
        products cannot read their rows in place."""
        return (not (self.uses_int8(self.max_tokens) and self._int8_whole)
                or any(b == 32 for shards in self.schedule.layers for b in shards.values()))

    def _chunk_views(self, m: int, part: str, skip: str | None = None) -> tuple[dict, list[tuple]]:
        """The arrays ``streamed_layer`` gets for a chunk of ``m`` shards and ``part`` (but
        ``skip``, the matrix an int8 product reads in place), and per position j in the chunk the
        tuple of destinations of shard j's tensors, in ``_part_names(part)`` order. All are views
        of the one arena, which is why only one part of one chunk exists at a time."""
        got = self._views.get((m, part, skip))
        if got is None:
            at, full, dst = 0, {}, [[] for _ in range(m)]
            for name, tensors in bert.STREAM_PARTS[part].items():
                if name == skip:
                    continue
                rows = [self._shapes[t][0] for t in tensors]
                tail = self._shapes[tensors[0]][1:]
                n = m * sum(rows) * int(np.prod(tail))
                a = full[name] = self._arena[at:at + n].reshape((m * sum(rows),) + tail)
                at += n
                base = 0
                for t, r in zip(tensors, rows):  # every shard's rows of t, then of the next tensor
                    for j in range(m):
                        dst[j].append(a[base + j * r: base + (j + 1) * r])
                    base += m * r
            got = self._views[(m, part, skip)] = (full, [tuple(d) for d in dst])
        return got

    @staticmethod
    def _part_names(part: str) -> tuple[str, ...]:
        return tuple(t for ts in bert.STREAM_PARTS[part].values() for t in ts)

    def _program(self, layer: int, s: int, bits: int, part: str, only: tuple[str, ...] | None = None):
        """The decode program of shard ``s``'s ``part`` tensors (or of the tensors ``only``) at
        ``bits`` (one per layout)."""
        from sti import quant

        layout = self.store._version(layer, s, bits).layout
        names = self._part_names(part) if only is None else only
        prog = self._programs.get((layout, names))
        if prog is None:
            entries = {e.name: e for e in self.store.manifest.layouts[layout]}
            prog = self._programs[(layout, names)] = quant.Program(
                [(entries[n].dtype, entries[n].offset, entries[n].shape, entries[n].meta) for n in names])
        return prog

    def _int8_support(self) -> int:
        """Threads for int8 products; 0 where they do not run: the schedule never asks for them,
        or the C kernels lack AVX-512 VNNI (the portable path is a reference, not fast)."""
        if not self.schedule.int8_max_tokens:
            return 0
        from sti import lowbit

        if not lowbit.has_int8_kernel():
            return 0
        return INT8_THREADS

    def uses_int8(self, ntok: int) -> bool:
        """Whether a request of ``ntok`` tokens runs int8 products on its quantized shards."""
        return bool(self._int8_threads) and ntok <= self.schedule.int8_max_tokens

    def _embed_bytes(self, ntok: int) -> int:
        return ntok * self.cfg.hidden_size * 4

    def _check_fits(self, ntok: int | None = None) -> None:
        """Refuse a schedule (or a request of ``ntok`` tokens; default: one sequence of the
        model's full length, or ``max_tokens``) that could not run within the budget."""
        budget = self.schedule.memory_budget
        if not budget:
            return
        ntok = self.max_tokens if ntok is None else ntok
        before = self.fixed_bytes + self.preload_bytes + self._embed_bytes(ntok)
        need = max((sum(self.store.shard_nbytes(layer, s, b) for s, b in shards.items()
                        if (layer, s) not in self.schedule.preload)
                    for layer, shards in enumerate(self.schedule.layers)), default=0)
        smallest = before + self.scratch_bytes + need
        if smallest > budget:
            raise STIError(f"memory budget {budget:,} B cannot hold this schedule for {ntok} tokens: a layer "
                           f"streams {need:,} B, {before:,} B are resident before any streaming and "
                           f"dequantization needs {self.scratch_bytes:,} B",
                           f"raise the budget to at least {smallest:,} B or plan for this budget")

    # ------------------------------------------------------------------ running

    def run(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, Trace]:
        """ids, mask (B, T) -> last hidden states (B, T, H) and the request's trace."""
        with self._lock:
            return self._run(ids, mask)

    def _run(self, ids, mask):
        trace = Trace(cold=self.cold, storage=self.throttle.label if self.throttle else "real")
        if ids.shape[1] > self.cfg.max_position:
            raise STIError(f"input has {ids.shape[1]} tokens; the model takes at most {self.cfg.max_position}",
                           "truncate the input")
        if ids.shape[1] > len(self.globals["embed.pos"]) or (not self.uses_int8(ids.size) and not self._arena_decodes):
            raise STIError(f"the request has {ids.size} tokens ({' x '.join(map(str, ids.shape))}); this engine "
                           f"holds what requests of up to {self.max_tokens} tokens need",
                           "send fewer or shorter texts per request, or build the engine with a larger max_tokens "
                           "(plan for a longer seq_len)")
        self._check_fits(ids.size)
        if self.cold:
            self.store.evict()
        arrived: dict[tuple[int, int], bytes] = {}
        cv = threading.Condition()
        stop = threading.Event()
        failure: list[BaseException] = []
        t_start = time.perf_counter()

        def io_worker():
            # a layer's shards are read by one call: per shard, the worker's Python took the GIL
            # the compute thread needs between its kernels (warm MiniLM, 32 tokens, 3 bits: 7.38 ms
            # a request with a call per shard, 6.75 with one per layer, 6.43 with no reads)
            try:
                for group in self._reads:
                    i = 0
                    while i < len(group):  # as much of the layer as the budget has room for, at least one shard
                        sizes = [self.store.shard_nbytes(*r) for r in group[i:]]
                        bufs = self.res.take_buffers(sizes, stop)
                        if bufs is None:
                            return
                        batch = group[i:i + len(bufs)]
                        t0 = time.perf_counter()
                        check = [self.verify_always or v not in self.verified for v in batch]
                        try:  # the checksums run here, beside the compute thread (the C checksums release the GIL)
                            self.store.read_many(batch, bufs, check)
                        except BaseException:
                            self.res.give_buffers(bufs)
                            raise
                        self.verified.update(batch)
                        n = sum(sizes[:len(bufs)])
                        if self.throttle:  # one device request per shard
                            self.throttle.pace(t0, n, len(bufs))
                        t1 = time.perf_counter()
                        at = t0 - t_start  # the read's time shared out over its shards by their bytes
                        for (layer, s, bits), nb in zip(batch, sizes):
                            until = at + (t1 - t0) * nb / n
                            trace.io.append((layer, s, bits, at, until, nb))
                            at = until
                        with cv:
                            for (layer, s, _), b in zip(batch, bufs):
                                arrived[(layer, s)] = b
                            cv.notify_all()
                        i += len(bufs)
            except BaseException as e:  # surfaced to the caller
                failure.append(e)
                with cv:
                    cv.notify_all()

        held_embed = self._embed_bytes(ids.size)
        self.res.hold(held_embed)
        if self._io is None:
            self._io = _IOThread()
            weakref.finalize(self, self._io.close)
        # the input's embedding rows first, then the shard reads: from a device, the rows queued
        # behind a layer's announced shard reads (MiniLM, cold, 32 tokens: 1.5-1.75 ms to the
        # first layer beside the IO worker, 0.71-0.76 before it, and latency 2-5% lower; warm requests
        # unchanged within this machine's noise)
        try:
            x = bert.embed(self.cfg, dict(self.globals, **{"embed.word": self.embed_table}), ids)
        except BaseException:
            self.res.release(held_embed)
            raise
        io_done = self._io.submit(io_worker)
        try:
            bias = bert.attention_bias(mask)
            int8 = trace.int8 = self.uses_int8(ids.size)
            for layer in range(len(self.schedule.layers)):
                x = self._layer(layer, x, bias, arrived, cv, failure, trace, t_start, int8)
        finally:
            stop.set()
            io_done.wait()
            for op in self._int8_ops:  # after a failure: hold no shard bytes
                op.bufs = []
            self.res.release(held_embed)
            self.res.give_buffers(arrived.values())
            arrived.clear()
        trace.latency = time.perf_counter() - t_start
        trace.bytes_read = sum(e[5] for e in trace.io)
        trace.resident_peak = self.res.peak
        return x, trace

    def _layer_calls(self, layer: int, int8: bool = False) -> tuple[list[tuple[int, ...]], dict]:
        """The chunks of ``layer`` and, per (chunk, part), the arrays ``streamed_layer`` gets
        and the decode calls that fill them: (program, (layer, shard), destinations). With
        ``int8``, the layer's quantized shards make one chunk and its float32 shards are chunked
        after them; a chunk of quantized shards gets each part's ``INT8_PARTS`` matrix as an
        :class:`_Int8Stack` (only the biases are decoded). Built once per layer: the schedule
        never changes."""
        got = self._calls.get((layer, int8))
        if got is None:
            shards = self.schedule.layers[layer]
            n = self.schedule.chunk_shards
            idx = sorted(shards, key=lambda s: (int8 and shards[s] == 32, s))
            # int8 products need no dequantized copy, so a layer's quantized shards make one chunk:
            # each product is then one call per layer (a call costs ~10-17 us beyond its work)
            whole = sum(shards[s] != 32 for s in idx) if int8 and self._int8_whole else 0
            chunks = [tuple(idx[:whole])] * bool(whole) + [tuple(idx[i:i + n]) for i in range(whole, len(idx), n)]
            calls = {}
            for chunk in chunks:
                quantized = int8 and all(shards[s] != 32 for s in chunk)
                for part in bert.STREAM_PARTS:
                    names = self._part_names(part)
                    array, transposed = INT8_PARTS[part]
                    mats = bert.STREAM_PARTS[part][array]
                    progs = {s: self._program(layer, s, shards[s], part) for s in chunk}
                    rows = [progs[s].prog[names.index(t)] for t in mats for s in chunk] if quantized else []
                    # the transposed product reads a shard's rows four at a time
                    if not quantized or (transposed and any(r[3] % 4 for r in rows)):
                        views, dst = self._chunk_views(len(chunk), part)
                        calls[(chunk, part)] = (views, [(progs[s], (layer, s), dst[j]) for j, s in enumerate(chunk)])
                        continue
                    views, dst = self._chunk_views(len(chunk), part, skip=array)
                    op = _Int8Stack(np.array(rows), [(layer, s) for t in mats for s in chunk], self._int8_threads)
                    self._int8_ops.append(op)
                    rest = tuple(t for t in names if t not in mats)
                    decode = [(self._program(layer, s, shards[s], part, only=rest), (layer, s), dst[j])
                              for j, s in enumerate(chunk)]
                    calls[(chunk, part)] = ({**views, array: op}, decode)
            got = self._calls[(layer, int8)] = (chunks, calls)
        return got

    def _layer(self, layer: int, x, bias, arrived: dict, cv: threading.Condition, failure: list, trace: Trace,
               t_start: float, int8: bool = False) -> np.ndarray:
        """One layer, chunk by chunk: a chunk's parts are decoded from its shards' bytes (waiting
        for the IO worker when they are not there yet) and its streamed bytes are released once
        its last part (the down projection) is decoded, or, when an int8 product reads that part
        from the bytes, once it is computed (at the next load, or the layer's end)."""
        chunks, calls = self._layer_calls(layer, int8)
        preloaded = self.preloaded
        seg = [time.perf_counter()]  # start of the current compute segment
        pending = []  # a chunk whose down projection reads its bytes after load returns

        def let_go(chunk):
            for p, (array, _) in INT8_PARTS.items():
                op = calls[(chunk, p)][0].get(array)
                if isinstance(op, _Int8Stack):
                    op.bufs = []
            with cv:
                done = [arrived.pop((layer, s)) for s in chunk if (layer, s) not in preloaded]
            self.res.give_buffers(done)

        def load(chunk, part):
            while pending:
                let_go(pending.pop())
            if part == "qkv":  # the first part of a chunk: wait for its shards
                missing = [s for s in chunk if (layer, s) not in preloaded and (layer, s) not in arrived]
                if missing:
                    t0 = time.perf_counter()
                    trace.compute.append((layer, seg[0] - t_start, t0 - t_start))
                    with cv:
                        while not failure and any((layer, s) not in arrived for s in missing):
                            cv.wait()
                    if failure:
                        raise failure[0]
                    seg[0] = t1 = time.perf_counter()
                    trace.stalls.append((layer, t0 - t_start, t1 - t_start))
            views, decode = calls[(chunk, part)]
            for program, key, dst in decode:
                program(preloaded.get(key) or arrived[key], dst)
            op = views.get(INT8_PARTS[part][0])
            if isinstance(op, _Int8Stack):
                op.bufs = [preloaded.get(key) or arrived[key] for key in op.keys]
            if part == "down":
                if isinstance(op, _Int8Stack):
                    pending.append(chunk)
                else:
                    let_go(chunk)
            return views

        x = bert.streamed_layer(self.cfg, x, bias, self.common[layer], chunks, load)
        while pending:
            let_go(pending.pop())
        trace.compute.append((layer, seg[0] - t_start, time.perf_counter() - t_start))
        return x
