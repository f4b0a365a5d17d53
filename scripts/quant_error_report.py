"""Quantization error and dequantization speed of STI's quantizer on real weights.

    python scripts/quant_error_report.py            # the tables in docs/quantization.md
    python scripts/quant_error_report.py --sweep    # also the measurements behind the defaults

Weights: the six projection matrices (wq, wk, wv, wo, w_up, w_down) of every layer of a
checkpoint (default the built-in all-MiniLM-L6-v2: 36 matrices, 10.6 M weights). Errors are
aggregated over all of them: relative Frobenius error sqrt(sum ||W - W'||^2 / sum ||W||^2), and
the largest absolute error of any weight. Bits per weight count codes (padding included),
float32 scales and offsets, and outliers (uint32 index + float32 value), without the 64-byte
alignment padding of the serialized layout.

"plain" is group-wise uniform min..max quantization with the same group size, no outliers and no
clipping; "STI" is sti.quant.quantize with its defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from sti import quant as Q

KINDS = ("wq", "wk", "wv", "wo", "w_up", "w_down")


def layer_matrices(model: str) -> dict[str, np.ndarray]:
    from sti.loaders import load_checkpoint

    w = load_checkpoint(model, progress=False).weights
    return {k: v for k, v in w.items() if k.startswith("layers.") and k.rsplit(".", 1)[1] in KINDS}


def measure(mats: dict[str, np.ndarray], quant) -> dict:
    """Aggregate error of quant(w) -> QuantizedTensor over mats, and per weight kind."""
    se = {k: 0.0 for k in KINDS}
    ss = {k: 0.0 for k in KINDS}
    mx, pbits, n, n_out = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    for name, w in mats.items():
        q = quant(w)
        d = Q.dequantize(q).astype(np.float64) - w
        kind = name.rsplit(".", 1)[1]
        se[kind] += float((d * d).sum())
        ss[kind] += float(np.square(w, dtype=np.float64).sum())
        mx = max(mx, float(np.abs(d).max()))
        pbits += Q.payload_bits(w.shape, q.bits, q.group_size, q.n_outliers)
        n += w.size
        n_out += q.n_outliers
    return {"rel_fro": float(np.sqrt(sum(se.values()) / sum(ss.values()))), "max_abs": mx, "bits_per_weight": pbits / n,
            "n_outliers": n_out, "seconds": time.perf_counter() - t0,
            "by_kind": {k: float(np.sqrt(se[k] / ss[k])) for k in KINDS if ss[k]}}


def plain(bits, group_size):
    return lambda w: Q.quantize_with(w, bits, group_size, 0)


def sti(bits, group_size, **kw):
    return lambda w: Q.quantize(w, bits, group_size, **kw)


# --------------------------------------------------------------------------- main tables


def error_table(mats, group_size) -> list[dict]:
    rows = []
    for bits in Q.BITS:
        p, s = measure(mats, plain(bits, group_size)), measure(mats, sti(bits, group_size))
        rows.append({"bits": bits, "plain": p, "sti": s})
        print(f"  {bits} bits: plain {p['rel_fro']:.4f}  STI {s['rel_fro']:.4f}  ({s['seconds']:.1f} s)", flush=True)
    return rows


def print_error_table(rows, group_size):
    print(f"\nAll {len(KINDS)} projection kinds, group size {group_size}; rel = relative Frobenius error, "
          "max = largest |error|, b/w = bits per weight\n")
    print("| bits | plain rel | plain max | plain b/w | STI rel | STI max | STI b/w | STI outliers | rel. error vs plain |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p, s = r["plain"], r["sti"]
        print(f"| {r['bits']} | {p['rel_fro']:.4f} | {p['max_abs']:.4f} | {p['bits_per_weight']:.3f} | "
              f"{s['rel_fro']:.4f} | {s['max_abs']:.4f} | {s['bits_per_weight']:.3f} | {s['n_outliers']} | "
              f"{100 * (s['rel_fro'] / p['rel_fro'] - 1):+.1f}% |")
    print("\nRelative Frobenius error by weight kind, plain -> STI\n")
    print("| bits | " + " | ".join(KINDS) + " |")
    print("|---:|" + "---:|" * len(KINDS))
    for r in rows:
        cells = [f"{r['plain']['by_kind'][k]:.4f} -> {r['sti']['by_kind'][k]:.4f}" for k in KINDS]
        print(f"| {r['bits']} | " + " | ".join(cells) + " |")


def print_bench(rows):
    print("\nDequantization throughput, one thread, GB/s of float32 output (median; p10-p90 ms in brackets)\n")
    print("| bits | C GB/s | C ms | NumPy GB/s | NumPy ms | C / NumPy |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = (f"{r['c_gbps']:.2f} | {r['c_ms']:.3f} [{r['c_spread_ms'][0]:.3f}-{r['c_spread_ms'][1]:.3f}]"
             if r["c_gbps"] else "n/a | n/a")
        ratio = f"{r['speedup']:.1f}x" if r["speedup"] else "n/a"
        print(f"| {r['bits']} | {c} | {r['numpy_gbps']:.2f} | {r['numpy_ms']:.3f} "
              f"[{r['numpy_spread_ms'][0]:.3f}-{r['numpy_spread_ms'][1]:.3f}] | {ratio} |")


# --------------------------------------------------------------------------- sweeps (why the defaults)


def abs_score(x, valid, rows):
    return np.where(valid, np.abs(x), np.float32(-1))


def group_z_score(x, valid, rows):
    n = np.maximum(valid.sum(1, keepdims=True), 1)
    mean = np.where(valid, x, 0).sum(1, keepdims=True) / n
    std = np.sqrt(np.where(valid, (x - mean) ** 2, 0).sum(1, keepdims=True) / n)
    return np.where(valid, np.abs(x - mean) / np.maximum(std, 1e-30), -1).astype(np.float32)


def row_robust_z_score(x, valid, rows):
    xr = np.where(valid, x, np.nan).reshape(rows, -1)  # (rows, padded cols)
    med = np.nanmedian(xr, 1, keepdims=True)
    mad = 1.4826 * np.nanmedian(np.abs(xr - med), 1, keepdims=True)
    z = np.abs(xr - med) / np.maximum(mad, 1e-30)
    return np.where(np.isnan(z), -1, z).reshape(x.shape).astype(np.float32)


def sweeps(mats, group_size):
    G, grid, it = group_size, Q.CLIP_GRID, Q.REFIT_ITERS
    n_total = sum(w.size for w in mats.values())

    def run(bits, frac, grid_=(1.0,), iters=0, score=None, gs=G):
        def f(w):
            return Q.quantize_with(w, bits, gs, Q.outlier_count(w.shape, bits, frac), grid_, iters, score)
        return measure(mats, f)

    print("\n### Outlier score (0.1% outliers, no clipping, no refit): rel / max\n")
    scores = {"abs(w - group mean)": None, "abs(w)": abs_score, "group z-score": group_z_score,
              "row robust z (median/MAD)": row_robust_z_score}
    print("| bits | " + " | ".join(scores) + " |")
    print("|---:|" + "---:|" * len(scores))
    for bits in (2, 3, 4, 8):
        cells = []
        for fn in scores.values():
            m = run(bits, 0.001, score=fn)
            cells.append(f"{m['rel_fro']:.4f} / {m['max_abs']:.4f}")
        print(f"| {bits} | " + " | ".join(cells) + " |", flush=True)

    print("\n### Range search and refit (0.1% outliers): rel / max / seconds for all matrices\n")
    variants = {"min..max": ((1.0,), 0), "range search": (grid, 0), "LS refit": ((1.0,), it), "search + refit": (grid, it)}
    print("| bits | " + " | ".join(variants) + " |")
    print("|---:|" + "---:|" * len(variants))
    for bits in Q.BITS:
        cells = []
        for g_, i_ in variants.values():
            m = run(bits, 0.001, g_, i_)
            cells.append(f"{m['rel_fro']:.4f} / {m['max_abs']:.4f} / {m['seconds']:.1f}")
        print(f"| {bits} | " + " | ".join(cells) + " |", flush=True)

    print("\n### Outlier fraction (default range search / refit): rel, max, b/w, and the marginal "
          "d ln(rel) / d(bits per weight) of each step\n")
    fracs = (0, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008)
    print("| bits | " + " | ".join(f"{100 * f:g}%" for f in fracs) + " |")
    print("|---:|" + "---:|" * len(fracs))
    res = {}
    for bits in Q.BITS:
        prev, cells = None, []
        for f in fracs:
            m = res[bits, f] = run(bits, f, grid if bits in Q.CLIP_BITS else (1.0,), it)
            step = ""
            if prev is not None:
                step = f" ({(np.log(m['rel_fro']) - np.log(prev['rel_fro'])) / (m['bits_per_weight'] - prev['bits_per_weight']):+.2f})"
            cells.append(f"{m['rel_fro']:.4f} / {m['max_abs']:.4f}{step}")
            prev = m
        print(f"| {bits} | " + " | ".join(cells) + " |", flush=True)

    # The planner mixes fidelity versions across shards, so the squared error it can reach at a given
    # size is the chord between adjacent versions. An outlier step is worth taking while the squared
    # error it removes per bit beats that chord (ratio > 1); the next version after 8 bits is float32.
    print("\n### Outlier step value: (squared error removed per bit by the step) / (chord to the next "
          "version, both at 0.1% outliers)\n")
    print("| bits | next | " + " | ".join(f"-> {100 * f:g}%" for f in fracs[1:]) + " |")
    print("|---:|---:|" + "---:|" * (len(fracs) - 1))
    for i, bits in enumerate(Q.BITS):
        here = res[bits, 0.001]
        e2 = here["rel_fro"] ** 2
        if i + 1 < len(Q.BITS):
            nxt = res[Q.BITS[i + 1], 0.001]
            chord = (e2 - nxt["rel_fro"] ** 2) / (nxt["bits_per_weight"] - here["bits_per_weight"])
        else:
            chord = e2 / (32 - here["bits_per_weight"])
        cells = []
        for a, b in zip(fracs, fracs[1:]):
            ma, mb = res[bits, a], res[bits, b]
            gain = (ma["rel_fro"] ** 2 - mb["rel_fro"] ** 2) / (mb["bits_per_weight"] - ma["bits_per_weight"])
            cells.append(f"{gain / chord:.2f}")
        nxt_name = Q.BITS[i + 1] if i + 1 < len(Q.BITS) else 32
        print(f"| {bits} | {nxt_name} | " + " | ".join(cells) + " |")
    print(f"\n(one outlier costs 64 bits; 0.1% outliers add {0.001 * 64:.3f} bits per weight over {n_total} weights)")

    print("\n### Group size (STI defaults otherwise): rel / b/w\n")
    sizes = (32, 64, 128, 384)
    print("| bits | " + " | ".join(f"G={g}" for g in sizes) + " |")
    print("|---:|" + "---:|" * len(sizes))
    for bits in Q.BITS:
        cells = []
        for g in sizes:
            m = measure(mats, sti(bits, g))
            cells.append(f"{m['rel_fro']:.4f} / {m['bits_per_weight']:.3f}")
        print(f"| {bits} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="also the sweeps behind the defaults (slow: minutes)")
    ap.add_argument("--no-bench", action="store_true", help="skip the dequantization throughput table")
    ap.add_argument("--repeats", type=int, default=50, help="dequantization timing repeats")
    ap.add_argument("--json", help="write the measurements to this file")
    args = ap.parse_args(argv)

    mats = layer_matrices(args.model)
    n = sum(w.size for w in mats.values())
    print(f"{args.model}: {len(mats)} matrices, {n} weights; C kernel: {Q.has_c_kernel()}; "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}", flush=True)
    report = {"model": args.model, "group_size": args.group_size, "n_matrices": len(mats), "n_weights": n}
    report["errors"] = error_table(mats, args.group_size)
    print_error_table(report["errors"], args.group_size)
    if not args.no_bench:
        report["bench"] = Q.bench_dequant(repeats=args.repeats, group_size=args.group_size)
        print_bench(report["bench"])
    if args.sweep:
        sweeps(mats, args.group_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
