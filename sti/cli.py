"""The ``sti`` command: a thin layer over the Python API (``sti.api``)."""

from __future__ import annotations

import argparse
import json
import sys

from sti.errors import STIError

EPILOG = """examples:
  sti embed "A sentence to embed"
  sti classify "Shares in the bank fell 5% after the results"
  sti generate --chat "Write a haiku about autumn" --max-tokens 40
  sti info smollm2
  sti pack minilm -o minilm.sti && sti verify minilm.sti
  sti eval minilm --task bbc-news
  sti bench engine
"""


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout)
    sys.stdout.write("\n")


def cmd_embed(a) -> int:
    from sti.api import Encoder

    enc = Encoder.load(a.model, strict=a.strict)
    emb = enc.embed(a.text, progress=len(a.text) > 64)
    if a.json:
        _print_json({"model": a.model, "embeddings": emb.tolist()})
    else:
        for t, e in zip(a.text, emb):
            head = " ".join(f"{v:+.4f}" for v in e[:6])
            print(f"[{head} ... ] ({e.size} dims)  {t[:60]}")
    return 0


def cmd_classify(a) -> int:
    from sti.api import Encoder

    enc = Encoder.load(a.model, strict=a.strict)
    labels, scores = enc.classify(a.text, head=a.head)
    if a.json:
        _print_json({"labels": labels, "scores": scores.tolist()})
    else:
        for t, lab, s in zip(a.text, labels, scores):
            print(f"{lab:<14} {s.max():.3f}  {t[:70]}")
    return 0


def cmd_generate(a) -> int:
    from sti.api import Generator

    gen = Generator.load(a.model, progress=not a.json)
    ids = gen.encode_prompt(a.prompt, chat=a.chat)
    tokens: list[int] = []
    printed = ""
    try:
        for tok in gen.stream(ids, a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed):
            tokens.append(tok)
            if not a.json:  # print the new part of the decoded text (keeps multi-byte chars whole)
                text = gen.decode(tokens)
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(printed):])
                    sys.stdout.flush()
                    printed = text
    except KeyboardInterrupt:
        print("\nsti: interrupted", file=sys.stderr)
    text = gen.decode(tokens)
    if a.json:
        _print_json({"tokens": tokens, "text": text})
    else:
        sys.stdout.write(text[len(printed):] + "\n")
    return 0


def cmd_pack(a) -> int:
    from sti.store import Store, pack

    bits = tuple(int(b) for b in a.bits.split(","))
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
    from sti.tasks import evaluate

    res = evaluate(a.model, a.task, progress=not a.json)
    if a.json:
        _print_json(res)
    else:
        print(f"{a.task} held-out accuracy of {a.model}: {res['accuracy']:.4f} ({res['n']} texts)")
    return 0


def cmd_bench(a) -> int:
    from sti.bench import run_bench

    return run_bench(a.suite, out_dir=a.out, repeats=a.repeats, quick=a.quick)


def cmd_demo(a) -> int:
    from sti.demo import run_demo

    return run_demo()


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

    sp = add("embed", cmd_embed, "Embed texts (mean-pooled, L2-normalised sentence embeddings).")
    model_opt(sp, "minilm")
    sp.add_argument("text", nargs="+", help="texts to embed")
    sp.add_argument("--strict", action="store_true", help="error on texts longer than the model's positions instead of truncating")
    sp.add_argument("--json", action="store_true", help='print {"model": ..., "embeddings": [[...], ...]}')

    sp = add("classify", cmd_classify, "Classify texts with a linear head on the embeddings (BBC News topics by default).")
    model_opt(sp, "minilm")
    sp.add_argument("text", nargs="+", help="texts to classify")
    sp.add_argument("--head", default="bbc-news", help="classification head (default: bbc-news)")
    sp.add_argument("--strict", action="store_true", help="error on over-long texts instead of truncating")
    sp.add_argument("--json", action="store_true", help='print {"labels": [...], "scores": [[...], ...]}')

    sp = add("generate", cmd_generate, "Generate text from a prompt, streaming tokens as they are produced.")
    model_opt(sp, "smollm2")
    sp.add_argument("prompt", help="the prompt text")
    sp.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    sp.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    sp.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sp.add_argument("--json", action="store_true", help='print {"tokens": [generated ids], "text": ...} at the end')

    sp = add("info", cmd_info, "Describe a model (architecture, parameters, bytes by dtype) or a shard store.")
    sp.add_argument("model", help="built-in name, Hugging Face model directory, .gguf file or shard store")
    sp.add_argument("--json", action="store_true", help="print the description as JSON")

    sp = add("pack", cmd_pack, "Pack a model into a shard store: per-head vertical shards, each at several bitwidths.")
    sp.add_argument("model", nargs="?", default="minilm", help="built-in name or HF directory (default: minilm)")
    sp.add_argument("-o", "--output", required=True, help="store directory to create")
    sp.add_argument("--bits", default="2,3,4,5,6,8,32", help="fidelity versions to store (default: 2,3,4,5,6,8,32)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing store at OUTPUT")
    sp.add_argument("--json", action="store_true", help="print the store summary as JSON")

    sp = add("verify", cmd_verify, "Check every checksum of a shard store.")
    sp.add_argument("store", help="store directory")
    sp.add_argument("--json", action="store_true", help='print {"store", "ok", "problems"}')

    sp = add("eval", cmd_eval, "Held-out accuracy of a model on a task.")
    sp.add_argument("model", help="built-in name or model directory (an encoder)")
    sp.add_argument("--task", default="bbc-news", help="task (default: bbc-news)")
    sp.add_argument("--json", action="store_true", help='print {"accuracy": ..., ...}')

    sp = add("bench", cmd_bench, "Benchmarks: a table (Markdown + JSON) against the reference implementations.")
    sp.add_argument("suite", choices=["engine"], help="engine: STI vs Hugging Face transformers, warm, cold start, decode, load")
    sp.add_argument("--out", default="bench-results", help="folder for the JSON and Markdown results (default: bench-results)")
    sp.add_argument("--repeats", type=int, default=7, help="repetitions per measurement; medians are reported (default: 7)")
    sp.add_argument("--quick", action="store_true", help="fewer repetitions and shorter runs, for a smoke test")

    add("demo", cmd_demo, "Classify sample headlines and generate a short answer with the built-in models.")
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
