"""Benchmarks behind ``sti bench SUITE``: each suite prints a Markdown table and writes
``<out>/<suite>.json`` and ``<out>/<suite>.md``.

Suites:
  engine  STI against Hugging Face transformers on the same models, inputs and threads:
          encoder warm latency, cold start to a first classification, SmolLM2 decode speed
          and GGUF load time (``sti.bench.engine``).

Reference libraries (PyTorch, transformers) are imported only inside the suites, never when
``sti`` or ``sti.bench`` is imported.
"""

from __future__ import annotations

from sti.errors import STIError

SUITES = ("engine",)


def run_bench(suite: str, out_dir: str = "bench-results", repeats: int = 7, quick: bool = False) -> int:
    """Run one benchmark suite; returns the process exit status (0: every measurement ran)."""
    if suite not in SUITES:
        raise STIError(f"no such benchmark suite: {suite!r}", f"use one of: {', '.join(SUITES)}")
    if repeats < 1:
        raise STIError("--repeats must be at least 1", "pass --repeats 1 or more")
    from sti.bench.engine import run_engine

    return run_engine(out_dir=out_dir, repeats=repeats, quick=quick)
