"""The PyTorch model on tiny demo checkpoints of every variant: KV cache vs full recompute,
batches vs one prompt at a time, DeepStack placement, the Efficient re-patching, vision attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prompts import IMG, VID, chat, left_pad, patch_rows, rel_err, vision_block

from slimm.backends.torch import TorchBackend
from slimm.errors import InputError
from slimm.generate import GenerationConfig, generate

VARIANTS = ("plain", "v1", "midlayers", "efficient")


def one_image_inputs(model, g=(1, 4, 6), text=(1, 2, 3)):
    # for Efficient the grid counts 28-px patches; tokens are t*h*w/4 either way
    return {
        "input_ids": np.array([chat(vision_block(IMG, g), text)], dtype=np.int64),
        "pixel_values": patch_rows(model.config, [g]),
        "image_grid_thw": np.array([g], dtype=np.int64),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_decode_matches_full_recompute(torch_model, variant):
    model = torch_model(variant)
    inputs = one_image_inputs(model)
    out = TorchBackend(model).generate(
        **inputs, max_new_tokens=6, output_logits=True, return_dict_in_generate=True
    )
    seq = out.sequences
    full = model(
        input_ids=seq[:, :-1], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
    )
    S = inputs["input_ids"].shape[1]
    for i, step in enumerate(out.logits):
        assert rel_err(step[0], full.logits[0, S - 1 + i].numpy()) < 1e-5, f"step {i}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_matches_prompts_one_by_one(torch_model, variant):
    model = torch_model(variant)
    g1, g2 = (1, 4, 6), (1, 6, 4)
    p1 = chat(vision_block(IMG, g1), [11, 12, 13, 14, 15])
    p2 = chat([5, 6], vision_block(IMG, g2), [7])
    px1, px2 = patch_rows(model.config, [g1], 1), patch_rows(model.config, [g2], 2)
    backend = TorchBackend(model)
    cfg = GenerationConfig(max_new_tokens=8, stop_tokens=())
    single = []
    for ids, px, g in ((p1, px1, g1), (p2, px2, g2)):
        inp = {
            "input_ids": np.array([ids]),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "pixel_values": px,
            "image_grid_thw": np.array([g]),
        }
        single.append(generate(backend, inp, cfg))
    ids, mask = left_pad([p1, p2])
    S = ids.shape[1]
    batch = generate(
        backend,
        {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": np.concatenate([px1, px2]),
            "image_grid_thw": np.array([g1, g2]),
        },
        cfg,
    )
    for b in range(2):
        np.testing.assert_array_equal(batch.sequences[b, S:], single[b].sequences[0, -8:])
        for step in range(8):
            assert rel_err(batch.logits[step][b], single[b].logits[step][0]) < 1e-4


def test_deepstack_slices_land_on_layers_1_to_4(torch_model):
    """Hooks on the decoder layers: the visual positions' input to layer j differs from layer j-1's
    output by exactly slice j-1 for j = 1..4, and by nothing elsewhere."""
    model = torch_model("v1")
    inputs = one_image_inputs(model)
    ids = torch.from_numpy(inputs["input_ids"])
    _, slices, pos = model.embed(ids, torch.from_numpy(inputs["pixel_values"]), inputs["image_grid_thw"])
    seen_in, seen_out = {}, {}
    hooks = []
    for j, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, j=j: seen_in.__setitem__(j, a[0].clone())))
        hooks.append(layer.register_forward_hook(lambda m, a, o, j=j: seen_out.__setitem__(j, o[0].clone())))
    model(**inputs)
    for h in hooks:
        h.remove()
    d = model.config.text.hidden_size
    for j in range(1, len(model.model.layers)):
        diff = (seen_in[j] - seen_out[j - 1]).reshape(-1, d)
        expect = torch.zeros_like(diff)
        if 1 <= j <= 4:
            expect[pos] = slices[j - 1]
        torch.testing.assert_close(diff, expect, atol=1e-5, rtol=0)


def test_image_and_video_slices_in_prompt_order(torch_model):
    """A DeepStack prompt with a video before an image (the original crashes here): the slices of
    the video land on the video tokens and those of the image on the image tokens."""
    model = torch_model("midlayers")
    gv, gi = (2, 4, 4), (1, 4, 6)
    ids = chat(vision_block(VID, gv), [3], vision_block(IMG, gi))
    pv, pi = patch_rows(model.config, [gv], 3), patch_rows(model.config, [gi], 4)
    t_ids = torch.tensor([ids])
    _, slices, pos = model.embed(
        t_ids, torch.from_numpy(pi), np.array([gi]), torch.from_numpy(pv), np.array([gv])
    )
    _, s_img = model.visual.encode(torch.from_numpy(pi), np.array([gi]))
    _, s_vid = model.visual.encode(torch.from_numpy(pv), np.array([gv]))
    vid_pos = (t_ids[0] == VID).nonzero().squeeze(1)
    assert pos[:8].tolist() == vid_pos.tolist()
    torch.testing.assert_close(slices[:, :8], s_vid)
    torch.testing.assert_close(slices[:, 8:], s_img)
    # and the whole thing runs through generate with the cache
    out = TorchBackend(model).generate(
        input_ids=np.array([ids]),
        pixel_values=pi,
        image_grid_thw=np.array([gi]),
        pixel_values_videos=pv,
        video_grid_thw=np.array([gv]),
        max_new_tokens=3,
        eos_token_id=[],
    )
    assert out.shape == (1, len(ids) + 3)


def test_efficient_video_with_many_frames(torch_model):
    """Efficient splits rows per video by t*h*w (the original used h*w and failed past 2 frames)."""
    model = torch_model("efficient")
    g = (3, 4, 4)  # three temporal patches = six frames
    ids = chat(vision_block(VID, g))
    out = model(
        input_ids=np.array([ids]),
        pixel_values_videos=patch_rows(model.config, [g]),
        video_grid_thw=np.array([g]),
    )
    assert out.logits.shape == (1, len(ids), model.config.text.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_efficient_repatching_equals_direct_14px_patches():
    """Cutting the 28-px processor patches into 2x2 tower patches must give exactly the rows a
    14-px processor makes of the same image, in merge-window order of the doubled grid."""
    from slimm.config import PreprocessorConfig
    from slimm.host.vision_index import efficient_pixel_index
    from slimm.model.merger import efficient_split_patches
    from slimm.processing import ImageProcessor

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (112, 168, 3), dtype=np.uint8)  # multiples of 56: no resize either way
    coarse = ImageProcessor(PreprocessorConfig(patch_size=28))(images=[img])
    fine = ImageProcessor(PreprocessorConfig(patch_size=14))(images=[img])
    g = coarse["image_grid_thw"]
    rows = torch.from_numpy(coarse["pixel_values"])[torch.from_numpy(efficient_pixel_index(g, 2))]
    cut = efficient_split_patches(rows, 3, 2, 14).numpy()
    np.testing.assert_array_equal(fine["image_grid_thw"], g * np.array([1, 2, 2]))
    np.testing.assert_array_equal(cut, fine["pixel_values"])


def test_vision_attention_per_frame_equals_block_mask(torch_model):
    from slimm.host.vision_index import vision_chunks, vision_frame_ids, vision_rotary_ids

    model = torch_model("plain")
    grids = np.array([[1, 4, 6], [2, 4, 4]])
    px = torch.from_numpy(patch_rows(model.config, grids))
    rot = torch.from_numpy(vision_rotary_ids(grids, 2))
    frames = torch.from_numpy(vision_frame_ids(grids))
    with torch.no_grad():
        a, _ = model.visual(px, rot, frames, vision_chunks(grids))
        b, _ = model.visual(px, rot, frames, None)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_placeholder_count_mismatch_is_a_clear_error(torch_model):
    model = torch_model("plain")
    inputs = one_image_inputs(model)
    inputs["input_ids"] = inputs["input_ids"][:, 2:]
    inputs["input_ids"][0, 5] = 7  # one image token fewer
    with pytest.raises(InputError, match="image tokens"):
        model(**inputs)


def test_pixel_rows_must_match_grid(torch_model):
    model = torch_model("plain")
    inputs = one_image_inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"][:-4]
    with pytest.raises(InputError, match="grid_thw"):
        model(**inputs)


def test_model_generate_matches_the_torch_backend(demo_dir):
    from slimm.model.slimm import SliMMForConditionalGeneration

    model = SliMMForConditionalGeneration.from_pretrained(demo_dir("plain"), torch_dtype="float32")
    ids = torch.tensor([chat([1, 2, 3])])
    out = model.generate(input_ids=ids, max_new_tokens=4, eos_token_id=[])
    ref = TorchBackend.from_model(model).generate(input_ids=ids, max_new_tokens=4, eos_token_id=[])
    assert isinstance(out, torch.Tensor) and out.shape == (1, ids.shape[1] + 4)
    torch.testing.assert_close(out, ref)
