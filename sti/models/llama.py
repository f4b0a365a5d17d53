"""LLaMA-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) as NumPy functions
over per-layer weight dicts, with a KV cache and the two regimes of generation: ``prefill``
(a prompt, matrix-matrix) and ``decode_one_token`` (one token, matrix-vector).

A layer dict may hold a subset of KV-head groups (rows of wk/wv, the rows of wq of the query
heads in those groups, the matching columns of wo) and a subset of FFN neurons; the layer runs
at the width it is given.

The KV cache holds float32 or, as llama.cpp does by default, float16 keys and values (half the
memory): k and v are rounded to float16 when written and attention computes in float32 from the
stored values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from sti.linops import exact_products
from sti.ops import ATTEND_ONE_DTYPES, attend_one, has_attend_one, linear, rms_norm, silu, silu_mul, softmax_


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_heads

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, d: Mapping) -> "LlamaConfig":
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position=d.get("max_position_embeddings", 2048),
            rope_theta=float(d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rms_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim=d.get("head_dim") or 0,
        )

    @classmethod
    def from_gguf(cls, meta: Mapping, tie_embeddings: bool) -> "LlamaConfig":
        a = meta["general.architecture"]
        n_heads = int(meta[f"{a}.attention.head_count"])
        hidden = int(meta[f"{a}.embedding_length"])
        return cls(
            vocab_size=int(meta.get(f"{a}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
            hidden_size=hidden,
            num_layers=int(meta[f"{a}.block_count"]),
            num_heads=n_heads,
            num_kv_heads=int(meta.get(f"{a}.attention.head_count_kv", n_heads)),
            intermediate_size=int(meta[f"{a}.feed_forward_length"]),
            max_position=int(meta.get(f"{a}.context_length", 2048)),
            rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
            rms_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings=tie_embeddings,
            head_dim=int(meta.get(f"{a}.attention.key_length", 0) or 0),
        )


# Canonical name -> checkpoint name, per source format ("{i}" is the layer index).
# "lm_head" is absent from checkpoints with tied embeddings.
HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.wq": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.wk": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.wv": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.wo": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.w_up": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.w_down": "model.layers.{i}.mlp.down_proj.weight",
}
GGUF_NAMES = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "layers.{i}.attn_norm": "blk.{i}.attn_norm.weight",
    "layers.{i}.wq": "blk.{i}.attn_q.weight",
    "layers.{i}.wk": "blk.{i}.attn_k.weight",
    "layers.{i}.wv": "blk.{i}.attn_v.weight",
    "layers.{i}.wo": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm": "blk.{i}.ffn_norm.weight",
    "layers.{i}.w_gate": "blk.{i}.ffn_gate.weight",
    "layers.{i}.w_up": "blk.{i}.ffn_up.weight",
    "layers.{i}.w_down": "blk.{i}.ffn_down.weight",
}
# GGUF llama files store wq/wk rows interleaved for RoPE on adjacent pairs; STI (like the HF
# layout) rotates the two halves of each head, so those rows are un-permuted at load.
GGUF_ROPE_PERMUTED = {"layers.{i}.wq": "num_heads", "layers.{i}.wk": "num_kv_heads"}
GGUF_ARCHITECTURES = ("llama",)
LAYER_NAMES = tuple(k.split(".", 2)[2] for k in HF_NAMES if k.startswith("layers."))
# Matrices a runtime may stack by rows into one, so that one matrix-vector product reads the
# input once for all of them (``layer`` accepts either form).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
GLOBAL_NAMES = tuple(k for k in HF_NAMES if not k.startswith("layers."))


def layer_weights(weights: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {n: weights[f"layers.{i}.{n}"] for n in LAYER_NAMES}


# Element types of the KV cache, by name: float32, or float16 as llama.cpp's default KV cache
# (half the memory; keys and values rounded to nearest even when written).
KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def kv_dtype(dtype) -> np.dtype:
    """The KV-cache element type named by ``dtype``: "fp32" or "fp16" (:data:`KV_DTYPES`), or
    np.float32 / np.float16 (a type or a dtype). Anything else is a ValueError."""
    if isinstance(dtype, str):
        if dtype in KV_DTYPES:
            return np.dtype(KV_DTYPES[dtype])
    elif dtype is not None:  # np.dtype(None) would be float64
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt is not None and any(dt == t for t in KV_DTYPES.values()):
            return dt
    raise ValueError(f"KV cache dtype {dtype!r} is not one of {', '.join(map(repr, KV_DTYPES))} "
                     f"or np.float32, np.float16")


def kv_bytes_per_token(cfg: LlamaConfig, dtype=np.float32) -> int:
    """Bytes of K and V of one token of one sequence across all layers, at full KV width."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_dtype(dtype).itemsize


class KVCache:
    """Keys and values of every layer for a batch: (B, n_kv, capacity, hd) each, filled to ``length``.
    ``dtype``: float32, or float16 ("fp16", half the bytes; see :func:`kv_dtype`)."""

    def __init__(self, cfg: LlamaConfig, batch: int, capacity: int, kv_heads: list[int] | None = None,
                 dtype=np.float32):
        self.capacity = capacity
        self.length = 0
        self.dtype = kv_dtype(dtype)
        self.pad: np.ndarray | None = None  # (B,) left-padding slots per sequence of a batch
        heads = kv_heads or [cfg.num_kv_heads] * cfg.num_layers
        self.k = [np.zeros((batch, h, capacity, cfg.head_dim), self.dtype) for h in heads]
        self.v = [np.zeros((batch, h, capacity, cfg.head_dim), self.dtype) for h in heads]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


def rope_tables(cfg: LlamaConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin for RoPE over the two halves of each head: (T, hd) for positions (T,), or
    (B, 1, T, hd) for per-sequence positions (B, T) (a left-padded batch)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = positions.astype(np.float64)[..., None] * inv_freq  # (..., T, hd/2)
    ang = np.concatenate([ang, ang], axis=-1)
    if ang.ndim == 3:
        ang = ang[:, None]  # (B, 1, T, hd): broadcast over heads
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def positions(start: int, T: int, pad: np.ndarray | None = None) -> np.ndarray:
    """Positions of cache slots start..start+T-1: (T,), or (B, T) counted from each sequence's
    first real token when ``pad`` (B,) left-pad slots precede it."""
    p = np.arange(start, start + T)
    return p if pad is None else p[None, :] - np.asarray(pad)[:, None]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (B, n, T, hd); rotates (x1, x2) halves: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def attention(cfg: LlamaConfig, qkv: np.ndarray, n_q: int, k_cache: np.ndarray, v_cache: np.ndarray,
              start: int, cos: np.ndarray, sin: np.ndarray, pad: np.ndarray | None = None) -> np.ndarray:
    """Grouped-query attention of T new tokens per sequence: qkv (B, T, (n_q + 2 n_kv) hd) holds
    their q, k, v before RoPE; k and v go into the caches (B, n_kv, cap, hd) at slots
    start..start+T-1. Returns the context (B, T, n_q hd). ``pad`` (B,): sequence b's first
    ``pad[b]`` cache slots are left padding, never attended to. One token per sequence (decode)
    runs in C when built (:func:`sti.ops.attend_one`); this NumPy code is its reference.

    float16 caches get k and v rounded to nearest even (``astype(np.float16)``) when written; the
    scores and the weighted sum are then computed in float32 from the stored values, so the new
    tokens attend to their own rounded k and v exactly as later tokens will."""
    B, T, _ = qkv.shape
    hd, n_kv = cfg.head_dim, k_cache.shape[1]
    if (T == 1 and has_attend_one() and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous
            and k_cache.dtype == v_cache.dtype and k_cache.dtype in ATTEND_ONE_DTYPES):
        ctx = attend_one(np.ascontiguousarray(qkv.reshape(B, -1)), k_cache, v_cache, start,
                         np.ascontiguousarray(cos.reshape(-1, hd)), np.ascontiguousarray(sin.reshape(-1, hd)), pad, n_q)
        return ctx.reshape(B, 1, n_q * hd)
    g = n_q // n_kv
    q, k, v = np.split(qkv, [n_q * hd, (n_q + n_kv) * hd], axis=-1)
    q = q.reshape(B, T, n_q, hd).transpose(0, 2, 1, 3)  # (B, n_q, T, hd)
    k = k.reshape(B, T, n_kv, hd).transpose(0, 2, 1, 3)  # (B, n_kv, T, hd)
    v = v.reshape(B, T, n_kv, hd).transpose(0, 2, 1, 3)
    q = apply_rope(q, cos, sin)
    end = start + T
    k_cache[:, :, start:end] = apply_rope(k, cos, sin).astype(k_cache.dtype, copy=False)  # fp16: nearest even
    v_cache[:, :, start:end] = v.astype(v_cache.dtype, copy=False)
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, n_kv, end, hd)
    if keys.dtype != np.float32:  # an fp16 cache: float32 copies of the stored (rounded) values
        keys, values = keys.astype(np.float32), values.astype(np.float32)
    q = q.reshape(B, n_kv, g * T, hd)  # (B, n_kv, g*T, hd): query heads grouped by their KV head
    scores = q @ keys.transpose(0, 1, 3, 2)  # (B, n_kv, g*T, end)
    scores *= np.float32(1.0 / np.sqrt(hd))
    hidden = None  # (..., g*T, end): True where a query must not see a key
    if T > 1:  # causal: query t (at start+t) sees keys 0..start+t
        hidden = np.arange(end)[None, :] > np.tile(np.arange(start, end), g)[:, None]
    if pad is not None and np.any(pad):  # left padding of each sequence: (B, 1, 1, end)
        padding = (np.arange(end)[None, :] < np.asarray(pad)[:, None])[:, None, None, :]
        hidden = padding if hidden is None else hidden | padding
    if hidden is not None:
        scores += np.where(hidden, np.finfo(np.float32).min, np.float32(0)).astype(np.float32)
    ctx = softmax_(scores) @ values  # (B, n_kv, g*T, hd)
    return ctx.reshape(B, n_q, T, hd).transpose(0, 2, 1, 3).reshape(B, T, n_q * hd)  # (B, T, n_q*hd)


def layer(cfg: LlamaConfig, x: np.ndarray, w: Mapping[str, np.ndarray], k_cache: np.ndarray,
          v_cache: np.ndarray, start: int, cos: np.ndarray, sin: np.ndarray,
          pad: np.ndarray | None = None) -> np.ndarray:
    """One decoder layer on x (B, T, H) at cache slots start..start+T-1; writes this layer's KV.
    ``pad`` (B,): sequence b's first ``pad[b]`` cache slots are left padding, never attended to."""
    h = rms_norm(x, w["attn_norm"], cfg.rms_eps)
    if "wqkv" in w:  # wq, wk, wv stacked by rows (FUSED): one pass over h for all three
        n_q, qkv = cfg.num_heads, linear(h, w["wqkv"])
    else:
        n_q = w["wq"].shape[0] // cfg.head_dim
        qkv = np.concatenate([linear(h, w[n]) for n in ("wq", "wk", "wv")], axis=-1) if n_q else None
    if n_q:
        x = x + linear(attention(cfg, qkv, n_q, k_cache, v_cache, start, cos, sin, pad), w["wo"])
    h = rms_norm(x, w["ffn_norm"], cfg.rms_eps)
    if "w_gate_up" in w:  # w_gate and w_up stacked by rows (FUSED)
        x = x + linear(silu_mul(linear(h, w["w_gate_up"])), w["w_down"])
    elif w["w_up"].shape[0]:
        x = x + linear(silu(linear(h, w["w_gate"])) * linear(h, w["w_up"]), w["w_down"])
    return x


def forward(cfg: LlamaConfig, g: Mapping[str, np.ndarray], layers: Iterable[Mapping[str, np.ndarray]],
            ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
    """ids (B, T) appended at cache.length -> logits (B, T, V) if all_logits else (B, V) of the
    last token. A left-padded batch sets ``cache.pad`` (B,) before its first call."""
    B, T = ids.shape
    start = cache.length
    if start + T > cache.capacity:
        raise ValueError(f"KV cache full: {start} + {T} > {cache.capacity}")
    cos, sin = rope_tables(cfg, positions(start, T, cache.pad))
    with exact_products(T > 1):  # a prompt's tokens: no int8 products (decode steps of a batch may)
        x = g["embed"][ids]  # (B, T, H)
        for i, w in enumerate(layers):
            x = layer(cfg, x, w, cache.k[i], cache.v[i], start, cos, sin, cache.pad)
        cache.length = start + T
        if not all_logits:
            x = x[:, -1]
        x = rms_norm(x, g["norm"], cfg.rms_eps)
        return linear(x, g["embed"] if cfg.tie_embeddings else g["lm_head"])


def prefill(cfg, g, layers, ids: np.ndarray, cache: KVCache) -> np.ndarray:
    """Run a prompt (B, T) into the cache; logits (B, V) of its last token."""
    return forward(cfg, g, layers, ids, cache)


def decode_one_token(cfg, g, layers, token: np.ndarray, cache: KVCache) -> np.ndarray:
    """One new token per sequence (B,) -> next-token logits (B, V)."""
    return forward(cfg, g, layers, token[:, None], cache)
