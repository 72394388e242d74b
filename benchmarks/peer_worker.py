"""What runs inside a peer engine's own Python (`--peer-python`): probe onnxruntime-genai and llama.cpp,
build their models from the Hugging Face-format language model `benchmarks.peers` writes (the GGUF
writer, llama.cpp's quantizer, onnxruntime-genai's model builder), and time text prefill and decode.

Imports nothing from slimm (the peer's Python need not have it) and only the standard library and
NumPy at the top: an engine that is missing or broken fails its own command with a one-line reason.
Every command writes one JSON object to --result; `measure` rewrites it after every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# engine -> (import name, pip distribution)
MODULES = {
    "onnxruntime-genai": ("onnxruntime_genai", "onnxruntime-genai"),
    "llama.cpp": ("llama_cpp", "llama-cpp-python"),
}
GGUF_TYPES = {"f32": 0, "q8_0": 7, "q4_0": 2}  # llama_ftype: LLAMA_FTYPE_ALL_F32, MOSTLY_Q8_0, MOSTLY_Q4_0


def write_result(path: str, out: dict[str, Any]) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)


# ---- probe ----------------------------------------------------------------------------------------------
def probe(engine: str) -> dict[str, Any]:
    """The engine's version if it imports here, else why not (the import error's first line)."""
    from importlib.metadata import PackageNotFoundError, version

    module, dist = MODULES[engine]
    try:
        __import__(module)
        if engine == "llama.cpp":
            __import__("gguf")  # the GGUF writer's package
    except Exception as e:  # noqa: BLE001 - a broken build fails with OSError, RuntimeError, ...
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    try:
        v = version(dist)
    except PackageNotFoundError:
        v = "unknown"
    return {"status": "ok", "version": v}


# ---- GGUF (llama.cpp) -----------------------------------------------------------------------------------
def gguf_tensor_names(n_layers: int) -> dict[str, str]:
    """Hugging Face Qwen2 names -> the names llama.cpp's qwen2 architecture loads."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(n_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


def gguf_vocab(hf_dir: Path, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges from the checkpoint's own tokenizer.json (Qwen's byte-level
    BPE), padded to the embedding's rows as llama.cpp's own converter does: llama.cpp requires one
    token per row."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tokens: dict[int, tuple[str, int]] = {i: (t, 1) for t, i in tok["model"]["vocab"].items()}  # NORMAL
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], 3 if added["special"] else 4)  # CONTROL / USER_DEFINED
    if max(tokens) >= n_vocab:
        raise ValueError(f"{hf_dir}: token id {max(tokens)} does not fit an embedding of {n_vocab} rows")
    texts, types = [], []
    for i in range(n_vocab):
        text, kind = tokens.get(i, (f"[PAD{i}]", 5))  # UNUSED
        texts.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return texts, types, merges


def write_gguf(hf_dir: str | Path, out: str | Path) -> None:
    """The Hugging Face-format Qwen2 language model as an f32 GGUF for llama.cpp (arch qwen2)."""
    import gguf
    from safetensors.numpy import load_file

    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    names = gguf_tensor_names(cfg["num_hidden_layers"])
    if not cfg.get("tie_word_embeddings"):
        names["lm_head.weight"] = "output.weight"
    missing = sorted(set(names) - set(weights))
    unexpected = sorted(set(weights) - set(names))
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    n_vocab = weights["model.embed_tokens.weight"].shape[0]
    texts, types, merges = gguf_vocab(hf_dir, n_vocab)

    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_name(hf_dir.name)
    w.add_file_type(GGUF_TYPES["f32"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(texts)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg.get("pad_token_id", cfg["bos_token_id"]))
    w.add_add_bos_token(False)  # Qwen prompts start without a BOS token
    for hf, gg in names.items():
        w.add_tensor(
            gg, np.ascontiguousarray(weights[hf], dtype=np.float32)
        )  # (out, in) as llama.cpp reads it
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src: str, dst: str, fmt: str, threads: int) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), its default recipe for the type."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[fmt]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0 or not Path(dst).is_file():
        raise RuntimeError(f"llama_model_quantize({src} -> {fmt}) returned {rc}")


# ---- onnxruntime-genai ----------------------------------------------------------------------------------
def build_ortgenai(hf_dir: str, out: str, precision: str, block_size: int, timeout: float) -> None:
    """onnxruntime-genai's model builder on the language model, for its CPU execution provider; int4 /
    int8 are its MatMulNBits weights with int8 activations (accuracy level 4), blocks of `block_size`."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", out]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(Path(out) / "cache")]
    if precision in ("int4", "int8"):
        cmd += ["--extra_options", "accuracy_level=4", f"block_size={block_size}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = [x for x in (done.stderr or done.stdout).strip().splitlines() if x.strip()][-1:] or [
            "no output"
        ]
        raise RuntimeError(f"the model builder exited with status {done.returncode}: {tail[0][:300]}")
    cache = Path(out) / "cache"
    if cache.is_dir():
        import shutil

        shutil.rmtree(cache)


class OrtGenaiRunner:
    """onnxruntime-genai's Generator: `append_tokens` runs the prompt; each `generate_next_token`
    after the first runs the model on the previous token and picks the next one (greedy)."""

    def __init__(self, model_dir: str, threads: int, max_length: int) -> None:
        import onnxruntime_genai as og

        self.og, self.max_length = og, max_length
        config = og.Config(model_dir)
        # ONNX Runtime's default is one thread per physical core: every engine gets the same count
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.generator = None

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(ids.astype(np.int32))
        return np.asarray(self.generator.get_logits(), np.float32).reshape(1, -1)

    def first_token(self) -> int:
        self.generator.generate_next_token()  # picks from the prompt's logits: no model run
        return int(self.generator.get_next_tokens()[0])

    def step(self, token: int) -> int:
        if self.generator.is_done():  # an end-of-sequence token: the remaining steps would not run
            raise RuntimeError(f"the generator stopped after token {token} (end of sequence)")
        self.generator.generate_next_token()  # runs the model on `token`, the last one picked
        return int(self.generator.get_next_tokens()[0])


class LlamaCppRunner:
    """llama-cpp-python's Llama over the GGUF: `eval` runs tokens through the model (the prompt as one
    batch), the next token is the argmax of the last position's logits."""

    def __init__(self, model_path: str, threads: int, max_length: int, prompt_tokens: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=model_path,
            n_ctx=max_length,
            n_batch=max(prompt_tokens, 8),
            n_ubatch=max(prompt_tokens, 8),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )

    def _last(self) -> np.ndarray:
        # the last position's logits, read from llama.cpp itself: llama-cpp-python keeps them in
        # `scores` only with logits_all, which would compute every position's
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).reshape(1, -1)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids[0]])
        return np.array(self._last(), np.float32)

    def first_token(self) -> int:
        return int(self._last().argmax())

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return int(self._last().argmax())


def model_bytes(path: Path) -> int:
    """Bytes of the files the engine loads: the GGUF, or the builder's .onnx and external data."""
    if path.is_file():
        return path.stat().st_size
    return sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")
    )


def _phase(times: list[float]) -> dict[str, Any]:
    """As benchmarks.measure: the first call apart, the median of the rest is the steady state."""
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {
        "first_s": times[0],
        "median_s": steady,
        "times_s": times,
        "warmup_excess_s": max(0.0, times[0] - steady),
    }


def measure(spec: dict[str, Any], result: str) -> None:
    """Text prefill and greedy decode, timed as slimm's rows are: `repeats` prefills after a warm-up,
    then `decode_steps` steps after one more prefill, each step the model on one token + argmax."""
    out: dict[str, Any] = {"status": "running", "phase": "load"}

    def save() -> None:
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        write_result(result, out)

    ids = np.asarray(spec["input_ids"], np.int64).reshape(1, -1)
    P, steps, threads = ids.shape[1], spec["decode_steps"], spec["threads"]
    max_length = P + steps + 2
    t0 = time.perf_counter()
    if spec["engine"] == "onnxruntime-genai":
        runner = OrtGenaiRunner(spec["path"], threads, max_length)
    else:
        runner = LlamaCppRunner(spec["path"], threads, max_length, P)
    out["load_s"] = time.perf_counter() - t0
    out["weight_bytes"] = model_bytes(Path(spec["path"]))
    out.update(prompt_tokens=P, decode_steps=steps, phase="prefill")
    save()

    times = []
    for _ in range(spec["repeats"] + 1):
        t = time.perf_counter()
        runner.prefill(ids)
        times.append(time.perf_counter() - t)
    out["prefill"] = _phase(times)
    out["prefill"]["tokens_per_s"] = P / out["prefill"]["median_s"]
    out["phase"] = "decode"
    save()

    logits = runner.prefill(ids)
    if spec.get("logits_path"):
        np.save(spec["logits_path"], logits)
    tokens, times = [runner.first_token()], []
    for _ in range(steps):
        t = time.perf_counter()
        tokens.append(runner.step(tokens[-1]))
        times.append(time.perf_counter() - t)
    out["decode"] = _phase(times)
    out["decode"]["tokens_per_s"] = 1.0 / out["decode"]["median_s"]
    out["tokens"] = tokens
    out["compile_s"] = out["prefill"]["warmup_excess_s"] + out["decode"]["warmup_excess_s"]
    del out["phase"]
    out["status"] = "ok"
    save()


# ---- command line -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_worker", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("probe", "gguf", "quantize", "ortgenai", "measure"))
    p.add_argument("--spec", required=True, help="JSON object: the command's arguments")
    p.add_argument("--result", required=True, help="where the JSON result is written")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    if args.command == "measure":
        try:
            measure(spec, args.result)
        except Exception as e:  # noqa: BLE001 - any failure becomes a row that says why
            import traceback

            prev = json.loads(Path(args.result).read_text()) if Path(args.result).exists() else {}
            prev.update(
                status="failed",
                reason=f"{type(e).__name__} in {prev.get('phase', 'load')}: {e}".splitlines()[0][:300],
                traceback=traceback.format_exc(),
            )
            write_result(args.result, prev)
        return 0
    try:
        if args.command == "probe":
            write_result(args.result, probe(spec["engine"]))
            return 0
        if args.command == "gguf":
            write_gguf(spec["src"], spec["tmp"])
        elif args.command == "quantize":
            quantize_gguf(spec["src"], spec["tmp"], spec["format"], spec["threads"])
        else:
            build_ortgenai(spec["src"], spec["tmp"], spec["precision"], spec["block_size"], spec["timeout"])
        write_result(args.result, {"status": "ok"})
    except Exception as e:  # noqa: BLE001 - the reason this peer's rows are skipped
        import traceback

        write_result(
            args.result,
            {
                "status": "failed",
                "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                "traceback": traceback.format_exc(),
            },
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
