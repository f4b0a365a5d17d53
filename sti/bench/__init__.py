"""Benchmarks behind ``sti bench SUITE``: each suite prints a Markdown table and writes
``<out>/<suite>.json`` and ``<out>/<suite>.md``.

Suites:
  engine  STI against Hugging Face transformers on the same models, inputs and threads:
          encoder warm latency, cold start to a first classification, SmolLM2 decode speed
          and GGUF load time (``sti.bench.engine``).
  encoder STI's elastic pipeline against whole-model, load-then-execute, layerwise fp32 and
          uniform-bitwidth pipelines and transformers on the accuracy / latency / memory grid,
          with Pareto plots (``sti.bench.encoder``).
  kernels the low-bit kernels: dequantization throughput per bitwidth, and fused
          matrix-vector products against dequantize + BLAS and float32 NumPy on SmolLM2's
          shapes, batch 1 and 16 (``sti.bench.kernels``).
  decoder SmolLM2 generation: STI in memory and streaming under 100/25/10/5 % of the GGUF's
          size (batch 1 and 16, real and emulated 200 MB/s storage) against llama.cpp,
          transformers, AirLLM and accelerate disk offload: prefill/decode tokens/s, TTFT,
          resident weights, peak RSS, perplexity, targets and a tokens/s-vs-memory plot
          (``sti.bench.decoder``).

Reference libraries (PyTorch, transformers) are imported only inside the suites, never when
``sti`` or ``sti.bench`` is imported.
"""

from __future__ import annotations

from sti.errors import STIError

SUITES = ("engine", "encoder", "kernels", "decoder")


def run_bench(suite: str, out_dir: str = "bench-results", repeats: int = 7, quick: bool = False,
              store: str | None = None, peers: str | None = None) -> int:
    """Run one benchmark suite; returns the process exit status (0: every measurement ran).
    ``store``: the shard store the encoder suite measures (default: its cached MiniLM store), or
    the decoder suite's SmolLM2 store (default: packed once into the cache). ``peers``: the
    decoder suite's peers and where to measure them (``decoder_peers.peer_scopes``)."""
    if suite not in SUITES:
        raise STIError(f"no such benchmark suite: {suite!r}", f"use one of: {', '.join(SUITES)}")
    if repeats < 1:
        raise STIError("--repeats must be at least 1", "pass --repeats 1 or more")
    if peers is not None and suite != "decoder":
        raise STIError(f"--peers is for the decoder suite, not {suite!r}", "drop --peers")
    if suite == "encoder":
        from sti.bench.encoder import run_encoder

        return run_encoder(out_dir=out_dir, repeats=repeats, quick=quick, store=store)
    if suite == "decoder":
        from sti.bench.decoder import run_decoder

        return run_decoder(out_dir=out_dir, repeats=repeats, quick=quick, store=store, peer_list=peers)
    if suite == "kernels":
        from sti.bench.kernels import run_kernels

        return run_kernels(out_dir=out_dir, repeats=repeats, quick=quick)
    from sti.bench.engine import run_engine

    return run_engine(out_dir=out_dir, repeats=repeats, quick=quick)
