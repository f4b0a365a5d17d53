"""The streaming decoder on a tiny random LLaMA store: lossless streaming equals in-memory
generation, the memory budget holds (KV cache included), batches share passes, bad input and
damaged shards are reported."""

import numpy as np
import pytest

from sti.api import Generator
from sti.decoder_runtime import zero_copy_supported
from sti.errors import STIError
from sti import lowbit
from sti.linops import BySize, Packed, Q1Stack, SegmentStack
from sti.store import Store, pack

from tiny_llama import CFG, weights, write_gguf

PROMPT = [1, 40, 41, 42, 43, 44, 45]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-llama-rt")
    write_gguf(root / "tiny.gguf", CFG, weights(CFG, np.random.default_rng(1)))
    return root / "tiny.gguf", pack(root / "tiny.gguf", root / "tiny.sti", progress=False)


def greedy(gen, ids, n=12):
    return list(gen.stream(list(ids), max_tokens=n))


def test_lossless_streaming_is_token_identical_to_in_memory(tiny):
    gguf, store = tiny
    ref = Generator.load(str(gguf), progress=False)
    gen = Generator.from_store(store)  # unbounded: every shard lossless, all preloaded
    small = Generator.from_store(store, memory=_smallest(store) + 40_000, preload=False)
    try:
        want = greedy(ref, PROMPT)
        assert greedy(gen, PROMPT) == want
        assert greedy(small, PROMPT) == want
        x = np.asarray([PROMPT])
        # same weights; the kernel measured fastest per shape may differ between the two (fused
        # products round x to int16 blocks, dequantize + BLAS does not): ~2e-4 here
        np.testing.assert_allclose(small.logits(x), ref.logits(x), rtol=0, atol=1e-3)
        io = small.engine._io
        assert io.stats["reads"] > 0 and io.stats["bytes"] > 0  # it really streamed
    finally:
        gen.close()
        small.close()


@pytest.mark.skipif(not lowbit.has_c_kernels(), reason="int8 products need sti._lowbit (no C compiler)")
def test_lossless_batches_with_int8_products_are_token_identical(tiny, tmp_path, monkeypatch):
    """Decode batches of the lossless GGML shards may run int8 products (x rounded per block of
    32). That is decided per kind and batch size, not per shape, so the resident engine (whole
    matrices) and the streamed one (shards) round x alike and pick the same tokens."""
    gguf, store = tiny
    monkeypatch.setenv("STI_CACHE", str(tmp_path))  # a fresh profile, shared by both engines
    from sti.api import _kernel_profile

    prof = _kernel_profile()
    for kind in lowbit.GGML:  # the decision for 4-sequence batches: int8 (as measured on this CPU)
        prof.add(lowbit.KernelChoice(kind, lowbit.INT8_REF_SHAPE, lowbit.GGML[kind][2], 4, "int8", 1))
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:], [1, 50, 51]]
    ref = Generator.load(str(gguf), progress=False)
    small = Generator.from_store(store, memory=_smallest(store) + 80_000, preload=False, batch=4)
    try:
        want = list(ref.stream_batch(prompts, max_tokens=10))
        assert list(small.stream_batch(prompts, max_tokens=10)) == want
        assert small.engine._io.stats["reads"] > 0
        # one token for each of 4 sequences: a decode step's products; int8 on one side and float
        # on the other would differ by ~5e-2 here, the same rounding of x by summation order only
        x = np.asarray([[p[0]] for p in prompts])
        np.testing.assert_allclose(small.logits(x), ref.logits(x), rtol=0, atol=1e-4)
        ran = {c.shape for c in prof.choices.values() if c.method == "int8" and c.shape != lowbit.INT8_REF_SHAPE}
        assert len(ran) >= 3  # whole and shard shapes both multiplied with int8
    finally:
        small.close()


@pytest.mark.skipif(not lowbit.has_c_kernels(), reason="stacked int8 products need sti._lowbit (no C compiler)")
def test_low_bit_decode_batches_run_a_layers_shards_as_one_int8_product(tiny, tmp_path, monkeypatch):
    """Streamed sti-q1 shards: a layer's q, k, v (gate, up) shards form one Q1Stack, its output
    (down) projection's column shards another, and where a decode batch's products go int8 its
    logits are bit for bit those of the shards multiplied one by one with int8 products."""
    _, store = tiny
    monkeypatch.setenv("STI_CACHE", str(tmp_path))  # a fresh profile
    gen = Generator.from_store(store, memory=_smallest(store) + 200_000, bits=3, preload=False, batch=4)
    try:
        eng = gen.engine
        stacks = [(w, name, op) for w in eng._layer_w.values() for name, op in w.items() if isinstance(op, Q1Stack)]
        assert {name for _, name, _ in stacks} == {"wqkv", "w_gate_up", "wo", "w_down"}
        assert len(stacks) == 4 * len(eng._layer_w)
        shapes = {(op.shape, op.bits) for _, _, op in stacks}
        shapes |= {(p.shape, p.t.bits) for _, _, op in stacks for p in op.parts}
        for shape, bits in shapes:  # batches of 4 go int8, the stacks and each shard alike
            eng.profile.add(lowbit.KernelChoice("sti-q1", shape, bits, 4, "int8", 2))
        x = np.asarray([[5], [40], [41], [60]])
        stacked = gen.logits(x)
        assert all(op._threads[4] == 2 for _, _, op in stacks)  # each ran as one int8 product
        for w, name, op in stacks:
            w[name] = op.composite
        np.testing.assert_array_equal(gen.logits(x), stacked)
    finally:
        gen.close()


@pytest.mark.skipif(not zero_copy_supported(), reason="runs of streamed head shards need the mmap io mode")
@pytest.mark.parametrize("bits", [None, 3])  # lossless GGML blocks (tiled) and sti-q1 shards (Q1Stack)
def test_streamed_head_shards_run_as_one_product_with_the_logits_of_one_by_one(tiny, tmp_path, monkeypatch, bits):
    """Adjacent streamed LM-head shards multiply as one matrix per run (up to half the read
    slots, a fixed partition): the same logits as one product per shard, at batch 1 (fused
    products) and batch 4 (int8 products)."""
    _, store = tiny
    monkeypatch.setenv("STI_CACHE", str(tmp_path))  # a fresh profile
    gen = Generator.from_store(store, memory=_smallest(store) + 200_000, bits=bits, preload=False, batch=4)
    try:
        eng = gen.engine
        runs = eng._head_plan
        assert sorted(s for run in runs for s in run) == sorted(eng.schedule.head)
        assert max(map(len, runs)) == max(1, eng.n_slots // 2) > 1
        x1, x4 = np.asarray([[5]]), np.asarray([[5], [40], [41], [60]])
        if lowbit.has_c_kernels():  # batches of 4 go int8, whole runs and single shards alike
            kind = "sti-q1" if bits else eng._shard_ops(-1, runs[0][0], 0)["lm_head"].t.kind
            for op in [eng._head_op(k, run, list(range(len(run)))) for k, run in enumerate(runs)]:
                ops = [getattr(op, "small", op)] + list(getattr(op, "parts", []))
                for o in ops:
                    o = getattr(o, "small", o)
                    eng.profile.add(lowbit.KernelChoice(kind, tuple(o.shape), bits or lowbit.GGML[kind][2], 4, "int8", 2))
            if not bits:
                eng.profile.add(lowbit.KernelChoice(kind, lowbit.INT8_REF_SHAPE, lowbit.GGML[kind][2], 4, "int8", 2))
        runs_out = [gen.logits(x1), gen.logits(x4)]
        if bits and lowbit.has_c_kernels():  # each run of 2 ran as one int8 product
            assert all(isinstance(op, Q1Stack) and op._threads[4] == 2 for op in eng._head_ops.values())
        eng._head_plan, eng._head_ops = [[s] for run in runs for s in run], {}
        np.testing.assert_array_equal(gen.logits(x1), runs_out[0])
        np.testing.assert_array_equal(gen.logits(x4), runs_out[1])
        assert eng._io.stats["reads"] > 0
    finally:
        gen.close()


def _smallest(store) -> int:
    """The smallest budget plan_decoder accepts (parsed from its error)."""
    import re

    with pytest.raises(STIError) as e:
        Generator.from_store(store, memory=1000, preload=False)
    return int(re.search(r"at least ([\d,]+) B", e.value.fix).group(1).replace(",", ""))


def test_budget_is_never_exceeded_and_counts_the_kv_cache(tiny):
    _, store = tiny
    budget = _smallest(store) + 30_000
    gen = Generator.from_store(store, memory=budget)
    try:
        greedy(gen, PROMPT, n=8)
        eng = gen.engine
        assert eng.res.peak <= budget
        cache_bytes = eng.request_bytes(1, len(PROMPT) + 8)
        assert eng.res.peak >= eng.weight_bytes + cache_bytes  # the request's cache was held
        assert eng.res.now == eng.weight_bytes  # and released
    finally:
        gen.close()


def test_an_impossible_budget_names_the_smallest_one(tiny):
    _, store = tiny
    smallest = _smallest(store)
    Generator.from_store(store, memory=smallest, preload=False).close()  # accepted
    with pytest.raises(STIError, match="at least"):
        Generator.from_store(store, memory=smallest - 1, preload=False)


def test_the_budget_buys_double_buffering_before_preloads(tiny):
    from sti.plan_decoder import plan_decoder

    _, store = tiny
    st = Store.open(store)
    per_layer = len(st.shard_indices(0))
    smallest = _smallest(store)
    tight = plan_decoder(st, smallest, context=2)
    assert tight.slots == per_layer + 1 and not tight.preload
    assert any("double buffering" in n for n in tight.notes)
    # (per_layer - 1) more buffers fit: the IO worker can now hold the next layer whole
    roomy = plan_decoder(st, smallest + (per_layer - 1) * tight.slot_bytes, context=2)
    assert roomy.slots == 2 * per_layer and not roomy.preload
    # without a context, a request's own length comes before double buffering
    budget = smallest + (per_layer - 1) * tight.slot_bytes
    assert plan_decoder(st, budget, min_context=2).slots == 2 * per_layer
    long = plan_decoder(st, budget, min_context=roomy.context + 1)
    assert long.slots == per_layer + 1 and long.context > roomy.context
    # every further byte goes to preloads, never at the cost of the second layer of buffers
    for extra in (1, 3, 6):
        p = plan_decoder(st, smallest + (per_layer - 1 + extra) * tight.slot_bytes, context=2)
        streamed = p.schedule.stream_order()
        per = max(sum(1 for it in streamed if it[0] == i) for i in range(st.num_layers))
        assert p.preload and p.slots == min(2 * max(per, 1), len(streamed))
        assert p.weight_bytes <= p.memory_budget


def test_cli_generate_keeps_room_for_the_whole_request(tiny, capsys):
    import json

    from sti.cli import main

    _, store = tiny
    st = Store.open(store)
    smallest = _smallest(store)  # fewest read buffers and two tokens
    # double buffering would fit here, but only with a context shorter than prompt + 12
    budget = smallest + (len(st.shard_indices(0)) - 1) * _slot_bytes(st) + 3 * _token_bytes(st)
    assert main(["generate", "--store", str(store), "--memory", str(budget), "--json", "--max-tokens", "12",
                 "hello there"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 12


def _slot_bytes(st) -> int:
    from sti.plan_decoder import plan_decoder

    return plan_decoder(st, 0, preload=False).slot_bytes


def _token_bytes(st) -> int:
    from sti.plan_decoder import decoder_shape

    return decoder_shape(st).token_bytes


def test_prompt_longer_than_the_context_is_refused(tiny):
    _, store = tiny
    gen = Generator.from_store(store, memory=_smallest(store) + 20_000, preload=False)
    try:
        with pytest.raises(STIError, match="holds"):
            list(gen.stream(PROMPT * 20, max_tokens=4))
    finally:
        gen.close()


def test_a_batch_equals_each_prompt_alone(tiny):
    gguf, store = tiny
    ref = Generator.load(str(gguf), progress=False)
    prompts = [PROMPT, PROMPT[:3] + [50, 51], [1, 60]]
    alone = [greedy(ref, p, n=6) for p in prompts]
    for gen in (ref, Generator.from_store(store, memory=_smallest(store) + 200_000)):
        steps = list(gen.stream_batch(prompts, max_tokens=6))
        got = [[s[b] for s in steps if s[b] is not None] for b in range(len(prompts))]
        assert got == alone
        gen.close()


def test_low_bit_versions_run_within_budget(tiny):
    _, store = tiny
    budget = 400_000
    gen = Generator.from_store(store, memory=budget, bits=4)
    try:
        toks = greedy(gen, PROMPT, n=6)
        assert len(toks) == 6 and gen.engine.res.peak <= budget
    finally:
        gen.close()


@pytest.mark.skipif(not zero_copy_supported(), reason="mapped fetches need mmap with madvise (Linux)")
def test_mapped_and_copied_fetches_give_identical_results(tiny):
    """io="mmap" (zero-copy: pages faulted in and dropped per slot) and io="read" (pread into
    buffers) run the same operators on the same bytes: identical logits and tokens."""
    _, store = tiny
    budget = _smallest(store) + 40_000
    gens = {io: Generator.from_store(store, memory=budget, preload=False, io=io) for io in ("mmap", "read")}
    try:
        x = np.asarray([PROMPT])
        np.testing.assert_array_equal(gens["mmap"].logits(x), gens["read"].logits(x))
        assert greedy(gens["mmap"], PROMPT, n=6) == greedy(gens["read"], PROMPT, n=6)
        eng = gens["mmap"].engine
        assert not Store.open(store).sequential and eng.store.sequential  # read-ahead on: large page-cache folios
        wqkv = eng._layer_w[0]["wqkv"]
        if lowbit.has_c_kernels():  # decode: one product over every shard's q, k and v rows, in place
            assert isinstance(wqkv, BySize) and isinstance(wqkv.large, SegmentStack)  # prefill: a product per shard
            assert isinstance(wqkv.small, Packed) and isinstance(wqkv.small.t, lowbit.TiledTensor)
        else:  # without them tiles cannot be read in place: a product per shard throughout
            assert isinstance(wqkv, SegmentStack)
        io = eng._io
        assert 0 < len(io.held) <= eng.n_slots  # never more shards mapped in than slots
        assert eng.res.peak <= budget
    finally:
        for g in gens.values():
            g.close()
    assert not io.held  # closing drops every mapped shard


@pytest.mark.parametrize("io", ["mmap", "read"])
def test_a_damaged_shard_is_named_when_streamed(tiny, tmp_path, io):
    if io == "mmap" and not zero_copy_supported():
        pytest.skip("mapped fetches need mmap with madvise (Linux)")
    import shutil

    _, store = tiny
    copy = tmp_path / "damaged.sti"
    shutil.copytree(store, copy)
    st = Store.open(copy)
    path, offset, _ = st.shard_location(1, 0, st.bits[-1])
    st.close()
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        b = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    gen = Generator.from_store(copy, memory=_smallest(copy) + 40_000, preload=False, io=io)
    try:
        with pytest.raises(STIError, match=r"layer 1, index 0"):
            greedy(gen, PROMPT, n=2)
    finally:
        gen.close()


def test_packed_models_keep_blas_to_one_thread_float32_models_do_not(tiny, monkeypatch):
    from sti import blas

    gguf, _ = tiny
    entered = []
    real = blas.limited

    def spy(n=1):
        entered.append(n)
        return real(n)

    monkeypatch.setattr(blas, "limited", spy)
    x = np.asarray([PROMPT])  # a prompt: float products, whatever kernel its size measured fastest
    packed, plain = Generator.load(str(gguf), progress=False), Generator.load(str(gguf), progress=False, packed=False)
    packed.logits(x)  # its products run on STI's own threads: BLAS on one, none left spinning
    assert entered and entered[0] == 1
    entered.clear()
    plain.logits(x)  # float32 matrices: BLAS multiplies them on its own threads
    assert entered == []
    np.testing.assert_allclose(packed.logits(x), plain.logits(x), rtol=0, atol=1e-3)
