"""`slimm bench --peers`: a peer that cannot be imported or that dies is a row saying why; the language
model written for the peers is the checkpoint's; where the peers are installed (this Python, or the one
SLIMM_PEER_PYTHON names), the GGUF has llama.cpp's names and vocabulary and both peers compute the
same logits and greedy tokens as slimm's torch backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench, peers, report
from slimm.errors import CheckpointError

PEER_PYTHON = os.environ.get("SLIMM_PEER_PYTHON", sys.executable)


def _has(python: str, module: str) -> bool:
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
    return done.returncode == 0


def _need(module: str) -> None:
    if not _has(PEER_PYTHON, module):
        pytest.skip(
            f"{module} is not installed in {PEER_PYTHON}: pip install 'slimm[peers]' there, or set "
            "SLIMM_PEER_PYTHON to a Python that has it"
        )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny demo checkpoint and its language model in Hugging Face format."""
    from slimm.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("peers")
    ckpt = write_demo_checkpoint(root / "ckpt")
    peers.write_hf_llm(ckpt, root / "hf")
    return ckpt, root / "hf"


def _fake_python(tmp_path: Path, error: str) -> str:
    """A 'Python' whose onnxruntime_genai and llama_cpp fail to import, as a broken build does."""
    fake = tmp_path / "site"
    fake.mkdir()
    for module in ("onnxruntime_genai", "llama_cpp"):
        (fake / f"{module}.py").write_text(f"raise OSError({error!r})\n")
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={fake} exec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_a_peer_that_cannot_be_imported_is_a_row_with_its_reason(tmp_path):
    error = "libllama.so: cannot open shared object file"
    python = _fake_python(tmp_path, error)
    out = tmp_path / "out"
    code = bench.main(
        ["--size", "tiny", "--backends", "torch", "--peers", "onnxruntime-genai,llama.cpp"]
        + ["--peer-python", python, "--repeats", "1", "--decode-steps", "2", "--prompt-tokens", "8"]
        + ["--image-size", "56x56", "--work", str(tmp_path / "work"), "--out", str(out)]
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["backend"], r["precision"]): r for r in doc["results"]}
    assert rows[("torch", "fp32")]["status"] == "ok"
    assert rows[("torch", "fp32")]["decode_bytes_per_step"] > 0  # its roofline, from the checkpoint
    assert not list((tmp_path / "work").glob("onnx-*"))  # no export made for it
    for engine in ("onnxruntime-genai", "llama.cpp"):
        row = rows[(engine, "fp32")]
        assert row["status"] == "skipped"
        assert f"{engine} cannot be imported in {python} (OSError: {error})" in row["reason"]
    table = (out / "table.md").read_text()
    assert (
        f"| llama.cpp | fp32 | skipped: llama.cpp cannot be imported in {python} (OSError: {error})" in table
    )
    assert not (tmp_path / "work" / "hf-plain-tiny").exists()  # nothing built for a peer that cannot run


def test_a_missing_peer_python_is_named():
    probed = peers.probe("llama.cpp", "/nonexistent/python3")
    assert probed == {"status": "failed", "reason": "peer Python /nonexistent/python3 not found"}


def test_a_peer_process_that_dies_reports_what_it_measured_and_why(tmp_path):
    """The peer worker writes its JSON after every phase; one that dies keeps its phases and names
    where it died; one that leaves no JSON is named by the last line of its stderr."""
    mid = (
        "import json, sys; p = sys.argv[sys.argv.index('--result') + 1]; "
        "json.dump({'status': 'running', 'phase': 'decode', 'load_s': 1.0}, open(p, 'w')); sys.exit(3)"
    )
    res = bench.run_command([sys.executable, "-c", mid], 60)
    assert res["status"] == "failed" and res["load_s"] == 1.0
    assert res["reason"] == "process exited with status 3 during decode"
    res = bench.run_command(
        [sys.executable, "-c", "import sys; sys.exit('llama.cpp: illegal instruction')"], 60
    )
    assert res == {
        "status": "failed",
        "reason": "process exited with status 1: llama.cpp: illegal instruction",
    }
    res = bench.run_command([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert res == {"status": "timeout", "reason": "took more than 1 s"}


def test_peer_rows_are_compared_at_their_precision_and_kept_out_of_the_memory_goal():
    def row(backend, precision, decode, prefill, peer=False, fmt=None):
        r = {"backend": backend, "precision": precision, "status": "ok", "load_s": 1.0, "tokens": [1]}
        r.update(decode={"tokens_per_s": decode}, prefill={"tokens_per_s": prefill})
        r.update(weight_bytes=1e9, peak_rss_bytes=3e9)
        return {**r, "peer": True, "format": fmt} if peer else r

    results = [
        row("onnx", "int4", 50.0, 230.0),
        row("onnxruntime-genai", "int4", 60.0, 160.0, peer=True, fmt="int4"),
        row("llama.cpp", "int4", 62.5, 100.0, peer=True, fmt="q4_0"),
        row("onnx", "w8a8", 40.0, 500.0),
        row("llama.cpp", "int8", 50.0, 120.0, peer=True, fmt="q8_0"),
        row("onnx", "fp32", 14.0, 270.0),
        row("onnx-fused", "fp32", 15.0, 200.0),  # another export of ours: the goals take the faster
        {"backend": "llama.cpp", "precision": "fp32", "status": "skipped", "reason": "not built"},
    ]
    report.compare(results)
    ratios = {(x["backend"], x["precision"]): x for x in report.peer_ratios(results)}
    assert ratios[("onnx", "int4")]["decode"]["peer"] == "llama.cpp q4_0"  # the faster peer
    assert ratios[("onnx", "int4")]["decode"]["ratio"] == pytest.approx(0.8)
    assert ratios[("onnx", "int4")]["prefill"]["peer"] == "onnxruntime-genai int4"
    assert ratios[("onnx", "w8a8")]["decode"]["peer"] == "llama.cpp q8_0"  # int8 weights
    assert "decode" not in ratios[("onnx", "fp32")]  # no fp32 peer measured
    goals = {g["goal"]: g for g in report.goals(results)}
    int4 = goals["int4 decode vs the faster of onnxruntime-genai int4 and llama.cpp q4_0"]
    assert int4["ratio"] == pytest.approx(0.8) and not int4["met"] and int4["against"] == "llama.cpp q4_0"
    assert int4["row"] == "onnx int4"
    assert "fp32 decode vs onnxruntime-genai fp32" not in goals  # no fp32 peer measured
    assert goals["int4 prefill vs onnxruntime-genai int4"]["ratio"] == pytest.approx(230 / 160)
    assert "onnx int4 peak memory vs weight bytes" in goals
    assert not any(g.startswith(("llama.cpp", "onnxruntime-genai")) for g in goals)
    meta = {"variant": "plain", "size": "0.5b", "image_size": [448, 448], "prompt_tokens": 256}
    meta.update(decode_steps=32, repeats=2, machine="test", versions={})
    text = report.markdown(meta, results)
    assert "| llama.cpp | int4 (q4_0) |" in text and "| onnxruntime-genai | int4 |" in text
    assert (
        "| onnx | int4 | 50.00 | llama.cpp q4_0 62.50 | 0.80x | 230.00 | onnxruntime-genai int4 160.00 | 1.44x |"
        in text
    )
    assert "| onnx | fp32 |  | no peer measured |  |" in text
    # with an fp32 peer, the goal judges the faster of our onnx and onnx-fused exports, and says which
    results.append(row("onnxruntime-genai", "fp32", 12.0, 300.0, peer=True, fmt="fp32"))
    fp32 = {g["goal"]: g for g in report.goals(results)}["fp32 decode vs onnxruntime-genai fp32"]
    assert fp32["row"] == "onnx-fused fp32" and fp32["ratio"] == pytest.approx(15 / 12) and fp32["met"]
    text = report.markdown(meta, results)
    assert "| onnx-fused | fp32 | 15.00 | onnxruntime-genai fp32 12.00 | 1.25x |" in text
    assert "1.25x (onnx-fused fp32 vs onnxruntime-genai fp32)" in text


def test_hf_language_model_is_the_checkpoints(tiny):
    from safetensors.torch import load_file

    ckpt, hf = tiny
    ours, theirs = load_file(str(ckpt / "model.safetensors")), load_file(str(hf / "model.safetensors"))
    assert not any(k.startswith("visual") for k in theirs)
    assert set(theirs) == {k for k in ours if k.startswith("model.")}  # tied: no lm_head
    for name, t in theirs.items():
        assert t.dtype.is_floating_point and t.element_size() == 4
        assert (t == ours[name].float()).all(), name
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_hidden_layers"] == 6
    assert (hf / "tokenizer.json").exists()


def test_hf_writer_names_a_missing_tensor(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt, _ = tiny
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.3.self_attn.k_proj.bias"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.3.self_attn.k_proj.bias"):
        peers.write_hf_llm(broken, tmp_path / "hf")


def _peer(what: str, spec: dict, timeout: float = 900) -> dict:
    return bench.run_command(peers.command(PEER_PYTHON, what, spec), timeout, bench.thread_env(2))


def test_gguf_has_llama_cpps_names_and_the_real_vocabulary(tiny, tmp_path):
    _need("gguf")
    _, hf = tiny
    out = tmp_path / "model.gguf"
    res = _peer("gguf", {"src": str(hf), "tmp": str(out)})
    assert res["status"] == "ok", res
    check = """
import json, sys
import gguf
r = gguf.GGUFReader(sys.argv[1])
f = r.fields
def s(k): return bytes(f[k].parts[f[k].data[0]]).decode()
def n(k): return f[k].parts[f[k].data[0]].tolist()[0]
toks = f["tokenizer.ggml.tokens"]
print(json.dumps({
    "arch": s("general.architecture"), "pre": s("tokenizer.ggml.pre"),
    "layers": n("qwen2.block_count"), "heads_kv": n("qwen2.attention.head_count_kv"),
    "n_tokens": len(toks.data), "tok_198": bytes(toks.parts[toks.data[198]]).decode(),
    "tok_151645": bytes(toks.parts[toks.data[151645]]).decode(),
    "type_151645": int(f["tokenizer.ggml.token_type"].parts[f["tokenizer.ggml.token_type"].data[151645]][0]),
    "tensors": {t.name: [int(x) for x in t.shape] for t in r.tensors},
}))
"""
    got = json.loads(
        subprocess.run(
            [PEER_PYTHON, "-c", check, str(out)], capture_output=True, text=True, check=True
        ).stdout
    )
    assert (got["arch"], got["pre"], got["layers"], got["heads_kv"]) == ("qwen2", "qwen2", 6, 1)
    assert got["n_tokens"] == 151936  # one per embedding row, padded as llama.cpp requires
    assert (got["tok_198"], got["tok_151645"], got["type_151645"]) == ("Ċ", "<|im_end|>", 3)  # CONTROL
    t = got["tensors"]
    assert t["token_embd.weight"] == [128, 151936]  # GGUF lists dimensions innermost first
    assert t["blk.5.attn_k.weight"] == [128, 64] and t["blk.5.attn_k.bias"] == [64]
    assert t["blk.0.ffn_down.weight"] == [256, 128] and "output.weight" not in t  # tied embedding
    assert len(t) == 2 + 6 * len(peers.LAYER_TENSORS)


def test_peers_compute_the_same_model_as_slimm(tmp_path):
    """Text prompt, greedy: llama.cpp f32 and onnxruntime-genai fp32 give torch's tokens and its
    last-position logits (the weight conversion is right); q4_0 is built by llama.cpp's quantizer."""
    _need("llama_cpp")
    _need("onnxruntime_genai")
    out = tmp_path / "out"
    code = bench.main(
        ["--size", "tiny", "--backends", "torch", "--precision", "fp32,int4"]
        + ["--peers", "onnxruntime-genai,llama.cpp", "--peer-python", PEER_PYTHON]
        + ["--repeats", "1", "--decode-steps", "8", "--prompt-tokens", "24", "--image-size", "56x56"]
        + ["--work", str(tmp_path / "work"), "--out", str(out)]
    )
    assert code == 0
    rows = {
        (r["backend"], r["precision"]): r for r in json.loads((out / "results.json").read_text())["results"]
    }
    for engine in ("onnxruntime-genai", "llama.cpp"):
        row = rows[(engine, "fp32")]
        assert row["status"] == "ok", row.get("reason")
        assert row["tokens_agree_with_torch"] == 9, (engine, row["tokens"])
        # llama.cpp keeps its KV cache in f16 by default: ~3e-4 on the tiny model, not ~1e-6
        assert row["logits_error"] < (1e-3 if engine == "llama.cpp" else 1e-4), engine
    q4 = rows[("llama.cpp", "int4")]
    assert q4["status"] == "ok" and q4["format"] == "q4_0", q4.get("reason")
    assert 1e-4 < q4["logits_error"] < 1.0  # quantized: measured, not zero
