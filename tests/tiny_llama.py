"""Tiny random LLaMA models written as real checkpoints (a GGUF file, a Hugging Face directory),
for fast tests of stores and decoder runtimes."""

import json

import numpy as np

from sti.models import llama

# 2 KV-head groups of 2 query heads: wo's per-group column slice is 2 * 16 = 32 columns and the
# FFN slice 64, whole Q4_1 / Q8_0 blocks (32 weights), so the GGUF's own blocks can be sharded
CFG = llama.LlamaConfig(vocab_size=259, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=128, max_position=64, rope_theta=10000.0, rms_eps=1e-5,
                        tie_embeddings=True)
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def weights(cfg: llama.LlamaConfig, rng) -> dict[str, np.ndarray]:
    """Random canonical float32 weights (HF row order) of ``cfg``."""
    H, hd, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"embed": (cfg.vocab_size, H), "norm": (H,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, H)
    layer = {"attn_norm": (H,), "ffn_norm": (H,), "wq": (cfg.num_heads * hd, H), "wk": (cfg.num_kv_heads * hd, H),
             "wv": (cfg.num_kv_heads * hd, H), "wo": (H, cfg.num_heads * hd), "w_gate": (F, H), "w_up": (F, H),
             "w_down": (H, F)}
    for i in range(cfg.num_layers):
        shapes.update({f"layers.{i}.{n}": s for n, s in layer.items()})
    w = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}
    for n in w:
        if n.endswith("norm"):
            w[n] += 1
    return w


def _vocab(cfg) -> list[str]:
    from tokenizers import pre_tokenizers

    tokens = CONTROL + sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    return tokens


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (HF row order -> GGUF's), as its convert script states it."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path, cfg: llama.LlamaConfig, w: dict[str, np.ndarray], matrix_type="Q4_1", embed_type="Q8_0",
               head_type="Q8_0") -> None:
    """Write ``w`` as a GGUF llama: layer matrices as ``matrix_type``, the token embedding as
    ``embed_type``, an untied LM head as ``head_type``, norms F32 (SmolLM2's mix by default)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    out = gguf.GGUFWriter(str(path), "llama")
    out.add_name("tiny")
    out.add_block_count(cfg.num_layers)
    out.add_context_length(cfg.max_position)
    out.add_embedding_length(cfg.hidden_size)
    out.add_feed_forward_length(cfg.intermediate_size)
    out.add_head_count(cfg.num_heads)
    out.add_head_count_kv(cfg.num_kv_heads)
    out.add_rope_freq_base(cfg.rope_theta)
    out.add_layer_norm_rms_eps(cfg.rms_eps)
    out.add_vocab_size(cfg.vocab_size)
    out.add_tokenizer_model("gpt2")
    out.add_tokenizer_pre("smollm")
    out.add_token_list(_vocab(cfg))
    out.add_token_merges([])
    out.add_token_types([3] * len(CONTROL) + [1] * (cfg.vocab_size - len(CONTROL)))
    out.add_bos_token_id(1)
    out.add_eos_token_id(2)
    out.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    permuted = {n: getattr(cfg, heads) for n, heads in llama.GGUF_ROPE_PERMUTED.items()}
    for canon, name in llama.GGUF_NAMES.items():
        for i in range(cfg.num_layers) if "{i}" in canon else [None]:
            c, g = (canon, name) if i is None else (canon.format(i=i), name.format(i=i))
            if c not in w:
                continue  # tied LM head
            x = permute_rope(w[c], permuted[canon]) if canon in permuted else w[c]
            t = Q.F32 if x.ndim == 1 else Q[{"embed": embed_type, "lm_head": head_type}.get(c, matrix_type)]
            if t == Q.F32:
                out.add_tensor(g, x)
            elif t == Q.F16:
                out.add_tensor(g, x.astype(np.float16))
            else:
                out.add_tensor(g, quantize(x, t), raw_dtype=t)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


def write_hf_dir(path, cfg: llama.LlamaConfig, w: dict[str, np.ndarray]) -> None:
    """Write ``w`` as a Hugging Face LLaMA directory (float32 safetensors, config, tokenizer)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path.mkdir()
    tensors = {}
    for canon, name in llama.HF_NAMES.items():
        for i in range(cfg.num_layers) if "{i}" in canon else [None]:
            c, h = (canon, name) if i is None else (canon.format(i=i), name.format(i=i))
            if c in w:
                tensors[h] = w[c]
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(_vocab(cfg))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
