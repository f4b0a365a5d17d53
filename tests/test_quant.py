"""sti.quant: bit packing, the outlier-aware quantizer, the serialized layout, and the C
dequantization kernel's bit-identity with the NumPy reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sti import quant as Q

try:
    from sti import _kernels
except ImportError:  # pragma: no cover - depends on the build
    _kernels = None

needs_c = pytest.mark.skipif(_kernels is None, reason="sti._kernels not built (no C compiler at install time)")

ODD_SHAPES = [(1, 1), (3, 70), (5, 13), (2, 64), (4, 129), (7, 200)]


def bits_of(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def random_qt(rng, bits, shape, group_size, n_out=5) -> Q.QuantizedTensor:
    """A QuantizedTensor with arbitrary codes (padding included), scales spanning many binades
    (subnormal ones too), signed offsets and outliers: exercises the kernels beyond quantize()'s output."""
    rows, cols = shape
    ng = -(-cols // group_size)
    codes = rng.integers(0, 1 << bits, rows * ng * group_size).astype(np.uint8)
    scale = (rng.lognormal(-4, 3, (rows, ng)) * rng.choice([1, -1], (rows, ng))).astype(np.float32)
    scale.reshape(-1)[:2] = np.float32(1e-41)  # subnormal: no flush-to-zero on either path
    offset = rng.standard_normal((rows, ng)).astype(np.float32)
    n_out = min(n_out, rows * cols)
    idx = np.sort(rng.choice(rows * cols, n_out, replace=False)).astype(np.uint32)
    return Q.QuantizedTensor(bits, shape, group_size, Q.pack_codes(codes, bits), scale, offset, idx,
                             rng.standard_normal(n_out).astype(np.float32))


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", Q.BITS)
def test_pack_layout_is_little_endian_runs_of_8(bits, rng):
    codes = rng.integers(0, 1 << bits, 8 * 50).astype(np.uint8)
    packed = Q.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == 50 * bits
    for run in range(50):  # the spec, literally: code i at bits k*i .. k*i+k-1 of a little-endian integer
        v = sum(int(c) << (bits * i) for i, c in enumerate(codes[8 * run: 8 * run + 8]))
        assert packed[bits * run: bits * run + bits].tobytes() == v.to_bytes(bits, "little")
    assert np.array_equal(Q.unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_quantize_round_trip_odd_shapes(bits, shape, rng):
    w = rng.standard_normal(shape).astype(np.float32)
    q = Q.quantize(w, bits, group_size=16)
    assert q.codes.size == shape[0] * q.padded_cols * bits // 8
    assert q.scale.shape == q.offset.shape == (shape[0], -(-shape[1] // 16))
    codes = Q.unpack_codes(q.codes, bits).reshape(shape[0], q.padded_cols)
    assert codes.max() < (1 << bits)
    assert np.array_equal(Q.unpack_codes(Q.pack_codes(codes, bits), bits).reshape(codes.shape), codes)
    d = Q.dequantize_numpy(q)
    assert d.shape == shape and d.dtype == np.float32 and d.flags.c_contiguous


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        Q.pack_codes(np.zeros(7, np.uint8), 4)
    with pytest.raises(ValueError):
        Q.pack_codes(np.zeros(8, np.uint8), 7)
    with pytest.raises(ValueError, match="does not fit"):
        Q.pack_codes(np.full(8, 8, np.uint8), 3)
    with pytest.raises(ValueError):
        Q.unpack_codes(np.zeros(4, np.uint8), 3)


def test_empty_shapes():
    for shape in [(0, 5), (3, 0)]:
        q = Q.quantize(np.zeros(shape, np.float32), 4)
        assert Q.dequantize(q).shape == shape
        assert Q.from_buffer(Q.to_bytes(q), q.meta()).shape == shape


# --------------------------------------------------------------------------- C kernel


@needs_c
@pytest.mark.parametrize("bits", Q.BITS)
def test_c_kernel_bit_identical_to_numpy(bits, rng):
    # cols not multiples of 8 or of G; several groups per unpacked block, and groups split across blocks
    for shape, gs in [((3, 70), 8), ((5, 13), 64), ((4, 129), 64), ((6, 384), 64), ((2, 700), 512), ((3, 1000), 264),
                      ((2, 2100), 2056), ((1, 5000), 4096)]:  # groups longer than the kernel's 2048-code block
        q = random_qt(rng, bits, shape, gs)
        ref = Q.dequantize_numpy(q)
        out = Q.dequantize(q)
        assert np.array_equal(bits_of(out), bits_of(ref)), (bits, shape, gs)
        raw = np.full(shape, np.nan, np.float32)  # the kernel alone, before outliers
        _kernels.dequant(q.codes, bits, q.scale, q.offset, gs, shape[0], shape[1], raw)
        unpacked = Q.unpack_codes(q.codes, bits).reshape(shape[0], -1, gs).astype(np.float32)
        expect = (unpacked * q.scale[:, :, None] + q.offset[:, :, None]).reshape(shape[0], -1)[:, : shape[1]]
        assert np.array_equal(bits_of(raw), bits_of(expect))


@needs_c
@pytest.mark.parametrize("bits", Q.BITS)
def test_c_kernel_identical_on_quantized_weights(bits, rng):
    w = (rng.standard_t(4, (48, 200)) * 0.05).astype(np.float32)
    q = Q.quantize(w, bits)
    assert np.array_equal(bits_of(Q.dequantize(q)), bits_of(Q.dequantize_numpy(q)))


@needs_c
def test_c_kernel_rejects_bad_buffers(rng):
    q = random_qt(rng, 4, (4, 100), 64)
    args = dict(codes=q.codes, bits=4, scale=q.scale, offset=q.offset, gs=64, rows=4, cols=100,
                out=np.empty((4, 100), np.float32))

    def call(**kw):
        a = {**args, **kw}
        _kernels.dequant(a["codes"], a["bits"], a["scale"], a["offset"], a["gs"], a["rows"], a["cols"], a["out"])

    call()
    bad = [dict(codes=q.codes[:-1]), dict(scale=q.scale.reshape(-1)[:-1]), dict(offset=q.offset.reshape(-1)[1:]),
           dict(out=np.empty((4, 99), np.float32)), dict(out=np.empty((4, 100), np.float64)), dict(bits=7),
           dict(bits=1), dict(gs=60), dict(gs=0), dict(rows=5), dict(cols=101), dict(rows=-1),
           dict(out=np.empty((4, 100), np.int16))]
    for kw in bad:
        with pytest.raises(ValueError):
            call(**kw)
    with pytest.raises((TypeError, ValueError, BufferError)):
        call(out=bytes(1600))  # read-only
    with pytest.raises(ValueError, match="codes has"):
        call(codes=q.codes[:-1])


# --------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("clip", [False, True])
def test_error_bounds_and_exact_outliers(bits, clip, rng):
    w = (rng.standard_t(3, (32, 150)) * 0.05).astype(np.float32)
    q = Q.quantize(w, bits, group_size=64, outlier_frac=0.01, clip=clip)
    d = Q.dequantize(q)
    idx = q.outlier_idx.astype(np.int64)
    assert q.n_outliers == round(0.01 * w.size)
    assert np.array_equal(np.sort(idx), idx)
    assert np.array_equal(d.reshape(-1)[idx], w.reshape(-1)[idx])  # outliers exact
    col_group = np.arange(w.shape[1]) // 64
    s = q.scale[:, col_group].astype(np.float64)  # (rows, cols) per-element scale
    lo = q.offset[:, col_group].astype(np.float64)
    hi = lo + ((1 << bits) - 1) * s
    w64 = w.astype(np.float64)
    outside = np.maximum(lo - w64, 0) + np.maximum(w64 - hi, 0)  # distance to the representable range
    tol = 8 * np.finfo(np.float32).eps * (np.abs(w64) + np.abs(lo) + np.abs(hi))
    err = np.abs(d - w64)
    bound = np.maximum(s / 2, outside) + tol
    mask = np.ones(w.size, bool)
    mask[idx] = False
    assert (err.reshape(-1)[mask] <= bound.reshape(-1)[mask]).all()
    if not clip:  # the range is the group's min..max of non-outliers: every error is within half a step
        assert (outside.reshape(-1)[mask] <= tol.reshape(-1)[mask]).all()
        assert (err.reshape(-1)[mask] <= (s / 2 + tol).reshape(-1)[mask]).all()


def test_outlier_excluded_from_group_range(rng):
    w = (rng.standard_normal((4, 128)) * 0.01).astype(np.float32)
    w[2, 70] = 5.0
    q = Q.quantize(w, 4, outlier_frac=1 / w.size, clip=False)
    assert q.outlier_idx.tolist() == [2 * 128 + 70]
    assert q.scale[2, 1] < 0.01  # the 5.0 did not stretch its group's range
    d = Q.dequantize(q)
    assert d[2, 70] == np.float32(5.0)
    assert np.abs(d - w).max() < 0.01


@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_error_decreases_with_bits(dist, rng):
    w = rng.standard_normal((64, 256)) if dist == "normal" else rng.standard_t(3, (64, 256))
    w = (w * 0.05).astype(np.float32)
    errs = [Q.error_stats(w, Q.quantize(w, b))["rel_fro"] for b in Q.BITS]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.01


def test_outliers_and_clipping_beat_plain_groupwise(rng):
    w = (rng.standard_t(3, (64, 256)) * 0.05).astype(np.float32)
    for b in (2, 3, 4):
        sti = Q.error_stats(w, Q.quantize(w, b))["rel_fro"]
        plain = Q.error_stats(w, Q.quantize(w, b, outlier_frac=0, clip=False))["rel_fro"]
        assert sti < plain


def test_quantize_is_deterministic(rng):
    w = rng.standard_normal((20, 100)).astype(np.float32)
    w[3, 5] = w[7, 9] = 4.0  # ties in the outlier score
    for b in Q.BITS:
        assert Q.to_bytes(Q.quantize(w, b)) == Q.to_bytes(Q.quantize(w.copy(), b))


def test_quantize_rejects_bad_input():
    w = np.ones((4, 16), np.float32)
    for kw in [dict(bits=7), dict(bits=4, group_size=12), dict(bits=4, group_size=0), dict(bits=4, outlier_frac=2)]:
        with pytest.raises(ValueError):
            Q.quantize(w, **kw)
    with pytest.raises(ValueError):
        Q.quantize(np.ones(16, np.float32), 4)
    bad = w.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Q.quantize(bad, 4)


def test_constant_groups():
    w = np.full((3, 40), 0.25, np.float32)
    w[1] = -3.0
    for b in Q.BITS:
        assert np.array_equal(Q.dequantize(Q.quantize(w, b, outlier_frac=0)), w)


# --------------------------------------------------------------------------- serialized layout


@pytest.mark.parametrize("bits", Q.BITS)
def test_to_bytes_from_buffer_round_trip(bits, rng):
    w = rng.standard_normal((9, 77)).astype(np.float32)
    q = Q.quantize(w, bits, group_size=32, outlier_frac=0.02)
    blob = Q.to_bytes(q)
    meta = json.loads(json.dumps(q.meta()))
    assert len(blob) == q.nbytes == meta["nbytes"] == Q.nbytes_for(w.shape, bits, 32, q.n_outliers)
    assert len(blob) % Q.ALIGN == 0
    assert all(meta["offsets"][s] % Q.ALIGN == 0 for s in Q.SECTIONS)
    assert list(meta["offsets"].values()) == sorted(meta["offsets"].values())
    r = Q.from_buffer(blob, meta)
    for name in Q.SECTIONS:
        assert np.array_equal(getattr(r, name), getattr(q, name))
        assert not getattr(r, name).flags.writeable  # views of immutable bytes
    assert np.array_equal(bits_of(Q.dequantize(r)), bits_of(Q.dequantize(q)))
    assert q.bits_per_weight == pytest.approx(Q.payload_bits(w.shape, bits, 32, q.n_outliers) / w.size)


def test_from_buffer_is_zero_copy_inside_a_larger_file(rng):
    w = rng.standard_normal((16, 100)).astype(np.float32)
    q = Q.quantize(w, 3)
    blob = Q.to_bytes(q)
    file = np.zeros(128 + len(blob) + 64, np.uint8)  # a shard file: versions at 64-byte offsets
    file[128: 128 + len(blob)] = np.frombuffer(blob, np.uint8)
    r = Q.from_buffer(memoryview(file)[128: 128 + len(blob)], q.meta())
    for name in Q.SECTIONS:
        assert np.shares_memory(getattr(r, name), file)
    assert np.array_equal(Q.dequantize(r), Q.dequantize(q))


def test_from_buffer_rejects_bad_buffers_and_meta(rng):
    q = Q.quantize(rng.standard_normal((8, 100)).astype(np.float32), 4, outlier_frac=0.01)
    blob, meta = Q.to_bytes(q), q.meta()
    last = meta["offsets"]["outlier_val"] + 4 * q.n_outliers
    with pytest.raises(ValueError, match="buffer holds"):
        Q.from_buffer(blob[: last - 1], meta)
    Q.from_buffer(blob[:last], meta)  # trailing alignment padding is optional
    bad_metas = [{**meta, "offsets": {**meta["offsets"], "scale": meta["offsets"]["scale"] + 4}},
                 {**meta, "offsets": {**meta["offsets"], "offset": meta["offsets"]["scale"]}},
                 {**meta, "bits": 7}, {**meta, "group_size": 20}, {**meta, "n_outliers": -1},
                 {k: v for k, v in meta.items() if k != "offsets"}, {**meta, "layout": "other"},
                 {**meta, "shape": [8]}]
    for m in bad_metas:
        with pytest.raises(ValueError):
            Q.from_buffer(blob, m)
    idx_at = meta["offsets"]["outlier_idx"]
    corrupt = bytearray(blob)
    corrupt[idx_at: idx_at + 4] = (8 * 100).to_bytes(4, "little")  # an outlier index past the end
    with pytest.raises(ValueError, match="out of range"):
        Q.from_buffer(corrupt, meta)


def test_quantized_tensor_validates_arrays(rng):
    q = Q.quantize(rng.standard_normal((4, 64)).astype(np.float32), 4)
    fields = dict(bits=4, shape=(4, 64), group_size=64, codes=q.codes, scale=q.scale, offset=q.offset,
                  outlier_idx=q.outlier_idx, outlier_val=q.outlier_val)
    for kw in [dict(codes=q.codes[:-1]), dict(scale=q.scale.astype(np.float64)), dict(offset=q.offset[:2]),
               dict(outlier_val=np.zeros(q.n_outliers + 1, np.float32)), dict(bits=3)]:
        with pytest.raises(ValueError):
            Q.QuantizedTensor(**{**fields, **kw})


def test_nbytes_for_matches_quantize(rng):
    w = rng.standard_normal((40, 300)).astype(np.float32)
    for b in Q.BITS:
        q = Q.quantize(w, b)
        assert q.n_outliers == Q.outlier_count(w.shape, b)
        assert Q.nbytes_for(w.shape, b) == len(Q.to_bytes(q))


# --------------------------------------------------------------------------- dispatch


def test_dequantize_into_out_and_bad_out(rng):
    q = Q.quantize(rng.standard_normal((5, 70)).astype(np.float32), 5)
    out = np.empty((5, 70), np.float32)
    assert Q.dequantize(q, out) is out
    assert np.array_equal(out, Q.dequantize_numpy(q))
    out2 = np.empty((5, 70), np.float32)
    assert Q.dequantize_numpy(q, out2) is out2 and np.array_equal(out2, out)
    for bad in [np.empty((5, 71), np.float32), np.empty((5, 70), np.float64), np.empty((70, 5), np.float32).T]:
        with pytest.raises(ValueError):
            Q.dequantize(q, bad)


def test_sti_no_c_forces_numpy_path():
    code = "import sti.quant as q; print(q.has_c_kernel())"
    env = {**os.environ, "STI_NO_C": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_bench_dequant_shape():
    rows = Q.bench_dequant(bits_list=(3,), rows=16, cols=72, repeats=2)
    assert rows[0]["bits"] == 3 and rows[0]["numpy_gbps"] > 0
    assert (rows[0]["c_gbps"] is None) == (not Q.has_c_kernel())


def test_decoder_equals_from_buffer_dequantize():
    from sti import quant

    rng = np.random.default_rng(5)
    w = (rng.standard_normal((40, 100)) * 0.1).astype(np.float32)
    for bits in (2, 3, 4, 5, 6, 8):
        q = quant.quantize(w, bits, 64)
        buf = quant.to_bytes(q)
        dec = quant.Decoder(q.meta())
        np.testing.assert_array_equal(dec(buf), quant.dequantize(quant.from_buffer(buf, q.meta())))
        with pytest.raises(ValueError, match="buffer holds"):
            dec(buf[: len(buf) // 2])


def _program_case(rng):
    """A shard-like buffer: two quantized matrices (with outliers) and a float32 vector."""
    mats = [(rng.standard_t(3, (12, 100)) * 0.1).astype(np.float32), (rng.standard_normal((7, 64)) * 0.2).astype(np.float32)]
    vec = rng.standard_normal(9).astype(np.float32)
    buf, entries = bytearray(), []
    for w, bits in zip(mats, (3, 6)):
        q = Q.quantize(w, bits, 64, outlier_frac=0.02)
        assert q.n_outliers
        entries.append(("quant", len(buf), w.shape, q.meta()))
        buf += Q.to_bytes(q)
    entries.append(("float32", len(buf), vec.shape, None))
    buf += vec.tobytes() + bytes(28)
    return bytes(buf), entries


@pytest.mark.parametrize("use_c", [True, False])
def test_program_decodes_like_dequantize(use_c, rng, monkeypatch):
    if use_c and not Q.has_c_kernel():
        pytest.skip("C kernels not built")
    if not use_c:
        monkeypatch.setattr(Q, "_ck", None)
    buf, entries = _program_case(rng)
    prog = Q.Program(entries)
    outs = tuple(np.full(s, np.nan, np.float32) for _, _, s, _ in entries)
    prog(buf, outs)
    for (kind, off, shape, meta), out in zip(entries, outs):
        if kind == "quant":
            ref = Q.dequantize_numpy(Q.from_buffer(memoryview(buf)[off:], meta))
        else:
            ref = np.frombuffer(buf, np.float32, count=shape[0], offset=off)
        assert np.array_equal(bits_of(out), bits_of(ref))


@needs_c
def test_program_c_rejects_bad_buffers(rng):
    buf, entries = _program_case(rng)
    prog = Q.Program(entries)
    outs = tuple(np.empty(s, np.float32) for _, _, s, _ in entries)
    with pytest.raises(ValueError, match="outside"):
        prog(buf[:100], outs)
    with pytest.raises(ValueError, match="output"):
        prog(buf, (np.empty((12, 99), np.float32),) + outs[1:])
    with pytest.raises(ValueError, match="buffers"):
        prog(buf, outs[:2])
    bad = bytearray(buf)  # an outlier index past the end of its matrix
    meta = entries[0][3]
    idx_at = entries[0][1] + meta["offsets"]["outlier_idx"]
    bad[idx_at: idx_at + 4] = np.uint32(10**6).tobytes()
    with pytest.raises(ValueError, match="outlier index"):
        prog(bytes(bad), outs)
