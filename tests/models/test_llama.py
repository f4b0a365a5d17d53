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


@needs_fastmath
@pytest.mark.parametrize("pad", [None, [0, 3, 5]])
@pytest.mark.parametrize("n_q,n_kv", [(4, 2), (3, 3), (2, 1)])
def test_decode_attention_kernel_matches_numpy(rng, monkeypatch, pad, n_q, n_kv):
    cfg = tiny_cfg(num_heads=4, num_kv_heads=2, hidden_size=32)  # head_dim 8; widths below are partial
    B, cap, start, hd = 3, 12, 7, cfg.head_dim
    qkv = rand(rng, B, 1, (n_q + 2 * n_kv) * hd, scale=1.0)
    caches = [rand(rng, B, n_kv, cap, hd, scale=1.0) for _ in range(2)]
    pos = llama.positions(start, 1, None if pad is None else np.asarray(pad))
    cos, sin = llama.rope_tables(cfg, pos)
    got_k, got_v = (c.copy() for c in caches)
    got = llama.attention(cfg, qkv, n_q, got_k, got_v, start, cos, sin, pad)
    monkeypatch.setattr(llama, "has_attend_one", lambda: False)  # the NumPy reference
    want_k, want_v = (c.copy() for c in caches)
    want = llama.attention(cfg, qkv, n_q, want_k, want_v, start, cos, sin, pad)
    assert got.shape == want.shape == (B, 1, n_q * hd)
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
