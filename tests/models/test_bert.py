import numpy as np
import pytest

from conftest import builtin_or_skip, rand
from sti.models import bert


def tiny_cfg():
    return bert.BertConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=4,
                           intermediate_size=40, max_position=16)


def tiny_weights(cfg, rng):
    H, F = cfg.hidden_size, cfg.intermediate_size
    g = {"embed.word": rand(rng, cfg.vocab_size, H, scale=1), "embed.pos": rand(rng, cfg.max_position, H),
         "embed.type": rand(rng, 2, H), "embed.ln_w": 1 + rand(rng, H), "embed.ln_b": rand(rng, H)}
    layers = []
    for _ in range(cfg.num_layers):
        layers.append({
            "wq": rand(rng, H, H), "bq": rand(rng, H), "wk": rand(rng, H, H), "bk": rand(rng, H),
            "wv": rand(rng, H, H), "bv": rand(rng, H), "wo": rand(rng, H, H), "bo": rand(rng, H),
            "ln1_w": 1 + rand(rng, H), "ln1_b": rand(rng, H), "w_up": rand(rng, F, H), "b_up": rand(rng, F),
            "w_down": rand(rng, H, F), "b_down": rand(rng, H), "ln2_w": 1 + rand(rng, H), "ln2_b": rand(rng, H)})
    return g, layers


def test_padding_does_not_change_unpadded_states(rng):
    cfg = tiny_cfg()
    g, layers = tiny_weights(cfg, rng)
    ids = rng.integers(1, cfg.vocab_size, (1, 5))
    alone = bert.encode(cfg, g, layers, ids, np.ones_like(ids))
    padded = np.concatenate([ids, np.zeros((1, 4), ids.dtype)], 1)
    mask = (padded > 0).astype(np.int64)
    batch = bert.encode(cfg, g, layers, padded, mask)
    np.testing.assert_allclose(batch[:, :5], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bert.mean_pool(batch, mask), bert.mean_pool(alone, np.ones_like(ids)), atol=1e-6)


def test_elastic_heads_equal_zeroed_output_columns(rng):
    cfg = tiny_cfg()
    g, layers = tiny_weights(cfg, rng)
    hd = cfg.head_dim
    keep = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in (0, 2)])
    neurons = np.arange(0, cfg.intermediate_size, 3)
    sub, zeroed = [], []
    for w in layers:
        s = dict(w)
        for n in ("wq", "wk", "wv"):
            s[n] = w[n][keep]
        for n in ("bq", "bk", "bv"):
            s[n] = w[n][keep]
        s["wo"] = w["wo"][:, keep]
        s["w_up"], s["b_up"], s["w_down"] = w["w_up"][neurons], w["b_up"][neurons], w["w_down"][:, neurons]
        sub.append(s)
        z = dict(w)
        z["wo"] = np.zeros_like(w["wo"])
        z["wo"][:, keep] = w["wo"][:, keep]
        z["w_down"] = np.zeros_like(w["w_down"])
        z["w_down"][:, neurons] = w["w_down"][:, neurons]
        zeroed.append(z)
    ids = rng.integers(1, cfg.vocab_size, (2, 7))
    mask = np.ones_like(ids)
    np.testing.assert_allclose(bert.encode(cfg, g, sub, ids, mask), bert.encode(cfg, g, zeroed, ids, mask),
                               rtol=1e-5, atol=1e-5)


def test_gelu_matches_exact_erf():
    from math import erf, sqrt

    from sti.ops import gelu, gelu_numpy

    x = np.linspace(-8, 8, 2001).astype(np.float32)
    exact = np.array([0.5 * v * (1 + erf(v / sqrt(2))) for v in x.astype(np.float64)])
    assert np.abs(gelu(x) - exact).max() < 2e-6
    assert np.abs(gelu_numpy(x) - exact).max() < 2e-6


@pytest.mark.reference
def test_minilm_matches_transformers():
    torch = pytest.importorskip("torch", reason="reference test needs torch (make test installs it)")
    transformers = pytest.importorskip("transformers")
    path = builtin_or_skip("minilm")
    from sti.api import Encoder

    enc = Encoder.load("minilm")
    ref = transformers.AutoModel.from_pretrained(str(path)).eval()
    batches = [
        ["A single short sentence."],
        ["Shares in the bank fell sharply after its results.", "Hi",
         "The quick brown fox jumps over the lazy dog " * 12],  # padded batch of very different lengths
        ["Numbers 1234 and ünïcödé, punctuation!?"],
    ]
    for texts in batches:
        ids, mask = enc.tokenize(texts)
        ours = enc.hidden_states(ids, mask)
        with torch.no_grad():
            theirs = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
        m = mask[..., None].astype(bool)
        assert np.abs(np.where(m, ours - theirs, 0)).max() <= 1e-4


def test_gelu_c_kernel_agrees_with_numpy_fallback():
    from sti import ops

    if ops._gelu_c is None:
        pytest.skip("C kernel sti._fastmath not built (no compiler/libmvec); the NumPy path is in use")
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 4
    c = ops.gelu(x)
    assert np.abs(c - ops.gelu_numpy(x)).max() < 1e-6
    assert not np.shares_memory(c, x)


def test_softmax_kernel_agrees_with_numpy():
    from sti import ops

    x = np.random.default_rng(2).standard_normal((3, 5, 77)).astype(np.float32) * 5
    x[0, 0, :10] = np.finfo(np.float32).min  # masked keys
    ref = ops.softmax_numpy(x)
    got = ops.softmax_(x.copy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1, rtol=1e-5)


def test_layer_norm_kernel_agrees_with_numpy():
    from sti import ops

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 7, 384)).astype(np.float32) * 3 + 1
    w, b = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    np.testing.assert_allclose(ops.layer_norm_(x.copy(), w, b, 1e-12), ops.layer_norm(x, w, b, 1e-12),
                               rtol=1e-5, atol=2e-5)
