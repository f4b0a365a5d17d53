"""The peer side of ``sti bench decoder``: the row schema, the subprocess plumbing (with a fake
peer script), the child's measurement loop (with a fake backend), storage emulation and the
outputs. Peers that are not installed are skipped with the reason; no timing is asserted."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import builtin_or_skip

from sti.bench import _peer_child as child
from sti.bench import decoder_peers as dp
from sti.bench.decoder_peers import ROW_KEYS, Peer, PeerRun, Workload, row
from sti.errors import STIError

FAKE_CHILD = textwrap.dedent('''
    import json, sys
    spec = json.load(open(sys.argv[1]))
    print("a library's chatter on stdout")
    if spec["task"] == "speed":
        b = len(spec["prompts"])
        res = {"batch": b, "prompt_tokens": len(spec["prompts"][0]), "new_tokens": spec["new_tokens"],
               "prefill_tok_s": 100.0 * b, "decode_tok_s": 10.0 * b, "ttft_s": 0.5, "runs": [{}] * spec["repeats"],
               "resident_weight_bytes": 1000, "peak_rss_bytes": 5000 + b,
               "storage_reads": {"reads": 2, "bytes": 4e6 if spec["storage"]["cold"] else 0, "seconds": 0.1},
               "echo_storage": spec["storage"], "echo_threads": spec["threads"]}
    elif spec["task"] == "perplexity":
        res = {"perplexity": 12.5, "tokens_scored": sum(len(w) - 1 for w in spec["windows"])}
    else:
        res = {"task": spec["task"]}
    print(json.dumps(res))
''')

FAILING_CHILD = "import sys\nprint('the peer fell over', file=sys.stderr)\nsys.exit(3)\n"


def tiny_workload() -> Workload:
    return Workload(prompts=[[5, 6, 7, 8]] * dp.N_PROMPTS, windows=[[1, 2, 3, 4, 5]], new_tokens=3,
                    stream_new_tokens=2)


def peer_run(tmp_path, peer: Peer, storages=("memory",), batches=(1, 16)) -> PeerRun:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    modes = [dp.storage_mode(s) for s in storages if s != "memory"]
    return PeerRun(peer, gguf, tiny_workload(), storages=modes, batches=batches, repeats=2, cache=tmp_path / "cache",
                   timeout=60, progress=False)


def script(tmp_path, text: str):
    path = tmp_path / "peer_child.py"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- rows


def test_row_has_every_key_and_rejects_others():
    r = row("llama.cpp", "memory", 1, decode_tok_s=90.0)
    assert tuple(r) == ROW_KEYS
    assert r["decode_tok_s"] == 90.0 and r["perplexity"] is None and r["notes"] == ""
    with pytest.raises(KeyError):
        row("x", "memory", 1, tokens_per_second=1.0)


def test_every_peer_is_named_and_unique():
    assert len({p.name for p in dp.PEERS}) == len(dp.PEERS)
    assert {p.system for p in dp.PEERS} >= {"llama.cpp", "transformers fp32", "AirLLM", "accelerate disk offload"}
    assert [p.name for p in dp.peers_by_name("airllm,llama.cpp")] == ["airllm", "llama.cpp"]
    with pytest.raises(STIError, match="unknown peer 'vllm'"):
        dp.peers_by_name("vllm")
    scopes = [(p.name, st, b) for p, st, b in dp.peer_scopes("llama.cpp, airllm@real/1,accelerate@200MBps")]
    assert scopes == [("llama.cpp", None, None), ("airllm", ("real",), (1,)), ("accelerate", ("200MBps",), None)]
    assert [p.name for p, _, _ in dp.peer_scopes(None)] == [p.name for p in dp.PEERS]
    with pytest.raises(STIError, match="not a number"):
        dp.peer_scopes("airllm@real/one")
    with pytest.raises(STIError, match="unknown storage 'nvme'"):
        dp.peer_scopes("airllm@nvme/1")


def test_missing_peer_gives_skipped_rows_with_the_reason(tmp_path):
    peer = Peer("ghost", "ghost", "ghost", ("sti_no_such_module",), streams=True)
    rows = peer_run(tmp_path, peer, storages=("real", "emmc")).rows()
    assert [(r["storage"], r["batch"]) for r in rows] == [("real", 1), ("real", 16), ("emmc", 1), ("emmc", 16)]
    for r in rows:
        assert r["notes"].startswith("skipped: sti_no_such_module not installed")
        assert "bench" in r["notes"]  # says how to install
        assert r["decode_tok_s"] is None and r["peak_rss_bytes"] is None


@pytest.mark.parametrize("peer", dp.PEERS, ids=lambda p: p.name)
def test_installed_peers_or_the_reason_they_are_not(peer):
    missing = peer.missing()
    if missing:
        pytest.skip(f"{peer.system}: {', '.join(missing)} not installed ({dp.INSTALL})")
    assert peer.script.is_file()


def test_cache_folder_is_named_by_the_model_content(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    first = dp.model_cache(gguf, tmp_path / "cache")
    gguf.write_bytes(b"two")
    assert dp.model_cache(gguf, tmp_path / "cache") != first
    assert first.parent == tmp_path / "cache" / "bench" and first.name.startswith("m-")
    monkeypatch.setenv("STI_CACHE_DIR", str(tmp_path / "env"))
    assert dp.cache_dir() == tmp_path / "env" and dp.cache_dir(tmp_path / "arg") == tmp_path / "arg"


# --------------------------------------------------------------------------- subprocess plumbing


def test_fake_in_memory_peer_through_subprocesses(tmp_path):
    peer = Peer("fake", "fake system", "fake", (), script=script(tmp_path, FAKE_CHILD), note="a fake")
    run = peer_run(tmp_path, peer)
    rows = run.rows()
    assert [(r["system"], r["storage"], r["batch"]) for r in rows] == [("fake system", "memory", 1),
                                                                        ("fake system", "memory", 16)]
    one, sixteen = rows
    assert set(one) == set(ROW_KEYS)
    assert one["prefill_tok_s"] == 100.0 and sixteen["decode_tok_s"] == 160.0
    assert one["perplexity"] == sixteen["perplexity"] == 12.5
    assert one["peak_rss_bytes"] == 5001 and one["memory_budget_bytes"] is None
    assert one["notes"].startswith("a fake;") and "perplexity over 4 tokens" in one["notes"]
    tasks = [c["task"] for c in run.details["children"]]
    assert tasks == ["perplexity", "speed", "speed"]  # no Hugging Face export for a GGUF peer
    speed = run.details["children"][1]["result"]
    assert speed["echo_threads"] == dp.THREADS
    assert speed["_process"]["wall_s"] >= 0 and "contention" in speed["_process"]


def test_fake_streaming_peer_gets_a_row_per_storage_and_batch(tmp_path):
    peer = Peer("fake", "fake streamer", "fake", (), streams=True, budget_fraction=0.5,
                script=script(tmp_path, FAKE_CHILD))
    run = peer_run(tmp_path, peer, storages=("real", "emmc"), batches=(1,))
    rows = run.rows()
    assert [(r["storage"], r["batch"]) for r in rows] == [("real", 1), ("emmc", 1)]
    assert all(r["memory_budget_bytes"] == 502 for r in rows)  # half of the 1,004-byte file
    real, emmc = (c["result"]["echo_storage"] for c in run.details["children"] if c["task"] == "speed")
    assert real == {"cold": True, "bandwidth": None, "latency": 0.0}
    assert emmc["cold"] and emmc["bandwidth"] == 200e6 and emmc["latency"] > 0
    assert "emulated" in rows[1]["notes"] and "read 4 MB in 2 reads" in rows[1]["notes"]


def test_failing_peer_gives_failed_rows_with_its_error(tmp_path):
    peer = Peer("broken", "broken", "broken", (), script=script(tmp_path, FAILING_CHILD))
    rows = peer_run(tmp_path, peer).rows()
    assert len(rows) == 2
    for r in rows:
        assert r["notes"].startswith("failed:") and "status 3" in r["notes"] and "fell over" in r["notes"]


def test_child_that_prints_no_result_is_an_error(tmp_path):
    with pytest.raises(dp.PeerError, match="no JSON result"):
        dp.run_child({"task": "speed"}, script(tmp_path, "print('hello')\n"), timeout=60)


def test_child_timeout_is_an_error(tmp_path):
    with pytest.raises(dp.PeerError, match="timed out"):
        dp.run_child({"task": "speed"}, script(tmp_path, "import time\ntime.sleep(30)\n"), timeout=0.5)


def test_importing_the_harness_loads_no_peer_library():
    code = ("import sys, sti.bench.decoder_peers, sti.bench._peer_child; "
            "print([m for m in ('torch', 'transformers', 'accelerate', 'airllm', 'llama_cpp') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the child's measurement loop


class FakeBackend:
    """Next token = (last token + 1) mod vocab; uniform logits."""

    vocab = 50

    def __init__(self):
        self.calls = []

    def prefill(self, prompts):
        self.calls.append(("prefill", len(prompts)))
        return {"steps": 0}, [(p[-1] + 1) % self.vocab for p in prompts]

    def step(self, state, toks):
        state["steps"] += 1
        return [(t + 1) % self.vocab for t in toks]

    def release(self, state):
        self.calls.append(("release", state["steps"]))

    def nll(self, window):
        logits = np.zeros((len(window) - 1, self.vocab), np.float32)
        return child.nll_of_logits(logits, np.asarray(window[1:])), len(window) - 1


def test_measure_speed_counts_every_sequence_and_warms_up():
    be = FakeBackend()
    res = child.measure_speed(be, [[1, 2, 3], [7, 8, 9]], new_tokens=4, repeats=3)
    assert res["batch"] == 2 and res["prompt_tokens"] == 3 and res["decode_steps"] == 3
    assert len(res["runs"]) == 3 and res["tokens"] == [4, 5, 6, 7]
    assert be.calls == [("prefill", 2), ("release", 1)] + [("prefill", 2), ("release", 3)] * 3  # warm-up first
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["ttft_s"] > 0
    with pytest.raises(ValueError):
        child.measure_speed(be, [[1, 2], [1, 2, 3]], 4, 1)
    with pytest.raises(ValueError):
        child.measure_speed(be, [[1, 2]], 1, 1)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    res = child.measure_perplexity(FakeBackend(), [[1, 2, 3, 4], [5, 6, 7]])
    assert res["tokens_scored"] == 5 and res["perplexity"] == pytest.approx(FakeBackend.vocab)


def test_nll_of_logits_matches_log_softmax():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 11)).astype(np.float32) * 5
    t = rng.integers(0, 11, 6)
    ref = -sum(np.log(np.exp(z[i]) / np.exp(z[i]).sum())[t[i]] for i in range(6))
    assert child.nll_of_logits(z, t) == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------- storage


def test_storage_modes():
    real, warm, emmc = (dp.storage_mode(s) for s in ("real", "warm", "emmc"))
    assert real.key == "real" and real.cold and real.bandwidth is None
    assert warm.key == "warm" and not warm.cold
    assert emmc.key == "emmc" and emmc.cold and emmc.bandwidth == 200e6 and "emulated" in emmc.label
    assert dp.storage_mode("50MBps").bandwidth == 50e6


def test_storage_paces_reads_and_counts_them(tmp_path):
    f = tmp_path / "layer.bin"
    f.write_bytes(bytes(20_000))
    seen = []
    st = child.Storage(cold=True, bandwidth=1e6, latency=0.001)  # 20 kB at 1 MB/s: at least 21 ms
    st.probe = seen.append
    t0 = time.perf_counter()
    out = st.read(f, lambda: {"w": np.frombuffer(f.read_bytes(), np.uint8)})
    assert time.perf_counter() - t0 >= 0.021  # paced, never faster than the emulated device
    assert out["w"].nbytes == 20_000 and seen == [20_000]
    assert st.stats()["reads"] == 1 and st.stats()["bytes"] == 20_000
    assert child.Storage.from_spec(None).bandwidth is None


def test_peak_rss_is_measured():
    assert child.peak_rss_bytes() > 1_000_000


# --------------------------------------------------------------------------- workload and outputs


def bbc_or_skip():
    from sti.errors import STIError
    from sti.tasks import bbc

    try:
        return bbc.data_root()
    except STIError as e:
        pytest.skip(str(e))


def test_workload_is_fixed_and_held_out():
    gguf = builtin_or_skip("smollm2")
    bbc_or_skip()
    wl, again, quick = dp.build_workload(gguf), dp.build_workload(gguf), dp.build_workload(gguf, quick=True)
    assert wl.prompts == again.prompts and wl.windows == again.windows
    assert len(wl.prompts) == dp.N_PROMPTS and {len(p) for p in wl.prompts} == {dp.PROMPT_TOKENS}
    assert len(wl.windows) == dp.N_WINDOWS and {len(w) for w in wl.windows} == {dp.WINDOW_TOKENS + 1}
    assert quick.prompts == wl.prompts and quick.windows == wl.windows[:1]  # --quick scores a subset
    d = wl.describe()
    assert not set(d["prompt_articles"]) & set(d["window_articles"])
    from sti.tasks import bbc

    arts, split = bbc.load_split()
    test_files = {arts.files[i] for i in split["test"]}
    assert set(d["prompt_articles"]) | set(d["window_articles"]) <= test_files


def test_outputs_markdown_and_json(tmp_path):
    rows = [row("llama.cpp", "memory", 1, resident_weight_bytes=96_576_768, peak_rss_bytes=170_000_000,
                prefill_tok_s=800.0, decode_tok_s=90.0, ttft_s=0.16, perplexity=26.8, notes="same GGUF"),
            row("AirLLM", "real", 16, notes="skipped: airllm not installed")]
    details = {"quick": True, "workload": {"prompts": 16, "prompt_tokens": 128, "new_tokens": 8,
                                           "stream_new_tokens": 4, "windows": 1, "window_tokens": 256, "text": "BBC"},
               "environment": {"cpu_model": "cpu", "cpus_available": 2, "threads": 2, "python": "3.11",
                               "loadavg_end": "0.1", "contention": {"other_share": 0.05}}}
    js, mdp, md = dp.write_outputs(rows, details, tmp_path / "out")
    report = json.loads(js.read_text())
    assert report["row_keys"] == list(ROW_KEYS) and report["rows"] == rows
    assert mdp.read_text() == md
    lines = md.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| system"))
    assert "96.6 MB" in lines[header + 2] and "90.00" in lines[header + 2] and "0.160 s" in lines[header + 2]
    assert "skipped: airllm not installed" in lines[header + 3] and "—" in lines[header + 3]


# --------------------------------------------------------------------------- a real peer, if installed


def test_llama_cpp_child_end_to_end():
    if dp.PEERS[0].missing():
        pytest.skip(f"llama-cpp-python not installed ({dp.INSTALL})")
    gguf = str(builtin_or_skip("smollm2"))
    prompts = [[504, 3458, 282, 4649, 314, 253, 1345, 30]] * 2
    res = dp.run_child({"task": "speed", "backend": "llama.cpp", "gguf": gguf, "threads": dp.THREADS,
                        "prompts": prompts, "new_tokens": 3, "repeats": 1, "storage": None}, timeout=120)
    assert res["batch"] == 2 and len(res["tokens"]) == 3
    assert res["resident_weight_bytes"] > 50_000_000 and res["peak_rss_bytes"] > res["resident_weight_bytes"]
    ppl = dp.run_child({"task": "perplexity", "backend": "llama.cpp", "gguf": gguf, "threads": dp.THREADS,
                        "windows": [prompts[0]]}, timeout=120)
    assert ppl["tokens_scored"] == 7 and 1 < ppl["perplexity"] < 49152
