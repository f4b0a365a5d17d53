"""The planner: the pipeline model on hand-computed cases, both planners against it, the
exact planner against the heuristic, infeasibility reports, JSON."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import random
from dataclasses import asdict

import pytest

from sti import plan as plan_mod
from sti.errors import STIError
from sti.plan import (
    DeviceProfile,
    Importance,
    InfeasiblePlanError,
    ModelShape,
    Plan,
    accumulated_io_budget,
    min_latency,
    min_memory,
    plan,
    plan_exact,
    plan_heuristic,
    simulate,
)

needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                                 reason="the exact planner needs scipy (pip install 'sti[solver]')")

TOL = 1e-9


def fits(p: Plan, shape, dev) -> bool:
    """The plan meets its T and M under the simulator, predicts what the simulator says, keeps
    every AIB >= 0, and streams in the canonical order."""
    tl = simulate(p, shape, dev)
    aib = accumulated_io_budget(p.bits_matrix(), shape, dev, p.target_latency, p.seq_len, preload=p.preload)
    canonical = sorted(p.stream_order, key=lambda r: (r[0], -r[2], r[1]))
    return (tl.feasible and tl.latency <= p.target_latency * (1 + TOL)
            and tl.peak_resident_bytes <= p.memory_budget
            and tl.latency == pytest.approx(p.predicted_latency, rel=1e-12)
            and tl.peak_resident_bytes == p.resident_bytes_peak
            and min(aib) >= -TOL * p.target_latency
            and p.stream_order == canonical)


def instance(seed: int):
    """A small random (shape, importance, device, seq_len, T, M), budgets drawn between the
    smallest plan's needs and the full model's."""
    rng = random.Random(seed)
    L, S = rng.randint(3, 4), rng.randint(3, 4)
    bits = sorted(rng.sample([2, 3, 4, 5, 6, 8], rng.randint(2, 3))) + [32]
    params = rng.randint(2_000, 8_000)
    shape = ModelShape(L, S, {b: params * b // 8 + (0 if b == 32 else 2 * params // 64 * 4) for b in bits},
                       fixed_bytes=rng.randint(0, 20_000), scratch_bytes=params * 4)
    dev = DeviceProfile(io_bandwidth=rng.uniform(2e6, 2e7), io_latency=rng.uniform(0, 2e-4),
                        c0=rng.uniform(0, 2e-4), c1=rng.uniform(1e-7, 1e-6), c2=rng.uniform(0, 1e-9),
                        dequant_per_byte={b: rng.uniform(0, 5e-9) for b in bits if b != 32},
                        label="synthetic", stream_compute_per_byte=random.Random(seed + 1000).uniform(0, 2e-9))
    n = rng.choice([16, 64, 128])
    imp = Importance.synthetic(shape, seed)
    t_lo = min_latency(shape, dev, n, method="heuristic")
    full = [[32] * S for _ in range(L)]
    t_hi = simulate(full, shape, dev, n).latency
    m_lo = min_memory(shape, dev, n)
    m_hi = shape.base_bytes + L * S * shape.shard_bytes[32]
    T = t_lo + rng.uniform(0.05, 0.8) * (t_hi - t_lo)
    M = int(m_lo + rng.uniform(0.05, 0.6) * (m_hi - m_lo))
    return shape, imp, dev, n, T, M


# ---------------------------------------------------------------------------- the pipeline model


def tiny():
    # 2 layers x 2 shards of 100 B; reads take 1 s each; a layer takes 1 s per active shard
    shape = ModelShape(2, 2, {4: 100}, fixed_bytes=10, scratch_bytes=5)
    dev = DeviceProfile(io_bandwidth=100.0, c1=1.0)
    return shape, dev, [[4, 4], [4, 4]]


def test_timeline_unbounded_hand_computed():
    shape, dev, bits = tiny()
    tl = simulate(bits, shape, dev, 1)
    assert [(r.start, r.end) for r in tl.reads] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [(x.start, x.end, x.stall) for x in tl.layers] == [(2, 4, 2), (4, 6, 0)]
    assert (tl.latency, tl.stall, tl.io_wait) == (6, 2, 0)
    assert tl.peak_resident_bytes == 15 + 400  # nothing frees before layer 0 ends at t=4


def test_timeline_bounded_buffer_waits_for_layers_to_finish():
    shape, dev, bits = tiny()
    # buffer of 200 B: layer 1's first read waits for layer 0 to end (t=4)
    tl = simulate(bits, shape, dev, 1, memory_budget=15 + 200)
    assert [(r.start, r.end, r.wait) for r in tl.reads] == [(0, 1, 0), (1, 2, 0), (4, 5, 2), (5, 6, 0)]
    assert [(x.start, x.end) for x in tl.layers] == [(2, 4), (6, 8)]
    assert (tl.latency, tl.stall, tl.io_wait, tl.peak_resident_bytes) == (8, 4, 2, 215)
    # buffer of 300 B: only layer 1's second read waits
    tl = simulate(bits, shape, dev, 1, memory_budget=15 + 300)
    assert [r.start for r in tl.reads] == [0, 1, 2, 4]
    assert (tl.latency, tl.stall, tl.io_wait, tl.peak_resident_bytes) == (7, 3, 1, 315)
    # a layer that cannot fit the buffer at all: infeasible, not a hang
    tl = simulate(bits, shape, dev, 1, memory_budget=15 + 199)
    assert not tl.feasible and math.isinf(tl.latency)


def test_timeline_preload_and_stall_accounting():
    shape, dev, bits = tiny()
    tl = simulate(bits, shape, dev, 1, preload=[(0, 0)])
    # layer 0 waits only for shard (0, 1): reads (0,1) 0-1, (1,0) 1-2, (1,1) 2-3
    assert [(x.start, x.end, x.stall) for x in tl.layers] == [(1, 3, 1), (3, 5, 0)]
    assert (tl.latency, tl.stall, tl.preload_bytes) == (5, 1, 100)
    # fully preloaded layer 0 starts at once; dropped shards cost nothing
    tl = simulate([[4, 4], [4, 0]], shape, dev, 1, preload=[(0, 0), (0, 1)])
    assert [(x.start, x.end, x.width) for x in tl.layers] == [(0, 2, 2), (2, 3, 1)]
    assert tl.stall == 0 and len(tl.reads) == 1


def test_canonical_order_reads_wider_shards_first():
    shape = ModelShape(1, 3, {4: 100, 8: 200}, fixed_bytes=0, scratch_bytes=0)
    dev = DeviceProfile(io_bandwidth=100.0, c1=1.0)
    tl = simulate([[4, 8, 8]], shape, dev, 1)
    assert [(r.shard, r.bits, r.start, r.end) for r in tl.reads] == [(1, 8, 0, 2), (2, 8, 2, 4), (0, 4, 4, 5)]
    assert (tl.latency, tl.stall) == (8, 5)


def test_the_inputs_embedding_rows_come_before_the_first_layer_and_the_reads():
    shape = ModelShape(2, 1, {4: 100}, fixed_bytes=0, scratch_bytes=0)
    # 2 tokens: the rows take 0.5 + 2 * 0.25 = 1, then layer 0 and the reads may start
    dev = DeviceProfile(io_bandwidth=100.0, c1=1.0, embed_fixed=0.5, embed_per_token=0.25)
    preloaded = simulate([[4], [4]], shape, dev, 2, preload=[(0, 0), (1, 0)])
    assert [(t.start, t.end, t.stall) for t in preloaded.layers] == [(1, 3, 0), (3, 5, 0)]  # no IO stall
    streamed = simulate([[4], [4]], shape, dev, 2)  # the runtime reads the rows, then the shards
    assert [(r.start, r.end) for r in streamed.reads] == [(1, 2), (2, 3)]
    assert [(t.start, t.end, t.stall) for t in streamed.layers] == [(2, 4, 1), (4, 6, 0)] and streamed.latency == 6
    assert accumulated_io_budget([[4], [4]], shape, dev, 6, 2)[0] == 0  # exactly in time
    assert min(accumulated_io_budget([[4], [4]], shape, dev, 5.9, 2)) < 0


def test_deadlines_are_planned_with_the_margin_measured_at_the_requests_length():
    shape, imp, dev, _, _, _ = instance(3)
    by_len = DeviceProfile(**{**asdict(dev), "tail_ratio": 1.5, "tail_by_tokens": {"16": 1.5, "64": 1.1}})
    assert by_len.tail_by_tokens == {16: 1.5, 64: 1.1}  # as read back from JSON
    assert [by_len.margin(n) for n in (8, 16, 32, 64, 128)] == [1.5, 1.5, 1.5, 1.1, 1.1]
    M = shape.base_bytes + shape.num_layers * shape.shards_per_layer * shape.shard_bytes[32]
    for n, k in ((16, 1.5), (64, 1.1)):
        T = 1.2 * min_latency(shape, by_len, n)  # a deadline (x the margin at n)
        p = plan(shape, imp, by_len, T, M, n, method="heuristic")
        assert p.solver["tail_ratio"] == k and p.solver["median_latency_bound"] == pytest.approx(T / k)
        assert p.predicted_latency * k <= T * (1 + 1e-9)
    with pytest.raises(STIError, match="must be >= 1"):
        DeviceProfile(io_bandwidth=1.0, tail_by_tokens={32: 0.9})


def test_aib_matches_unbounded_latency():
    shape, dev, bits = tiny()
    assert accumulated_io_budget(bits, shape, dev, 6.0, 1) == [0.0, 0.0]
    assert min(accumulated_io_budget(bits, shape, dev, 5.9, 1)) < 0
    for seed in range(10):
        shape, _, dev, n, T, _ = instance(seed)
        rng = random.Random(seed)
        bits = [[rng.choice((0,) + shape.bits) for _ in range(shape.shards_per_layer)]
                for _ in range(shape.num_layers)]
        pre = [(l, s) for l, row in enumerate(bits) for s, b in enumerate(row) if b and rng.random() < 0.3]
        lat = simulate(bits, shape, dev, n, preload=pre).latency
        aib = accumulated_io_budget(bits, shape, dev, lat, n, preload=pre)
        assert min(aib) == pytest.approx(0.0, abs=1e-12)


def test_stream_order_must_be_layer_major_and_complete():
    shape, dev, bits = tiny()
    with pytest.raises(STIError):
        simulate(bits, shape, dev, 1, stream_order=[(1, 0, 4), (0, 0, 4), (0, 1, 4), (1, 1, 4)])
    with pytest.raises(STIError):
        simulate(bits, shape, dev, 1, stream_order=[(0, 0, 4)])


# ---------------------------------------------------------------------------- the planners


@needs_scipy
def test_plans_respect_budgets_and_exact_is_never_worse():
    checked = 0
    for seed in range(20):
        shape, imp, dev, n, T, M = instance(seed)
        try:
            h = plan_heuristic(shape, imp, dev, T, M, n)
        except InfeasiblePlanError:
            h = None
        try:
            e = plan_exact(shape, imp, dev, T, M, n)
        except InfeasiblePlanError:
            assert h is None, f"seed {seed}: exact found nothing where the heuristic did"
            continue
        assert fits(e, shape, dev) and e.method == "exact" and e.solver["optimal"]
        assert e.predicted_loss == pytest.approx(sum(
            imp.loss[l][s][b] for l, row in enumerate(e.bits_matrix()) for s, b in enumerate(row)))
        if h is not None:
            checked += 1
            assert fits(h, shape, dev) and h.method == "heuristic"
            assert e.predicted_loss <= h.predicted_loss + 1e-9, f"seed {seed}"
            assert all(w >= 1 for w in h.widths) and all(w >= 1 for w in e.widths)
    assert checked >= 12  # the instance generator mostly draws feasible budgets


@needs_scipy
def test_exact_loss_is_monotone_in_memory_and_latency():
    for seed in (3, 10):
        shape, imp, dev, n, T, M = instance(seed)
        t0 = min_latency(shape, dev, n, None)
        m0 = min_memory(shape, dev, n, None)
        losses = [plan_exact(shape, imp, dev, T, M, n).predicted_loss for M in
                  [int(m0 * f) for f in (1.5, 2.5, 4, 8)]]
        assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:])), losses
        M = int(m0 * 3)
        losses = []
        for f in (1.1, 1.5, 2.2, 4):
            losses.append(plan_exact(shape, imp, dev, t0 * f, M, n).predicted_loss)
        assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:])), losses


def brute_force(shape, imp, dev, n, T, M):
    """Least loss over every plan (each shard dropped, streamed or preloaded at each bitwidth),
    judged by the simulator; None if none fits."""
    S = shape.shards_per_layer
    options = [(0, False)] + [(b, pre) for b in shape.bits for pre in (False, True)]
    best = None
    for combo in itertools.product(options, repeat=shape.num_layers * S):
        bits = [[combo[l * S + s][0] for s in range(S)] for l in range(shape.num_layers)]
        if any(not any(row) for row in bits):
            continue
        pre = [(l, s) for l in range(shape.num_layers) for s in range(S) if combo[l * S + s][1]]
        tl = simulate(bits, shape, dev, n, preload=pre, memory_budget=M)
        if tl.feasible and tl.latency <= T * (1 + TOL) and tl.peak_resident_bytes <= M:
            loss = sum(imp.loss[l][s][b] for l, row in enumerate(bits) for s, b in enumerate(row))
            best = loss if best is None else min(best, loss)
    return best


@needs_scipy
def test_exact_matches_brute_force_on_tiny_models():
    for seed in range(6):
        rng = random.Random(100 + seed)
        L, S = rng.choice([(2, 2), (3, 2)])
        params = rng.randint(2_000, 8_000)
        shape = ModelShape(L, S, {4: params // 2 + 64, 32: params * 4}, fixed_bytes=rng.randint(0, 9_000),
                           scratch_bytes=params * 4)
        dev = DeviceProfile(io_bandwidth=rng.uniform(2e6, 2e7), io_latency=rng.uniform(0, 2e-4),
                            c0=rng.uniform(0, 2e-4), c1=rng.uniform(1e-7, 1e-6), dequant_per_byte={4: 2e-9})
        imp = Importance.synthetic(shape, seed)
        n = 32
        t_lo, t_hi = min_latency(shape, dev, n, None), simulate([[32] * S] * L, shape, dev, n).latency
        m_lo, m_hi = min_memory(shape, dev, n), shape.base_bytes + L * S * shape.shard_bytes[32]
        T = t_lo + rng.uniform(0.0, 0.6) * (t_hi - t_lo)
        M = int(m_lo + rng.uniform(0.0, 0.5) * (m_hi - m_lo))
        want = brute_force(shape, imp, dev, n, T, M)
        if want is None:
            with pytest.raises(InfeasiblePlanError):
                plan_exact(shape, imp, dev, T, M, n)
        else:
            got = plan_exact(shape, imp, dev, T, M, n)
            assert got.predicted_loss == pytest.approx(want, rel=1e-7, abs=1e-12), seed


def test_upgrades_use_the_slack():
    shape, imp, dev, n, T, M = instance(3)
    roomy = plan_heuristic(shape, imp, dev, T * 100, M * 100, n)
    assert roomy.predicted_loss == 0 and set(b for lp in roomy.layers for b in lp.bits) == {32}


@pytest.mark.parametrize("method", ["heuristic", pytest.param("exact", marks=needs_scipy)])
def test_infeasible_names_both_minima_and_they_are_feasible(method):
    shape, imp, dev, n, _, _ = instance(5)
    t_abs = min_latency(shape, dev, n, None, method=method)
    m_abs = min_memory(shape, dev, n, None, method=method)
    # a tight memory (one layer of small shards in flight) makes the pipeline nearly serial
    M = m_abs + 2 * shape.shard_bytes[min(shape.bits)]
    t_at_M = min_latency(shape, dev, n, M, method=method)
    assert t_at_M > t_abs * 1.05
    T = (t_abs + t_at_M) / 2  # reachable with more memory, not within M
    with pytest.raises(InfeasiblePlanError) as ei:
        plan(shape, imp, dev, T, M, n, method=method)
    err = ei.value
    assert isinstance(err, STIError)
    assert err.min_latency == pytest.approx(t_at_M) and err.min_latency > T
    assert err.min_memory is not None and err.min_memory > M
    assert err.abs_min_memory == m_abs and err.abs_min_latency == pytest.approx(t_abs)
    msg = str(err)
    assert "smallest latency" in msg and "at least" in msg
    assert any(u in msg for u in (" ms", " µs", " s ")) and "MB" in msg and f"{err.min_memory:,} bytes" in msg
    p1 = plan(shape, imp, dev, err.min_latency, M, n, method=method)
    p2 = plan(shape, imp, dev, T, err.min_memory, n, method=method)
    assert fits(p1, shape, dev) and fits(p2, shape, dev)
    # just below either minimum it is infeasible again
    with pytest.raises(InfeasiblePlanError):
        plan(shape, imp, dev, T, err.min_memory - 1, n, method=method)
    with pytest.raises(InfeasiblePlanError):
        plan(shape, imp, dev, err.min_latency * (1 - 1e-6), M, n, method=method)


@pytest.mark.parametrize("method", ["heuristic", pytest.param("exact", marks=needs_scipy)])
def test_tail_ratio_plans_the_median_under_the_deadline(method):
    """A device whose 95th-percentile request takes 1.25x its median: planning for deadline T is
    planning the median for T / 1.25, and every latency the planner reports is a deadline."""
    from dataclasses import replace

    shape, imp, dev, n, T, M = instance(1)
    tailed = replace(dev, tail_ratio=1.25)
    p = plan(shape, imp, tailed, T, M, n, method=method)
    q = plan(shape, imp, dev, T / 1.25, M, n, method=method)
    assert p.target_latency == T and p.predicted_latency * 1.25 <= T * (1 + TOL)
    assert p.bits_matrix() == q.bits_matrix() and p.preload == q.preload
    assert p.solver["tail_ratio"] == 1.25 and p.solver["median_latency_bound"] == pytest.approx(T / 1.25)
    assert min_latency(shape, tailed, n, M, method=method) == pytest.approx(1.25 * min_latency(shape, dev, n, M, method=method))
    t_fast = min_latency(shape, tailed, n, None, method=method)
    with pytest.raises(InfeasiblePlanError) as ei:
        plan(shape, imp, tailed, t_fast * 0.99, M, n, method=method)
    assert ei.value.abs_min_latency == pytest.approx(t_fast)
    with pytest.raises(STIError, match="tail_ratio"):
        replace(dev, tail_ratio=0.9)


@pytest.mark.parametrize("method", ["heuristic", pytest.param("exact", marks=needs_scipy)])
def test_compute_margin_stretches_the_checked_timeline_not_the_prediction(method):
    """Planning with a compute margin g is planning on a device whose every compute time is g x
    longer (reads as they are); the plan still predicts the device's own timeline."""
    from dataclasses import replace

    shape, imp, dev, n, T, M = instance(4)
    g = 1.3
    stretched = replace(dev, compute_margin_by_tokens={str(n): g})  # as read back from JSON
    assert stretched.compute_margin(n) == g and dev.compute_margin(n) == 1.0
    slower = replace(dev, c0=g * dev.c0, c1=g * dev.c1, c2=g * dev.c2,
                     dequant_per_byte={b: g * v for b, v in dev.dequant_per_byte.items()},
                     stream_compute_per_byte=g * dev.stream_compute_per_byte)
    T = 1.1 * min_latency(shape, slower, n, M, method="heuristic")
    p = plan(shape, imp, stretched, T, M, n, method=method)
    q = plan(shape, imp, slower, T, M, n, method=method)
    assert p.bits_matrix() == q.bits_matrix() and p.preload == q.preload
    assert p.predicted_latency == pytest.approx(simulate(p, shape, dev).latency, rel=1e-12)
    checked = simulate(p, shape, slower).latency
    assert p.predicted_latency < checked <= T * (1 + TOL) and p.solver["checked_latency"] == pytest.approx(checked)
    assert p.solver["compute_margin"] == g
    assert min_latency(shape, stretched, n, M, method=method) == pytest.approx(min_latency(shape, slower, n, M, method=method))
    # a deadline the stretched compute alone misses has no plan, though the prediction would meet it
    with pytest.raises(InfeasiblePlanError):
        plan(shape, imp, stretched, 0.99 * min_latency(shape, slower, n, None, method=method), M, n, method=method)
    with pytest.raises(STIError, match="compute margins must be >= 1"):
        replace(dev, compute_margin_by_tokens={n: 0.9})


@needs_scipy
def test_infeasible_below_absolute_minima():
    shape, imp, dev, n, _, _ = instance(2)
    m_abs = min_memory(shape, dev, n, None)
    t_abs = min_latency(shape, dev, n, None)
    with pytest.raises(InfeasiblePlanError) as ei:
        plan_exact(shape, imp, dev, t_abs * 0.5, m_abs - 1, n)
    err = ei.value
    assert err.min_latency is None and err.min_memory is None
    assert err.abs_min_memory == m_abs and err.abs_min_latency == pytest.approx(t_abs)
    assert "below the smallest model" in str(err) and "below the fastest plan" in str(err)
    plan_exact(shape, imp, dev, t_abs, m_abs * 100, n)  # the absolute minima are feasible too
    plan_exact(shape, imp, dev, t_abs * 1000, m_abs, n)


@needs_scipy
def test_exact_minima_never_above_heuristic_minima():
    for seed in (0, 4):
        shape, _, dev, n, T, M = instance(seed)
        for m in (M, None):
            assert min_latency(shape, dev, n, m) <= min_latency(shape, dev, n, m, method="heuristic") * (1 + TOL)
        assert min_memory(shape, dev, n, T) <= min_memory(shape, dev, n, T, method="heuristic")


# ---------------------------------------------------------------------------- data


def test_json_round_trip():
    shape, imp, dev, n, T, M = instance(2)
    methods = ["heuristic"] + (["exact"] if importlib.util.find_spec("scipy") else [])
    for method in methods:
        p = plan(shape, imp, dev, T, M, n, method=method)
        text = p.to_json()
        json.loads(text)
        q = Plan.from_json(text)
        assert q == p
        assert simulate(q, shape, dev).latency == p.predicted_latency
    for obj, cls in ((shape, ModelShape), (imp, Importance), (dev, DeviceProfile)):
        assert cls.from_dict(json.loads(json.dumps(asdict(obj)))) == obj


def test_synthetic_importance_and_input_checks():
    shape = ModelShape(3, 4, {2: 10, 4: 20, 8: 40, 32: 160})
    imp = Importance.synthetic(shape, 1)
    for row in imp.loss:
        for d in row:
            vals = [d[0]] + [d[b] for b in shape.bits]
            assert all(a >= b for a, b in zip(vals, vals[1:])) and d[32] == 0 and d[0] > 0
    dev = DeviceProfile(io_bandwidth=1e6)
    with pytest.raises(STIError):
        plan(shape, imp, dev, 1.0, 10**6, 16, method="magic")
    with pytest.raises(STIError):
        plan(shape, Importance.synthetic(ModelShape(2, 4, {4: 20}), 0), dev, 1.0, 10**6, 16)
    with pytest.raises(STIError):
        plan(shape, imp, dev, -1.0, 10**6, 16)
    with pytest.raises(STIError):
        ModelShape(3, 4, {7: 10})


def test_a_bitwidths_int8_cost_per_token_adds_to_the_shared_one():
    dev = DeviceProfile(io_bandwidth=1.0, int8_max_tokens=128, int8_per_token=2e-6, c2=0.0,
                        int8_shard={"4": 5e-6, "8": 30e-6}, int8_per_token_bits={"4": 0.0, "8": 0.5e-6})
    assert dev.int8_per_token_bits == {4: 0.0, 8: 0.5e-6}
    assert dev.int8_time(4, 32) == pytest.approx(5e-6 + 2e-6 * 32)
    assert dev.int8_time(8, 32) == pytest.approx(30e-6 + 2.5e-6 * 32)
    assert dev.int8_time(8, 128) - dev.int8_time(4, 128) == pytest.approx(25e-6 + 0.5e-6 * 128)
    assert dev.int8_time(6, 16) == dev.int8_time(8, 16)  # not measured: as the dearest


def test_int8_products_speed_up_quantized_shards_only_where_measured():
    """Where int8 products apply (lengths up to int8_max_tokens), a quantized shard costs
    int8_shard[bits] + int8_per_token n + c2 n^2 (no dequantization; a bitwidth not measured
    costs as the dearest measured); float32 shards keep their cost but are not offered (their
    dequantized products beside int8 ones cost more than the model says); plans carry the
    length to the runtime."""
    from dataclasses import replace

    from sti.plan import _Ctx

    shape, imp, dev, n, T, M = instance(3)
    quantized = sorted(b for b in shape.shard_bytes if b != 32)
    consts = {b: 1e-6 * (i + 1) for i, b in enumerate(quantized[:-1])}  # the widest one not measured
    fast = replace(dev, int8_max_tokens=n, int8_per_token=0.5 * dev.c1, int8_shard=consts)
    a, b = _Ctx(shape, dev, n), _Ctx(shape, fast, n)
    for bits in shape.shard_bytes:
        int8 = dev.c1 * n * 0.5 + dev.c2 * n * n + consts.get(bits, max(consts.values()))
        assert b.shard_compute[bits] == pytest.approx(a.shard_compute[bits] if bits == 32 else int8)
    assert _Ctx(shape, replace(fast, int8_max_tokens=n - 1), n).shard_compute == a.shard_compute
    neg = replace(fast, int8_shard={b: -1.0 for b in quantized})
    assert _Ctx(shape, neg, n).shard_compute[min(shape.bits)] == 0.0  # never negative
    assert DeviceProfile.from_dict(json.loads(json.dumps(fast.__dict__))) == fast  # int keys survive JSON
    q = plan(shape, imp, replace(fast, int8_per_token=0.0, int8_shard={}), T, M, n, method="heuristic")
    p = plan(shape, imp, dev, T, M, n, method="heuristic")
    assert (p.int8_max_tokens, q.int8_max_tokens) == (0, n)
    assert 32 in a.bits and b.bits == tuple(quantized)
    assert all(bits != 32 for lp in q.layers for bits in lp.bits)
    assert Plan.from_json(q.to_json()) == q


def test_streaming_a_shard_adds_its_compute_cost_preloading_does_not():
    """stream_compute_per_byte: where reads are CPU work beside the compute (the page cache), each
    streamed byte adds compute to its layer; a preloaded shard adds none."""
    shape = ModelShape(2, 2, {4: 100}, fixed_bytes=10, scratch_bytes=5)
    dev = DeviceProfile(io_bandwidth=1e9, c1=1.0, stream_compute_per_byte=0.01)  # reads ~free, 1 s per 100 B
    bits = [[4, 4], [4, 4]]
    tl = simulate(bits, shape, dev, 1)
    assert [round(x.end - x.start, 9) for x in tl.layers] == [4, 4]  # 2 shards x (1 s compute + 1 s streaming)
    tl = simulate(bits, shape, dev, 1, preload={(0, 0), (1, 1)})
    assert [round(x.end - x.start, 9) for x in tl.layers] == [3, 3]
    # where int8 products read the quantized shards, their bytes cost stream_compute_per_byte_int8
    shape32 = ModelShape(2, 2, {4: 100, 32: 800}, fixed_bytes=10, scratch_bytes=5)
    dev8 = DeviceProfile(io_bandwidth=1e9, c1=1.0, stream_compute_per_byte=0.01, stream_compute_per_byte_int8=0.002,
                         int8_max_tokens=4, int8_shard={4: 1.0})
    tl = simulate([[4, 32], [4, 4]], shape32, dev8, 1)
    # layer 0: int8 shard 1 s + 0.2 s streaming, fp32 shard 1 s + 8 s; layer 1: 2 x 1.2 s
    assert [round(x.end - x.start, 9) for x in tl.layers] == [10.2, 2.4]
    tl = simulate([[4, 32], [4, 4]], shape32, dev8, 5)  # beyond int8_max_tokens: dequantized, 0.01 s per byte
    assert [round(x.end - x.start, 9) for x in tl.layers] == [5 + 1 + 5 + 8, 2 * (5 + 1)]


def test_what_the_milp_solver_prints_reaches_stderr_and_stdout_keeps_its_own(capfd):
    """HiGHS prints debugging lines to the process's stdout; the exact planner runs it with stdout
    moved to stderr (C and Python buffers flushed), so ``sti plan --json`` stays JSON."""
    import ctypes

    print("before")
    with plan_mod._stdout_to_stderr():
        os.write(1, b"written to fd 1\n")
        ctypes.CDLL(None).printf(b"printed by C\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "before\nafter\n"
    assert "written to fd 1" in err and "printed by C" in err


@pytest.mark.parametrize("method", ["heuristic", pytest.param("exact", marks=needs_scipy)])
def test_memory_a_plan_leaves_idle_goes_to_the_preload_at_the_same_loss(method, monkeypatch):
    """Both planners, after choosing bitwidths: streamed shards move into the preload buffer
    while the budget holds them and the modelled latency does not rise; the bitwidths and the
    loss stay, and with a loose deadline and a roomy budget the plan becomes faster (the
    heuristic's preload only had to meet T: 8 of these 8 instances; the MILP's 2)."""
    planner = plan_heuristic if method == "heuristic" else plan_exact
    faster = 0
    for seed in range(8):
        shape, imp, dev, n, T, M = instance(seed)
        dev = DeviceProfile(**{**dev.__dict__, "stream_compute_per_byte": 1e-9})  # every streamed byte costs
        T, M = T * 3, M * 3
        with monkeypatch.context() as m:
            m.setattr(plan_mod, "_fill_preload", lambda ctx, bits, pre, M: (set(pre), 0))
            before = planner(shape, imp, dev, T, M, n)
        after = planner(shape, imp, dev, T, M, n)
        assert fits(after, shape, dev)
        assert after.bits_matrix() == before.bits_matrix() and after.predicted_loss == before.predicted_loss
        assert set(map(tuple, before.preload)) <= set(map(tuple, after.preload))
        assert after.solver["preload_filled"] == len(after.preload) - len(before.preload)
        assert after.predicted_latency <= before.predicted_latency * (1 + TOL)
        faster += after.predicted_latency < before.predicted_latency * (1 - 1e-6)
    assert faster >= (6 if method == "heuristic" else 2), faster  # the MILP often preloads all it can already
