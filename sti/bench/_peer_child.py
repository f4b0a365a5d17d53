"""One peer of ``sti bench decoder`` measured in a process of its own, so that its peak RSS is
its own: llama.cpp (llama-cpp-python), Hugging Face transformers in fp32, AirLLM, or
accelerate disk offload, all on CPU.

    python _peer_child.py SPEC_JSON

``sti.bench.decoder_peers`` writes SPEC_JSON and reads the JSON object this prints as its
last line of output. Tasks (``spec["task"]``):

* ``export-hf``   the GGUF -> a Hugging Face directory (config, fp32 safetensors, tokenizer)
                  through transformers' own GGUF loader, for the PyTorch-based peers.
* ``speed``       load, warm up, then time prefill and greedy decode of one batch of
                  equal-length prompts, ``repeats`` times; this process's peak RSS.
* ``perplexity``  exp(mean NLL) over token windows, each window predicting its tokens
                  1..n from tokens 0..n-1.
* ``prepare-airllm``  let AirLLM write its per-layer files (once; it reuses them).

Every system gets the same token ids from the parent; no peer's own tokenizer is used.
Greedy decoding runs exactly ``new_tokens`` steps (end tokens do not stop it), so every
system does the same work. This file imports nothing from ``sti``; each reference library
is imported inside the backend that uses it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- process facts


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Unlike ``ru_maxrss`` it starts afresh at
    exec, so it does not carry the spawning process's high-water mark (``ru_maxrss`` is the
    fallback where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def evict(path: str | os.PathLike) -> None:
    """Drop a file's clean pages from the page cache, so the next read comes from the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- storage


class Storage:
    """How a streaming peer's weight reads are served, and what they cost.

    ``cold``: the file is evicted from the page cache before every read, so every read is
    served by the device. ``bandwidth`` (bytes/s) and ``latency`` (s per read): emulated slower
    storage, the rule of ``sti.runtime.Throttle`` that paces STI's own reads: a device serving
    reads one after another, each taking ``latency + bytes / bandwidth`` of device time from
    when it is issued or the previous read completes, whichever is later (a reader's late
    wake-up from its sleep is not charged to the device). Reads may come from a prefetch thread.
    """

    def __init__(self, cold: bool = False, bandwidth: float | None = None, latency: float = 0.0):
        self.cold, self.bandwidth, self.latency = cold, bandwidth, latency
        self.reads = 0
        self.bytes = 0
        self.seconds = 0.0
        self.probe = None  # called with the bytes of each read as it completes (resident-bytes probe)
        self._lock = threading.Lock()
        self._free_at = 0.0  # the emulated device's clock (perf_counter s)
        self._late = 0.0  # how late the last sleeping reader woke

    @classmethod
    def from_spec(cls, spec: dict | None) -> "Storage":
        spec = spec or {}
        return cls(bool(spec.get("cold")), spec.get("bandwidth"), float(spec.get("latency") or 0.0))

    def read(self, path, load):
        """``load()`` the object read from ``path``, evicting first and pacing as configured."""
        if self.cold:
            evict(path)
        t0 = time.perf_counter()
        obj = load()
        nbytes = tensor_bytes(obj)
        if self.bandwidth:
            with self._lock:
                due = self._free_at = max(t0 - self._late, self._free_at) + self.latency + nbytes / self.bandwidth
            slept = False
            while (left := due - time.perf_counter()) > 0:
                time.sleep(left)
                slept = True
            with self._lock:
                self._late = time.perf_counter() - due if slept else 0.0
        with self._lock:
            self.reads += 1
            self.bytes += nbytes
            self.seconds += time.perf_counter() - t0
        if self.probe is not None:
            self.probe(nbytes)
        return obj

    def stats(self) -> dict:
        return {"reads": self.reads, "bytes": self.bytes, "seconds": round(self.seconds, 4)}


def tensor_bytes(obj) -> int:
    """Bytes of an array or tensor, or of a dict of them."""
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return int(obj.nbytes)


# --------------------------------------------------------------------------- measurement


def median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def measure_speed(backend, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Prefill (time to the first token of every sequence) and greedy decode, ``repeats``
    times after one short warm-up. Rates count every sequence of the batch."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (one prefill token, one decode step)")
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"prompts must have one length, got {sorted(lengths)}")
    batch, prompt_len = len(prompts), lengths.pop()
    run_greedy(backend, prompts, 2)  # warm-up: first-call costs, allocator, lazy init
    runs = []
    for _ in range(repeats):
        tokens, prefill_s, decode_s = run_greedy(backend, prompts, new_tokens)
        runs.append({"prefill_s": prefill_s, "decode_s": decode_s})
    steps = new_tokens - 1
    return {
        "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "decode_steps": steps,
        "prefill_tok_s": median([batch * prompt_len / r["prefill_s"] for r in runs]),
        "decode_tok_s": median([batch * steps / r["decode_s"] for r in runs]),
        "ttft_s": median([r["prefill_s"] for r in runs]),
        "runs": [{k: round(v, 6) for k, v in r.items()} for r in runs],
        "tokens": tokens[0],  # greedy continuation of the first prompt, for cross-system comparison
    }


def run_greedy(backend, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, float]:
    """(tokens per sequence, prefill seconds, decode seconds) of one greedy generation."""
    t0 = time.perf_counter()
    state, toks = backend.prefill(prompts)
    t1 = time.perf_counter()
    out = [toks]
    for _ in range(new_tokens - 1):
        toks = backend.step(state, toks)
        out.append(toks)
    t2 = time.perf_counter()
    backend.release(state)
    return [list(seq) for seq in zip(*out)], t1 - t0, t2 - t1


def measure_perplexity(backend, windows: list[list[int]]) -> dict:
    nll, n = 0.0, 0
    for w in windows:
        s, k = backend.nll(w)
        nll, n = nll + s, n + k
    return {"perplexity": float(np.exp(nll / n)), "tokens_scored": n, "windows": len(windows)}


def nll_of_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits)[target] over rows, in float64."""
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    logz = np.log(np.exp(z - m).sum(-1)) + m[:, 0]
    return float((logz - z[np.arange(len(z)), targets]).sum())


# --------------------------------------------------------------------------- llama.cpp


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: one context holding ``batch`` sequences,
    each token of a step in one ``llama_decode`` call (the high-level ``Llama`` class runs a
    single sequence; the C API is how llama.cpp itself batches)."""

    def __init__(self, gguf: str, threads: int, batch: int, context: int, all_logits: bool = False):
        import llama_cpp as C

        self.C = C
        C.llama_backend_init()
        mp = C.llama_model_default_params()
        self.model = C.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = C.llama_context_default_params()
        cp.n_ctx = context * batch
        cp.n_batch = max(context * batch, 512)
        cp.n_seq_max = batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = C.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model))
        self.capacity = cp.n_batch
        self.batch = C.llama_batch_init(self.capacity, 0, batch)

    @property
    def weight_bytes(self) -> int:
        return int(self.C.llama_model_size(self.model))

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Run (token, position, sequence, wants_logits) rows; the logits rows that were asked for."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, want) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        if rc := self.C.llama_decode(self.ctx, b):
            raise RuntimeError(f"llama_decode returned {rc}")
        n_out = sum(1 for r in rows if r[3])
        return np.ctypeslib.as_array(self.C.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def _clear(self) -> None:
        C = self.C
        if hasattr(C, "llama_memory_clear"):
            C.llama_memory_clear(C.llama_get_memory(self.ctx), True)
        else:  # older bindings
            C.llama_kv_self_clear(self.ctx)

    def prefill(self, prompts):
        self._clear()
        rows = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        logits = self._decode(rows)  # (B, V): the last position of each sequence
        return {"pos": len(prompts[0])}, [int(t) for t in logits.argmax(-1)]

    def step(self, state, toks):
        pos = state["pos"]
        state["pos"] = pos + 1
        return [int(t) for t in self._decode([(t, pos, s, True) for s, t in enumerate(toks)]).argmax(-1)]

    def release(self, state) -> None:
        pass

    def nll(self, window):
        self._clear()
        logits = self._decode([(tok, pos, 0, True) for pos, tok in enumerate(window[:-1])])  # (T, V)
        return nll_of_logits(logits, np.asarray(window[1:])), len(window) - 1

    def close(self) -> None:
        C = self.C
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)
        C.llama_model_free(self.model)


# --------------------------------------------------------------------------- PyTorch peers


class TorchCausalLM:
    """A transformers causal LM in fp32 driven by the greedy loop every PyTorch peer shares:
    prefill with only the last position's logits, then one token per sequence per step
    through the KV cache (``past_key_values``)."""

    def __init__(self, model, torch):
        self.model, self.torch = model, torch

    def prefill(self, prompts):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(prompts, dtype=torch.long), use_cache=True, logits_to_keep=1)
        return {"cache": out.past_key_values}, out.logits[:, -1].argmax(-1).tolist()

    def step(self, state, toks):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(toks, dtype=torch.long)[:, None],  # (B, 1)
                             past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return out.logits[:, -1].argmax(-1).tolist()

    def release(self, state) -> None:
        state.clear()

    def nll(self, window):
        torch = self.torch
        ids = torch.tensor([window], dtype=torch.long)  # (1, T + 1)
        with torch.inference_mode():
            logits = self.model(input_ids=ids[:, :-1], use_cache=False).logits[0]  # (T, V)
            nll = torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="sum")
        return float(nll), len(window) - 1

    def materialised_bytes(self) -> int:
        """Bytes of the parameters and buffers that hold real storage now (not on ``meta``);
        tied tensors counted once."""
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.device.type == "meta" or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
        return total

    def close(self) -> None:
        pass


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def load_transformers(spec: dict):
    torch = _torch(spec["threads"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    model.eval()
    return TorchCausalLM(model, torch)


def load_airllm(spec: dict, storage: Storage):
    """AirLLM's generic streaming model on CPU: a transformers model on ``meta`` whose decoder
    layers (and final norm) are read from per-layer safetensors files before they run and
    dropped after, the next layer prefetched on a worker thread; the tied embedding stays
    resident. Every layer read goes through ``storage``."""
    torch = _torch(spec["threads"])
    from airllm import AirLLMBaseModel

    air = AirLLMBaseModel(spec["hf_dir"], device="cpu", dtype=torch.float32,
                          layer_shards_saving_path=spec["airllm_dir"])
    read = air.load_layer_to_cpu

    def paced(layer_name):
        return storage.read(Path(air.checkpoint_path) / f"{layer_name}.safetensors", lambda: read(layer_name))

    air.load_layer_to_cpu = paced  # instance attribute: the hooks and the prefetch thread call this
    return TorchCausalLM(air.model, torch)


def load_accelerate(spec: dict, storage: Storage):
    """transformers + accelerate big-model inference on CPU: ``device_map="auto"`` under
    ``max_memory={"cpu": budget}``; what does not fit is offloaded to disk and read back, one
    tensor at a time, before each module runs. Every such read goes through ``storage``."""
    torch = _torch(spec["threads"])
    from accelerate.utils import offload
    from transformers import AutoModelForCausalLM

    read = offload.OffloadedWeightsLoader.__getitem__

    def paced(self, key):
        if key in self.state_dict:  # held in memory, not offloaded
            return read(self, key)
        info = self.index[key]
        path = info.get("safetensors_file") or os.path.join(self.save_folder, f"{key}.dat")
        return storage.read(path, lambda: read(self, key))

    offload.OffloadedWeightsLoader.__getitem__ = paced
    model = AutoModelForCausalLM.from_pretrained(
        spec["hf_dir"], dtype=torch.float32, device_map="auto",
        max_memory={"cpu": int(spec["memory_budget_bytes"])}, offload_folder=spec["offload_dir"])
    model.eval()
    return TorchCausalLM(model, torch)


def streamed_resident_bytes(backend: TorchCausalLM, storage: Storage, prompts) -> int:
    """Peak bytes of weights held while streaming, measured over one (untimed) prefill and
    decode step: at every read, the materialised parameters plus the tensor just read (which
    the streaming hook is about to place, or which a prefetch holds until its layer runs)."""
    peak = 0

    def probe(nbytes: int) -> None:
        nonlocal peak
        peak = max(peak, backend.materialised_bytes() + nbytes)

    storage.probe = probe
    try:
        state, toks = backend.prefill([p[:8] for p in prompts])
        backend.step(state, toks)
        backend.release(state)
    finally:
        storage.probe = None
    return max(peak, backend.materialised_bytes())


# --------------------------------------------------------------------------- tasks


def load_backend(spec: dict, storage: Storage):
    """(backend, resident weight bytes -- None where they must be measured while streaming --,
    extra facts) for ``spec["backend"]``."""
    name = spec["backend"]
    if name == "llama.cpp":
        prompts, windows = spec.get("prompts") or [], spec.get("windows") or []
        context = max([len(p) + spec.get("new_tokens", 0) for p in prompts] + [len(w) for w in windows])
        be = LlamaCpp(spec["gguf"], spec["threads"], batch=max(len(prompts), 1), context=context + 16)
        return be, be.weight_bytes, {}
    if name == "transformers":
        be = load_transformers(spec)
        return be, be.materialised_bytes(), {}
    if name == "airllm":
        return load_airllm(spec, storage), None, {}
    if name == "accelerate":
        be = load_accelerate(spec, storage)
        return be, None, {"device_map_values": sorted(set(getattr(be.model, "hf_device_map", {}).values()))}
    raise ValueError(f"unknown backend {name!r}")


def versions(backend: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = {"llama.cpp": ["llama_cpp_python"], "transformers": ["torch", "transformers"],
             "airllm": ["airllm", "torch", "transformers", "accelerate"],
             "accelerate": ["accelerate", "torch", "transformers"]}.get(backend, [])
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def task_speed(spec: dict) -> dict:
    storage = Storage.from_spec(spec.get("storage"))
    t0 = time.perf_counter()
    backend, resident, facts = load_backend(spec, storage)
    load_s = time.perf_counter() - t0
    peak_at_load = peak_rss_bytes()
    reset = reset_peak_rss()  # from here VmHWM is the peak of the run alone
    if resident is None:
        resident = streamed_resident_bytes(backend, storage, spec["prompts"])
    before = storage.stats()
    res = measure_speed(backend, spec["prompts"], spec["new_tokens"], spec["repeats"])
    after = storage.stats()
    backend.close()
    peak_run = peak_rss_bytes()
    res.update(load_s=round(load_s, 4), resident_weight_bytes=resident,
               peak_rss_bytes=max(peak_at_load, peak_run),  # the whole process, loading included
               peak_rss_load_bytes=peak_at_load, peak_rss_run_bytes=peak_run if reset else None,
               storage_reads={k: after[k] - before[k] for k in after}, versions=versions(spec["backend"]), **facts)
    return res


def task_perplexity(spec: dict) -> dict:
    backend, _, _ = load_backend(spec, Storage())
    res = measure_perplexity(backend, spec["windows"])
    backend.close()
    return {**res, "versions": versions(spec["backend"]), "peak_rss_bytes": peak_rss_bytes()}


def task_export_hf(spec: dict) -> dict:
    """Write a Hugging Face directory for the GGUF with transformers' GGUF loader (weights
    dequantized to fp32). Written beside the target and renamed into place when complete."""
    import shutil

    torch = _torch(spec["threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(spec["gguf"]), Path(spec["hf_dir"])
    part = out.with_name(out.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer marks the model "not serializable", but what it holds is plain fp32 now.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(part)
    tok.save_pretrained(part)
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)
    return {"seconds": round(time.perf_counter() - t0, 3),
            "params": int(sum(p.numel() for p in model.parameters())), "versions": versions("transformers")}


def task_prepare_airllm(spec: dict) -> dict:
    """Let AirLLM split the model into its per-layer files once (it caches them)."""
    t0 = time.perf_counter()
    load_airllm(spec, Storage())
    return {"seconds": round(time.perf_counter() - t0, 3), "versions": versions("airllm")}


TASKS = {"speed": task_speed, "perplexity": task_perplexity, "export-hf": task_export_hf,
         "prepare-airllm": task_prepare_airllm}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    result = TASKS[spec["task"]](spec)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
