"""``sti demo`` on a tiny model: the cache (where it lives, reuse, re-pack of an old format) and
what the report names. Profiling and the BBC articles are swapped for fast stand-ins; the
store, the plan, the streaming engine and the whole-model reference are the real ones."""

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import sti.demo as demo
import sti.profile
import sti.store
from sti.errors import STIError
from sti.plan import DeviceProfile, Importance
from sti.profile import model_shape, save_profile
from sti.store import Store

LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def synthetic_profile(store_path, n_calib, progress=True, **kw):
    """Stands in for run_profile (the bbc-news task needs MiniLM's 384-dim head): a synthetic
    importance and device, saved the way run_profile saves them."""
    with Store.open(store_path) as st:
        shape = model_shape(st)
    dev = DeviceProfile(io_bandwidth=1e9, io_latency=1e-5, c0=1e-4, c1=1e-6,
                        dequant_per_byte={b: 1e-9 for b in shape.bits}, label="synthetic")
    return save_profile(store_path, Importance.synthetic(shape, seed=1), dev,
                        {"importance_key": {"task": "synthetic", "n_calib": n_calib}})


@pytest.fixture
def tiny_demo(tiny_bert, tmp_path, monkeypatch):
    """(settings that run the demo on the tiny BERT with a random 5-topic head, counts of the
    packs and profiles it made)."""
    hf_dir, w, _ = tiny_bert
    rng = np.random.default_rng(0)
    head = tmp_path / "tiny-head.npz"
    np.savez(head, W=rng.standard_normal((5, w["embed.ln_w"].shape[0])).astype(np.float32),
             b=np.zeros(5, np.float32), labels=np.array(LABELS))
    made = Counter()
    real_pack = sti.store.pack

    def pack(*a, **kw):
        made["pack"] += 1
        return real_pack(*a, **kw, progress=False)

    def profile(*a, **kw):
        made["profile"] += 1
        return synthetic_profile(*a, **kw)

    monkeypatch.setattr(sti.store, "pack", pack)
    monkeypatch.setattr(sti.profile, "run_profile", profile)
    articles = ["the cat sat on the mat"] * 3 + ["a big red dog"] * 2
    monkeypatch.setattr(demo, "held_out_articles", lambda limit: (articles, LABELS))
    settings = demo.DemoSettings(latency="1s", memory="1MB", cache=tmp_path / "cache", limit=5, chat=False,
                                 model=str(hf_dir), head=str(head), seq_len=16)
    return settings, made


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_dir({}) == tmp_path / "home" / ".cache" / "sti"
    assert demo.cache_dir({"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/sti")
    # the XDG spec: a relative XDG_CACHE_HOME is invalid and ignored
    assert demo.cache_dir({"XDG_CACHE_HOME": "relative/xdg"}) == tmp_path / "home" / ".cache" / "sti"
    assert demo.cache_dir({"XDG_CACHE_HOME": "/xdg", "STI_CACHE": "/mine"}) == Path("/mine")
    assert demo.cache_dir({"STI_CACHE": "", "XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/sti")


def test_first_run_packs_and_profiles_then_the_second_reuses_the_cache(tiny_demo, capsys):
    s, made = tiny_demo
    assert demo.run_demo(s) == 0
    first = capsys.readouterr().out
    store = Path(s.cache) / demo.STORE_NAME
    assert made == {"pack": 1, "profile": 1}
    assert "first run: packing" in first and "minilm.sti packed" in first and str(s.cache) in first
    assert "profile.json profiled" in first and "on 16 calibration texts" in first
    assert f"a quick profile: sti profile {store} measures on 48 texts" in first
    manifest = (store / "manifest.json").read_bytes()

    assert demo.run_demo(s) == 0
    second = capsys.readouterr().out
    assert made == {"pack": 1, "profile": 1}  # nothing re-made
    assert "minilm.sti cached" in second and "profile.json cached" in second
    assert (store / "manifest.json").read_bytes() == manifest
    assert "next run" in second


def test_report_names_plan_latency_memory_and_accuracy(tiny_demo, capsys):
    s, _ = tiny_demo
    demo.run_demo(s)
    out = capsys.readouterr().out
    assert "== plan" in out and "predicted latency" in out and "preload" in out
    for layer in range(2):
        assert f"\n  {layer:<7}" in out  # one row per layer
    assert "latency / target" in out and "peak weights / budget" in out
    assert out.count("/ 1000.0 ms") == len(demo.HEADLINES)  # every headline against the 1 s target
    assert "1.00 MB" in out  # the given memory budget
    assert "== accuracy" in out and "whole model in memory" in out and "elastic engine" in out
    assert "deadline met" in out and "agrees with the whole model" in out
    assert "given (--latency)" in out and "given (--memory)" in out


def test_a_store_of_another_format_version_is_repacked(tiny_demo, capsys):
    s, made = tiny_demo
    demo.run_demo(s)
    capsys.readouterr()
    manifest = Path(s.cache) / demo.STORE_NAME / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["format_version"] = sti.store.FORMAT_VERSION + 1
    manifest.write_text(json.dumps(doc))

    demo.run_demo(s)
    out = capsys.readouterr().out
    assert made["pack"] == 2
    assert f"store format version {sti.store.FORMAT_VERSION + 1}" in out and "re-packing" in out
    assert "minilm.sti re-packed" in out
    assert "profile.json profiled" in out and made["profile"] == 2  # the profile went with the old store
    Store.open(manifest.parent).close()


def test_a_stale_profile_is_made_again_saying_why(tiny_demo, capsys):
    s, made = tiny_demo
    demo.run_demo(s)
    profile = Path(s.cache) / demo.STORE_NAME / "profile.json"
    doc = json.loads(profile.read_text())
    doc["store_fingerprint"] = "0" * 16
    profile.write_text(json.dumps(doc))
    capsys.readouterr()

    demo.run_demo(s)
    out = capsys.readouterr().out
    assert made == {"pack": 1, "profile": 2}
    assert "the cached profile cannot be used" in out and "stale" in out


def test_default_budget_is_measured_and_derived_from_the_store(tiny_bert):
    _, _, store = tiny_bert
    fp32 = demo.fp32_model_bytes(store)
    with Store.open(store) as st:
        s = st.summary()
    assert fp32 == s["bytes_per_version"]["fp32"] + s["globals_bytes"] + s["embedding_bytes"]
    b = demo.choose_budget(demo.DemoSettings(), fp32, full_latency=0.0125)
    assert b.memory == int(demo.MEMORY_FRACTION * fp32)
    assert b.latency == pytest.approx(demo.LATENCY_FACTOR * 0.0125)
    assert "12.5 ms" in b.latency_why and "measured" in b.latency_why
    b = demo.choose_budget(demo.DemoSettings(latency="30ms", memory="4.5MB"), fp32, full_latency=0.0125)
    assert (b.latency, b.memory) == (pytest.approx(0.030), 4_500_000)


def test_an_infeasible_default_budget_moves_to_the_nearest_feasible_one(tiny_demo, capsys):
    s, _ = tiny_demo
    s = replace(s, latency=None, memory=None)  # 5% of a tiny model fits nothing
    assert demo.run_demo(s) == 0
    assert "the smallest memory that does is the budget" in capsys.readouterr().out


def test_bad_settings_are_clear_errors(tiny_demo, tmp_path):
    s, _ = tiny_demo
    with pytest.raises(STIError, match="limit"):
        demo.run_demo(replace(s, limit=0))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(STIError, match="cache directory"):
        demo.run_demo(replace(s, cache=blocker / "cache"))
    with pytest.raises(STIError, match="smallest"):  # a budget the user gave is never moved
        demo.run_demo(replace(s, memory="1000"))


def test_cli_options_reach_the_demo(monkeypatch, tmp_path, capsys):
    from sti.cli import main

    got = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: got.append(settings) or 0)
    assert main(["demo", "--latency", "30ms", "--memory", "4.5MB", "--cache", str(tmp_path), "--limit", "50",
                 "--calib", "8", "--no-chat"]) == 0
    assert got == [demo.DemoSettings(latency="30ms", memory="4.5MB", cache=str(tmp_path), limit=50, chat=False,
                                     n_calib=8)]
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = capsys.readouterr().out
    for words in ("--latency", "--memory", "--cache", "STI_CACHE", "XDG_CACHE_HOME", "re-packed", "deadline"):
        assert words in help_text


def test_real_demo_from_the_cache(capsys):
    """The real demo on MiniLM, given the cache a first ``sti demo`` made: it never packs or
    profiles here (a few minutes), it skips instead."""
    from conftest import builtin_or_skip
    from sti.profile import load_profile

    builtin_or_skip("minilm")
    store = demo.cache_dir() / demo.STORE_NAME
    try:
        Store.open(store).close()
        load_profile(store)
    except STIError as exc:
        pytest.skip(f"no usable cached demo store ({exc.problem}); run `sti demo` once to make it")
    assert demo.run_demo(demo.DemoSettings(limit=20, chat=False)) == 0
    out = capsys.readouterr().out
    assert "minilm.sti cached" in out and "profile.json cached" in out
    assert "== plan" in out and "latency / target" in out and "== accuracy on 20" in out
