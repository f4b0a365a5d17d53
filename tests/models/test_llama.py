import numpy as np
import pytest

from conftest import rand
from sti.models import llama


def tiny_cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=48, max_position=64, rope_theta=10000.0, rms_eps=1e-5, tie_embeddings=True)
    return llama.LlamaConfig(**{**base, **kw})


def tiny_weights(cfg, rng):
    H, hd, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    w = {"embed": rand(rng, cfg.vocab_size, H, scale=1.0), "norm": 1 + rand(rng, H)}
    if not cfg.tie_embeddings:
        w["lm_head"] = rand(rng, cfg.vocab_size, H)
    for i in range(cfg.num_layers):
        w.update({
            f"layers.{i}.attn_norm": 1 + rand(rng, H), f"layers.{i}.ffn_norm": 1 + rand(rng, H),
            f"layers.{i}.wq": rand(rng, cfg.num_heads * hd, H), f"layers.{i}.wk": rand(rng, cfg.num_kv_heads * hd, H),
            f"layers.{i}.wv": rand(rng, cfg.num_kv_heads * hd, H), f"layers.{i}.wo": rand(rng, H, cfg.num_heads * hd),
            f"layers.{i}.w_gate": rand(rng, F, H), f"layers.{i}.w_up": rand(rng, F, H), f"layers.{i}.w_down": rand(rng, H, F),
        })
    return w


def run(cfg, w, ids, cache=None, all_logits=True):
    g = {n: w[n] for n in llama.GLOBAL_NAMES if n in w}
    layers = [llama.layer_weights(w, i) for i in range(cfg.num_layers)]
    cache = cache or llama.KVCache(cfg, ids.shape[0], 32)
    return llama.forward(cfg, g, layers, ids, cache, all_logits), cache


def test_incremental_decode_matches_full_forward(rng):
    cfg = tiny_cfg()
    w = tiny_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, 9))
    full, _ = run(cfg, w, ids)
    part, cache = run(cfg, w, ids[:, :5])
    np.testing.assert_allclose(part, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 9):
        step, cache = run(cfg, w, ids[:, t:t + 1], cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
    assert cache.length == 9


def test_causality(rng):
    cfg = tiny_cfg()
    w = tiny_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (1, 8))
    a, _ = run(cfg, w, ids)
    ids2 = ids.copy()
    ids2[0, 6] = (ids2[0, 6] + 1) % cfg.vocab_size
    b, _ = run(cfg, w, ids2)
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_elastic_width_equals_zeroed_shards(rng):
    """A layer given a subset of KV groups and FFN neurons computes what the full layer computes
    with the other groups' output columns and the other neurons' down columns zeroed."""
    cfg = tiny_cfg(num_layers=1, tie_embeddings=False)
    w = tiny_weights(cfg, rng)
    hd, g = cfg.head_dim, cfg.group_size
    keep_kv, keep_ffn = [1], np.arange(0, cfg.intermediate_size, 2)
    q_rows = np.concatenate([np.arange(k * g * hd, (k + 1) * g * hd) for k in keep_kv])
    kv_rows = np.concatenate([np.arange(k * hd, (k + 1) * hd) for k in keep_kv])
    sub = dict(w)
    sub["layers.0.wq"], sub["layers.0.wo"] = w["layers.0.wq"][q_rows], w["layers.0.wo"][:, q_rows]
    sub["layers.0.wk"], sub["layers.0.wv"] = w["layers.0.wk"][kv_rows], w["layers.0.wv"][kv_rows]
    for n in ("w_gate", "w_up"):
        sub[f"layers.0.{n}"] = w[f"layers.0.{n}"][keep_ffn]
    sub["layers.0.w_down"] = w["layers.0.w_down"][:, keep_ffn]
    zeroed = dict(w)
    wo = np.zeros_like(w["layers.0.wo"])
    wo[:, q_rows] = w["layers.0.wo"][:, q_rows]
    down = np.zeros_like(w["layers.0.w_down"])
    down[:, keep_ffn] = w["layers.0.w_down"][:, keep_ffn]
    zeroed["layers.0.wo"], zeroed["layers.0.w_down"] = wo, down
    ids = rng.integers(0, cfg.vocab_size, (1, 6))
    cache = llama.KVCache(cfg, 1, 32, kv_heads=[len(keep_kv)])
    a, _ = run(cfg, sub, ids, cache)
    b, _ = run(cfg, zeroed, ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_zero_width_layer_is_identity_plus_nothing(rng):
    cfg = tiny_cfg(num_layers=1)
    w = tiny_weights(cfg, rng)
    for n in ("wq", "wk", "wv"):
        w[f"layers.0.{n}"] = w[f"layers.0.{n}"][:0]
    w["layers.0.wo"] = w["layers.0.wo"][:, :0]
    for n in ("w_gate", "w_up"):
        w[f"layers.0.{n}"] = w[f"layers.0.{n}"][:0]
    w["layers.0.w_down"] = w["layers.0.w_down"][:, :0]
    ids = rng.integers(0, cfg.vocab_size, (1, 4))
    cache = llama.KVCache(cfg, 1, 8, kv_heads=[0])
    out, _ = run(cfg, w, ids, cache)
    from sti.ops import rms_norm
    expect = rms_norm(w["embed"][ids], w["norm"], cfg.rms_eps) @ w["embed"].T
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.reference
def test_matches_transformers_tiny_llama(rng):
    torch = pytest.importorskip("torch", reason="reference test needs torch (make test installs it)")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(tie_embeddings=False, rope_theta=100000.0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = {}
    for canon, src in llama.HF_NAMES.items():
        for i in range(cfg.num_layers) if "{i}" in canon else [None]:
            c, s = (canon, src) if i is None else (canon.format(i=i), src.format(i=i))
            w[c] = sd[s]
    ids = rng.integers(0, cfg.vocab_size, (2, 11))
    ours, _ = run(cfg, w, ids)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- C decode kernels


needs_fastmath = pytest.mark.skipif(not llama.has_attend_one(), reason="sti._fastmath is not built (no C compiler)")


def _attention_c_and_numpy(cfg, rng, monkeypatch, pad, n_q, n_kv, dtype):
    """One decode step of attention (3 sequences, 12-slot caches of ``dtype``, slot 7) through the
    C kernel and then through the NumPy reference, each on its own copy of the same caches:
    (got, want, (got_k, got_v), (want_k, want_v), the caches as they were, the slot)."""
    B, cap, start, hd = 3, 12, 7, cfg.head_dim
    qkv = rand(rng, B, 1, (n_q + 2 * n_kv) * hd, scale=1.0)
    caches = [rand(rng, B, n_kv, cap, hd, scale=1.0).astype(dtype) for _ in range(2)]
    pos = llama.positions(start, 1, None if pad is None else np.asarray(pad))
    cos, sin = llama.rope_tables(cfg, pos)
    got_k, got_v = (c.copy() for c in caches)
    got = llama.attention(cfg, qkv, n_q, got_k, got_v, start, cos, sin, pad)
    with monkeypatch.context() as m:
        m.setattr(llama, "has_attend_one", lambda: False)  # the NumPy reference
        want_k, want_v = (c.copy() for c in caches)
        want = llama.attention(cfg, qkv, n_q, want_k, want_v, start, cos, sin, pad)
    return got, want, (got_k, got_v), (want_k, want_v), caches, start


@needs_fastmath
@pytest.mark.parametrize("pad", [None, [0, 3, 5]])
@pytest.mark.parametrize("n_q,n_kv", [(4, 2), (3, 3), (2, 1)])
def test_decode_attention_kernel_matches_numpy(rng, monkeypatch, pad, n_q, n_kv):
    cfg = tiny_cfg(num_heads=4, num_kv_heads=2, hidden_size=32)  # head_dim 8; widths below are partial
    got, want, (got_k, got_v), (want_k, want_v), caches, start = _attention_c_and_numpy(
        cfg, rng, monkeypatch, pad, n_q, n_kv, np.float32)
    assert got.shape == want.shape == (3, 1, n_q * cfg.head_dim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-6, atol=1e-6)  # this token's rotated key written at start
    np.testing.assert_array_equal(got_v, want_v)
    assert not np.array_equal(got_k[:, :, start], caches[0][:, :, start])


@needs_fastmath
def test_decode_attention_kernel_rejects_bad_shapes(rng):
    cfg = tiny_cfg()
    k = np.zeros((1, 2, 4, cfg.head_dim), np.float32)
    cos, sin = llama.rope_tables(cfg, llama.positions(0, 1))
    with pytest.raises(ValueError, match="qkv"):
        llama.attend_one(np.zeros((1, 5), np.float32), k, k.copy(), 0, cos, sin, None, 4)
    with pytest.raises(ValueError, match="inconsistent"):
        llama.attend_one(np.zeros((1, 64), np.float32), k, k.copy(), 4, cos, sin, None, 4)  # start past the cache


@needs_fastmath
def test_rms_norm_and_silu_mul_kernels_match_numpy(rng):
    from sti import ops

    x, w = rand(rng, 5, 3, 40, scale=2.0), 1 + rand(rng, 40)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-5), ops.rms_norm_numpy(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    gu = rand(rng, 4, 1, 2 * 24, scale=3.0)
    want = ops.silu(gu[..., :24]) * gu[..., 24:]
    np.testing.assert_allclose(ops.silu_mul(gu), want, rtol=1e-5, atol=1e-6)
    strided = rand(rng, 4, 1, 4 * 24)[..., ::2]  # not contiguous: the NumPy path
    np.testing.assert_allclose(ops.silu_mul(strided), ops.silu(strided[..., :24]) * strided[..., 24:], rtol=1e-6)


# --------------------------------------------------------------------------- fp16 KV cache


def test_kv_cache_dtype_and_nbytes():
    cfg = tiny_cfg()
    f32, f16 = llama.KVCache(cfg, 3, 10), llama.KVCache(cfg, 3, 10, dtype=np.float16)
    assert f32.dtype == np.float32 and f16.dtype == np.float16
    assert all(a.dtype == np.float16 for a in f16.k + f16.v)
    assert f16.nbytes * 2 == f32.nbytes == 2 * cfg.num_layers * 3 * cfg.num_kv_heads * 10 * cfg.head_dim * 4
    for dtype, name in ((np.float32, "fp32"), (np.float16, "fp16")):
        assert llama.KVCache(cfg, 1, 4, dtype=name).dtype == dtype == llama.kv_dtype(np.dtype(dtype))
        assert llama.kv_bytes_per_token(cfg, name) * 3 * 10 == llama.KVCache(cfg, 3, 10, dtype=dtype).nbytes
    assert llama.kv_bytes_per_token(cfg, "fp16") == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    assert llama.KVCache(cfg, 1, 4, kv_heads=[1, 0], dtype="fp16").nbytes == 2 * 4 * cfg.head_dim * 2


@pytest.mark.parametrize("bad", ["bf16", "float16", "", None, np.float64, np.int16, 3])
def test_kv_cache_rejects_other_dtypes(bad):
    with pytest.raises(ValueError, match="'fp32', 'fp16'"):
        llama.KVCache(tiny_cfg(), 1, 4, dtype=bad)
    with pytest.raises(ValueError, match="'fp32', 'fp16'"):
        llama.kv_bytes_per_token(tiny_cfg(), bad)


@pytest.mark.parametrize("pad", [None, [0, 2]])
def test_fp16_prefill_attends_to_rounded_values(rng, pad):
    """NumPy path, T > 1: k, v are written rounded to float16 and the new tokens attend (in float32)
    to the stored values, exactly as later tokens will."""
    cfg = tiny_cfg()
    B, T, cap, start, n_q, n_kv, hd, g = 2, 5, 12, 3, 4, 2, cfg.head_dim, 2
    qkv = rand(rng, B, T, (n_q + 2 * n_kv) * hd, scale=1.0)
    old = rand(rng, B, n_kv, cap, hd, scale=1.0).astype(np.float16)  # earlier tokens' cache contents
    pos = llama.positions(start, T, None if pad is None else np.asarray(pad))
    cos, sin = llama.rope_tables(cfg, pos)
    k16, v16 = old.copy(), old.copy()
    got = llama.attention(cfg, qkv, n_q, k16, v16, start, cos, sin, pad)
    k32, v32 = old.astype(np.float32), old.astype(np.float32)
    llama.attention(cfg, qkv, n_q, k32, v32, start, cos, sin, pad)
    np.testing.assert_array_equal(k16.view(np.uint16), k32.astype(np.float16).view(np.uint16))  # round on write
    np.testing.assert_array_equal(v16.view(np.uint16), v32.astype(np.float16).view(np.uint16))
    # the reference: float32 attention over the float16 cache's contents
    end = start + T
    q = qkv[..., :n_q * hd].reshape(B, T, n_q, hd).transpose(0, 2, 1, 3)  # (B, n_q, T, hd)
    q = llama.apply_rope(q, cos, sin).reshape(B, n_kv, g, T, hd)  # (B, n_kv, g, T, hd)
    keys, values = k16[:, :, None, :end].astype(np.float32), v16[:, :, None, :end].astype(np.float32)
    scores = (q @ keys.swapaxes(-1, -2)) / np.sqrt(hd)  # (B, n_kv, g, T, end)
    hidden = np.arange(end)[None, :] > np.arange(start, end)[:, None]  # (T, end): causal
    if pad is not None:
        hidden = hidden | (np.arange(end)[None, :] < np.asarray(pad)[:, None, None, None, None])
    p = np.exp(np.where(hidden, -np.inf, scores - scores.max(-1, keepdims=True)))
    want = (p / p.sum(-1, keepdims=True)) @ values  # (B, n_kv, g, T, hd)
    want = want.reshape(B, n_q, T, hd).transpose(0, 2, 1, 3).reshape(B, T, n_q * hd)  # (B, T, n_q*hd)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c_kernel", [False, True])
def test_fp16_cache_forward_close_to_fp32(rng, monkeypatch, c_kernel):
    if c_kernel and not llama.has_attend_one():
        pytest.skip("sti._fastmath is not built (no C compiler)")
    if not c_kernel:
        monkeypatch.setattr(llama, "has_attend_one", lambda: False)
    cfg = tiny_cfg()
    w = tiny_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, 12))
    logits = {}
    for dtype in ("fp32", "fp16"):
        prompt, cache = run(cfg, w, ids[:, :8], llama.KVCache(cfg, 2, 16, dtype=dtype))
        steps = [run(cfg, w, ids[:, t:t + 1], cache)[0] for t in range(8, 12)]  # decode: C kernel if built
        logits[dtype] = np.concatenate([prompt] + steps, axis=1)  # (2, 12, V)
        assert cache.length == 12 and cache.k[0].dtype == llama.KV_DTYPES[dtype]
    # float16 keeps 11 significant bits (each k, v element off by <= 2^-11 relative); on these logits
    # (|logit| up to ~40, the tied embedding has scale 1) the fp16 cache moved them by at most 3.0e-3
    # over 20 seeds, the same with and without the C kernel. 1e-2 leaves 3x headroom and still fails
    # on a cache write that is missing or wrong (logits then move by O(1)).
    assert not np.array_equal(logits["fp16"], logits["fp32"])
    np.testing.assert_allclose(logits["fp16"], logits["fp32"], rtol=0, atol=1e-2)


@needs_fastmath
@pytest.mark.parametrize("pad", [None, [0, 3, 5]])
@pytest.mark.parametrize("n_q,n_kv", [(4, 2), (3, 3), (2, 1)])
@pytest.mark.parametrize("head_dim", [8, 44])  # 44 = 16 + 16 + 8 + 4: every loop of the fp16 kernel
def test_decode_attention_kernel_matches_numpy_fp16(rng, monkeypatch, pad, n_q, n_kv, head_dim):
    cfg = tiny_cfg(num_heads=4, num_kv_heads=2, hidden_size=32, head_dim=head_dim)
    got, want, (got_k, got_v), (want_k, want_v), caches, start = _attention_c_and_numpy(
        cfg, rng, monkeypatch, pad, n_q, n_kv, np.float16)
    assert got.shape == want.shape == (3, 1, n_q * cfg.head_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_k.view(np.uint16), want_k.view(np.uint16))  # the same float16 bits
    np.testing.assert_array_equal(got_v.view(np.uint16), want_v.view(np.uint16))
    assert not np.array_equal(got_k[:, :, start], caches[0][:, :, start])


@needs_fastmath
def test_decode_kernel_fp16_key_rounding_is_exact(rng):
    """The rotated key is rounded to float32 as NumPy rounds it (two products, one sum) before it is
    rounded to float16: with fast math's FMA contraction ~1.5e-4 of keys came out one float16 ulp
    off, so 40k keys would show ~6 mismatches."""
    B, n_kv, n_q, hd, cap = 8, 8, 8, 64, 3
    cfg = tiny_cfg(num_heads=n_q, num_kv_heads=n_kv, head_dim=hd, max_position=4096)
    for _ in range(10):
        pad = rng.integers(0, 2000, B)  # varied rotation angles per sequence: positions 2 - pad
        cos, sin = llama.rope_tables(cfg, llama.positions(2, 1, -pad))
        qkv = rand(rng, B, 1, (n_q + 2 * n_kv) * hd, scale=3.0)
        k, v = np.zeros((2, B, n_kv, cap, hd), np.float16)
        llama.attend_one(qkv.reshape(B, -1), k, v, 2, cos.reshape(B, hd), sin.reshape(B, hd), None, n_q)
        key = qkv[..., n_q * hd:(n_q + n_kv) * hd].reshape(B, 1, n_kv, hd).transpose(0, 2, 1, 3)  # (B, n_kv, 1, hd)
        want = llama.apply_rope(key, cos, sin).astype(np.float16)
        np.testing.assert_array_equal(k[:, :, 2:3].view(np.uint16), want.view(np.uint16))


@needs_fastmath
@pytest.mark.parametrize("hd,n_q,n_kv,start", [(64, 9, 3, 41), (64, 5, 1, 41), (64, 8, 8, 41), (128, 6, 2, 41),
                                               (128, 3, 1, 41), (64, 8, 1, 300), (128, 6, 2, 300)])
def test_decode_attention_kernel_matches_numpy_at_real_head_sizes(rng, hd, n_q, n_kv, start):
    """Head sizes 64 and 128 over float16 caches take the AVX-512 kernel where it is built (query
    heads of a KV head in groups of up to 4, resp. 2): 1..9 heads per KV head, 16-key blocks and
    remainders, padded sequences, and contexts longer than two heads (a group's second round of
    heads reads queries that its first round's scores must not overwrite)."""
    B, cap = 3, start + 19
    cfg = tiny_cfg(num_heads=n_q, num_kv_heads=n_kv, head_dim=hd)
    pad = np.array([0, 9, 25])
    cos, sin = llama.rope_tables(cfg, llama.positions(start, 1, pad))
    qkv = rand(rng, B, 1, (n_q + 2 * n_kv) * hd, scale=1.0)
    caches = [rand(rng, B, n_kv, cap, hd, scale=1.0).astype(np.float16) for _ in range(2)]
    got_k, got_v = (c.copy() for c in caches)
    got = llama.attention(cfg, qkv, n_q, got_k, got_v, start, cos, sin, pad)
    want_k, want_v = (c.copy() for c in caches)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(llama, "has_attend_one", lambda: False)  # the NumPy reference
        want = llama.attention(cfg, qkv, n_q, want_k, want_v, start, cos, sin, pad)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_k.view(np.uint16), want_k.view(np.uint16))
    np.testing.assert_array_equal(got_v.view(np.uint16), want_v.view(np.uint16))


@needs_fastmath
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_decode_attention_kernel_gives_the_same_bits_on_any_thread_count(rng, dtype):
    """The (sequence, KV head) tasks split across sti._lowbit's pool: two threads write the same
    caches and context as one, and both agree with the NumPy reference."""
    B, n_q, n_kv, hd, cap, start = 5, 6, 2, 16, 40, 33
    cfg = tiny_cfg(num_heads=n_q, num_kv_heads=n_kv, head_dim=hd)
    pad = np.array([0, 3, 0, 30, 1])
    cos, sin = llama.rope_tables(cfg, llama.positions(start, 1, pad))
    qkv = rand(rng, B, 1, (n_q + 2 * n_kv) * hd, scale=1.0)
    caches = [rand(rng, B, n_kv, cap, hd, scale=1.0).astype(dtype) for _ in range(2)]
    runs = []
    for threads in (1, 2, 2):
        k, v = (c.copy() for c in caches)
        out = llama.attend_one(qkv.reshape(B, -1), k, v, start, cos.reshape(B, hd), sin.reshape(B, hd), pad, n_q,
                               threads=threads)
        runs.append((out, k, v))
    for out, k, v in runs[1:]:
        np.testing.assert_array_equal(out, runs[0][0])
        np.testing.assert_array_equal(k.view(np.uint8), runs[0][1].view(np.uint8))
        np.testing.assert_array_equal(v.view(np.uint8), runs[0][2].view(np.uint8))
    want_k, want_v = (c.copy() for c in caches)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(llama, "has_attend_one", lambda: False)  # the NumPy reference
        want = llama.attention(cfg, qkv, n_q, want_k, want_v, start, cos, sin, pad)
    np.testing.assert_allclose(runs[1][0], want.reshape(B, -1), rtol=1e-5, atol=1e-6)


@needs_fastmath
def test_decode_attention_kernel_rejects_bad_cache_dtypes(rng):
    from sti import _fastmath

    cfg = tiny_cfg()
    hd = cfg.head_dim
    k32 = np.zeros((1, 2, 4, hd), np.float32)
    cos, sin = llama.rope_tables(cfg, llama.positions(0, 1))
    qkv = np.zeros((1, 8 * hd), np.float32)
    for k, v in ((k32, k32.astype(np.float16)), (k32.astype(np.float16), k32), (k32.astype(np.float64),) * 2,
                 (k32.view(np.int32),) * 2, (k32.astype(np.int16),) * 2):
        with pytest.raises(ValueError, match="both be float32 or both float16"):
            llama.attend_one(qkv, k, v.copy(), 0, cos, sin, None, 4)
    out = np.empty((1, 4 * hd), np.float32)
    with pytest.raises(ValueError, match="float16 buffer"):  # the C side checks the element size too
        _fastmath.attend_one(qkv, k32, k32.copy(), 0, cos, sin, None, 4, out, k32.shape, 2)
    with pytest.raises(ValueError, match="kv_elsize"):
        _fastmath.attend_one(qkv, k32, k32.copy(), 0, cos, sin, None, 4, out, k32.shape, 8)


def _f16_conversion_inputs(rng) -> np.ndarray:
    """float32 values that probe float32 -> float16 rounding: random bit patterns of every exponent,
    every half and the midpoints between neighbouring halves (ties, and one float32 ulp either side),
    the subnormal and overflow boundaries, infinities, zeros and NaNs (quiet, signalling, payloads)."""
    halves = np.arange(0x7c00, dtype=np.uint16).view(np.float16).astype(np.float64)  # 0 .. 65504
    mid = ((halves[:-1] + halves[1:]) / 2).astype(np.float32).view(np.uint32)  # exact in float32
    edges = np.concatenate([np.arange(b - 64, b + 64, dtype=np.uint32) for b in (
        0x33000000,  # 2^-25: half the smallest subnormal (ties to zero)
        0x33400000,  # 1.5 * 2^-25
        0x387fc000,  # 2^-14 - 2^-25: the tie below the smallest normal
        0x38800000,  # 2^-14, the smallest normal half
        0x477fe000,  # 65504, the largest half
        0x477ff000,  # 65520: overflows to inf
        0x7f800000,  # inf, NaNs above it
        0x7fc00000,  # the quiet NaN
    )])
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           halves.astype(np.float32).view(np.uint32), mid, mid - 1, mid + 1, edges,
                           np.array([0, 1, 0x007fffff, 0x00800000, 0x7f7fffff, 0x7f800001, 0x7fbfffff], np.uint32)])
    return np.concatenate([bits, bits | 0x80000000]).view(np.float32)


@needs_fastmath
@pytest.mark.parametrize("portable", [False, True])
def test_f16_conversions_match_numpy(rng, portable):
    """The fp16 cache's conversions, float32 -> float16 (round to nearest even, subnormals, overflow to
    inf) and back, against numpy's. ``portable``: the integer code a build without F16C uses (this
    tests it on any machine); otherwise the conversions this build's kernel uses. The portable code
    keeps numpy's NaN payloads too; F16C quiets a signalling NaN (it stays a NaN)."""
    from sti import _fastmath

    x = _f16_conversion_inputs(rng)
    nan = np.isnan(x)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = np.empty(x.size, np.uint16)
    _fastmath.f16_convert(x, got, portable)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()
    if portable or not _fastmath.F16C:
        np.testing.assert_array_equal(got, want)
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # every float16, back to float32 (exact)
    back, want_back = np.empty(h.size, np.float32), h.view(np.float16).astype(np.float32)
    _fastmath.f16_convert(h, back, portable)
    nan = np.isnan(want_back)
    np.testing.assert_array_equal(back[~nan].view(np.uint32), want_back[~nan].view(np.uint32))
    assert np.isnan(back[nan]).all()
    if portable or not _fastmath.F16C:
        np.testing.assert_array_equal(back.view(np.uint32), want_back.view(np.uint32))
