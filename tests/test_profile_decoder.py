"""The decoder profile and the version chooser: on a tiny random LLaMA store the profile is
written with every table the chooser reads, importance rises as bits fall, and a per-token target
runs end to end; on synthetic tables the chooser meets every feasible target and refuses the rest,
naming the fastest step it could reach. No timing is asserted."""

import itertools
import json
import re
import shutil
import types

import numpy as np
import pytest

from sti import lowbit
from sti.api import Generator
from sti.errors import STIError
from sti.linops import BySize
from sti.plan_decoder import decoder_shape
from sti.profile_decoder import (Choice, VersionCosts, choose, fastest_step, format_summary, greedy_versions,
                                 load_decoder_profile, load_kernel_profile, profile_path, run_decoder_profile)
from sti.store import HEAD, Store, pack

from tiny_llama import CFG, weights, write_gguf

PROMPT = [1, 40, 41, 42, 43, 44, 45]
QUICK = {"n_texts": 2, "seq_len": 32, "checks": 2, "repeats": 1, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """A private user cache: the profile and the generators save this machine's kernel choices there."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("sti-cache")
        mp.setenv("STI_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """(store path, run_decoder_profile's summary) of a tiny random LLaMA store, profiled once."""
    root = tmp_path_factory.mktemp("tiny-llama-profile")
    write_gguf(root / "tiny.gguf", CFG, weights(CFG, np.random.default_rng(2)))
    store = pack(root / "tiny.gguf", root / "tiny.sti", progress=False)
    return store, run_decoder_profile(store, **QUICK)


# ------------------------------------------------------------------ the profile


def test_profile_is_written_with_every_table_the_chooser_reads(profiled, own_cache):
    store, summary = profiled
    doc = load_decoder_profile(store)
    assert summary["profile"] == str(profile_path(store))
    st = Store.open(store)
    lossy = [str(b) for b in st.bits if b < 32]
    imp, dev = doc["importance"], doc["device"]
    assert len(imp["layers"]) == st.num_layers
    for layer, row in enumerate(imp["layers"]):
        assert sorted(row) == sorted(str(s) for s in st.shard_indices(layer))
        assert all(sorted(v) == sorted(lossy) and min(v.values()) >= 0 for v in row.values())
    assert sorted(imp["head"]) == sorted(str(s) for s in st.shard_indices(HEAD))
    for kind in ("layer", "head"):
        assert sorted(dev["io"][kind], key=int) == [str(b) for b in st.bits]
        for b in st.bits:
            io = dev["io"][kind][str(b)]
            assert io["bytes"] > 0 and io["io_s"] > 0 and io["warm_s"] > 0 and io["cold_s"] > 0
            assert sorted(dev["compute"][kind][str(b)]) == ["1", "16"]
    assert sorted(dev["overhead"]) == ["1", "16"]
    versions = ("source", "8-bit", "4-bit", "3-bit", "2-bit")
    assert [c["run"] for c in dev["check"]] == [f"{v}, all streamed" for v in versions]
    assert 0 <= dev["contention"] <= 2
    assert len(imp["check"]["shards"]) == 2
    assert doc["calibration"]["tokens"] == 2 * 32
    kernels = load_kernel_profile(store)  # STORE/kernels.json: the choices the timings used ...
    assert kernels is not None and kernels.choices
    machine = lowbit.load_profile(own_cache / "kernels.json")  # ... in this machine's profile, which the runtime reads
    assert all(machine.get(c.kind, c.shape, c.bits, c.batch) == c for c in kernels.choices.values())
    st.close()
    table = format_summary(summary)
    assert "mean KL" in table and "source |" in table and "2-bit |" in table


def test_importance_rises_as_bits_fall(profiled):
    store, _ = profiled
    imp = load_decoder_profile(store)["importance"]
    bits = sorted(int(b) for b in imp["head"]["0"])
    layer_mean = [np.mean([v[str(b)] for row in imp["layers"] for v in row.values()]) for b in bits]
    head_mean = [np.mean([v[str(b)] for v in imp["head"].values()]) for b in bits]
    assert all(a > b for a, b in itertools.pairwise(layer_mean)), layer_mean
    assert all(a > b for a, b in itertools.pairwise(head_mean)), head_mean


def test_a_store_with_few_versions_is_profiled_at_the_ones_it_has(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", CFG, weights(CFG, np.random.default_rng(3)))
    store = pack(tmp_path / "tiny.gguf", tmp_path / "few.sti", bits=["4", "source"], progress=False)
    run_decoder_profile(store, **QUICK)
    doc = load_decoder_profile(store)
    assert doc["importance"]["anchor_bits"] == 4  # the lossy version nearest 3-bit
    assert all(sorted(v) == ["4"] for row in doc["importance"]["layers"] for v in row.values())
    assert sorted(doc["device"]["io"]["layer"]) == ["33", "4"]
    assert [c["run"] for c in doc["device"]["check"]] == ["source, all streamed", "4-bit, all streamed"]


def test_head_importance_is_the_exact_kl(profiled):
    """A head shard's KL is computed from its own rows only; it must equal the KL of full logits."""
    from sti.profile_decoder import _Calibrated, calibration_ids

    store, _ = profiled
    with Store.open(store) as st:
        ids, _ = calibration_ids(st, n_texts=2, seq_len=16)
        cal = _Calibrated(st, ids, 33)
        s = st.shard_indices(HEAD)[0]
        rows = st.read_shard(HEAD, s, 2)["lm_head"]
        a, w = cal.head[s]
        E = cal.E.copy()
        E[a:a + len(w)] = rows
        z = (cal.h @ E.T).astype(np.float64)
        logq = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        logp = np.log(cal.p.astype(np.float64))
        want = float((cal.p * (logp - logq)).sum(-1).mean())
        assert cal.head_kl(s, rows) == pytest.approx(want, rel=1e-3)


def test_profile_command_dispatches_on_llama_stores(profiled, capsys):
    from sti.cli import main

    store, _ = profiled
    assert main(["profile", str(store), "--storage", "50MBps", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["storage"] == "50MBps" and out["profile"].endswith("profile-decoder-50MBps.json")
    emulated = load_decoder_profile(store, "50MBps")["device"]["io"]["layer"]
    for v in emulated.values():  # at least bytes / bandwidth per read, as the runtime's throttle paces it
        assert v["io_s"] >= v["bytes"] / 50e6


@pytest.mark.parametrize("bits", [33, 4])
def test_products_are_timed_as_the_runtime_multiplies_them(profiled, monkeypatch, bits):
    """The profile times each layer's matrices as decode runs them -- for the GGML source version
    one tiled matrix per layer matrix, not one product per shard; for sti-q1 shard by shard --
    and splits a layer's time between its shards by their bytes. Time is a fake clock here."""
    from sti import profile_decoder
    from sti.decoder_runtime import DecoderSchedule, StreamingDecoder, scratch_elements

    store, _ = profiled
    with Store.open(store) as st:
        items = profile_decoder._pass_items(st)
        timed = profile_decoder._PassOps(st, items, bits, None, np.empty(scratch_elements(st), np.float32))
        every = DecoderSchedule.uniform(st, bits)
        every.preload = {(layer, s) for layer, s, _ in every.items()}
        eng = StreamingDecoder(st, every)
        x = np.random.default_rng(0).standard_normal((1, CFG.hidden_size)).astype(np.float32)
        for layer in range(st.num_layers):
            shards, ops = timed.units[layer]
            assert shards == [(layer, s) for s in st.shard_indices(layer)]
            decode = eng._layer_weights(layer, [eng._shard_ops(*it, None) for it in shards], whole=True)
            runtime = [w for name, w in decode.items() if name not in eng.common[layer]]
            assert [type(op) for op in ops] == [type(w) for w in runtime]
            for op, w in zip(ops, runtime):
                assert op.shape == w.shape
                xi = np.resize(x, (1, op.shape[1]))  # (1, the matrix's columns)
                np.testing.assert_array_equal(op.apply(xi), w.apply(xi))
            if bits == 33 and lowbit.has_c_kernels():  # Q4_1 blocks: each layer matrix one C matrix over every shard
                assert all(isinstance(op, BySize) and isinstance(op.small.t, lowbit.TiledTensor) for op in ops)
                assert {(op.small.t.kind, op.shape, None) for op in ops} <= set(profile_decoder._kernel_shapes(st))
            else:
                assert not any(isinstance(op, BySize) for op in ops)
        assert [shards for shards, _ in timed.units[st.num_layers:]] == [[(HEAD, s)] for s in st.shard_indices(HEAD)]

        tick = itertools.count()  # every unit takes exactly 1 s: its start and end are consecutive ticks
        monkeypatch.setattr(profile_decoder, "time", types.SimpleNamespace(perf_counter=lambda: float(next(tick))))
        seconds = timed.time_pass(1)
        assert sorted(seconds) == sorted(items)
        for shards, _ in timed.units:
            assert sum(seconds[it] for it in shards) == pytest.approx(1.0)
            for it in shards:
                assert seconds[it] == pytest.approx(st.shard_nbytes(*it, bits) / sum(st.shard_nbytes(*s, bits)
                                                                                       for s in shards))


# ------------------------------------------------------------------ the chooser on synthetic tables


def synthetic(n=12, seed=0, contention=0.0) -> VersionCosts:
    """n shards x versions [lossless, 4, 3, 2]: lower versions stream and compute faster and
    matter more (by a random per-shard sensitivity)."""
    rng = np.random.default_rng(seed)
    sens = rng.uniform(0.1, 10, n)[:, None]
    kl = sens * np.array([0.0, 0.01, 0.05, 0.3])
    io = rng.uniform(0.8, 1.2, n)[:, None] * np.array([1.0, 0.8, 0.6, 0.4]) * 1e-3
    comp = rng.uniform(0.8, 1.2, n)[:, None] * np.array([0.5, 0.45, 0.42, 0.4]) * 1e-3
    return VersionCosts([(i // 3, i % 3) for i in range(n)], [33, 4, 3, 2], kl, io, comp, 2e-4, contention)


def predicted(c: VersionCosts, idx, pre) -> float:
    rows = np.arange(len(idx))
    io, comp = np.sum(c.io_s[rows, idx] * ~pre), np.sum(c.compute_s[rows, idx])
    return max(io, comp) + c.contention * min(io, comp) + c.overhead_s


def nothing_preloaded(idx):
    """A memory model where every version fits and no shard is preloaded."""
    return np.zeros(len(idx), bool)


@pytest.mark.parametrize("contention", [0.0, 0.5, 1.0])
def test_chooser_meets_every_feasible_target(contention):
    c = synthetic(contention=contention)
    start = np.zeros(12, np.int64)
    slowest = predicted(c, start, nothing_preloaded(start))
    fastest = fastest_step(c, nothing_preloaded, start)
    assert fastest == pytest.approx(predicted(c, np.full(12, 3), nothing_preloaded(start)))
    kls = []
    for target in np.linspace(fastest, slowest, 9):
        got = greedy_versions(c, target, nothing_preloaded, start)
        assert isinstance(got, Choice)
        assert got.predicted_s <= target + 1e-15
        assert got.predicted_s == pytest.approx(predicted(c, got.index, nothing_preloaded(got.index)))
        kls.append(got.kl)
    assert kls[-1] == 0  # the lossless model meets the loosest target
    assert kls == sorted(kls, reverse=True)  # looser targets cost less importance


def test_chooser_lowers_the_least_important_shards_first():
    c = synthetic()
    start = np.zeros(12, np.int64)
    slowest = predicted(c, start, nothing_preloaded(start))
    got = greedy_versions(c, slowest * 0.9, nothing_preloaded, start)
    lowered = got.index > 0
    sens = c.kl[:, 3]
    assert lowered.any() and sens[lowered].max() <= np.median(sens)


def test_chooser_refuses_an_infeasible_target_naming_the_fastest_step():
    c = synthetic()
    start = np.zeros(12, np.int64)
    fastest = fastest_step(c, nothing_preloaded, start)
    with pytest.raises(STIError) as e:
        greedy_versions(c, fastest * 0.99, nothing_preloaded, start)
    assert f"{fastest * 1e3:.1f} ms" in e.value.problem and f"{fastest * 1e3:.1f} ms" in e.value.fix


def test_chooser_counts_only_streamed_shards_as_io():
    """With the first half preloaded and IO the bottleneck, only streamed shards are lowered."""
    c = synthetic()
    c = VersionCosts(c.items, c.bits, c.kl, c.io_s * 3, c.compute_s, c.overhead_s, c.contention)
    def half(idx):
        return np.arange(len(idx)) < 6

    start = np.zeros(12, np.int64)
    target = predicted(c, start, half(start)) * 0.8
    got = greedy_versions(c, target, half, start)
    assert got.predicted_s <= target
    assert not got.index[:6].any() and got.index[6:].any()


def test_chooser_skips_versions_that_do_not_fit_the_memory():
    c = synthetic()
    start = np.zeros(12, np.int64)
    def no_2bit(idx):  # 2-bit versions do not fit the memory
        return None if (idx == 3).any() else np.zeros(len(idx), bool)

    fastest = fastest_step(c, no_2bit, start)
    got = greedy_versions(c, fastest, no_2bit, start)
    assert not (got.index == 3).any()
    with pytest.raises(STIError, match="fastest decode step"):
        greedy_versions(c, fastest * 0.99, no_2bit, start)


# ------------------------------------------------------------------ end to end


@pytest.fixture
def synthetic_device(profiled, tmp_path):
    """A copy of the profiled store whose device tables say that a shard streams and computes in
    time proportional to its bits (the tiny store's versions all pad to the same 4 KB, so its
    real timings cannot show what lowering buys): the wiring is under test, not this machine."""
    store, _ = profiled
    copy = tmp_path / "synthetic.sti"
    shutil.copytree(store, copy)
    path = profile_path(copy)
    doc = json.loads(path.read_text())
    dev = doc["device"]
    for kind in ("layer", "head"):
        for b in dev["io"][kind]:
            dev["io"][kind][b]["io_s"] = 1e-3 * min(int(b), 16) / 16
            dev["compute"][kind][b] = {"1": 2e-4 * min(int(b), 16) / 16, "16": 1e-3 * min(int(b), 16) / 16}
    dev["overhead"] = {"1": 1e-4, "16": 3e-4}
    path.write_text(json.dumps(doc))
    return copy


def test_a_token_latency_target_runs_end_to_end(synthetic_device):
    from sti.plan_decoder import plan_decoder_shape

    store = synthetic_device
    with Store.open(store) as st:
        shape = decoder_shape(st)
        # a budget that streams every shard at its lossless version (no room to preload one)
        budget = plan_decoder_shape(shape, 0, preload=False).weight_bytes + shape.max_position * shape.token_bytes
        lossless, _ = choose(st, shape, 1e9, budget)
        assert lossless.kl == 0 and lossless.steps == 0 and lossless.io_s > lossless.compute_s
        target = lossless.predicted_s / 2
        chosen, _ = choose(st, shape, target, budget)
    assert chosen.predicted_s <= target and chosen.kl > 0
    gen = Generator.from_store(store, memory=budget, token_latency=target)
    try:
        bits = [b for layer in gen.plan.layers for b in layer.values()] + list(gen.plan.head.values())
        assert min(bits) < 33 and max(bits) == 33  # the least important shards were lowered, not all
        assert len(list(gen.stream(PROMPT, max_tokens=5))) == 5
        assert gen.engine.res.peak <= budget
    finally:
        gen.close()
    with pytest.raises(STIError, match=r"fastest decode step the profile predicts is [\d.]+ ms"):
        Generator.from_store(store, memory=budget, token_latency=lossless.predicted_s / 100)


def test_a_target_without_a_profile_names_the_command(profiled, tmp_path):
    store, _ = profiled
    bare = tmp_path / "bare.sti"
    shutil.copytree(store, bare, ignore=shutil.ignore_patterns("profile*", "kernels.json"))
    with pytest.raises(STIError) as e:
        Generator.from_store(bare, memory=2_000_000, token_latency="5ms")
    assert re.search(r"sti profile \S*bare\.sti", e.value.fix)
