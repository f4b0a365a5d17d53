"""The shard store on a tiny random BERT: pack -> open -> assemble -> encode, damage, atomicity."""

import importlib
import json
import os
import shutil

import numpy as np
import pytest

from sti.errors import STIError
from sti.models import bert
from sti.store import BITS, FORMAT_VERSION, Store, is_store, pack

pack_mod = importlib.import_module("sti.store.pack")  # the module (sti.store.pack is also the function)
from sti.store.format import ALIGNMENT, MANIFEST

from tiny_models import CFG


@pytest.fixture(scope="module")
def model(tiny_bert):
    return tiny_bert


@pytest.fixture
def store_copy(model, tmp_path):
    """A private copy of the packed store, for tests that damage it."""
    dst = tmp_path / "copy.sti"
    shutil.copytree(model[2], dst)
    return dst


def _layers(w):
    return [bert.layer_weights(w, i) for i in range(CFG.num_layers)]


def _globals(w):
    return {n: w[n] for n in bert.GLOBAL_NAMES}


def _inputs():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, CFG.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, mask


def _all(store, layer, bits):
    return {i: bits for i in store.shard_indices(layer)}


# ---------------------------------------------------------------------------------- contents


def test_fp32_version_is_lossless(model):
    _, w, path = model
    ids, mask = _inputs()
    with Store.open(path) as s:
        assert s.config == CFG and s.bits == BITS and s.num_layers == CFG.num_layers
        layers = [s.assemble_layer(i, _all(s, i, 32)) for i in range(CFG.num_layers)]
        for got, want in zip(layers, _layers(w)):
            assert set(got) == set(want)
            for n in want:
                np.testing.assert_array_equal(got[n], want[n], err_msg=n)
        out = bert.encode(s.config, s.globals(), layers, ids, mask)  # embeddings read by row from the store
    # wo and w_down come back as transposed views of row-contiguous storage: the same numbers,
    # so the same outputs bit for bit given the same memory layout; BLAS sums in another order
    # for the checkpoint's layout (differences of an ulp or so)
    same_layout = [dict(lw, wo=np.ascontiguousarray(lw["wo"].T).T, w_down=np.ascontiguousarray(lw["w_down"].T).T)
                   for lw in _layers(w)]
    np.testing.assert_array_equal(out, bert.encode(CFG, _globals(w), same_layout, ids, mask))
    np.testing.assert_allclose(out, bert.encode(CFG, _globals(w), _layers(w), ids, mask), rtol=0, atol=1e-5)


def test_8bit_is_close_and_each_version_is_the_quantized_slice(model):
    from sti import quant

    _, w, path = model
    ids, mask = _inputs()
    ref = bert.encode(CFG, _globals(w), _layers(w), ids, mask)
    with Store.open(path) as s:
        out = bert.encode(CFG, s.globals(), list(s.full_layers(8)), ids, mask)
        assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
        hd, Fs = CFG.head_dim, CFG.intermediate_size // CFG.num_heads
        for bits in (2, 3, 5):
            sh = s.read_shard(1, 2, bits)
            wq = w["layers.1.wq"][2 * hd: 3 * hd]
            np.testing.assert_array_equal(sh["wq"], quant.dequantize(quant.quantize(wq, bits, 64)))
            wd = np.ascontiguousarray(w["layers.1.w_down"][:, 2 * Fs: 3 * Fs].T)
            np.testing.assert_array_equal(sh["w_down_t"], quant.dequantize(quant.quantize(wd, bits, 64)))
            np.testing.assert_array_equal(sh["b_up"], w["layers.1.b_up"][2 * Fs: 3 * Fs])  # biases stay fp32
            assert sh["wo_t"].shape == (hd, CFG.hidden_size)


def test_shard_subset_equals_model_with_dropped_shards_zeroed(model):
    _, w, path = model
    ids, mask = _inputs()
    keep = {0: [0, 2], 1: [3]}
    hd, Fs = CFG.head_dim, CFG.intermediate_size // CFG.num_heads
    zeroed = []
    for i, lw in enumerate(_layers(w)):
        z = dict(lw)
        z["wo"], z["w_down"] = np.zeros_like(lw["wo"]), np.zeros_like(lw["w_down"])
        for h in keep[i]:
            z["wo"][:, h * hd:(h + 1) * hd] = lw["wo"][:, h * hd:(h + 1) * hd]
            z["w_down"][:, h * Fs:(h + 1) * Fs] = lw["w_down"][:, h * Fs:(h + 1) * Fs]
        zeroed.append(z)
    with Store.open(path) as s:
        sub = [s.assemble_layer(i, {h: 32 for h in keep[i]}) for i in range(CFG.num_layers)]
        assert sub[0]["wq"].shape == (2 * hd, CFG.hidden_size) and sub[0]["wo"].shape == (CFG.hidden_size, 2 * hd)
        assert sub[1]["w_down"].shape == (CFG.hidden_size, Fs)
        np.testing.assert_allclose(bert.encode(CFG, s.globals(), sub, ids, mask),
                                   bert.encode(CFG, _globals(w), zeroed, ids, mask), rtol=1e-5, atol=1e-5)
        # zero width: only the unsharded parts act
        empty = s.assemble_layer(0, {})
        assert empty["wq"].shape == (0, CFG.hidden_size) and empty["w_down"].shape == (CFG.hidden_size, 0)
        z = dict(_layers(w)[0], wo=np.zeros_like(w["layers.0.wo"]), w_down=np.zeros_like(w["layers.0.w_down"]))
        x = bert.embed(CFG, _globals(w), ids)
        bias = bert.attention_bias(mask)
        np.testing.assert_allclose(bert.layer(CFG, x, bias, empty), bert.layer(CFG, x, bias, z), rtol=1e-5, atol=1e-5)


def test_io_and_decode_are_separable_and_aligned(model):
    _, _, path = model
    with Store.open(path) as s:
        for bits in BITS:
            f, off, length = s.shard_location(1, 3, bits)
            assert off % ALIGNMENT == 0 and length % ALIGNMENT == 0 and f.parent == s.path
            raw = s.read_shard_bytes(1, 3, bits)
            assert len(raw) == length
            s.check_shard(1, 3, bits, raw)
            buf = bytearray(length)
            assert s.read_shard_bytes(1, 3, bits, out=buf) is buf and bytes(buf) == raw
            a, b = s.decode_shard(1, 3, bits, buf), s.read_shard(1, 3, bits)
            assert set(a) == {"wq", "bq", "wk", "bk", "wv", "bv", "wo_t", "w_up", "b_up", "w_down_t"}
            for n in a:
                assert a[n].dtype == np.float32
                np.testing.assert_array_equal(a[n], b[n])
        # a layer assembled from shards of mixed bitwidths
        mixed = s.assemble_layer(0, {0: 2, 1: 8, 3: 32})
        assert mixed["wq"].shape == (3 * CFG.head_dim, CFG.hidden_size)
        np.testing.assert_array_equal(mixed["wq"][:CFG.head_dim], s.read_shard(0, 0, 2)["wq"])
        with pytest.raises(STIError, match="layer 5 is not in the store"):
            s.read_shard(5, 0, 32)
        with pytest.raises(STIError, match="no 7-bit version"):
            s.read_shard(0, 0, 7)


@pytest.fixture(params=["C", "Python"])
def read_impl(request, monkeypatch):
    """``Store.read_many`` through the C kernels, and through their Python fallback."""
    from sti.store import reader

    if request.param == "Python":
        monkeypatch.setattr(reader, "_pread_many", reader._pread_many_py)
    return request.param


def test_read_many_reads_versions_of_any_files_in_one_call(model, read_impl):
    _, _, path = model
    with Store.open(path) as s:
        versions = [(0, 3, 4), (0, 1, 8), (1, 0, 32), (0, 2, 2), (1, 2, 2)]
        bufs = [bytearray(s.shard_nbytes(*v) + 64) for v in versions]  # larger buffers keep their tail
        s.read_many(versions, bufs, verify=True)
        for v, b in zip(versions, bufs):
            n = s.shard_nbytes(*v)
            assert bytes(b[:n]) == s.read_shard_bytes(*v) and not any(b[n:])
        s.read_many([], [])


def test_read_many_reads_evicted_versions_and_partly_cached_ones(model, read_impl):
    # not in the page cache, the reads are announced before they are made (one path where the
    # filesystem honours the eviction, the cached one where it does not): the same bytes either way
    _, w, path = model
    with Store.open(path) as s:
        versions = [(1, i, b) for b in (3, 8) for i in s.shard_indices(1)]
        want = [s.read_shard_bytes(*v) for v in versions]
        for prime in ([], versions[:3], versions[::2]):  # none, a prefix, every other one cached
            s.evict()
            bufs = [bytearray(s.shard_nbytes(*v)) for v in prime]
            s.read_many(prime, bufs)
            bufs = [bytearray(s.shard_nbytes(*v)) for v in versions]
            s.read_many(versions, bufs, verify=True)
            assert [bytes(b) for b in bufs] == want
        rows = np.array([5, 17, 3, 30, 31, 32, 0])
        s.evict()
        np.testing.assert_array_equal(s.embedding_rows(rows), w["embed.word"][rows])


def test_the_python_reads_announce_every_item_from_the_first_uncached_one(model, monkeypatch):
    # the C kernels' logic, observable in the fallback: items are tried without blocking, and at
    # the first one not (fully) cached it and every later one are announced (WILLNEED), once
    from sti.store import reader

    if not hasattr(os, "RWF_NOWAIT") or not hasattr(os, "posix_fadvise"):
        pytest.skip("this platform has no non-blocking reads or read announcements")
    _, _, path = model
    real_preadv, calls = os.preadv, []

    def preadv(fd, bufs, at, flags=0):
        if flags and len(calls) == 0 and at == miss_at:
            raise BlockingIOError  # as a read of pages not in the page cache
        return real_preadv(fd, bufs, at, flags) if flags else real_preadv(fd, bufs, at)

    with Store.open(path) as s:
        versions = [(0, i, 4) for i in s.shard_indices(0)]
        where = [s.shard_location(*v) for v in versions]
        want = [s.read_shard_bytes(*v) for v in versions]
    miss_at = where[2][1]
    bufs = [bytearray(n) for _, _, n in where]
    fds = [os.open(f, os.O_RDONLY) for f, _, _ in where]
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, n, advice: calls.append((at, n, advice)))
    try:
        assert reader._pread_many_py(fds, [o for _, o, _ in where], bufs) == -1
    finally:
        for fd in fds:
            os.close(fd)
    assert calls == [(o, n, os.POSIX_FADV_WILLNEED) for _, o, n in where[2:]]
    assert [bytes(b) for b in bufs] == want


def test_a_damaged_or_cut_shard_in_a_read_many_is_named(store_copy):
    with Store.open(store_copy) as s:
        f, off, length = s.shard_location(1, 2, 4)
        versions = [(1, i, 4) for i in s.shard_indices(1)]
        last = max(versions, key=lambda v: s.shard_location(*v)[1])
    _flip(f, off + length // 3)
    with Store.open(store_copy) as s:
        bufs = [bytearray(s.shard_nbytes(*v)) for v in versions]
        s.read_many(versions, bufs, verify=[True, True, False, True])  # the damaged one not checked
        with pytest.raises(STIError, match=r"shard \(layer 1, index 2\) 4-bit version is damaged.*shards-4bit\.bin"):
            s.read_many(versions, bufs, verify=True)
        # a file cut short after the store was opened: the read that runs past its end is named
        os.truncate(f, s.shard_location(*last)[1] + 10)
        with pytest.raises(STIError, match=rf"shards-4bit\.bin is truncated: .* shard \(layer 1, index {last[1]}\)"):
            s.read_many(versions, bufs)


def test_embedding_rows_and_globals(model):
    _, w, path = model
    table = w["embed.word"]
    with Store.open(path) as s:
        ids = np.array([7, 3, 3, 39, 0, 8, 9, 10])
        np.testing.assert_array_equal(s.embedding_rows(ids), table[ids])
        np.testing.assert_array_equal(s.embedding_rows(np.arange(CFG.vocab_size)), table)
        assert s.embedding_rows(np.array([], dtype=np.int64)).shape == (0, CFG.hidden_size)
        g = s.globals()
        np.testing.assert_array_equal(g["embed.word"][ids.reshape(2, 4)], table[ids.reshape(2, 4)])
        for n in ("embed.pos", "embed.type", "embed.ln_w", "embed.ln_b"):
            np.testing.assert_array_equal(g[n], w[n])
        for n, a in s.layer_common(1).items():
            np.testing.assert_array_equal(a, w[f"layers.1.{n}"])
        with pytest.raises(STIError, match="out of range"):
            s.embedding_rows(np.array([CFG.vocab_size]))


def test_manifest_summary_and_tokenizer(model):
    hf, _, path = model
    from tokenizers import Tokenizer

    with Store.open(path) as s:
        info = s.summary()
        assert info["format_version"] == FORMAT_VERSION and info["family"] == "bert"
        assert info["layers"] == 2 and info["shards_per_layer"] == 4 and info["shards"] == 8
        assert info["versions"] == ["2-bit", "3-bit", "4-bit", "5-bit", "6-bit", "8-bit", "fp32"]
        sizes = [info["bytes_per_version"][v] for v in info["versions"]]
        assert sizes == sorted(sizes)  # more bits, more bytes
        assert info["total_bytes"] == sum(f.stat().st_size for f in s.path.iterdir())
        assert s.verify() == []
        text = "The big red dog sat on the mat"
        assert s.tokenizer().encode(text).ids == Tokenizer.from_file(str(hf / "tokenizer.json")).encode(text).ids
        assert s.manifest.source["hash"]["value"] and s.manifest.source["path"] == str(hf)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", "globals.bin", "embeddings.bin", "shards-2bit.bin", "shards-3bit.bin",
         "shards-4bit.bin", "shards-5bit.bin", "shards-6bit.bin", "shards-8bit.bin", "shards-fp32.bin"])


# ---------------------------------------------------------------------------------- damage


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_byte_is_reported_with_shard_version_and_file(store_copy):
    with Store.open(store_copy) as s:
        f, off, length = s.shard_location(1, 2, 4)
        e = s.manifest.embedding
    _flip(f, off + length // 3)
    _flip(store_copy / e.file, e.offset + 17 * e.row_bytes + 5)
    with Store.open(store_copy) as s:
        with pytest.raises(STIError, match=r"shard \(layer 1, index 2\) 4-bit version is damaged.*shards-4bit\.bin"):
            s.read_shard(1, 2, 4)
        with pytest.raises(STIError, match=r"shard \(layer 1, index 2\) 4-bit"):
            s.assemble_layer(1, {0: 8, 2: 4})
        s.read_shard(1, 2, 8)  # other versions and shards are intact
        s.read_shard(1, 1, 4)
        s.read_shard(1, 2, 4, verify=False)  # the caller may skip the check
        with pytest.raises(STIError, match="row 17 of the word-embedding table"):
            s.embedding_rows(np.array([3, 17]))
        s.embedding_rows(np.array([3, 16, 18]))
        problems = s.verify()
    assert len(problems) == 2
    assert "layer 1, index 2" in problems[0] and "4-bit" in problems[0] and "shards-4bit.bin" in problems[0]
    assert "embeddings.bin" in problems[1] and "[17]" in problems[1]


def test_damaged_global_tensor_is_reported(store_copy):
    with Store.open(store_copy) as s:
        e = s.manifest.globals["layers.1.ln2_w"]
    _flip(store_copy / "globals.bin", e.offset + 4)
    with Store.open(store_copy) as s:
        s.layer_common(0)
        with pytest.raises(STIError, match="layers.1.ln2_w.*globals.bin"):
            s.layer_common(1)
        assert any("layers.1.ln2_w" in p for p in s.verify())


def test_truncated_or_missing_data_file_is_a_clear_error(store_copy):
    f = store_copy / "shards-fp32.bin"
    size = f.stat().st_size
    os.truncate(f, size - 4096)
    with pytest.raises(STIError, match=rf"shards-fp32\.bin is truncated: {size - 4096} bytes, expected {size}"):
        Store.open(store_copy)
    f.unlink()
    with pytest.raises(STIError, match=rf"shards-fp32\.bin is missing \(expected {size} bytes\)"):
        Store.open(store_copy)


def test_manifest_problems_are_clear_errors(store_copy, tmp_path):
    m = store_copy / MANIFEST
    d = json.loads(m.read_text())
    m.write_text(json.dumps({**d, "format_version": 999}))
    with pytest.raises(STIError, match=f"format version 999.*reads format version {FORMAT_VERSION}") as exc:
        Store.open(store_copy)
    assert "re-pack" in str(exc.value)
    m.write_text("{not json")
    with pytest.raises(STIError, match="damaged"):
        Store.open(store_copy)
    m.unlink()
    with pytest.raises(STIError, match="not an STI store \\(no manifest.json\\)") as exc:
        Store.open(store_copy)
    assert "sti pack" in str(exc.value)
    with pytest.raises(STIError, match="no such store"):
        Store.open(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------- atomic packing


def test_interrupted_pack_leaves_no_store(model, tmp_path, monkeypatch):
    hf = model[0]
    target = tmp_path / "new.sti"
    real, calls = pack_mod._pack_shard, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(pack_mod, "_pack_shard", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        pack(hf, target, progress=False)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # the temp dir is cleaned up

    # a pack killed before it could clean up leaves only its temp dir, which is not a store
    calls.clear()
    monkeypatch.setattr(pack_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(RuntimeError):
        pack(hf, target, progress=False)
    monkeypatch.undo()
    assert not target.exists()
    (left,) = tmp_path.iterdir()
    assert left.name == f".new.sti.tmp-{os.getpid()}" and not (left / MANIFEST).exists()
    with pytest.raises(STIError, match="interrupted sti pack"):
        Store.open(left)


def test_overwrite_semantics(model, tmp_path):
    hf = model[0]
    target = tmp_path / "s.sti"
    pack(hf, target, bits=(4, 32), progress=False)
    with pytest.raises(STIError, match="already exists"):
        pack(hf, target, progress=False)
    with Store.open(target) as s:
        assert s.bits == (4, 32)
        with pytest.raises(STIError, match="no 8-bit version"):
            s.read_shard(0, 0, 8)
    pack(hf, target, bits=(8,), progress=False, overwrite=True)
    with Store.open(target) as s:
        assert s.bits == (8,) and s.verify() == []
    assert [p.name for p in tmp_path.iterdir()] == ["s.sti"]  # no temp or old dirs left
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(STIError, match="not an STI store; refusing"):
        pack(hf, other, progress=False, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"
    with pytest.raises(STIError, match="bad bitwidths"):
        pack(hf, tmp_path / "x.sti", bits=(7,), progress=False)


def test_other_checksum_and_is_store(model, tmp_path):
    target = tmp_path / "b.sti"
    assert not is_store(target)
    pack(model[0], target, bits=(3, 32), checksum="blake2b-128", progress=False)
    assert is_store(target)
    with Store.open(target) as s:
        assert s.manifest.checksum == "blake2b-128" and s.verify() == []
        f, off, length = s.shard_location(0, 1, 3)
    _flip(f, off + 1)
    with Store.open(target) as s:
        with pytest.raises(STIError, match=r"layer 0, index 1\) 3-bit"):
            s.read_shard(0, 1, 3)
