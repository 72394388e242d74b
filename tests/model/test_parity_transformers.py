"""Parity of slimm's PyTorch model with transformers' Qwen2VLForConditionalGeneration (tiny, fp32, plain).

Both sides get the same seeded weights: the reference model is saved as a released-format SliMM
checkpoint and slimm loads that directory. Logits must agree to 1e-4 relative, greedy tokens exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from hf_reference import (
    EOS_IDS,
    PAD_ID,
    Image,
    Text,
    Video,
    build_inputs,
    hf_inputs,
    hf_trace,
    load_slimm_checkpoint_into_hf,
    make_hf_model,
    max_rel_err,
    original_rope_index,
    save_as_slimm_checkpoint,
    tiny_qwen2vl_config,
    top2_gap,
    worst_position,
)
from safetensors import safe_open

TOL = 1e-4  # max|ours - ref| / max|ref|
NEW_TOKENS = 16
SEED = 0


@dataclass(frozen=True)
class Case:
    prompts: list  # the batch: one list of Text/Image/Video per row
    tied: bool = True  # tied input/output embeddings
    # transformers 5.24 places M-RoPE ids after a video whose t exceeds its merged h and w at
    # s + max(h, w)/m, the original at s + max(t, h, w): give the reference the original's ids there
    original_positions: bool = False


CASES = {
    "one_image": Case([[Text(3), Image((1, 4, 6)), Text(6)]]),
    "two_images": Case([[Image((1, 4, 6)), Text(4), Image((1, 8, 4)), Text(5)]]),
    "text_only": Case([[Text(14)]]),
    "padded_batch": Case([[Image((1, 4, 4)), Text(3)], [Text(2), Image((1, 6, 8)), Text(9)]]),
    "padded_text_only": Case([[Text(4)], [Text(11)]]),
    "padded_mixed": Case([[Text(6)], [Image((1, 4, 4)), Text(2)]]),
    "video": Case([[Video((2, 4, 6)), Text(6)]]),
    "tall_video": Case([[Text(2), Video((4, 2, 2)), Text(5)]], original_positions=True),
    "image_and_video": Case([[Image((1, 4, 4)), Text(2), Video((2, 4, 4)), Text(3)]]),
    "one_image_untied": Case([[Text(3), Image((1, 6, 4)), Text(6)]], tied=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tied? -> (transformers model, released-format checkpoint directory)."""
    out = {}
    for tied in (True, False):
        model = make_hf_model(tiny_qwen2vl_config(tie_word_embeddings=tied), seed=SEED)
        out[tied] = (model, save_as_slimm_checkpoint(model, tmp_path_factory.mktemp(f"ckpt_tied{int(tied)}")))
    return out


@pytest.fixture(scope="module")
def slimm_models(checkpoints):
    """tied? -> slimm model loaded from the same checkpoint (imported here so harness tests run without it)."""
    from slimm.model.slimm import SliMMForConditionalGeneration

    out = {}
    for tied, (_, ckpt) in checkpoints.items():
        model = SliMMForConditionalGeneration.from_pretrained(ckpt, torch_dtype="float32", device_map="cpu")
        out[tied] = model.eval() if hasattr(model, "eval") else model
    return out


def case_inputs(name: str) -> dict[str, torch.Tensor]:
    return build_inputs(CASES[name].prompts, seed=1)


def ref_inputs(name: str) -> dict[str, torch.Tensor]:
    """The case's inputs as transformers' Qwen2-VL takes them."""
    inputs = hf_inputs(case_inputs(name))
    if CASES[name].original_positions:
        inputs["position_ids"] = original_rope_index(inputs)
    return inputs


def generate_kwargs(**overrides):
    kw = dict(
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=list(EOS_IDS),
        pad_token_id=PAD_ID,
    )
    kw.update(overrides)
    return kw


_hf_generate_cache: dict[str, object] = {}


def hf_generate(checkpoints, name: str):
    if name not in _hf_generate_cache:
        model = checkpoints[CASES[name].tied][0]
        with torch.no_grad():
            _hf_generate_cache[name] = model.generate(**ref_inputs(name), **generate_kwargs())
    return _hf_generate_cache[name]


# --- the harness itself -----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_is_released_format_and_reloads_exactly(checkpoints, tied):
    model, ckpt = checkpoints[tied]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    cfg = model.config
    expected = {"model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight"}
    for i in range(cfg.text_config.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")}
        expected |= {
            p + "self_attn.o_proj.weight",
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
        }
        expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    for i in range(cfg.vision_config.depth):
        p = f"visual.blocks.{i}."
        for mod in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            expected |= {p + mod + ".weight", p + mod + ".bias"}
    for mod in ("ln_q", "mlp.0", "mlp.2"):
        expected |= {f"visual.merger.{mod}.weight", f"visual.merger.{mod}.bias"}
    if not tied:
        expected.add("lm_head.weight")
    assert names == expected, f"extra {sorted(names - expected)}, missing {sorted(expected - names)}"

    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["tie_word_embeddings"] is tied
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]

    # the writer's names and values, checked twice: our strict inverse map and transformers' own
    # conversion of the released (4.45-era) names
    from transformers import Qwen2VLForConditionalGeneration

    theirs, info = Qwen2VLForConditionalGeneration.from_pretrained(
        ckpt, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = hf_inputs(case_inputs("one_image"))
    with torch.no_grad():
        ref = model(**inputs).logits
        for reloaded in (load_slimm_checkpoint_into_hf(ckpt), theirs.eval()):
            assert torch.equal(reloaded(**inputs).logits, ref)


def test_reference_positions_match_the_original_rule(checkpoints):
    """transformers 5.24 places M-RoPE ids like the original SliMM, up to a per-row shift (RoPE cannot see
    one; its forward numbers a left-padded text-only row from the first pad), except after a video whose t
    exceeds its merged h and w: those cases give the reference the original's ids instead."""
    for name, case in CASES.items():
        inputs = case_inputs(name)
        pos = hf_trace(checkpoints[case.tied][0], inputs)["llm.position_ids"]
        want = original_rope_index(inputs)
        same = True
        for b, row in enumerate(inputs["attention_mask"].bool()):
            got, ref = pos[:, b, row], want[:, b, row]
            same &= torch.equal(got - got[:, :1], ref - ref[:, :1])
        assert same != case.original_positions, name


def test_reference_is_sensitive_to_positions_and_padding(checkpoints):
    """The tolerance is meaningful: plain 1-D positions instead of M-RoPE, or attending to padding,
    move these logits by far more than TOL."""
    model = checkpoints[True][0]
    with torch.no_grad():
        inputs = hf_inputs(case_inputs("one_image"))
        ref = model(**inputs).logits
        flat = torch.arange(inputs["input_ids"].shape[1]).expand(3, 1, -1)
        assert max_rel_err(model(**inputs, position_ids=flat).logits, ref) > 100 * TOL

        inputs = hf_inputs(case_inputs("padded_batch"))
        ref = model(**inputs).logits
        unmasked = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
        pos = hf_trace(model, inputs)["llm.position_ids"]
        row0 = inputs["attention_mask"][:1]
        got = model(**unmasked, position_ids=pos).logits
        assert max_rel_err(got[:1], ref[:1], row0) > 100 * TOL


# --- slimm against transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_forward_logits_match(checkpoints, slimm_models, name):
    tied = CASES[name].tied
    inputs = case_inputs(name)
    with torch.no_grad():
        ref = checkpoints[tied][0](**ref_inputs(name)).logits
        ours = slimm_models[tied](**inputs).logits
    assert ours.dtype == torch.float32 and ours.shape == ref.shape, (ours.dtype, tuple(ours.shape))
    mask = inputs["attention_mask"]
    assert torch.isfinite(ours[mask.bool()]).all(), f"{name}: non-finite logits at valid positions"
    err = max_rel_err(ours, ref, mask)
    assert err <= TOL, f"{name}: rel err {err:.3e}; {worst_position(ours, ref, mask)}"


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generate_matches(checkpoints, slimm_models, name):
    tied = CASES[name].tied
    inputs = case_inputs(name)
    ref = hf_generate(checkpoints, name)
    prompt_len = inputs["input_ids"].shape[1]
    ref_logits = torch.stack(ref.logits, dim=1)  # (B, steps, V)

    # Guard, on the reference only: no stop token (so stopping cannot hide a difference) and every
    # step's top-2 gap wider than 2 * TOL * max|logits|: then any logits within TOL pick the same token.
    assert ref.sequences.shape[1] == prompt_len + NEW_TOKENS
    assert not torch.isin(ref.sequences[:, prompt_len:], torch.tensor(EOS_IDS)).any(), "pick another seed"
    scale = ref_logits.abs().amax(dim=(0, 2), keepdim=True)[..., 0]  # (1, steps)
    assert (top2_gap(ref_logits) > 2 * TOL * scale).all(), (
        f"{name}: near-tie in the reference; pick another seed"
    )

    with torch.no_grad():
        ours = slimm_models[tied].generate(**inputs, **generate_kwargs())
    assert torch.equal(ours.sequences, ref.sequences), (
        f"{name}: tokens differ\n ours {ours.sequences[:, prompt_len:].tolist()}\n ref  {ref.sequences[:, prompt_len:].tolist()}"
    )
    assert len(ours.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(ours.logits, ref.logits, strict=True)):
        err = max_rel_err(a, b)
        assert err <= TOL, f"{name}: step {step} logits rel err {err:.3e}"


@pytest.mark.parametrize("name", ["one_image", "padded_batch"])
def test_generate_stops_on_eos_override(checkpoints, slimm_models, name):
    """eos_token_id=<a token row r first produces at step k>: row r ends there (then pads), others go on."""
    tied = CASES[name].tied
    inputs = case_inputs(name)
    prompt_len = inputs["input_ids"].shape[1]
    new = hf_generate(checkpoints, name).sequences[:, prompt_len:]
    picks = [
        (r, k)
        for r in range(new.shape[0])
        for k in range(2, NEW_TOKENS - 2)
        if new[r, k] not in new[r, :k] and new[r, k] not in torch.cat([new[:r], new[r + 1 :]])
    ]
    assert picks, "no usable stop token in the reference run; pick another seed"
    row, step = picks[0]
    eos = int(new[row, step])

    kw = generate_kwargs(eos_token_id=eos)
    with torch.no_grad():
        ref = checkpoints[tied][0].generate(**ref_inputs(name), **kw)
        ours = slimm_models[tied].generate(**inputs, **kw)
    assert ref.sequences[row, prompt_len + step] == eos
    assert (ref.sequences[row, prompt_len + step + 1 :] == PAD_ID).all()
    assert torch.equal(ours.sequences, ref.sequences), (
        f"{name}: eos {eos}\n ours {ours.sequences[:, prompt_len:].tolist()}\n ref  {ref.sequences[:, prompt_len:].tolist()}"
    )
