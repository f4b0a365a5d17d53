"""The ``sti`` command: a thin layer over the Python API (``sti.api``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sti.errors import STIError

EPILOG = """examples:
  sti embed "A sentence to embed"
  sti classify "Shares in the bank fell 5% after the results"
  sti generate --chat "Write a haiku about autumn" --max-tokens 40
  sti info smollm2
  sti pack minilm -o minilm.sti && sti verify minilm.sti
  sti eval minilm --task bbc-news
  sti bench engine
  sti bench encoder --quick
"""

DEMO_EPILOG = """On its first run the demo packs MiniLM into a shard store (every attention head with its slice
of the FFN, at 2..8 bits and fp32) and profiles it (each shard's importance on BBC News
calibration texts, this device's IO and compute speed): a few minutes, once. Both are cached
in --cache DIR; later runs take seconds. A cached store of another format version is re-packed.

Then it sets the budget, plans which shards run at which bitwidth and which stay preloaded,
classifies sample headlines one request each (label, latency against the target, peak resident
weight bytes against the budget) and compares the elastic engine's accuracy with the whole
in-memory model's on held-out BBC News test articles, with the share of requests that met the
deadline. The same steps one by one: sti pack, sti profile, sti plan, sti classify --store,
sti eval STORE.

examples:
  sti demo
  sti demo --latency 30ms --memory 4.5MB --no-chat
"""


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout)
    sys.stdout.write("\n")


def _encoder(a):
    from sti.api import Encoder

    if a.store is None:
        for opt in ("latency", "memory"):
            if getattr(a, opt) is not None:
                raise STIError(f"--{opt} needs --store", "pack the model (sti pack) and pass --store STORE")
        return Encoder.load(a.model, strict=a.strict)
    if a.latency is None or a.memory is None:
        raise STIError("--store needs both --latency and --memory", "e.g. --latency 40ms --memory 2MB")
    return Encoder.from_store(a.store, a.latency, a.memory, seq_len=a.seq_len, method=a.planner,
                              storage=a.storage, cold=a.cold, strict=a.strict)


def _stream_report(enc, a) -> dict:
    """The keys a store-backed run adds to --json output; also writes --trace files."""
    if enc.engine is None:
        return {}
    if a.trace:
        _write_trace(enc.last_trace, a.trace)
    return {"latency_ms": [round(t.latency * 1e3, 3) for t in enc.traces],
            "resident_bytes_peak": max(t.resident_peak for t in enc.traces),
            "plan": enc.plan.to_dict()}


def _write_trace(trace, path: str) -> None:
    import json as _json
    from pathlib import Path

    p = Path(path)
    if p.suffix.lower() == ".png":
        trace.save_png(p)
    else:
        p.write_text(_json.dumps(trace.to_chrome()))
        trace.save_png(p.with_suffix(".png"))


def _print_stream_summary(enc, a) -> None:
    if enc.engine is None:
        return
    from sti.units import fmt_bytes

    p, lat = enc.plan, [t.latency for t in enc.traces]
    lat.sort()
    med = lat[len(lat) // 2]
    print(f"plan ({p.method}): widths {p.widths}, {len(p.preload)} shards preloaded; "
          f"predicted {p.predicted_latency * 1e3:.1f} ms")
    print(f"latency {med * 1e3:.1f} ms (median of {len(lat)}) vs target {p.target_latency * 1e3:.1f} ms; "
          f"resident weights peak {fmt_bytes(max(t.resident_peak for t in enc.traces))} "
          f"vs budget {fmt_bytes(p.memory_budget)}")
    if a.trace:
        _write_trace(enc.last_trace, a.trace)


def cmd_embed(a) -> int:
    enc = _encoder(a)
    emb = enc.embed(a.text, progress=len(a.text) > 64)
    if a.json:
        _print_json({"model": a.store or a.model, "embeddings": emb.tolist(), **_stream_report(enc, a)})
    else:
        for t, e in zip(a.text, emb):
            head = " ".join(f"{v:+.4f}" for v in e[:6])
            print(f"[{head} ... ] ({e.size} dims)  {t[:60]}")
        _print_stream_summary(enc, a)
    return 0


def cmd_classify(a) -> int:
    enc = _encoder(a)
    labels, scores = enc.classify(a.text, head=a.head)
    if a.json:
        _print_json({"labels": labels, "scores": scores.tolist(), **_stream_report(enc, a)})
    else:
        for t, lab, s in zip(a.text, labels, scores):
            print(f"{lab:<14} {s.max():.3f}  {t[:70]}")
        _print_stream_summary(enc, a)
    return 0


def _prompts(a) -> list[str]:
    """The prompts of ``sti generate``: the positional ones, then --prompts-file's lines."""
    prompts = list(a.prompt)
    if a.prompts_file:
        try:
            text = sys.stdin.read() if a.prompts_file == "-" else Path(a.prompts_file).read_text(encoding="utf-8")
        except OSError as e:
            raise STIError(f"cannot read --prompts-file {a.prompts_file}: {e.strerror or e}",
                           "pass a text file with one prompt per line, or - for standard input") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise STIError(f"--prompts-file {a.prompts_file} holds no prompt", "write one prompt per line")
        prompts += lines
    if not prompts:
        raise STIError("no prompt", 'pass the prompt text (sti generate "Once upon a time"), several, '
                                    "or --prompts-file FILE")
    return prompts


def cmd_generate(a) -> int:
    from sti.api import Generator

    prompts = _prompts(a)
    batch = len(prompts) if a.batch is None else a.batch
    if batch < 1:
        raise STIError(f"--batch must be at least 1, got {batch}", "pass --batch 1 or more")
    if len(prompts) > 1 and batch != len(prompts):
        raise STIError(f"--batch {batch} with {len(prompts)} prompts: several prompts are the batch",
                       "leave --batch out, or give one prompt to generate --batch sequences of it")
    prompts = prompts * batch if len(prompts) == 1 else prompts
    if a.store:
        from sti.api import prompt_ids
        from sti.store import Store

        st = Store.open(a.store)  # the request's length decides how the budget is split
        need = max(len(prompt_ids(st.tokenizer(), st.chat_template, st.special, p, a.chat)) for p in set(prompts))
        need += a.max_tokens
        gen = Generator.from_store(st, memory=a.memory, bits=a.bits, batch=batch, storage=a.storage,
                                   token_latency=a.token_latency, kv=a.kv, min_context=need)
        if not a.json:
            p = gen.plan
            print(f"sti: streaming {a.store}: {p.weight_bytes / 1e6:.1f} MB of weights resident "
                  f"({len(p.preload)} shards preloaded, {p.slots} read buffers), "
                  f"{p.stream_bytes_per_pass / 1e6:.1f} MB read per token, context {p.context} tokens; "
                  + "; ".join(p.notes), file=sys.stderr)
    else:
        for opt in ("memory", "token_latency", "bits", "storage"):
            if getattr(a, opt) not in (None, "0"):
                raise STIError(f"--{opt.replace('_', '-')} needs --store", "pack the model (sti pack smollm2 -o STORE) "
                                                                          "and pass --store STORE")
        gen = Generator.load(a.model, progress=not a.json, kv=a.kv)
    try:
        ids = [gen.encode_prompt(p, chat=a.chat) for p in prompts]
    except BaseException:
        gen.close()
        raise
    rows: list[list[int]] = [[] for _ in ids]
    printed = ""
    t0 = time.perf_counter()
    first = None
    try:
        for step in gen.stream_batch(ids, a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed):
            first = first or time.perf_counter()
            for r, tok in zip(rows, step):
                if tok is not None:
                    r.append(tok)
            if not a.json:  # print the new part of the first sequence's text (keeps multi-byte chars whole)
                text = gen.decode(rows[0])
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(printed):])
                    sys.stdout.flush()
                    printed = text
    except KeyboardInterrupt:
        print("\nsti: interrupted", file=sys.stderr)
    finally:
        gen.close()
    texts = [gen.decode(r) for r in rows]
    if a.json:
        out = {"tokens": rows[0], "text": texts[0]}
        if batch > 1:
            out["batch"] = [{"prompt": p, "tokens": r, "text": t} for p, r, t in zip(prompts, rows, texts)]
        _print_json(out)
    else:
        sys.stdout.write(texts[0][len(printed):] + "\n")
        distinct = len(set(prompts)) > 1
        for i, (p, t) in enumerate(zip(prompts[1:], texts[1:]), 2):
            print(f"--- sequence {i}" + (f" ({_clip(p)})" if distinct else "") + f" ---\n{t}")
        n = sum(len(r) for r in rows)
        if first and n > batch:
            dt = time.perf_counter() - first
            print(f"sti: {n} tokens, time to first token {first - t0:.2f} s, "
                  f"{(n - batch) / dt:.1f} tokens/s after it", file=sys.stderr)
    return 0


def _clip(text: str, n: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def cmd_pack(a) -> int:
    from sti.store import Store, pack

    bits = a.bits.split(",") if a.bits else None
    out = pack(a.model, a.output, bits=bits, overwrite=a.overwrite, progress=not a.json)
    summary = Store.open(out).summary()
    if a.json:
        _print_json(summary)
    else:
        print(f"packed {a.model} -> {out}: {summary['shards']} shards x {len(summary['versions'])} versions, "
              f"{summary['total_bytes'] / 1e6:.1f} MB")
    return 0


def cmd_verify(a) -> int:
    from sti.store import Store

    problems = Store.open(a.store).verify()
    if a.json:
        _print_json({"store": a.store, "ok": not problems, "problems": problems})
    else:
        for p in problems:
            print(f"BAD  {p}")
        print(f"{a.store}: {'all checksums match' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def _store_info(a) -> int:
    from sti.store import Store

    s = Store.open(a.model).summary()
    if a.json:
        _print_json(s)
        return 0
    print(f"{a.model}: STI shard store (format {s['format_version']}) of {s['model']} ({s['family']})")
    print(f"  layers {s['layers']}, {s['shards_per_layer']} shards per layer, {s['shards']} shards")
    print("  bytes per version:")
    for v, n in s["bytes_per_version"].items():
        print(f"    {v:>6}  {n:>14,}")
    print(f"  globals {s['globals_bytes']:,}  embeddings {s['embedding_bytes']:,}  total {s['total_bytes']:,}")
    return 0


def cmd_info(a) -> int:
    from sti.loaders import load_checkpoint
    from sti.store import is_store

    if is_store(a.model):
        return _store_info(a)

    ck = load_checkpoint(a.model, progress=not a.json)
    cfg = ck.config
    info = {
        "model": a.model,
        "source": ck.source,
        "family": ck.family,
        "config": dict(cfg.__dict__),
        "parameters": ck.num_params,
        "bytes_by_dtype": ck.source_dtypes,
        "runtime_bytes_float32": int(sum(w.nbytes for w in ck.weights.values())),
    }
    if a.json:
        _print_json(info)
        return 0
    print(f"{a.model}: {ck.family} ({'encoder' if ck.family == 'bert' else 'decoder'}) from {ck.source}")
    print(f"  parameters      {ck.num_params:,}")
    for k, v in cfg.__dict__.items():
        print(f"  {k:<16}{v}")
    print("  bytes by dtype (source):")
    for k, v in sorted(ck.source_dtypes.items()):
        print(f"    {k:<10}{v:>14,}")
    print(f"  float32 in the runtime: {info['runtime_bytes_float32']:,} bytes")
    return 0


def cmd_eval(a) -> int:
    from sti.store import is_store
    from sti.tasks import evaluate

    model = a.model
    enc = None
    if is_store(a.model):
        a.store = a.model
        enc = model = _encoder(a)
    elif a.latency or a.memory:
        raise STIError("--latency/--memory need a shard store as MODEL", "pack it first: sti pack MODEL -o STORE")
    res = evaluate(model, a.task, progress=not a.json, limit=a.limit)
    if enc is not None:
        import numpy as np

        lat = np.array([t.latency for t in enc.traces])
        res.update({
            "model": a.model, "seq_len": a.seq_len,
            "latency_ms": {"median": float(np.median(lat) * 1e3), "p10": float(np.percentile(lat, 10) * 1e3),
                           "p90": float(np.percentile(lat, 90) * 1e3), "max": float(lat.max() * 1e3)},
            "deadline_met": float(np.mean(lat <= enc.plan.target_latency)),
            "resident_bytes_peak": max(t.resident_peak for t in enc.traces),
            "plan": enc.plan.to_dict(),
        })
    if a.json:
        _print_json(res)
        return 0
    print(f"{a.task} held-out accuracy of {a.model}: {res['accuracy']:.4f} ({res['n']} texts)")
    if enc is not None:
        m = res["latency_ms"]
        print(f"latency median {m['median']:.1f} ms (p10 {m['p10']:.1f}, p90 {m['p90']:.1f}) vs target "
              f"{enc.plan.target_latency * 1e3:.1f} ms: deadline met in {res['deadline_met']:.1%} of requests; "
              f"resident weights peak {res['resident_bytes_peak']:,} B vs budget {enc.plan.memory_budget:,} B")
    return 0


def cmd_profile(a) -> int:
    from sti.profile import run_profile
    from sti.store import Store

    with Store.open(a.store) as st:
        family = st.family
    if family == "llama":  # decoder stores: importance per shard version + per-token IO / compute
        from sti.profile_decoder import format_summary, run_decoder_profile

        res = run_decoder_profile(a.store, storage=a.storage, task=a.task, progress=not a.json)
        if a.json:
            _print_json(res)
        else:
            print(format_summary(res))
        return 0
    res = run_profile(a.store, task=a.task, storage=a.storage, progress=not a.json, speed_window=a.speed_window)
    if a.json:
        _print_json(res)
    else:
        from sti.profile import format_summary

        print(format_summary(res))
    return 0


def cmd_plan(a) -> int:
    from sti import plan as planner
    from sti.profile import load_profile, model_shape
    from sti.store import Store
    from sti.units import parse_bytes, parse_latency

    with Store.open(a.store) as st:
        imp, dev, _ = load_profile(st.path, a.storage)
        shape = model_shape(st, input_tokens=a.seq_len, int8_max_tokens=dev.int8_max_tokens)
    p = planner.plan(shape, imp, dev, parse_latency(a.latency), parse_bytes(a.memory), a.seq_len, method=a.planner)
    if a.json:
        _print_json(p.to_dict())
        return 0
    print(f"plan ({p.method}) for T={p.target_latency * 1e3:.1f} ms, M={p.memory_budget:,} B, {p.seq_len} tokens "
          f"on {dev.label}")
    for layer, lp in enumerate(p.layers):
        bits = " ".join(f"{s}:{b}" + ("*" if (layer, s) in set(map(tuple, p.preload)) else "")
                        for s, b in zip(lp.shards, lp.bits))
        print(f"  layer {layer}: width {len(lp.shards):>2}  {bits}")
    print("  (shard:bits, * = preloaded)")
    tail = p.solver.get("tail_ratio", 1.0)
    stretch = p.solver.get("compute_margin", 1.0)
    checked = p.solver.get("checked_latency", p.predicted_latency)
    why = f"x{tail:.3g}" + (f", compute x{stretch:.3g}" if stretch > 1.0 else "")
    print(f"predicted latency {p.predicted_latency * 1e3:.2f} ms median, {checked * tail * 1e3:.2f} ms "
          f"at the 95th percentile ({why}, measured by sti profile; the deadline is "
          f"{p.target_latency * 1e3:.1f} ms), stall {p.stall_time * 1e3:.2f} ms, loss {p.predicted_loss:.4g}, "
          f"resident peak {p.resident_bytes_peak:,} B, preload {p.preload_bytes:,} B")
    return 0


def cmd_bench(a) -> int:
    from sti.bench import run_bench

    return run_bench(a.suite, out_dir=a.out, repeats=a.repeats, quick=a.quick, store=a.store, peers=a.peers)


def cmd_demo(a) -> int:
    from sti.demo import DemoSettings, run_demo

    return run_demo(DemoSettings(latency=a.latency, memory=a.memory, cache=a.cache, limit=a.limit,
                                 chat=not a.no_chat, n_calib=a.calib))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sti",
        description="STI (Speedy Transformer Inference): run BERT-family encoders and LLaMA-family "
                    "decoders with a light NumPy runtime.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    def model_opt(sp, default):
        sp.add_argument("--model", default=default,
                        help=f"built-in name, Hugging Face model directory or .gguf file (default: {default})")

    def budget_opts(sp, store_required=False):
        g = sp.add_argument_group("streaming from a shard store (sti pack, sti profile)")
        g.add_argument("--store", required=store_required, help="shard store directory to stream from")
        g.add_argument("--latency", help="target latency per request, e.g. 40ms")
        g.add_argument("--memory", help="budget of resident weight bytes, e.g. 2MB")
        g.add_argument("--seq-len", type=int, default=128, help="plan for inputs of up to this many tokens; "
                       "longer texts are truncated (default: 128)")
        g.add_argument("--planner", choices=["heuristic", "exact"], default="heuristic",
                       help="STI's two-stage heuristic or the exact MILP (default: heuristic)")
        g.add_argument("--storage", help="storage profile to plan and run with: emmc, ufs, <N>MBps (emulated), or "
                                         "warm (the store kept in the page cache)")
        g.add_argument("--cold", action="store_true", help="evict the store from the page cache before every request")
        g.add_argument("--trace", help="write the last request's trace: Chrome trace JSON (+ a PNG beside it), or a .png")

    sp = add("embed", cmd_embed, "Embed texts (mean-pooled, L2-normalised sentence embeddings).")
    model_opt(sp, "minilm")
    sp.add_argument("text", nargs="+", help="texts to embed")
    sp.add_argument("--strict", action="store_true", help="error on texts longer than the model's positions instead of truncating")
    sp.add_argument("--json", action="store_true", help='print {"model": ..., "embeddings": [[...], ...]} '
                    '(+ "latency_ms", "resident_bytes_peak", "plan" with --store)')
    budget_opts(sp)

    sp = add("classify", cmd_classify, "Classify texts with a linear head on the embeddings (BBC News topics by default).")
    model_opt(sp, "minilm")
    sp.add_argument("text", nargs="+", help="texts to classify")
    sp.add_argument("--head", default="bbc-news", help="classification head (default: bbc-news)")
    sp.add_argument("--strict", action="store_true", help="error on over-long texts instead of truncating")
    sp.add_argument("--json", action="store_true", help='print {"labels": [...], "scores": [[...], ...]} '
                    '(+ "latency_ms", "resident_bytes_peak", "plan" with --store)')
    budget_opts(sp)

    sp = add("generate", cmd_generate, "Generate text from one prompt or a batch of them, streaming tokens as "
                                       "they are produced.")
    model_opt(sp, "smollm2")
    sp.add_argument("prompt", nargs="*", metavar="PROMPT",
                    help="the prompt text; several prompts generate together as one batch (the first one's "
                         "tokens stream, the others print when done)")
    sp.add_argument("--prompts-file", metavar="FILE",
                    help="more prompts, one per line (- reads standard input); they join the batch")
    sp.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    sp.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    sp.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sp.add_argument("--json", action="store_true", help='print {"tokens": [generated ids], "text": ...} at the end')
    sp.add_argument("--kv", choices=("fp16", "fp32"), default="fp16",
                    help="KV cache element type (default: fp16, half the memory; fp32 matches a float32 "
                         "reference bit for bit)")
    sp.add_argument("--batch", type=int, default=None,
                    help="generate this many sequences of one prompt together (sampled independently when "
                         "--temperature > 0; default: one per prompt); every streamed layer is read once "
                         "for the whole batch")
    g = sp.add_argument_group("streaming from a shard store (sti pack smollm2 -o STORE)")
    g.add_argument("--store", help="run from this decoder store, streaming what does not fit in --memory")
    g.add_argument("--memory", default="0", help="budget for weights, KV cache and read buffers, e.g. 16MB "
                                                 "(default: unbounded)")
    g.add_argument("--token-latency", help="per-token target, e.g. 50ms: the planner lowers bitwidths to meet it "
                                           "(needs sti profile STORE); default: every shard at its lossless version")
    g.add_argument("--bits", help="run every shard at this version instead: 2..8, fp32 or source")
    g.add_argument("--storage", help="emulate slower storage: emmc, ufs or <N>MBps")

    sp = add("info", cmd_info, "Describe a model (architecture, parameters, bytes by dtype) or a shard store.")
    sp.add_argument("model", help="built-in name, Hugging Face model directory, .gguf file or shard store")
    sp.add_argument("--json", action="store_true", help="print the description as JSON")

    sp = add("pack", cmd_pack, "Pack a model into a shard store: per-head (encoder) or per-KV-group (decoder) "
                               "vertical shards, each at several bitwidths.")
    sp.add_argument("model", nargs="?", default="minilm",
                    help="built-in name, HF directory or .gguf file (default: minilm)")
    sp.add_argument("-o", "--output", required=True, help="store directory to create")
    sp.add_argument("--bits", help="fidelity versions to store: 2,3,4,5,6,8, 32 (fp32), source (the source's own "
                                   "blocks); default 2,3,4,5,6,8,32 for encoders, 2,3,4,5,6,8,source for decoders")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing store at OUTPUT")
    sp.add_argument("--json", action="store_true", help="print the store summary as JSON")

    sp = add("verify", cmd_verify, "Check every checksum of a shard store.")
    sp.add_argument("store", help="store directory")
    sp.add_argument("--json", action="store_true", help='print {"store", "ok", "problems"}')

    sp = add("eval", cmd_eval, "Held-out accuracy of a model, or of a shard store under a plan, on a task.")
    sp.add_argument("model", help="built-in name or model directory (an encoder), or a shard store")
    sp.add_argument("--task", default="bbc-news", help="task (default: bbc-news)")
    sp.add_argument("--limit", type=int, default=None, help="evaluate a class-balanced subset of this many texts")
    sp.add_argument("--json", action="store_true", help='print {"accuracy": ..., ...} (+ latency and plan for a store)')
    sp.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)
    budget_opts(sp)

    sp = add("profile", cmd_profile, "Profile a shard store: importance of every shard on a task's calibration "
             "split, and this device's IO and compute speed.")
    sp.add_argument("store", help="shard store directory")
    sp.add_argument("--task", default="bbc-news", help="task whose calibration split is used (default: bbc-news)")
    sp.add_argument("--storage", help="emulate slower storage: emmc, ufs, <N>MBps (labelled as emulated); or warm: "
                                      "the real storage with the store in the page cache, as a server keeps it")
    sp.add_argument("--speed-window", type=float, default=60.0, metavar="SECONDS",
                    help="encoder stores: price compute at the machine's median speed over this many seconds "
                         "(a probe request timed in bursts through the calibration and after it; a shared VM's "
                         "speed moves by tens of percent over seconds to minutes); 0: at the calibration's "
                         "moments (default: 60)")
    sp.add_argument("--json", action="store_true", help="print the profile summary as JSON")

    sp = add("plan", cmd_plan, "Plan a store's execution for a latency target and a memory budget.")
    sp.add_argument("store", help="profiled shard store directory")
    sp.add_argument("--latency", required=True, help="target latency, e.g. 40ms")
    sp.add_argument("--memory", required=True, help="budget of resident weight bytes, e.g. 2MB")
    sp.add_argument("--seq-len", type=int, default=128, help="input length to plan for (default: 128)")
    sp.add_argument("--planner", choices=["heuristic", "exact"], default="heuristic", help="planning method")
    sp.add_argument("--storage", help="plan with the profile of another storage: emmc, ufs, <N>MBps, warm")
    sp.add_argument("--json", action="store_true", help="print the Plan as JSON")

    sp = add("bench", cmd_bench, "Benchmarks: a table (Markdown + JSON) against the reference implementations.")
    sp.add_argument("suite", choices=["engine", "encoder", "kernels", "decoder"],
                    help="engine: STI vs Hugging Face transformers, warm, cold start, decode, load; "
                         "encoder: the elastic pipeline vs whole-model, layerwise, uniform-bitwidth and transformers "
                         "baselines on the accuracy / latency / memory grid, with Pareto plots; "
                         "kernels: low-bit dequantization and fused matrix-vector kernels on SmolLM2's shapes; "
                         "decoder: SmolLM2 generation in memory and streamed under 100/25/10/5%% memory budgets "
                         "against llama.cpp, transformers, AirLLM and accelerate, with a tokens/s-vs-memory plot")
    sp.add_argument("--out", default="bench-results", help="folder for the JSON and Markdown results (default: bench-results)")
    sp.add_argument("--repeats", type=int, default=7, help="repetitions per measurement; medians are reported (default: 7)")
    sp.add_argument("--quick", action="store_true", help="fewer repetitions and shorter runs, for a smoke test")
    sp.add_argument("--store", help="encoder: the MiniLM shard store to measure (default: packed and profiled "
                                    "once in the cache directory, $STI_CACHE or ~/.cache/sti); decoder: the "
                                    "SmolLM2 store (default: packed once into the cache directory)")
    sp.add_argument("--peers", metavar="SPEC", help="decoder: the peers to measure, comma-separated, each NAME or "
                    "NAME@STORAGE[/BATCH] to measure it there only, e.g. llama.cpp,transformers,airllm@real/1 "
                    "(default: llama.cpp, transformers, airllm and accelerate on every storage and batch; AirLLM "
                    "and accelerate add about an hour)")

    sp = add("demo", cmd_demo, "The elastic engine end to end on the built-in MiniLM: pack, profile, plan, "
                               "classify sample headlines, accuracy against the whole model; then a short chat answer.")
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.description = ("The elastic engine end to end on the built-in MiniLM: pack, profile, plan, classify\n"
                      "sample headlines, accuracy against the whole model; then a short chat answer.")
    sp.epilog = DEMO_EPILOG
    sp.add_argument("--latency", help="target latency per request, e.g. 30ms (default: 2 x the whole model's "
                    "warm latency at 64 tokens, measured at the start)")
    sp.add_argument("--memory", help="budget of resident weight bytes, e.g. 4.5MB (default: 5%% of the float32 "
                    "model's bytes)")
    sp.add_argument("--cache", metavar="DIR", help="cache directory for the store and its profile "
                    "(default: $STI_CACHE, else $XDG_CACHE_HOME/sti, else ~/.cache/sti)")
    sp.add_argument("--limit", type=int, default=100, help="held-out BBC News articles in the accuracy slice "
                    "(default: 100)")
    sp.add_argument("--calib", type=int, default=16, help="calibration texts when the demo profiles the store "
                    "(default: 16; sti profile uses 48)")
    sp.add_argument("--no-chat", action="store_true", help="skip the SmolLM2 chat answer at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_tokens", 1) is not None and getattr(args, "max_tokens", 1) < 1:
        print("sti: error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except STIError as e:
        print(f"sti: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
