"""Hugging Face model directories: config.json, model.safetensors (or a sharded index), tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sti.errors import STIError
from sti.loaders import Checkpoint

FAMILIES = {"bert": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama"}


def _safetensors_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    raise STIError(f"{path} has no model.safetensors or model.safetensors.index.json",
                   "point at a Hugging Face model directory saved with safetensors")


def _read_tensors(files: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    from safetensors.numpy import load_file

    out, dtypes = {}, {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except Exception as exc:
            raise STIError(f"cannot read {f}: {exc}", "the file is damaged or not safetensors; re-download it") from None
        for name, t in tensors.items():
            dtypes[str(t.dtype)] = dtypes.get(str(t.dtype), 0) + t.nbytes
            out[name] = t
    return out, dtypes


def _canonical(raw: dict[str, np.ndarray], names: dict[str, str], num_layers: int,
               prefixes: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    def find(key: str) -> np.ndarray | None:
        for p in ("",) + prefixes:
            if p + key in raw:
                return raw[p + key]
        return None

    out = {}
    for canon, src in names.items():
        for i in range(num_layers) if "{i}" in canon else [None]:
            c, s = (canon, src) if i is None else (canon.format(i=i), src.format(i=i))
            t = find(s)
            if t is None:
                if c == "lm_head":
                    continue  # tied embeddings
                raise STIError(f"checkpoint lacks tensor {s!r}", "the directory is not a complete model of its config's architecture")
            out[c] = np.ascontiguousarray(t, dtype=np.float32)
    return out


def load_hf_dir(path: Path) -> Checkpoint:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise STIError(f"{path} is not a model directory (no config.json)",
                       "pass a Hugging Face model directory (config.json, model.safetensors, tokenizer.json) or a .gguf file")
    d = json.loads(cfg_file.read_text())
    family = FAMILIES.get(d.get("model_type", ""))
    if family is None:
        raise STIError(f"unsupported model_type {d.get('model_type')!r} in {cfg_file}",
                       f"STI runs these model types: {', '.join(sorted(FAMILIES))}")
    tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        raise STIError(f"{path} has no tokenizer.json", "save the tokenizer with the model (fast tokenizer format)")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok_file))
    raw, dtypes = _read_tensors(_safetensors_files(path))
    if family == "bert":
        from sti.models import bert as fam

        cfg = fam.BertConfig.from_hf(d)
        weights = _canonical(raw, fam.HF_NAMES, cfg.num_layers, fam.HF_PREFIXES)
        _setup_bert_tokenizer(tokenizer, cfg)
        special = {}
    else:
        from sti.models import llama as fam

        cfg = fam.LlamaConfig.from_hf(d)
        weights = _canonical(raw, fam.HF_NAMES, cfg.num_layers)
        cfg = fam.LlamaConfig(**{**cfg.__dict__, "tie_embeddings": "lm_head" not in weights})
        eos = d.get("eos_token_id")
        stop = eos if isinstance(eos, list) else [eos] if eos is not None else []
        special = {"bos_id": d.get("bos_token_id"), "eos_id": stop[0] if stop else None,
                   "stop_ids": stop, "add_bos": False}
    template = None
    tcfg = path / "tokenizer_config.json"
    if tcfg.exists():
        template = json.loads(tcfg.read_text()).get("chat_template")
    return Checkpoint(family=family, config=cfg, weights=weights, tokenizer=tokenizer,
                      source=str(path), chat_template=template, special=special, source_dtypes=dtypes)


def _setup_bert_tokenizer(tok, cfg) -> None:
    """Pad batches with the pad id; truncation is done by the caller so it can warn."""
    tok.no_truncation()
    tok.enable_padding(pad_id=cfg.pad_token_id, pad_token=tok.id_to_token(cfg.pad_token_id) or "[PAD]")
