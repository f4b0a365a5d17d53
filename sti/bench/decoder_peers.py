"""The peers of ``sti bench decoder``: other ways to run SmolLM2-135M on a CPU, measured on the
same prompts, the same held-out text and the same number of threads as STI.

    python -m sti.bench.decoder_peers [--quick] [--out DIR] [--peers NAMES] [--storage LIST]

Peers (each needs the ``bench`` extra: ``make bench-install``; a missing one gives rows that
say so):

* ``llama.cpp``   llama-cpp-python on the very GGUF STI reads, its C API batching the
                  sequences of a batch in one context;
* ``transformers`` Hugging Face transformers, fp32, the whole model in memory;
* ``airllm``      AirLLM on CPU: decoder layers read from per-layer files before they run;
* ``accelerate``  transformers + accelerate big-model inference: ``device_map="auto"`` with
                  ``max_memory`` set to a memory budget, the rest offloaded to disk.

The PyTorch-based peers run from a Hugging Face directory that transformers' own GGUF loader
makes from the same GGUF (weights dequantized to fp32), written once into a cache folder.

Every measurement runs in a fresh process (``_peer_child.py``), so each row's peak RSS is
that system's alone. The parent imports none of the peer libraries. Rows have the fixed keys
``ROW_KEYS``, which ``sti bench decoder`` merges with STI's own rows; the workload
(:func:`build_workload`) is public so that STI is measured on the very same token ids.

Storage, for the peers that read weights while they run: ``real`` evicts each file from the
page cache (``posix_fadvise(DONTNEED)``) before every read, so reads come from the device;
``emmc`` (or ``<N>MBps``, as in ``sti profile --storage``) additionally paces every read to
latency + bytes / bandwidth with the rule of ``sti.runtime.Throttle`` -- emulated, and
labelled so. ``warm`` leaves the page cache alone. In-memory peers report storage ``memory``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sti.bench.engine import CONTENDED_SHARE, _cpus, _loadavg, contention, cpu_snapshot
from sti.errors import STIError
from sti.machine import cpu_model

ROW_KEYS = ("system", "storage", "batch", "memory_budget_bytes", "resident_weight_bytes", "peak_rss_bytes",
            "prefill_tok_s", "decode_tok_s", "ttft_s", "perplexity", "notes")
SCHEMA_VERSION = 1
THREADS = 2
BATCHES = (1, 16)
N_PROMPTS = 16  # the largest batch; batch B runs the first B prompts
PROMPT_TOKENS = 128
N_WINDOWS = 4
WINDOW_TOKENS = 256  # tokens scored per perplexity window
WORKLOAD_SEED = 0
MEMORY = "memory"  # the storage of a peer that holds every weight in memory
HERE = Path(__file__).resolve().parent
CHILD = HERE / "_peer_child.py"
INSTALL = "pip install -e '.[bench]' (make bench-install)"
# What the details record of each child's spec (the token ids are in the workload, and paths
# of this machine stay out of the report).
RECORDED_SPEC = ("task", "backend", "threads", "storage", "new_tokens", "repeats", "memory_budget_bytes")
# Every child: the same thread count, and no network (model hubs are never contacted).
CHILD_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "OPENBLAS_NUM_THREADS": str(THREADS),
             "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}


class PeerError(RuntimeError):
    """A peer's process failed; the message carries the end of its output."""


@dataclass(frozen=True)
class Peer:
    name: str  # --peers key
    system: str  # the rows' "system"
    backend: str  # the child's backend
    requires: tuple[str, ...]  # import names that must be installed
    streams: bool = False  # reads weights from storage while it runs (rows per storage)
    hf_dir: bool = False  # runs from the Hugging Face directory exported from the GGUF
    budget_fraction: float | None = None  # memory budget as a fraction of the GGUF's size
    note: str = ""
    script: Path = CHILD

    def missing(self) -> list[str]:
        """The required modules that are not installed (found without importing them)."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


PEERS = (
    Peer("llama.cpp", "llama.cpp", "llama.cpp", ("llama_cpp",),
         note="llama-cpp-python, the same GGUF, C API batch of sequences; weights mmapped"),
    Peer("transformers", "transformers fp32", "transformers", ("torch", "transformers"), hf_dir=True,
         note="fp32, whole model in memory; greedy loop with KV cache"),
    Peer("airllm", "AirLLM", "airllm", ("torch", "transformers", "accelerate", "airllm"), streams=True, hf_dir=True,
         note="fp32 per-layer files, next layer prefetched; no memory knob (tied embedding stays resident)"),
    Peer("accelerate", "accelerate disk offload", "accelerate", ("torch", "transformers", "accelerate"),
         streams=True, hf_dir=True, budget_fraction=0.10,
         note="fp32, device_map='auto' with max_memory={'cpu': budget}, the rest offloaded to disk"),
)


def peers_by_name(names: str | None) -> list[Peer]:
    return [peer for peer, _, _ in peer_scopes(names)]


def peer_scopes(spec: str | None) -> list[tuple[Peer, tuple[str, ...] | None, tuple[int, ...] | None]]:
    """Peers and where to measure them: ``NAME`` (every storage and batch of the run) or
    ``NAME@STORAGE[/BATCH]`` (that storage, optionally that batch only), comma-separated;
    e.g. ``llama.cpp,airllm@real/1`` measures AirLLM, which reads tens of GB per token, on real
    storage at batch 1 only. None or empty: every peer everywhere."""
    if not spec or not spec.strip():
        return [(p, None, None) for p in PEERS]
    known = {p.name: p for p in PEERS}
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, where = item.partition("@")
        if name not in known:
            raise STIError(f"unknown peer {name!r}", f"choose from {', '.join(known)}")
        storage, _, batch = where.partition("/")
        if storage:
            storage_mode(storage)  # an unknown storage fails now, with the names it knows
        if batch and not batch.isdigit():
            raise STIError(f"peer {item!r}: batch {batch!r} is not a number", "write NAME@STORAGE/BATCH, e.g. airllm@real/1")
        out.append((known[name], (storage,) if storage else None, (int(batch),) if batch else None))
    return out


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """Token ids every system runs: ``prompts`` (one per sequence of the largest batch, all
    ``PROMPT_TOKENS`` long; batch B uses the first B) and perplexity ``windows`` (each
    ``WINDOW_TOKENS + 1`` ids: tokens 1..n are scored given 0..n-1). All come from held-out
    BBC News articles (the test split of ``sti.tasks.bbc``), one article per prompt or window,
    tokenized by the GGUF's tokenizer, no BOS (SmolLM2 adds none)."""

    prompts: list[list[int]]
    windows: list[list[int]]
    new_tokens: int  # greedy tokens per sequence, in-memory systems
    stream_new_tokens: int  # greedy tokens per sequence, streaming systems (each step reads every weight)
    sources: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"prompt_tokens": len(self.prompts[0]), "prompts": len(self.prompts),
                "window_tokens": len(self.windows[0]) - 1, "windows": len(self.windows),
                "new_tokens": self.new_tokens, "stream_new_tokens": self.stream_new_tokens, **self.sources}


def build_workload(gguf: str | Path, quick: bool = False) -> Workload:
    """The fixed workload: ``N_PROMPTS`` prompts and ``N_WINDOWS`` perplexity windows, picked
    in one seeded order of the test articles (prompts first, each article used once). It
    depends on nothing else, so every run and every system scores the same text; ``quick``
    keeps the first window and generates fewer tokens."""
    from sti.loaders.gguf import gguf_tokenizer, read_gguf
    from sti.tasks import bbc

    tok = gguf_tokenizer(read_gguf(gguf).meta)
    arts, split = bbc.load_split()
    test = split["test"]
    order = test[np.random.default_rng(WORKLOAD_SEED).permutation(len(test))]  # topics mixed, fixed
    prompts, windows, prompt_files, window_files = [], [], [], []
    for i in order:
        ids = tok.encode(arts.texts[i], add_special_tokens=False).ids
        if len(prompts) < N_PROMPTS:
            if len(ids) >= PROMPT_TOKENS:
                prompts.append(ids[:PROMPT_TOKENS])
                prompt_files.append(arts.files[i])
        elif len(ids) > WINDOW_TOKENS:
            windows.append(ids[:WINDOW_TOKENS + 1])
            window_files.append(arts.files[i])
            if len(windows) == N_WINDOWS:
                break
    else:
        raise RuntimeError("the BBC test split has too few long articles for the workload")
    if quick:
        windows, window_files = windows[:1], window_files[:1]
    return Workload(prompts, windows, new_tokens=8 if quick else 64, stream_new_tokens=4 if quick else 16,
                    sources={"text": "BBC News test split (sti.tasks.bbc, seed 0), the first tokens of each article",
                             "prompt_articles": prompt_files, "window_articles": window_files})


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class StorageMode:
    key: str  # the rows' "storage"
    label: str
    cold: bool = False
    bandwidth: float | None = None  # bytes/s, emulated storage only
    latency: float = 0.0  # s per read, emulated storage only

    def spec(self) -> dict:
        return {"cold": self.cold, "bandwidth": self.bandwidth, "latency": self.latency}


def storage_mode(name: str) -> StorageMode:
    """``real`` (every read from the device), ``warm`` (page cache as it is), or an emulated
    device as ``sti profile --storage`` names it (``emmc``, ``ufs``, ``<N>MBps``)."""
    low = name.strip().lower()
    if low == "real":
        return StorageMode("real", "real storage, file evicted from the page cache before every read", cold=True)
    if low == "warm":
        return StorageMode("warm", "real storage, page cache warm (nothing evicted)")
    from sti.profile import parse_storage, storage_key

    th = parse_storage(name)
    if th is None:
        return storage_mode("real")
    return StorageMode(storage_key(name), f"{th.label}, paced per read like sti.runtime.Throttle; evicted first",
                       cold=True, bandwidth=th.bandwidth, latency=th.latency)


# --------------------------------------------------------------------------- processes


def run_child(spec: dict, script: Path = CHILD, timeout: float = 1800) -> dict:
    """Run one child on ``spec``; its result (the last JSON line it prints), with the wall
    time and the CPU other processes used meanwhile under ``_process``."""
    with tempfile.TemporaryDirectory(prefix="sti-peer-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        snap = cpu_snapshot()
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, str(script), str(spec_path)], capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **CHILD_ENV})
        except subprocess.TimeoutExpired:
            raise PeerError(f"{spec.get('task')} timed out after {timeout:g} s") from None
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = " / ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise PeerError(f"{spec.get('task')} exited with status {p.returncode}: {tail}")
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict):
            result["_process"] = {"wall_s": round(wall, 3), "contention": contention(snap, cpu_snapshot(), _cpus())}
            return result
    raise PeerError(f"{spec.get('task')} printed no JSON result: {p.stdout.strip()[-200:]!r}")


def cache_dir(override: str | Path | None = None) -> Path:
    """Where exported model directories live: ``--cache``, else $STI_CACHE_DIR, else the
    user's cache folder."""
    if override:
        return Path(override)
    if os.environ.get("STI_CACHE_DIR"):
        return Path(os.environ["STI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sti"


def model_cache(gguf: Path, root: Path) -> Path:
    """The cache folder of one GGUF, named by its content (SHA-256), so a changed file never
    meets a stale export."""
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return root / "bench" / f"{gguf.stem}-{h.hexdigest()[:12]}"


# --------------------------------------------------------------------------- rows


def row(system: str, storage: str, batch: int, **values) -> dict:
    """A row with every key of ``ROW_KEYS`` (unmeasured values None, notes a string)."""
    unknown = set(values) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"not row keys: {sorted(unknown)}")
    r = {k: None for k in ROW_KEYS}
    r.update(system=system, storage=storage, batch=batch, notes="")
    r.update(values)
    return r


class PeerRun:
    """Measures one peer: preparation, perplexity, then a speed child per storage and batch."""

    def __init__(self, peer: Peer, gguf: Path, workload: Workload, *, storages: list[StorageMode],
                 batches: tuple[int, ...], repeats: int, cache: Path, timeout: float, progress: bool):
        self.peer, self.gguf, self.wl = peer, gguf, workload
        self.storages = storages if peer.streams else [StorageMode(MEMORY, "weights in memory")]
        self.batches, self.repeats, self.timeout, self.progress = batches, repeats, timeout, progress
        self.cache = cache  # this model's folder in the cache (model_cache)
        self.budget = int(peer.budget_fraction * gguf.stat().st_size) if peer.budget_fraction else None
        self.details: dict = {"peer": asdict(peer) | {"script": peer.script.name}, "children": []}

    def say(self, msg: str) -> None:
        if self.progress:
            print(f"[{self.peer.system}] {msg}", file=sys.stderr, flush=True)

    def child(self, task: str, **spec) -> dict:
        spec = {"task": task, "backend": self.peer.backend, "gguf": str(self.gguf), "threads": THREADS,
                "hf_dir": str(self.cache / "hf"), "airllm_dir": str(self.cache / "airllm"),
                "offload_dir": str(self.cache / "offload"), "memory_budget_bytes": self.budget, **spec}
        res = run_child(spec, self.peer.script, self.timeout)
        recorded = {k: spec[k] for k in RECORDED_SPEC if spec.get(k) is not None}  # no paths of this machine
        if "prompts" in spec:
            recorded["batch"] = len(spec["prompts"])
        self.details["children"].append({**recorded, "result": res})
        return res

    def prepare(self) -> None:
        if self.peer.hf_dir and not (self.cache / "hf" / "config.json").is_file():
            self.say(f"exporting the GGUF to a Hugging Face directory under {self.cache} (once)")
            self.cache.mkdir(parents=True, exist_ok=True)
            self.child("export-hf", backend="transformers")
        if self.peer.backend == "airllm":
            self.child("prepare-airllm")

    def rows(self) -> list[dict]:
        missing = self.peer.missing()
        if missing:
            note = f"skipped: {', '.join(missing)} not installed ({INSTALL})"
            return [self._row(s, b, notes=note) for s in self.storages for b in self.batches]
        try:
            self.prepare()
            self.say("perplexity")
            ppl = self.child("perplexity", windows=self.wl.windows, storage=None)
        except PeerError as e:
            return [self._row(s, b, notes=f"failed: {e}") for s in self.storages for b in self.batches]
        out = []
        new = self.wl.stream_new_tokens if self.peer.streams else self.wl.new_tokens
        for s in self.storages:
            for b in self.batches:
                self.say(f"storage {s.key}, batch {b}")
                try:
                    res = self.child("speed", prompts=self.wl.prompts[:b], new_tokens=new, repeats=self.repeats,
                                     storage=s.spec())
                except PeerError as e:
                    out.append(self._row(s, b, perplexity=ppl["perplexity"], notes=f"failed: {e}"))
                    continue
                out.append(self._row(s, b, resident_weight_bytes=res["resident_weight_bytes"],
                                     peak_rss_bytes=res["peak_rss_bytes"], prefill_tok_s=res["prefill_tok_s"],
                                     decode_tok_s=res["decode_tok_s"], ttft_s=res["ttft_s"],
                                     perplexity=ppl["perplexity"],
                                     notes=self._notes(s, res, ppl)))
        return out

    def _row(self, storage: StorageMode, batch: int, **values) -> dict:
        return row(self.peer.system, storage.key, batch, memory_budget_bytes=self.budget, **values)

    def _notes(self, s: StorageMode, res: dict, ppl: dict) -> str:
        parts = [self.peer.note, s.label if self.peer.streams else "",
                 f"{res['new_tokens']} new tokens/sequence, median of {len(res['runs'])}",
                 f"perplexity over {ppl['tokens_scored']} tokens"]
        reads = res.get("storage_reads") or {}
        if reads.get("bytes"):
            parts.append(f"read {reads['bytes'] / 1e6:.0f} MB in {reads['reads']} reads")
        if self.peer.streams:
            parts.append("resident weights: measured peak of materialised tensors")
        busy = (res.get("_process") or {}).get("contention")
        if busy and busy["other_share"] + busy["steal_share"] > CONTENDED_SHARE:
            parts.append(f"machine busy: other processes used {busy['other_share']:.0%} of the CPU meanwhile")
        return "; ".join(p for p in parts if p)


def measure(peers: list[Peer] | None = None, storages: tuple[str, ...] = ("real", "emmc"), batches=BATCHES,
            quick: bool = False, repeats: int | None = None, cache: str | Path | None = None,
            timeout: float = 3600, progress: bool = True) -> tuple[list[dict], dict]:
    """Rows (``ROW_KEYS``) for the given peers, and the details behind them."""
    from sti.loaders.builtin import resolve

    gguf = Path(resolve("smollm2"))
    if max(batches) > N_PROMPTS or min(batches) < 1:
        raise ValueError(f"batch sizes must be 1..{N_PROMPTS}, got {list(batches)}")
    wl = build_workload(gguf, quick)
    modes = [storage_mode(s) for s in storages]
    reps = repeats or (1 if quick else 3)
    folder = model_cache(gguf, cache_dir(cache))
    snap, t0 = cpu_snapshot(), time.perf_counter()
    rows, details = [], {}
    for peer in peers or PEERS:
        run = PeerRun(peer, gguf, wl, storages=modes, batches=tuple(batches), repeats=reps, cache=folder,
                      timeout=timeout, progress=progress)
        rows.extend(run.rows())
        details[peer.name] = run.details
    env = {"python": sys.version.split()[0], "cpus_available": _cpus(), "threads": THREADS,
           "loadavg_end": _loadavg(), "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
           "elapsed_s": round(time.perf_counter() - t0, 1), "contention": contention(snap, cpu_snapshot(), _cpus()),
           "cpu_model": cpu_model()}
    return rows, {"environment": env, "workload": wl.describe(), "quick": quick, "repeats": reps, "peers": details}


# --------------------------------------------------------------------------- output


def _mb(x) -> str:
    return "—" if x is None else f"{x / 1e6:.1f} MB"


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


COLUMNS = ("system", "storage", "batch", "memory budget", "resident weights", "peak RSS", "prefill tok/s",
           "decode tok/s", "TTFT", "perplexity", "notes")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
    for r in rows:
        cells = [r["system"], r["storage"], str(r["batch"]), _mb(r["memory_budget_bytes"]),
                 _mb(r["resident_weight_bytes"]), _mb(r["peak_rss_bytes"]), _num(r["prefill_tok_s"], ".1f"),
                 _num(r["decode_tok_s"], ".2f"), "—" if r["ttft_s"] is None else f"{r['ttft_s']:.3f} s",
                 _num(r["perplexity"], ".2f"), r["notes"] or ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(rows: list[dict], details: dict) -> str:
    env, wl = details["environment"], details["workload"]
    c = env.get("contention") or {}
    return "\n".join([
        f"# sti bench decoder: peers{' (--quick)' if details['quick'] else ''}", "",
        markdown_table(rows), "",
        f"Workload: {wl['prompts']} prompts of {wl['prompt_tokens']} tokens (batch B runs the first B), greedy, "
        f"{wl['new_tokens']} new tokens per sequence in memory and {wl['stream_new_tokens']} when streaming; "
        f"prefill and decode tokens/s count every sequence; TTFT is prefill until the first token of every "
        f"sequence, model loaded. Perplexity: {wl['windows']} window(s) of {wl['window_tokens']} tokens. "
        f"{wl['text']}.",
        f"Machine: {env['cpu_model']} ({env['cpus_available']} CPUs), {env['threads']} threads per system, "
        f"Python {env['python']}; other processes used {c.get('other_share', 0):.0%} of the CPU during the run"
        f" (load average at end {env['loadavg_end']}).", ""])


def write_outputs(rows: list[dict], details: dict, out_dir: str | Path) -> tuple[Path, Path, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(rows, details)
    report = {"suite": "decoder-peers", "schema_version": SCHEMA_VERSION, "row_keys": list(ROW_KEYS),
              "rows": rows, **details}
    js, mdp = out / "decoder-peers.json", out / "decoder-peers.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    mdp.write_text(md)
    return js, mdp, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sti.bench.decoder_peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few tokens, one repetition: checks the harness")
    ap.add_argument("--out", default="bench-results", help="folder for decoder-peers.{json,md}")
    ap.add_argument("--peers", help=f"comma-separated subset of: {', '.join(p.name for p in PEERS)}")
    ap.add_argument("--storage", default="real,emmc",
                    help="storages for the streaming peers: real, warm, emmc, ufs, <N>MBps (default real,emmc)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (default 1,16)")
    ap.add_argument("--repeats", type=int, help="timed repetitions per child (default 3, --quick 1)")
    ap.add_argument("--cache", help="folder for the exported model directories (default: the user cache)")
    a = ap.parse_args(argv)
    try:
        peers = peers_by_name(a.peers)
    except STIError as e:
        raise SystemExit(f"error: {e}") from None
    rows, details = measure(peers, [s for s in a.storage.split(",") if s.strip()],
                            tuple(int(b) for b in a.batches.split(",")), quick=a.quick, repeats=a.repeats,
                            cache=a.cache)
    js, mdp, md = write_outputs(rows, details, a.out)
    print(md, end="")
    print(f"wrote {js} and {mdp}", file=sys.stderr)
    return 0 if all(not r["notes"].startswith("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
