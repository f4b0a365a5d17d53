"""BERT-family encoder (post-LN) as NumPy functions over per-layer weight dicts.

Layer weights use the canonical names of ``LAYER_NAMES``; a layer dict may hold only some
attention heads (rows of wq/wk/wv and matching columns of wo) and only some FFN neurons
(rows of w_up/b_up and columns of w_down). The layer runs at whatever width it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from sti.ops import gelu_, layer_norm, layer_norm_, linear, matmul_add, softmax_


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, d: Mapping) -> "BertConfig":
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position=d["max_position_embeddings"],
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            pad_token_id=d.get("pad_token_id", 0) or 0,
        )


# Canonical name -> Hugging Face checkpoint name ("{i}" is the layer index).
HF_NAMES = {
    "embed.word": "embeddings.word_embeddings.weight",
    "embed.pos": "embeddings.position_embeddings.weight",
    "embed.type": "embeddings.token_type_embeddings.weight",
    "embed.ln_w": "embeddings.LayerNorm.weight",
    "embed.ln_b": "embeddings.LayerNorm.bias",
    "layers.{i}.wq": "encoder.layer.{i}.attention.self.query.weight",
    "layers.{i}.bq": "encoder.layer.{i}.attention.self.query.bias",
    "layers.{i}.wk": "encoder.layer.{i}.attention.self.key.weight",
    "layers.{i}.bk": "encoder.layer.{i}.attention.self.key.bias",
    "layers.{i}.wv": "encoder.layer.{i}.attention.self.value.weight",
    "layers.{i}.bv": "encoder.layer.{i}.attention.self.value.bias",
    "layers.{i}.wo": "encoder.layer.{i}.attention.output.dense.weight",
    "layers.{i}.bo": "encoder.layer.{i}.attention.output.dense.bias",
    "layers.{i}.ln1_w": "encoder.layer.{i}.attention.output.LayerNorm.weight",
    "layers.{i}.ln1_b": "encoder.layer.{i}.attention.output.LayerNorm.bias",
    "layers.{i}.w_up": "encoder.layer.{i}.intermediate.dense.weight",
    "layers.{i}.b_up": "encoder.layer.{i}.intermediate.dense.bias",
    "layers.{i}.w_down": "encoder.layer.{i}.output.dense.weight",
    "layers.{i}.b_down": "encoder.layer.{i}.output.dense.bias",
    "layers.{i}.ln2_w": "encoder.layer.{i}.output.LayerNorm.weight",
    "layers.{i}.ln2_b": "encoder.layer.{i}.output.LayerNorm.bias",
}
HF_PREFIXES = ("bert.", "model.")
LAYER_NAMES = tuple(k.split(".", 2)[2] for k in HF_NAMES if k.startswith("layers."))
GLOBAL_NAMES = tuple(k for k in HF_NAMES if not k.startswith("layers."))


def layer_weights(weights: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """The dict one layer runs on, from a flat canonical-name mapping."""
    return {n: weights[f"layers.{i}.{n}"] for n in LAYER_NAMES}


def embed(cfg: BertConfig, g: Mapping[str, np.ndarray], ids: np.ndarray,
          type_ids: np.ndarray | None = None) -> np.ndarray:
    """Token ids (B, T) -> embeddings (B, T, H)."""
    T = ids.shape[1]
    x = g["embed.word"][ids] + g["embed.pos"][:T][None]
    x += g["embed.type"][0 if type_ids is None else type_ids]
    return layer_norm(x, g["embed.ln_w"], g["embed.ln_b"], cfg.layer_norm_eps)


def attention_bias(mask: np.ndarray) -> np.ndarray | None:
    """Padding mask (B, T) of 1/0 -> additive bias (B, 1, 1, T); None when nothing is padded."""
    if mask.all():
        return None
    return np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)


def _heads(y: np.ndarray, nh: int, hd: int, axes: tuple[int, ...]) -> np.ndarray:
    """(B, T, nh*hd) -> heads split out and permuted by ``axes``, as a contiguous array."""
    B, T, _ = y.shape
    return np.ascontiguousarray(y.reshape(B, T, nh, hd).transpose(axes))


def layer(cfg: BertConfig, x: np.ndarray, bias: np.ndarray | None, w: Mapping[str, np.ndarray]) -> np.ndarray:
    """One post-LN encoder layer at the width its weights have. x: (B, T, H)."""
    B, T, H = x.shape
    hd = cfg.head_dim
    nh = w["wq"].shape[0] // hd  # active heads
    if nh:
        # contiguous copies: NumPy's batched matmul on strided stacks skips BLAS (~500x slower)
        q = _heads(linear(x, w["wq"], w["bq"]), nh, hd, (0, 2, 1, 3))  # (B, nh, T, hd)
        k = _heads(linear(x, w["wk"], w["bk"]), nh, hd, (0, 2, 3, 1))  # (B, nh, hd, T)
        v = _heads(linear(x, w["wv"], w["bv"]), nh, hd, (0, 2, 1, 3))  # (B, nh, T, hd)
        q *= np.float32(1.0 / np.sqrt(hd))  # scale the (T, hd) queries, not the (T, T) scores
        scores = q @ k
        if bias is not None:
            scores += bias
        ctx = (softmax_(scores) @ v).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)  # (B, T, nh*hd)
        attn = linear(ctx, w["wo"], w["bo"])
    else:
        attn = np.broadcast_to(w["bo"], x.shape)
    x = layer_norm_(x + attn, w["ln1_w"], w["ln1_b"], cfg.layer_norm_eps)
    if w["w_up"].shape[0]:
        ffn = linear(gelu_(linear(x, w["w_up"], w["b_up"])), w["w_down"], w["b_down"])
    else:
        ffn = np.broadcast_to(w["b_down"], x.shape)
    return layer_norm_(x + ffn, w["ln2_w"], w["ln2_b"], cfg.layer_norm_eps)


def encode(cfg: BertConfig, g: Mapping[str, np.ndarray], layers: Iterable[Mapping[str, np.ndarray]],
           ids: np.ndarray, mask: np.ndarray, type_ids: np.ndarray | None = None) -> np.ndarray:
    """ids, mask (B, T) -> last hidden states (B, T, H). ``layers`` yields each layer's
    weights in order, so a runtime may produce them as they arrive from storage."""
    x = embed(cfg, g, ids, type_ids)
    bias = attention_bias(mask)
    for w in layers:
        x = layer(cfg, x, bias, w)
    return x


def mean_pool(h: np.ndarray, mask: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Mean of the unpadded token states (B, T, H) -> (B, H), L2-normalised (sentence-transformers recipe)."""
    m = mask[..., None].astype(np.float32)
    e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    if normalize:
        e /= np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


# A streamed layer runs chunk by chunk so that only a few shards are ever dequantized at once.
# The runtime hands each chunk's weights over in four parts, each array holding the chunk's
# shards one after another along its rows: first q, k and v of every chunk (one matrix product
# per chunk), then attention over all active heads at once, then the output projection of every
# chunk, then, after the first LayerNorm, the FFN of every chunk (neuron slices are independent;
# their down projections add up). STREAM_PARTS: part -> array -> the shard tensors stacked
# into it (every shard's rows of the first, then of the second, ...).
STREAM_PARTS = {
    "qkv": {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv")},
    "o": {"wo_t": ("wo_t",)},
    "up": {"w_up": ("w_up",), "b_up": ("b_up",)},
    "down": {"w_down_t": ("w_down_t",)},
}


def streamed_layer(cfg: BertConfig, x: np.ndarray, bias: np.ndarray | None, common: Mapping[str, np.ndarray],
                   chunks: list, load: Callable[[object, str], Mapping[str, np.ndarray]]) -> np.ndarray:
    """``layer`` computed chunk by chunk: ``load(chunk, part)`` returns the ``STREAM_PARTS[part]``
    arrays of a group of shards (one attention head and one FFN neuron slice each), valid until
    the next ``load`` call (so only one part of one chunk is ever dequantized), or operators of
    ``sti.ops`` for the matrices (``linear``, ``matmul_add``). Equals ``layer`` on the same
    shards up to float rounding."""
    B, T, H = x.shape
    hd = cfg.head_dim
    x2 = x.reshape(B * T, H)
    sizes = [len(c) for c in chunks]
    nh = sum(sizes)
    attn = np.zeros_like(x2)
    if nh:
        qkv = np.empty((B * T, 3, nh, hd), np.float32)  # every chunk's heads, in chunk order
        h0 = 0
        for c, n in zip(chunks, sizes):
            w = load(c, "qkv")
            qkv[:, :, h0:h0 + n] = linear(x2, w["wqkv"], w["bqkv"]).reshape(B * T, 3, n, hd)
            h0 += n
        qkv = qkv.reshape(B, T, 3, nh, hd)
        q = np.ascontiguousarray(qkv[:, :, 0].transpose(0, 2, 1, 3))  # (B, nh, T, hd)
        k = np.ascontiguousarray(qkv[:, :, 1].transpose(0, 2, 3, 1))  # (B, nh, hd, T)
        v = np.ascontiguousarray(qkv[:, :, 2].transpose(0, 2, 1, 3))  # (B, nh, T, hd)
        q *= np.float32(1.0 / np.sqrt(hd))
        scores = q @ k
        if bias is not None:
            scores += bias
        ctx = (softmax_(scores) @ v).transpose(0, 2, 1, 3).reshape(B * T, nh * hd)  # (B*T, nh*hd)
        h0 = 0
        for c, n in zip(chunks, sizes):
            matmul_add(attn, ctx[:, h0 * hd:(h0 + n) * hd], load(c, "o")["wo_t"])
            h0 += n
    attn += common["bo"]
    x2 = layer_norm_(x2 + attn, common["ln1_w"], common["ln1_b"], cfg.layer_norm_eps)
    ffn = np.zeros_like(x2)
    for c in chunks:
        up = load(c, "up")
        h = gelu_(linear(x2, up["w_up"], up["b_up"]))  # (B*T, n*f)
        matmul_add(ffn, h, load(c, "down")["w_down_t"])
    ffn += common["b_down"]
    return layer_norm_(x2 + ffn, common["ln2_w"], common["ln2_b"], cfg.layer_norm_eps).reshape(B, T, H)
