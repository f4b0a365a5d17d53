"""GGUF load probe, run as a fresh process by ``sti bench engine``; prints one JSON line.

    python _load_probe.py sti GGUF_PATH
    python _load_probe.py transformers GGUF_PATH [THREADS]

``load_s`` is perf_counter around the load call alone (``Generator.load`` for STI,
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` for transformers); ``import_s``
the imports before it; ``peak_rss_bytes`` the process's VmHWM after loading. The caller times
the whole process from the outside.
"""

import json
import sys
import time

from sti.machine import peak_rss_bytes


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    which, path = argv[1], argv[2]
    if which == "sti":
        from sti.api import Generator

        t1 = time.perf_counter()
        gen = Generator.load(path, progress=False)
        t2 = time.perf_counter()
        params = gen.ckpt.num_params
    elif which == "transformers":
        from pathlib import Path

        import torch

        torch.set_num_threads(int(argv[3]) if len(argv) > 3 else 2)
        from transformers import AutoModelForCausalLM

        p = Path(path)
        t1 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
        t2 = time.perf_counter()
        params = sum(x.numel() for x in model.parameters())
    else:
        print(f"unknown probe {which!r}", file=sys.stderr)
        return 2
    print(json.dumps({"which": which, "import_s": t1 - t0, "load_s": t2 - t1, "params": int(params),
                      "peak_rss_bytes": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
