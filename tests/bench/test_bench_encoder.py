"""``sti bench encoder``: the pure parts on synthetic runs (lower bound, meeting T and M, the
targets), and the whole suite on the tiny random model with a synthetic profile (no
transformers systems). No timing is asserted anywhere."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sti.bench import encoder
from sti.bench.encoder import Grid, Point, Run, evaluate_point, evaluate_targets, trace_facts
from sti.runtime import Trace

MS = 1e-3


def test_trace_facts_lower_bound_is_the_slower_side_plus_its_fill():
    # two layers; reads 0-10 ms and 10-20 ms; layer 0 computes 10-15 ms, layer 1 20-30 ms
    t = Trace(io=[(0, 0, 4, 0.0, 10 * MS, 100), (1, 0, 4, 10 * MS, 20 * MS, 100)],
              compute=[(0, 10 * MS, 15 * MS), (1, 20 * MS, 30 * MS)], stalls=[(1, 15 * MS, 20 * MS)],
              bytes_read=200, resident_peak=1000, latency=31 * MS)
    f = trace_facts(t)
    assert f["io_s"] == pytest.approx(20 * MS) and f["compute_s"] == pytest.approx(15 * MS)
    assert f["fill_s"] == pytest.approx(10 * MS) and f["tail_s"] == pytest.approx(10 * MS)
    assert f["bound_s"] == pytest.approx(30 * MS)  # IO-bound: all reads, then the last layer
    assert f["latency_s"] >= f["bound_s"] and f["stall_s"] == pytest.approx(5 * MS)
    # nothing streamed (all preloaded): compute alone after the embedding lookup
    f = trace_facts(Trace(compute=[(0, 1 * MS, 4 * MS), (1, 4 * MS, 9 * MS)], latency=9 * MS))
    assert f["io_s"] == 0 and f["tail_s"] == 0 and f["bound_s"] == pytest.approx(9 * MS)


def run(system, latency_ms, accuracy, resident, *, budget=None, frac=None, target=None, mult=None, status="ok",
        predicted=None, bound=None):
    r = Run(system, 32, "real-cold", budget=budget, budget_fraction=frac, target=target, target_multiple=mult,
            status=status, latency=[x * MS for x in latency_ms], accuracy=accuracy, resident_bytes=resident,
            predicted_latency=predicted, bound_ratio=bound or [])
    r.preds = [0] * len(latency_ms)
    return r


POINT = Point(32, "real-cold", 10 * MS, 1.0, 1000, 0.05)


def synthetic_runs(sti_latency_ms=(8, 9, 9, 9), sti_accuracy=0.90):
    return [
        run("in-memory", [5] * 4, 0.95, 90_000),  # fast and accurate, but holds the whole model
        run("uniform-8bit", [12, 12, 13, 14], 0.94, 900, budget=1000, frac=0.05),  # within M, misses T
        run("uniform-4bit", [7, 8, 8, 9], 0.85, 800, budget=1000, frac=0.05),  # meets T and M
        run("uniform-32bit", [], None, None, budget=1000, frac=0.05, status="does-not-fit"),
        run("sti-exact", list(sti_latency_ms), sti_accuracy, 990, budget=1000, frac=0.05, target=10 * MS, mult=1.0,
            predicted=9 * MS, bound=[1.05, 1.08]),
        run("sti-heuristic", [], None, None, budget=1000, frac=0.05, target=10 * MS, mult=1.0, status="no-plan"),
    ]


def test_meeting_T_and_M_is_computed_from_the_samples():
    r = run("uniform-4bit", [5, 6, 7, 30], 0.9, 900)  # 3 of 4 requests within 10 ms
    assert r.deadline_met(10 * MS) == 0.75 and not r.meets_T(10 * MS)  # needs >= 95%
    assert r.meets_T(30 * MS) and r.meets_M(900) and not r.meets_M(899)
    assert not run("uniform-32bit", [], None, None, status="does-not-fit").meets_M(10**9)


def test_point_counts_only_baselines_that_meet_T_and_M():
    p = evaluate_point(synthetic_runs(), POINT)
    s = p["systems"]
    assert s["in-memory"]["meets_T"] and not s["in-memory"]["meets_M"]
    assert s["uniform-8bit"]["meets_M"] and not s["uniform-8bit"]["meets_T"] and not s["uniform-8bit"]["qualifies"]
    assert s["uniform-32bit"]["status"] == "does-not-fit" and not s["uniform-32bit"]["qualifies"]
    # the more accurate in-memory and 8-bit runs miss M or T: the best qualifying baseline is 4-bit
    assert p["best_baseline"] == {"system": "uniform-4bit", "accuracy": 0.85}
    assert p["c"]["sti-exact"]["met"] is True
    assert p["c"]["sti-heuristic"] == {"met": False, "why": "no plan"}
    # STI more accurate but too slow: it does not count as meeting the target
    late = evaluate_point(synthetic_runs(sti_latency_ms=(8, 11, 12, 12)), POINT)
    assert late["c"]["sti-exact"]["met"] is False and late["systems"]["sti-exact"]["deadline_met"] == 0.25
    worse = evaluate_point(synthetic_runs(sti_accuracy=0.80), POINT)
    assert worse["c"]["sti-exact"]["met"] is False


def test_targets_use_the_measured_numbers():
    runs = synthetic_runs()
    points = [evaluate_point(runs, POINT)]
    t = evaluate_targets(runs, points, {32: 0.95})
    ex = t["sti-exact"]
    (a,) = ex["a"]["checks"]
    assert a["needed"] == pytest.approx(0.99 * 0.95) and a["met"] is False and ex["a"]["met"] is False  # 0.90 < 0.94
    (b,) = ex["b"]["checks"]  # median 9 ms vs predicted 9 ms, all within T
    assert b["relative_error"] == pytest.approx(0.0) and b["met"] is True
    assert ex["c"]["met"] is True and ex["d"]["met"] is True
    assert ex["d"]["checks"][0]["median_latency_over_bound"] == pytest.approx(1.065)
    assert t["sti-heuristic"]["a"]["met"] is False and t["sti-heuristic"]["b"]["judged"] == 0
    lines = "\n".join(encoder.target_lines(t))
    assert "STI exact FAIL (0/1)" in lines and "accuracy 0.900 vs 0.941 needed, T met" in lines
    assert "(c) accuracy ≥ every baseline" in lines and "STI exact PASS (1/1)" in lines
    # no baseline meeting T and M: (c) is vacuous, not a pass of something
    lonely = [r for r in runs if r.system.startswith("sti")]
    p = evaluate_point(lonely, POINT)
    assert p["best_baseline"] is None and p["c"]["sti-exact"]["met"] is None
    assert evaluate_targets(lonely, [p], {32: 0.95})["sti-exact"]["c"]["vacuous"] == 1


def test_paths_are_scrubbed():
    obj = {"a": "/home/u/.cache/sti/minilm.sti/profile.json", "b": ["/home/u/x", 3]}
    out = encoder.scrub_paths(obj, [("/home/u", "~"), ("/home/u/.cache/sti/minilm.sti", "<store>")])
    assert out == {"a": "<store>/profile.json", "b": ["~/x", 3]}


def test_importing_the_suite_imports_no_reference_or_plotting_library():
    code = ("import sys, sti.bench.encoder, sti.bench._encoder_worker; "
            "print(*[m in sys.modules for m in ('torch', 'transformers', 'matplotlib', 'scipy')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"] * 4


# --------------------------------------------------------------------------- the whole suite, tiny model


@pytest.fixture
def profiled_tiny(tiny_bert, tmp_path):
    from sti.plan import DeviceProfile, Importance
    from sti.profile import model_shape, save_profile
    from sti.store import Store

    dst = tmp_path / "tiny.sti"
    shutil.copytree(tiny_bert[2], dst)
    with Store.open(dst) as st:
        imp = Importance.synthetic(model_shape(st), seed=1)
    for storage in (None, "200MBps"):
        dev = DeviceProfile(io_bandwidth=200e6 if storage else 1e9, io_latency=1e-5, c0=1e-4, c1=1e-6,
                            dequant_per_byte={b: 1e-9 for b in (2, 3, 4, 5, 6, 8, 32)}, label="synthetic")
        save_profile(dst, imp, dev, {"task": "synthetic"}, storage=storage)
    return dst


def tiny_eval_set(n=6):
    from tiny_models import CFG, WORDS

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 20)) for _ in range(n)]
    W = rng.standard_normal((3, CFG.hidden_size)).astype(np.float32)
    return encoder.EvalSet("tiny synthetic texts", texts, rng.integers(0, 3, n), ("x", "y", "z"), W,
                           np.zeros(3, np.float32), list(range(n)))


def test_suite_end_to_end_on_the_tiny_model(tiny_bert, profiled_tiny, tmp_path, capsys):
    from sti.profile import model_shape
    from sti.store import Store

    with Store.open(profiled_tiny) as st:
        total = encoder.fp32_model_bytes(st)
        sh = model_shape(st, encoder.CHUNK_SHARDS, input_tokens=16)
    need = lambda bits: sh.fixed_bytes + sh.scratch_bytes + sh.shards_per_layer * sh.shard_bytes[bits]  # noqa: E731
    assert need(2) < need(32)
    small, large = (need(2) + 1) / total, (need(32) + 1) / total  # 2-bit fits the small budget, fp32 only the large
    grid = Grid(seq_lens=(16,), storages=(encoder.EMULATED,), latency_multiples=(1.0, 20.0),
                memory_fractions=(small, large), n_texts=6, hf_cold_runs=0, exact_time_limit=5.0, warmup=1,
                uniform_bits=(2, 32))
    out = tmp_path / "out"
    rc = encoder.run_encoder(out, repeats=1, store=profiled_tiny, grid=grid, eval_set=tiny_eval_set(),
                             references=False)
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "encoder.json").read_text())
    assert {"suite", "schema_version", "grid", "definitions", "setup", "references", "environment", "targets",
            "points", "runs", "notes", "errors"} <= set(report)
    assert report["suite"] == "encoder" and report["errors"] == []
    assert set(report["targets"]) == {"sti-heuristic", "sti-exact"}
    assert all(set(v) == {"a", "b", "c", "d"} for v in report["targets"].values())
    assert len(report["points"]) == 2 * 2  # T x M
    runs = {r["id"]: r for r in report["runs"]}
    fp32_small = runs[f"16/{encoder.EMULATED}/uniform-32bit/M{small:g}"]
    assert fp32_small["status"] == "does-not-fit" and fp32_small["latency_samples_ms"] == []
    assert fp32_small["need_bytes"] == need(32) > fp32_small["budget"]
    fits = runs[f"16/{encoder.EMULATED}/uniform-2bit/M{small:g}"]
    assert fits["status"] == "ok" and fits["resident_bytes"] <= fits["budget"] and fits["accuracy"] is not None
    assert len(fits["latency_samples_ms"]) == 6 and fits["peak_rss_bytes"] > 0 and fits["bound_ratio"]["median"] >= 1
    assert runs[f"16/{encoder.EMULATED}/layerwise-fp32"]["resident_bytes"] <= need(32)
    assert runs[f"16/{encoder.EMULATED}/load-execute"]["resident_bytes"] > need(32)
    ref = runs["16/any/in-memory"]
    assert report["references"]["16"]["fp32_warm_latency_s"] == pytest.approx(ref["latency_ms"]["median"] / 1e3,
                                                                              abs=1e-6)
    for p in report["points"]:  # a baseline that does not fit M never qualifies
        e = p["systems"]["uniform-32bit"]
        assert e["qualifies"] is (e["status"] == "ok" and e["meets_M"] and e["meets_T"])
        assert not p["systems"]["in-memory"]["meets_M"]
    for kind in ("latency", "memory"):
        png = out / f"encoder-pareto-{kind}-16-{encoder.EMULATED}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "encoder.md").read_text()
    assert "## Targets" in md and "emulated 200 MB/s" in md and "does not fit" in md
    text = (out / "encoder.json").read_text() + md
    for path in (tmp_path, profiled_tiny, tiny_bert[0]):  # no machine paths
        assert str(path) not in text
    assert list((out / "encoder-plans").glob("exact-16-*.json"))  # plans cached for the next run


def test_baselines_that_cannot_fit_M_are_reported_and_not_run(profiled_tiny, tmp_path):
    from sti.store import Store

    with Store.open(profiled_tiny) as st:
        total = encoder.fp32_model_bytes(st)
    grid = Grid(seq_lens=(16,), storages=(encoder.EMULATED,), memory_fractions=(0.01,), n_texts=3)
    bench = encoder.Bench(profiled_tiny, tiny_eval_set(3), grid, tmp_path, tmp_path, "not asked for")
    try:
        st = encoder.STORAGES[encoder.EMULATED]
        layerwise = bench.layerwise(16, st)
        uniform = bench.uniform(16, st, 2, 0.01)
    finally:
        bench.store.close()
    for r in (layerwise, uniform):
        assert r.status == "does-not-fit" and r.need_bytes > int(0.01 * total) and r.latency == [] and r.wall_s is None
        assert not r.meets_M(10**12) and "needs" in r.reason
    assert bench.budgets == {0.01: int(0.01 * total)}


def test_systems_take_turns_and_give_what_they_give_alone(profiled_tiny, tmp_path, monkeypatch):
    """Inside ``Bench.turns`` every system's worker runs its requests in turns of ROUND_TEXTS with
    the others: the same predictions and as many latencies as measured alone; a worker that fails
    is reported as an error of its own run and the others still finish."""
    monkeypatch.setattr(encoder, "ROUND_TEXTS", 2)
    grid = Grid(seq_lens=(16,), storages=(encoder.EMULATED,), memory_fractions=(0.9,), n_texts=5, warmup=1)
    bench = encoder.Bench(profiled_tiny, tiny_eval_set(5), grid, tmp_path, tmp_path, "not asked for")
    st = encoder.STORAGES[encoder.EMULATED]
    try:
        alone = [bench.uniform(16, st, bits, 0.9) for bits in (2, 8)]
        broken = encoder.Run("sti-exact", 16, st.key, budget=1, budget_fraction=0.9)
        with bench.turns("[test]"):
            taking_turns = [bench.uniform(16, st, bits, 0.9) for bits in (2, 8)]
            bench.measure(broken, {"system": "stream", "plan": str(tmp_path / "no-such-plan.json")})
            assert all(r.latency == [] for r in taking_turns)  # queued, not run yet
    finally:
        bench.store.close()
    for a, t in zip(alone, taking_turns):
        assert a.ok and t.ok and len(t.latency) == len(a.latency) == 5
        assert t.preds == a.preds and t.resident_bytes == a.resident_bytes and len(t.bound_ratio) == 5
        assert t.setup_s is not None and t.wall_s > 0
    assert broken.status == "error" and "no-such-plan" in broken.reason
    assert any(e.startswith(broken.id) for e in bench.errors)
