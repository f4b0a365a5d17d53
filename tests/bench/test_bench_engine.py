"""The pure parts of ``sti bench engine``: statistics, targets, the table and the JSON report,
on synthetic numbers. No timing is asserted anywhere."""

import json
import subprocess
import sys

import pytest

from sti.bench import engine
from sti.bench.engine import Row, Target, markdown_table, ratio, summarize


def test_summarize_median_spread_and_samples():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s["n"] == 4 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0
    assert s["p25"] <= s["median"] <= s["p75"]
    assert s["samples"] == [3.0, 1.0, 2.0, 10.0]  # in measurement order
    one = summarize([4.0])
    assert one["n"] == 1 and one["median"] == one["p25"] == one["p75"] == 4.0
    assert summarize([]) is None


def test_ratio_is_sti_median_over_reference_median():
    assert ratio(summarize([1, 2, 3]), summarize([4, 4, 4])) == pytest.approx(0.5)
    assert ratio(summarize([1]), None) is None
    assert ratio(None, summarize([1])) is None


@pytest.mark.parametrize("kind,value,sti,ref,met", [
    ("ratio_max", 1.0, [9.0], [10.0], True),
    ("ratio_max", 1.0, [11.0], [10.0], False),
    ("ratio_max", 0.15, [1.0], [10.0], True),
    ("ratio_min", 1.0, [30.0], [20.0], True),  # tokens/s: higher is better
    ("ratio_min", 1.0, [10.0], [20.0], False),
    ("sti_max", 5.0, [1.2], None, True),  # an absolute target needs no reference
    ("sti_max", 5.0, [7.0], [70.0], False),
    ("ratio_max", 1.0, [9.0], None, None),  # not measured: neither met nor missed
])
def test_target_evaluation(kind, value, sti, ref, met):
    row = Row("k", "m", "s", summarize(sti), summarize(ref) if ref else None, Target(kind, value))
    assert row.met is met


def test_target_text_and_unknown_kind():
    assert Target("ratio_max", 0.15).text() == "ratio ≤ 0.15"
    assert Target("ratio_min", 1.0).text() == "ratio ≥ 1"
    assert Target("sti_max", 5.0).text("s") == "STI ≤ 5 s"
    with pytest.raises(ValueError):
        Target("nonsense", 1.0).text()


def test_number_and_cell_formatting():
    assert engine.fmt_num(1234.4) == "1234"
    assert engine.fmt_num(12.345) == "12.3"
    assert engine.fmt_num(1.2345) == "1.23"
    assert engine.fmt_num(0.012345) == "0.012"
    cell = engine.fmt_cell(summarize([10.0, 11.0, 12.0, 13.0, 14.0]), "ms")
    assert cell.startswith("12.0 ms (IQR 11.0–13.0") and cell.endswith("n=5)")
    assert engine.fmt_cell(summarize([70.0]), "s") == "70.0 s (n=1)"
    assert engine.fmt_cell(None, "s", "skipped (--quick)") == "skipped (--quick)"
    assert engine.fmt_cell(None, "s") == "—"


def synthetic_rows():
    return [
        Row("encoder_warm_32", "MiniLM encoder warm latency, batch 1, 32 tokens", "ms",
            summarize([5.0, 5.2, 4.9]), summarize([8.0, 8.1, 7.9]), Target("ratio_max", 1.0)),
        Row("cold_start", "cold start to first classification", "s",
            summarize([0.9, 1.0]), summarize([5.0, 5.5]), Target("ratio_max", 0.15)),
        Row("decode_tps", "SmolLM2 decode", "tokens/s", summarize([40.0]), summarize([30.0]),
            Target("ratio_min", 1.0), higher_is_better=True),
        Row("gguf_load", "GGUF load", "s", summarize([1.5, 1.4]), None, Target("sti_max", 5.0),
            note="skipped (--quick)"),
    ]


def test_markdown_table_columns_units_ratio_and_verdicts():
    md = markdown_table(synthetic_rows())
    lines = md.splitlines()
    assert lines[0] == ("| measurement | STI (median, spread) | transformers (median, spread) | ratio | target "
                        "| met? |")
    assert len(lines) == 2 + 4 and all(line.count("|") == 7 for line in lines)
    warm, cold, dec, load = lines[2:]
    assert "[ms]" in warm and "5.00 ms" in warm and "0.625×" in warm and warm.endswith("| yes |")
    assert "[s]" in cold and "0.181×" in cold and cold.endswith("| **no** |")
    assert "[tokens/s]" in dec and "1.333×" in dec and "ratio ≥ 1" in dec and dec.endswith("| yes |")
    assert "skipped (--quick)" in load and "STI ≤ 5 s" in load and load.endswith("| yes |")


def test_report_schema_and_outputs(tmp_path):
    rows = synthetic_rows()
    env = {"cpu_model": "Test CPU", "cpus_available": 2, "python": "3.11", "numpy": "2", "numpy_blas": "blas",
           "numpy_blas_threads": 2, "torch": "2", "torch_threads": 2, "transformers": "5",
           "loadavg_start": "0.1", "loadavg_end": "0.2"}
    report = engine.build_report(rows, env, {"decode": {"same_tokens": True}}, ["warm page cache"],
                                 quick=True, repeats=3, elapsed_s=12.3456)
    js_path, md_path, md = engine.write_outputs(report, rows, tmp_path / "out")
    data = json.loads(js_path.read_text())
    assert data["suite"] == "engine" and data["schema_version"] == engine.SCHEMA_VERSION
    assert data["quick"] is True and data["repeats"] == 3 and data["elapsed_s"] == 12.346
    assert {"environment", "rows", "details", "notes", "ratio_definition", "spread_definition"} <= set(data)
    keys = {"key", "measurement", "unit", "higher_is_better", "sti", "transformers", "ratio", "target", "met", "note"}
    for r in data["rows"]:
        assert set(r) == keys
    r0 = data["rows"][0]
    assert r0["target"] == {"kind": "ratio_max", "value": 1.0, "text": "ratio ≤ 1"}
    assert set(r0["sti"]) == {"n", "median", "min", "max", "p25", "p75", "samples"}
    assert r0["ratio"] == pytest.approx(5.0 / 8.0) and r0["met"] is True
    assert data["rows"][3]["transformers"] is None and data["rows"][3]["note"] == "skipped (--quick)"
    assert md_path.read_text() == md and markdown_table(rows) in md and "warm page cache" in md
    assert "Test CPU" in md


def test_plan_quick_is_smaller_and_skips_the_transformers_gguf_load():
    full, quick = engine.plan(7, quick=False), engine.plan(7, quick=True)
    assert quick["skip_transformers_gguf"] and not full["skip_transformers_gguf"]
    for k in ("warm_blocks", "cold_pairs", "decode_tokens", "decode_pairs", "load_runs"):
        assert 1 <= quick[k] <= full[k]


def test_unknown_suite_and_bad_repeats_are_errors():
    from sti.bench import run_bench
    from sti.errors import STIError

    with pytest.raises(STIError):
        run_bench("nonsense")
    with pytest.raises(STIError):
        run_bench("engine", repeats=0)


def test_importing_the_bench_does_not_import_torch():
    code = "import sys, sti, sti.bench, sti.bench.engine; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_missing_references_say_how_to_install(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *a, **kw):
        if name in ("torch", "transformers"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert engine.run_engine(out_dir="unused", quick=True) != 0
    assert "make install-test" in capsys.readouterr().err


def test_hf_llama_built_from_sti_weights_matches_sti_logits(rng):
    """The decode reference is the same model: a tiny random STI checkpoint through the
    transformers LlamaForCausalLM that the benchmark builds gives the same logits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import numpy as np

    from conftest import rand
    from sti.models import llama

    cfg = llama.LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=48, max_position=64, rope_theta=10000.0, rms_eps=1e-5,
                            tie_embeddings=True)
    H, hd, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    w = {"embed": rand(rng, cfg.vocab_size, H, scale=1.0), "norm": 1 + rand(rng, H)}
    for i in range(cfg.num_layers):
        w.update({f"layers.{i}.attn_norm": 1 + rand(rng, H), f"layers.{i}.ffn_norm": 1 + rand(rng, H),
                  f"layers.{i}.wq": rand(rng, cfg.num_heads * hd, H),
                  f"layers.{i}.wk": rand(rng, cfg.num_kv_heads * hd, H),
                  f"layers.{i}.wv": rand(rng, cfg.num_kv_heads * hd, H),
                  f"layers.{i}.wo": rand(rng, H, cfg.num_heads * hd),
                  f"layers.{i}.w_gate": rand(rng, F, H), f"layers.{i}.w_up": rand(rng, F, H),
                  f"layers.{i}.w_down": rand(rng, H, F)})

    class FakeGen:  # what _hf_llama_from_sti reads from a Generator
        def __init__(self):
            self.cfg = cfg
            self.ckpt = type("Ck", (), {"weights": w, "special": {"bos_id": 1, "eos_id": 2}})()

    model = engine._hf_llama_from_sti(FakeGen(), torch)
    ids = rng.integers(0, cfg.vocab_size, (1, 7))
    g = {n: w[n] for n in llama.GLOBAL_NAMES if n in w}
    layers = [llama.layer_weights(w, i) for i in range(cfg.num_layers)]
    ours = llama.forward(cfg, g, layers, ids, llama.KVCache(cfg, 1, 16), all_logits=True)
    with torch.inference_mode():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_contention_is_busy_time_minus_our_own():
    a = {"busy_s": 100.0, "steal_s": 1.0, "own_s": 10.0, "wall": 0.0}
    b = {"busy_s": 130.0, "steal_s": 2.0, "own_s": 25.0, "wall": 10.0}  # 30 s busy, 15 s ours
    c = engine.contention(a, b, cpus=2)
    assert c["other_processes_cpu_s"] == 15.0 and c["other_share"] == 0.75
    assert c["steal_cpu_s"] == 1.0 and c["steal_share"] == 0.05
    assert engine.contention(None, b, 2) is None
    snap = engine.cpu_snapshot()
    assert snap is None or {"busy_s", "steal_s", "own_s", "wall"} <= set(snap)


def test_contention_notes_name_the_busy_sections():
    quiet = {"other_share": 0.01, "steal_share": 0.0}
    busy = {"other_share": 0.40, "steal_share": 0.01}
    assert engine.contention_notes(quiet, {"decode": {"contention": busy}}) == []
    (note,) = engine.contention_notes(busy, {"decode": {"contention": busy}, "cold_start": {"contention": quiet},
                                             "plan": {"repeats": 3}})
    assert "40%" in note and "decode 41%" in note and "cold_start" not in note
