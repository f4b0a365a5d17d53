"""Hugging Face transformers from a new process to the first classification, for
``sti bench encoder`` (its "transformers (cold process)" system):

    python _ref_encoder_cold.py MODEL_DIR HEAD_NPZ SEQ_LEN THREADS TEXT_FILE

Imports torch and transformers, loads the tokenizer and the model from MODEL_DIR, tokenizes the
text truncated to SEQ_LEN tokens (``[CLS]`` ... ``[SEP]``, as STI truncates), embeds it (mean
pooling, L2 normalisation), applies the linear head (``W``, ``b`` from HEAD_NPZ) and prints one
JSON line: the predicted class, the number of tokens and the process's peak RSS (VmHWM). The
caller times the whole process from the outside. This file imports nothing from ``sti``.
"""

import json
import sys


def peak_rss_bytes():
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv: list[str]) -> int:
    model_dir, head_path, seq_len, threads, text_file = argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5]
    with open(text_file, encoding="utf-8") as f:
        text = f.read()

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    model.eval()
    with torch.inference_mode():
        enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=seq_len)
        h = model(**enc).last_hidden_state  # (1, T, H)
        e = torch.nn.functional.normalize(h.mean(1), p=2, dim=-1)  # (1, H): one text, no padding
    with np.load(head_path) as z:
        W, b = z["W"].astype(np.float32), z["b"].astype(np.float32)
    pred = int(np.argmax(W @ e.numpy()[0] + b))
    print(json.dumps({"pred": pred, "tokens": int(enc["input_ids"].shape[1]), "peak_rss_bytes": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
