"""Reference for the cold-start benchmark, run as a fresh process by ``sti bench engine``:
PyTorch + transformers load all-MiniLM-L6-v2 from the same directory STI reads, embed one text
(mean pooling over the attention mask, L2 normalisation: the sentence-transformers recipe),
apply the same linear head STI ships (``W``, ``b``, ``labels`` read straight from its .npz)
and print the label in the format of ``sti classify``.

    python _ref_cold.py MODEL_DIR HEAD_NPZ|- TEXT [THREADS]

With ``-`` for the head it prints the start of the embedding instead (the format of ``sti embed``).
This file deliberately imports nothing from ``sti``.
"""

import sys


def main(argv: list[str]) -> int:
    model_dir, head_path, text = argv[1], argv[2], argv[3]
    threads = int(argv[4]) if len(argv) > 4 else 2

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    model.eval()
    with torch.inference_mode():
        enc = tokenizer([text], return_tensors="pt", truncation=True)
        h = model(**enc).last_hidden_state  # (1, T, H)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (1, T, 1)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (1, H)
        e = torch.nn.functional.normalize(e, p=2, dim=-1)
    emb = e.numpy()[0]
    if head_path == "-":
        head = " ".join(f"{v:+.4f}" for v in emb[:6])
        print(f"[{head} ... ] ({emb.size} dims)  {text[:60]}")
        return 0
    with np.load(head_path, allow_pickle=False) as z:
        W, b, labels = z["W"].astype(np.float32), z["b"].astype(np.float32), [str(s) for s in z["labels"]]
    z = (W @ emb + b).astype(np.float64)  # (C,)
    p = np.exp(z - z.max())
    p /= p.sum()
    i = int(p.argmax())
    print(f"{labels[i]:<14} {p[i]:.3f}  {text[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
