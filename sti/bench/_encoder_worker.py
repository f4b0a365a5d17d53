"""One system of ``sti bench encoder`` over the evaluation inputs, in a process of its own (so
that its peak RSS is its own). Run by the suite, not by hand:

    python -m sti.bench._encoder_worker SPEC.json [--serve]

With ``--serve`` the requests run in turns with other systems' workers: after set-up and
warm-up the worker prints ``{"ready": ...}`` and then reads commands from stdin, ``run A B``
(one untimed request, as the previous request on the machine was another process's, then
requests A..B-1, answered with ``{"ran": B - A}``) and ``done`` (the results below, then exit).

SPEC (written by ``sti.bench.encoder``):
  system   "in-memory"     every weight read from the store at fp32 once (untimed), then
                           ``bert.encode`` per request;
           "load-execute"  per request: open the store, read and check every weight (the whole
                           word-embedding table included), then run, as a load-then-execute
                           program does;
           "stream"        ``StreamingEncoder`` under ``schedule`` (a plain dict) or ``plan``
                           (a ``Plan`` JSON file);
           "hf-warm"       transformers ``AutoModel`` from ``hf_dir``, loaded once, on the same ids.
  store, inputs (.npz: ``ids`` concatenated, ``offsets``), head (.npz: ``W``, ``b``), seq_len,
  cold (evict the store's files from the page cache before every request, untimed),
  storage (emulated storage spec or null), chunk_shards (stream), warmup (untimed requests
  first), threads (torch).

Prints one JSON line: per request the wall latency (perf_counter around ids -> prediction, the
eviction excluded) and the predicted class; for "stream" each request's trace facts (see
``sti.bench.encoder.trace_facts``); the resident weight bytes; the process's VmHWM.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from sti.machine import peak_rss_bytes


def read_whole_model(store_path, throttle=None):
    """Every weight of a store at fp32, read and checked: (config, globals with the whole
    word-embedding table as an array, layer dicts, weight bytes held, bytes read). With a
    ``throttle`` the reads take at least as long as the emulated storage needs for them."""
    from sti.store import Store

    t0 = time.perf_counter()
    with Store.open(store_path) as st:
        g = st.globals()
        emb = st.manifest.embedding
        g[emb.name] = st.embedding_rows(np.arange(emb.shape[0]))  # one read, every row checked
        layers = list(st.full_layers(32))
        nbytes_read = (sum(st.shard_nbytes(layer, s, 32) for layer in range(st.num_layers)
                           for s in st.shard_indices(layer))
                       + g[emb.name].nbytes + sum(a.nbytes for n, a in g.items() if n != emb.name))
        cfg = st.config
    if throttle is not None:
        throttle.pace(t0, nbytes_read)
    held = sum(a.nbytes for a in g.values()) + sum(a.nbytes for w in layers for a in w.values())
    return cfg, g, layers, held, nbytes_read


def _requests(path) -> list[np.ndarray]:
    with np.load(path) as z:
        ids, offsets = z["ids"], z["offsets"]
    return [ids[a:b][None, :] for a, b in zip(offsets[:-1], offsets[1:])]  # (1, T) each


def _pool(h: np.ndarray, ids: np.ndarray) -> np.ndarray:
    from sti.models import bert

    return bert.mean_pool(h, np.ones_like(ids))


class InMemory:
    """Every weight at fp32, read once; ``bert.encode`` per request."""

    def __init__(self, spec: dict):
        self.cfg, self.g, self.layers, self.resident, _ = read_whole_model(spec["store"])

    def embed(self, ids: np.ndarray) -> np.ndarray:
        from sti.models import bert

        return _pool(bert.encode(self.cfg, self.g, self.layers, ids, np.ones_like(ids)), ids)


class LoadExecute:
    """Per request: read every weight (paced to the emulated storage, if any), then run."""

    def __init__(self, spec: dict):
        from sti.profile import parse_storage

        self.path, self.throttle, self.resident = spec["store"], parse_storage(spec.get("storage")), None

    def embed(self, ids: np.ndarray) -> np.ndarray:
        from sti.models import bert

        cfg, g, layers, self.resident, _ = read_whole_model(self.path, self.throttle)
        return _pool(bert.encode(cfg, g, layers, ids, np.ones_like(ids)), ids)


class Stream:
    """``StreamingEncoder`` under a plan or a plain schedule; keeps each request's trace facts."""

    def __init__(self, spec: dict):
        from sti.bench.encoder import trace_facts
        from sti.profile import parse_storage
        from sti.runtime import Schedule, StreamingEncoder
        from sti.store import Store

        if spec.get("plan"):
            from sti.plan import Plan

            with open(spec["plan"], encoding="utf-8") as f:
                schedule = Schedule.from_plan(Plan.from_json(f.read()), spec["chunk_shards"])
        else:
            s = spec["schedule"]
            schedule = Schedule([{int(k): int(v) for k, v in layer.items()} for layer in s["layers"]],
                                memory_budget=int(s["memory_budget"]), chunk_shards=int(s["chunk_shards"]),
                                int8_max_tokens=int(s.get("int8_max_tokens", 0)))
        # the caller evicts (untimed); a cold request checks every read, as a cold engine does
        self.engine = StreamingEncoder(Store.open(spec["store"]), schedule, cold=False,
                                       throttle=parse_storage(spec.get("storage")), max_tokens=spec["seq_len"],
                                       verify="always" if spec.get("cold") else "auto")
        self.facts, self.resident, self._facts = [], None, trace_facts

    def embed(self, ids: np.ndarray) -> np.ndarray:
        h, trace = self.engine.run(ids, np.ones_like(ids))
        self.facts.append(self._facts(trace))
        self.resident = max(self.resident or 0, trace.resident_peak)
        return _pool(h, ids)


class HFWarm:
    """transformers ``AutoModel``, loaded once, on the same ids (mean pooling, L2 normalisation)."""

    def __init__(self, spec: dict):
        import torch

        torch.set_num_threads(int(spec.get("threads", 2)))
        from transformers import AutoModel

        self.torch = torch
        self.model = AutoModel.from_pretrained(spec["hf_dir"])
        self.model.eval()
        self.resident = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def embed(self, ids: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            t = torch.from_numpy(ids)
            h = self.model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state  # (1, T, H)
            e = torch.nn.functional.normalize(h.mean(1), p=2, dim=-1)  # (1, H): no padding, plain mean
        return e.numpy()


SYSTEMS = {"in-memory": InMemory, "load-execute": LoadExecute, "stream": Stream, "hf-warm": HFWarm}


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    if spec["system"] not in SYSTEMS:
        print(f"unknown system {spec['system']!r}; known: {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    with np.load(spec["head"]) as z:
        W, b = z["W"].astype(np.float32), z["b"].astype(np.float32)
    requests = _requests(spec["inputs"])
    evict = None
    if spec.get("cold"):
        from sti.store import Store

        evict = Store.open(spec["store"]).evict  # page-cache state is per file: any descriptor evicts
    t0 = time.perf_counter()
    system = SYSTEMS[spec["system"]](spec)
    setup_s = time.perf_counter() - t0

    def request(ids: np.ndarray) -> tuple[float, int]:
        if evict is not None:
            evict()  # untimed
        t0 = time.perf_counter()
        e = system.embed(ids)
        pred = int(np.argmax(e[0] @ W.T + b))
        return time.perf_counter() - t0, pred

    for i in range(int(spec.get("warmup", 1))):
        request(requests[i % len(requests)])
    facts = getattr(system, "facts", None)
    if facts is not None:
        facts.clear()  # the warm-up requests' traces
    latency, preds = [], []

    def run(a: int, b: int) -> None:
        for ids in requests[a:b]:
            dt, p = request(ids)
            latency.append(dt)
            preds.append(p)

    if "--serve" in argv:
        print(json.dumps({"ready": spec["system"], "setup_s": setup_s}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if cmd and cmd[0] == "run":
                a, b = int(cmd[1]), int(cmd[2])
                kept = None if facts is None else len(facts)
                request(requests[a % len(requests)])  # untimed: the machine last ran another process
                if facts is not None:
                    del facts[kept:]
                run(a, b)
                print(json.dumps({"ran": b - a}), flush=True)
            elif cmd == ["done"]:
                break
    else:
        run(0, len(requests))
    print(json.dumps({"system": spec["system"], "latency_s": latency, "preds": preds, "trace": facts,
                      "resident_bytes": None if system.resident is None else int(system.resident),
                      "setup_s": setup_s, "peak_rss_bytes": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
