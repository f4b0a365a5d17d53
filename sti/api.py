"""The Python API: ``Encoder`` (embed, classify) and ``Generator`` (generate). The CLI is a thin
layer over these."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from sti import blas
from sti.errors import STIError
from sti.loaders import Checkpoint, load_checkpoint


def _notice(msg: str) -> None:
    print(f"sti: {msg}", file=sys.stderr)


KERNELS_FILE = "kernels.json"  # in the user cache (sti.demo.cache_dir): kernel choices of this machine


_PROFILES: dict = {}  # cache path -> the KernelProfile every engine of this process shares


def _kernel_profile():
    """This machine's measured kernel choices, from the user cache (empty the first time), one
    object per cache for the whole process: two engines on one model (resident and streamed) then
    multiply every shape with the same kernel even when it was measured after the file was read."""
    from sti.demo import cache_dir
    from sti.lowbit import machine_profile

    path = cache_dir() / KERNELS_FILE
    prof = _PROFILES.get(path)
    if prof is None:
        prof = _PROFILES[path] = machine_profile(path)
        prof.saved = prof.changes
    return prof


def _save_kernel_profile(prof) -> None:
    if prof is None or prof.changes == getattr(prof, "saved", 0):
        return
    from sti.demo import cache_dir

    try:
        prof.save(cache_dir() / KERNELS_FILE)
        prof.saved = prof.changes
    except OSError:  # a read-only cache only costs the measurement next time
        pass


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise STIError("no input text", "pass at least one non-empty text")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise STIError(f"input text #{i + 1} is empty", "pass non-empty text")
    return texts


class Encoder:
    """A BERT-family encoder with the all-MiniLM pooling recipe and optional linear heads."""

    def __init__(self, ckpt: Checkpoint, strict: bool = False):
        if ckpt.family != "bert":
            raise STIError(f"{ckpt.source} is a {ckpt.family} model, not an encoder",
                           "use an encoder (BERT family) such as 'minilm' for embed/classify")
        from sti.models import bert

        self.ckpt, self.cfg, self.strict = ckpt, ckpt.config, strict
        self.tokenizer = ckpt.tokenizer
        w = ckpt.weights
        self.globals = {n: w[n] for n in bert.GLOBAL_NAMES}
        self.layers = [bert.layer_weights(w, i) for i in range(self.cfg.num_layers)]
        self.engine = self.plan = self.last_trace = None
        self.traces = []
        self.max_tokens = self.cfg.max_position

    @classmethod
    def load(cls, model: str = "minilm", strict: bool = False) -> "Encoder":
        return cls(load_checkpoint(model), strict=strict)

    @classmethod
    def from_store(cls, store, latency: str | float, memory: str | int, seq_len: int = 128,
                   method: str = "heuristic", storage: str | None = None, cold: bool = False,
                   strict: bool = False, chunk_shards: int = 4) -> "Encoder":
        """An encoder that streams a shard store under a plan for ``latency`` (e.g. "40ms") and
        ``memory`` (e.g. "2MB", resident weight bytes) at inputs of up to ``seq_len`` tokens
        (longer texts are truncated to it). ``storage`` names the storage profile to plan and run
        with: emulated (``emmc``, ``ufs``, ``<N>MBps``) or ``warm`` (the store kept in the page
        cache, as a server keeps it; made by ``sti profile STORE --storage warm``); ``cold`` evicts
        the store's pages from the page cache before every request."""
        from sti import plan as planner
        from sti.profile import load_profile, model_shape, parse_storage
        from sti.runtime import Schedule, StreamingEncoder
        from sti.store import Store
        from sti.units import parse_bytes, parse_latency

        st = Store.open(store)
        imp, dev, _ = load_profile(st.path, storage)
        shape = model_shape(st, chunk_shards=chunk_shards, input_tokens=seq_len, int8_max_tokens=dev.int8_max_tokens)
        p = planner.plan(shape, imp, dev, parse_latency(latency), parse_bytes(memory), seq_len, method=method)
        self = cls.__new__(cls)
        self.ckpt, self.cfg, self.strict = None, st.config, strict
        self.tokenizer = st.tokenizer()
        self.globals = self.layers = None
        self.plan = p
        self.engine = StreamingEncoder(st, Schedule.from_plan(p, chunk_shards), cold=cold,
                                       throttle=parse_storage(storage), max_tokens=seq_len)
        self.last_trace = None
        self.traces = []  # one per request since the last embed/classify call
        self.max_tokens = seq_len
        return self

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> ids, mask (B, T), truncated to the model's positions (an error if strict)."""
        texts = _check_texts(texts)
        encs = self.tokenizer.encode_batch(texts)
        limit = self.max_tokens
        rows = []
        for i, e in enumerate(encs):
            ids = e.ids
            if len(ids) > limit:
                if self.strict:
                    raise STIError(f"text #{i + 1} has {len(ids)} tokens; the model takes at most {limit}",
                                   "shorten the text, or drop --strict to truncate it")
                _notice(f"text #{i + 1} has {len(ids)} tokens; truncated to {limit}")
                ids = ids[: limit - 1] + ids[-1:]  # keep the closing [SEP]
            rows.append(ids)
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), self.cfg.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Last hidden states (B, T, H); through the streaming engine for a store-backed encoder
        (its trace is kept in ``last_trace``)."""
        from sti.models import bert

        if self.engine is not None:
            h, self.last_trace = self.engine.run(ids, mask)
            self.traces.append(self.last_trace)
            return h
        return bert.encode(self.cfg, self.globals, self.layers, ids, mask)

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Texts -> L2-normalised mean-pooled embeddings (N, H)."""
        from sti.models import bert

        texts = _check_texts(texts)
        self.traces = []
        if self.engine is not None:
            batch_size = 1  # one request per text: the plan is for one input of up to seq_len tokens
        # Batch texts of similar length together: padding costs compute.
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.cfg.hidden_size), np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="embedding", unit="batch", file=sys.stderr)
        for s in starts:
            idx = order[s : s + batch_size]
            ids, mask = self.tokenize([texts[i] for i in idx])
            out[idx] = bert.mean_pool(self.hidden_states(ids, mask), mask)
        return out

    def classify(self, texts: Sequence[str], head: str = "bbc-news") -> tuple[list[str], np.ndarray]:
        """Texts -> (label per text, class probabilities (N, C)) with a linear head on the embeddings."""
        from sti.heads import load_head

        h = load_head(head)
        return h.predict(self.embed(texts))


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    stopped: str  # "max_tokens" (the limit was reached) | "eos" (an end token, or the context filled)


def prompt_ids(tokenizer, chat_template: str | None, special: dict, prompt: str, chat: bool = False,
               system: str | None = None) -> list[int]:
    """A prompt's token ids as a generator runs them: wrapped in the chat template when ``chat``,
    BOS first where the model adds one."""
    from sti.generation import render_chat

    _check_texts([prompt])
    text = render_chat(chat_template, prompt, system) if chat else prompt
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    bos = special.get("bos_id")
    if special.get("add_bos") and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


class Generator:
    """A LLaMA-family decoder with a KV cache, sampling and chat templates: in memory
    (:meth:`load`; a GGUF file's blocks stay packed) or streamed from a shard store under a
    memory budget (:meth:`from_store`)."""

    def __init__(self, ckpt: Checkpoint, kv: str = "fp16"):
        if ckpt.family != "llama":
            raise STIError(f"{ckpt.source} is a {ckpt.family} model, not a decoder",
                           "use a LLaMA-family model such as 'smollm2' for generate")
        from sti.linops import Packed
        from sti.models import llama

        self.ckpt, self.cfg, self.tokenizer, self.source = ckpt, ckpt.config, ckpt.tokenizer, ckpt.source
        self.chat_template, self.special = ckpt.chat_template, dict(ckpt.special)
        self.kv = kv
        llama.kv_bytes_per_token(self.cfg, kv)  # validates kv
        # packed matrices run through the fused low-bit kernels, chosen per shape by measurement
        self.kernels = _kernel_profile()
        w = {n: t if isinstance(t, np.ndarray) else Packed(t, self.kernels) for n, t in ckpt.weights.items()}
        self.globals = {n: w[n] for n in llama.GLOBAL_NAMES if n in w}
        self.layers = [self._fuse(llama.layer_weights(w, i)) for i in range(self.cfg.num_layers)]
        self._measure_decode_kernels()
        # packed layers multiply on threads of STI's own (fused kernels, sti.blas.matmul_t); BLAS
        # then stays on one thread so that none of its threads spins on their cores after prefill.
        # Float32 layers are multiplied by BLAS itself, on its threads.
        self._own_threads = not any(isinstance(v, np.ndarray) and v.ndim == 2
                                    for layer in self.layers for v in layer.values())
        self.weight_bytes = sum(getattr(t, "nbytes", 0) for t in ckpt.weights.values())
        self.engine = None
        self.stop_ids = set(self.special.get("stop_ids") or [])

    def _measure_decode_kernels(self) -> None:
        """Choose the one-token kernel of every packed shape now, before anything runs: measured
        later, mid-request, the timings would share the CPU with threads that the prompt's
        matrix products (BLAS) and tokenizer leave spinning, and two threads would look no
        faster than one. Cached per machine, so this costs ~1 s once."""
        from sti.linops import Packed

        seen = set()
        for op in [*self.globals.values(), *(v for layer in self.layers for v in layer.values())]:
            if isinstance(op, Packed) and (op.t.kind, op.shape) not in seen:
                seen.add((op.t.kind, op.shape))
                op._kernel(1)
        _save_kernel_profile(self.kernels)

    @staticmethod
    def _fuse(layer: dict) -> dict:
        """Stack packed q/k/v and gate/up matrices (``llama.FUSED``): fewer, longer kernel calls."""
        from sti.linops import Packed, stack_rows
        from sti.models import llama

        for fused, names in llama.FUSED.items():
            if all(isinstance(layer[n], Packed) for n in names):
                t = stack_rows([layer[n].t for n in names])
                if t is not None:
                    prof = layer[names[0]].profile
                    layer = {k: v for k, v in layer.items() if k not in names}
                    layer[fused] = Packed(t, prof)
        return layer

    @classmethod
    def load(cls, model: str = "smollm2", progress: bool = True, packed: bool = True, kv: str = "fp16") -> "Generator":
        """``packed``: keep a GGUF file's Q4_1/Q8_0 matrices packed and multiply with the fused
        low-bit kernels (the default: ~5x less memory, faster decode); else dequantize to float32.
        ``kv``: the KV cache's element type, "fp16" (half the memory, as llama.cpp) or "fp32"
        (bit-for-bit the float32 attention of a float32 reference)."""
        return cls(load_checkpoint(model, progress=progress, packed=packed), kv=kv)

    @classmethod
    def from_store(cls, store, memory: str | int = 0, bits: int | str | None = None, batch: int = 1,
                   context: int | None = None, storage: str | None = None, preload: bool = True,
                   token_latency: str | float | None = None, io: str = "auto", kv: str = "fp16",
                   min_context: int = 2) -> "Generator":
        """A decoder streaming the shard store ``store`` (a path or an open ``Store``) under
        ``memory`` bytes (e.g. "16MB"; 0: unbounded) for requests of up to ``batch`` sequences x
        ``context`` tokens (prompt and generated; default: what the budget allows, and at least
        ``min_context`` before the budget buys a second layer of read buffers, when it can).
        The plan (``sti.plan_decoder``) runs every
        shard at its lossless version, or at ``bits``, or at the bitwidths that meet
        ``token_latency`` per decode step; the rest of the budget preloads shards.
        ``storage`` emulates slower storage (``emmc``, ``<N>MBps``). ``io``: how streamed shards
        are fetched ("mmap": zero-copy, "read": pread; default: mmap where supported). ``kv``: the
        KV cache's element type ("fp16" or "fp32"), counted in the budget."""
        from sti.decoder_runtime import StreamingDecoder
        from sti.plan_decoder import plan_decoder
        from sti.profile import parse_storage
        from sti.store import Store
        from sti.units import parse_bytes, parse_latency

        st = store if isinstance(store, Store) else Store.open(store)
        if st.family != "llama":
            raise STIError(f"{st.path} holds a {st.family} model, not a decoder", "pack a LLaMA-family model")
        budget = parse_bytes(memory) if memory else 0
        target = parse_latency(token_latency) if token_latency else None
        self = cls.__new__(cls)
        self.ckpt, self.cfg, self.tokenizer, self.source = None, st.config, st.tokenizer(), str(st.path)
        self.chat_template, self.special = st.chat_template, st.special
        self.globals = self.layers = None
        self.plan = plan_decoder(st, budget, bits=bits, batch=batch, context=context, preload=preload,
                                 token_latency=target, storage=storage, kv=kv, min_context=min_context)
        self.kv = kv
        self.kernels = _kernel_profile()
        self.engine = StreamingDecoder(st, self.plan.schedule, throttle=parse_storage(storage), batch=batch,
                                       context=self.plan.context, slots=self.plan.slots, kernel_profile=self.kernels,
                                       io=io, kv=kv)
        self.weight_bytes = self.engine.weight_bytes
        self.stop_ids = set(self.special.get("stop_ids") or [])
        return self

    def close(self) -> None:
        """Stop the streaming engine's IO worker (a later call restarts it), and keep kernel
        timings measured during this run for the next one."""
        if self.engine is not None:
            self.engine.stop()
        _save_kernel_profile(getattr(self, "kernels", None))

    @property
    def context(self) -> int:
        """Tokens (prompt + generated) one request may hold."""
        return self.engine.context if self.engine is not None else self.cfg.max_position

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        return prompt_ids(self.tokenizer, self.chat_template, self.special, prompt, chat, system)

    def new_cache(self, tokens: int, batch: int = 1):
        from sti.models import llama

        if self.engine is not None:
            return self.engine.new_cache(batch, tokens)
        return llama.KVCache(self.cfg, batch, min(tokens, self.cfg.max_position), dtype=self.kv)

    def free_cache(self, cache) -> None:
        if self.engine is not None:
            self.engine.free_cache(cache)

    def logits(self, ids: np.ndarray, cache=None, all_logits: bool = False) -> np.ndarray:
        """Run ids (B, T) after what the cache holds; a fresh cache if none is given."""
        from sti.models import llama

        own = cache is None
        cache = self.new_cache(ids.shape[1], ids.shape[0]) if own else cache
        try:
            if self.engine is not None:
                return self.engine.forward(ids, cache, all_logits)
            with blas.limited(1) if self._own_threads else contextlib.nullcontext():
                return llama.forward(self.cfg, self.globals, self.layers, ids, cache, all_logits)
        finally:
            if own:
                self.free_cache(cache)

    def _budget(self, prompt_len: int, max_tokens: int) -> int:
        limit = self.context
        if prompt_len >= limit:
            where = "the model's context" if self.engine is None else "the context this memory budget allows"
            raise STIError(f"prompt has {prompt_len} tokens; {where} holds {limit}",
                           f"shorten the prompt below {limit} tokens" +
                           ("" if self.engine is None else " or raise --memory"))
        return min(max_tokens, limit - prompt_len)

    def stream(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, chat: bool = False) -> Iterator[int]:
        """Yield generated token ids as they are produced (prompt tokens excluded)."""
        for toks in self.stream_batch([prompt], max_tokens, temperature, top_p, seed, chat):
            yield toks[0]

    def stream_batch(self, prompts: Sequence[str | list[int]], max_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, chat: bool = False) -> Iterator[list[int | None]]:
        """Generate for several prompts together: every step runs the batch through one pass
        over the weights (a streamed layer is read once for all of them). Prompts are left-padded
        to the longest. Yields per step one token per prompt (None once a prompt has stopped)."""
        from sti.generation import SamplingConfig, sample

        if not prompts:
            raise STIError("no prompt", "pass at least one prompt")
        ids = [p if isinstance(p, list) else self.encode_prompt(p, chat) for p in prompts]
        B, T = len(ids), max(len(p) for p in ids)
        budget = self._budget(T, max_tokens)
        cache = self.new_cache(T + budget, B)
        try:
            pad = np.array([T - len(p) for p in ids])
            cache.pad = pad if pad.any() else None
            pad_id = self.special.get("eos_id") or 0
            x = np.array([[pad_id] * (T - len(p)) + p for p in ids], dtype=np.int64)
            rng = np.random.default_rng(seed)
            cfg = SamplingConfig(temperature, top_p, seed)
            done = np.zeros(B, bool)
            logits = self.logits(x, cache)
            n = 0
            while True:
                toks = sample(logits, cfg, rng)
                done |= np.isin(toks, list(self.stop_ids))
                if done.all():
                    return
                yield [None if d else int(t) for t, d in zip(toks, done)]
                n += 1
                if n == budget:
                    break
                logits = self.logits(toks[:, None].astype(np.int64), cache)
            if budget < max_tokens:
                _notice(f"context of {self.context} tokens is full; stopped after {n} tokens")
        finally:
            self.free_cache(cache)
            _save_kernel_profile(getattr(self, "kernels", None))

    def generate(self, prompt: str | list[int], max_tokens: int = 128, **kw) -> GenerationResult:
        toks = list(self.stream(prompt, max_tokens, **kw))
        return GenerationResult(toks, self.decode(toks), "max_tokens" if len(toks) == max_tokens else "eos")

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t is not None], skip_special_tokens=True)

    def perplexity(self, text: str, window: int = 512) -> float:
        """exp(mean NLL) of the text's tokens, in non-overlapping windows of ``window`` tokens."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        window = min(window, self.context - 1)
        nll, n = 0.0, 0
        for s in range(0, len(ids) - 1, window):
            chunk = np.asarray([ids[s : s + window + 1]], dtype=np.int64)
            if chunk.shape[1] < 2:
                break
            logits = self.logits(chunk[:, :-1], all_logits=True)[0].astype(np.float64)  # (T, V)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll += float((logz - logits[np.arange(len(logits)), chunk[0, 1:]]).sum())
            n += len(logits)
        return float(np.exp(nll / n))
