"""The pipelined streaming encoder on a tiny packed BERT."""

import json
import threading
import time

import numpy as np
import pytest

from sti import lowbit
from sti.errors import STIError
from sti.models import bert
from sti.runtime import INT8_PARTS, Residency, Schedule, StreamingEncoder, Throttle
from sti.store import Store
from tiny_models import CFG


def inputs():
    rng = np.random.default_rng(1)
    ids = rng.integers(5, CFG.vocab_size, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def in_memory(w, ids, mask):
    g = {n: w[n] for n in bert.GLOBAL_NAMES}
    return bert.encode(CFG, g, [bert.layer_weights(w, i) for i in range(CFG.num_layers)], ids, mask)


def close_on_mask(a, b, mask, tol):
    m = mask[..., None].astype(bool)
    return np.abs(np.where(m, a - b, 0)).max() <= tol


def test_fp32_stream_equals_in_memory(tiny_bert):
    _, w, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        h, trace = StreamingEncoder(st, Schedule.full(st, 32, chunk_shards=3)).run(ids, mask)
    assert close_on_mask(h, in_memory(w, ids, mask), mask, 1e-5)
    # compute is recorded in segments between waits for shards: every layer has at least one
    assert sorted({layer for layer, *_ in trace.compute}) == list(range(CFG.num_layers))
    busy = sum(t1 - t0 for _, t0, t1 in trace.compute) + trace.stall_time
    assert busy <= trace.latency
    assert trace.bytes_read == sum(e[5] for e in trace.io) > 0


def test_the_inputs_embedding_rows_are_read_before_any_shard(tiny_bert):
    _, _, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        eng = StreamingEncoder(st, Schedule.full(st, 4, chunk_shards=2), cold=True)
        for _ in range(3):
            _, trace = eng.run(ids, mask)
            assert 0 < trace.fill == min(t0 for _, t0, _ in trace.compute)
            assert trace.io and min(t0 for *_, t0, _t1, _n in trace.io) >= trace.fill


def test_streamed_layer_equals_assembled_layer_at_every_bitwidth(tiny_bert):
    _, _, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        for bits in (2, 4, 8):
            layers = [{0: bits, 2: 32, 3: bits}, {1: bits}]
            h, _ = StreamingEncoder(st, Schedule(layers, chunk_shards=2)).run(ids, mask)
            ref = bert.encode(CFG, st.globals(), [st.assemble_layer(i, s) for i, s in enumerate(layers)], ids, mask)
            assert close_on_mask(h, ref, mask, 1e-5), bits


def test_resident_bytes_never_exceed_the_budget_and_results_do_not_change(tiny_bert):
    _, _, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        free, _ = StreamingEncoder(st, Schedule.full(st, 4, chunk_shards=1)).run(ids, mask)
        probe = StreamingEncoder(st, Schedule.full(st, 4, chunk_shards=1))  # res.now: fixed + scratch arena
        layer_bytes = sum(st.shard_nbytes(0, s, 4) for s in st.shard_indices(0))
        budget = probe.res.now + probe._embed_bytes(CFG.max_position) + layer_bytes
        assert ids.size <= CFG.max_position
        eng = StreamingEncoder(st, Schedule.full(st, 4, memory_budget=budget, chunk_shards=1))
        for _ in range(3):
            h, trace = eng.run(ids, mask)
            assert trace.resident_peak <= budget
            np.testing.assert_array_equal(h, free)


def test_take_buffers_reserves_what_fits_in_order_and_waits_only_for_the_first():
    res = Residency(1000)
    stop = threading.Event()
    got = res.take_buffers([300, 300, 300, 300], stop)  # room for three: the read takes those
    assert [len(b) for b in got] == [300] * 3 and res.now == 900
    res.give_buffers(got[:2])  # spare, still held
    assert res.now == 900 and res.spare_bytes == 600
    again = res.take_buffers([300, 300, 500], stop)  # two spares; 500 more do not fit beside them
    assert [len(b) for b in again] == [300, 300] and res.now == 900
    late = []
    t = threading.Thread(target=lambda: late.append(res.take_buffers([400], stop)))
    t.start()  # no room for the first: it waits for a hand-back, which frees spares of other sizes
    time.sleep(0.05)
    assert not late
    res.give_buffers(again)
    t.join(2)
    assert [len(b) for b in late[0]] == [400] and res.now <= 1000 and res.peak <= 1000
    stop.set()  # a waiting reader gives up when the request ends
    assert res.take_buffers([900], stop) is None


def test_read_buffers_are_reused_across_requests_and_stay_held(tiny_bert):
    """The IO worker keeps its read buffers: after a request they are spare but held (counted in
    the engine's bytes), the next request reads into them without allocating (the peak does not
    move), and a budget that fits a layer of one bitwidth but not buffers of two sizes at once
    frees spare buffers of the other size to make room, every result unchanged."""
    _, _, path = tiny_bert
    ids, mask = inputs()
    layers = [{s: 4 for s in range(4)}, {s: 8 for s in range(4)}]  # layer 0 at 4 bits, layer 1 at 8
    with Store.open(path) as st:
        free, _ = StreamingEncoder(st, Schedule(layers, chunk_shards=1)).run(ids, mask)
        probe = StreamingEncoder(st, Schedule(layers, chunk_shards=1))
        fixed = probe.res.now  # fixed tensors + scratch arena
        layer8 = sum(st.shard_nbytes(1, s, 8) for s in st.shard_indices(1))
        budget = fixed + probe._embed_bytes(CFG.max_position) + layer8
        eng = StreamingEncoder(st, Schedule(layers, memory_budget=budget, chunk_shards=1))
        h, trace = eng.run(ids, mask)
        np.testing.assert_array_equal(h, free)
        spare = eng.res.spare_bytes
        assert spare > 0 and eng.res.now == fixed + spare  # nothing but spare buffers held beyond the fixed
        peak = eng.res.peak
        assert peak <= budget
        for _ in range(2):
            h, trace = eng.run(ids, mask)
            np.testing.assert_array_equal(h, free)
            assert eng.res.peak == peak and trace.resident_peak <= budget
        # 4-bit and 8-bit buffers do not both fit: the 8-bit layer's reads freed 4-bit spares
        sizes = {len(b) for bufs in eng.res._spare.values() for b in bufs}
        assert sizes == {st.shard_nbytes(1, 0, 8)}, sizes


def test_a_warm_engine_checks_each_shard_version_on_its_first_read_a_cold_one_on_every_read(tiny_bert, monkeypatch):
    _, _, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        checked = []
        orig = Store.check_shard
        monkeypatch.setattr(Store, "check_shard", lambda self, *a: (checked.append(a[:3]), orig(self, *a))[1])
        streamed = {(layer, s, 4) for layer in range(CFG.num_layers) for s in st.shard_indices(layer)}
        for kw, second in (({}, set()), ({"cold": True}, streamed), ({"verify": "always"}, streamed)):
            eng = StreamingEncoder(st, Schedule.full(st, 4), **kw)
            checked.clear()
            eng.run(ids, mask)
            assert sorted(checked) == sorted(streamed), kw
            checked.clear()
            eng.run(ids, mask)
            assert set(checked) == second and len(checked) == len(second), kw
        with pytest.raises(STIError, match="unknown verify mode 'never'"):
            StreamingEncoder(st, Schedule.full(st, 4), verify="never")


def test_a_batch_too_large_for_the_budget_is_refused_not_deadlocked(tiny_bert):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        probe = StreamingEncoder(st, Schedule.full(st, 4, chunk_shards=1))
        layer_bytes = sum(st.shard_nbytes(0, s, 4) for s in st.shard_indices(0))
        budget = probe.res.now + probe._embed_bytes(CFG.max_position) + layer_bytes
        eng = StreamingEncoder(st, Schedule.full(st, 4, memory_budget=budget, chunk_shards=1))
        ids = np.ones((4, CFG.max_position), np.int64)
        with pytest.raises(STIError, match="for 64 tokens"):
            eng.run(ids, np.ones_like(ids))


def test_impossible_budget_names_the_smallest_feasible_one(tiny_bert):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        with pytest.raises(STIError, match="raise the budget to at least") as exc:
            StreamingEncoder(st, Schedule.full(st, 32, memory_budget=20_000))
        smallest = int(str(exc.value).split("at least ")[1].split(" B")[0].replace(",", ""))
        StreamingEncoder(st, Schedule.full(st, 32, memory_budget=smallest, chunk_shards=4))  # accepted


def test_preloaded_shards_are_not_read_per_request(tiny_bert):
    _, _, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        sch = Schedule.full(st, 8, preload={(0, 0), (0, 1), (0, 2), (0, 3)})
        eng = StreamingEncoder(st, sch)
        h, trace = eng.run(ids, mask)
        assert {(l, s) for l, s, *_ in trace.io} == {(1, s) for s in st.shard_indices(1)}
        ref, _ = StreamingEncoder(st, Schedule.full(st, 8)).run(ids, mask)
        np.testing.assert_array_equal(h, ref)


def test_damaged_shard_is_reported_at_load(tiny_bert, tmp_path):
    import shutil

    _, _, path = tiny_bert
    dst = tmp_path / "bad.sti"
    shutil.copytree(path, dst)
    with Store.open(dst) as st:
        f, off, n = st.shard_location(1, 2, 4)
    data = bytearray(f.read_bytes())
    data[off + 10] ^= 0xFF
    f.write_bytes(bytes(data))
    with Store.open(dst) as st:
        with pytest.raises(STIError, match=r"layer 1, index 2\) 4-bit") as exc:
            StreamingEncoder(st, Schedule.full(st, 4)).run(*inputs())
        assert "shards-4bit" in str(exc.value)


def test_concurrent_requests_are_serialised_and_correct(tiny_bert):
    _, _, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        eng = StreamingEncoder(st, Schedule.full(st, 8, chunk_shards=2))
        ref, _ = eng.run(ids, mask)
        out, errors = [], []

        def call():
            try:
                out.append(eng.run(ids, mask)[0])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(out) == 4
    for h in out:
        np.testing.assert_array_equal(h, ref)


def test_an_engine_keeps_one_io_thread_across_requests_and_ends_it_when_collected(tiny_bert):
    import gc

    def io_threads():
        return [t for t in threading.enumerate() if t.name == "sti-io"]

    _, _, path = tiny_bert
    ids, mask = inputs()
    before = set(io_threads())  # other engines' (of other tests) may still be alive
    with Store.open(path) as st:
        eng = StreamingEncoder(st, Schedule.full(st, 4, chunk_shards=2))
        ref, _ = eng.run(ids, mask)
        (thread,) = set(io_threads()) - before
        for _ in range(3):  # the same thread serves every request, and a failed one
            np.testing.assert_array_equal(eng.run(ids, mask)[0], ref)
        with pytest.raises(STIError, match="out of range"):
            eng.run(ids + CFG.vocab_size, mask)
        np.testing.assert_array_equal(eng.run(ids, mask)[0], ref)
        assert thread.is_alive() and set(io_threads()) - before == {thread}
        del eng
        gc.collect()
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_throttle_follows_the_device_clock(monkeypatch):
    """Back-to-back reads complete on the emulated device's clock: a reader woken late does not
    slow the device down, an idle device starts afresh, and every read takes at least its own
    latency + bytes / bandwidth."""
    import sti.runtime as rt

    clock = [100.0]
    late = 3e-4  # every sleep overshoots by this much, as an OS may
    monkeypatch.setattr(rt.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(rt.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s + late))
    th = Throttle(1e6, 1e-4)  # 1 MB/s: 1000 B take 1 ms, + 0.1 ms per read
    done = []
    for _ in range(10):  # issued back to back: each read starts when the previous returns
        th.pace(clock[0], 1000)
        done.append(clock[0])
    # the device finished read i at 100 + (i + 1) * 1.1 ms; the reader saw it <= `late` later
    for i, t in enumerate(done):
        assert 100 + (i + 1) * 1.1e-3 - 1e-12 <= t <= 100 + (i + 1) * 1.1e-3 + late + 1e-12
    clock[0] += 1.0  # idle: the next read takes its full time from when it is issued
    t0 = clock[0]
    th.pace(t0, 1000)
    assert clock[0] >= t0 + 1.1e-3


def test_trace_exports_and_throttle_is_labelled(tiny_bert, tmp_path):
    _, _, path = tiny_bert
    with Store.open(path) as st:
        eng = StreamingEncoder(st, Schedule.full(st, 4), throttle=Throttle(50e6, 1e-4))
        _, trace = eng.run(*inputs())
    # the IO worker reads a layer's shards by one call, which the emulated device serves as one
    # read per shard, one after another: a layer's reads complete no earlier than the first
    # read's start + the device time (latency + bytes / bandwidth) of every read up to theirs
    assert [len(group) for group in eng._reads] == [4, 4]
    io = {(layer, s): (t0, t1, n) for layer, s, _, t0, t1, n in trace.io}
    start, device = min(t0 for t0, _, _ in io.values()), 0.0
    for group in eng._reads:
        device += 1e-4 * len(group) + sum(io[(layer, s)][2] for layer, s, _ in group) / 50e6
        assert max(io[(layer, s)][1] for layer, s, _ in group) >= start + device - 1e-6
    doc = json.loads(json.dumps(trace.to_chrome()))
    assert {e["tid"] for e in doc["traceEvents"]} >= {"io", "compute"}
    assert doc["otherData"]["storage"] == "emulated 50 MB/s"
    trace.save_png(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


needs_int8 = pytest.mark.skipif(not lowbit.has_int8_kernel(),
                                reason="int8 products need the C kernels built with AVX-512 VNNI")


@needs_int8
def test_int8_products_equal_their_numpy_reference_and_stay_near_dequantization(tiny_bert, monkeypatch):
    """Quantized chunks multiply every part by int8 products from the shard bytes: the engine's
    output equals the same engine with the NumPy reference of those products (to float rounding),
    and stays within the activation rounding of the dequantizing engine. Float32 shards are
    chunked apart (shard 2 below) and keep BLAS. The tiny model's shards do not have rows in fours,
    so quantized shards keep chunks of ``chunk_shards`` too."""
    _, _, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        for bits in (2, 4, 8):
            layers = [{0: bits, 2: 32, 3: bits, 1: bits}, {1: bits, 3: 6}]
            plain = StreamingEncoder(st, Schedule(layers, chunk_shards=2))
            eng = StreamingEncoder(st, Schedule(layers, chunk_shards=2, int8_max_tokens=ids.size))
            assert eng.uses_int8(ids.size) and not plain.uses_int8(ids.size)
            h8, trace = eng.run(ids, mask)
            assert trace.int8 and trace.to_chrome()["otherData"]["int8"]
            chunks, calls = eng._layer_calls(0, True)
            assert chunks == [(0, 1), (3, 2)]  # the fp32 shard rides with the last quantized one
            # the quantized chunk's parts run as int8 products, but for the down projection: the
            # tiny model's 25-neuron slices are not rows in fours, which the transposed product needs
            for part, array, kind in (("qkv", "wqkv", "_Int8Stack"), ("o", "wo_t", "_Int8Stack"),
                                      ("up", "w_up", "_Int8Stack"), ("down", "w_down_t", "ndarray")):
                ops = [v[0][array] for k, v in calls.items() if k[1] == part]
                assert [type(op).__name__ for op in ops] == [kind, "ndarray"], part
            assert all(not op.bufs for op in eng._int8_ops)  # no shard bytes kept after the request
            h, _ = plain.run(ids, mask)
            with monkeypatch.context() as m:
                m.setattr(lowbit, "_lb", None)
                h_ref, _ = eng.run(ids, mask)
            assert close_on_mask(h8, h_ref, mask, 1e-4), bits
            rel = np.abs(np.where(mask[..., None] > 0, h8 - h, 0)).max() / np.abs(h).max()
            assert 0 < rel < 0.05, (bits, rel)


@needs_int8
def test_int8_products_take_a_layers_quantized_shards_in_one_chunk(tiny_bert_fours, monkeypatch):
    """Where every shard's rows come in fours (real models), int8 products need no dequantized copy
    of any part, so a layer's quantized shards make one chunk (one product call per part and layer)
    and only its float32 shards are chunked by ``chunk_shards``. The output equals the engine with
    the NumPy reference of the products and stays near dequantization, within a one-layer budget."""
    _, _, path = tiny_bert_fours
    ids, mask = inputs()
    with Store.open(path) as st:
        layers = [{0: 4, 2: 32, 3: 2, 1: 8}, {1: 4, 3: 6, 0: 3, 2: 5}]
        probe = StreamingEncoder(st, Schedule(layers, chunk_shards=1))
        budget = (probe.res.now + probe._embed_bytes(st.config.max_position)
                  + max(sum(st.shard_nbytes(i, s, b) for s, b in row.items()) for i, row in enumerate(layers)))
        eng = StreamingEncoder(st, Schedule(layers, memory_budget=budget, chunk_shards=1, int8_max_tokens=ids.size))
        assert eng.scratch_bytes == probe.scratch_bytes  # a layer's biases fit where one shard's part is decoded
        chunks, calls = eng._layer_calls(0, True)
        assert chunks == [(0, 1, 3), (2,)]
        assert eng._layer_calls(1, True)[0] == [(0, 1, 2, 3)]
        assert eng._layer_calls(0, False)[0] == [(0,), (1,), (2,), (3,)]  # longer requests dequantize
        for part, (array, _) in INT8_PARTS.items():
            assert type(calls[((0, 1, 3), part)][0][array]).__name__ == "_Int8Stack", part
            assert isinstance(calls[((2,), part)][0][array], np.ndarray), part
        for _ in range(2):
            h8, trace = eng.run(ids, mask)
            assert trace.int8 and trace.resident_peak <= budget
        assert all(not op.bufs for op in eng._int8_ops)
        h, _ = probe.run(ids, mask)
        with monkeypatch.context() as m:
            m.setattr(lowbit, "_lb", None)
            h_ref, _ = eng.run(ids, mask)
        assert close_on_mask(h8, h_ref, mask, 1e-4)
        rel = np.abs(np.where(mask[..., None] > 0, h8 - h, 0)).max() / np.abs(h).max()
        assert 0 < rel < 0.05, rel


@needs_int8
def test_an_engine_for_short_requests_holds_only_their_position_rows_and_no_dequantization_arena(tiny_bert_fours):
    """An engine built for requests of up to ``max_tokens`` tokens holds that many position rows;
    where all of them run int8 products on quantized shards read in place, its arena holds only
    the biases (nothing is dequantized). Its output equals that of the engine holding the whole
    position table and a dequantization arena; requests it could not run are refused."""
    _, _, path = tiny_bert_fours
    ids, mask = inputs()
    H, P = CFG.hidden_size, CFG.max_position
    n = ids.size
    with Store.open(path) as st:
        layers = [{0: 4, 3: 2, 1: 8}, {1: 4, 3: 6, 0: 3, 2: 5}]
        full = StreamingEncoder(st, Schedule(layers, chunk_shards=2, int8_max_tokens=n))
        lean = StreamingEncoder(st, Schedule(layers, chunk_shards=2, int8_max_tokens=n), max_tokens=n)
        assert full.fixed_bytes - lean.fixed_bytes == (P - n) * H * 4
        assert len(lean.globals["embed.pos"]) == n and not lean._arena_decodes
        assert lean.scratch_bytes < full.scratch_bytes
        assert lean.scratch_bytes == 4 * max(4 * lean._part_floats(p, skip=INT8_PARTS[p][0]) for p in INT8_PARTS)
        h_full, t_full = full.run(ids, mask)
        h_lean, t_lean = lean.run(ids, mask)
        assert np.array_equal(h_full, h_lean) and t_lean.int8
        assert t_full.resident_peak - t_lean.resident_peak == full.scratch_bytes - lean.scratch_bytes + (P - n) * H * 4
        for bad in (np.ones((1, n + 1), np.int64), np.ones((3, ids.shape[1]), np.int64)):  # positions; dequantizing
            with pytest.raises(STIError, match=f"requests of up to {n} tokens"):
                lean.run(bad, np.ones_like(bad))
        # a float32 shard, a longer engine or one without int8 products decode into the arena
        for sched, tokens in ((Schedule([{0: 32}, {1: 4}], chunk_shards=2, int8_max_tokens=n), n),
                              (Schedule(layers, chunk_shards=2, int8_max_tokens=n), n + 1),
                              (Schedule(layers, chunk_shards=2), n)):
            assert StreamingEncoder(st, sched, max_tokens=tokens)._arena_decodes


@needs_int8
def test_int8_products_run_only_up_to_their_length_and_keep_the_budget(tiny_bert):
    _, _, path = tiny_bert
    ids, mask = inputs()
    with Store.open(path) as st:
        probe = StreamingEncoder(st, Schedule.full(st, 4, chunk_shards=1))
        layer_bytes = sum(st.shard_nbytes(0, s, 4) for s in st.shard_indices(0))
        budget = probe.res.now + probe._embed_bytes(CFG.max_position) + layer_bytes
        short = StreamingEncoder(st, Schedule.full(st, 4, memory_budget=budget, chunk_shards=1,
                                                   int8_max_tokens=ids.size - 1))
        assert not short.uses_int8(ids.size)
        free, _ = probe.run(ids, mask)
        np.testing.assert_array_equal(short.run(ids, mask)[0], free)  # too long: the dequantizing path
        eng = StreamingEncoder(st, Schedule.full(st, 4, memory_budget=budget, chunk_shards=1, int8_max_tokens=ids.size))
        for _ in range(2):
            h, trace = eng.run(ids, mask)
            assert trace.resident_peak <= budget
            assert not np.array_equal(h, free) and close_on_mask(h, free, mask, 0.05 * np.abs(free).max())
