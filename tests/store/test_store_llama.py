"""Decoder shard stores on tiny random LLaMA models: KV-group shards in (out, in) orientation,
the GGUF's own blocks kept losslessly, LM-head shards, zero-copy raw tensors; then the real
SmolLM2 GGUF (skipped when its package is absent)."""

import importlib
import shutil

import numpy as np
import pytest

from sti import quant
from sti.errors import STIError
from sti.loaders import load_checkpoint
from sti.models import llama
from sti.store import FP32, HEAD, SOURCE, Store, pack

pack_mod = importlib.import_module("sti.store.pack")

from tiny_llama import CFG, weights, write_gguf, write_hf_dir

K_BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF path, its checkpoint as load_gguf gives it, store packed with the default versions)."""
    root = tmp_path_factory.mktemp("tiny-llama")
    write_gguf(root / "tiny.gguf", CFG, weights(CFG, np.random.default_rng(0)))
    store = pack(root / "tiny.gguf", root / "tiny.sti", progress=False)
    return root / "tiny.gguf", load_checkpoint(root / "tiny.gguf", progress=False), store


def _full(store, layer, bits):
    return store.assemble_layer(layer, {i: bits for i in store.shard_indices(layer)})


def _head(store, bits, indices=None):
    indices = store.shard_indices(HEAD) if indices is None else indices
    return store.combine_shards(HEAD, {i: store.read_shard(HEAD, i, bits) for i in indices})["lm_head"]


# ---------------------------------------------------------------------------------- the source version


def test_source_version_decodes_to_the_gguf_weights_exactly(tiny):
    _, ck, path = tiny
    w = ck.weights
    with Store.open(path) as s:
        assert s.family == "llama" and s.config == ck.config and s.bits == (*K_BITS, SOURCE)
        assert s.num_layers == CFG.num_layers and s.shard_indices(0) == [0, 1]
        layers = [_full(s, i, SOURCE) for i in range(CFG.num_layers)]
        for i, lw in enumerate(layers):
            assert set(lw) == set(llama.LAYER_NAMES)
            for n, a in lw.items():
                assert a.dtype == np.float32
                np.testing.assert_array_equal(a, w[f"layers.{i}.{n}"], err_msg=f"layer {i} {n}")
        head = _head(s, SOURCE)
        np.testing.assert_array_equal(head, w["embed"])  # tied: the Q8_0 token embedding
        g = s.globals()
        np.testing.assert_array_equal(g["norm"], w["norm"])
        ids = np.array([[3, 0, 258, 3]])
        np.testing.assert_array_equal(g["embed"][ids], w["embed"][ids])
        assert s.special == ck.special and s.chat_template == ck.chat_template
        assert s.tokenizer().encode("hi there").ids == ck.tokenizer.encode("hi there").ids
        # the same logits as the checkpoint, token for token
        ids = np.array([[5, 17, 42, 7, 99]])
        ref = llama.forward(CFG, {n: w[n] for n in llama.GLOBAL_NAMES if n in w},
                            [llama.layer_weights(w, i) for i in range(CFG.num_layers)], ids,
                            llama.KVCache(CFG, 1, 8), all_logits=True)
        got = llama.forward(CFG, {"embed": head, "norm": g["norm"]}, layers, ids, llama.KVCache(CFG, 1, 8),
                            all_logits=True)
        np.testing.assert_array_equal(got, ref)


def test_raw_tensors_are_zero_copy_views_of_each_kind(tiny, tmp_path):
    _, ck, path = tiny
    fp = pack(path.parent / "tiny.gguf", tmp_path / "fp.sti", bits=(4, "fp32", "source"), progress=False)
    with Store.open(fp) as s:
        assert s.bits == (4, FP32, SOURCE)
        for bits, kind in ((SOURCE, "ggml-q4_1"), (4, "sti-q1"), (FP32, "f32")):
            raw = s.read_shard_bytes(1, 1, bits)
            tensors = s.shard_tensors_raw(1, 1, bits, raw)
            decoded = s.decode_shard(1, 1, bits, raw)
            assert list(tensors) == [st.name for st in s.tensors(1)] == list(decoded)
            for n, t in tensors.items():
                assert t.kind == kind and t.shape == decoded[n].shape
                assert np.shares_memory(t.buf, np.frombuffer(raw, np.uint8))  # a view, not a copy
                if kind == "ggml-q4_1":
                    from gguf import GGMLQuantizationType
                    from gguf.quants import dequantize

                    assert t.meta == {"ggml_type": "Q4_1", "block": 32, "block_bytes": 20}
                    assert t.buf.dtype == np.uint8 and t.buf.shape == (t.shape[0], t.shape[1] // 32 * 20)
                    np.testing.assert_array_equal(dequantize(t.buf, GGMLQuantizationType.Q4_1), decoded[n])
                elif kind == "sti-q1":
                    np.testing.assert_array_equal(quant.dequantize(quant.from_buffer(t.buf, t.meta)), decoded[n])
                else:
                    assert t.meta is None and t.buf.dtype == np.float32
                    np.testing.assert_array_equal(t.buf, decoded[n])
        only = s.shard_tensors_raw(HEAD, 2, SOURCE, s.read_shard_bytes(HEAD, 2, SOURCE), names={"lm_head"})
        assert only["lm_head"].kind == "ggml-q8_0" and only["lm_head"].meta["block_bytes"] == 34
        # float32 is lossless too, and equals the source version
        np.testing.assert_array_equal(_full(s, 0, FP32)["wo"], ck.weights["layers.0.wo"])


# ---------------------------------------------------------------------------------- shards


def test_shards_are_kv_groups_stored_out_by_in(tiny):
    _, ck, path = tiny
    w = ck.weights
    H, hd, g, F, n = CFG.hidden_size, CFG.head_dim, CFG.group_size, CFG.intermediate_size, CFG.num_kv_heads
    q, f = g * hd, F // n
    with Store.open(path) as s:
        tensors = {st.name: st for st in s.tensors(0)}
        assert (tensors["wo"].axis, tensors["wo"].transposed, tensors["w_down"].axis) == (1, False, 1)
        for idx in s.shard_indices(1):
            assert s.shard_ranges(1, idx) == {"attn": [idx * q, (idx + 1) * q], "kv": [idx * hd, (idx + 1) * hd],
                                              "ffn": [idx * f, (idx + 1) * f]}
            want = {"wq": w["layers.1.wq"][idx * q:(idx + 1) * q], "wk": w["layers.1.wk"][idx * hd:(idx + 1) * hd],
                    "wv": w["layers.1.wv"][idx * hd:(idx + 1) * hd], "wo": w["layers.1.wo"][:, idx * q:(idx + 1) * q],
                    "w_gate": w["layers.1.w_gate"][idx * f:(idx + 1) * f],
                    "w_up": w["layers.1.w_up"][idx * f:(idx + 1) * f],
                    "w_down": w["layers.1.w_down"][:, idx * f:(idx + 1) * f]}
            for bits in (2, 5, 8):  # each k-bit version is the STI quantization of the (out, in) slice
                got = s.read_shard(1, idx, bits)
                for name, a in want.items():
                    np.testing.assert_array_equal(got[name], quant.dequantize(quant.quantize(a, bits, 64)),
                                                  err_msg=f"{name} {bits}-bit")
        assert s.read_shard(0, 0, 8)["wo"].shape == (H, q)
        # the shards' partial outputs of wo and w_down add up to the full products
        lw = s.assemble_layer(0, {0: SOURCE, 1: SOURCE})
        x_attn, x_ffn = np.random.default_rng(1).standard_normal((2, q * n)).astype(np.float32)[:, :, None]
        parts = [s.read_shard(0, i, SOURCE) for i in range(n)]
        np.testing.assert_allclose(sum(p["wo"] @ x_attn[i * q:(i + 1) * q] for i, p in enumerate(parts)),
                                   lw["wo"] @ x_attn, rtol=1e-5, atol=1e-6)
        x_ffn = np.random.default_rng(2).standard_normal((F, 1)).astype(np.float32)
        np.testing.assert_allclose(sum(p["w_down"] @ x_ffn[i * f:(i + 1) * f] for i, p in enumerate(parts)),
                                   lw["w_down"] @ x_ffn, rtol=1e-5, atol=1e-6)


def test_a_subset_of_groups_runs_as_the_narrower_layer(tiny):
    _, ck, path = tiny
    w = ck.weights
    hd, q = CFG.head_dim, CFG.group_size * CFG.head_dim
    with Store.open(path) as s:
        sub = s.assemble_layer(0, {1: SOURCE})
        assert sub["wq"].shape == (q, CFG.hidden_size) and sub["wk"].shape == (hd, CFG.hidden_size)
        assert sub["wo"].shape == (CFG.hidden_size, q)
        assert sub["w_down"].shape == (CFG.hidden_size, CFG.intermediate_size // 2)
        np.testing.assert_array_equal(sub["wo"], w["layers.0.wo"][:, q:])
        empty = s.assemble_layer(0, {})
        assert empty["wq"].shape == (0, CFG.hidden_size) and empty["wo"].shape == (CFG.hidden_size, 0)
        assert empty["w_down"].shape == (CFG.hidden_size, 0) and set(empty) == set(llama.LAYER_NAMES)
        x = np.random.default_rng(3).standard_normal((1, 3, CFG.hidden_size)).astype(np.float32)
        cos, sin = llama.rope_tables(CFG, np.arange(3))
        kv = np.zeros((1, 0, 8, hd), np.float32)
        out = llama.layer(CFG, x, empty, kv, kv, 0, cos, sin)  # zero width: only the residual stream
        np.testing.assert_array_equal(out, x)


def test_head_shards_cover_the_vocabulary(tiny):
    _, ck, path = tiny
    with Store.open(path) as s:
        idx = s.shard_indices(HEAD)
        assert idx == list(range(pack_mod.HEAD_SHARDS)) and s.summary()["head_shards"] == pack_mod.HEAD_SHARDS
        rows = [s.shard_ranges(HEAD, i)["vocab"] for i in idx]
        assert rows[0][0] == 0 and rows[-1][1] == CFG.vocab_size
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        r0, r1 = rows[5]
        np.testing.assert_array_equal(s.read_shard(HEAD, 5, 3)["lm_head"],
                                      quant.dequantize(quant.quantize(ck.weights["embed"][r0:r1], 3, 64)))
        part = _head(s, SOURCE, [5, 6])
        np.testing.assert_array_equal(part, ck.weights["embed"][r0:rows[6][1]])
        assert s.layer_common(HEAD) == {}
        with pytest.raises(STIError, match="LM-head shard 99 is not in the store"):
            s.read_shard(HEAD, 99, 4)


def test_damaged_head_shard_is_named(tiny, tmp_path):
    path = tmp_path / "copy.sti"
    shutil.copytree(tiny[2], path)
    with Store.open(path) as s:
        f, off, length = s.shard_location(HEAD, 3, SOURCE)
    with open(f, "r+b") as fh:
        fh.seek(off + 7)
        b = fh.read(1)
        fh.seek(off + 7)
        fh.write(bytes([b[0] ^ 1]))
    with Store.open(path) as s:
        with pytest.raises(STIError, match=r"LM-head shard 3 source version is damaged.*shards-source\.bin"):
            s.read_shard(HEAD, 3, SOURCE)
        problems = s.verify()
    assert len(problems) == 1 and "LM-head shard 3" in problems[0]


def test_summary_of_a_decoder_store(tiny):
    with Store.open(tiny[2]) as s:
        info = s.summary()
    assert info["family"] == "llama" and info["layers"] == 2 and info["shards_per_layer"] == 2
    assert info["shards"] == 4 and info["head_shards"] == pack_mod.HEAD_SHARDS and info["notes"] == []
    assert info["versions"] == ["2-bit", "3-bit", "4-bit", "5-bit", "6-bit", "8-bit", "source"]
    assert info["source_types"] == ["Q4_1", "Q8_0"]
    assert info["total_bytes"] == sum(p.stat().st_size for p in tiny[2].iterdir())
    assert sorted(p.name for p in tiny[2].iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", "globals.bin", "embeddings.bin", "shards-2bit.bin", "shards-3bit.bin",
         "shards-4bit.bin", "shards-5bit.bin", "shards-6bit.bin", "shards-8bit.bin", "shards-source.bin"])


# ---------------------------------------------------------------------------------- no source version


def test_slices_that_split_blocks_have_no_source_version(tmp_path):
    cfg = llama.LlamaConfig(**{**CFG.__dict__, "num_heads": 8, "num_kv_heads": 4, "head_dim": 0})
    assert cfg.group_size * cfg.head_dim == 16  # wo's column slice: half a Q4_1 block
    write_gguf(tmp_path / "odd.gguf", cfg, weights(cfg, np.random.default_rng(1)))
    with pytest.raises(STIError, match=r"blk\.0\.attn_output\.weight is Q4_1.*\[0, 16\) is not whole blocks") as exc:
        pack(tmp_path / "odd.gguf", tmp_path / "a.sti", bits=(4, "source"), progress=False)
    assert "--bits" in exc.value.fix
    with Store.open(pack(tmp_path / "odd.gguf", tmp_path / "b.sti", progress=False)) as s:
        assert s.bits == K_BITS and s.num_layers == 2 and s.shard_indices(0) == [0, 1, 2, 3]
        assert len(s.manifest.notes) == 1 and "no source version" in s.manifest.notes[0]
        assert s.summary()["notes"] == s.manifest.notes


def test_hf_directory_packs_without_source_version(tmp_path):
    cfg = llama.LlamaConfig(**{**CFG.__dict__, "tie_embeddings": False})
    w = weights(cfg, np.random.default_rng(2))
    write_hf_dir(tmp_path / "hf", cfg, w)
    with pytest.raises(STIError, match="not a GGUF file"):
        pack(tmp_path / "hf", tmp_path / "a.sti", bits=("source",), progress=False)
    with Store.open(pack(tmp_path / "hf", tmp_path / "b.sti", bits=(3, 32), head_shards=4, progress=False)) as s:
        assert s.bits == (3, FP32) and s.shard_indices(HEAD) == [0, 1, 2, 3]
        for n, a in _full(s, 1, FP32).items():
            np.testing.assert_array_equal(a, w[f"layers.1.{n}"], err_msg=n)
        np.testing.assert_array_equal(_head(s, FP32), w["lm_head"])  # untied: its own head
    with Store.open(pack(tmp_path / "hf", tmp_path / "c.sti", progress=False)) as s:
        assert s.bits == K_BITS and "not a GGUF file" in s.manifest.notes[0]


def test_bits_by_name_and_bad_bits(tiny, tmp_path):
    gguf = tiny[0]
    assert pack_mod._check_bits(["8", "Source", " fp32", 2]) == (2, 8, FP32, SOURCE)
    for bad in ((7,), ("q4",), ()):
        with pytest.raises(STIError, match="bad bitwidths"):
            pack(gguf, tmp_path / "x.sti", bits=bad, progress=False)
    with pytest.raises(STIError, match="LM-head shards"):
        pack(gguf, tmp_path / "x.sti", head_shards=0, progress=False)


# ---------------------------------------------------------------------------------- the real SmolLM2


def test_smollm2_source_version_is_the_gguf_exactly(tmp_path):
    from conftest import builtin_or_skip

    builtin_or_skip("smollm2")
    ck = load_checkpoint("smollm2", progress=False)
    with Store.open(pack("smollm2", tmp_path / "smol.sti", bits=("source",), progress=False)) as s:
        assert s.shard_indices(0) == [0, 1, 2] and len(s.shard_indices(HEAD)) == pack_mod.HEAD_SHARDS
        assert s.summary()["source_types"] == ["Q4_1", "Q8_0"]
        raw = s.read_shard_bytes(7, 2, SOURCE)
        wo = s.shard_tensors_raw(7, 2, SOURCE, raw)["wo"]
        assert wo.kind == "ggml-q4_1" and wo.shape == (576, 192) and wo.buf.shape == (576, 120)
        for layer in range(s.num_layers):
            for n, a in _full(s, layer, SOURCE).items():
                np.testing.assert_array_equal(a, ck.weights[f"layers.{layer}.{n}"], err_msg=f"layer {layer} {n}")
        np.testing.assert_array_equal(_head(s, SOURCE), ck.weights["embed"])
