"""SmolLM2 (the packaged GGUF) against transformers loading the same GGUF, in float32."""

import numpy as np
import pytest

from conftest import builtin_or_skip

pytestmark = pytest.mark.reference

PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
]
# Written for this test: a fixed text for perplexity.
TEXT = ("The harbour town woke slowly. Fishing boats came in with the tide, and the market "
        "stalls opened one by one as the sun climbed over the hills. By nine o'clock the square "
        "was full of people buying bread, fruit and the morning's catch, while children ran "
        "between the stalls and the church bell rang the hour. In the afternoon the wind turned, "
        "the sky grew dark, and the first drops of rain sent everyone back to their houses.")


@pytest.fixture(scope="module")
def models():
    torch = pytest.importorskip("torch", reason="reference test needs torch (make test installs it)")
    transformers = pytest.importorskip("transformers")
    path = builtin_or_skip("smollm2")
    from sti.api import Generator

    torch.set_num_threads(2)
    ours = Generator.load("smollm2", progress=False, kv="fp32")  # float32 attention, as the reference
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return ours, ref, torch


def test_logits_match(models):
    ours, ref, torch = models
    for p in PROMPTS:
        ids = np.asarray([ours.encode_prompt(p)])
        a = ours.logits(ids, all_logits=True)
        with torch.no_grad():
            b = ref(torch.from_numpy(ids)).logits.numpy()
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max(), p


def test_greedy_continuations_identical(models):
    ours, ref, torch = models
    for p in PROMPTS:
        ids = ours.encode_prompt(p)
        mine = list(ours.stream(ids, max_tokens=24, temperature=0))
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                               eos_token_id=sorted(ours.stop_ids), pad_token_id=0)
        theirs = out[0, len(ids):].tolist()
        assert theirs[: len(mine)] == mine, p
        if len(mine) < 24:  # we stopped at an end token: so must they
            assert theirs[len(mine)] in ours.stop_ids, p


def test_perplexity_within_half_percent(models):
    ours, ref, torch = models
    ppl = ours.perplexity(TEXT)
    ids = ours.ckpt.tokenizer.encode(TEXT, add_special_tokens=False).ids
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    ref_ppl = float(torch.exp(nll))
    assert abs(ppl - ref_ppl) / ref_ppl < 0.005, (ppl, ref_ppl)
    assert 1 < ppl < 100


def test_fp16_kv_cache_keeps_perplexity_and_greedy_output(models):
    """The default fp16 KV cache (half the memory) against the fp32 one: same perplexity to
    0.1% and the same greedy continuations."""
    from sti.api import Generator

    ours = models[0]
    half = Generator(ours.ckpt, kv="fp16")
    assert abs(half.perplexity(TEXT) - ours.perplexity(TEXT)) / ours.perplexity(TEXT) < 1e-3
    for p in PROMPTS:
        ids = ours.encode_prompt(p)
        assert list(half.stream(ids, max_tokens=24)) == list(ours.stream(ids, max_tokens=24)), p
