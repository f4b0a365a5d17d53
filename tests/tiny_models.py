"""Tiny random models written in real checkpoint formats, for fast tests of loaders, stores and runtimes."""

import json

import numpy as np

from sti.models import bert

# hidden 48 is not a multiple of the quantizer's group size (64) and F / nh = 25 is odd: the
# store must not rely on either
CFG = bert.BertConfig(vocab_size=40, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=100,
                      max_position=16)
# the same but for 24-neuron slices: every shard's rows come in fours, as in real models, which
# lets int8 products take a layer's quantized shards in one chunk
CFG_FOURS = bert.BertConfig(vocab_size=40, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96,
                            max_position=16)
WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree".split()


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


def bert_weights(rng, cfg: bert.BertConfig = CFG) -> dict[str, np.ndarray]:
    H, F = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embed.word": (cfg.vocab_size, H), "embed.pos": (cfg.max_position, H), "embed.type": (2, H),
              "embed.ln_w": (H,), "embed.ln_b": (H,)}
    layer = {"wq": (H, H), "bq": (H,), "wk": (H, H), "bk": (H,), "wv": (H, H), "bv": (H,), "wo": (H, H),
             "bo": (H,), "ln1_w": (H,), "ln1_b": (H,), "w_up": (F, H), "b_up": (F,), "w_down": (H, F),
             "b_down": (H,), "ln2_w": (H,), "ln2_b": (H,)}
    for i in range(cfg.num_layers):
        shapes.update({f"layers.{i}.{n}": s for n, s in layer.items()})
    w = {}
    for n, s in shapes.items():
        a = rng.standard_normal(s).astype(np.float32) * (1.0 if n == "embed.word" else 0.1)
        if n.endswith("ln_w") or n.endswith("ln1_w") or n.endswith("ln2_w"):
            a += 1
        w[n] = a
    return w


def write_bert_dir(path, w, cfg: bert.BertConfig = CFG):
    from safetensors.numpy import save_file

    path.mkdir()
    tensors = {}
    for canon, hf in bert.HF_NAMES.items():
        for i in range(cfg.num_layers) if "{i}" in canon else [None]:
            c, h = (canon, hf) if i is None else (canon.format(i=i), hf.format(i=i))
            tensors[h] = w[c]
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}))
    (path / "tokenizer.json").write_text(tokenizer_json())


