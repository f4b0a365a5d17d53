"""``sti demo``: the elastic engine end to end on the built-in MiniLM, then a short chat answer.

1. **Cache.** The model is packed into a shard store and profiled once; both live in the
   user's cache directory (:func:`cache_dir`) and later runs reuse them. A store this STI
   cannot open (another format version, damaged) is re-packed, and a profile it cannot use
   (missing, stale, damaged) is re-made, each with the reason printed. The demo's profile
   measures shard importance on ``DemoSettings.n_calib`` calibration texts (16: a third of
   ``sti profile``'s 48, and about a third of its time); the profile records the number, and
   ``sti profile STORE`` replaces it with the full one.
2. **Budget.** Memory: :data:`MEMORY_FRACTION` of the float32 model's bytes as stored. Latency:
   :data:`LATENCY_FACTOR` times the whole in-memory model's warm latency on a
   ``seq_len``-token input, measured right there (median of :data:`TIMING_RUNS`), so the target
   means the same thing on a fast and on a slow machine. ``--latency`` / ``--memory`` override.
3. **Plan and run** through the public API (``Encoder.from_store``): the plan, then sample
   headlines one request each (label, latency against the target, peak resident weight bytes
   against the budget), then accuracy against the whole model on an evenly spaced,
   class-proportional slice of the held-out BBC News test split, with the deadline-met rate.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from sti.errors import STIError

MEMORY_FRACTION = 0.05  # default memory budget: this share of the float32 model's bytes
LATENCY_FACTOR = 2.0  # default latency target: this multiple of the whole model's warm latency
TIMING_RUNS = 7  # warm runs of the whole model whose median sets the default target
DEMO_SPEED_WINDOW_S = 20.0  # the profile samples the machine's speed over this many seconds (sti profile: 60)
STORE_NAME = "minilm.sti"

# Written for the demo, one or two per BBC News topic the built-in head knows.
HEADLINES = [
    "Central bank raises interest rates as inflation stays above target",
    "Director's latest film wins top prize at the festival in Cannes",
    "Prime minister faces backbench revolt over planned welfare cuts",
    "Striker scores twice as City come from behind to win the derby",
    "New smartphone chip promises longer battery life and faster AI features",
    "Supermarket chain reports record profits despite falling sales",
]
CHAT_PROMPT = "In one sentence, why does a model that streams its weights need less memory?"


@dataclass(frozen=True)
class DemoSettings:
    """What ``sti demo`` runs. The CLI's options set the first six; tests swap in a tiny model."""

    latency: str | None = None  # target per request, e.g. "30ms"; None: measured (see LATENCY_FACTOR)
    memory: str | None = None  # resident weight budget, e.g. "4.5MB"; None: MEMORY_FRACTION of fp32
    cache: str | Path | None = None  # cache directory; None: cache_dir()
    limit: int = 100  # held-out articles in the accuracy slice
    chat: bool = True  # end with a short SmolLM2 answer
    n_calib: int = 16  # calibration texts of a profile the demo makes

    model: str = "minilm"  # packed into the store: built-in name or Hugging Face directory
    head: str = "bbc-news"  # classification head (name or .npz path)
    seq_len: int = 64  # the plan's input length; longer texts are truncated to it
    store_name: str = STORE_NAME


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$STI_CACHE`` if set, else ``$XDG_CACHE_HOME/sti`` (an absolute XDG path only, as the XDG
    spec asks), else ``~/.cache/sti``."""
    env = os.environ if env is None else env
    if env.get("STI_CACHE"):
        return Path(env["STI_CACHE"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "sti"
    return Path.home() / ".cache" / "sti"


def _prepare_cache(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise STIError(f"cannot create the cache directory {path}: {exc.strerror}",
                       "pass a writable directory with --cache DIR (or set STI_CACHE)") from None
    return path


def ensure_store(path: Path, model: str) -> str:
    """Open the store at ``path``, packing ``model`` into it when it is missing or cannot be opened
    (another format version, damaged). Returns what happened, for the stage line."""
    from sti.store import Store, is_store, pack

    if is_store(path):
        try:
            Store.open(path).close()
            return "cached"
        except STIError as exc:
            print(f"  the cached store cannot be used: {exc.problem}\n  re-packing it ...", flush=True)
            pack(model, path, overwrite=True)
            return "re-packed"
    print(f"  first run: packing {model} into {path} ...", flush=True)
    pack(model, path)
    return "packed"


def ensure_profile(store: Path, n_calib: int) -> tuple[str, dict]:
    """The store's profile, made with ``n_calib`` calibration texts when there is none it can use.
    Returns (what happened, the profile's meta)."""
    from sti import profile as profiling

    path = profiling.profile_path(store)
    try:
        return "cached", profiling.load_profile(store)[2]
    except STIError as exc:
        if path.exists():
            print(f"  the cached profile cannot be used: {exc.problem}", flush=True)
    print(f"  profiling the store on {n_calib} calibration texts (a few minutes, once) ...", flush=True)
    profiling.run_profile(store, n_calib=n_calib, progress=True, speed_window=DEMO_SPEED_WINDOW_S)
    return "profiled", profiling.load_profile(store)[2]


def fp32_model_bytes(store: Path) -> int:
    """Bytes of the float32 model as stored: every shard's fp32 version, the globals and the
    word-embedding table."""
    from sti.store import Store

    with Store.open(store) as st:
        s = st.summary()
    if "fp32" not in s["bytes_per_version"]:
        raise STIError(f"the store {store} has no fp32 version to size the default memory budget by",
                       "pass --memory, or delete the store so the demo packs it again")
    return s["bytes_per_version"]["fp32"] + s["globals_bytes"] + s["embedding_bytes"]


# --------------------------------------------------------------------------------------------
# Budget and plan
# --------------------------------------------------------------------------------------------


def warm_latency(enc, seq_len: int, runs: int = TIMING_RUNS) -> float:
    """Median seconds of ``runs`` warm forward passes of ``enc`` on one ``seq_len``-token input
    (after two warm-up passes)."""
    import numpy as np

    from sti.tasks import count_truncation_notices

    with count_truncation_notices():  # the input is cut to seq_len tokens on purpose
        ids, mask = enc.tokenize([" ".join(HEADLINES * 4)])
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        enc.hidden_states(ids, mask)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclass(frozen=True)
class Budget:
    latency: float  # seconds per request
    memory: int  # resident weight bytes
    latency_why: str  # how each was chosen, for the report
    memory_why: str


def choose_budget(s: DemoSettings, fp32_bytes: int, full_latency: float) -> Budget:
    from sti.units import fmt_bytes, parse_bytes, parse_latency

    if s.memory is None:
        memory = int(MEMORY_FRACTION * fp32_bytes)
        memory_why = f"{MEMORY_FRACTION:.0%} of the float32 model as stored ({fmt_bytes(fp32_bytes)})"
    else:
        memory, memory_why = parse_bytes(s.memory), "given (--memory)"
    if s.latency is None:
        latency = LATENCY_FACTOR * full_latency
        latency_why = (f"{LATENCY_FACTOR:g} x the whole in-memory model's warm latency at {s.seq_len} tokens "
                       f"({full_latency * 1e3:.1f} ms, median of {TIMING_RUNS} runs, measured now)")
    else:
        latency, latency_why = parse_latency(s.latency), "given (--latency)"
    return Budget(latency, memory, latency_why, memory_why)


def plan_encoder(store: Path, s: DemoSettings, budget: Budget):
    """(``Encoder.from_store`` under the budget, the budget it ran under). A default budget that
    no plan can meet moves to the nearest one that can, saying so; a budget the user gave never
    moves (its InfeasiblePlanError names the smallest latency and memory that would do)."""
    from sti.api import Encoder
    from sti.plan import InfeasiblePlanError
    from sti.units import fmt_bytes

    try:
        return Encoder.from_store(store, budget.latency, budget.memory, seq_len=s.seq_len), budget
    except InfeasiblePlanError as exc:
        if s.latency is None and exc.min_latency is not None:
            budget = replace(budget, latency=exc.min_latency, latency_why=(
                f"no plan within {fmt_bytes(budget.memory)} meets the default {_ms(budget.latency)}; "
                f"the fastest plan within it is the target"))
        elif s.memory is None and exc.min_memory is not None:
            budget = replace(budget, memory=exc.min_memory, memory_why=(
                f"no plan meets {_ms(budget.latency)} within the default {fmt_bytes(budget.memory)}; "
                f"the smallest memory that does is the budget"))
        else:
            raise
    return Encoder.from_store(store, budget.latency, budget.memory, seq_len=s.seq_len), budget


def _bits_label(bits: int) -> str:
    return "fp32" if bits >= 32 else f"{bits}b"


def plan_lines(plan) -> list[str]:
    """The plan, one line per layer: width, bit mix, shards preloaded; then the totals."""
    from sti.units import fmt_bytes

    preloaded = Counter(layer for layer, _ in plan.preload)
    mixes = [", ".join(f"{_bits_label(b)} x{n}" for b, n in sorted(Counter(lp.bits).items(), reverse=True)) or "-"
             for lp in plan.layers]
    w = max(len("bits (shards)"), *map(len, mixes))
    lines = [f"  {'layer':<7}{'width':<8}{'bits (shards)':<{w}}  preloaded"]
    for layer, (lp, mix) in enumerate(zip(plan.layers, mixes)):
        lines.append(f"  {layer:<7}{f'{len(lp.shards)}/{plan.shards_per_layer}':<8}{mix:<{w}}  {preloaded[layer]}")
    lines.append(f"  preload {fmt_bytes(plan.preload_bytes)}, predicted latency {plan.predicted_latency * 1e3:.1f} ms "
                 f"(IO stalls {plan.stall_time * 1e3:.1f} ms), predicted resident peak "
                 f"{fmt_bytes(plan.resident_bytes_peak)}")
    return lines


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def held_out_articles(limit: int) -> tuple[list[str], list[str]]:
    """(texts, true labels) of ``limit`` held-out BBC News test articles, evenly spaced and
    class-proportional (``sti.tasks.bbc.subsample``)."""
    from sti.tasks import bbc

    arts, parts = bbc.load_split()
    idx = bbc.subsample(parts["test"], limit)
    return [arts.texts[i] for i in idx], arts.label_names(idx)


def _stage(name: str, t_start: float, what: str) -> None:
    """One line per stage: its name, the seconds since ``t_start`` and what it did."""
    print(f"  {name:<9}{time.perf_counter() - t_start:>7.2f} s  {what}", flush=True)


def _profile_summary(meta: dict, store: Path) -> str:
    from sti.profile import DEFAULT_N_CALIB

    key = meta.get("meta", {}).get("importance_key", {})
    n = key.get("n_calib")
    text = f"shard importance on {n} {key.get('task', '')} calibration texts, this device's IO and compute speed"
    if isinstance(n, int) and n < DEFAULT_N_CALIB:
        text += f"\n{'':<22}(a quick profile: sti profile {store} measures on {DEFAULT_N_CALIB} texts)"
    return text


def _ms(t: float) -> str:
    return f"{t * 1e3:.1f} ms"


def _headlines(enc, full, s: DemoSettings, budget: Budget) -> None:
    from sti.units import fmt_bytes

    enc.classify(HEADLINES[:1], s.head)  # warm-up: first-request costs are not the steady state
    full_labels, _ = full.classify(HEADLINES, s.head)
    print(f"\n== {len(HEADLINES)} headlines, one request each (after one warm-up request)")
    print(f"  {'label':<15}{'whole model':<15}{'latency / target':<29}{'peak weights / budget':<24}headline")
    for text, ref in zip(HEADLINES, full_labels):
        (label,), _ = enc.classify([text], s.head)
        t = enc.last_trace
        met = "met" if t.latency <= budget.latency else "MISSED"
        lat = f"{_ms(t.latency)} / {_ms(budget.latency)} {met}"
        mem = f"{fmt_bytes(t.resident_peak)} / {fmt_bytes(budget.memory)}"
        print(f"  {label:<15}{ref:<15}{lat:<29}{mem:<24}{text}")


def _accuracy(enc, full, s: DemoSettings, budget: Budget, fp32_bytes: int) -> None:
    """Both engines on the same held-out articles, one request per article, interleaved so that
    both see the same machine load; latency is the encoder forward (the engine's own trace for
    the elastic one, ``hidden_states`` on the same token ids for the whole model)."""
    import numpy as np

    from sti.tasks import count_truncation_notices

    t0 = time.perf_counter()
    texts, truth = held_out_articles(s.limit)
    pred, full_lat, lat, peak = [], [], [], 0
    with count_truncation_notices():
        full_pred, _ = full.classify(texts, s.head)
        for text in texts:
            ids, mask = full.tokenize([text])
            t1 = time.perf_counter()
            full.hidden_states(ids, mask)
            full_lat.append(time.perf_counter() - t1)
            (label,), _ = enc.classify([text], s.head)
            pred.append(label)
            lat.append(enc.last_trace.latency)
            peak = max(peak, enc.last_trace.resident_peak)

    def row(name, labels, seconds, resident):
        p10, med, p90 = np.percentile(seconds, [10, 50, 90]) * 1e3
        acc = np.mean([a == b for a, b in zip(labels, truth)])
        met = np.mean(np.asarray(seconds) <= budget.latency)
        print(f"  {name:<24}{acc:<10.3f}{f'{med:.1f} ms ({p10:.1f}-{p90:.1f})':<28}{met:<14.0%}{resident}")

    print(f"\n== accuracy on {len(texts)} held-out BBC News test articles, cut to {s.seq_len} tokens "
          f"({time.perf_counter() - t0:.1f} s; one request per article, the two engines interleaved)")
    print(f"  {'':<24}{'accuracy':<10}{'latency median (p10-p90)':<28}{'deadline met':<14}resident weights")
    row("whole model in memory", full_pred, full_lat, f"{fp32_bytes:,} B")
    row("elastic engine", pred, lat, f"{peak:,} B peak (budget {budget.memory:,} B)")
    agree = np.mean([a == b for a, b in zip(pred, full_pred)])
    print(f"  deadline: the target {_ms(budget.latency)}; the elastic engine agrees with the whole model on "
          f"{agree:.0%} of the articles")


def _chat() -> None:
    from sti.api import Generator

    print("\n== generate: SmolLM2-135M-Instruct (GGUF Q4_1, run in float32, whole model in memory)")
    t0 = time.perf_counter()
    try:
        gen = Generator.load("smollm2", progress=False)
    except STIError as exc:
        print(f"  skipped: {exc.problem} (fix: {exc.fix})")
        return
    print(f"  loaded in {time.perf_counter() - t0:.1f} s\n  > {CHAT_PROMPT}\n  ", end="")
    toks, printed = [], ""
    t0 = time.perf_counter()
    for tok in gen.stream(CHAT_PROMPT, max_tokens=48, chat=True):
        toks.append(tok)
        text = gen.decode(toks)
        if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            sys.stdout.write(text[len(printed):].replace("\n", "\n  "))
            sys.stdout.flush()
            printed = text
    dt = time.perf_counter() - t0
    print(f"\n  {len(toks)} tokens in {dt:.2f} s ({len(toks) / dt:.1f} tokens/s, prefill included)")


def run_demo(settings: DemoSettings | None = None) -> int:
    from sti.api import Encoder
    from sti.units import fmt_bytes

    s = settings or DemoSettings()
    if s.limit < 1:
        raise STIError(f"--limit must be at least 1, got {s.limit}", "pass a positive number of articles")
    if s.n_calib < 2:
        raise STIError(f"--calib must be at least 2, got {s.n_calib}", "pass a number of calibration texts, e.g. 16")
    t_start = time.perf_counter()
    cache = _prepare_cache(Path(s.cache).expanduser() if s.cache is not None else cache_dir())
    store = cache / s.store_name
    print(f"STI demo: {s.model} streamed from a shard store under a latency target and a memory budget")
    print(f"cache: {cache}  (--cache DIR or $STI_CACHE to move it)\n")

    t0 = time.perf_counter()
    what = ensure_store(store, s.model)
    _stage("store", t0, f"{store.name} {what}")
    t0 = time.perf_counter()
    what, meta = ensure_profile(store, s.n_calib)
    _stage("profile", t0, f"{store.name}/profile.json {what}: {_profile_summary(meta, store)}")
    t0 = time.perf_counter()
    full = Encoder.load(s.model)
    full.max_tokens = min(s.seq_len, full.max_tokens)  # the same inputs as the elastic engine
    full_latency = warm_latency(full, s.seq_len)
    _stage("baseline", t0, f"whole model loaded into memory; warm latency at {s.seq_len} tokens {_ms(full_latency)}")
    fp32_bytes = fp32_model_bytes(store)
    budget = choose_budget(s, fp32_bytes, full_latency)
    t0 = time.perf_counter()
    enc, budget = plan_encoder(store, s, budget)
    _stage("plan", t0, f"{enc.plan.method} planner, inputs up to {s.seq_len} tokens")
    print("\n== budget")
    print(f"  memory   {fmt_bytes(budget.memory):>10}  {budget.memory_why}")
    print(f"  latency  {_ms(budget.latency):>10}  {budget.latency_why}")
    print("\n== plan (shards per layer, the bitwidth of each; preloaded shards stay resident across requests)")
    print("\n".join(plan_lines(enc.plan)))

    _headlines(enc, full, s, budget)
    _accuracy(enc, full, s, budget, fp32_bytes)
    if s.chat:
        _chat()
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s. The store and profile stay in {cache}: "
          f"the next run starts in seconds.")
    return 0
