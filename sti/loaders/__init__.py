"""Checkpoint loading: a Hugging Face directory, a GGUF file, or a built-in model name,
into one ``Checkpoint`` of canonical float32 weights, a tokenizer and a config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sti.errors import STIError


@dataclass
class Checkpoint:
    family: str  # "bert" | "llama"
    config: Any  # BertConfig | LlamaConfig
    weights: dict[str, Any]  # canonical names (see the family's HF_NAMES): float32 arrays, or
    # sti.lowbit.LowBitTensor for matrices a GGUF file stores in blocks, when loaded packed
    tokenizer: Any  # tokenizers.Tokenizer
    source: str
    chat_template: str | None = None
    special: dict[str, Any] = field(default_factory=dict)  # bos_id, eos_id, stop_ids, add_bos
    source_dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes in the source file

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(w.shape) for w in self.weights.values()))  # packed matrices too


def load_checkpoint(model: str | Path, progress: bool = True, packed: bool = False) -> Checkpoint:
    """Load ``model``: a built-in name (``minilm``, ``smollm2``), a HF model directory, or a GGUF file.
    ``packed``: a GGUF file's Q4_1/Q8_0 matrices stay packed (see ``sti.loaders.gguf.load_gguf``)."""
    from sti.loaders.builtin import resolve

    path = resolve(model)
    if path.is_dir():
        from sti.loaders.hf import load_hf_dir

        return load_hf_dir(path)
    if path.is_file():
        from sti.loaders.gguf import load_gguf

        return load_gguf(path, progress=progress, packed=packed)
    raise STIError(f"model not found: {model}",
                   "pass a built-in name (minilm, smollm2), a Hugging Face model directory, or a .gguf file")
