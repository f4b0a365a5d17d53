"""sti.lowbit: fused low-bit matrix-vector kernels (C) against the NumPy fallback, GGML
dequantization against the gguf package, and the kernel chooser. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import builtin_or_skip, exact_product

from sti import lowbit as lb
from sti import quant

needs_c = pytest.mark.skipif(not lb.has_c_kernels(), reason="sti._lowbit is not built (no C compiler)")
BOUND = 1e-5  # |y_c - y_numpy| <= BOUND * (|W| @ |x|), elementwise (sti/lowbit.py explains why)


def assert_close(y, y_ref, w, x):
    """The documented agreement: within BOUND of |W| @ |x| (float32 rounding, any summation order)."""
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    err = np.abs(y.astype(np.float64) - y_ref)
    assert np.all(err <= BOUND * scale + 1e-30), float(np.max(err / np.maximum(scale, 1e-30)))


def quantized(rng, shape, bits, group_size=64, outlier_frac=0.02):
    """A real quantizer output with plenty of outliers, as an sti-q1 LowBitTensor."""
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    q = quant.quantize(w, bits, group_size, outlier_frac=outlier_frac)
    assert q.n_outliers > 0 or shape[0] * shape[1] * outlier_frac < 0.5
    return lb.LowBitTensor.from_quantized(q)


# shapes: cols not a multiple of 64 (or of the group), a single row, groups of 8 and 24 columns
STI_CASES = [((576, 576), 64), ((37, 100), 64), ((13, 50), 24), ((9, 40), 8), ((1, 200), 128), ((70, 72), 16)]
GGML_SHAPES = [(576, 576), (37, 96), (5, 32), (1, 64)]


def sti_tensors(rng):
    for bits in quant.BITS:
        for shape, g in STI_CASES:
            yield f"sti-q1/{bits}/{shape}/{g}", quantized(rng, shape, bits, g)


def all_tensors(rng):
    yield from sti_tensors(rng)
    for kind in ("ggml-q4_1", "ggml-q8_0"):
        for shape in GGML_SHAPES:
            yield f"{kind}/{shape}", lb.random_tensor(kind, shape, seed=shape[0])


# --------------------------------------------------------------------------- dequantize


def test_dequantize_is_bit_identical_to_the_references(rng):
    for name, t in all_tensors(rng):
        ref = lb.dequantize_numpy(t)
        for threads in (1, 2):
            got = lb.dequantize(t, threads=threads)
            assert got.dtype == np.float32 and got.shape == t.shape
            assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), name


def test_sti_dequantize_matches_sti_quant(rng):
    w = (rng.standard_normal((30, 70)) * 0.1).astype(np.float32)
    for bits in quant.BITS:
        q = quant.quantize(w, bits, 16, outlier_frac=0.05)
        t = lb.LowBitTensor.from_quantized(q)
        assert np.array_equal(lb.dequantize(t).view(np.uint32), quant.dequantize_numpy(q).view(np.uint32))


@pytest.mark.parametrize("kind", ["ggml-q4_1", "ggml-q8_0"])
def test_ggml_dequantize_matches_gguf_on_arbitrary_blocks(rng, kind):
    """Every byte random, scales included: f16 subnormals, infinities and NaNs must convert as gguf does."""
    from gguf import GGMLQuantizationType, quants

    qtype = {"ggml-q4_1": GGMLQuantizationType.Q4_1, "ggml-q8_0": GGMLQuantizationType.Q8_0}[kind]
    rows, cols = 64, 256
    raw = rng.integers(0, 256, size=(rows, cols // 32 * lb.GGML[kind][1]), dtype=np.uint8)
    t = lb.LowBitTensor(kind, (rows, cols), raw)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and inf - inf make NaNs, as they should
        want = quants.dequantize(raw, qtype).astype(np.float32)
        got = lb.dequantize(t)
    np.testing.assert_array_equal(got, want)  # NaN == NaN here
    fin = np.isfinite(want)
    assert np.array_equal(got[fin].view(np.uint32), want[fin].view(np.uint32))


def test_dequantize_into_out_and_bad_out(rng):
    t = lb.random_tensor("ggml-q4_1", (8, 64))
    out = np.empty((8, 64), np.float32)
    assert lb.dequantize(t, out) is out
    for bad in (np.empty((8, 63), np.float32), np.empty((8, 64), np.float64), np.empty((64, 8), np.float32).T):
        with pytest.raises(ValueError):
            lb.dequantize(t, bad)


# --------------------------------------------------------------------------- matvec


@pytest.mark.parametrize("batch", [1, 2, 3, 16])
def test_matvec_matches_the_numpy_fallback(rng, batch):
    for name, t in all_tensors(rng):
        w = lb.dequantize_numpy(t)
        x = rng.standard_normal((batch, t.shape[1])).astype(np.float32)
        if batch == 1:
            x = x[0]
        y_ref = lb.matvec_numpy(t, x).astype(np.float64)
        for threads in (1, 2, 3):
            y = lb.matvec(t, x, threads=threads)
            assert y.shape == x.shape[:-1] + (t.shape[0],), name
            assert_close(y, y_ref, w, x)


def test_matvec_accumulates_into_out(rng):
    for name, t in all_tensors(rng):
        x = rng.standard_normal((4, t.shape[1])).astype(np.float32)
        base = rng.standard_normal((4, t.shape[0])).astype(np.float32)
        out = base.copy()
        assert lb.matvec(t, x, out, accumulate=True) is out
        w = lb.dequantize_numpy(t)
        assert_close(out - base, exact_product(t, x), w, x)
        out1 = base[0].copy()
        lb.matvec(t, x[0], out1, accumulate=True, threads=2)
        assert np.allclose(out1, out[0], rtol=0, atol=1e-5 * float(np.abs(out).max()))


def test_matvec_outliers_are_exact_even_when_huge(rng):
    """Outliers far outside their group's range must enter the product at their exact value."""
    w = (rng.standard_normal((20, 130)) * 0.01).astype(np.float32)
    w[3, 7], w[19, 129], w[0, 0] = 50.0, -80.0, 12.5
    for bits in quant.BITS:
        q = quant.quantize(w, bits, 64, outlier_frac=0.01)
        assert {3 * 130 + 7, 19 * 130 + 129, 0} <= set(q.outlier_idx.tolist())
        t = lb.LowBitTensor.from_quantized(q)
        x = rng.standard_normal(130).astype(np.float32)
        deq = lb.dequantize_numpy(t)
        assert_close(lb.matvec(t, x), x.astype(np.float64) @ deq.T.astype(np.float64), deq, x)


def test_matvec_accepts_lists_noncontiguous_and_duck_typed_tensors(rng):
    t = lb.random_tensor("sti-q1", (40, 96), bits=5)
    x = rng.standard_normal((3, 192)).astype(np.float32)[:, ::2]  # not contiguous
    y = lb.matvec(t, x)
    assert np.array_equal(y, lb.matvec(t, np.ascontiguousarray(x)))
    duck = SimpleNamespace(kind=t.kind, shape=t.shape, buf=t.buf, meta=t.meta)
    assert np.array_equal(lb.matvec(duck, x), y)
    assert np.array_equal(lb.matvec(t, x[0].tolist()), lb.matvec(t, np.ascontiguousarray(x[0])))


def test_matvec_rejects_bad_shapes():
    t = lb.random_tensor("ggml-q8_0", (16, 64))
    with pytest.raises(ValueError):
        lb.matvec(t, np.zeros(63, np.float32))
    with pytest.raises(ValueError):
        lb.matvec(t, np.zeros(64, np.float32), np.zeros(15, np.float32))
    with pytest.raises(ValueError):
        lb.matvec(t, np.zeros((2, 64), np.float32), np.zeros(16, np.float32))  # batch but a vector out
    with pytest.raises(ValueError):
        lb.matvec(t, np.zeros(64, np.float32), np.zeros(16, np.float64))
    with pytest.raises(ValueError):
        lb.matvec(t, np.zeros(64, np.float32), accumulate=True)


def test_tensor_validation():
    with pytest.raises(ValueError, match="kind"):
        lb.LowBitTensor("ggml-q5_0", (1, 32), bytes(22))
    with pytest.raises(ValueError, match="bytes"):
        lb.LowBitTensor("ggml-q4_1", (2, 64), bytes(79))
    with pytest.raises(ValueError, match="multiple of 32"):
        lb.LowBitTensor("ggml-q8_0", (1, 48), bytes(51))
    t = lb.random_tensor("sti-q1", (4, 64), bits=3)
    with pytest.raises(ValueError, match="shape"):
        lb.LowBitTensor("sti-q1", (4, 32), t.buf, t.meta)
    assert t.bits == 3 and lb.random_tensor("ggml-q4_1", (1, 32)).bits == 4
    assert lb.random_tensor("ggml-q8_0", (3, 64)).nbytes == 3 * 2 * 34


@needs_c
def _cut(full, P, row_bands):
    """``full`` cut into P contiguous column tiles (each its own buffer), reassembled as a TiledTensor
    of row_bands (row ranges) of those tiles."""
    rows, cols = full.shape
    raw = np.frombuffer(full._raw, np.uint8).reshape(rows, -1)
    tb = raw.shape[1] // P
    tiles = [lb.LowBitTensor(full.kind, (rows, cols // P), np.ascontiguousarray(raw[:, p * tb:(p + 1) * tb]).reshape(-1))
             for p in range(P)]
    return lb.TiledTensor([[lb.row_range(t, a, b) for t in tiles] for a, b in row_bands])


@pytest.mark.parametrize("kind", ["ggml-q4_1", "ggml-q8_0"])
@pytest.mark.parametrize("cols, P", [(576, 3), (96, 3), (192, 2), (128, 1)])  # 6, 1 (odd), 3 (odd), 4 blocks a tile
def test_a_tiled_matrix_multiplies_bit_for_bit_as_the_matrix_in_one_piece(rng, kind, cols, P):
    """Row bands from different buffers and rows cut into column tiles: the kernels read every tile
    in place and sum each row's blocks in the same chains as the contiguous matrix, so results are
    equal bitwise (not just close), on one thread or two, and so are the NumPy fallback's."""
    full = lb.random_tensor(kind, (150, cols), seed=1)
    t = _cut(full, P, [(0, 70), (70, 71), (71, 150)])
    assert t.shape == full.shape and t.kind == kind and t.bits == full.bits and t.nbytes == full.nbytes
    assert np.array_equal(np.frombuffer(t.buf, np.uint8), np.frombuffer(full._raw, np.uint8))
    for batch in (1, 3, 5, 16):
        x = rng.standard_normal((batch, cols)).astype(np.float32)
        want = lb.matvec(full, x)
        assert np.array_equal(lb.matvec(t, x), want)
        assert np.array_equal(lb.matvec(t, x, threads=2), want)
        assert np.array_equal(lb.matvec_numpy(t, x), lb.matvec_numpy(full, x))
        acc = np.ones_like(want)
        assert np.array_equal(lb.matvec(t, x, acc, accumulate=True), lb.matvec(full, x, np.ones_like(want), True))
    assert np.array_equal(lb.dequantize(t), lb.dequantize_numpy(full))
    assert np.array_equal(lb.dequantize(t, threads=2), lb.dequantize_numpy(full))


def test_tiled_tensor_validation():
    a = lb.random_tensor("ggml-q4_1", (8, 64))
    with pytest.raises(ValueError, match="one GGML kind"):
        lb.TiledTensor([[a], [lb.random_tensor("ggml-q8_0", (8, 64))]])
    with pytest.raises(ValueError, match="one GGML kind"):
        lb.TiledTensor([[lb.random_tensor("sti-q1", (8, 64))]])
    with pytest.raises(ValueError, match="tiles of 64 columns"):
        lb.TiledTensor([[a, a], [a]])
    with pytest.raises(ValueError, match="at least one band"):
        lb.TiledTensor([])
    with pytest.raises(ValueError, match="rows 4:9"):
        lb.row_range(a, 4, 9)
    if lb.has_c_kernels():  # the C constructor checks what it is given on its own
        from sti import _lowbit
        with pytest.raises(ValueError, match="outside its buffer"):
            _lowbit.tiled(0, 2, 64, [a._raw], np.array([0, 2]), np.array([[0, 250]]))  # 250 + 2 * 40 > 320 bytes
        with pytest.raises(ValueError, match="dividing the 2 blocks"):
            _lowbit.tiled(0, 1, 64, [a._raw], np.array([0, 1]), np.zeros((1, 3, 2), np.int64))
        with pytest.raises(ValueError, match="band 0 is empty"):
            _lowbit.tiled(0, 2, 64, [a._raw], np.array([0, 0, 2]), np.zeros((2, 1, 2), np.int64))
        with pytest.raises(ValueError, match="from 0 to 2 rows"):
            _lowbit.tiled(0, 2, 64, [a._raw], np.array([0, 1]), np.zeros((1, 1, 2), np.int64))


def test_concurrent_callers_share_the_pool_safely(rng):
    """Two Python threads asking for 2 threads each: one runs on the pool, the other alone."""
    t = lb.random_tensor("ggml-q4_1", (1024, 256))
    xs = [rng.standard_normal(256).astype(np.float32) for _ in range(4)]
    want = [lb.matvec(t, x) for x in xs]
    errors = []

    def worker(i):
        for _ in range(200):
            if not np.array_equal(lb.matvec(t, xs[i], threads=2), want[i]):
                errors.append(i)

    ths = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors


@needs_c
def test_late_helpers_tasks_are_taken_over(rng):
    """Helpers that sleep inside every task (as if preempted): the caller recomputes their tasks
    instead of waiting, results are unchanged, and the jobs they still hold are released later."""
    from sti import _lowbit

    t = lb.random_tensor("sti-q1", (2048, 200), bits=5)
    x = rng.standard_normal(200).astype(np.float32)
    xb = rng.standard_normal((3, 200)).astype(np.float32)
    want, want_b, w = lb.matvec(t, x), lb.matvec(t, xb), lb.dequantize(t)
    import time

    stolen0 = _lowbit._pool_state()["stolen_tasks"]
    _lowbit._test_helper_delay(3000)
    try:  # a helper must get a core to claim a task at all: on a loaded machine that can take a while
        for i in range(200):
            assert np.array_equal(lb.matvec(t, x, threads=2), want)
            assert np.array_equal(lb.matvec(t, xb, threads=2), want_b)
            out = np.ones(2048, np.float32)
            lb.matvec(t, x, out, accumulate=True, threads=2)
            assert np.allclose(out, 1 + want, rtol=0, atol=1e-6)  # (1 + Wx) + outliers: other rounding
            if i < 3:
                assert np.array_equal(lb.dequantize(t, threads=2), w)  # waits for its helpers instead
            if i >= 3 and _lowbit._pool_state()["stolen_tasks"] > stolen0:
                break
    finally:
        _lowbit._test_helper_delay(0)
    if _lowbit._pool_state()["stolen_tasks"] == stolen0:
        pytest.skip("no helper thread was scheduled in time to claim a task (machine too busy)")
    for _ in range(100):  # the late helpers finish their copies; the next call frees those jobs
        time.sleep(0.02)
        lb.matvec(t, x)
        if _lowbit._pool_state()["jobs_awaiting_release"] == 0:
            break
    assert _lowbit._pool_state()["jobs_awaiting_release"] == 0


@needs_c
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_works_in_a_forked_child(rng):
    t = lb.random_tensor("sti-q1", (512, 128), bits=4)
    x = rng.standard_normal(128).astype(np.float32)
    want = lb.matvec(t, x, threads=2)  # the pool has started
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = np.array_equal(lb.matvec(t, x, threads=2), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_numpy_fallback_when_c_is_disabled():
    code = (
        "import numpy as np\n"
        "from sti import lowbit as lb\n"
        "assert not lb.has_c_kernels() and lb.kernel_info()['simd'] is None\n"
        "t = lb.random_tensor('sti-q1', (10, 70), bits=3, group_size=16)\n"
        "x = np.arange(70, dtype=np.float32)\n"
        "assert np.array_equal(lb.matvec(t, x), lb.matvec_numpy(t, x))\n"
        "assert np.array_equal(lb.dequantize(t), lb.dequantize_numpy(t))\n"
        "X = np.stack([x, -x, x * 0.5])\n"
        "assert np.array_equal(lb.qmm(t, X), lb.qmm_numpy(t, X))\n"
        "from sti import quant\n"
        "p = quant.Program([('quant', 0, t.shape, t.meta)])\n"
        "out = np.zeros((3, 20), np.float32)\n"
        "lb.qmm_stack(X, out, [t.buf, t.buf], np.stack([p.prog[0]] * 2))\n"
        "assert np.array_equal(out, np.concatenate([lb.qmm_numpy(t, X)] * 2, axis=1))\n"
        "t4 = lb.random_tensor('sti-q1', (8, 70), bits=5, group_size=16)\n"
        "p4 = quant.Program([('quant', 0, t4.shape, t4.meta)])\n"
        "X4 = np.stack([np.arange(16, dtype=np.float32), -np.arange(16, dtype=np.float32)])\n"
        "y4 = lb.qmmt_stack(X4, np.zeros((2, 70), np.float32), [t4.buf] * 2, np.stack([p4.prog[0]] * 2))\n"
        "assert np.array_equal(y4, lb.qmmt_numpy([t4._q] * 2, X4))\n"
        "c = lb.choose('ggml-q4_1', (64, 64), batch=1, profile=lb.KernelProfile())\n"
        "assert c.method == 'dequant'\n"
    )
    env = dict(os.environ, STI_NO_C="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- a real GGUF


def test_smollm2_tensors_match_gguf(rng):
    from gguf import GGMLQuantizationType, quants

    from sti.loaders.gguf import read_gguf

    gf = read_gguf(builtin_or_skip("smollm2"))
    try:
        names = {"ggml-q4_1": "blk.0.ffn_down.weight", "ggml-q8_0": "token_embd.weight"}
        for kind, name in names.items():
            t = lb.from_gguf(gf, name)
            assert t.kind == kind
            raw = gf.raw(name)[:256]  # the first 256 rows (token_embd has 49152)
            part = lb.LowBitTensor(kind, (256, t.shape[1]), raw)
            qtype = GGMLQuantizationType.Q4_1 if kind == "ggml-q4_1" else GGMLQuantizationType.Q8_0
            want = quants.dequantize(raw, qtype).astype(np.float32)
            assert np.array_equal(lb.dequantize(part).view(np.uint32), want.view(np.uint32))
            x = rng.standard_normal((3, t.shape[1])).astype(np.float32)
            assert_close(lb.matvec(part, x, threads=2), exact_product(part, x), want, x)
        with pytest.raises(ValueError, match="Q4_1 and Q8_0"):
            lb.from_gguf(gf, "output_norm.weight")
    finally:
        gf.close()


# --------------------------------------------------------------------------- the chooser


def test_batch_bucket():
    assert [lb.batch_bucket(b) for b in (1, 2, 3, 4, 5, 16, 17, 100)] == [1, 2, 4, 4, 8, 16, 32, 128]
    with pytest.raises(ValueError):
        lb.batch_bucket(0)


def test_measure_choice_is_valid_and_runs(rng):
    c = lb.measure_choice("sti-q1", (96, 80), bits=3, batch=4, repeats=2)
    assert c.kind == "sti-q1" and c.shape == (96, 80) and c.bits == 3 and c.batch == 4
    assert c.method in lb.METHODS and c.threads in lb.thread_candidates()
    if lb.has_c_kernels():
        assert f"{c.method}/{c.threads}" in c.times_ms
        assert all(v > 0 for v in c.times_ms.values())
    t = lb.random_tensor("sti-q1", (96, 80), bits=3)
    x = rng.standard_normal((4, 80)).astype(np.float32)
    w = lb.dequantize_numpy(t)
    # int8 (qmm) multiplies x rounded to int8, the others float x
    want = lb.qmm_numpy(t, x) if c.method == "int8" else x.astype(np.float64) @ w.T.astype(np.float64)
    assert_close(c.matvec(t, x), want, w, x)


def test_both_methods_of_a_choice_agree(rng):
    t = lb.random_tensor("ggml-q4_1", (64, 96))
    x = rng.standard_normal((5, 96)).astype(np.float32)
    w = lb.dequantize_numpy(t)
    # "dequant" multiplies float x; "fused" rounds x to int16 blocks first
    want = {"dequant": x.astype(np.float64) @ w.T.astype(np.float64), "fused": exact_product(t, x)}
    for method in ("fused", "dequant"):  # int8 (qmm): test_qmm_of_ggml_blocks_matches_its_numpy_reference
        c = lb.KernelChoice("ggml-q4_1", (64, 96), 4, 8, method, 2)
        assert_close(c.matvec(t, x, scratch=np.empty((64, 96), np.float32)), want[method], w, x)


@pytest.mark.parametrize("kind", ["ggml-q4_1", "ggml-q8_0"])
def test_int16_activations_cost_far_less_than_the_weights_own_rounding(rng, kind):
    """The documented size of rounding x to int16 blocks: ~1e-5 of |W| @ |x|, against the 4-bit
    weights' own ~4e-3."""
    t = lb.random_tensor(kind, (576, 576), seed=3)
    w = lb.dequantize_numpy(t).astype(np.float64)
    x = rng.standard_normal((4, 576)).astype(np.float32)
    rel = np.abs(lb.matvec(t, x) - x @ w.T) / (np.abs(x) @ np.abs(w).T)
    assert np.median(rel) < 3e-5 and rel.max() < 3e-4
    q16, d16, xs = lb.quantize_acts(x)
    assert q16.dtype == np.int16 and np.abs(q16).max() == 32767  # each block's largest |x| maps to 32767
    assert np.allclose(xs, x.reshape(4, -1, 32).sum(-1), rtol=1e-5, atol=1e-5)
    zero = lb.quantize_acts(np.zeros((1, 64), np.float32))
    assert not zero[0].any() and not zero[1].any()


def test_profile_round_trips_and_is_consulted(tmp_path):
    d = lb.profile_kernels([("ggml-q8_0", (64, 64), None), ("sti-q1", (32, 80), 5)], batches=(1, 3), repeats=1)
    # four asked for, plus the Q8_0 batch's int8 decision on the reference shape
    assert d["schema"] == lb.PROFILE_SCHEMA and len(d["choices"]) == 5
    assert {tuple(c["shape"]) for c in d["choices"] if c["kind"] == "ggml-q8_0"} == {(64, 64), lb.INT8_REF_SHAPE}
    assert {"cpu", "cpus", "simd"} <= set(d["machine"])
    path = lb.save_profile(d, tmp_path / "profile" / "kernels.json")
    prof = lb.load_profile(path)
    assert prof.to_json() == json.loads(path.read_text())
    c = prof.get("sti-q1", (32, 80), 5, batch=3)
    assert c is not None and c.batch == 4 and c.bits == 5  # batch 3 is measured at its bucket, 4
    assert prof.get("sti-q1", (32, 80), 4, batch=3) is None  # another bitwidth
    # a recorded choice is returned as is, without measuring again
    fake = lb.KernelChoice("ggml-q4_1", (4096, 4096), 4, 1, "dequant", 2, {"dequant/2": 1.0})
    prof.add(fake)
    assert prof.choose("ggml-q4_1", (4096, 4096), batch=1) is fake
    assert lb.choose("ggml-q4_1", (4096, 4096), batch=1, profile=prof) is fake
    # a miss without measuring: the fused kernel, unmeasured
    miss = prof.choose("ggml-q4_1", (32, 32), batch=2, measure=False)
    assert miss.times_ms == {} and prof.get("ggml-q4_1", (32, 32), batch=2) is None
    prof.save(tmp_path / "again.json")
    assert lb.load_profile(tmp_path / "again.json").get("ggml-q4_1", (4096, 4096)) == fake


def test_profile_rejects_another_schema():
    with pytest.raises(ValueError, match="schema"):
        lb.KernelProfile.from_json({"schema": 999, "choices": []})


def test_choose_measures_a_miss_once():
    prof = lb.KernelProfile()
    a = lb.choose("ggml-q8_0", (48, 64), batch=2, profile=prof)
    assert prof.get("ggml-q8_0", (48, 64), batch=2) is a
    assert lb.choose("ggml-q8_0", (48, 64), batch=2, profile=prof) is a


def test_a_close_call_between_thread_counts_is_measured_once_more_in_a_later_process(monkeypatch):
    """One busy moment on the other core made a second thread look useless; a choice that close is
    timed again (its own method only) by the next process that uses it, the candidates keep their
    fastest medians, and then it stands."""
    asked = []

    def fake(kind, shape, bits=None, batch=1, repeats=5, threads=None, seed=0, methods=None):
        asked.append((tuple(shape), methods))
        return lb.KernelChoice(kind, shape, 4, batch, "fused", 2, {"fused/1": 0.12, "fused/2": 0.07})

    monkeypatch.setattr(lb, "measure_choice", fake)
    close = lb.KernelChoice("ggml-q4_1", (3072, 576), 4, 1, "fused", 1,
                            {"fused/1": 0.1157, "fused/2": 0.118, "dequant/1": 0.25})
    clear = lb.KernelChoice("ggml-q4_1", (960, 576), 4, 1, "fused", 2, {"fused/1": 0.038, "fused/2": 0.021})
    assert close.close_call() and not clear.close_call()
    assert close.doubtful() and not clear.doubtful()
    saved = lb.KernelProfile.from_json(lb.KernelProfile([close, clear]).to_json())  # as another process reads it
    assert saved.changes == 0
    c = saved.choose("ggml-q4_1", (3072, 576))
    assert asked == [((3072, 576), ("fused",))]
    assert (c.method, c.threads, c.rounds) == ("fused", 2, 2)
    assert c.times_ms == {"fused/1": 0.1157, "fused/2": 0.07, "dequant/1": 0.25}
    assert saved.changes == 1 and saved.get("ggml-q4_1", (3072, 576)) is c
    assert saved.choose("ggml-q4_1", (960, 576)) == clear and len(asked) == 1  # a clear win is not measured again
    again = lb.KernelProfile.from_json(saved.to_json())
    assert again.choose("ggml-q4_1", (3072, 576)).rounds == 2 and len(asked) == 1  # confirmed once only
    # a close call this process measured itself stands until another process uses it
    fresh = lb.KernelProfile()
    monkeypatch.setattr(lb, "measure_choice", lambda *a, **k: (asked.append("fresh"), close)[1])
    assert fresh.choose("ggml-q4_1", (3072, 576)) is close
    assert fresh.choose("ggml-q4_1", (3072, 576)) is close and asked.count("fresh") == 1
    # a method never changes by confirmation, only the thread count
    deq = lb.KernelChoice("ggml-q4_1", (64, 64), 4, 1, "dequant", 1, {"dequant/1": 1.0, "dequant/2": 1.05})
    assert deq.confirmed(lb.KernelChoice("ggml-q4_1", (64, 64), 4, 1, "dequant", 2, {"dequant/2": 0.5})).threads == 2


def test_fewer_threads_winning_by_any_margin_is_measured_once_more_in_a_later_process(monkeypatch):
    """One thread beating two by more than a close call is still doubtful (the other core may
    have been busy): the next process times it again, and the candidates keep their fastest
    medians. A clear win of more threads, or a single thread count timed, is not doubtful."""
    one = lb.KernelChoice("ggml-q4_1", (576, 1536), 4, 16, "int8", 1, {"int8/1": 0.179, "int8/2": 0.226})
    assert one.doubtful() and not one.close_call()
    assert not lb.KernelChoice("ggml-q4_1", (576, 1536), 4, 16, "int8", 2, {"int8/1": 0.19, "int8/2": 0.13}).doubtful()
    assert not lb.KernelChoice("ggml-q4_1", (64, 64), 4, 1, "fused", 1, {"fused/1": 0.01}).doubtful()
    # fewer threads of another method do not make a choice doubtful
    assert not lb.KernelChoice("ggml-q4_1", (64, 64), 4, 16, "int8", 2,
                               {"int8/2": 0.01, "int8/1": 0.02, "dequant/1": 0.05}).doubtful()
    asked = []

    def fake(kind, shape, bits=None, batch=1, repeats=5, threads=None, seed=0, methods=None):
        asked.append((tuple(shape), batch, methods))
        return lb.KernelChoice(kind, shape, 4, batch, "int8", 2, {"int8/1": 0.193, "int8/2": 0.127})

    monkeypatch.setattr(lb, "measure_choice", fake)
    saved = lb.KernelProfile.from_json(lb.KernelProfile([one]).to_json())
    c = saved.choose("ggml-q4_1", (576, 1536), batch=16)
    assert asked == [((576, 1536), 16, ("int8",))]
    assert (c.method, c.threads, c.rounds) == ("int8", 2, 2)
    assert c.times_ms == {"int8/1": 0.179, "int8/2": 0.127}
    assert lb.KernelProfile.from_json(saved.to_json()).choose("ggml-q4_1", (576, 1536), batch=16).threads == 2
    assert len(asked) == 1


def test_empty_matrices():
    for shape in [(0, 64), (3, 0)]:
        t = lb.LowBitTensor("ggml-q4_1", shape, bytes(0))
        x = np.ones((2, shape[1]), np.float32)
        assert np.array_equal(lb.matvec(t, x, threads=2), np.zeros((2, shape[0]), np.float32))
        assert lb.dequantize(t).shape == shape and lb.matvec_numpy(t, x[0]).shape == (shape[0],)


# --------------------------------------------------------------------------- int8 products (qmm)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("shape,group_size", STI_CASES)
@pytest.mark.parametrize("batch", [2, 16, 17, 40])
def test_qmm_matches_its_numpy_reference(rng, bits, shape, group_size, batch):
    """Every width, ragged groups, batches around the 16-lane vectors, outliers; 1 and 2 threads."""
    check_qmm(quantized(rng, shape, bits, group_size), rng.standard_normal((batch, shape[1])).astype(np.float32))


def check_qmm(t, x) -> tuple[np.ndarray, np.ndarray]:
    """qmm equals its NumPy reference on 1 and 2 threads, and with accumulate; (reference, W)."""
    want = lb.qmm_numpy(t, x).astype(np.float64)
    w = lb.dequantize_numpy(t)
    for threads in (1, 2):
        assert_close(lb.qmm(t, x, threads=threads), want, w, x)
    out = np.ones((x.shape[0], t.shape[0]), np.float32)
    lb.qmm(t, x, out, accumulate=True, threads=2)
    assert_close(out - 1, want, w, x)
    return want, w


def test_qmm_rounds_x_to_int8_within_the_stated_bound(rng):
    """|qmm - x @ W.T| <= sum over groups of dx / 2 * sum |W| (+ float32 slack), and the bound is
    not vacuous: the error is of the order it predicts, with x's outlier column in one group."""
    t = quantized(rng, (96, 192), 4, 64)
    w = lb.dequantize_numpy(t).astype(np.float64)
    x = rng.standard_normal((20, 192)).astype(np.float32)
    x[:, 5] *= 30  # an activation outlier coarsens its group's steps only
    q, dx, xs = lb.quantize_acts_i8(x, 64)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    assert np.array_equal(xs, dx * q.sum(-1, dtype=np.int32).astype(np.float32))  # the sum of the rounded x
    bound = (dx[:, None, :] / 2 * np.abs(w).reshape(96, 3, 64).sum(-1)[None]).sum(-1)  # (B, rows)
    y = lb.qmm(t, x)
    err = np.abs(y - x.astype(np.float64) @ w.T)
    assert np.all(err <= bound + 1e-5 * (np.abs(x) @ np.abs(w).T))
    assert err.max() > 0.05 * bound.max()


def test_qmm_error_is_that_of_rounding_x_for_affine_blocks(rng):
    """Q4_1 stores W = d * code + m with m about -8 d: the error must be W (x - x_rounded), not
    d * code (x - x_rounded), which is about twice as large."""
    t = lb.random_tensor("ggml-q4_1", (256, 576), seed=7)
    w = lb.dequantize_numpy(t).astype(np.float64)
    x = rng.standard_normal((16, 576)).astype(np.float32)
    x[:, 247] *= 15  # one outlier channel, as a LLaMA hidden state has
    q, dx, _ = lb.quantize_acts_i8(x, 32)
    xr = (q.astype(np.float64) * dx[..., None]).reshape(16, 576)
    y = lb.qmm(t, x)
    assert_close(y, xr @ w.T, w, x)  # W times the rounded x, offsets included
    exact = x.astype(np.float64) @ w.T
    codes_only = np.linalg.norm((w - lb.ggml_affine(t).offset.repeat(32, axis=1)) @ (xr - x).T)
    assert np.linalg.norm(y - exact) < 0.75 * codes_only  # the error the exact sums of x gave


@pytest.mark.parametrize("kind", ["ggml-q4_1", "ggml-q8_0"])
@pytest.mark.parametrize("shape", GGML_SHAPES)
@pytest.mark.parametrize("batch", [2, 16, 17])
def test_qmm_of_ggml_blocks_matches_its_numpy_reference(rng, kind, shape, batch):
    """GGML blocks in the int8 products: blocks of 32 as the groups, Q4_1's nibbles and Q8_0's
    q + 128 as the unsigned codes; C equals the reference on 1 and 2 threads, with accumulate."""
    x = rng.standard_normal((batch, shape[1])).astype(np.float32)
    want, w = check_qmm(lb.random_tensor(kind, shape, seed=shape[0]), x)
    err = np.abs(want - x.astype(np.float64) @ w.astype(np.float64).T)  # the int8 rounding of x
    assert err.max() <= 0.02 * (np.abs(x) @ np.abs(w).T).max()


@pytest.mark.parametrize("kind", ["ggml-q4_1", "ggml-q8_0"])
def test_ggml_affine_form_is_the_blocks_weights(kind):
    t = lb.random_tensor(kind, (40, 96), seed=3)
    q = lb.ggml_affine(t)
    w = quant.dequantize_numpy(q)  # code * scale + offset, two float32 roundings, as GGML's Q4_1
    if kind == "ggml-q4_1":
        assert np.array_equal(w, lb.dequantize_numpy(t))
    else:  # d * (q + 128) - 128 d against d * q: one rounding apart
        np.testing.assert_allclose(w, lb.dequantize_numpy(t), rtol=0, atol=1e-6 * np.abs(lb.dequantize_numpy(t)).max())


@pytest.mark.parametrize("kind", ["ggml-q4_1", "ggml-q8_0"])
def test_qmm_reads_a_tiled_matrix_as_the_matrix_in_one_piece(rng, kind):
    full = lb.random_tensor(kind, (150, 192), seed=1)
    t = _cut(full, 2, [(0, 70), (70, 71), (71, 150)])
    x = rng.standard_normal((16, 192)).astype(np.float32)
    assert np.array_equal(lb.qmm(t, x, threads=2), lb.qmm(full, x))
    assert np.array_equal(lb.qmm_numpy(t, x), lb.qmm_numpy(full, x))


def test_the_int8_choice_is_for_batches(rng):
    with pytest.raises(ValueError, match="int8"):
        lb.KernelChoice("ggml-q4_1", (32, 64), 4, 1, "int8", 1)
    s = quantized(rng, (48, 64), 3)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    c = lb.KernelChoice("sti-q1", (48, 64), 3, 4, "int8", 2)
    assert_close(c.matvec(s, x), lb.qmm_numpy(s, x).astype(np.float64), lb.dequantize_numpy(s), x)
    g = lb.random_tensor("ggml-q4_1", (32, 64))
    c = lb.KernelChoice("ggml-q4_1", (32, 64), 4, 4, "int8", 1)
    assert_close(c.matvec(g, x), lb.qmm_numpy(g, x).astype(np.float64), lb.dequantize_numpy(g), x)


def test_measure_choice_times_int8_for_batches_only():
    if not lb.has_c_kernels():
        pytest.skip("sti._lowbit is not built: nothing is timed")
    for kind in ("sti-q1", "ggml-q4_1"):
        c = lb.measure_choice(kind, (64, 128), bits=4, batch=8, repeats=1)
        assert any(k.startswith("int8/") for k in c.times_ms)
        c = lb.measure_choice(kind, (64, 128), bits=4, batch=1, repeats=1)
        assert not any(k.startswith("int8/") for k in c.times_ms)
    c = lb.measure_choice("ggml-q4_1", (64, 128), batch=8, repeats=1, methods=("fused",))
    assert c.method == "fused" and all(k.startswith("fused/") for k in c.times_ms)
    for bad in ((), ("int4",), ("int8",)):
        with pytest.raises(ValueError, match="methods"):
            lb.measure_choice("ggml-q4_1", (64, 128), batch=8 if bad != ("int8",) else 1, methods=bad)


@pytest.mark.parametrize("ref", ["int8", "fused"])
def test_lossless_kinds_follow_one_int8_decision_per_batch(monkeypatch, ref):
    """Every shape of a GGML kind runs int8 at a batch size exactly when the reference shape
    measured int8 fastest there (so resident and streamed engines never mix int8 and float
    products of the lossless weights); sti-q1 shapes decide for themselves; batch 1 never int8."""
    asked = []

    def fake(kind, shape, bits=None, batch=1, repeats=5, threads=None, seed=0, methods=None):
        asked.append((kind, tuple(shape), batch, methods))
        methods = methods or lb.METHODS
        m = ref if tuple(shape) == lb.INT8_REF_SHAPE else ("int8" if "int8" in methods and batch > 1 else "fused")
        m = m if m in methods and (m != "int8" or batch > 1) else methods[0]
        return lb.KernelChoice(kind, shape, lb._key(kind, shape, bits, batch)[3], lb.batch_bucket(batch), m, 1)

    monkeypatch.setattr(lb, "measure_choice", fake)
    prof = lb.KernelProfile()
    assert prof.int8("ggml-q4_1", 16) is None  # nothing measured yet
    for shape in ((960, 576), (512, 576), (576, 1536)):
        assert prof.choose("ggml-q4_1", shape, batch=16).method == ref
    assert prof.int8("ggml-q4_1", 16) is (ref == "int8")
    assert prof.choose("ggml-q4_1", lb.INT8_REF_SHAPE, batch=16).method == ref
    assert [a for a in asked if a[1] == lb.INT8_REF_SHAPE] == [("ggml-q4_1", lb.INT8_REF_SHAPE, 16, None)]  # once
    allowed = ("int8",) if ref == "int8" else ("fused", "dequant")
    assert all(a[3] == allowed for a in asked if a[1] != lb.INT8_REF_SHAPE)
    assert prof.choose("ggml-q4_1", (960, 576), batch=1).method == "fused"
    assert prof.choose("sti-q1", (960, 576), bits=2, batch=16).method == "int8"  # its own measurement
    assert prof.int8("sti-q1", 16) is None


# --------------------------------------------------------------------------- int8 products of stacked matrices


def shard_file(rng, parts):
    """One buffer holding several quantized tensors at 64-byte offsets, as a shard file does, and the
    rows of their decode program: parts = [(rows, cols, bits, group_size), ...]."""
    blobs, entries, at = [], [], 0
    for rows, cols, bits, g in parts:
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        q = quant.quantize(w, bits, g, outlier_frac=0.02)
        b = quant.to_bytes(q)
        blobs.append(b + bytes(-len(b) % 64))
        entries.append(("quant", at, q.shape, q.meta()))
        at += len(blobs[-1])
    return b"".join(blobs), quant.Program(entries)


@pytest.mark.parametrize("batch", [1, 3, 16, 33])
def test_qmm_stack_is_qmm_of_each_matrix_side_by_side(rng, batch):
    """Matrices from two buffers (different bitwidths and heights, outliers), stacked in any order,
    equal each matrix's own qmm in its columns; accumulate adds; 1 and 2 threads."""
    a, pa = shard_file(rng, [(32, 100, 2, 16), (7, 100, 8, 16)])
    b, pb = shard_file(rng, [(40, 100, 5, 16)])
    bufs, prog = [b, a, a], np.stack([pb.prog[0], pa.prog[1], pa.prog[0]])
    mats = [lb.LowBitTensor.from_quantized(p.tensor(buf, i)) for buf, p, i in ((b, pb, 0), (a, pa, 1), (a, pa, 0))]
    x = rng.standard_normal((batch, 100)).astype(np.float32)
    want = np.concatenate([lb.qmm_numpy(m, x) for m in mats], axis=1).astype(np.float64)
    w = np.concatenate([lb.dequantize_numpy(m) for m in mats])
    for threads in (1, 2):
        out = np.empty((batch, 79), np.float32)
        assert_close(lb.qmm_stack(x, out, bufs, prog, threads=threads), want, w, x)
    out = np.ones((batch, 79), np.float32)
    lb.qmm_stack(x, out, bufs, prog, accumulate=True, threads=2)
    assert_close(out - 1, want, w, x)


def test_matvec_stack_and_cols_are_each_matrixs_own_matvec(rng):
    """One vector through stacked matrices (mixed bitwidths and heights, outliers): matvec_stack
    equals each matrix's own matvec side by side, and matvec_cols the sum in matrix order of each
    one's matvec of its slice of x, bit for bit, on 1 to 3 threads and accumulating; the C kernels
    and the NumPy fallback alike. Batches are refused: they take qmm_stack / qmm_cols."""
    a, pa = shard_file(rng, [(32, 100, 2, 16), (7, 100, 8, 16)])
    b, pb = shard_file(rng, [(40, 100, 5, 16)])
    bufs, prog = [b, a, a], np.stack([pb.prog[0], pa.prog[1], pa.prog[0]])
    mats = [lb.LowBitTensor.from_quantized(p.tensor(buf, i)) for buf, p, i in ((b, pb, 0), (a, pa, 1), (a, pa, 0))]
    x = rng.standard_normal(100).astype(np.float32)
    want = np.concatenate([lb.matvec(m, x) for m in mats])
    for threads in (1, 2, 3):
        assert np.array_equal(lb.matvec_stack(x, np.empty(79, np.float32), bufs, prog, threads=threads), want)
    assert np.array_equal(lb.matvec_stack(x, np.ones(79, np.float32), bufs, prog, accumulate=True, threads=2),
                          np.concatenate([lb.matvec(m, x, np.ones(m.shape[0], np.float32), accumulate=True)
                                          for m in mats]))
    c, pc = shard_file(rng, [(40, 64, 2, 16), (40, 48, 4, 16), (40, 80, 3, 16)])
    cols = [lb.LowBitTensor.from_quantized(pc.tensor(c, i)) for i in range(3)]
    xc = rng.standard_normal((1, 192)).astype(np.float32)
    for acc in (False, True):
        ref = np.full((1, 40), 0.5, np.float32)
        for k, (m, lo) in enumerate(zip(cols, (0, 64, 112))):
            lb.matvec(m, xc[:, lo:lo + m.shape[1]], ref, accumulate=acc or k > 0)
        for threads in (1, 2, 3):
            out = np.full((1, 40), 0.5, np.float32)
            assert np.array_equal(lb.matvec_cols(xc, out, [c] * 3, pc.prog, accumulate=acc, threads=threads), ref)
    if lb.has_c_kernels():
        with pytest.raises(ValueError, match="one vector"):
            lb.matvec_stack(np.zeros((2, 100), np.float32), np.zeros((2, 79), np.float32), bufs, prog)


@needs_c
def test_qmm_stack_refuses_what_it_cannot_read(rng):
    a, pa = shard_file(rng, [(8, 64, 4, 16), (8, 48, 4, 16)])
    x, out = np.zeros((2, 64), np.float32), np.zeros((2, 8), np.float32)
    row = pa.prog[0].copy()
    with pytest.raises(ValueError, match="columns"):
        lb.qmm_stack(x, np.zeros((2, 16), np.float32), [a, a], pa.prog)
    with pytest.raises(ValueError, match="outside"):
        lb.qmm_stack(x, out, [a[:200]], row[None])
    bad = row.copy()
    bad[0] = 1
    with pytest.raises(ValueError, match="not quantized"):
        lb.qmm_stack(x, out, [a], bad[None])
    q = pa.tensor(a, 0)
    assert q.n_outliers >= 2
    swapped = bytearray(a)  # two outlier indices out of order
    i0 = int(row[8])
    swapped[i0:i0 + 8] = a[i0 + 4:i0 + 8] + a[i0:i0 + 4]
    with pytest.raises(ValueError, match="ascend"):
        lb.qmm_stack(x, out, [bytes(swapped)], row[None])
    with pytest.raises(ValueError, match="out must be"):
        lb.qmm_stack(x, np.zeros((2, 9), np.float32), [a], row[None])


@pytest.mark.parametrize("batch", [1, 16, 17, 40])
@pytest.mark.parametrize("group_size,cols", [(64, 384), (16, 100), (8, 40)])
def test_qmmt_stack_matches_its_numpy_reference(rng, batch, group_size, cols):
    """Input-major matrices stacked along their rows (x's columns): items of 4 to 36 rows, every
    bitwidth, outliers, ragged output groups; 1 and 2 threads; accumulate."""
    a, pa = shard_file(rng, [(36, cols, 2, group_size), (4, cols, 8, group_size), (32, cols, 5, group_size)])
    b, pb = shard_file(rng, [(12, cols, 3, group_size), (8, cols, 4, group_size), (20, cols, 6, group_size)])
    items = [(a, pa, 0), (b, pb, 1), (a, pa, 1), (b, pb, 0), (a, pa, 2), (b, pb, 2)]
    bufs, prog = [buf for buf, _, _ in items], np.stack([p.prog[i] for _, p, i in items])
    qs = [p.tensor(buf, i) for buf, p, i in items]
    w = np.concatenate([quant.dequantize_numpy(q) for q in qs])  # (N, cols), N = 112
    x = rng.standard_normal((batch, w.shape[0])).astype(np.float32)
    want = lb.qmmt_numpy(qs, x).astype(np.float64)
    bound = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    for threads in (1, 2):
        got = lb.qmmt_stack(x, np.empty((batch, cols), np.float32), bufs, prog, threads=threads)
        assert np.all(np.abs(got - want) <= BOUND * bound)
    out = np.ones((batch, cols), np.float32)
    lb.qmmt_stack(x, out, bufs, prog, accumulate=True)
    assert np.all(np.abs(out - 1 - want) <= BOUND * bound + 1e-6)
    # against the float product: the int8 rounding of x * scale, blocks of 32 inputs of one item
    err = np.abs(want - x.astype(np.float64) @ w)
    assert err.max() <= 0.02 * bound.max() and err.max() > 0


@pytest.mark.parametrize("batch", [1, 17, 128])
def test_qmmt_stack_gives_the_same_bits_on_any_number_of_threads(rng, batch):
    """Its preparation (code words, x rounded per output group) and its tiles run on the pool's
    threads; every output column is one task's sum, so the threads change no bit, with or
    without accumulate. Shards as an encoder chunk's down projection: 128-row items, outliers."""
    a, pa = shard_file(rng, [(128, 384, 4, 64), (128, 384, 8, 64), (128, 384, 2, 64)])
    bufs, prog = [a] * 6, np.stack([pa.prog[i] for i in (0, 1, 2, 2, 1, 0)])
    x = rng.standard_normal((batch, 6 * 128)).astype(np.float32)
    want = lb.qmmt_stack(x, np.empty((batch, 384), np.float32), bufs, prog, threads=1)
    base = rng.standard_normal((batch, 384)).astype(np.float32)
    want_acc = lb.qmmt_stack(x, base.copy(), bufs, prog, accumulate=True, threads=1)
    for threads in (2, 3):
        got = lb.qmmt_stack(x, np.empty((batch, 384), np.float32), bufs, prog, threads=threads)
        assert np.array_equal(got, want)
        assert np.array_equal(lb.qmmt_stack(x, base.copy(), bufs, prog, accumulate=True, threads=threads), want_acc)


def test_qmmt_numpy_rounding_stays_within_its_bound(rng):
    """|qmmt - x @ W| <= sum over blocks of dz / 2 * sum of the block's codes (+ float32 slack),
    with z = x * scale of the output group; an activation outlier coarsens its block only."""
    a, pa = shard_file(rng, [(64, 128, 4, 64)])
    q = pa.tensor(a, 0)
    w = quant.dequantize_numpy(q).astype(np.float64)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    x[:, 3] *= 40
    codes = quant.unpack_codes(q.codes, q.bits).reshape(64, -1)[:, :128].astype(np.float64)
    bound = np.zeros((5, 128))
    for g in range(2):
        z = (x * q.scale[:, g][None]).reshape(5, 2, 32)
        dz = np.abs(z).max(-1) / 127  # (5, blocks)
        csum = codes[:, g * 64:(g + 1) * 64].reshape(2, 32, 64).sum(1)  # (blocks, 64)
        bound[:, g * 64:(g + 1) * 64] = dz / 2 @ csum
    err = np.abs(lb.qmmt_numpy([q], x) - x.astype(np.float64) @ w)
    assert np.all(err <= bound + 1e-5 * (np.abs(x) @ np.abs(w)))
    assert err.max() > 0.05 * bound.max()


@needs_c
def test_qmmt_stack_needs_rows_in_fours(rng):
    a, pa = shard_file(rng, [(6, 64, 4, 16)])
    with pytest.raises(ValueError, match="multiples of 4"):
        lb.qmmt_stack(np.zeros((2, 6), np.float32), np.zeros((2, 64), np.float32), [a], pa.prog)
