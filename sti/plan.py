"""Elastic pipeline planning: which shards run, at which bitwidth, and which stay resident.

The planner is pure: plain dataclasses in, a plain ``Plan`` out, no IO and no threads. SciPy
is imported only inside the exact solver.

Inputs
------
``ModelShape``     L layers x S shards; bytes of one shard at each bitwidth; ``fixed_bytes``
                   (always resident: globals, norms, biases, positions) and ``scratch_bytes``
                   (the fp32 buffer that dequantizes one shard). Both count against M.
``Importance``     ``loss[l][s][b]``: predicted accuracy loss of shard (l, s) at b bits, b = 0
                   meaning dropped, 32 meaning full precision (loss 0). Losses add up.
``DeviceProfile``  IO: one read of ``nbytes`` costs ``io_latency + nbytes / io_bandwidth``.
                   Compute: layer at width w (active shards) and sequence length n costs
                   ``c0 + c1*w*n + c2*w*n*n``, plus ``dequant_per_byte[b] * bytes`` per shard.
                   These predict the *median* request; ``tail_ratio`` (the 95th percentile of
                   requests' latency over it, measured, the model's own error included) turns a
                   deadline T into the median bound T / tail_ratio every planner works with,
                   so that 95% of requests meet T. Where requests mostly wait for reads that
                   margin leaves out the compute's own spread: ``compute_margin(n)`` stretches
                   every compute time of the timeline planners check (not of the one they
                   predict), so a plan that computes more of its time keeps more slack.

The pipeline model (the runtime implements exactly this)
---------------------------------------------------------
Every active shard is either *preloaded* (kept resident across requests at its bitwidth, no IO)
or *streamed* (read for every request). A single IO worker reads the streamed shards one after
another in ``Plan.stream_order``: layer-major; within a layer highest bitwidth first, then shard
index (planners always emit this canonical order). A single compute worker runs layer k once
layer k-1 is done and every streamed shard of layer k has been read; layer k takes
``compute_time(width_k, n) + sum of its shards' dequantization`` (preloaded shards are stored
at their bitwidth and dequantized per request too). A layer needs no read if it has no streamed
shard, so a fully preloaded layer 0 starts at t = 0.

Memory. Resident bytes at any moment are
``fixed_bytes + scratch_bytes + preload bytes + bytes of streamed shards in the buffer``.
A streamed shard enters the buffer when its read *starts* (the read needs its destination) and
leaves it when its layer's compute *ends*. The buffer capacity is
``cap = M - fixed_bytes - scratch_bytes - preload bytes``; the IO worker starts a read as soon
as it is free and the shard fits, otherwise it waits for the next layer to finish (layers
finish in order, so it waits on the oldest layer in the buffer). A plan is feasible iff
``cap >= streamed bytes of every single layer`` (else the worker would wait forever) and the
resulting latency (end of the last layer's compute) is <= T. The peak of resident bytes is at
most M by construction. This greedy worker starts every read at its earliest possible time, so
no other schedule of the same plan and read order is faster, and a plan's latency never grows
when M grows. ``simulate`` computes the timeline: per read start/end and buffer wait, per layer
start/end and stall (compute idle waiting for reads), totals, peak resident bytes.

Accumulated IO budget. The runtime reads the input's word-embedding rows first (``E0 =
embed_fixed + embed_per_token * n``), then the shards. With an unbounded buffer the latency is
``E0 + sum_k C_k + max(0, max_k (IO_k - sum_{j<k} C_j))`` (IO_k: cumulative read time of layers
0..k). So latency <= T iff every prefix keeps a non-negative accumulated IO budget
``AIB(k) = AIB(k-1) + C_{k-1} - io_k``, ``AIB(-1) = T - E0 - sum_k C_k``
(``accumulated_io_budget``). A bounded buffer can only add waits, so AIB >= 0 is necessary; the
simulator decides.

Planners
--------
``plan_heuristic`` (STI's): (a) the widest uniform width whose compute fits T, keeping in each
layer the shards whose dropping costs most; (b) the highest uniform bitwidth for which some
preload of the earliest shards (layer-major: they would stall first) gives latency <= T within
M, every preload size that fits M being simulated (if no bitwidth fits, a narrower width is
tried); (c) greedy upgrades, best loss reduction per extra byte first (activating a dropped
shard is an upgrade from 0 bits; a streamed shard may be upgraded into the preload buffer when
IO has run out but memory has not), each kept only if every AIB stays >= 0 and the simulated
plan still meets T and M. Stage (c) runs from a few starts (the highest feasible uniform
bitwidth and the next lower ones, several preload sizes each) and the lowest loss is kept.

``plan_exact``: a MILP (scipy.optimize.milp, i.e. HiGHS) of the same model, minimising total
loss: per layer, ordered stream slots (each empty or one read at some bitwidth), preloaded
counts per bitwidth and a shard-to-option assignment; read start times, layer end times; and
for (read slot, earlier layer) pairs a binary saying the read waits for that layer to leave the
buffer, forced when the bytes from that layer's first read through this one overflow ``cap``.
With all pairs this is the buffer-bounded timeline itself, not a relaxation; pairs are added
lazily where the simulator shows a read waiting (see ``_exact``), so every returned plan is
simulated and the optimum of the relaxation it came from is the optimum of the full model. The
only restriction is the canonical stream order. Within ``time_limit`` the MILP is proven
optimal for small models (a few layers x a few shards: well under a second); for real sizes
(e.g. 6 x 12 shards x 7 bitwidths) it is an anytime search that returns the best plan found
(``solver["optimal"]`` False, ``solver["mip_gap"]``), never worse than the heuristic's plan.

Infeasible budgets raise ``InfeasiblePlanError`` (an ``STIError``) that states the smallest
latency reachable within M and the smallest memory that reaches T (each computed by the same
method, and feasible for it), or, when there is none, the absolute minima. The heuristic's
minima are over its own starting space (``min_width`` shards per layer at one bitwidth, a
prefix preloaded); the exact method's are MILP optima (``min_latency``, ``min_memory``).

Latency comparisons allow a relative 1e-9 (``REL_TOL``) for floating-point summation order;
bytes are integers and compared exactly.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import sys
import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from sti.errors import STIError

BITS = (2, 3, 4, 5, 6, 8, 32)  # the fidelity versions a shard may have (32: full precision)
DROP = 0  # "bits" of a dropped shard
REL_TOL = 1e-9  # latency slack for floating-point summation order
METHODS = ("heuristic", "exact")
_MAX_TIGHTEN = 5  # times the exact planner may tighten T or M to absorb solver tolerance


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _int_keys(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


@dataclass
class ModelShape:
    """Sizes the planner needs: L layers x S shards, bytes per shard version, resident extras."""

    num_layers: int
    shards_per_layer: int
    shard_bytes: dict[int, int]  # bits -> bytes of one shard at that bitwidth
    fixed_bytes: int = 0  # always resident: globals, norms, biases, position embeddings
    scratch_bytes: int = 0  # fp32 working buffer to dequantize one shard

    def __post_init__(self):
        self.shard_bytes = {int(b): int(n) for b, n in sorted(_int_keys(self.shard_bytes).items())}
        if self.num_layers < 1 or self.shards_per_layer < 1:
            raise STIError(f"a model shape needs >= 1 layer and >= 1 shard per layer, got "
                           f"{self.num_layers} x {self.shards_per_layer}")
        bad = [b for b in self.shard_bytes if b not in BITS]
        if not self.shard_bytes or bad:
            raise STIError(f"shard_bytes must map bitwidths from {BITS} to bytes, got {sorted(self.shard_bytes)}",
                           "give the bytes of one shard at each stored bitwidth")
        if any(n <= 0 for n in self.shard_bytes.values()) or self.fixed_bytes < 0 or self.scratch_bytes < 0:
            raise STIError("shard sizes must be > 0 bytes and fixed/scratch bytes >= 0")

    @property
    def bits(self) -> tuple[int, ...]:
        """Stored bitwidths, ascending."""
        return tuple(self.shard_bytes)

    @property
    def base_bytes(self) -> int:
        """Bytes resident whatever the plan: fixed + scratch."""
        return self.fixed_bytes + self.scratch_bytes

    def nbytes(self, bits: int) -> int:
        """Bytes of one shard at ``bits`` (0 for a dropped shard)."""
        return 0 if bits == DROP else self.shard_bytes[bits]

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        return cls(**{**d, "shard_bytes": _int_keys(d["shard_bytes"])})


@dataclass
class Importance:
    """``loss[l][s][b]``: predicted accuracy loss of shard (l, s) at b bits (0 = dropped)."""

    loss: list[list[dict[int, float]]]

    def __post_init__(self):
        self.loss = [[{int(b): float(v) for b, v in sorted(_int_keys(d).items())} for d in row]
                     for row in self.loss]
        for row in self.loss:
            for d in row:
                d.setdefault(32, 0.0)

    def of(self, layer: int, shard: int, bits: int) -> float:
        return self.loss[layer][shard][bits]

    def check(self, shape: ModelShape) -> None:
        """Raise STIError unless this covers every shard of ``shape`` at 0 and every stored bitwidth."""
        if len(self.loss) != shape.num_layers or any(len(r) != shape.shards_per_layer for r in self.loss):
            raise STIError(f"importance is for {len(self.loss)} layers x "
                           f"{[len(r) for r in self.loss]} shards, the model has "
                           f"{shape.num_layers} x {shape.shards_per_layer}", "profile this model's shards")
        need = {DROP, *shape.bits}
        for l, row in enumerate(self.loss):
            for s, d in enumerate(row):
                if not need <= d.keys():
                    raise STIError(f"importance of shard ({l}, {s}) lacks bitwidths {sorted(need - d.keys())}",
                                   "profile every stored bitwidth and the dropped shard (bits 0)")

    @classmethod
    def synthetic(cls, shape: ModelShape, seed: int = 0, *, layer_decay: float = 0.8,
                  spread: float = 1.0) -> Importance:
        """A plausible random importance for tests and demos: lognormal shard weights that decay
        with depth, a dropped shard costs its weight, b bits cost about weight * 4**-(b-1)."""
        rng = random.Random(seed)
        loss = []
        for l in range(shape.num_layers):
            row = []
            for _ in range(shape.shards_per_layer):
                w = layer_decay ** l * math.exp(rng.gauss(0.0, spread))
                d = {DROP: w}
                prev = w
                for b in shape.bits:
                    v = 0.0 if b >= 32 else min(prev, w * 4.0 ** -(b - 1) * math.exp(rng.gauss(0.0, 0.3)))
                    d[b] = prev = v
                row.append(d)
            loss.append(row)
        return cls(loss)

    @classmethod
    def from_dict(cls, d: dict) -> Importance:
        return cls(d["loss"])


def _by_length(by_tokens: dict[int, float], seq_len: int, default: float) -> float:
    """A per-length value at ``seq_len``: a measured length's own; between two, the larger of
    theirs; beyond them, the nearest's; ``default`` where none was measured."""
    if not by_tokens:
        return default
    ks = sorted(by_tokens)
    near = [k for k in ks if k <= seq_len][-1:] + [k for k in ks if k >= seq_len][:1]
    return max(by_tokens[k] for k in near)


@dataclass
class DeviceProfile:
    """Measured speeds of one device (or an emulated one, say so in ``label``)."""

    io_bandwidth: float  # bytes / s
    io_latency: float = 0.0  # s per read request
    c0: float = 0.0  # s per layer
    c1: float = 0.0  # s per shard per token
    c2: float = 0.0  # s per shard per token^2
    dequant_per_byte: dict[int, float] = field(default_factory=dict)  # bits -> s per stored byte
    label: str = "real storage"
    # 95th-percentile request latency over the predicted median on this device (the times above
    # predict the median request): a plan meets its deadline when ``predicted * tail_ratio <= T``;
    # per request length where measured (tokens -> ratio; see ``margin``), as the model's error
    # differs by length (MiniLM, warm: +11..21% at 16 tokens where it was -3..+0% at 32)
    tail_ratio: float = 1.0
    tail_by_tokens: dict[int, float] = field(default_factory=dict)
    # how much slower than predicted the compute must be allowed to run beyond that margin, per
    # request length (tokens -> factor >= 1; see ``compute_margin``): the margin above is
    # measured on plans whose requests mostly wait for reads where storage is slow, and a
    # request's spread grows with its share of compute (emulated 200 MB/s, MiniLM, 32 tokens:
    # margin 1.04, and plans computing half their time missed T in 25-75% of requests). Planners
    # stretch every compute time by it (the timeline they check, not the one they predict)
    compute_margin_by_tokens: dict[int, float] = field(default_factory=dict)
    # int8 products (sti.runtime.INT8_PARTS): requests of up to ``int8_max_tokens`` tokens run
    # them on quantized shards, which then cost ``int8_shard[bits] + (int8_per_token +
    # int8_per_token_bits[bits]) * n + c2 * n^2`` each (no dequantization: the products read the
    # codes, and they cost more at some bitwidths than at others, the more so the longer the
    # input: MiniLM, every shard preloaded, 8-bit over 4-bit +1.7 ms at 32 tokens and +4.4 ms at
    # 128); 0 tokens: not measured or never faster
    int8_max_tokens: int = 0
    int8_per_token: float = 0.0  # s per shard per token
    int8_shard: dict[int, float] = field(default_factory=dict)  # bits -> s per shard
    int8_per_token_bits: dict[int, float] = field(default_factory=dict)  # bits -> s per shard per token, extra
    # compute time per streamed byte: where reads come from the page cache, the IO worker's
    # copying and checksumming slows the compute beside it (measured on the streaming runtime);
    # of a shard whose products run on dequantized weights, and of one that int8 products read
    stream_compute_per_byte: float = 0.0
    stream_compute_per_byte_int8: float = 0.0
    # before the first layer, and before the first shard read: the input's word-embedding rows
    # (from the device when the store is cold), ``embed_fixed + embed_per_token * n`` s, measured
    # on the runtime (MiniLM, 32 tokens: 0.36-0.48 ms from the page cache, 0.71-0.76 cold)
    embed_per_token: float = 0.0
    embed_fixed: float = 0.0

    def __post_init__(self):
        self.dequant_per_byte = {int(b): float(v) for b, v in sorted(_int_keys(self.dequant_per_byte).items())}
        self.int8_shard = {int(b): float(v) for b, v in sorted(_int_keys(self.int8_shard).items())}
        self.int8_per_token_bits = {int(b): float(v) for b, v in sorted(_int_keys(self.int8_per_token_bits).items())}
        self.tail_by_tokens = {int(n): float(v) for n, v in sorted(_int_keys(self.tail_by_tokens).items())}
        self.compute_margin_by_tokens = {int(n): float(v)
                                         for n, v in sorted(_int_keys(self.compute_margin_by_tokens).items())}
        if not self.io_bandwidth > 0 or min(self.io_latency, self.c0, self.c1, self.c2, self.stream_compute_per_byte,
                                            self.stream_compute_per_byte_int8, self.embed_per_token,
                                            self.embed_fixed) < 0 \
                or any(v < 0 for v in self.dequant_per_byte.values()):
            raise STIError("a device profile needs io_bandwidth > 0 and non-negative times")
        if not self.tail_ratio >= 1.0 or not all(v >= 1.0 for v in self.tail_by_tokens.values()):
            raise STIError(f"a device profile's tail_ratio (p95 / median latency) must be >= 1, got {self.tail_ratio}"
                           + (f" and {self.tail_by_tokens} by length" if self.tail_by_tokens else ""))
        if not all(v >= 1.0 for v in self.compute_margin_by_tokens.values()):
            raise STIError(f"a device profile's compute margins must be >= 1, got {self.compute_margin_by_tokens}")

    def margin(self, seq_len: int) -> float:
        """The deadline margin at ``seq_len`` tokens: a plan's predicted median may be T / margin.
        Measured lengths' own; between two, the larger of theirs; beyond them, the nearest's;
        ``tail_ratio`` where none was measured."""
        return _by_length(self.tail_by_tokens, seq_len, self.tail_ratio)

    def compute_margin(self, seq_len: int) -> float:
        """The factor planners stretch compute times by at ``seq_len`` tokens (1: none measured):
        a plan meets a deadline T when its timeline, every layer's compute that much slower,
        ends by T / ``margin``."""
        return _by_length(self.compute_margin_by_tokens, seq_len, 1.0)

    def int8_applies(self, seq_len: int) -> bool:
        return 0 < seq_len <= self.int8_max_tokens

    def int8_time(self, bits: int, seq_len: int) -> float:
        """Seconds one quantized shard at ``bits`` adds to its layer where int8 products run (a
        bitwidth not measured costs as the dearest one measured)."""
        const = self.int8_shard.get(bits, max(self.int8_shard.values(), default=0.0))
        extra = self.int8_per_token_bits.get(bits, max(self.int8_per_token_bits.values(), default=0.0))
        return max(0.0, const + (self.int8_per_token + extra) * seq_len + self.c2 * seq_len * seq_len)

    def compute_time(self, width: int, seq_len: int) -> float:
        """Seconds of one layer's math at ``width`` active shards, ``seq_len`` tokens (no dequant)."""
        return self.c0 + self.c1 * width * seq_len + self.c2 * width * seq_len * seq_len

    def read_time(self, nbytes: int) -> float:
        """Seconds of one read request of ``nbytes``."""
        return self.io_latency + nbytes / self.io_bandwidth

    def dequant_time(self, bits: int, nbytes: int) -> float:
        """Seconds to dequantize a stored shard of ``nbytes`` at ``bits`` (0 if not profiled)."""
        return self.dequant_per_byte.get(bits, 0.0) * nbytes

    @classmethod
    def from_dict(cls, d: dict) -> DeviceProfile:
        return cls(**{**d, "dequant_per_byte": _int_keys(d.get("dequant_per_byte", {}))})


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


@dataclass
class IORead:
    """One streamed read: its shard, and when the IO worker ran it."""

    layer: int
    shard: int
    bits: int
    nbytes: int
    start: float
    end: float
    wait: float  # time the IO worker was idle before it because the buffer was full
    waited_for: int = -1  # the layer whose end freed room for it (-1: it did not wait)


@dataclass
class LayerTiming:
    """One layer's compute: when it started and ended, and how long compute waited for IO."""

    layer: int
    width: int
    start: float
    end: float
    stall: float  # start - end of the previous layer (0 for none): compute idle, waiting for reads


@dataclass
class Timeline:
    """What the pipeline model predicts for a plan."""

    reads: list[IORead]
    layers: list[LayerTiming]
    latency: float  # end of the last layer; inf when the buffer cannot hold some layer
    stall: float  # total compute idle time waiting for reads
    io_wait: float  # total IO idle time waiting for buffer space
    peak_resident_bytes: int  # fixed + scratch + preload + peak buffer
    preload_bytes: int
    feasible: bool = True  # False: preload or some layer does not fit the memory budget
    reason: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> Timeline:
        return cls(**{**d, "reads": [IORead(**r) for r in d["reads"]],
                      "layers": [LayerTiming(**t) for t in d["layers"]]})


@dataclass
class LayerPlan:
    """Active shards of one layer (ascending) and the bitwidth of each."""

    shards: list[int]
    bits: list[int]


@dataclass
class Plan:
    """What the runtime executes. Plain data; ``to_json`` / ``from_json`` round-trip it."""

    target_latency: float  # T, seconds
    memory_budget: int  # M, bytes
    seq_len: int
    method: str  # "heuristic" | "exact"
    shards_per_layer: int
    layers: list[LayerPlan]
    preload: list[tuple[int, int]]  # (layer, shard) kept resident across requests
    stream_order: list[tuple[int, int, int]]  # (layer, shard, bits) in the IO worker's order
    timeline: Timeline
    predicted_latency: float
    predicted_loss: float
    stall_time: float
    resident_bytes_peak: int
    preload_bytes: int
    solver: dict[str, Any] = field(default_factory=dict)  # how it was found (stages, status, seconds)
    int8_max_tokens: int = 0  # requests up to this long run int8 products (DeviceProfile)

    def bits_matrix(self) -> list[list[int]]:
        """L x S bitwidths, 0 for dropped shards."""
        m = [[DROP] * self.shards_per_layer for _ in self.layers]
        for l, lp in enumerate(self.layers):
            for s, b in zip(lp.shards, lp.bits):
                m[l][s] = b
        return m

    @property
    def widths(self) -> list[int]:
        return [len(lp.shards) for lp in self.layers]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**{**d,
                      "layers": [LayerPlan(list(x["shards"]), list(x["bits"])) for x in d["layers"]],
                      "preload": [tuple(p) for p in d["preload"]],
                      "stream_order": [tuple(r) for r in d["stream_order"]],
                      "timeline": Timeline.from_dict(d["timeline"]),
                      "solver": dict(d.get("solver", {}))})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


class InfeasiblePlanError(STIError):
    """No plan meets (T, M). ``min_latency``: smallest latency within M (None: M is below the
    smallest model); ``min_memory``: smallest memory reaching T (None: T is below the fastest
    plan); ``abs_min_latency`` / ``abs_min_memory``: the fastest plan at any memory, the
    smallest plan at any latency. Seconds and bytes."""

    def __init__(self, problem, fix, *, min_latency, min_memory, abs_min_latency, abs_min_memory):
        super().__init__(problem, fix)
        self.min_latency = min_latency
        self.min_memory = min_memory
        self.abs_min_latency = abs_min_latency
        self.abs_min_memory = abs_min_memory


# --------------------------------------------------------------------------------------------
# The pipeline model
# --------------------------------------------------------------------------------------------


class _Ctx:
    """Per-(shape, device, seq_len) constants."""

    def __init__(self, shape: ModelShape, dev: DeviceProfile, seq_len: int, planning: bool = True):
        """``planning``: compute times stretched by the device's compute margin (the timeline
        deadlines are checked on); False: as predicted (``simulate``)."""
        self.shape, self.dev, self.n = shape, dev, seq_len
        self.stretch = g = dev.compute_margin(seq_len) if planning else 1.0
        self.L, self.S = shape.num_layers, shape.shards_per_layer
        # where int8 products run, float32 versions are not offered: a float32 shard among them
        # runs dequantization + BLAS on both cores beside the IO worker and the int8 products,
        # which the model underprices (MiniLM, 32 tokens: benchmark plans with 22-72 float32
        # shards ran 13-66% over their predictions; 4 float32 shards a layer among 8-bit ones,
        # streamed, 14.0-18.6 ms against 13.7 predicted and 9.3-9.9 all 8-bit), for accuracy
        # the 8-bit version keeps (KL 5e-7 per shard)
        quantized = tuple(b for b in shape.bits if b != 32)
        self.bits = quantized if dev.int8_applies(seq_len) and quantized else shape.bits
        self.base = shape.base_bytes
        self.nbytes = {DROP: 0, **shape.shard_bytes}
        self.read = {b: dev.read_time(nb) for b, nb in shape.shard_bytes.items()}
        per_shard = dev.c1 * seq_len + dev.c2 * seq_len * seq_len
        # compute cost one active shard adds to its layer: its math and its dequantization, or
        # for a quantized shard, where int8 products run, their cost instead
        self.shard_compute = {b: g * (dev.int8_time(b, seq_len) if b != 32 and dev.int8_applies(seq_len)
                                      else per_shard + dev.dequant_time(b, nb)) for b, nb in shape.shard_bytes.items()}
        self.c0 = g * dev.c0
        self.start = dev.embed_fixed + dev.embed_per_token * seq_len  # the embedding rows, before any read
        # what streaming a shard (not preloading it) adds to its layer's compute
        self.stream_compute = {b: g * nb * (dev.stream_compute_per_byte_int8 if b != 32 and dev.int8_applies(seq_len)
                                            else dev.stream_compute_per_byte) for b, nb in shape.shard_bytes.items()}

    def layer_compute(self, row: Sequence[int], layer: int, preload) -> float:
        """Compute of layer ``layer`` with bitwidths ``row``, with the cost streaming its shards
        that are not in ``preload`` adds."""
        c = self.c0
        for s, b in enumerate(row):
            if b:
                c += self.shard_compute[b]
                if (layer, s) not in preload:
                    c += self.stream_compute[b]
        return c


def _canonical_order(bits, preload) -> list[tuple[int, int, int]]:
    """Layer-major; within a layer, highest bitwidth first, then shard index."""
    return [(l, s, b) for l, row in enumerate(bits)
            for s, b in sorted(enumerate(row), key=lambda sb: (-sb[1], sb[0]))
            if b and (l, s) not in preload]


def _sim(ctx: _Ctx, bits, preload, M, order=None, record=False):
    """The pipeline model. Returns (feasible, latency, peak_resident, preload_bytes, details).

    ``details`` (when ``record``): reads [(l, s, b, nbytes, start, end, wait, waited_for)], layers
    [(width, start, end)], stall, io_wait, reason.
    """
    L = ctx.L
    nbytes = ctx.nbytes
    C = [ctx.layer_compute(row, l, preload) for l, row in enumerate(bits)]
    P = sum(nbytes[bits[l][s]] for l, s in preload)
    if order is None:
        order = _canonical_order(bits, preload)
    cap = math.inf if M is None else M - ctx.base - P
    reasons = ""
    if cap < 0:
        reasons = f"fixed + scratch + preload = {ctx.base + P} B exceed M = {M} B"
        return False, math.inf, ctx.base + P, P, (None if not record else ([], [], 0.0, 0.0, reasons))
    E = [0.0] * L
    st = [0.0] * L
    ready = [0.0] * L  # end of the last read of each layer
    done = 0
    prev_end = io_free = ctx.start  # the runtime reads the input's embedding rows, then shards
    occ = 0
    peak_occ = 0
    held: deque = deque()  # [layer, bytes] in the buffer, layer ascending
    io_wait = 0.0
    rec = [] if record else None
    for l, s, b in order:
        while done < l:  # every read of layers < l is scheduled: their compute times are known
            t0 = prev_end if prev_end > ready[done] else ready[done]
            st[done] = t0
            prev_end = E[done] = t0 + C[done]
            done += 1
        nb = nbytes[b]
        t = io_free
        waited_for = -1
        while True:
            while held and held[0][0] < l and E[held[0][0]] <= t:
                occ -= held.popleft()[1]
            if occ + nb <= cap:
                break
            if not held or held[0][0] >= l:
                reason = (f"layer {l}'s streamed shards ({sum(nbytes[x] for ll, _, x in order if ll == l)} B) "
                          f"exceed the buffer of {cap} B left by M = {M} B")
                return False, math.inf, ctx.base + P + cap, P, (None if not record else ([], [], 0.0, 0.0, reason))
            waited_for = held[0][0]
            t = E[waited_for]
        io_wait += t - io_free
        end = t + ctx.read[b]
        occ += nb
        if held and held[-1][0] == l:
            held[-1][1] += nb
        else:
            held.append([l, nb])
        if occ > peak_occ:
            peak_occ = occ
        if record:
            rec.append((l, s, b, nb, t, end, t - io_free, waited_for))
        ready[l] = end
        io_free = end
    while done < L:
        t0 = prev_end if prev_end > ready[done] else ready[done]
        st[done] = t0
        prev_end = E[done] = t0 + C[done]
        done += 1
    details = None
    if record:
        stall = sum(st[k] - (E[k - 1] if k else ctx.start) for k in range(L))
        widths = [sum(1 for b in row if b) for row in bits]
        details = (rec, [(widths[k], st[k], E[k]) for k in range(L)], stall, io_wait, reasons)
    return True, E[L - 1], ctx.base + P + peak_occ, P, details


def _fits(ok, latency, peak, T, M) -> bool:
    return ok and latency <= T * (1 + REL_TOL) and (M is None or peak <= M)


def _as_config(plan_or_bits, shape: ModelShape, preload):
    if isinstance(plan_or_bits, Plan):
        return plan_or_bits.bits_matrix(), set(map(tuple, plan_or_bits.preload))
    bits = [list(map(int, row)) for row in plan_or_bits]
    if len(bits) != shape.num_layers or any(len(r) != shape.shards_per_layer for r in bits):
        raise STIError(f"a bits matrix must be {shape.num_layers} x {shape.shards_per_layer}")
    for row in bits:
        for b in row:
            if b != DROP and b not in shape.shard_bytes:
                raise STIError(f"bitwidth {b} is not stored for this model (stored: {shape.bits})")
    pre = {tuple(p) for p in (preload or ())}
    if any(not bits[l][s] for l, s in pre):
        raise STIError("a preloaded shard must be active (bits > 0)")
    return bits, pre


def simulate(plan, shape: ModelShape, dev: DeviceProfile, seq_len: int | None = None, *,
             preload: Iterable[tuple[int, int]] | None = None, memory_budget: int | None = None,
             stream_order: Sequence[tuple[int, int, int]] | None = None) -> Timeline:
    """Predict the timeline of ``plan`` (a ``Plan``, or an L x S bits matrix with 0 = dropped).

    For a ``Plan``, the preload set, stream order, seq_len and memory budget default to the
    plan's; for a bits matrix the buffer is unbounded unless ``memory_budget`` is given. A
    ``stream_order`` must be layer-major and name exactly the active, non-preloaded shards.
    """
    ctx_seq = seq_len if seq_len is not None else (plan.seq_len if isinstance(plan, Plan) else None)
    if ctx_seq is None or ctx_seq < 1:
        raise STIError("simulate needs seq_len >= 1")
    bits, pre = _as_config(plan, shape, preload)
    if isinstance(plan, Plan):
        memory_budget = plan.memory_budget if memory_budget is None else memory_budget
        stream_order = plan.stream_order if stream_order is None else stream_order
    ctx = _Ctx(shape, dev, ctx_seq, planning=False)
    order = None
    if stream_order is not None:
        order = [tuple(map(int, r)) for r in stream_order]
        if sorted(order) != sorted(_canonical_order(bits, pre)):
            raise STIError("stream_order must list each active, non-preloaded shard once at its bitwidth")
        if any(order[i][0] > order[i + 1][0] for i in range(len(order) - 1)):
            raise STIError("stream_order must be layer-major (compute runs layers in order)")
    ok, lat, peak, P, (rec, lay, stall, io_wait, reason) = _sim(ctx, bits, pre, memory_budget, order, record=True)
    if not ok:
        return Timeline([], [], math.inf, math.inf, math.inf, peak, P, False, reason)
    return Timeline([IORead(*r) for r in rec],
                    [LayerTiming(k, w, a, e, a - (lay[k - 1][2] if k else ctx.start)) for k, (w, a, e) in enumerate(lay)],
                    lat, stall, io_wait, peak, P)


def _aib(ctx: _Ctx, bits, preload, T) -> list[float]:
    C = [ctx.layer_compute(row, l, preload) for l, row in enumerate(bits)]
    io = [sum(ctx.read[b] for s, b in enumerate(row) if b and (l, s) not in preload) for l, row in enumerate(bits)]
    out, a = [], T - ctx.start - sum(C)
    for k in range(ctx.L):
        a += (C[k - 1] if k else 0.0) - io[k]
        out.append(a)
    return out


def accumulated_io_budget(bits, shape: ModelShape, dev: DeviceProfile, target_latency: float, seq_len: int,
                          preload: Iterable[tuple[int, int]] = ()) -> list[float]:
    """AIB(k) for k = 0..L-1 (seconds): AIB(-1) = T - E0 - sum C, AIB(k) = AIB(k-1) + C_{k-1} - io_k.
    All >= 0 iff the plan meets T with an unbounded buffer (see the module docstring)."""
    b, pre = _as_config(bits, shape, preload)
    return _aib(_Ctx(shape, dev, seq_len, planning=False), b, pre, target_latency)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check(shape, imp, dev, T, M, seq_len, min_width):
    if not isinstance(shape, ModelShape) or not isinstance(dev, DeviceProfile):
        raise STIError("plan needs a ModelShape and a DeviceProfile")
    if imp is not None:
        imp.check(shape)
    if T is not None and not (T > 0 and math.isfinite(T)):
        raise STIError(f"target latency must be a positive number of seconds, got {T!r}")
    if M is not None and not (M >= 0 and math.isfinite(M) and float(M) == int(M)):
        raise STIError(f"memory budget must be a whole number of bytes >= 0, got {M!r}")
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise STIError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if not 0 <= min_width <= shape.shards_per_layer:
        raise STIError(f"min_width must be in 0..{shape.shards_per_layer}, got {min_width}")


def _loss(imp, bits) -> float:
    return sum(imp.loss[l][s][b] for l, row in enumerate(bits) for s, b in enumerate(row))


def _fmt_time(t: float) -> str:
    if t >= 1:
        return f"{t:.4g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.4g} ms"
    return f"{t * 1e6:.4g} µs"


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.4g} MB ({n:,} bytes)"


def _min_memory_for(ctx: _Ctx, bits, preload, T) -> int | None:
    """Smallest M (bytes) at which this configuration meets T, or None if no M does."""
    P = sum(ctx.nbytes[bits[l][s]] for l, s in preload)
    per_layer = [sum(ctx.nbytes[b] for s, b in enumerate(row) if b and (l, s) not in preload)
                 for l, row in enumerate(bits)]
    lo, hi = ctx.base + P + max(per_layer), ctx.base + P + sum(per_layer)
    ok, lat, peak, _, _ = _sim(ctx, bits, preload, hi)
    if not _fits(ok, lat, peak, T, hi):
        return None
    ok, lat, peak, _, _ = _sim(ctx, bits, preload, lo)
    if _fits(ok, lat, peak, T, lo):
        return lo
    while hi - lo > 1:  # latency is non-increasing in M: bisect on whole bytes
        mid = (lo + hi) // 2
        ok, lat, peak, _, _ = _sim(ctx, bits, preload, mid)
        if _fits(ok, lat, peak, T, mid):
            hi = mid
        else:
            lo = mid
    return hi


def _deadline(device: DeviceProfile, T: float, seq_len: int) -> float:
    """The median latency a plan may have so that 95% of requests meet the deadline T."""
    return T / device.margin(seq_len)


def _make_plan(ctx, imp, bits, preload, T, M, method, solver, deadline: float) -> Plan:
    """The Plan of a configuration found for the median-latency bound T (= deadline / tail_ratio)."""
    order = _canonical_order(bits, preload)
    ok, checked, peak, _, _ = _sim(ctx, bits, preload, M, order)  # compute stretched by the compute margin
    if not _fits(ok, checked, peak, T, M):  # a bug, not bad input
        raise RuntimeError(f"{method} planner produced a plan its simulator rejects: {checked} s, "
                           f"{peak} B for T = {T} s, M = {M} B")
    tl = simulate(bits, ctx.shape, ctx.dev, ctx.n, preload=preload, memory_budget=M, stream_order=order)
    layers = [LayerPlan([s for s, b in enumerate(row) if b], [b for b in row if b]) for row in bits]
    solver = {**solver, "tail_ratio": ctx.dev.margin(ctx.n), "median_latency_bound": float(T),
              "compute_margin": ctx.stretch, "checked_latency": checked}
    return Plan(target_latency=float(deadline), memory_budget=int(M), seq_len=ctx.n, method=method,
                shards_per_layer=ctx.S, layers=layers, preload=sorted(preload), stream_order=order,
                timeline=tl, predicted_latency=tl.latency, predicted_loss=_loss(imp, bits),
                stall_time=tl.stall, resident_bytes_peak=tl.peak_resident_bytes,
                preload_bytes=tl.preload_bytes, solver=solver, int8_max_tokens=ctx.dev.int8_max_tokens)


def _fill_preload(ctx, bits, preload, M) -> tuple[set, int]:
    """With the bitwidths chosen, memory the plan leaves unused turned into preload: the streamed
    shards in stream order, each moved into the preload buffer if the modelled latency does not
    rise (the buffer left must still carry the stream). The planners choose bitwidths for the
    least loss and a preload that merely meets T, so a looser T or a larger M left memory idle
    (MiniLM at 2x the deadline and 25% of the weights: nothing preloaded, every request reading
    12.7 MB). A preloaded shard is not read, copied or checksummed per request, and a read not
    made cannot be late: where the model sees no gain (a compute-bound stream), the preload
    still takes the most variable part of a request away. The loss is unchanged. Returns
    (preload, shards added)."""
    best = set(preload)
    _, lat, _, _, _ = _sim(ctx, bits, best, M)
    added = 0
    for l, s, _ in _canonical_order(bits, best):
        ok, t, peak, _, _ = _sim(ctx, bits, best | {(l, s)}, M)
        if ok and peak <= M and t <= lat * (1 + REL_TOL):
            best.add((l, s))
            lat, added = min(lat, t), added + 1
    return best, added


def _abs_min_memory(ctx, min_width) -> int:
    # one layer of min_width smallest shards streamed through a buffer that holds just it
    return ctx.base + min_width * min(ctx.shape.shard_bytes.values())


def _infeasible(ctx, T, M, method, min_width, minima) -> InfeasiblePlanError:
    """Build the error; ``minima(T, M)`` -> (min_latency at M, min_memory at T) for ``method``.
    T is the median-latency bound; the error speaks of deadlines (x ``tail_ratio``)."""
    tail = ctx.dev.margin(ctx.n)
    abs_mem = _abs_min_memory(ctx, min_width)
    abs_lat, _ = minima(None, None, want_memory=False)
    lat_m = None if M < abs_mem else minima(None, M, want_memory=False)[0]
    mem_t = None if T < abs_lat * (1 - REL_TOL) else minima(T, None, want_latency=False)[1]
    T, abs_lat, lat_m = T * tail, abs_lat * tail, None if lat_m is None else lat_m * tail
    what = f"no {method} plan meets T = {_fmt_time(T)} with M = {_fmt_bytes(M)}"
    what += f" (seq_len {ctx.n}, device {ctx.dev.label!r})"
    parts = []
    if lat_m is not None:
        parts.append(f"within M = {_fmt_bytes(M)} the smallest latency is {_fmt_time(lat_m)}")
    else:
        parts.append(f"M = {_fmt_bytes(M)} is below the smallest model's need of {_fmt_bytes(abs_mem)} "
                     f"(fixed + scratch + {min_width} shard(s) of a layer at the lowest bitwidth)")
    if mem_t is not None:
        parts.append(f"reaching T = {_fmt_time(T)} takes at least {_fmt_bytes(mem_t)}")
    else:
        parts.append(f"T = {_fmt_time(T)} is below the fastest plan at any memory, {_fmt_time(abs_lat)}")
    fix = "; ".join(parts) + ": raise T or M to one of these"
    if method == "heuristic":
        fix += " (these are the heuristic's minima; method='exact' may find plans below them)"
    return InfeasiblePlanError(what, fix, min_latency=lat_m, min_memory=mem_t,
                               abs_min_latency=abs_lat, abs_min_memory=abs_mem)


# --------------------------------------------------------------------------------------------
# The heuristic (STI)
# --------------------------------------------------------------------------------------------


def _ranked_shards(ctx, imp) -> list[list[int]]:
    """Per layer, shard indices by the loss of dropping them, largest first (ties: index)."""
    if imp is None:
        return [list(range(ctx.S)) for _ in range(ctx.L)]
    return [sorted(range(ctx.S), key=lambda s: (-imp.loss[l][s][DROP], s)) for l in range(ctx.L)]


def _uniform_configs(ctx, ranked, W, b, M):
    """Top-W shards per layer at b bits, with the first k active shards (layer-major) preloaded,
    for every k whose preload and largest streamed layer fit M. Yields (k, bits, preload)."""
    keep = [set(r[:W]) for r in ranked]
    bits = [[b if s in keep[l] else DROP for s in range(ctx.S)] for l in range(ctx.L)]
    active = [(l, s) for l in range(ctx.L) for s in range(ctx.S) if bits[l][s]]
    nb = ctx.nbytes[b]
    streamed = [W] * ctx.L  # streamed shards per layer with the first k preloaded
    for k in range(len(active) + 1):
        if k:
            streamed[active[k - 1][0]] -= 1
        if M is not None and ctx.base + nb * (k + max(streamed)) > M:
            if ctx.base + nb * k > M:
                break
            continue
        yield k, bits, frozenset(active[:k])


def _best_uniform(ctx, ranked, W, b, T, M):
    """The fastest preload size for (W, b) within M; returns (latency, bits, preload) or None."""
    best = None
    for _, bits, pre in _uniform_configs(ctx, ranked, W, b, M):
        ok, lat, peak, _, _ = _sim(ctx, bits, pre, M)
        if ok and (M is None or peak <= M) and (best is None or lat < best[0]):
            best = (lat, bits, pre)
    if best is None or (T is not None and best[0] > T * (1 + REL_TOL)):
        return None
    return best


def _heuristic_minima(ctx, min_width):
    """Minima over the heuristic's starting space: min_width shards per layer, uniform bits,
    a prefix of them preloaded."""
    ranked = [list(range(ctx.S))] * ctx.L  # which shards does not change sizes or times

    def minima(T, M, want_latency=True, want_memory=True):
        lat = mem = None
        for b in ctx.bits:
            if want_latency:
                r = _best_uniform(ctx, ranked, min_width, b, None, M)
                if r is not None and (lat is None or r[0] < lat):
                    lat = r[0]
            if want_memory:
                for _, bits, pre in _uniform_configs(ctx, ranked, min_width, b, None):
                    m = _min_memory_for(ctx, bits, pre, T)
                    if m is not None and (mem is None or m < mem):
                        mem = m
        return lat, mem

    return minima


def _upgrade(ctx, imp, bits, preload, T, M) -> int:
    """Stage (c): greedy upgrades by loss reduction per extra byte; returns how many were kept.

    A candidate raises one shard's bitwidth (from 0: activates it, streamed). A streamed or
    dropped shard may also be upgraded *into* the preload buffer: that costs its whole size in
    resident memory instead of read time, so it ranks below the streamed upgrade (whole size vs
    size increase) and wins only where the IO budget has run out and memory has not.
    """
    heap = []

    def push(l, s):
        b0 = bits[l][s]
        pinned = (l, s) in preload
        for b in ctx.bits:
            if b <= b0:
                continue
            gain = imp.loss[l][s][b0] - imp.loss[l][s][b]
            if gain <= 0:
                continue
            extra = ctx.nbytes[b] - ctx.nbytes[b0]
            heapq.heappush(heap, (-(gain / extra if extra > 0 else math.inf), -gain, l, s, b0, pinned, b, pinned))
            if not pinned:
                heapq.heappush(heap, (-gain / ctx.nbytes[b], -gain, l, s, b0, pinned, b, True))

    for l in range(ctx.L):
        for s in range(ctx.S):
            push(l, s)
    kept = 0
    while heap:
        _, _, l, s, b0, was, b, pin = heapq.heappop(heap)
        if bits[l][s] != b0 or ((l, s) in preload) != was:
            continue  # stale: the shard moved since this candidate was pushed
        bits[l][s] = b
        if pin:
            preload.add((l, s))
        if min(_aib(ctx, bits, preload, T)) >= -REL_TOL * T:
            ok, lat, peak, _, _ = _sim(ctx, bits, preload, M)
            if _fits(ok, lat, peak, T, M):
                kept += 1
                push(l, s)
                continue
        bits[l][s] = b0  # rejected for good: budgets only shrink as upgrades are kept
        if not was:
            preload.discard((l, s))
    return kept


def _fitting_preloads(ctx, ranked, W, b, T, M) -> list:
    """Every preload size k for (W, b) that meets T within M: [(k, latency, bits, preload)]."""
    out = []
    for k, bits, pre in _uniform_configs(ctx, ranked, W, b, M):
        ok, lat, peak, _, _ = _sim(ctx, bits, pre, M)
        if _fits(ok, lat, peak, T, M):
            out.append((k, lat, bits, pre))
    return out


def _spread(items: list, n: int) -> list:
    """At most n items, evenly spaced, first and last included."""
    if len(items) <= n:
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def plan_heuristic(shape: ModelShape, importance: Importance, device: DeviceProfile, target_latency: float,
                   memory_budget: int, seq_len: int, *, min_width: int = 1, bit_tries: int = 3,
                   preload_tries: int = 6) -> Plan:
    """STI's planner: widest sub-model whose compute fits T, the highest uniform bitwidth the IO
    budget allows with the earliest shards preloaded, then greedy upgrades under the AIB.

    Stage (c) is run from up to ``bit_tries`` starting bitwidths (the highest feasible and the
    next lower feasible ones) x ``preload_tries`` preload sizes, and the lowest loss is kept.
    """
    T, M = target_latency, memory_budget
    _check(shape, importance, device, T, M, seq_len, min_width)
    M, T = int(M), _deadline(device, T, seq_len)
    t0 = time.perf_counter()
    ctx = _Ctx(shape, device, seq_len)
    r = _heuristic(ctx, importance, T, M, min_width, bit_tries, preload_tries)
    if r is None:
        raise _infeasible(ctx, T, M, "heuristic", min_width, _heuristic_minima(ctx, min_width))
    bits, preload, info = r
    preload, info["preload_filled"] = _fill_preload(ctx, bits, preload, M)
    info["seconds"] = round(time.perf_counter() - t0, 6)
    return _make_plan(ctx, importance, bits, preload, T, M, "heuristic", info, target_latency)


def _heuristic(ctx, importance, T, M, min_width, bit_tries=3, preload_tries=6):
    """Stages (a)-(c); (bits, preload, info) or None when stage (b) finds no start."""
    ranked = _ranked_shards(ctx, importance)
    # (a) widest uniform width whose compute alone fits T (dequant at its cheapest bitwidth)
    cheapest = min(ctx.shard_compute.values())
    W_max = max([W for W in range(min_width, ctx.S + 1)
                 if ctx.start + ctx.L * (ctx.c0 + W * cheapest) <= T * (1 + REL_TOL)],
                default=min_width)
    # (b) the highest uniform bitwidth that meets T with some preload of the earliest shards
    starts = []  # (W, b, [(k, latency, bits, preload)])
    for W in range(W_max, min_width - 1, -1):
        for b in reversed(ctx.bits):
            fitting = _fitting_preloads(ctx, ranked, W, b, T, M)
            if fitting:
                starts.append((W, b, fitting))
                if len(starts) >= max(1, bit_tries):
                    break
        if starts:
            break
    if not starts:
        return None
    # (c) upgrades, from each candidate start; keep the lowest loss
    best = None
    tried = 0
    for W, b, fitting in starts:
        fastest = min(fitting, key=lambda f: (f[1], f[0]))
        cands = _spread(fitting, max(1, preload_tries))
        if fastest not in cands:
            cands.append(fastest)
        for k, _, bits0, pre in cands:
            bits = [list(row) for row in bits0]
            preload = set(pre)
            kept = _upgrade(ctx, importance, bits, preload, T, M)
            tried += 1
            loss = _loss(importance, bits)
            if best is None or loss < best[0] - 1e-15:
                best = (loss, bits, preload, {"width": W, "uniform_bits": b, "preloaded": k, "upgrades": kept})
    _, bits, preload, info = best
    return bits, preload, {"width_compute_fit": W_max, **info, "starts_tried": tried}


# --------------------------------------------------------------------------------------------
# The exact planner (MILP)
# --------------------------------------------------------------------------------------------


class _MilpResult:
    __slots__ = ("status", "bits", "preload", "value", "info")

    def __init__(self, status, bits=None, preload=None, value=None, info=None):
        self.status, self.bits, self.preload, self.value, self.info = status, bits, preload, value, info


@contextlib.contextmanager
def _stdout_to_stderr():
    """The process's stdout (file descriptor 1) goes to stderr while the block runs. HiGHS, the
    MILP solver, prints a debugging line ("HighsMipSolverData::transformNewIntegerFeasibleSolution
    tmpSolver.run();") straight to stdout even when told to be silent (19 times in one full
    encoder benchmark), which would corrupt ``sti plan --json``. Python's and C's buffers are
    flushed at both ends, so what was written before the block keeps its stream and what is
    written in it (by any thread) reaches stderr."""
    try:
        import ctypes

        flush_c = ctypes.CDLL(None).fflush
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, AttributeError, ValueError):  # no C library to flush, or no stdout to move
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        flush_c(None)
        os.dup2(saved, 1)
        os.close(saved)


def _milp(ctx: _Ctx, imp, mode: str, T, M, min_width: int, time_limit, pairs) -> _MilpResult:
    """One MILP solve. mode "loss": min loss s.t. latency <= T, memory <= M; "latency": min
    latency s.t. memory <= M (M None: unbounded); "memory": min M s.t. latency <= T.

    Shards of a layer differ only in loss, so the timeline is modelled on *slots*: layer k has
    S stream slots, read in order, each empty or holding one read at some bitwidth (filled
    slots first, bitwidths non-increasing: the canonical stream order), and an integer count
    of preloaded shards per bitwidth (no timing). Which shard takes which slot is a
    transportation problem (continuous x[k, s, b], integral once the counts are integral), so
    branching is on the slot structure only and the many equivalent shard permutations never
    enter the search tree; the assignment is recomputed exactly afterwards.

    ``pairs``: the (layer k, stream slot r, earlier layer j) buffer constraints to include
    (see ``_exact``). ``value`` of the result: the objective in seconds / bytes / loss units.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp
    from scipy.sparse import csr_matrix

    L, S, B = ctx.L, ctx.S, ctx.bits
    nbits = len(B)
    use_x = mode == "loss"
    col = 0

    def block(n):
        nonlocal col
        col += n
        return col - n

    V0 = block(L * S * nbits)  # stream slot (k, r) holds a read at B[b]
    Q0 = block(L * nbits)  # number of layer k's shards preloaded at B[b]
    nint = col
    X0 = block(L * S * (nbits + 1)) if use_x else None  # shard (k, s) gets option o (0: drop)
    A0 = block(L * S)  # start of stream slot (k, r)'s read (0 length if the slot is empty)
    E0 = block(L)  # end of layer k's compute
    MV = block(1) if mode == "memory" else None

    def V(k, r, b):
        return V0 + (k * S + r) * nbits + b

    def NP(k, b):
        return Q0 + k * nbits + b

    def X(k, s, o):
        return X0 + (k * S + s) * (nbits + 1) + o

    def A(k, r):
        return A0 + k * S + r

    maxb = max(ctx.nbytes.values())
    # scales: times in units of tau, bytes in units of beta
    widest = max(ctx.shard_compute[b] + ctx.stream_compute[b] for b in ctx.bits)
    t_ub = ctx.start + L * S * max(ctx.read.values()) + L * (ctx.c0 + S * widest)
    tau = t_ub if mode == "latency" else T
    beta = float(max(1, L * S * maxb))
    bounded = mode == "memory" or M is not None
    cap = None if M is None else M - ctx.base
    cols_w = []  # (k, r, j, big-M bytes, column): slot (k, r)'s read waits for layer j to end
    if bounded:
        for k, r, j in sorted(pairs):
            # layer k's own bytes + preload fit the buffer (a row below): only layers j..k-1 overflow it
            bm = (k - j) * S * maxb if cap is None else min((k - j) * S * maxb, (k - j) * cap)
            if bm > 0:
                cols_w.append((k, r, j, bm, block(1)))
    nvar = col

    rows, cols, vals, lo, hi = [], [], [], [], []

    def row(entries, lb, ub):
        r_ = len(lo)
        for c_, v_ in entries:
            rows.append(r_)
            cols.append(c_)
            vals.append(v_)
        lo.append(lb)
        hi.append(ub)

    for k in range(L):
        for r in range(S):
            row([(V(k, r, b), 1.0) for b in range(nbits)], -np.inf, 1)
            if r + 1 < S:  # filled first, bitwidths non-increasing
                row([(V(k, r + 1, b), 1.0) for b in range(nbits)] + [(V(k, r, b), -1.0) for b in range(nbits)],
                    -np.inf, 0)
                row([(V(k, r + 1, b), b + 1.0) for b in range(nbits)]
                    + [(V(k, r, b), -(b + 1.0)) for b in range(nbits)], -np.inf, 0)
        row([(V(k, r, b), 1.0) for r in range(S) for b in range(nbits)]
            + [(NP(k, b), 1.0) for b in range(nbits)], min_width, S)
        if use_x:
            for b in range(nbits):  # as many shards at B[b] as slots at B[b]
                row([(X(k, s, b + 1), 1.0) for s in range(S)]
                    + [(V(k, r, b), -1.0) for r in range(S)] + [(NP(k, b), -1.0)], 0, 0)
            for s in range(S):
                row([(X(k, s, o), 1.0) for o in range(nbits + 1)], 1, 1)
    rd = [ctx.read[b] / tau for b in B]
    sc = [ctx.shard_compute[b] / tau for b in B]
    ss = [(ctx.shard_compute[b] + ctx.stream_compute[b]) / tau for b in B]  # a streamed shard's
    by = [ctx.nbytes[b] / beta for b in B]
    seq = [(k, r) for k in range(L) for r in range(S)]
    for (k0, r0), (k1, r1) in zip(seq, seq[1:]):  # one IO worker, reads in slot order
        row([(A(k1, r1), 1.0), (A(k0, r0), -1.0)] + [(V(k0, r0, b), -rd[b]) for b in range(nbits)], 0, np.inf)

    def compute_terms(k):
        return ([(V(k, r, b), -ss[b]) for r in range(S) for b in range(nbits)]
                + [(NP(k, b), -sc[b]) for b in range(nbits)])

    for k in range(L):  # layer k after layer k-1, and after its last read
        prev = [(E0 + k - 1, -1.0)] if k else []
        row([(E0 + k, 1.0)] + prev + compute_terms(k), (ctx.c0 + (0.0 if k else ctx.start)) / tau, np.inf)
        row([(E0 + k, 1.0), (A(k, S - 1), -1.0)] + [(V(k, S - 1, b), -rd[b]) for b in range(nbits)]
            + compute_terms(k), ctx.c0 / tau, np.inf)
    ub_E = [1.0] * L
    if bounded:
        pre_terms = [(NP(k, b), by[b]) for k in range(L) for b in range(nbits)]
        mv = [(MV, -1.0 / beta)] if MV is not None else []
        rhs = (-ctx.base / beta) if MV is not None else cap / beta
        for k in range(L):  # preload + each whole streamed layer fit (else the buffer deadlocks)
            row([(V(k, r, b), by[b]) for r in range(S) for b in range(nbits)] + pre_terms + mv, -np.inf, rhs)
        least = ctx.c0 + min_width * min(ctx.shard_compute.values())
        for k, r, j, bm, w in cols_w:
            span = [(V(kk, rr, b), by[b]) for kk in range(j, k) for rr in range(S) for b in range(nbits)]
            span += [(V(k, rr, b), by[b]) for rr in range(r + 1) for b in range(nbits)]
            row(span + pre_terms + mv + [(w, -bm / beta)], -np.inf, rhs)  # overflow forces w = 1
            tm = max(1e-9, 1.0 - (L - 1 - j) * least / tau)  # E_j <= T - least compute after j
            row([(A(k, r), 1.0), (E0 + j, -1.0), (w, -tm)], -tm, np.inf)  # w = 1: a >= E_j
            ub_E[j] = min(ub_E[j], tm)

    c = np.zeros(nvar)
    if mode == "loss":
        big = max(max(d.values()) for r in imp.loss for d in r) or 1.0
        sigma = 1e6 / big  # HiGHS stops at an absolute gap of 1e-6: make that negligible
        scale = 1 / sigma
        for k in range(L):
            for s in range(S):
                d = imp.loss[k][s]
                c[X(k, s, 0)] = sigma * d[DROP]
                for b, bits in enumerate(B):
                    c[X(k, s, b + 1)] = sigma * d[bits]
    elif mode == "latency":
        c[E0 + L - 1], scale = 1.0, tau
    else:
        c[MV], scale = 1.0, beta
    integrality = np.zeros(nvar)
    lb = np.zeros(nvar)
    ub = np.ones(nvar)  # binaries, x, and times (<= T, or <= the serial bound in latency mode)
    integrality[:nint] = 1
    if use_x:
        integrality[X0:X0 + L * S * (nbits + 1)] = 1
    ub[Q0:nint] = S
    for *_, w in cols_w:
        integrality[w] = 1
    lb[A(0, 0)] = ctx.start / tau  # reads start once the embedding rows are in
    ub[E0:E0 + L] = ub_E
    if MV is not None:
        ub[MV] = np.inf
    A_ = csr_matrix((vals, (rows, cols)), shape=(len(lo), nvar))
    options = {"mip_rel_gap": 0.0, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    t0 = time.perf_counter()
    with _stdout_to_stderr():
        res = milp(c, integrality=integrality, bounds=Bounds(lb, ub),
                   constraints=LinearConstraint(A_, np.array(lo), np.array(hi)), options=options)
    info = {"status": int(res.status), "message": str(res.message), "variables": int(nvar),
            "binaries": int(integrality.sum()), "constraints": len(lo),
            "seconds": round(time.perf_counter() - t0, 6),
            "mip_gap": None if getattr(res, "mip_gap", None) is None else float(res.mip_gap)}
    if res.status == 2:
        return _MilpResult("infeasible", info=info)
    if res.x is None:
        return _MilpResult("no-solution", info=info)
    x = res.x
    bits = [[DROP] * S for _ in range(L)]
    preload = set()
    for k in range(L):
        streamed = [B[b] for r in range(S) for b in range(nbits) if x[V(k, r, b)] > 0.5]
        resident = [B[b] for b in range(nbits) for _ in range(int(round(x[NP(k, b)])))]
        options_k = [(b, False) for b in streamed] + [(b, True) for b in resident]
        options_k += [(DROP, False)] * (S - len(options_k))
        # which shard takes which option: an exact assignment on the slot counts
        if imp is None:
            assign = list(range(S))
        else:
            cost = [[imp.loss[k][s][b] for b, _ in options_k] for s in range(S)]
            rows_, cols_ = linear_sum_assignment(np.array(cost))
            assign = [0] * S
            for s_, o_ in zip(rows_, cols_):
                assign[s_] = int(o_)
        for s_ in range(S):
            b, pre = options_k[assign[s_]]
            bits[k][s_] = b
            if pre:
                preload.add((k, s_))
    info["optimal"] = res.status == 0
    return _MilpResult("ok", bits, preload, float(res.fun) * scale, info)


def _wait_pairs(reads) -> set:
    """Buffer pairs (layer, stream slot, waited-for layer) of the reads that waited for room."""
    out, slot, prev = set(), 0, None
    for l, *_, wf in reads:
        slot = slot + 1 if l == prev else 0
        prev = l
        if wf >= 0:
            out.add((l, slot, wf))
    return out


def _exact(ctx, imp, mode, T, M, min_width, time_limit, seeds=()):
    """Solve the MILP with buffer constraints generated lazily, verified by the simulator.

    The buffer constraint of a (read slot (k, r), earlier layer j) pair says "if the bytes
    streamed from layer j's first read through this one, plus the preload, exceed
    M - fixed - scratch, this read starts after layer j's compute ends". All pairs together are
    the exact buffer-bounded timeline, but most never bind, and each costs a big-M binary that
    weakens the LP bound. So the MILP starts with the pairs where a known plan (``seeds``: the
    heuristic's) waited, solves, simulates the solution, and for each read the simulator held
    back for lack of room (waiting for layer j) adds the pair (its slot, j); repeat. Every layer
    must always fit the buffer on its own (a plain row). A relaxation optimum the simulator
    accepts is optimal for the full model.

    A solution the simulator rejects although no pair is missing overshoots by the solver's
    feasibility tolerance (~1e-6 relative); T or M is then tightened by the overshoot, at most
    ``_MAX_TIGHTEN`` times.

    Returns (bits, preload, value, info) -- value: simulated latency (loss and latency modes)
    or the smallest memory for the found configuration (memory mode) -- or None if infeasible.
    """
    pairs: set = set()
    for bits, preload in seeds:
        ok, _, _, _, det = _sim(ctx, bits, preload, M, record=True)
        if ok:
            pairs |= _wait_pairs(det[0])
    T_eff, M_eff = T, M
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    solves = tightened = 0
    while True:
        left = None if deadline is None else max(0.05, deadline - time.perf_counter())
        r = _milp(ctx, imp, mode, T_eff, M_eff, min_width, left, pairs)
        solves += 1
        if r.status == "infeasible":
            return None
        if r.status != "ok":
            raise STIError(f"the exact planner's solver stopped without a plan ({r.info['message']})",
                           "raise time_limit, or use method='heuristic'")
        info = {**r.info, "solves": solves, "buffer_pairs": len(pairs), "tightened": tightened}
        M_sim = math.ceil(r.value - 1e-9) if mode == "memory" else M
        ok, lat, peak, _, det = _sim(ctx, r.bits, r.preload, M_sim, record=True)
        in_memory = ok and (M_sim is None or peak <= M_sim)
        if mode == "latency":
            done = in_memory and lat <= r.value * (1 + 1e-7) + 1e-15
        else:
            done = _fits(ok, lat, peak, T, M_sim)
        if done:
            value = _min_memory_for(ctx, r.bits, r.preload, T) if mode == "memory" else lat
            return r.bits, r.preload, value, info
        new = (_wait_pairs(det[0]) if ok else set()) - pairs
        if new:
            pairs |= new
            continue
        # every buffer constraint this solution meets is in the model: solver tolerance let it through
        if mode == "latency" and in_memory:
            return r.bits, r.preload, lat, info
        if mode == "memory":
            m = _min_memory_for(ctx, r.bits, r.preload, T)
            if m is not None:
                return r.bits, r.preload, m, info
            lat = _sim(ctx, r.bits, r.preload, None)[1]  # its latency with an unbounded buffer
            T_eff = T_eff * (1 - 1e-9) - max(0.0, lat - T)
        else:
            if not in_memory:
                P = sum(ctx.nbytes[r.bits[l][s]] for l, s in r.preload)
                need = ctx.base + P + max(sum(ctx.nbytes[b] for s, b in enumerate(row) if (l, s) not in r.preload)
                                          for l, row in enumerate(r.bits))
                M_eff -= max(1, max(need, peak if ok else 0) - M)
            if ok and mode == "loss" and lat > T * (1 + REL_TOL):
                T_eff = T_eff * (1 - 1e-9) - (lat - T)
        tightened += 1
        if tightened > _MAX_TIGHTEN:
            raise STIError(f"the exact planner could not find a plan its simulator accepts (tightened "
                           f"{_MAX_TIGHTEN} times)", "use method='heuristic' (and report this instance)")


def _exact_minima(ctx, min_width, time_limit):
    def minima(T, M, want_latency=True, want_memory=True):
        lat = mem = None
        if want_latency:
            r = _exact(ctx, None, "latency", None, M, min_width, time_limit)
            lat = None if r is None else r[2]
        if want_memory:
            r = _exact(ctx, None, "memory", T, None, min_width, time_limit)
            mem = None if r is None else r[2]
        return lat, mem

    return minima


def plan_exact(shape: ModelShape, importance: Importance, device: DeviceProfile, target_latency: float,
               memory_budget: int, seq_len: int, *, min_width: int = 1, time_limit: float | None = 60.0) -> Plan:
    """The loss-optimal plan of the pipeline model (canonical stream order), by MILP.

    Needs SciPy (the ``solver`` extra). ``time_limit`` (s, None: none) bounds the whole search;
    a plan found within it without a proof of optimality has ``solver["optimal"] == False``.
    The heuristic runs first: its plan seeds the buffer constraints and is returned instead
    whenever the search ends without a better one.
    """
    T, M = target_latency, memory_budget
    _check(shape, importance, device, T, M, seq_len, min_width)
    M, T = int(M), _deadline(device, T, seq_len)
    try:
        import scipy.optimize  # noqa: F401
    except ImportError as e:  # pragma: no cover - scipy is a test dependency
        raise STIError("the exact planner needs SciPy", "pip install 'sti[solver]', or use method='heuristic'") from e
    ctx = _Ctx(shape, device, seq_len)
    t0 = time.perf_counter()
    h = _heuristic(ctx, importance, T, M, min_width)  # seeds the buffer constraints; a fallback
    try:
        r = _exact(ctx, importance, "loss", T, M, min_width, time_limit, seeds=[h[:2]] if h else ())
    except STIError:
        if h is None:
            raise
        r = None
        info = {"optimal": False, "message": "the solver stopped without a plan; the heuristic's plan is kept"}
    else:
        if r is None:
            raise _infeasible(ctx, T, M, "exact", min_width, _exact_minima(ctx, min_width, time_limit))
    if r is not None:
        bits, preload, _, info = r
        if h is not None and not info["optimal"] and _loss(importance, h[0]) < _loss(importance, bits):
            r = None
            info["message"] += "; the heuristic's plan was better and is kept"
    if r is None:
        bits, preload = h[0], h[1]
    preload, info["preload_filled"] = _fill_preload(ctx, bits, preload, M)
    info["seconds"] = round(time.perf_counter() - t0, 6)
    return _make_plan(ctx, importance, bits, preload, T, M, "exact", info, target_latency)


# --------------------------------------------------------------------------------------------
# Front door and minima
# --------------------------------------------------------------------------------------------


def plan(shape: ModelShape, importance: Importance, device: DeviceProfile, target_latency: float,
         memory_budget: int, seq_len: int, *, method: str = "heuristic", **options) -> Plan:
    """Plan widths, bitwidths and preload for latency T (s) and memory M (bytes) at ``seq_len``.

    ``method``: "heuristic" (STI's, fast, pure Python) or "exact" (MILP, needs SciPy).
    Options: ``min_width`` (shards every layer keeps, default 1); exact: ``time_limit`` (s).
    Raises ``InfeasiblePlanError`` (an ``STIError``) naming the minima when nothing fits.
    """
    if method == "heuristic":
        return plan_heuristic(shape, importance, device, target_latency, memory_budget, seq_len, **options)
    if method == "exact":
        return plan_exact(shape, importance, device, target_latency, memory_budget, seq_len, **options)
    raise STIError(f"unknown planning method {method!r}", f"use one of {METHODS}")


def min_latency(shape: ModelShape, device: DeviceProfile, seq_len: int, memory_budget: int | None = None, *,
                method: str = "exact", min_width: int = 1, time_limit: float | None = 60.0) -> float | None:
    """Smallest deadline (s; the checked timeline's latency x ``tail_ratio``, compute stretched
    by the compute margin: see ``_Ctx``) of any plan within ``memory_budget`` (None: unbounded),
    or None if no plan fits that memory. ``method`` "heuristic" searches the heuristic's space
    only."""
    _check(shape, None, device, None, memory_budget, seq_len, min_width)
    ctx = _Ctx(shape, device, seq_len)
    if memory_budget is not None and memory_budget < _abs_min_memory(ctx, min_width):
        return None
    m = _heuristic_minima(ctx, min_width) if method == "heuristic" else _exact_minima(ctx, min_width, time_limit)
    t = m(None, None if memory_budget is None else int(memory_budget), want_memory=False)[0]
    return None if t is None else t * device.margin(seq_len)


def min_memory(shape: ModelShape, device: DeviceProfile, seq_len: int, target_latency: float | None = None, *,
               method: str = "exact", min_width: int = 1, time_limit: float | None = 60.0) -> int | None:
    """Smallest memory budget (bytes) at which some plan meets the deadline ``target_latency``
    (None: any latency), or None if no plan is that fast."""
    _check(shape, None, device, target_latency, None, seq_len, min_width)
    ctx = _Ctx(shape, device, seq_len)
    if target_latency is None:
        return _abs_min_memory(ctx, min_width)
    m = _heuristic_minima(ctx, min_width) if method == "heuristic" else _exact_minima(ctx, min_width, time_limit)
    return m(_deadline(device, target_latency, seq_len), None, want_latency=False)[1]
