"""``sti bench decoder``: SmolLM2-135M generation speed, memory and perplexity against the memory
budget, for STI in memory, STI streaming from its shard store under 100 / 25 / 10 / 5 % of the
GGUF file's size (batch 1 and 16, real and emulated 200 MB/s storage), and the peers of
``sti.bench.decoder_peers`` (llama.cpp, transformers fp32, AirLLM, accelerate disk offload).

Every STI configuration runs in a fresh process (``_decoder_child.py``), so each row's peak RSS
is that configuration's alone, on the very token ids the peers get (``build_workload``).
Outputs: ``decoder.json``, ``decoder.md`` and ``decoder-tokens-vs-memory.png``.

The streaming budget counts the KV cache and the read buffers, so the full workload (128-token
prompts) does not fit every (budget, batch): such a row says "does not fit" with the planner's
message, and a clearly labelled variant (shorter prompts, then lower bitwidths) shows what STI
does under that budget. Targets are judged on the rows of the full workload only; variants are
quoted for information.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sti.bench import decoder_peers as dp
from sti.bench.decoder_peers import ROW_KEYS, markdown_table, row
from sti.bench.engine import _cpus, _loadavg, contention, contention_notes, cpu_snapshot

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_decoder_child.py"
SCHEMA_VERSION = 1
FRACTIONS = (1.0, 0.25, 0.10, 0.05)  # streaming budgets, as fractions of the GGUF file's size
STORAGES = ("real", "200MBps")
BATCHES = dp.BATCHES
MAX_REPEATS = 3  # timed runs per configuration (each is a whole generation)
MIN_PPL_CONTEXT = 16  # shortest perplexity window worth reporting
PAIRED_ROUNDS = 7  # alternating rounds of the in-process in-memory / 10% comparison
SYS_MEM, SYS_STREAM = "STI in memory", "STI streaming"
TARGET_FRACTION = 0.10


@dataclass(frozen=True)
class Variant:
    """A workload STI runs under a budget: the full one (``label`` None) or a reduced one."""

    prompt_tokens: int | None  # None: the workload's prompts as they are
    new_tokens: int | None  # None: the workload's streaming new tokens
    bits: int | None  # None: the store's lossless version
    label: str | None = None


FULL = Variant(None, None, None)
# Tried in order where the full workload does not fit: shorter prompts first (the KV cache is
# what the budget runs out of), then lower bitwidths (the store's 4-bit version is no smaller
# than the GGUF's own Q4_1 blocks, so 3 and 2 bits).
LADDER = (Variant(32, None, None, "32-token prompts"), Variant(8, 8, None, "8-token prompts"),
          Variant(8, 8, 3, "8-token prompts, 3-bit"), Variant(8, 8, 2, "8-token prompts, 2-bit"))


def _say(msg: str) -> None:
    print(f"[decoder] {msg}", file=sys.stderr, flush=True)


def _bits_label(bits: int | None) -> str:
    return "lossless (the GGUF's Q4_1 blocks)" if bits is None else f"{bits}-bit"


def _mbs(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.1f} MB"


# --------------------------------------------------------------------------- planning


def fits(shape, budget: int, batch: int, context: int, bits: int | None) -> str | None:
    """None when the plan fits, else the planner's message (what ``Generator.from_store`` raises)."""
    from sti.errors import STIError
    from sti.plan_decoder import plan_decoder_shape

    try:
        plan_decoder_shape(shape, budget, bits=bits, batch=batch, context=context)
    except STIError as e:
        return e.problem + (f"; {e.fix}" if e.fix else "")
    return None


def max_context(shape, budget: int, bits: int | None) -> int:
    """The longest batch-1 context the budget allows at ``bits`` (0: none)."""
    from sti.errors import STIError
    from sti.plan_decoder import plan_decoder_shape

    try:
        return plan_decoder_shape(shape, budget, bits=bits, batch=1).context
    except STIError:
        return 0


def resolve(v: Variant, wl) -> tuple[int, int]:
    """(prompt tokens, new tokens) of a variant on the workload."""
    full = len(wl.prompts[0])
    return (min(v.prompt_tokens or full, full), min(v.new_tokens or wl.stream_new_tokens, wl.stream_new_tokens))


def describe(v: Variant, wl) -> str:
    T, n = resolve(v, wl)
    return f"{T}-token prompts, {n} new tokens, {_bits_label(v.bits)}"


# --------------------------------------------------------------------------- the STI side


class STIRun:
    """STI's rows: children per configuration, perplexity per (budget, bits)."""

    def __init__(self, store: Path, gguf_bytes: int, wl, *, repeats: int, quick: bool, timeout: float = 1800,
                 runner=None):
        from sti.plan_decoder import decoder_shape
        from sti.store import Store

        self.store, self.wl, self.repeats, self.quick, self.timeout = store, wl, repeats, quick, timeout
        st = Store.open(store)
        self.shape = decoder_shape(st)
        self.gguf_bytes = gguf_bytes
        self.runner = runner or (lambda spec: dp.run_child(spec, CHILD, timeout))
        self.children: list[dict] = []
        self.ppl: dict[tuple[int, int | None], dict] = {}  # (budget, bits) -> perplexity facts
        self.mem_ppl: dict[int, float] = {}  # window tokens -> in-memory perplexity
        self.evicted = False

    def child(self, **spec) -> dict:
        spec = {"task": f"STI {spec.get('mode')}", "store": str(self.store), "repeats": self.repeats, **spec}
        try:
            res = self.runner(spec)
        except dp.PeerError as e:
            res = {"ok": False, "error": str(e)}
        rec = {k: v for k, v in spec.items() if k not in ("store", "prompts", "window_sets")}
        rec["prompt_tokens"] = len(spec["prompts"][0]) if spec.get("prompts") else None
        rec["windows"] = {k: [len(w) - 1 for w in ws] for k, ws in (spec.get("window_sets") or {}).items()}
        self.children.append({**rec, "result": res})
        return res

    def paired(self, versus: str, batch: int, **spec) -> dict:
        """STI in memory against ``versus`` ("stream" under ``memory``, or "llama.cpp"), batch
        ``batch``, the streaming workload, timed in alternating rounds in one process
        (``_decoder_child.paired``): the ratio a target asks for, free of the drift between
        processes run minutes apart."""
        T, n = resolve(FULL, self.wl)
        rounds = 1 if self.quick else PAIRED_ROUNDS
        _say(f"{SYS_MEM} against {versus}, batch {batch}, {rounds} alternating rounds in one process")
        return self.child(mode="paired", versus=versus, batch=batch, context=T + n, storage=None, bits=None,
                          prompts=[p[:T] for p in self.wl.prompts[:batch]], new_tokens=n, rounds=rounds, **spec)

    def paired_stream(self, fraction: float) -> dict:
        budget = int(fraction * self.gguf_bytes)
        T, n = resolve(FULL, self.wl)
        if fits(self.shape, budget, 1, T + n, None) is not None:
            return {"ok": False, "does_not_fit": True}
        return {**self.paired("stream", 1, memory=budget), "fraction": fraction, "memory_budget_bytes": budget}

    # ---- perplexity windows

    def windows(self, tokens: int) -> list[list[int]]:
        return [w[: tokens + 1] for w in self.wl.windows]

    def full_window(self) -> int:
        return len(self.wl.windows[0]) - 1

    def plan_perplexity(self) -> dict[tuple[int, int | None], int]:
        """Window tokens each streamed (budget, bits) can score: the full window, or the longest
        context the budget allows (0: none worth reporting)."""
        out = {}
        for f in FRACTIONS:
            budget = int(f * self.gguf_bytes)
            for bits in {v.bits for v in (FULL, *LADDER)}:
                ctx = min(max_context(self.shape, budget, bits), self.full_window())
                out[(budget, bits)] = ctx if ctx >= MIN_PPL_CONTEXT else 0
        return out

    # ---- rows

    def memory_rows(self, lengths: set[int]) -> list[dict]:
        rows = []
        sets = {f"w{n}": self.windows(n) for n in sorted(lengths)}
        for b in BATCHES:
            _say(f"{SYS_MEM}, batch {b}")
            res = self.child(mode="memory", batch=b, context=len(self.wl.prompts[0]) + self.wl.new_tokens,
                             prompts=self.wl.prompts[:b], new_tokens=self.wl.new_tokens,
                             window_sets=sets if b == BATCHES[0] else None)
            for k, v in (res.get("perplexity") or {}).items():
                self.mem_ppl[int(k[1:])] = v["perplexity"]
            rows.append(self._row(SYS_MEM, dp.MEMORY, b, None, res, FULL, kind="sti-memory",
                                  extra="weights in memory, packed Q4_1 with the fused kernels"))
        full = self.full_window()
        for r in rows:
            r["perplexity"] = self.mem_ppl.get(full)
            r["config"]["ppl_window_tokens"] = full if r["perplexity"] is not None else None
        return rows

    def stream_perplexity(self, budget: int, bits: int | None, tokens: int) -> dict:
        key = (budget, bits)
        if key not in self.ppl:
            if not tokens:
                self.ppl[key] = {"perplexity": None, "note": "no perplexity: the budget leaves no room for a "
                                                            f"{MIN_PPL_CONTEXT}-token window at batch 1"}
            else:
                _say(f"{SYS_STREAM} perplexity, budget {_mbs(budget)}, {_bits_label(bits)}, {tokens}-token windows")
                res = self.child(mode="stream", memory=budget, bits=bits, batch=1, context=tokens, storage=None,
                                 prompts=None, window_sets={f"w{tokens}": self.windows(tokens)})
                p = ((res.get("perplexity") or {}).get(f"w{tokens}") or {}).get("perplexity")
                self.ppl[key] = {"perplexity": p, "tokens": tokens,
                                 "note": "" if p is not None else f"perplexity failed: {_why(res)}"}
        return self.ppl[key]

    def stream_rows(self, fraction: float, storage: str, ppl_tokens: dict) -> list[dict]:
        budget = int(fraction * self.gguf_bytes)
        rows, used = [], {}
        for b in BATCHES:
            tried = []
            for v in (FULL, *LADDER):
                T, n = resolve(v, self.wl)
                why = fits(self.shape, budget, b, T + n, v.bits)
                if why is None:
                    used[b] = v
                    break
                tried.append((v, why))
            first = tried[0][1] if tried and tried[0][0] is FULL else None
            if first:
                rows.append(self._row(SYS_STREAM, storage, b, budget, {"ok": False, "does_not_fit": True},
                                      FULL, kind="sti-stream", fraction=fraction,
                                      extra=f"does not fit: {first}"))
            if b not in used:
                continue
            rows.append(self.stream_row(budget, fraction, storage, b, used[b], tried, ppl_tokens))
        # batch 1 on the workload batch 16 ran, where they differ: the batch-16 ratio compares like with like
        if len(BATCHES) > 1 and BATCHES[-1] in used and used.get(BATCHES[0]) != used[BATCHES[-1]]:
            rows.append(self.stream_row(budget, fraction, storage, BATCHES[0], used[BATCHES[-1]], [], ppl_tokens,
                                        compare=True))
        return rows

    def stream_row(self, budget, fraction, storage, b, v: Variant, tried, ppl_tokens, compare=False) -> dict:
        T, n = resolve(v, self.wl)
        label = "" if v is FULL else f"variant: {describe(v, self.wl)}"
        _say(f"{SYS_STREAM}, {fraction:.0%} ({_mbs(budget)}), {storage}, batch {b}" + (f" [{label}]" if label else ""))
        evict = storage == "real" and not self.evicted
        self.evicted |= evict
        res = self.child(mode="stream", memory=budget, bits=v.bits, batch=b, context=T + n,
                         storage=None if storage == "real" else storage, evict=evict,
                         prompts=[p[:T] for p in self.wl.prompts[:b]], new_tokens=n)
        ppl = self.stream_perplexity(budget, v.bits, ppl_tokens.get((budget, v.bits), 0))
        notes = []
        if v is not FULL:
            skipped = [describe(t, self.wl) for t, _ in tried if t is not FULL]
            notes.append(label + (" — for the batch-16 comparison" if compare else
                                  " (the full workload does not fit" +
                                  (f"; neither does {' nor '.join(skipped)}" if skipped else "") + ")"))
        notes.append("real storage: the page cache as it is after evicting the store once at the start "
                     "(warm after the first pass)" if storage == "real" else
                     f"emulated {storage}: every read paced by sti.runtime.Throttle")
        if ppl.get("perplexity") is not None and ppl["tokens"] != self.full_window():
            mem = self.mem_ppl.get(ppl["tokens"])
            notes.append(f"perplexity over {ppl['tokens']}-token windows (the budget's longest context); "
                         f"in memory on the same windows: {mem:.2f}" if mem else
                         f"perplexity over {ppl['tokens']}-token windows")
        elif ppl.get("note"):
            notes.append(ppl["note"])
        r = self._row(SYS_STREAM, storage, b, budget, res, v, kind="sti-stream", fraction=fraction,
                      extra="; ".join(notes), compare=compare)
        r["perplexity"] = ppl.get("perplexity")
        r["config"]["ppl_window_tokens"] = ppl.get("tokens")
        r["config"]["ppl_in_memory_same_windows"] = self.mem_ppl.get(ppl.get("tokens") or -1)
        return r

    def _row(self, system, storage, batch, budget, res: dict, v: Variant, *, kind: str, fraction=None,
             extra: str = "", compare: bool = False) -> dict:
        T, n = resolve(v, self.wl) if kind == "sti-stream" else (len(self.wl.prompts[0]), self.wl.new_tokens)
        measured = bool(res.get("ok")) and "speed" in res
        config = {"kind": kind, "fraction": fraction, "variant": v.label, "prompt_tokens": T, "new_tokens": n,
                  "bits": v.bits, "fits": not res.get("does_not_fit"), "measured": measured,
                  "batch16_comparison": compare}
        notes = extra
        if measured:
            sp = res["speed"]
            io = res.get("io") or {}
            parts = [f"{sp['new_tokens']} new tokens/sequence, median of {len(sp['runs'])}"]
            if res.get("plan"):
                p = res["plan"]
                parts.append(f"plan: {p['preloaded_shards']} shards preloaded, {p['slots']} read buffers, "
                             f"{_mbs(p['stream_bytes_per_pass'])} read per pass; engine peak "
                             f"{_mbs(res.get('engine_peak_bytes'))}")
                config["plan"] = p
            if io.get("bytes"):
                parts.append(f"read {io['bytes'] / 1e6:.0f} MB in {io['reads']} reads, stalled {io['stall_s']:.2f} s")
                config["io"] = io
            notes = "; ".join(x for x in (extra, *parts) if x)
            r = row(system, storage, batch, memory_budget_bytes=budget,
                    resident_weight_bytes=res.get("resident_weight_bytes"), peak_rss_bytes=res.get("peak_rss_bytes"),
                    prefill_tok_s=sp["prefill_tok_s"], decode_tok_s=sp["decode_tok_s"], ttft_s=sp["ttft_s"],
                    notes=notes)
        else:
            if not res.get("does_not_fit"):
                notes = "; ".join(x for x in (extra, f"failed: {_why(res)}") if x)
            elif res.get("problem"):  # the child's planner disagreed with ours: its word stands
                notes = f"does not fit: {res['problem']}" + (f"; {res['fix']}" if res.get("fix") else "")
                config["fits"] = False
            r = row(system, storage, batch, memory_budget_bytes=budget, notes=notes)
        r["config"] = config
        return r


def _why(res: dict) -> str:
    if res.get("error"):
        return str(res["error"]).replace("\n", " ")
    if res.get("problem"):
        return res["problem"]
    return "no result"


# --------------------------------------------------------------------------- targets


def _find(rows, **want) -> dict | None:
    for r in rows:
        cfg = r.get("config") or {}
        if all((cfg.get(k[4:]) if k.startswith("cfg_") else r.get(k)) == v for k, v in want.items()):
            return r
    return None


def _measured(r: dict | None) -> bool:
    return bool(r) and r.get("decode_tok_s") is not None and (r.get("config") or {}).get("fits", True)


def evaluate_targets(rows: list[dict], paired: dict | None = None) -> list[dict]:
    """The issue's four targets, PASS or FAIL, with the numbers. A target is judged only on rows
    of the full workload that were measured; a row that does not fit (or a reduced variant)
    never meets a target. ``paired`` ({"stream": ``STIRun.paired_stream``, "llama.cpp": {batch:
    ``STIRun.paired``}}), where measured, judges the speed ratios instead of the rows: in-memory
    against llama.cpp, and the 10% row's share of in-memory, each pair timed in alternating
    rounds of one process."""
    out = []

    def add(name, ok, text):
        out.append({"target": name, "status": "PASS" if ok else "FAIL", "detail": text})

    paired = paired or {}
    # 1. in-memory decode >= llama.cpp, batch 1 and 16
    parts, oks = [], []
    for b in BATCHES:
        s = _find(rows, system=SYS_MEM, batch=b)
        ll = _find(rows, system="llama.cpp", batch=b)
        if _measured(s) and _measured(ll):
            x = s["decode_tok_s"] / ll["decode_tok_s"]
            text = f"{s['decode_tok_s']:.1f} vs {ll['decode_tok_s']:.1f} tok/s ({x:.2f}x)"
            pl = (paired.get("llama.cpp") or {}).get(b) or {}
            if pl.get("ok"):  # ratio = llama.cpp / STI per round; an odd number of rounds inverts exactly
                x = 1 / pl["ratio"]
                text = (f"{x:.2f}x timed in one process, {pl['rounds']} alternating rounds "
                        f"({pl['memory_tok_s']:.1f} vs {pl['other_tok_s']:.1f} tok/s); in the rows' own processes "
                        + text)
            oks.append(x >= 1)
            parts.append(f"batch {b}: {text}")
        else:
            oks.append(False)
            parts.append(f"batch {b}: not measured ({'STI' if not _measured(s) else 'llama.cpp'} has no result)")
    add("in-memory decode tokens/s >= llama.cpp's", all(oks), "; ".join(parts))

    # 2. streaming at 10%, batch 1, real storage: >= 5x AirLLM and >= 50% of in-memory
    s10 = _find(rows, system=SYS_STREAM, storage="real", batch=1, cfg_fraction=TARGET_FRACTION, cfg_variant=None)
    air = _find(rows, system="AirLLM", storage="real", batch=1)
    mem = _find(rows, system=SYS_MEM, batch=1)
    if _measured(s10) and _measured(air) and _measured(mem):
        a, m = s10["decode_tok_s"] / air["decode_tok_s"], s10["decode_tok_s"] / mem["decode_tok_s"]
        rows_text = f"{m:.0%} of in-memory ({mem['decode_tok_s']:.1f})"
        ps = paired.get("stream") or {}
        if ps.get("ok"):
            m = ps["ratio"]
            rows_text = (f"{m:.0%} of in-memory timed in one process, {ps['rounds']} alternating rounds "
                         f"({ps['other_tok_s']:.1f} vs {ps['memory_tok_s']:.1f} tok/s, median of the "
                         f"per-round ratios); across the two rows' own processes {rows_text}")
        add("streaming at 10% memory >= 5x AirLLM and >= 50% of in-memory (real storage)", a >= 5 and m >= 0.5,
            f"{s10['decode_tok_s']:.2f} tok/s = {a:.1f}x AirLLM ({air['decode_tok_s']:.2f}) and {rows_text}")
    else:
        why = []
        if not _measured(s10):
            why.append("the full workload does not fit STI's 10% budget" if s10 and not s10["config"]["fits"]
                       else "STI at 10% not measured")
        if not _measured(air):
            why.append("AirLLM not measured")
        if not _measured(mem):
            why.append("STI in memory not measured")
        v = next((r for r in rows if r["system"] == SYS_STREAM and r["storage"] == "real" and r["batch"] == 1
                  and r["config"].get("fraction") == TARGET_FRACTION and r["config"].get("variant")
                  and not r["config"].get("batch16_comparison") and _measured(r)), None)
        info = ""
        if v:
            info = f"; for information, the variant ({v['config']['variant']}) ran at {v['decode_tok_s']:.2f} tok/s"
            if _measured(air):
                info += f" = {v['decode_tok_s'] / air['decode_tok_s']:.1f}x AirLLM"
            if _measured(mem):
                info += f", {v['decode_tok_s'] / mem['decode_tok_s']:.0%} of in-memory"
        add("streaming at 10% memory >= 5x AirLLM and >= 50% of in-memory (real storage)", False,
            "not met: " + "; ".join(why) + info)

    # 3. batch 16 >= 8x batch 1 while streaming, same workload
    parts, oks = [], []
    for r16 in (r for r in rows if r["system"] == SYS_STREAM and r["batch"] == BATCHES[-1] and _measured(r)):
        c = r16["config"]
        r1 = _find(rows, system=SYS_STREAM, storage=r16["storage"], batch=BATCHES[0], cfg_fraction=c["fraction"],
                   cfg_variant=c["variant"])
        if not _measured(r1):
            continue
        ratio = r16["decode_tok_s"] / r1["decode_tok_s"]
        oks.append(ratio >= 8)
        parts.append(f"{c['fraction']:.0%} {r16['storage']}{' (' + c['variant'] + ')' if c['variant'] else ''}: "
                     f"{ratio:.1f}x")
    missing = sorted({f"{r['config']['fraction']:.0%}" for r in rows if r["system"] == SYS_STREAM
                      and r["batch"] == BATCHES[-1] and not r["config"]["fits"]
                      and not any(_measured(x) for x in rows if x["system"] == SYS_STREAM
                                  and x["batch"] == BATCHES[-1] and x["config"]["fraction"] == r["config"]["fraction"])},
                     key=lambda s: -float(s[:-1]))
    text = "; ".join(parts) if parts else "no streaming budget measured both batch sizes"
    if missing:
        text += f"; batch {BATCHES[-1]} fits no workload at {', '.join(missing)} (not counted)"
    add(f"batch-{BATCHES[-1]} decode throughput >= 8x batch-1 while streaming", bool(oks) and all(oks), text)

    # 4. perplexity of the 10% plan within 3% of in-memory, on the same windows
    p10 = s10 if _measured(s10) else next(
        (r for r in rows if r["system"] == SYS_STREAM and r["batch"] == 1 and r["storage"] == "real"
         and r["config"].get("fraction") == TARGET_FRACTION and _measured(r)
         and not r["config"].get("batch16_comparison")), None)
    name = "perplexity of the 10%-memory plan within 3% of in-memory"
    if p10 and p10.get("perplexity") is not None and p10["config"].get("ppl_in_memory_same_windows"):
        pm = p10["config"]["ppl_in_memory_same_windows"]
        d = p10["perplexity"] / pm - 1
        plan = "full-workload plan" if not p10["config"]["variant"] else f"plan of the variant ({p10['config']['variant']})"
        add(name, abs(d) <= 0.03, f"{p10['perplexity']:.3f} vs {pm:.3f} in memory ({d:+.2%}), {plan}, "
            f"{_bits_label(p10['config']['bits'])}, {p10['config']['ppl_window_tokens']}-token windows")
    else:
        add(name, False, "not measured: no 10%-memory plan ran perplexity")
    return out


# --------------------------------------------------------------------------- plot


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6))
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        c = r.get("config") or {}
        if r["system"] == SYS_STREAM and _measured(r) and not c.get("batch16_comparison"):
            lines.setdefault((r["batch"], r["storage"]), []).append(r)
    for (b, s), rs in sorted(lines.items()):
        rs.sort(key=lambda r: r["memory_budget_bytes"])
        xs = [r["memory_budget_bytes"] / 1e6 for r in rs]
        ys = [r["decode_tok_s"] for r in rs]
        (ln,) = ax.plot(xs, ys, "-", marker="o", label=f"STI streaming, batch {b}, {s}")
        for x, y, r in zip(xs, ys, rs):
            if r["config"].get("variant"):  # hollow: a reduced workload
                ax.plot([x], [y], "o", mfc="white", mec=ln.get_color(), ms=9)
    markers = iter("s^vDP*Xph<>8Hd" * 3)
    colors = iter(plt.get_cmap("tab20b").colors * 3)
    for r in rows:
        c = r.get("config") or {}
        if r["system"] == SYS_STREAM or not _measured(r):
            continue
        x = r["memory_budget_bytes"] or r["resident_weight_bytes"] or r["peak_rss_bytes"]
        if not x:
            continue
        where = "budget" if r["memory_budget_bytes"] else "resident size"
        ax.plot([x / 1e6], [r["decode_tok_s"]], next(markers), color=next(colors), ms=8, linestyle="none",
                label=f"{r['system']}, batch {r['batch']}"
                      + (f", {r['storage']}" if r["storage"] != dp.MEMORY else "") + f" (at {where})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memory budget (MB; in-memory systems at their resident weight bytes)")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title("SmolLM2-135M decode speed against memory (hollow: reduced workload)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- output


def render_markdown(rows: list[dict], targets: list[dict], details: dict) -> str:
    env, wl = details["environment"], details["workload"]
    lines = [f"# sti bench decoder{' (--quick)' if details['quick'] else ''}", "",
             markdown_table(rows), "", "## Targets", "",
             "| target | result | numbers |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['status']} | {t['detail'].replace('|', '/')} |" for t in targets]
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in details["notes"]]
    lines += ["", f"Workload: {wl['prompts']} prompts of {wl['prompt_tokens']} tokens (batch B runs the first B), "
                  f"greedy, {wl['new_tokens']} new tokens per sequence in memory and {wl['stream_new_tokens']} when "
                  f"streaming; prefill and decode tokens/s count every sequence; TTFT is the prefill until the first "
                  f"token of every sequence, model loaded. Perplexity: {wl['windows']} window(s) of "
                  f"{wl['window_tokens']} tokens. {wl.get('text', '')}.",
              f"Machine: {env['cpu_model']} ({env['cpus_available']} CPUs), {env['threads']} threads per system, "
              f"Python {env['python']}; other processes used {(env.get('contention') or {}).get('other_share', 0):.0%}"
              f" of the CPU during the run (load average at end {env['loadavg_end']}); {env['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def sanitize(text: str, placeholders: list[tuple[str, str]]) -> str:
    for path, name in sorted(placeholders, key=lambda p: -len(p[0])):
        if path and len(path) > 1:
            text = text.replace(path, name)
    return text


def write_outputs(rows, targets, details, out_dir, placeholders) -> tuple[list[Path], str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = sanitize(render_markdown(rows, targets, details), placeholders)
    report = {"suite": "decoder", "schema_version": SCHEMA_VERSION, "row_keys": [*ROW_KEYS, "config"],
              "rows": rows, "targets": targets, **details}
    js, mdp, png = out / "decoder.json", out / "decoder.md", out / "decoder-tokens-vs-memory.png"
    js.write_text(sanitize(json.dumps(report, indent=1, default=str), placeholders) + "\n")
    mdp.write_text(md)
    plot(rows, png)
    return [js, mdp, png], md


def default_store() -> Path:
    """The cached SmolLM2 decoder store, packed on first use (all versions, a few minutes)."""
    from sti.demo import cache_dir

    path = cache_dir() / "smollm2.sti"
    if not path.exists():
        import shutil

        from sti.store import pack

        _say(f"packing SmolLM2 into {path} (once, a few minutes)")
        tmp = path.with_name(path.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        pack("smollm2", tmp, progress=True)
        tmp.rename(path)  # a pack cut short never passes for a store
    return path


def _by_scope(peer_list) -> dict[tuple, list]:
    """Peers grouped by (storages, batches), None meaning the run's own: ``peer_list`` is a
    ``decoder_peers.peer_scopes`` spec ("llama.cpp,airllm@real/1"), a list of peers and
    (peer, storages, batches) triples, or None for every peer everywhere."""
    if peer_list is None or isinstance(peer_list, str):
        scoped = dp.peer_scopes(peer_list)
    else:
        scoped = [p if isinstance(p, tuple) else (p, None, None) for p in peer_list]
    groups: dict[tuple, list] = {}
    for peer, storages, batches in scoped:
        groups.setdefault((storages, batches), []).append(peer)
    return groups


def run_decoder(out_dir: str | Path = "bench-results", repeats: int = 3, quick: bool = False,
                store: str | Path | None = None, peers: bool = True, peer_list=None, runner=None,
                measure_peers=None) -> int:
    """Measure STI and (``peers``) the peers; write decoder.{json,md,png}; 0 when every
    measurement that should run ran (a configuration that does not fit is not a failure).
    ``peer_list``: which peers, and where (see ``_by_scope``)."""
    from sti.loaders.builtin import resolve as resolve_model

    t0, snap = time.perf_counter(), cpu_snapshot()
    peer_groups = _by_scope(peer_list) if peers else {}  # a bad spec fails now, not after the STI rows
    reps = 1 if quick else max(1, min(repeats, MAX_REPEATS))
    gguf = Path(resolve_model("smollm2"))
    store_path = Path(store) if store else default_store()
    wl = dp.build_workload(gguf, quick)
    run = STIRun(store_path, gguf.stat().st_size, wl, repeats=reps, quick=quick, runner=runner)
    sections = {}
    ppl_tokens = run.plan_perplexity()
    lengths = {run.full_window()} | {t for t in ppl_tokens.values() if t}
    s = cpu_snapshot()
    rows = run.memory_rows(lengths)
    for f in FRACTIONS:
        for st in STORAGES:
            rows += run.stream_rows(f, st, ppl_tokens)
    paired: dict = {"stream": run.paired_stream(TARGET_FRACTION)}
    llama = next((p for g in peer_groups.values() for p in g if p.name == "llama.cpp"), None)
    if llama is not None and not llama.missing():
        paired["llama.cpp"] = {b: run.paired("llama.cpp", b, gguf=str(gguf), threads=dp.THREADS) for b in BATCHES}
    sections["sti"] = {"contention": contention(s, cpu_snapshot(), _cpus())}
    peer_details: dict = {}
    if peers:
        s = cpu_snapshot()
        mp = measure_peers or dp.measure
        for (sts, bs), group in peer_groups.items():  # peers measured where asked, in one call per scope
            prow, d = mp(group, list(sts or STORAGES), tuple(bs or BATCHES), quick=quick, repeats=reps)
            for r in prow:
                r["config"] = {"kind": "peer", "fits": True, "measured": r.get("decode_tok_s") is not None}
            rows += prow
            peer_details = {**peer_details, **d, "peers": {**peer_details.get("peers", {}), **d.get("peers", {})}}
        sections["peers"] = {"contention": contention(s, cpu_snapshot(), _cpus())}
    targets = evaluate_targets(rows, paired)
    total = contention(snap, cpu_snapshot(), _cpus())
    from sti.machine import cpu_model

    env = {"python": sys.version.split()[0], "cpus_available": _cpus(), "threads": dp.THREADS,
           "loadavg_end": _loadavg(), "cpu_model": cpu_model(), "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
           "elapsed_s": round(time.perf_counter() - t0, 1), "contention": total, "sections": sections}
    notes = [f"budgets are {', '.join(f'{f:.0%}' for f in FRACTIONS)} of the GGUF's {gguf.stat().st_size / 1e6:.1f} MB "
             "and count the KV cache (fp16, STI's default, as llama.cpp's) and the read slots, not only weights; "
             "rows that do not fit say so, "
             "with the planner's smallest feasible budget, and a labelled variant shows a reduced workload",
             "STI 'real' storage: the store is evicted from the page cache once, before the first real-storage "
             "configuration; later reads are served by the page cache as it is (the engine cannot evict between "
             "passes). The peers' 'real' evicts before every read. '200MBps' is emulated for both: every read paced",
             "STI streams zero-copy: a read slot is a shard's pages of the mapped store file, faulted in by the IO "
             "thread and dropped when the slot is reused, so at most the slots' bytes are mapped in (and in RSS)",
             "resident weight bytes: STI in memory = packed weights; STI streaming = the plan's norms + preloaded "
             "shards + read buffers + prefill scratch; peak RSS is each configuration's own process (VmHWM), measured "
             "after generation and before perplexity",
             f"targets are judged on full-workload rows only; a row that does not fit meets no target; "
             f"timed runs per configuration: {reps}",
             "the speed ratios of the first two targets (in-memory against llama.cpp; the 10% row against "
             "in-memory) are timed in one process, the two systems in alternating rounds on the streaming "
             f"workload ({wl.stream_new_tokens} new tokens), the median of the per-round ratios; the rows' own "
             "processes run minutes apart, and a machine's speed can drift between them by more than the effect "
             "measured"]
    if quick:
        notes.append("--quick: one perplexity window, 8 (in memory) / 4 (streaming) new tokens, one timed run: "
                     "a harness check, not a result")
    notes += contention_notes(total, sections)
    details = {"environment": env, "workload": wl.describe(), "quick": quick, "repeats": reps, "notes": notes,
               "store": {"bits": list(run.shape.bits), "token_bytes": run.shape.token_bytes},
               "perplexity_plans": [{"memory_budget_bytes": k[0], "bits": k[1], **v} for k, v in run.ppl.items()],
               "paired": paired, "sti_children": run.children, "peers": peer_details}
    import os
    import tempfile

    placeholders = [(str(store_path.resolve()), f"<store {store_path.name}>"), (str(store_path), f"<store {store_path.name}>"),
                    (str(gguf.parent), "<model dir>"), (str(dp.cache_dir()), "<cache>"), (tempfile.gettempdir(), "<tmp>"),
                    (sys.prefix, "<python prefix>"), (str(Path.home()), "~"), (os.getcwd(), "<cwd>")]
    written, md = write_outputs(rows, targets, details, out_dir, placeholders)
    print(md, end="")
    _say(f"wrote {', '.join(p.name for p in written)} to {out_dir} in {time.perf_counter() - t0:.0f} s")
    failed = [r for r in rows if (r["notes"] or "").startswith("failed") or "; failed:" in (r["notes"] or "")]
    return 1 if failed else 0
