"""The CLI end to end, in subprocesses as a user runs it."""

import json
import subprocess
import sys

import pytest

from conftest import builtin_or_skip


def sti(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "sti", *args], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"sti {' '.join(args)} exited {p.returncode}:\n{p.stderr}")
    return p


@pytest.mark.parametrize("cmd", ["embed", "classify", "generate", "info", "pack", "verify", "profile", "plan", "eval", "bench", "demo"])
def test_every_command_has_help(cmd):
    out = sti(cmd, "--help").stdout
    assert out.startswith("usage: sti " + cmd)


def test_no_torch_on_the_inference_path():
    builtin_or_skip("minilm")
    code = ("import sys, sti; from sti.cli import main; main(['embed', '--json', 'hello']);"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
            "sys.stderr.write(repr(bad)); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_embed_json():
    builtin_or_skip("minilm")
    out = json.loads(sti("embed", "--json", "first text", "second").stdout)
    assert set(out) == {"model", "embeddings"}
    assert len(out["embeddings"]) == 2 and len(out["embeddings"][0]) == 384
    norm = sum(v * v for v in out["embeddings"][0]) ** 0.5
    assert abs(norm - 1) < 1e-4


def test_classify_json():
    builtin_or_skip("minilm")
    out = json.loads(sti("classify", "--json", "The striker scored a hat-trick in the cup final",
                         "Shares fell after the company cut its profit forecast").stdout)
    assert set(out) == {"labels", "scores"}
    assert out["labels"][0].startswith("sport")
    assert out["labels"][1] == "business"
    assert all(abs(sum(s) - 1) < 1e-5 for s in out["scores"])


def test_generate_json_greedy_is_deterministic():
    builtin_or_skip("smollm2")
    a = json.loads(sti("generate", "--json", "--max-tokens", "8", "The capital of France is").stdout)
    assert set(a) == {"tokens", "text"}
    assert 1 <= len(a["tokens"]) <= 8 and isinstance(a["text"], str)
    b = json.loads(sti("generate", "--json", "--max-tokens", "8", "The capital of France is").stdout)
    assert a == b


def test_generate_several_prompts_as_one_batch(tmp_path):
    builtin_or_skip("smollm2")
    prompts = ["The capital of France is", "My favourite food is"]
    a = json.loads(sti("generate", "--json", "--max-tokens", "6", *prompts).stdout)
    assert [b["prompt"] for b in a["batch"]] == prompts
    assert a["batch"][0]["tokens"] == a["tokens"] and a["batch"][0]["tokens"] != a["batch"][1]["tokens"]
    f = tmp_path / "prompts.txt"
    f.write_text(prompts[0] + "\n\n" + prompts[1] + "\n")  # blank lines are skipped
    assert json.loads(sti("generate", "--json", "--max-tokens", "6", "--prompts-file", str(f)).stdout) == a


def test_info_json():
    builtin_or_skip("minilm")
    out = json.loads(sti("info", "minilm", "--json").stdout)
    assert out["family"] == "bert"
    assert out["parameters"] == 22_565_376  # 22.7M less the unused pooler (384*384 + 384)
    assert out["bytes_by_dtype"] == {"float32": 90_852_864, "int64": 4096}  # + the position_ids buffer


@pytest.mark.parametrize("args, needle", [
    (["embed", "--model", "/no/such/model", "x"], "no such model"),
    (["embed", ""], "empty"),
    (["info", "/"], "not a model directory"),
    (["generate", "--max-tokens", "0", "hi"], "--max-tokens"),
    (["generate", "--max-tokens", "4"], "no prompt"),
    (["generate", "--batch", "3", "one", "two"], "--batch 3 with 2 prompts"),
    (["generate", "--prompts-file", "/no/such/prompts.txt"], "cannot read --prompts-file"),
])
def test_bad_input_is_a_clear_error(args, needle):
    p = sti(*args, check=False)
    assert p.returncode != 0
    assert needle in p.stderr


def test_overlong_text_truncates_with_notice_or_errors_when_strict():
    builtin_or_skip("minilm")
    long = "word " * 700
    p = sti("embed", "--json", long)
    assert "truncated" in p.stderr
    p = sti("embed", "--strict", long, check=False)
    assert p.returncode != 0 and "at most 512" in p.stderr


def test_bench_peers_are_checked_before_anything_runs():
    p = sti("bench", "kernels", "--peers", "llama.cpp", check=False)
    assert p.returncode == 2 and "--peers is for the decoder suite" in p.stderr
    p = sti("bench", "decoder", "--peers", "vllm", "--out", "unused", check=False)
    assert p.returncode == 2 and "unknown peer 'vllm'" in p.stderr
