"""Token generation on a decoder: sampling, the prefill/decode loop, stop conditions, chat prompts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / cfg.temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.empty(len(p), dtype=np.int64)
    for b, row in enumerate(p):
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(row[order])
        keep = order[: int(np.searchsorted(cum, cfg.top_p)) + 1]  # smallest set with mass >= top_p
        q = row[keep] / row[keep].sum()
        out[b] = keep[rng.choice(len(keep), p=q)]
    return out


def render_chat(template: str | None, user_text: str, system: str | None = None) -> str:
    """A single-turn chat prompt through the model's own Jinja chat template."""
    if not template:
        from sti.errors import STIError

        raise STIError("this model has no chat template", "drop --chat and write the prompt in the model's own format")
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="", eos_token="")


def generate_ids(step: Callable[[np.ndarray, bool], np.ndarray], prompt_ids: list[int], max_tokens: int,
                 stop_ids: set[int], sampling: SamplingConfig) -> Iterator[int]:
    """Yield generated token ids. ``step(ids (1, T), is_prompt) -> logits (1, V)`` runs the model."""
    rng = np.random.default_rng(sampling.seed)
    logits = step(np.asarray([prompt_ids], dtype=np.int64), True)
    for n in range(max_tokens):
        tok = int(sample(logits, sampling, rng)[0])
        if tok in stop_ids:
            return
        yield tok
        if n + 1 < max_tokens:
            logits = step(np.asarray([[tok]], dtype=np.int64), False)
