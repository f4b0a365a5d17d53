"""``sti demo``: the main job on the built-in models, for a first look after installation."""

from __future__ import annotations

import sys
import time

# Headlines written for the demo (one per BBC News topic the built-in head knows).
HEADLINES = [
    "Central bank raises interest rates as inflation stays above target",
    "Striker scores twice as City come from behind to win the derby",
    "New smartphone chip promises longer battery life and faster AI features",
    "Prime minister faces backbench revolt over planned welfare cuts",
    "Director's latest film wins top prize at the festival in Cannes",
]


def run_demo() -> int:
    from sti.api import Encoder, Generator

    t0 = time.perf_counter()
    enc = Encoder.load("minilm")
    t_load = time.perf_counter() - t0
    print(f"== classify: MiniLM-L6 + BBC News topic head (loaded in {t_load * 1e3:.0f} ms)")
    enc.classify(HEADLINES[:1])  # warm-up
    t0 = time.perf_counter()
    labels, scores = enc.classify(HEADLINES)
    dt = time.perf_counter() - t0
    for text, lab, s in zip(HEADLINES, labels, scores):
        print(f"  {lab:<14} {s.max():.2f}  {text}")
    print(f"  {len(HEADLINES)} headlines in {dt * 1e3:.1f} ms\n")

    print("== generate: SmolLM2-135M-Instruct (GGUF Q4_1, run in float32)")
    t0 = time.perf_counter()
    gen = Generator.load("smollm2")
    print(f"  loaded in {time.perf_counter() - t0:.1f} s")
    prompt = "In one sentence, why does a model that streams its weights need less memory?"
    print(f"  > {prompt}\n  ", end="")
    ids = gen.encode_prompt(prompt, chat=True)
    toks, printed = [], ""
    t0 = time.perf_counter()
    for tok in gen.stream(ids, max_tokens=60):
        toks.append(tok)
        text = gen.decode(toks)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):].replace("\n", "\n  "))
            sys.stdout.flush()
            printed = text
    dt = time.perf_counter() - t0
    print(f"\n  {len(toks)} tokens in {dt:.2f} s ({len(toks) / dt:.1f} tokens/s, prefill included)")
    return 0
