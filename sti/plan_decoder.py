"""Planning a streamed decoder: which version of every shard to run, which shards stay resident,
how many read buffers, and how long a request the budget leaves room for.

The memory a ``StreamingDecoder`` holds is, exactly (``DecoderShape`` mirrors its accounting):

    norms + preloaded shards + slots x (largest streamed shard) + prefill scratch
          + batch x context x (KV cache and embedding row per token)

``plan_decoder_shape`` is a pure function of a :class:`DecoderShape` (sizes read from a store
by :func:`decoder_shape`) and returns a plain :class:`DecoderPlan`. Without a per-token latency
target every shard runs at one version (the store's lossless one by default); with one, the
versions come from the decoder profile's importance and device measurements (see
``sti.profile_decoder``). What the budget leaves after the request's KV cache and the minimum
read buffers goes first to a second layer of read buffers (double buffering), then to preloading
shards in pass order: the first layers' shards are then resident when a request starts, and
every preloaded byte is a byte not read per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sti.errors import STIError
from sti.store import format as fmt

HEAD = fmt.HEAD
DEFAULT_KV = "fp16"  # KV-cache element type (llama.cpp's default too); "fp32" for exact float32 parity
DEFAULT_CONTEXT = 512  # tokens reserved when the caller does not say (less if the budget is smaller)


def read_slots(per_layer: int, double: bool = True) -> int:
    """Read buffers for streamed layers of ``per_layer`` shards each. ``double``: two layers'
    worth, so the IO worker fetches all of the next layer while one runs (double buffering);
    else the fewest that still overlap: one layer's plus one. With one buffer fewer than a
    layer's pair, every layer waits for its last shard's read: measured on SmolLM2 at a 10 %
    budget (3 shards a layer), 5 buffers stall 6-8 ms per token, 6 buffers 2-3 ms."""
    per_layer = max(per_layer, 1)
    return 2 * per_layer if double else per_layer + 1


@dataclass(frozen=True)
class DecoderShape:
    """The sizes a decoder plan depends on."""

    layers: list[list[int]]  # per layer: shard indices
    head: list[int]  # LM-head shard indices
    shard_bytes: dict[tuple[int, int, int], int]  # (layer or HEAD, shard, bits) -> bytes of that version
    bits: tuple[int, ...]  # versions the store has
    fixed_bytes: int  # norms
    scratch_bytes: int  # prefill's dequantization scratch (largest layer matrix, float32)
    token_bytes: int  # KV cache and embedding row per token of one sequence
    max_position: int


@dataclass
class DecoderPlan:
    layers: list[dict[int, int]]  # per layer: {shard: bits}
    head: dict[int, int]
    preload: list[tuple[int, int]]
    slots: int
    slot_bytes: int
    context: int  # tokens per sequence reserved
    batch: int
    memory_budget: int
    weight_bytes: int  # norms + preload + slots + scratch
    stream_bytes_per_pass: int  # bytes read per forward pass
    notes: list[str] = field(default_factory=list)
    kv: str = DEFAULT_KV  # the KV cache's element type the budget was counted with

    @property
    def schedule(self):
        from sti.decoder_runtime import DecoderSchedule

        return DecoderSchedule(self.layers, self.head, set(self.preload), self.memory_budget)

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [{str(s): b for s, b in lay.items()} for lay in self.layers]
        d["head"] = {str(s): b for s, b in self.head.items()}
        return d


def decoder_shape(store, kv: str = DEFAULT_KV) -> DecoderShape:
    """The sizes of a decoder store (and of the runtime's fixed buffers) for the planner, with a
    KV cache of element type ``kv`` ("fp16" or "fp32")."""
    import numpy as np

    from sti.models import llama

    if store.family != "llama":
        raise STIError(f"{store.path} holds a {store.family} model, not a decoder", "pack a LLaMA-family model")
    L = store.num_layers
    layers = [store.shard_indices(layer) for layer in range(L)]
    head = store.shard_indices(HEAD)
    sizes = {(layer, s, b): store.shard_nbytes(layer, s, b)
             for layer in [*range(L), HEAD] for s in store.shard_indices(layer) for b in store.bits}
    c = store.config
    norms = store.globals()["norm"].nbytes + sum(a.nbytes for i in range(L) for a in store.layer_common(i).values())
    scratch = 4 * max(int(np.prod(e.shape)) for lay in store.manifest.layouts for e in lay
                      if len(e.shape) == 2 and e.name != "lm_head")
    token = llama.kv_bytes_per_token(c, kv) + 4 * c.hidden_size  # its KV entries and its embedding row
    return DecoderShape(layers, head, sizes, tuple(store.bits), norms, scratch, token, c.max_position)


def plan_decoder(store, memory: int = 0, *, bits: int | str | None = None, batch: int = 1,
                 context: int | None = None, preload: bool = True, token_latency: float | None = None,
                 storage: str | None = None, kv: str = DEFAULT_KV, min_context: int = 2) -> DecoderPlan:
    """Plan for a store (see :func:`plan_decoder_shape`), its KV cache in ``kv`` (fp16, fp32)."""
    shape = decoder_shape(store, kv)
    versions, note = None, None
    if token_latency is not None:
        if bits is not None:
            raise STIError("--bits and --token-latency both choose the versions", "pass one of them")
        from sti.profile_decoder import choose

        choice, costs = choose(store, shape, token_latency, memory, batch, storage, context=context, preload=preload)
        versions = costs.versions(choice.index)
        note = (f"versions for {token_latency * 1e3:.0f} ms/token: predicted {choice.predicted_s * 1e3:.1f} ms, "
                f"summed KL {choice.kl:.3g} nats/token")
    plan = plan_decoder_shape(shape, memory, bits=bits, batch=batch, context=context, preload=preload,
                              versions=versions, min_context=min_context)
    if note:
        plan.notes.insert(0, note)
    plan.kv = kv
    return plan


def _bits_code(bits, have) -> int:
    if isinstance(bits, str):
        b = bits.strip().lower()
        code = fmt.VERSION_NAMES.get(b)
        if code is None:
            try:
                code = int(b.removesuffix("bit").removesuffix("-"))
            except ValueError:
                code = -1
    else:
        code = int(bits)
    if code not in have:
        raise STIError(f"the store has no {bits!r} version",
                       f"choose one of: {', '.join(fmt.label(b) for b in sorted(have))}")
    return code


def plan_decoder_shape(shape: DecoderShape, memory: int = 0, *, bits: int | str | None = None, batch: int = 1,
                       context: int | None = None, preload: bool = True,
                       versions: tuple[list[dict[int, int]], dict[int, int]] | None = None,
                       min_context: int = 2) -> DecoderPlan:
    """The plan for ``memory`` bytes (0: unbounded). ``versions``: (per-layer {shard: bits},
    {head shard: bits}) chosen elsewhere; else every shard at ``bits`` (default lossless).
    ``min_context``: without a ``context``, the tokens a request needs (a prompt and its new
    tokens): double buffering is bought only if this many still fit."""
    if batch < 1:
        raise STIError(f"batch must be at least 1, got {batch}", "pass --batch 1 or more")
    notes = []
    if versions is None:
        if bits is None:
            code = next((b for b in (fmt.SOURCE, fmt.FP32) if b in shape.bits), None)
            if code is None:
                raise STIError("the store has no lossless version", "choose a bitwidth with --bits")
        else:
            code = _bits_code(bits, shape.bits)
        layers = [{s: code for s in shards} for shards in shape.layers]
        head = {s: code for s in shape.head}
        notes.append(f"every shard at {fmt.label(code)}")
    else:
        layers, head = versions
    items = [(layer, s, b) for layer, lay in enumerate(layers) for s, b in sorted(lay.items())]
    items += [(HEAD, s, b) for s, b in sorted(head.items())]
    size = {it: shape.shard_bytes[it] for it in items}
    want_ctx = min(context or DEFAULT_CONTEXT, shape.max_position)

    def weights(preloaded: set, double: bool) -> tuple[int, int, int]:
        streamed = [it for it in items if it[:2] not in preloaded]
        slot = max((size[it] for it in streamed), default=0)
        per_layer = max((sum(1 for it in streamed if it[0] == i) for i in range(len(layers))), default=0)
        n = min(read_slots(per_layer, double), len(streamed)) if streamed else 0
        pre = sum(size[it] for it in items if it[:2] in preloaded)
        return shape.fixed_bytes + pre + n * slot + (shape.scratch_bytes if streamed else 0), n, slot

    # The budget is spent in this order: the fewest read buffers and the request's KV cache (the
    # context asked for, else min_context tokens where they fit), then double buffering (it removes a stall per layer,
    # worth more than any preloaded shard), then the context up to its default, then preloads.
    w0, n0, slot0 = weights(set(), False)
    if memory:
        room = memory - w0
        fits = max(0, room) // (batch * shape.token_bytes)
        if fits < 2 or (context is not None and fits < want_ctx):
            need_ctx = want_ctx if context is not None else 2
            smallest = w0 + batch * need_ctx * shape.token_bytes
            raise STIError(f"memory budget {memory:,} B is too small: streaming these versions needs {w0:,} B "
                           f"({n0} read buffers of {slot0:,} B, a {shape.scratch_bytes:,} B prefill scratch, "
                           f"{shape.fixed_bytes:,} B of norms) and {batch} x {need_ctx} tokens of KV cache "
                           f"{batch * need_ctx * shape.token_bytes:,} B",
                           f"raise --memory to at least {smallest:,} B ({smallest / 1e6:.1f} MB), use lower "
                           f"bitwidths, or a shorter context")
        floor = want_ctx if context is not None else max(2, min(min_context, want_ctx))
        double = weights(set(), True)[0] + batch * floor * shape.token_bytes <= memory
        fits = max(0, memory - weights(set(), double)[0]) // (batch * shape.token_bytes)
        ctx = int(min(want_ctx, fits))
        if ctx < want_ctx:
            notes.append(f"context limited to {ctx} tokens by the budget")
        if not double:
            notes.append("no room for double buffering: each layer waits for its last shard's read")
    else:
        ctx, double = want_ctx, True
    reserved = batch * ctx * shape.token_bytes
    pre: set = set()
    if preload:
        for it in items:  # pass order: the first layers first
            trial = pre | {it[:2]}
            if not memory or weights(trial, double)[0] + reserved <= memory:
                pre = trial
            elif memory:
                break
    w, n, slot = weights(pre, double)
    if pre:
        notes.append(f"{len(pre)} of {len(items)} shards preloaded")
    streamed = sum(size[it] for it in items if it[:2] not in pre)
    return DecoderPlan(layers, head, sorted(pre), n, slot, ctx, batch, memory, w, streamed, notes)
