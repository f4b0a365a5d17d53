"""The Python API: ``Encoder`` (embed, classify) and ``Generator`` (generate). The CLI is a thin
layer over these."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from sti.errors import STIError
from sti.loaders import Checkpoint, load_checkpoint


def _notice(msg: str) -> None:
    print(f"sti: {msg}", file=sys.stderr)


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
        (longer texts are truncated to it). ``storage`` names the emulated storage profile to
        plan and run with (``emmc``, ``ufs``, ``<N>MBps``); ``cold`` evicts the store's pages
        from the page cache before every request."""
        from sti import plan as planner
        from sti.profile import load_profile, model_shape, parse_storage
        from sti.runtime import Schedule, StreamingEncoder
        from sti.store import Store
        from sti.units import parse_bytes, parse_latency

        st = Store.open(store)
        imp, dev, _ = load_profile(st.path, storage)
        shape = model_shape(st, chunk_shards=chunk_shards, input_tokens=seq_len)
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


class Generator:
    """A LLaMA-family decoder with a KV cache, sampling and chat templates."""

    def __init__(self, ckpt: Checkpoint):
        if ckpt.family != "llama":
            raise STIError(f"{ckpt.source} is a {ckpt.family} model, not a decoder",
                           "use a LLaMA-family model such as 'smollm2' for generate")
        from sti.models import llama

        self.ckpt, self.cfg = ckpt, ckpt.config
        w = ckpt.weights
        self.globals = {n: w[n] for n in llama.GLOBAL_NAMES if n in w}
        self.layers = [llama.layer_weights(w, i) for i in range(self.cfg.num_layers)]
        self.stop_ids = set(ckpt.special.get("stop_ids") or [])

    @classmethod
    def load(cls, model: str = "smollm2", progress: bool = True) -> "Generator":
        return cls(load_checkpoint(model, progress=progress))

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        from sti.generation import render_chat

        _check_texts([prompt])
        text = render_chat(self.ckpt.chat_template, prompt, system) if chat else prompt
        ids = self.ckpt.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.ckpt.special.get("bos_id")
        if self.ckpt.special.get("add_bos") and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def new_cache(self, tokens: int, batch: int = 1):
        from sti.models import llama

        return llama.KVCache(self.cfg, batch, min(tokens, self.cfg.max_position))

    def logits(self, ids: np.ndarray, cache=None, all_logits: bool = False) -> np.ndarray:
        """Run ids (B, T) after what the cache holds; a fresh cache if none is given."""
        from sti.models import llama

        cache = cache if cache is not None else self.new_cache(ids.shape[1], ids.shape[0])
        return llama.forward(self.cfg, self.globals, self.layers, ids, cache, all_logits)

    def stream(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, chat: bool = False,
               strict_context: bool = True) -> Iterator[int]:
        """Yield generated token ids as they are produced (prompt tokens excluded)."""
        from sti.generation import SamplingConfig, generate_ids

        ids = prompt if isinstance(prompt, list) else self.encode_prompt(prompt, chat)
        limit = self.cfg.max_position
        if len(ids) >= limit:
            raise STIError(f"prompt has {len(ids)} tokens; the model's context holds {limit}",
                           f"shorten the prompt below {limit} tokens")
        budget = min(max_tokens, limit - len(ids))
        cache = self.new_cache(len(ids) + budget)
        step = lambda x, _prompt: self.logits(x, cache)  # noqa: E731
        n = 0
        for tok in generate_ids(step, ids, budget, self.stop_ids, SamplingConfig(temperature, top_p, seed)):
            n += 1
            yield tok
        if n == budget and budget < max_tokens:
            _notice(f"context of {limit} tokens is full; stopped after {n} tokens")

    def generate(self, prompt: str | list[int], max_tokens: int = 128, **kw) -> GenerationResult:
        toks = list(self.stream(prompt, max_tokens, **kw))
        return GenerationResult(toks, self.decode(toks), "max_tokens" if len(toks) == max_tokens else "eos")

    def decode(self, tokens: list[int]) -> str:
        return self.ckpt.tokenizer.decode(tokens, skip_special_tokens=True)

    def perplexity(self, text: str, window: int = 512) -> float:
        """exp(mean NLL) of the text's tokens, in non-overlapping windows of ``window`` tokens."""
        ids = self.ckpt.tokenizer.encode(text, add_special_tokens=False).ids
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
