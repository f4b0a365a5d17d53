"""One STI configuration of ``sti bench decoder`` measured in a process of its own, so that its
peak RSS is its own.

    python _decoder_child.py SPEC_JSON

``sti.bench.decoder`` writes SPEC_JSON and reads the JSON object this prints as its last line.
Spec keys: ``mode`` ("memory": ``Generator.load(model)``, default "smollm2", packed Q4_1 with
the fused kernels;
"stream": ``Generator.from_store`` under ``memory`` bytes at ``bits``, for ``batch`` x
``context`` tokens, ``storage`` None or an emulated device such as "200MBps"), ``evict``
(drop the store's files from the page cache once, before loading), ``prompts`` /
``new_tokens`` / ``repeats`` (speed, skipped when there are no prompts) and ``window_sets``
({name: token windows}, perplexity per set);
"paired": in memory against ``versus`` ("stream", or "llama.cpp" on the GGUF ``gguf``) in one
process, their decode timed in alternating rounds (``rounds``), so that a change of the
machine's speed falls on both alike (see ``paired``).

The timing loop and the perplexity arithmetic are the peers' own (``_peer_child``): greedy
argmax for exactly ``new_tokens`` steps, prefill = time to the first token of every sequence.
A plan that does not fit the budget prints ``{"ok": false, "does_not_fit": true, ...}`` with
the planner's message (the smallest budget that would fit) and exits 0.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``sti`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sti.bench._peer_child import (LlamaCpp, measure_perplexity, measure_speed, median,  # noqa: E402
                                   nll_of_logits, peak_rss_bytes, reset_peak_rss, run_greedy)


class STIBackend:
    """The ``_peer_child`` backend protocol (prefill / step / release / nll) over a Generator."""

    def __init__(self, gen, context: int):
        self.gen, self.context = gen, context

    def prefill(self, prompts):
        cache = self.gen.new_cache(self.context, len(prompts))
        logits = self.gen.logits(np.asarray(prompts, dtype=np.int64), cache)
        return cache, logits.argmax(-1).astype(np.int64)

    def step(self, cache, toks):
        return self.gen.logits(np.asarray(toks, dtype=np.int64)[:, None], cache).argmax(-1).astype(np.int64)

    def release(self, cache) -> None:
        self.gen.free_cache(cache)

    def nll(self, window):
        logits = self.gen.logits(np.asarray([window[:-1]], dtype=np.int64), all_logits=True)[0]
        return nll_of_logits(logits, np.asarray(window[1:])), len(window) - 1


def load(spec: dict):
    from sti.api import Generator

    if spec["mode"] == "memory":
        return Generator.load(spec.get("model", "smollm2"), progress=False)
    if spec.get("evict"):
        from sti.store import Store

        st = Store.open(spec["store"])
        st.evict()
        close = getattr(st, "close", None)
        if close:
            close()
    return Generator.from_store(spec["store"], memory=spec["memory"], bits=spec.get("bits"), batch=spec["batch"],
                                context=spec["context"], storage=spec.get("storage"), preload=True)


def paired(spec: dict) -> dict:
    """Decode tokens/s of STI in memory against ``spec["versus"]`` -- "stream" (the store
    streamed under ``memory``) or "llama.cpp" (the GGUF ``gguf`` on ``threads`` threads) --
    measured in one process in alternating rounds (in-memory first in even rounds, the other
    first in odd ones), each round a greedy generation of ``new_tokens`` after its own prefill.
    Separate processes run minutes apart, and on a shared or power-managed machine their speeds
    can differ by more than the effect measured; here every round of one has a round of the other
    beside it, and the ratio (other / in-memory) is the median of the per-round ratios. A
    streaming engine is stopped (IO worker joined, BLAS threads restored) before every in-memory
    round, so that round runs as ``mode: memory`` would."""
    from sti.errors import STIError

    prompts, versus = spec["prompts"], spec["versus"]
    if versus == "stream":
        try:
            other = load({**spec, "mode": "stream"})
        except STIError as e:
            return {"ok": False, "does_not_fit": True, "problem": e.problem, "fix": e.fix}
        other_backend = STIBackend(other, spec["context"])
    elif versus == "llama.cpp":
        other = other_backend = LlamaCpp(spec["gguf"], spec["threads"], batch=len(prompts), context=spec["context"] + 16)
    else:
        raise ValueError(f"paired: unknown versus {versus!r}")
    mem = load({**spec, "mode": "memory"})
    backends = {"memory": STIBackend(mem, spec["context"]), versus: other_backend}
    steps = spec["new_tokens"] - 1
    rates: dict[str, list[float]] = {k: [] for k in backends}
    try:
        for backend in backends.values():  # warm-up: first-call costs, lazy init
            run_greedy(backend, prompts, 2)
        for r in range(spec["rounds"]):
            for name in (("memory", versus) if r % 2 == 0 else (versus, "memory")):
                if name == "memory" and versus == "stream":
                    other.engine.stop()
                _, _, decode_s = run_greedy(backends[name], prompts, spec["new_tokens"])
                rates[name].append(len(prompts) * steps / decode_s)
    finally:
        if versus == "stream":
            other.close()
        mem.close()
    ratios = [o / m for o, m in zip(rates[versus], rates["memory"])]
    return {"ok": True, "versus": versus, "batch": len(prompts), "rounds": spec["rounds"],
            "new_tokens": spec["new_tokens"], "memory_tok_s": median(rates["memory"]),
            "other_tok_s": median(rates[versus]), "ratio": median(ratios),
            "per_round": {k: [round(v, 3) for v in vs] for k, vs in rates.items()}}


def run(spec: dict) -> dict:
    from sti.errors import STIError

    if spec["mode"] == "paired":
        return paired(spec)

    reset_peak_rss()
    t0 = time.perf_counter()
    try:
        gen = load(spec)
    except STIError as e:
        return {"ok": False, "does_not_fit": True, "problem": e.problem, "fix": e.fix}
    load_s = time.perf_counter() - t0
    out: dict = {"ok": True, "load_s": round(load_s, 4)}
    try:
        stream = gen.engine is not None
        if stream:
            p = gen.plan
            out["plan"] = {"weight_bytes": p.weight_bytes, "slots": p.slots, "slot_bytes": p.slot_bytes,
                           "preloaded_shards": len(p.preload), "context": p.context, "batch": p.batch,
                           "memory_budget": p.memory_budget, "stream_bytes_per_pass": p.stream_bytes_per_pass,
                           "notes": list(p.notes)}
        out["resident_weight_bytes"] = int(gen.plan.weight_bytes if stream else gen.weight_bytes)
        if spec.get("prompts"):
            io0 = dict(gen.engine._io.stats) if stream and getattr(gen.engine, "_io", None) else None
            out["speed"] = measure_speed(STIBackend(gen, spec["context"]), spec["prompts"], spec["new_tokens"],
                                         spec["repeats"])
            out["peak_rss_bytes"] = peak_rss_bytes()  # before perplexity's (T, vocab) logits
            if stream:
                out["engine_peak_bytes"] = int(gen.engine.res.peak)
                io1 = gen.engine._io.stats if getattr(gen.engine, "_io", None) else None
                if io1 is not None:
                    base = io0 or {}
                    out["io"] = {k: round(v - base.get(k, 0), 4) if isinstance(v, float) else v - base.get(k, 0)
                                 for k, v in io1.items()}
                    out["io"]["passes"] = (1 + 1) + spec["repeats"] * spec["new_tokens"]  # warm-up + timed
        ppl = {}
        for name, windows in (spec.get("window_sets") or {}).items():
            ppl[name] = measure_perplexity(STIBackend(gen, 0), windows)
        if ppl:
            out["perplexity"] = ppl
        if stream:
            out.setdefault("engine_peak_bytes", int(gen.engine.res.peak))
        out.setdefault("peak_rss_bytes", peak_rss_bytes())
    finally:
        gen.close()
    return out


def _plain(x):
    """NumPy scalars and arrays as JSON numbers and lists."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    print(json.dumps(run(spec), default=_plain), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
