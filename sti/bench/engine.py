"""``sti bench engine``: STI against Hugging Face transformers (PyTorch, fp32) on the same
models, the same inputs and the same number of threads, measured side by side in one run.

Measurements (each one a row of the table):
  1. encoder warm latency (MiniLM, batch 1, exactly 32 / 128 tokens): ``Encoder.hidden_states``
     vs ``AutoModel`` under ``torch.inference_mode()``, after warm-up;
  2. cold start: a new process to the first printed classification (imports and loading
     included): ``python -m sti classify TEXT`` vs ``_ref_cold.py`` (torch + transformers, the
     same MiniLM directory and the same linear head), page cache warm;
  3. SmolLM2 greedy decode speed (tokens/s, prefill excluded): ``Generator.stream`` vs a
     ``LlamaForCausalLM`` built from the very same dequantized weights, greedy with a KV cache;
  4. GGUF load time in a fresh process: ``Generator.load`` vs
     ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (once; skipped under --quick).

Machines are shared and noisy: repetitions of STI and the reference are interleaved (A, B, A,
B, ...), medians and spreads are reported and each ratio is STI median / reference median of
this run. The pure parts (statistics, targets, the table, the JSON report) are at the top and
import nothing heavy; PyTorch and transformers are imported only inside the measurements.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sti.machine import available_cpus

THREADS = 2
CONTENDED_SHARE = 0.10  # other processes' share of the CPU above which the report warns
SCHEMA_VERSION = 1
HERE = Path(__file__).resolve().parent
HEAD_NAME = "bbc-news"
HEADLINE = "Shares in the bank fell 5% after quarterly profits missed analysts' forecasts"
DECODE_PROMPT = "The history of the printing press began in"
# Real English text, repeated as needed and cut to exactly T tokens for the warm-latency rows.
ENCODER_TEXT = (
    "The printing press was developed in the fifteenth century, and within a few decades "
    "presses were working in more than two hundred cities across Europe. Books became cheaper, "
    "literacy spread, and scholars could compare identical copies of a text for the first time. "
    "Historians still argue about how quickly these changes reached ordinary people, but most "
    "agree that the spread of printed pamphlets shaped the religious and political debates of "
    "the following century. Merchants used printed price lists, governments printed laws and "
    "proclamations, and universities began to rely on standard editions rather than on "
    "manuscripts copied by hand, each with its own errors and omissions. "
)
INSTALL_HINT = ("sti bench engine compares against PyTorch and Hugging Face transformers, which are not "
                "installed here; install the benchmark/test extras with `make install-test` "
                "(pip install -e '.[test]' torch==2.13.0 'transformers>=5,<6')")


# --------------------------------------------------------------------------- pure parts


def summarize(samples) -> dict | None:
    """Median and spread of a list of numbers (None for no samples)."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        return None
    q = np.percentile(xs, [25, 50, 75]) if len(xs) > 1 else [xs[0]] * 3
    return {"n": len(xs), "median": float(statistics.median(xs)), "min": xs[0], "max": xs[-1],
            "p25": float(q[0]), "p75": float(q[2]), "samples": [round(x, 6) for x in samples]}


def ratio(sti: dict | None, ref: dict | None) -> float | None:
    """STI median / reference median (None if either side is missing)."""
    if not sti or not ref or not ref.get("median"):
        return None
    return sti["median"] / ref["median"]


@dataclass(frozen=True)
class Target:
    """A pass/fail criterion: ``ratio_max`` (ratio <= value), ``ratio_min`` (ratio >= value),
    ``sti_max`` (STI median <= value, in the row's unit)."""

    kind: str
    value: float

    def text(self, unit: str = "") -> str:
        if self.kind == "ratio_max":
            return f"ratio ≤ {self.value:g}"
        if self.kind == "ratio_min":
            return f"ratio ≥ {self.value:g}"
        if self.kind == "sti_max":
            return f"STI ≤ {self.value:g} {unit}".rstrip()
        raise ValueError(f"unknown target kind {self.kind!r}")

    def met(self, sti: dict | None, r: float | None) -> bool | None:
        """True/False, or None when the quantity the target needs was not measured."""
        if self.kind == "ratio_max":
            return None if r is None else r <= self.value
        if self.kind == "ratio_min":
            return None if r is None else r >= self.value
        if self.kind == "sti_max":
            return None if not sti else sti["median"] <= self.value
        raise ValueError(f"unknown target kind {self.kind!r}")


@dataclass
class Row:
    key: str
    measurement: str
    unit: str
    sti: dict | None = None  # summarize() of the STI samples
    ref: dict | None = None  # summarize() of the reference samples
    target: Target | None = None
    higher_is_better: bool = False
    note: str = ""  # e.g. "skipped (--quick)", "error: ..."

    @property
    def ratio(self) -> float | None:
        return ratio(self.sti, self.ref)

    @property
    def met(self) -> bool | None:
        return self.target.met(self.sti, self.ratio) if self.target else None

    def to_json(self) -> dict:
        return {"key": self.key, "measurement": self.measurement, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "sti": self.sti, "transformers": self.ref,
                "ratio": self.ratio,
                "target": None if not self.target else {"kind": self.target.kind, "value": self.target.value,
                                                        "text": self.target.text(self.unit)},
                "met": self.met, "note": self.note}


def fmt_num(x: float) -> str:
    """About three significant digits, never in exponent notation."""
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_cell(s: dict | None, unit: str, note: str = "") -> str:
    """'12.3 ms (IQR 11.9–13.0, n=15)'; a single sample shows no spread."""
    if not s:
        return note or "—"
    head = f"{fmt_num(s['median'])} {unit}"
    if s["n"] == 1:
        return f"{head} (n=1)"
    return f"{head} (IQR {fmt_num(s['p25'])}–{fmt_num(s['p75'])}, n={s['n']})"


def fmt_met(m: bool | None) -> str:
    return "—" if m is None else ("yes" if m else "**no**")


COLUMNS = ("measurement", "STI (median, spread)", "transformers (median, spread)", "ratio", "target", "met?")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
    for r in rows:
        ref_note = r.note if r.ref is None else ""
        sti_note = r.note if r.sti is None else ""
        cells = [f"{r.measurement} [{r.unit}]", fmt_cell(r.sti, r.unit, sti_note), fmt_cell(r.ref, r.unit, ref_note),
                 "—" if r.ratio is None else f"{r.ratio:.3f}×", r.target.text(r.unit) if r.target else "—",
                 fmt_met(r.met)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def build_report(rows: list[Row], env: dict, details: dict, notes: list[str], *, quick: bool, repeats: int,
                 elapsed_s: float) -> dict:
    return {"suite": "engine", "schema_version": SCHEMA_VERSION, "quick": quick, "repeats": repeats,
            "elapsed_s": round(elapsed_s, 3), "ratio_definition": "STI median / transformers median, this run",
            "spread_definition": "p25–p75 (IQR) in the table; min, max and all samples in the rows",
            "environment": env, "rows": [r.to_json() for r in rows], "details": details, "notes": notes}


def render_markdown(report: dict, rows: list[Row]) -> str:
    env = report["environment"]
    out = [f"# sti bench engine{' (--quick)' if report['quick'] else ''}", "",
           markdown_table(rows), "",
           f"Ratio: {report['ratio_definition']}. Spread: {report['spread_definition']}.", "",
           f"Machine: {env.get('cpu_model')} ({env.get('cpus_available')} CPUs available), "
           f"Python {env.get('python')}, NumPy {env.get('numpy')} ({env.get('numpy_blas')}, "
           f"{env.get('numpy_blas_threads')} threads), torch {env.get('torch')} "
           f"({env.get('torch_threads')} threads), transformers {env.get('transformers')}; "
           f"load average {env.get('loadavg_start')} at start, {env.get('loadavg_end')} at end"
           + (f"; other processes used {env['contention']['other_share']:.0%} of the CPU during the run."
              if env.get("contention") else ".")]
    if report["notes"]:
        out += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def without_machine_paths(text: str) -> str:
    """``text`` with this machine's paths (the virtual environment, STI's checkout, the home
    directory) replaced by placeholders, so a committed report names no local path."""
    import sti

    places = [(sys.prefix, "<venv>"), (str(Path(sti.__file__).resolve().parents[1]), "<sti>"),
              (str(Path.home()), "~")]
    for path, name in sorted(places, key=lambda p: -len(p[0])):
        if len(path) > 1:
            text = text.replace(path, name)
    return text


def write_outputs(report: dict, rows: list[Row], out_dir: str | Path) -> tuple[Path, Path, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = without_machine_paths(render_markdown(report, rows))
    (out / "engine.json").write_text(without_machine_paths(json.dumps(report, indent=2)) + "\n", encoding="utf-8")
    (out / "engine.md").write_text(md, encoding="utf-8")
    return out / "engine.json", out / "engine.md", md


# --------------------------------------------------------------------------- environment


def _openblas_threads() -> int | None:
    """NumPy's OpenBLAS thread count, read through its C API (best effort)."""
    import ctypes
    import glob

    libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in glob.glob(str(libdir / "*openblas*")):
        try:
            cdll = ctypes.CDLL(lib)
        except OSError:
            continue
        for fn in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                   "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(cdll, fn):
                return int(getattr(cdll, fn)())
    return None


def _numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _cpu_model() -> str:
    from sti.machine import cpu_model

    return cpu_model()


def _git_commit() -> str | None:
    try:
        root = HERE.parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(torch, transformers) -> dict:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "cpus_available": _cpus(),
        "mem_total_bytes": mem, "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "numpy_blas": _numpy_blas(), "numpy_blas_threads": _openblas_threads(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "transformers": transformers.__version__,
        "threads_requested": THREADS,
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                       "OMP_WAIT_POLICY", "TOKENIZERS_PARALLELISM")},
        "sti_commit": _git_commit(), "loadavg_start": _loadavg(),
    }


def cpu_snapshot() -> dict | None:
    """Machine-wide busy and steal CPU seconds (/proc/stat) and this process's own CPU seconds,
    its reaped children included: the difference of two snapshots is what others used."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    t = os.times()
    return {"busy_s": (user + nice + system + irq + softirq) / hz, "steal_s": steal / hz,
            "own_s": t.user + t.system + t.children_user + t.children_system, "wall": time.perf_counter()}


def contention(start: dict | None, end: dict | None, cpus: int) -> dict | None:
    """CPU used by other processes (and stolen by the hypervisor) between two snapshots, as
    CPU-seconds and as a share of the machine's capacity over that interval."""
    if not start or not end:
        return None
    wall = end["wall"] - start["wall"]
    other = max(0.0, (end["busy_s"] - start["busy_s"]) - (end["own_s"] - start["own_s"]))
    steal = end["steal_s"] - start["steal_s"]
    cap = max(wall * cpus, 1e-9)
    return {"wall_s": round(wall, 3), "other_processes_cpu_s": round(other, 3), "steal_cpu_s": round(steal, 3),
            "other_share": round(other / cap, 4), "steal_share": round(steal / cap, 4)}


def contention_notes(total: dict | None, details: dict) -> list[str]:
    """A warning when other processes used a noticeable share of the CPU, naming the sections."""
    busy = lambda c: c is not None and c["other_share"] + c["steal_share"] > CONTENDED_SHARE  # noqa: E731
    if not busy(total):
        return []
    parts = [f"{name} {d['contention']['other_share'] + d['contention']['steal_share']:.0%}"
             for name, d in details.items() if isinstance(d, dict) and busy(d.get("contention"))]
    return [f"the machine was busy: other processes used {total['other_share']:.0%} of its CPU capacity during "
            f"this run (hypervisor steal {total['steal_share']:.0%})"
            + (f"; by section: {', '.join(parts)}" if parts else "")
            + "; both sides are slowed and the ratios are less trustworthy than on a quiet machine: rerun when "
              "it is idle"]


_cpus = available_cpus  # the name the bench modules import


def _loadavg() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


# --------------------------------------------------------------------------- measurements


SETTLE_S = 0.3  # pause before each side's turn


def _pause(seconds: float = SETTLE_S) -> None:
    """Let the idle worker threads of the side just measured (OpenBLAS, OpenMP) stop
    busy-waiting before the other side runs: on a 2-core machine a spinning pool of one side
    measurably slows the first calls of the other."""
    time.sleep(seconds)


def _exact_tokens(enc, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Real text tokenized and cut to exactly T tokens ([CLS] ... [SEP]); all-ones mask."""
    text = ENCODER_TEXT
    ids, _ = enc.tokenize([text])
    while ids.shape[1] < T:
        text += " " + ENCODER_TEXT
        ids, _ = enc.tokenize([text])
    row = list(ids[0, : T - 1]) + [int(ids[0, -1])]  # keep the closing [SEP]
    ids = np.asarray([row], dtype=np.int64)  # (1, T)
    return ids, np.ones_like(ids)


def _timed_block(fn, k: int) -> list[float]:
    """Milliseconds of k calls of fn after one untimed call: the first call after the other side
    ran pays for its still-spinning threads and the caches it evicted (measured here: up to 2x)."""
    fn()
    out = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench_encoder_warm(torch, lengths: list[int], blocks: int, block: int = 5,
                       warmup: int = 3) -> tuple[list[Row], dict]:
    from transformers import AutoModel

    from sti.api import Encoder
    from sti.loaders.builtin import resolve

    model_dir = resolve("minilm")
    enc = Encoder.load("minilm")
    hf = AutoModel.from_pretrained(str(model_dir))
    hf.eval()
    rows, details = [], {"model_dir": str(model_dir), "batch": 1, "blocks_per_side": blocks,
                         "timed_calls_per_block": block, "warmup_calls": warmup,
                         "method": "blocks of STI and transformers calls alternate (A, B, A, B, ...); each block "
                                   "starts with one untimed call; samples are the timed calls"}
    for T in lengths:
        ids, mask = _exact_tokens(enc, T)
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        def run_sti():
            return enc.hidden_states(ids, mask)

        def run_ref():
            with torch.inference_mode():
                return hf(input_ids=t_ids, attention_mask=t_mask).last_hidden_state

        for _ in range(warmup):
            a, b = run_sti(), run_ref()
        diff = float(np.abs(a - b.numpy()).max())
        sti_s, ref_s = [], []
        for _ in range(blocks):  # interleaved blocks: A, B, A, B, ...
            sti_s += _timed_block(run_sti, block)
            ref_s += _timed_block(run_ref, block)
        rows.append(Row(f"encoder_warm_{T}", f"MiniLM encoder warm latency, batch 1, {T} tokens", "ms",
                        summarize(sti_s), summarize(ref_s), Target("ratio_max", 1.0)))
        details[f"T{T}"] = {"tokens": T, "max_abs_diff_hidden": diff}
    del enc, hf
    gc.collect()
    return rows, details


def _run_process(cmd: list[str], timeout: float) -> dict:
    """Run a process to completion: wall seconds (perf_counter around spawn..reap), exit code,
    stdout and stderr. (The child's ru_maxrss is not reported: Linux carries the spawning
    process's high-water mark across fork/exec, so it would show this process's size.)"""
    import threading

    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        killer = threading.Timer(timeout, p.kill)
        killer.start()
        try:
            _, status, _ = os.wait4(p.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
        fo.seek(0)
        fe.seek(0)
        return {"wall_s": wall, "rc": p.returncode, "stdout": fo.read().decode("utf-8", "replace"),
                "stderr": fe.read().decode("utf-8", "replace"), "timed_out": wall >= timeout}


def _check(res: dict, what: str) -> dict:
    if res["rc"] != 0:
        tail = (res["stderr"] or res["stdout"]).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} exited with status {res['rc']}"
                           f"{' (timed out)' if res.get('timed_out') else ''}: {' / '.join(tail)}")
    return res


def bench_cold_start(n: int, notes: list[str]) -> tuple[list[Row], dict]:
    from sti.loaders.builtin import resolve

    model_dir = resolve("minilm")
    head = HERE.parent / "heads" / f"{HEAD_NAME}.npz"
    if head.is_file():
        what = "classification"
        sti_cmd = [sys.executable, "-m", "sti", "classify", HEADLINE]
        ref_cmd = [sys.executable, str(HERE / "_ref_cold.py"), str(model_dir), str(head), HEADLINE, str(THREADS)]
    else:
        what = "embedding"
        notes.append(f"cold start: head {head} is missing, so both sides embed instead of classify "
                     f"(`sti embed` vs the reference without the head)")
        sti_cmd = [sys.executable, "-m", "sti", "embed", HEADLINE]
        ref_cmd = [sys.executable, str(HERE / "_ref_cold.py"), str(model_dir), "-", HEADLINE, str(THREADS)]
    # One untimed run each first: fills the page cache (the rows say "warm page cache") and
    # checks that both commands work.
    first_sti = _check(_run_process(sti_cmd, 300), "sti cold-start command")
    first_ref = _check(_run_process(ref_cmd, 300), "reference cold-start script")
    sti, ref = [], []
    for _ in range(n):
        sti.append(_check(_run_process(sti_cmd, 300), "sti cold-start command"))
        ref.append(_check(_run_process(ref_cmd, 300), "reference cold-start script"))
    sti_out = first_sti["stdout"].strip().splitlines()[:1]
    ref_out = first_ref["stdout"].strip().splitlines()[:1]
    label = lambda out: out[0].split()[0] if out else None  # noqa: E731
    details = {
        "what": what, "page_cache": "warm (one untimed run of each command first; nothing evicted)",
        "headline": HEADLINE, "head": str(head) if what == "classification" else None,
        "sti_command": sti_cmd, "reference_command": ref_cmd,
        "sti_output": sti_out, "reference_output": ref_out,
        "same_label": label(sti_out) == label(ref_out) if what == "classification" else None,
    }
    if what == "classification" and not details["same_label"]:
        notes.append(f"cold start: labels differ: STI {sti_out!r} vs reference {ref_out!r}")
    row = Row("cold_start", f"cold start to first {what} (new process, warm page cache)", "s",
              summarize([r["wall_s"] for r in sti]), summarize([r["wall_s"] for r in ref]),
              Target("ratio_max", 0.15))
    return [row], details


def _hf_llama_from_sti(gen, torch):
    """A transformers LlamaForCausalLM (fp32) holding exactly the weights STI runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sti.models import llama

    c = gen.cfg
    hcfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                       num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                       max_position_embeddings=c.max_position, rope_theta=c.rope_theta, rms_norm_eps=c.rms_eps,
                       tie_word_embeddings=c.tie_embeddings, hidden_act="silu", attention_bias=False,
                       mlp_bias=False, bos_token_id=gen.ckpt.special.get("bos_id"),
                       eos_token_id=gen.ckpt.special.get("eos_id"))
    theta = (getattr(hcfg, "rope_parameters", None) or {}).get("rope_theta", getattr(hcfg, "rope_theta", None))
    if theta is None or abs(float(theta) - c.rope_theta) > 1e-6 * c.rope_theta:
        raise RuntimeError(f"transformers config did not take rope_theta={c.rope_theta} (got {theta})")
    from sti import lowbit

    w = {k: t if isinstance(t, np.ndarray) else lowbit.dequantize(t) for k, t in gen.ckpt.weights.items()}
    sd = {}
    for canon, hf_name in llama.HF_NAMES.items():
        for i in range(c.num_layers) if "{i}" in canon else [None]:
            k, h = (canon, hf_name) if i is None else (canon.format(i=i), hf_name.format(i=i))
            if k == "lm_head" and c.tie_embeddings:
                k = "embed"  # tied: the output projection is the embedding matrix
            sd[h] = torch.from_numpy(np.ascontiguousarray(w[k], dtype=np.float32))
    model = LlamaForCausalLM(hcfg)
    model.load_state_dict(sd, strict=True)
    if c.tie_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("transformers model did not tie lm_head to the embeddings")
    model.eval()
    return model


def _sti_decode(gen, prompt: list[int], n_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens, prefill seconds (to the first token), decode seconds (first to last token)."""
    t0 = time.perf_counter()
    toks, stamps = [], []
    for tok in gen.stream(prompt, n_tokens, temperature=0.0):
        stamps.append(time.perf_counter())
        toks.append(tok)
    return toks, stamps[0] - t0, stamps[-1] - stamps[0]


def _hf_decode(model, torch, prompt: list[int], n_tokens: int) -> tuple[list[int], float, float]:
    """The same greedy loop in transformers: prefill, then one token at a time with the KV cache."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt], dtype=torch.long), use_cache=True)
        past = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        toks = [tok]
        t1 = time.perf_counter()
        for _ in range(n_tokens - 1):
            out = model(input_ids=torch.tensor([[tok]], dtype=torch.long), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
        t2 = time.perf_counter()
    return toks, t1 - t0, t2 - t1


def bench_decode(torch, n_tokens: int, n: int, notes: list[str]) -> tuple[list[Row], dict]:
    from sti.api import Generator

    gen = Generator.load("smollm2", progress=False)
    prompt = gen.encode_prompt(DECODE_PROMPT)
    hf = _hf_llama_from_sti(gen, torch)
    # Warm-up; STI's stream stops at an end-of-text token, so the reference decodes as many
    # tokens as STI produced (both then run the same number of decode steps).
    _sti_decode(gen, prompt, 4)
    _hf_decode(hf, torch, prompt, 4)
    sti_tps, ref_tps, sti_pre, ref_pre = [], [], [], []
    sti_toks: list[int] = []
    ref_toks: list[int] = []
    for _ in range(n):
        _pause()
        sti_toks, pre, dec = _sti_decode(gen, prompt, n_tokens)
        steps = len(sti_toks) - 1
        if steps < 1:
            raise RuntimeError(f"STI stopped after {len(sti_toks)} token(s); no decode steps to time")
        sti_tps.append(steps / dec)
        sti_pre.append(pre)
        _pause()
        ref_toks, pre, dec = _hf_decode(hf, torch, prompt, len(sti_toks))
        ref_tps.append(steps / dec)
        ref_pre.append(pre)
    same = sti_toks == ref_toks
    first_diff = next((i for i, (a, b) in enumerate(zip(sti_toks, ref_toks)) if a != b), None)
    if not same:
        notes.append(f"decode: STI and transformers greedy tokens differ from position {first_diff} "
                     f"(float32 on both sides; near-ties can flip an arg-max)")
    if len(sti_toks) < n_tokens:
        notes.append(f"decode: STI stopped at an end token after {len(sti_toks)} of {n_tokens} tokens")
    details = {"prompt": DECODE_PROMPT, "prompt_tokens": len(prompt), "tokens_requested": n_tokens,
               "tokens_generated": len(sti_toks), "decode_steps_timed": len(sti_toks) - 1,
               "same_tokens": same, "first_difference": first_diff, "sti_tokens": sti_toks,
               "transformers_tokens": ref_toks, "sti_text": gen.decode(sti_toks),
               "sti_prefill_s": summarize(sti_pre), "transformers_prefill_s": summarize(ref_pre),
               "reference_model": "transformers LlamaForCausalLM fp32 built from STI's dequantized weights "
                                  "(strict state-dict load, tied lm_head), manual greedy loop with past_key_values"}
    row = Row("decode_tps", f"SmolLM2-135M greedy decode, {len(sti_toks)} tokens (prefill excluded)", "tokens/s",
              summarize(sti_tps), summarize(ref_tps), Target("ratio_min", 1.0), higher_is_better=True)
    del gen, hf
    gc.collect()
    return [row], details


def bench_gguf_load(n: int, skip_reference: bool, notes: list[str]) -> tuple[list[Row], dict]:
    from sti.loaders.builtin import resolve

    path = resolve("smollm2")
    probe = str(HERE / "_load_probe.py")
    sti_cmd = [sys.executable, probe, "sti", str(path)]
    ref_cmd = [sys.executable, probe, "transformers", str(path), str(THREADS)]
    _check(_run_process(sti_cmd, 300), "sti GGUF load probe")  # untimed: warms the page cache
    sti_runs = []
    for _ in range(n):
        r = _check(_run_process(sti_cmd, 300), "sti GGUF load probe")
        sti_runs.append({**json.loads(r["stdout"].strip().splitlines()[-1]), "process_wall_s": r["wall_s"]})
    ref_run, ref_error = None, None
    if skip_reference:
        notes.append("GGUF load: transformers side skipped under --quick (it takes tens of seconds); "
                     "run without --quick to measure it")
    else:
        r = _run_process(ref_cmd, 600)
        if r["rc"] == 0:
            ref_run = {**json.loads(r["stdout"].strip().splitlines()[-1]), "process_wall_s": r["wall_s"]}
        else:
            tail = (r["stderr"] or r["stdout"]).strip().splitlines()[-2:]
            ref_error = f"status {r['rc']}{' (timed out)' if r['timed_out'] else ''}: {' / '.join(tail)}"
            notes.append(f"GGUF load: transformers failed ({ref_error})")
    ref_note = "skipped (--quick)" if skip_reference else (f"failed: {ref_error}" if ref_error else "")
    details = {"gguf": str(path), "page_cache": "warm (one untimed STI load first; nothing evicted)",
               "sti_runs": sti_runs, "transformers_run": ref_run, "transformers_error": ref_error,
               "transformers_runs": 0 if skip_reference else 1}
    rows = [
        Row("gguf_load", "SmolLM2 GGUF load, in process (perf_counter around the load call)", "s",
            summarize([x["load_s"] for x in sti_runs]), summarize([ref_run["load_s"]]) if ref_run else None,
            Target("sti_max", 5.0), note=ref_note),
        Row("gguf_load_process", "SmolLM2 GGUF load, whole new process (imports + load + exit)", "s",
            summarize([x["process_wall_s"] for x in sti_runs]),
            summarize([ref_run["process_wall_s"]]) if ref_run else None, None, note=ref_note),
    ]
    details["sti_peak_rss_bytes"] = summarize([x["peak_rss_bytes"] for x in sti_runs if x.get("peak_rss_bytes")])
    details["transformers_peak_rss_bytes"] = ref_run.get("peak_rss_bytes") if ref_run else None
    return rows, details


# --------------------------------------------------------------------------- driver


def plan(repeats: int, quick: bool) -> dict:
    """How many repetitions each measurement gets."""
    r = min(repeats, 3) if quick else repeats
    return {"repeats": r, "warm_blocks": 2 * r, "cold_pairs": min(r, 2) if quick else r,
            "decode_tokens": 16 if quick else 64, "decode_pairs": r, "load_runs": min(r, 2) if quick else min(r, 5),
            "skip_transformers_gguf": quick}


def _section(name: str, fn, rows: list[Row], details: dict, notes: list[str], errors: list[str], fallback: list[Row]):
    print(f"sti bench: {name} ...", file=sys.stderr, flush=True)
    _pause()
    t0, snap = time.perf_counter(), cpu_snapshot()
    try:
        r, d = fn()
        rows.extend(r)
        details[name] = {**d, "section_s": round(time.perf_counter() - t0, 2),
                         "contention": contention(snap, cpu_snapshot(), _cpus())}
    except Exception as e:  # noqa: BLE001 - a failed measurement is reported, the others still run
        msg = f"{name}: {type(e).__name__}: {e}"
        errors.append(msg)
        notes.append(f"error in {msg}")
        for row in fallback:
            row.note = "error"
        rows.extend(fallback)
        details[name] = {"error": msg}


def run_engine(out_dir: str | Path = "bench-results", repeats: int = 7, quick: bool = False) -> int:
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"sti: error: {INSTALL_HINT} ({e})", file=sys.stderr)
        return 2
    torch.set_num_threads(THREADS)
    try:
        transformers.utils.logging.disable_progress_bar()  # keep stderr to our own progress lines
    except AttributeError:
        pass
    t_start = time.perf_counter()
    snap0 = cpu_snapshot()
    p = plan(repeats, quick)
    env = environment(torch, transformers)
    rows: list[Row] = []
    details: dict = {"plan": p}
    notes = [f"threads: torch.set_num_threads({THREADS}) in every torch process; NumPy/OpenBLAS at its default "
             f"({env['numpy_blas_threads']} threads on {env['cpus_available']} CPUs)",
             "page cache: warm for every process-level measurement (nothing evicted)",
             "repetitions of STI and transformers are interleaved (A, B, A, B, ...), with a "
             f"{SETTLE_S:g} s pause or an untimed call before each side's turn (idle thread pools spin)"]
    errors: list[str] = []
    _section("encoder_warm", lambda: bench_encoder_warm(torch, [32, 128], p["warm_blocks"]), rows, details, notes,
             errors, [Row(f"encoder_warm_{T}", f"MiniLM encoder warm latency, batch 1, {T} tokens", "ms",
                          target=Target("ratio_max", 1.0)) for T in (32, 128)])
    _section("cold_start", lambda: bench_cold_start(p["cold_pairs"], notes), rows, details, notes, errors,
             [Row("cold_start", "cold start to first classification (new process, warm page cache)", "s",
                  target=Target("ratio_max", 0.15))])
    _section("decode", lambda: bench_decode(torch, p["decode_tokens"], p["decode_pairs"], notes), rows, details,
             notes, errors, [Row("decode_tps", "SmolLM2-135M greedy decode (prefill excluded)", "tokens/s",
                                 target=Target("ratio_min", 1.0), higher_is_better=True)])
    _section("gguf_load", lambda: bench_gguf_load(p["load_runs"], p["skip_transformers_gguf"], notes), rows, details,
             notes, errors, [Row("gguf_load", "SmolLM2 GGUF load, in process", "s", target=Target("sti_max", 5.0))])
    env["loadavg_end"] = _loadavg()
    env["contention"] = contention(snap0, cpu_snapshot(), _cpus())
    notes.extend(contention_notes(env["contention"], details))
    report = build_report(rows, env, details, notes, quick=quick, repeats=repeats,
                          elapsed_s=time.perf_counter() - t_start)
    report["errors"] = errors
    js, mdp, md = write_outputs(report, rows, out_dir)
    print(md, end="")
    print(f"sti bench: wrote {js} and {mdp} in {report['elapsed_s']:.0f} s", file=sys.stderr)
    return 1 if errors else 0
