"""The engines users would pick instead of slimm, measured in the same `slimm bench` run: onnxruntime-genai
(its model builder) and llama.cpp (a GGUF quantized by llama.cpp itself), on the checkpoint's language
model, text only. This side plans and builds; `benchmarks/peer_worker.py` runs in the peer's Python.

Each peer runs in a subprocess of `--peer-python` (default: this Python), so the peers can live in a
virtual environment of their own (`pip install 'slimm[peers]'`, or see benchmarks/README.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("peer_worker.py")  # run by path: the peer's Python needs no slimm
# engine -> {slimm precision it is compared at: the engine's own format}
ENGINES: dict[str, dict[str, str]] = {
    "onnxruntime-genai": {"fp32": "fp32", "int8": "int8", "int4": "int4"},
    "llama.cpp": {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"},
}
INSTALL = "pip install 'slimm[peers]' (llama-cpp-python builds llama.cpp from source)"
# the Hugging Face Qwen2 language model's tensors, per layer
LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def rows(peers: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """(engine, precision) for every requested precision the engine has a format for."""
    return [(e, p) for p in precisions for e in peers if p in ENGINES[e]]


# ---- the language model in Hugging Face's Qwen2 format (both peers start from it) ------------------------
def write_hf_llm(ckpt_dir: str | Path, out: str | Path) -> None:
    """The checkpoint's language model as a Hugging Face `Qwen2ForCausalLM` directory: config.json,
    fp32 safetensors under the names transformers expects (a SliMM checkpoint already uses them for
    its LLM; the vision tower and DeepStack tensors are left out) and the tokenizer files.

    A text-only prompt has the same position in all three M-RoPE rows, which is plain RoPE: this
    model computes what slimm's does on text."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from slimm.config import load_config
    from slimm.errors import CheckpointError

    ckpt_dir, out = Path(ckpt_dir), Path(out)
    c = load_config(ckpt_dir)
    t = c.text
    wanted = ["model.embed_tokens.weight", "model.norm.weight"]
    wanted += [f"model.layers.{i}.{n}" for i in range(t.num_hidden_layers) for n in LAYER_TENSORS]
    if not t.tie_word_embeddings:
        wanted.append("lm_head.weight")
    files = sorted(ckpt_dir.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as s:
            for name in s.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                if name in wanted:
                    state[name] = s.get_tensor(name).to(torch.float32).contiguous()
    missing = [n for n in wanted if n not in state]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: language-model tensors not found: {', '.join(missing[:5])}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "pad_token_id": c.pad_token_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (ckpt_dir / name).exists():
            shutil.copyfile(ckpt_dir / name, out / name)


# ---- subprocesses in the peer's Python ------------------------------------------------------------------
def command(python: str, what: str, spec: dict[str, Any]) -> list[str]:
    """The peer worker's command line; the runner appends `--result PATH`."""
    return [python, str(WORKER), what, "--spec", json.dumps(spec)]


def probe(engine: str, python: str, timeout: float = 300) -> dict[str, Any]:
    """{"status": "ok", "version": ...} if the engine imports in `python`, else the reason it does not."""
    if shutil.which(python) is None and not Path(python).is_file():
        return {"status": "failed", "reason": f"peer Python {python} not found"}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="slimm-peer-") as tmp:
        result = Path(tmp) / "probe.json"
        try:
            done = subprocess.run(
                [*command(python, "probe", {"engine": engine}), "--result", str(result)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"importing it took more than {timeout:.0f} s"}
        if result.exists():
            return json.loads(result.read_text())
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()] or [
            f"exit status {done.returncode}"
        ]
        return {"status": "failed", "reason": lines[-1][:300]}


def unavailable(engine: str, probed: dict[str, Any], python: str) -> str:
    """The row's reason when the engine does not import in the peer's Python."""
    where = "" if python == sys.executable else f" in {python}"
    return f"{engine} cannot be imported{where} ({probed['reason']}); install it with {INSTALL}"
