"""Profiling on a tiny packed BERT: importance, device fit, storage specs, saved profiles."""

import json

import numpy as np
import pytest

from sti import profile as prof
from sti.errors import STIError
from sti.models import bert
from sti.plan import DeviceProfile, Importance, ModelShape
from sti.runtime import Schedule, StreamingEncoder, Throttle
from sti.store import Store
from tiny_models import CFG


def calib(n=6, T=12, seed=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, CFG.vocab_size, (n, T))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # one padded text
    mask[4, 10:] = 0
    W = rng.standard_normal((4, CFG.hidden_size)).astype(np.float32) * 8
    b = rng.standard_normal(4).astype(np.float32)
    labels = rng.integers(0, 4, n)
    return ids, mask, W, b, labels


def kl_direct(st, layers, ids, mask, W, b):
    """KL(full || config) by the reference path: assembled layers through bert.encode."""
    g = st.globals()

    def logp(cfg_layers):
        h = bert.encode(st.config, g, [st.assemble_layer(i, s) for i, s in enumerate(cfg_layers)], ids, mask)
        z = (bert.mean_pool(h, mask) @ W.T + b).astype(np.float64)
        z -= z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    full = [{s: 32 for s in st.shard_indices(i)} for i in range(st.num_layers)]
    lp, lq = logp(full), logp(layers)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def importance(tiny_bert):
    _, _, path = tiny_bert
    ids, mask, W, b, labels = calib()
    with Store.open(path) as st:
        imp, info = prof.shard_importance(st, ids, mask, W, b, labels=labels, batch=4, additivity_checks=4)
    return imp, info


def test_fast_layer_equals_bert_layer(tiny_bert):
    _, _, path = tiny_bert
    ids, mask, *_ = calib()
    with Store.open(path) as st:
        g = st.globals()
        x = bert.embed(st.config, g, ids)
        bias = bert.attention_bias(mask)
        for shards in ({0: 32, 1: 4, 2: 32, 3: 2}, {1: 8, 3: 32}, {}):
            ref = bert.layer(st.config, x, bias, st.assemble_layer(0, shards))
            P = prof._prep_layer(st.layer_common(0), [st.read_shard(0, s, bb) for s, bb in sorted(shards.items())])
            got = prof._layer(st.config, x.reshape(-1, CFG.hidden_size), *ids.shape, bias, P).reshape(ref.shape)
            assert np.abs(got - ref).max() < 1e-4


def test_importance_shape_fp32_and_order(importance, tiny_bert):
    imp, info = importance
    _, _, path = tiny_bert
    with Store.open(path) as st:
        shape = prof.model_shape(st)
    imp.check(shape)  # every shard, dropped and every stored bitwidth
    assert len(imp.loss) == CFG.num_layers and all(len(r) == CFG.num_heads for r in imp.loss)
    arr = np.array(info["kl_raw"])  # (L, S, V) measured, versions 0, 2, 3, ...
    assert info["versions"][0] == 0 and arr.shape == (CFG.num_layers, CFG.num_heads, len(info["versions"]))
    assert (arr >= 0).all()
    for row in imp.loss:
        for d in row:
            assert d[32] == 0.0
            vals = [d[b] for b in sorted(d)]
            assert all(x >= y for x, y in zip(vals, vals[1:]))  # non-increasing in bits
    mean = arr.mean((0, 1))
    j2, j8 = info["versions"].index(2), info["versions"].index(8)
    assert mean[0] >= mean[j2] >= mean[j8] > 0  # dropped >= 2-bit >= 8-bit on average
    assert 0 <= info["full_accuracy"] <= 1
    assert set(info["split_half"]) >= {"dropped", "8-bit"}


def test_single_shard_kl_matches_the_reference_path(importance, tiny_bert):
    imp, info = importance
    _, _, path = tiny_bert
    ids, mask, W, b, _ = calib()
    arr = np.array(info["kl_raw"])
    with Store.open(path) as st:
        for layer, s, bits in [(0, 1, 0), (1, 2, 3), (0, 3, 8), (1, 0, 0)]:
            cfg_layers = [{i: 32 for i in st.shard_indices(k)} for k in range(st.num_layers)]
            if bits:
                cfg_layers[layer][s] = bits
            else:
                del cfg_layers[layer][s]
            ref = kl_direct(st, cfg_layers, ids, mask, W, b)
            got = arr[layer, s, info["versions"].index(bits)]
            assert got == pytest.approx(ref, rel=2e-3, abs=1e-8), (layer, s, bits)


def test_additivity_check_reports_actual_kl(importance, tiny_bert):
    _, info = importance
    add = info["additivity"]
    assert len(add["configs"]) == 4
    _, _, path = tiny_bert
    ids, mask, W, b, _ = calib()
    c = add["configs"][0]  # "uniform": every shard at the lowest bitwidth
    assert c["kind"] == "uniform" and c["actual_kl"] > 0 and c["predicted_kl"] > 0
    with Store.open(path) as st:
        lo = min(x for x in info["versions"] if x)
        ref = kl_direct(st, [{i: lo for i in st.shard_indices(k)} for k in range(st.num_layers)], ids, mask, W, b)
    assert c["actual_kl"] == pytest.approx(ref, rel=2e-3)


def test_device_profile_fit(tiny_bert):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        dev, meta = prof._profile_device(st, seq_lens=(4, 8, 16), repeats=2, speed_window=2.0)
    assert isinstance(dev, DeviceProfile)
    assert dev.io_bandwidth > 0 and dev.io_latency >= 0
    assert "cold (posix_fadvise DONTNEED)" in dev.label
    assert min(dev.c0, dev.c1, dev.c2) >= 0
    # the isolated layer measurements grow from the narrowest, shortest layer to the widest, longest
    # (16 x the shard-tokens), and their fit never falls with width or length (between neighbours,
    # a tiny model's sub-millisecond layers differ by less than a noisy machine's spread: a strict
    # w=1 -> 4 at 16 tokens failed about once in 30 runs; the runtime calibration may then move c1
    # down, to 0 at most, where the real engine ran faster than that fit)
    med = meta["compute"]["median_ms"]
    assert med["w4_n16"] > med["w1_n4"]
    fit = DeviceProfile(io_bandwidth=1.0, c0=meta["compute"]["c0"], c1=meta["compute"]["c1"], c2=meta["compute"]["c2"])
    assert fit.compute_time(4, 16) >= fit.compute_time(1, 16) and fit.compute_time(2, 16) >= fit.compute_time(2, 4)
    assert fit.compute_time(4, 16) > fit.compute_time(1, 4) or med["w4_n16"] < 1.2 * med["w1_n4"]
    assert set(dev.dequant_per_byte) == set(Store.open(path).bits) and all(v > 0 for v in dev.dequant_per_byte.values())
    assert meta["compute"]["fit"]["max_rel_error"] >= 0 and len(meta["io_measured"]["by_sequence"]) >= 4
    calib = meta["runtime_calibration"]  # the real runtime, streaming every shard: its tail
    val = meta["validation"]  # and plan-like configurations' latency over their predictions
    assert val["plans"] and all(q["predicted_ms"] > 0 and q["median_ms"] > 0 for q in val["plans"])
    # the deadline margin per measured length: the 95th percentile of the model's error there
    # times the spreads of the validation's and the calibration's requests, pooled
    # (the streamed plans'; the compute-only plans' give the compute margin, below)
    assert set(dev.tail_by_tokens) == set(val["tail_by_tokens"]) == {4, 8, 16}
    streamed = [q for q in val["plans"] if q["plan"] != prof.COMPUTE_PLAN]
    assert val["rounds"] == 3 and val["spread_samples"] == len(calib["spread"]) + val["repeats"] * len(streamed)
    spread = np.array(calib["spread"] + val["spread"])
    for n, v in dev.tail_by_tokens.items():
        assert v == val["tail_by_tokens"][n] >= 1.0 and dev.margin(n) == v
        errors = [1 + q["error"] for q in streamed if q["seq_len"] == n]
        want = np.percentile(np.concatenate([e * spread for e in errors]), 95)
        assert v == pytest.approx(max(1.0, want), rel=1e-3)
    # the compute margin: the compute-only plans' mean error, over the length and its neighbours,
    # x the compute's spread (the preloaded engines' requests), over the deadline margin, at least 1
    computing = np.array(calib["compute_spread"] + val["compute_spread"])
    assert calib["compute_spread"] and all(x > 0 for x in calib["compute_spread"])
    assert val["compute_spread_samples"] == len(computing)
    assert set(dev.compute_margin_by_tokens) == set(val["compute_margin_by_tokens"]) == {4, 8, 16}
    near = {4: (4, 8), 8: (4, 8, 16), 16: (8, 16)}
    for n, g in dev.compute_margin_by_tokens.items():
        qs = [q for q in val["plans"] if q["seq_len"] == n and q["plan"] == prof.COMPUTE_PLAN]
        assert len(qs) == 2
        error = np.mean([q["error"] for q in val["plans"] if q["seq_len"] in near[n] and q["plan"] == prof.COMPUTE_PLAN])
        want = max(1.0, np.percentile((1 + error) * computing, 95)) / dev.tail_by_tokens[n]
        assert g == dev.compute_margin(n) == pytest.approx(max(1.0, want), rel=2e-3)
    assert dev.tail_ratio == max(dev.tail_by_tokens.values())
    assert dev.margin(12) == max(dev.tail_by_tokens[8], dev.tail_by_tokens[16])
    assert dev.margin(2) == dev.tail_by_tokens[4] and dev.margin(99) == dev.tail_by_tokens[16]
    assert all(r["streamed_p95_ms"] >= r["streamed_median_ms"] > 0 for r in calib["rows"])
    from sti import lowbit

    if lowbit.has_int8_kernel():  # the engine with int8 products was timed beside the one without, and alone
        assert all(r["int8_ms"] > 0 and r["int8_alternating_ms"] > 0 and r["int8_dequant_ms"] > 0
                   and 0 < r["int8_alternating_best_ms"] <= r["int8_alternating_ms"]
                   and 0 < r["int8_dequant_best_ms"] <= r["int8_dequant_ms"]
                   for r in calib["rows"])
        assert all(r["streamed_int8_median_ms"] > 0 for r in calib["rows"])
    # the machine's speed: a probe request in bursts after every length of every calibration round,
    # then until the window's end; compute times moved by the median of all over the calibration's
    sw = meta["speed_window"]
    tags = [b["tag"] for b in sw["bursts"]]
    # rounds x lengths of the calibration, then of the validation, then the window's
    assert tags[:18] == ["calibration"] * 9 + ["validation"] * 9 and set(tags[18:]) <= {"window"}
    assert sw["tokens"] == 16  # the calibration length nearest 32
    ats = [b["at_s"] for b in sw["bursts"]]  # (a tiny model's calibration may outlast a 2-s window)
    assert ats[0] == 0 and ats == sorted(ats) and sw["span_s"] == ats[-1] and sw["ended_s"] >= 2.0
    assert all(at < 2.0 for at, tag in zip(ats, tags) if tag == "window")
    assert sw["factor"] == pytest.approx(sw["median_ms"] / sw["calibration_median_ms"], rel=1e-3)
    assert f"compute times x{sw['factor']:.3f}" in dev.label
    # the validation's errors: against each plan's prediction at the machine's speed while it ran
    assert val["speed"] > 0
    for q in val["plans"]:
        assert q["error"] == pytest.approx(q["median_ms"] / q["predicted_at_speed_ms"] - 1, abs=0.01 + 2e-3 / q["median_ms"])
        if q["plan"] == prof.COMPUTE_PLAN:  # nothing read: every time of it moved with the machine
            assert q["predicted_at_speed_ms"] == pytest.approx(q["predicted_ms"] * val["speed"], abs=2e-3)
    f = sw["factor"]  # the calibration's int8 costs, at the window's speed
    assert dev.int8_max_tokens == calib["int8_max_tokens"]
    assert dev.int8_per_token == pytest.approx(calib["int8_per_token"] * f, rel=1e-12)
    assert dev.int8_shard == pytest.approx({int(b): v * f for b, v in calib["int8_shard"].items()}, rel=1e-12)
    if dev.int8_max_tokens:  # every quantized bitwidth's own constant and per-token cost, timed against 4 bits
        quantized = {b for b in Store.open(path).bits if b != 32}
        assert set(dev.int8_shard) == set(dev.int8_per_token_bits) == quantized and dev.int8_per_token_bits[4] == 0
        by_bits = calib["int8_bits_minus_4bit_s"]  # at every calibration length int8 products run at
        lens = {n for n in (4, 8, 16) if n <= dev.int8_max_tokens}
        assert set(by_bits) == quantized - {4} and all(set(d) == lens for d in by_bits.values())
        for b, d in by_bits.items():  # the weighted line through them: per request, L x S shards
            assert all(v["se_s"] >= 0 for v in d.values())
            ns = sorted(d)
            if len(ns) > 1:
                w = 1 / np.maximum([d[n]["se_s"] for n in ns], 1e-6)
                slope, a = np.polyfit(ns, [d[n]["diff_s"] for n in ns], 1, w=w)
            else:
                slope, a = 0.0, d[ns[0]]["diff_s"]
            shards = CFG.num_layers * CFG.num_heads
            assert (dev.int8_shard[b] - dev.int8_shard[4]) * shards / f == pytest.approx(a, abs=1e-9)
            assert dev.int8_per_token_bits[b] * shards / f == pytest.approx(slope, abs=1e-12)


def test_emulated_storage_profile(tiny_bert):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        dev, meta = prof._profile_device(st, storage="emmc", seq_lens=(8, 16), repeats=1, speed_window=0)
    # the emulated device's numbers, times the slowdown the runtime measured on its reads
    k = meta["runtime_calibration"]["io_slowdown"]
    assert k >= 1.0 and dev.io_bandwidth == pytest.approx(200e6 / k) and dev.io_latency == pytest.approx(0.5e-3 * k)
    # beside it, the compute per streamed byte, fitted with it; each length's median as the model prices it
    assert dev.stream_compute_per_byte >= 0 and dev.stream_compute_per_byte_int8 >= 0
    assert all(r.get("streamed_predicted_ms", r.get("streamed_predicted_ms_int8", 0)) > 0
               for r in meta["runtime_calibration"]["rows"])
    assert dev.label.startswith("emulated eMMC") and meta["storage"] == "emmc"


def test_warm_storage_profile_reads_from_the_page_cache(tiny_bert):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        dev, meta = prof._profile_device(st, storage="warm", seq_lens=(8, 16), repeats=1, speed_window=0)
    assert dev.label.startswith("warm (page cache) reads") and meta["storage"] == "warm"
    assert "page cache" in meta["io_measured"]["pattern"]


def test_parse_storage():
    assert prof.parse_storage(None) is None and prof.parse_storage("real") is None
    t = prof.parse_storage("ufs")
    assert isinstance(t, Throttle) and t.bandwidth == 1e9 and t.latency == pytest.approx(1e-4)
    t = prof.parse_storage("50MBps")
    assert t.bandwidth == 50e6 and t.latency == 0 and "emulated" in t.label
    t = prof.parse_storage("12.5mb/s:2ms")
    assert t.bandwidth == 12.5e6 and t.latency == pytest.approx(2e-3)
    assert prof.storage_key("EMMC") == "emmc" and prof.storage_key("50MBps") == "50MBps"
    assert prof.storage_key("page-cache") == prof.storage_key("Warm") == "warm" and prof.parse_storage("warm") is None
    assert prof.profile_path("S", "warm").name == "profile-warm.json"
    for bad in ("floppy", "50", "0MBps", "50Mbit", "-3MBps"):
        with pytest.raises(STIError) as e:
            prof.parse_storage(bad)
        assert "emmc" in str(e.value) and "MBps" in str(e.value)


def test_model_shape_matches_runtime_accounting(tiny_bert):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        shape = prof.model_shape(st, chunk_shards=3)
        enc = StreamingEncoder(st, Schedule.full(st, 4, chunk_shards=3))
        assert isinstance(shape, ModelShape)
        assert shape.num_layers == CFG.num_layers and shape.shards_per_layer == CFG.num_heads
        assert shape.fixed_bytes == enc.fixed_bytes and shape.scratch_bytes == enc.scratch_bytes
        assert shape.shard_bytes == {b: st.shard_nbytes(0, 0, b) for b in st.bits}
        # for inputs of n tokens: the engine built for them, plus their word-embedding rows
        for n, int8 in ((10, 0), (10, 10), (CFG.max_position, 0)):
            got = prof.model_shape(st, 3, input_tokens=n, int8_max_tokens=int8)
            eng = StreamingEncoder(st, Schedule([{}] * CFG.num_layers, chunk_shards=3, int8_max_tokens=int8),
                                   max_tokens=n)
            assert got.fixed_bytes == eng.fixed_bytes + n * CFG.hidden_size * 4, n
            assert got.scratch_bytes == eng.scratch_bytes, (n, int8)
        assert prof.model_shape(st, 3, input_tokens=10).fixed_bytes < enc.fixed_bytes + 10 * CFG.hidden_size * 4


def test_save_load_round_trip(tiny_bert, tmp_path):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        shape = prof.model_shape(st)
    imp = Importance.synthetic(shape, seed=1)
    dev = DeviceProfile(io_bandwidth=3e8, io_latency=1e-4, c0=1e-5, c1=2e-7, c2=1e-9,
                        dequant_per_byte={b: 1e-9 for b in shape.bits}, label="test")
    p = prof.save_profile(path, imp, dev, {"task": "synthetic", "numbers": np.float32(1.5)})
    assert p.name == "profile.json" and not list(p.parent.glob(".profile*tmp*"))
    imp2, dev2, meta = prof.load_profile(path)
    assert imp2.loss == imp.loss and dev2 == dev
    assert meta["meta"]["task"] == "synthetic" and meta["sti_version"] and meta["created"]
    p2 = prof.save_profile(path, imp, dev, {}, storage="ufs")
    assert p2.name == "profile-ufs.json"
    assert prof.load_profile(path, "ufs")[1] == dev
    with pytest.raises(STIError, match="run sti profile"):
        prof.load_profile(path, "emmc")
    with pytest.raises(STIError, match="run sti profile"):
        prof.load_profile(tmp_path)  # no profile there
    doc = json.loads(p.read_text())
    doc["store_fingerprint"] = "0" * 16
    p.write_text(json.dumps(doc))
    with pytest.raises(STIError, match="stale"):
        prof.load_profile(path)
    p.unlink()
    p2.unlink()


def test_bbc_task_refuses_a_store_of_another_model(tiny_bert):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        with pytest.raises(STIError, match="hidden size"):
            prof.calibration_set(st, "bbc-news", 4, 8)
        with pytest.raises(STIError, match="unknown task"):
            prof.calibration_set(st, "imdb", 4, 8)


def test_int8_stops_at_the_first_length_it_loses_and_its_cost_is_fitted_on_its_own_times():
    rows = [{"seq_len": n, "int8_dequant_ms": a, "int8_alternating_ms": b} for n, a, b in
            ((16, 10.0, 7.0), (32, 20.0, 17.0), (64, 40.0, 41.0), (128, 80.0, 70.0))]
    assert prof._int8_max(rows) == 32  # 128 is faster again, but 64 is not
    assert prof._int8_max(rows[2:]) == 0 and prof._int8_max([{"seq_len": 16, "measured_ms": 1.0}]) == 0
    # the best times of the alternating rounds decide where a row has them: a burst that slowed
    # the int8 requests' median at 64 tokens does not end their reach there
    burst = [dict(r, int8_alternating_best_ms=r["int8_alternating_ms"] * 0.9, int8_dequant_best_ms=r["int8_dequant_ms"])
             for r in rows]
    assert prof._int8_max(burst) == 128
    # 2 layers x 5 shards, 1 ms per layer: per shard (int8_ms / 1e3 - 2 c0) / 10 = const + per_token n
    rows = [{"seq_len": n, "int8_ms": (2 * 1e-3 + 10 * (50e-6 + 2e-6 * n)) * 1e3} for n in (16, 32, 64)]
    const, per_token = prof._int8_cost(rows, layers=2, width=5, c0=1e-3, c2=0.0)
    assert (const, per_token) == (pytest.approx(50e-6), pytest.approx(2e-6))
    # the time before the first layer (the embedding rows) is not the products'
    filled = [{**r, "int8_ms": r["int8_ms"] + 0.4 + 0.01 * r["seq_len"], "fill_ms": 0.4 + 0.01 * r["seq_len"]} for r in rows]
    assert prof._int8_cost(filled, 2, 5, 1e-3, 0.0) == (pytest.approx(50e-6), pytest.approx(2e-6))
    # attention's c2 n^2 is not the products' cost; a single length gives a constant only
    rows_c2 = [{**r, "int8_ms": r["int8_ms"] + 10 * 1e-8 * r["seq_len"] ** 2 * 1e3} for r in rows]
    assert prof._int8_cost(rows_c2, 2, 5, 1e-3, 1e-8) == (pytest.approx(50e-6), pytest.approx(2e-6))
    assert prof._int8_cost(rows[:1], 2, 5, 1e-3, 0.0) == (pytest.approx(50e-6 + 32e-6), 0.0)
    # never negative: a constant below 0 is refitted through the origin
    neg = [{"seq_len": n, "int8_ms": (2e-3 + 10 * (-20e-6 + 2e-6 * n)) * 1e3} for n in (16, 32)]
    const, per_token = prof._int8_cost(neg, 2, 5, 1e-3, 0.0)
    assert const == 0.0 and per_token > 0


def test_the_time_before_the_first_layer_is_a_non_negative_line_in_the_length():
    line = [(n, 0.3e-3 + 2e-6 * n) for n in (16, 32, 64, 128)]
    assert prof._line_at_least_0(line) == (pytest.approx(0.3e-3), pytest.approx(2e-6))
    # a negative constant: through the origin; a falling line: flat at the mean; one length: flat
    assert prof._line_at_least_0([(16, 0.1e-3), (128, 1.6e-3)])[0] == 0.0
    assert prof._line_at_least_0([(16, 0.5e-3), (128, 0.3e-3)]) == (pytest.approx(0.4e-3), 0.0)
    assert prof._line_at_least_0([(32, 0.4e-3)]) == (pytest.approx(0.4e-3), 0.0)


def test_at_speed_moves_every_compute_time_and_page_cache_reads_only(tiny_bert):
    from sti.plan import simulate

    with Store.open(tiny_bert[2]) as st:
        shape = prof.model_shape(st, int8_max_tokens=8)
    bits = {b for b in shape.bits if b != 32}
    dev = DeviceProfile(io_bandwidth=50e6, io_latency=2e-4, c0=1e-4, c1=2e-6, c2=3e-9,
                        dequant_per_byte={b: 1e-9 * b for b in shape.bits}, int8_max_tokens=8, int8_per_token=1e-7,
                        int8_shard={b: 5e-6 + 1e-7 * b for b in bits}, int8_per_token_bits={b: 1e-9 * b for b in bits},
                        stream_compute_per_byte=2e-10, stream_compute_per_byte_int8=1e-10, embed_fixed=3e-5,
                        embed_per_token=1e-6, tail_by_tokens={8: 1.2}, compute_margin_by_tokens={8: 1.1})
    L, S = shape.num_layers, shape.shards_per_layer
    mixed = [[(4, 8, 32, 0)[(layer + s) % 4] for s in range(S)] for layer in range(L)]
    every = {(layer, s) for layer in range(L) for s in range(S) if mixed[layer][s]}
    f = 1.37
    for warm in (True, False):
        fast = prof._at_speed(dev, f, warm)
        assert (fast.tail_by_tokens, fast.compute_margin_by_tokens) == (dev.tail_by_tokens, dev.compute_margin_by_tokens)
        for n in (4, 16):  # with int8 products and without; everything preloaded: compute alone
            assert simulate(mixed, shape, fast, n, preload=every).latency == \
                pytest.approx(f * simulate(mixed, shape, dev, n, preload=every).latency, rel=1e-9)
            streamed = simulate(mixed, shape, fast, n).latency / simulate(mixed, shape, dev, n).latency
            if warm:  # reads from the page cache are the CPU's work too
                assert streamed == pytest.approx(f, rel=1e-9)
            else:  # a device's reads take their time whatever the CPU's speed
                assert (fast.io_bandwidth, fast.io_latency) == (dev.io_bandwidth, dev.io_latency) and 1 < streamed < f


def test_the_speed_probe_runs_bursts_until_the_window_ends(tiny_bert):
    with Store.open(tiny_bert[2]) as st:
        probe = prof._SpeedProbe(st, 4, 4, (8, 16, 64), np.random.default_rng(0), per_burst=3, gap_s=0.01)
        probe.burst()
        probe.burst()
        probe.fill(0.3)
    assert probe.tokens == 16 and probe.ids.shape == (1, 16)
    tags = [tag for _, tag, _ in probe.bursts]
    assert tags[:2] == ["calibration"] * 2 and len(tags) > 2 and set(tags[2:]) == {"window"}
    assert all(len(ts) == 3 and min(ts) > 0 for _, _, ts in probe.bursts)
    assert probe.bursts[-1][0] < 0.3 <= probe.ended_s
    assert probe.factor()[1]["factor"] > 0


def test_a_negative_speed_window_is_refused_before_any_work(tiny_bert):
    with pytest.raises(STIError) as e:
        prof.run_profile(tiny_bert[2], speed_window=-1, progress=False)
    assert "speed window" in str(e.value) and "--speed-window 60" in str(e.value)


def test_the_speed_factor_is_the_whole_windows_median_over_the_calibrations():
    probe = prof._SpeedProbe.__new__(prof._SpeedProbe)
    probe.tokens, probe.per_burst, probe.gap_s, probe.ended_s = 32, 3, 0.25, 31.0
    probe.bursts = [(0.0, "calibration", [4e-3, 5e-3, 6e-3]), (1.0, "calibration", [5e-3, 5e-3, 5e-3]),
                    (2.0, "window", [7e-3, 8e-3, 9e-3]), (30.0, "window", [6e-3, 6e-3, 7e-3])]
    f, info = probe.factor()
    assert f == pytest.approx(6e-3 / 5e-3) and info["factor"] == f and info["span_s"] == 30.0
    assert (info["calibration_median_ms"], info["median_ms"]) == (5.0, 6.0)
    assert [b["median_ms"] for b in info["bursts"]] == [5.0, 5.0, 8.0, 6.0]
    probe.bursts = probe.bursts[:2]  # no window: the calibration's own speed
    assert probe.factor()[0] == 1.0


def test_a_bitwidths_line_leans_on_its_precise_lengths():
    # 0.8 ms + 2 us per token, measured to +-20 us at three lengths and far off, +-1 ms, at 128
    by_n = {n: {"diff_s": 0.8e-3 + 2e-6 * n, "se_s": 20e-6} for n in (16, 32, 64)}
    by_n[128] = {"diff_s": 3e-3, "se_s": 1e-3}
    a, slope = prof._bits_line(by_n)
    assert a == pytest.approx(0.8e-3, rel=0.02) and slope == pytest.approx(2e-6, rel=0.05)
    ends = (by_n[128]["diff_s"] - by_n[16]["diff_s"]) / 112  # the line through the two ends
    assert ends > 8 * slope
    # equal errors (or none measured: one repeat per length) weigh the lengths alike
    flat = {n: {"diff_s": v["diff_s"], "se_s": 0.0} for n, v in by_n.items()}
    ns = sorted(flat)
    assert prof._bits_line(flat) == pytest.approx(tuple(np.polyfit(ns, [flat[n]["diff_s"] for n in ns], 1)[::-1]))
    assert prof._bits_line({32: {"diff_s": 1e-3, "se_s": 0.0}}) == (1e-3, 0.0) and prof._bits_line({}) == (0.0, 0.0)


def test_the_terminal_summary_states_the_device_model_and_the_importance():
    """``sti profile`` without --json prints format_summary: the numbers the planner uses, in
    words (it printed the first 4000 characters of the JSON before)."""
    device = {"label": "warm (page cache) reads", "io_bandwidth_MBps": 7794.0, "io_latency_ms": 0.0,
              "io_fit": {"median_rel_error": 0.16}, "c0_ms": 0.138, "c1_us": 2.91, "c2_ns": 0.0,
              "layer_ms_full_width_128": 4.61, "compute_fit": {"median_rel_error": 0.13},
              "dequant_ns_per_byte": {"2": 2.9, "32": 0.31}, "int8_max_tokens": 64,
              "int8_shard_us": {"2": 22.6, "8": 52.5}, "int8_per_token_us": 2.6, "tail_ratio": 1.16,
              "stream_compute_ns_per_byte": 0.23, "stream_compute_ns_per_byte_int8": 0.07, "io_slowdown": 1.0,
              "embed_us_per_token": 4.7, "validation": {"plans": 12, "error_range": [-0.04, 0.07],
                                                        "median_abs_error": 0.03, "spread_p95": 1.08,
                                                        "spread_samples": 180, "speed": 0.9},
              "speed_window": {"tokens": 32, "median_ms": 5.68, "span_s": 59.8, "calibration_median_ms": 4.81,
                               "factor": 1.181}}
    summary = {"profile": "STORE/profile-warm.json", "task": "bbc-news", "storage": "warm",
               "seconds": {"total": 13.0, "importance": 0.0, "device": 13.0},
               "calibration": {"head": "bbc-news", "n_texts": 48, "seq_len": 64}, "full_accuracy": 0.9375,
               "importance": {"mean_kl_by_bits": {"dropped": 0.0068, "2-bit": 0.0019},
                              "mean_kl_dropped_by_layer": [0.009, 0.013],
                              "most_important_dropped": [{"layer": 1, "shard": 10, "kl": 0.059}]},
               "additivity": {"spearman": 0.95}, "device": device}
    text = prof.format_summary(summary)
    for part in ("7794 MB/s", "4.61 ms", "2-bit 2.90, fp32 0.31", "int8 products up to 64 tokens",
                 "8-bit 52.5", "0.23 ns of compute per streamed byte (0.07 where int8 products read it)", "T / 1.16",
                 "validation on 12 plan-like configurations: median over predicted (at the machine's speed then, "
                 "x0.900) -4%..+7%", "5.68 ms median over 60 s against 4.81 ms", "compute times x1.181",
                 "p95 / median 1.08 (180 pooled)", "accuracy there 0.938",
                 "layer 1 shard 10 (0.059)", "Spearman 0.95", "rows 4.7 us per token"):
        assert part in text, part
    cold = prof.format_summary({**summary, "storage": None, "full_accuracy": None, "additivity": None,
                                "device": {**device, "int8_max_tokens": 0, "io_slowdown": 1.68}})
    assert "reads 1.68x slower beside the compute, 0.23 ns of compute per streamed byte" in cold
    assert "never faster here" in cold
    assert "storage real (cold reads)" in cold and "accuracy there" not in cold
