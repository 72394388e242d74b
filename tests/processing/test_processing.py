"""Tests of slimm.processing: preprocessing against transformers' Qwen2-VL image processor, the
chat template, the tokenizer, placeholder expansion, M-RoPE ids and the Processor.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image
from prompts import IMG, PAD, VE, VID, VS, left_pad, vision_block

from slimm.config import PreprocessorConfig
from slimm.errors import CheckpointError, InputError
from slimm.host.positions import get_rope_index
from slimm.processing import (
    QWEN2_VL_CHAT_TEMPLATE,
    ImageProcessor,
    Processor,
    Tokenizer,
    apply_chat_template,
    default_tokenizer_dir,
    expand_vision_placeholders,
    smart_resize,
)

skdata = pytest.importorskip("skimage.data")


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pil():
    """transformers' Qwen2VLImageProcessor; without torchvision it is the PIL backend."""
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

    def make(cfg: PreprocessorConfig):
        return mod.Qwen2VLImageProcessorPil(
            patch_size=cfg.patch_size,
            merge_size=cfg.merge_size,
            temporal_patch_size=cfg.temporal_patch_size,
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
        )

    make.smart_resize = mod.smart_resize
    return make


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_tokenizer_dir())


def _photos() -> dict[str, np.ndarray]:
    coffee = skdata.coffee()
    return {
        "astronaut": skdata.astronaut(),  # 512x512
        "chelsea": skdata.chelsea(),  # 451x300
        "camera_grey": skdata.camera(),  # H x W, no channel axis
        "coffee_odd_crop": coffee[:301, :457],
        "rocket": skdata.rocket(),  # 640x427
        "coffee_tall": coffee[:, 200:263],  # 63x400: thin, several factors taller than wide
        "coffee_tiny": coffee[100:137, 50:111],  # 61x37, below min_pixels: scaled up
        "retina_big": skdata.retina()[:1211, :1411],  # over max_pixels: scaled down
    }


PHOTOS = _photos()


# ---------------------------------------------------------------------------------------------
# smart_resize and the image processor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [28, 56])
def test_smart_resize_matches_transformers(hf_pil, factor):
    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in (14, 28, 42, 70, 98, 300, 451, 1000) for w in (28, 42, 98, 427, 640)]
    sizes += [tuple(int(v) for v in rng.integers(20, 3000, 2)) for _ in range(300)]
    for h, w in sizes:
        for lo, hi in ((56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 256 * 28 * 28)):
            assert smart_resize(h, w, factor, lo, hi) == hf_pil.smart_resize(h, w, factor, lo, hi), (
                h,
                w,
                lo,
                hi,
            )


def test_smart_resize_rounds_halves_to_even():
    # 70/28 = 2.5 -> 2 and 98/28 = 3.5 -> 4 under Python's round; floor(x+0.5) would give 3 and 4
    assert smart_resize(70, 98, 28, 0, 10**9) == (56, 112)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(InputError, match="aspect ratio 300"):
        smart_resize(30, 9000)


@pytest.mark.parametrize("patch_size", [14, 28])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_image_processor_matches_transformers(hf_pil, patch_size, name):
    cfg = PreprocessorConfig(patch_size=patch_size)
    image = Image.fromarray(PHOTOS[name])
    ours = ImageProcessor(cfg)(images=[image])
    ref = hf_pil(cfg)(images=[image], return_tensors="np")
    assert ours["pixel_values"].dtype == np.float32
    assert ours["image_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-5


def test_image_processor_batch_and_custom_bounds(hf_pil):
    # several images at once, tighter bounds than the defaults (both branches of smart_resize)
    cfg = PreprocessorConfig(min_pixels=200 * 28 * 28, max_pixels=300 * 28 * 28)
    images = [Image.fromarray(PHOTOS[n]) for n in ("chelsea", "coffee_tiny", "retina_big", "camera_grey")]
    ours = ImageProcessor(cfg)(images=images)
    ref = hf_pil(cfg)(images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-5
    assert ours["pixel_values"].shape[0] == int(ours["image_grid_thw"].prod(-1).sum())


def test_image_processor_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 28, "max_pixels": 12345678}))
    proc = ImageProcessor.from_dir(tmp_path)
    assert proc.patch_size == 28 and proc.config.max_pixels == 12345678
    out = proc(images=Image.fromarray(PHOTOS["chelsea"]))
    assert out["pixel_values"].shape[1] == 3 * 2 * 28 * 28  # DeepStack-Efficient rows: 28-px patches
    # factor 56: 451x300 -> 448x280 (8 x 5 windows of 56 px) -> grid of 28-px patches 10 x 16
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 10, 16]])


def test_numpy_and_pil_inputs_agree():
    proc = ImageProcessor()
    rgb = PHOTOS["rocket"]
    a = proc(images=[rgb])
    b = proc(images=[Image.fromarray(rgb)])
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    grey = PHOTOS["camera_grey"]  # an H x W array is grey, repeated to three channels
    c = proc(images=grey)
    d = proc(images=Image.fromarray(grey).convert("RGB"))
    np.testing.assert_array_equal(c["pixel_values"], d["pixel_values"])


def test_rgba_alpha_is_dropped_not_blended():
    # The original pipeline (process_vision_info, transformers 4.4x) used PIL's convert("RGB"), which
    # drops alpha. transformers 5 composites onto white instead, so this case is not compared with it.
    rgb_arr = PHOTOS["chelsea"]
    alpha = np.zeros(rgb_arr.shape[:2], np.uint8)
    alpha[:, ::2] = 255  # half transparent: blending onto white would change those columns
    logo = np.concatenate([rgb_arr, alpha[..., None]], axis=2)
    proc = ImageProcessor()
    rgba = proc(images=Image.fromarray(logo, "RGBA"))
    rgb = proc(images=Image.fromarray(rgb_arr))
    np.testing.assert_array_equal(rgba["pixel_values"], rgb["pixel_values"])
    np.testing.assert_array_equal(proc(images=logo)["pixel_values"], rgb["pixel_values"])


def _frames(n: int) -> list[np.ndarray]:
    # distinct frames: a window sliding over a photo, 200x300 (not a multiple of 28: resized)
    astro = PHOTOS["astronaut"]
    return [np.ascontiguousarray(astro[10 * i : 10 * i + 200, 7 * i : 7 * i + 300]) for i in range(n)]


@pytest.mark.parametrize("nframes", [4, 3])
@pytest.mark.parametrize("patch_size", [14, 28])
def test_video_matches_per_frame_reference(hf_pil, nframes, patch_size):
    # transformers 5.24's Qwen2VLVideoProcessor imports torchvision, which is absent here, so the
    # reference is its image processor on each frame (resize, normalise, patch order all from
    # transformers), with frames paired along T by hand: temporal patch g holds frames 2g and 2g+1,
    # and an odd count repeats the last frame (the documented padding rule).
    cfg = PreprocessorConfig(patch_size=patch_size)
    P, Tp = patch_size, cfg.temporal_patch_size
    frames = _frames(nframes)
    ours = ImageProcessor(cfg)(videos=[[Image.fromarray(f) for f in frames]])
    ref = hf_pil(cfg)(images=[Image.fromarray(f) for f in frames], return_tensors="np")
    grid = ref["image_grid_thw"][0]
    per_frame = ref["pixel_values"].reshape(nframes, -1, 3, Tp, P, P)[:, :, :, 0]  # (F, rows, C, P, P)
    per_frame = np.concatenate([per_frame, per_frame[-1:].repeat(-nframes % Tp, 0)], axis=0)
    expected = np.stack([per_frame[g * Tp : (g + 1) * Tp] for g in range(len(per_frame) // Tp)])
    expected = expected.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 3 * Tp * P * P)  # (g, rows, C, T, P, P)
    assert "pixel_values" not in ours
    np.testing.assert_array_equal(ours["video_grid_thw"], [[(nframes + 1) // 2, grid[1], grid[2]]])
    assert ours["pixel_values_videos"].shape == expected.shape
    assert np.abs(ours["pixel_values_videos"] - expected).max() <= 1e-5


def test_video_input_forms_agree():
    torch = pytest.importorskip("torch")
    frames = _frames(4)
    proc = ImageProcessor()
    as_list = proc(videos=[Image.fromarray(f) for f in frames])  # one video given as its frame list
    as_thwc = proc(videos=np.stack(frames))
    as_tchw = proc(videos=[torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()])
    for other in (as_thwc, as_tchw):
        np.testing.assert_array_equal(other["pixel_values_videos"], as_list["pixel_values_videos"])
        np.testing.assert_array_equal(other["video_grid_thw"], as_list["video_grid_thw"])
    two = proc(videos=[np.stack(frames), np.stack(frames[:2])])
    np.testing.assert_array_equal(two["video_grid_thw"][:, 0], [2, 1])


def test_image_processor_errors(tmp_path):
    proc = ImageProcessor()
    with pytest.raises(InputError, match="empty"):
        proc(images=[])
    good = tmp_path / "photo.jpg"
    Image.fromarray(PHOTOS["chelsea"]).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.jpg"):
        proc(images=[str(cut)])
    with pytest.raises(InputError, match="cut.jpg"):
        proc(images=[Image.open(cut)])  # lazily opened: fails on decode
    with pytest.raises(InputError, match="aspect ratio"):
        proc(images=np.zeros((2, 700, 3), np.uint8))
    with pytest.raises(InputError, match="differ in size"):
        proc(videos=[_frames(1)[0], PHOTOS["chelsea"]])
    with pytest.raises(InputError, match="0..255"):
        proc(videos=np.full((2, 56, 56, 3), 300.0))


# ---------------------------------------------------------------------------------------------
# chat template
# ---------------------------------------------------------------------------------------------


def _user(*parts):
    return {"role": "user", "content": list(parts)}


def test_chat_template_single_image_exact():
    messages = [_user({"type": "image", "image": "x.jpg"}, {"type": "text", "text": "Describe this image."})]
    assert apply_chat_template(QWEN2_VL_CHAT_TEMPLATE, messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_variants():
    t = QWEN2_VL_CHAT_TEMPLATE
    conv = [
        {"role": "system", "content": "Be brief."},
        _user(
            {"type": "image", "image": "a"},
            {"image": "b"},
            {"type": "video", "video": "v"},
            {"text": "Compare."},
        ),
        {"role": "assistant", "content": "Same."},
        {"role": "user", "content": "Sure?"},
    ]
    assert apply_chat_template(t, conv, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n"
        "<|im_start|>assistant\nSame.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
    )
    with_ids = apply_chat_template(t, conv[1:2], add_vision_id=True)
    assert (
        "user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|>" in with_ids
    )
    assert "<|vision_end|>Video 1: <|vision_start|><|video_pad|>" in with_ids
    assert with_ids.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_helpers_and_errors():
    template = "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}{{ messages|tojson }}"
    assert (
        apply_chat_template(template, [{"role": "user", "content": "<ä>"}])
        == '[{"role": "user", "content": "<ä>"}]'
    )
    with pytest.raises(InputError, match="one message only"):
        apply_chat_template(template, [{"role": "user", "content": "a"}] * 2)
    with pytest.raises(InputError, match="role"):
        apply_chat_template(QWEN2_VL_CHAT_TEMPLATE, [{"content": "no role"}])
    with pytest.raises(CheckpointError, match="does not parse"):
        apply_chat_template("{% if %}", [{"role": "user", "content": "a"}])


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def test_special_tokens_have_documented_ids(tokenizer):
    documented = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    }
    for token, token_id in documented.items():
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.encode(token) == [token_id]
    assert tokenizer.token_to_id("<|no_such_token|>") is None
    assert tokenizer.vocab_size > 151656


def test_tokenizer_round_trip_and_matches_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    text = "<|im_start|>user\nHello, wörld! 你好 <|image_pad|><|image_pad|>  tabs\there 123456<|im_end|>\n"
    ids = tokenizer.encode(text)
    assert ids[0] == 151644 and ids.count(IMG) == 2  # no BOS; special tokens recognised in text
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == "user\nHello, wörld! 你好   tabs\there 123456\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    for s in (text, "Describe this image.", " leading space and trailing  ", "emoji 🙂 and\r\nnewlines\n\n"):
        assert tokenizer.encode(s) == hf.encode(s), s
    assert tokenizer.encode_batch(["a b", "c"]) == [tokenizer.encode("a b"), tokenizer.encode("c")]


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# placeholder expansion
# ---------------------------------------------------------------------------------------------


def test_expand_placeholders_counts_in_batch_order():
    texts = ["a<|image_pad|>b<|video_pad|>", "<|image_pad|>c<|image_pad|>"]
    images = np.array([[1, 4, 6], [1, 2, 2], [1, 8, 4]])
    videos = np.array([[3, 4, 4]])
    out = expand_vision_placeholders(texts, images, videos, merge_size=2)
    assert out[0] == "a" + "<|image_pad|>" * 6 + "b" + "<|video_pad|>" * 12
    assert out[1] == "<|image_pad|>" * 1 + "c" + "<|image_pad|>" * 8
    assert expand_vision_placeholders(["plain"], None, None, 2) == ["plain"]


def test_expand_placeholders_count_mismatch():
    with pytest.raises(InputError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
        expand_vision_placeholders(["<|image_pad|><|image_pad|>"], [[1, 2, 2]], None, 2)
    with pytest.raises(InputError, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image"):
        expand_vision_placeholders(["<|image_pad|>"], [[1, 2, 2], [1, 2, 2]], None, 2)
    with pytest.raises(InputError, match=r"1 <\|image_pad\|> placeholder\(s\) but 0 image"):
        expand_vision_placeholders(["<|image_pad|>"], None, None, 2)
    with pytest.raises(InputError, match=r"0 <\|video_pad\|> placeholder\(s\) but 1 video"):
        expand_vision_placeholders(["text"], None, [[2, 2, 2]], 2)


# ---------------------------------------------------------------------------------------------
# M-RoPE position ids
# ---------------------------------------------------------------------------------------------
# transformers 5.24's Qwen2VLModel.get_rope_index differs from the original SliMM's in three ways:
#   1. padded positions hold 0 there, 1 in the original;
#   2. after a visual block, text continues at start + max(h, w)/m there, at (max position so
#      far) + 1 in the original -- the same unless a video has t > max(h, w)/m;
#   3. its delta subtracts the number of unpadded tokens, the original's the padded length S.
# So the comparisons below cover unpadded positions, images and videos with t <= max(h, w)/m, and
# compare deltas only in the form delta_ours = delta_tf - (number of pad tokens).


@pytest.fixture(scope="module")
def hf_rope():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=256,
            bos_token_id=None,
            eos_token_id=None,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, spatial_merge_size=2),
    )
    model = transformers.Qwen2VLModel(cfg).eval()

    def run(ids, images, videos, mask):
        ids_t = torch.tensor(ids)
        types = torch.zeros_like(ids_t)
        types[ids_t == IMG] = 1
        types[ids_t == VID] = 2
        pos, delta = model.get_rope_index(
            ids_t,
            types,
            image_grid_thw=None if images is None else torch.tensor(images),
            video_grid_thw=None if videos is None else torch.tensor(videos),
            attention_mask=None if mask is None else torch.tensor(mask),
        )
        return pos.numpy(), delta.numpy()

    return run


def _text(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


CASES = {
    "image": ([_text(5) + vision_block(IMG, (1, 4, 6)) + _text(4)], [[1, 4, 6]], None),
    "two_images": (
        [_text(3) + vision_block(IMG, (1, 4, 4)) + _text(2) + vision_block(IMG, (1, 6, 2)) + _text(3)],
        [[1, 4, 4], [1, 6, 2]],
        None,
    ),
    "video": ([_text(4) + vision_block(VID, (2, 4, 6)) + _text(5)], None, [[2, 4, 6]]),
    "video_then_image": (
        [_text(2) + vision_block(VID, (3, 6, 4)) + _text(1) + vision_block(IMG, (1, 2, 4)) + _text(2)],
        [[1, 2, 4]],
        [[3, 6, 4]],
    ),
    "batch_multi_image": (
        [
            _text(2) + vision_block(IMG, (1, 4, 4)) + vision_block(IMG, (1, 2, 2)) + _text(6),
            _text(6) + vision_block(IMG, (1, 8, 4)) + _text(1),
        ],
        [[1, 4, 4], [1, 2, 2], [1, 8, 4]],
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("padded", [False, True])
def test_rope_index_matches_transformers(hf_rope, name, padded):
    rows, images, videos = CASES[name]
    if padded:
        rows = rows + [
            _text(max(map(len, rows)) + 5, 300)
        ]  # a longer text-only row: the others get left padding
        ids, mask = left_pad(rows)
    else:
        ids, mask = np.array(rows), None
    pos, delta = get_rope_index(ids, images, videos, mask)
    ref_pos, ref_delta = hf_rope(ids.tolist(), images, videos, None if mask is None else mask.tolist())
    assert pos.dtype == np.int64 and pos.shape == (3, *ids.shape) and delta.shape == (len(rows), 1)
    valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], ref_pos[:, valid])
    n_pad = (~valid).sum(-1, keepdims=True)
    np.testing.assert_array_equal(delta, ref_delta - n_pad)
    if padded:
        assert (pos[:, ~valid] == 1).all()


def test_rope_index_image_positions_by_hand():
    ids = np.array([_text(3) + vision_block(IMG, (1, 4, 6)) + _text(2)])
    pos, delta = get_rope_index(ids, [[1, 4, 6]])
    # 3 text + vision_start = positions 0..3; the 2x3 image grid starts at 4
    np.testing.assert_array_equal(pos[0, 0, :4], [0, 1, 2, 3])
    np.testing.assert_array_equal(pos[:, 0, 4:10], [[4] * 6, [4, 4, 4, 5, 5, 5], [4, 5, 6, 4, 5, 6]])
    np.testing.assert_array_equal(pos[:, 0, 10:], [[7, 8, 9]] * 3)  # vision_end, then text
    assert delta.tolist() == [[9 + 1 - 13]]


def test_rope_index_long_video_continues_after_max():
    # t = 6 > max(h, w)/m = 2: the original continues text at max + 1 = 1 + 5 + 1 = 7 (transformers: 3)
    ids = np.array([[VS] + [VID] * 24 + [VE] + _text(2)])
    pos, delta = get_rope_index(ids, video_grid_thw=[[6, 4, 4]])
    t = np.repeat(np.arange(6), 4) + 1
    h = np.tile([0, 0, 1, 1], 6) + 1
    w = np.tile([0, 1, 0, 1], 6) + 1
    np.testing.assert_array_equal(pos[:, 0, 1:25], np.stack([t, h, w]))
    np.testing.assert_array_equal(pos[:, 0, 25:], [[7, 8, 9]] * 3)
    assert delta.tolist() == [[10 - 28]]


def test_rope_index_padding_quirks():
    ids, mask = left_pad([_text(2) + vision_block(IMG, (1, 2, 2)) + _text(1), _text(3)])
    pos, delta = get_rope_index(ids, [[1, 2, 2]], None, mask)
    np.testing.assert_array_equal(pos[:, 1], [[1, 1, 1, 0, 1, 2]] * 3)  # pads hold 1
    assert delta.tolist() == [[0], [3 - 6]]  # max + 1 - S with S the padded length
    # text only: cumsum of the mask, pads = 1, delta = max + 1 - S
    pos, delta = get_rope_index(np.array([[PAD, PAD, 5, 6, 7]]), attention_mask=np.array([[0, 0, 1, 1, 1]]))
    np.testing.assert_array_equal(pos, [[[1, 1, 0, 1, 2]]] * 3)
    assert delta.tolist() == [[-2]]
    pos, delta = get_rope_index(np.array([[5, 6, 7], [8, 9, 10]]))
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(3), (3, 2, 3)))
    assert delta.tolist() == [[0], [0]]


def test_rope_index_accepts_torch_and_lists():
    torch = pytest.importorskip("torch")
    rows, images, _ = CASES["two_images"]
    ref_pos, ref_delta = get_rope_index(np.array(rows), np.array(images))
    pos, delta = get_rope_index(
        torch.tensor(rows), torch.tensor(images), attention_mask=torch.ones(1, len(rows[0]))
    )
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)
    pos, _ = get_rope_index(rows[0], images)  # one sequence as a plain list: batch of one
    np.testing.assert_array_equal(pos, ref_pos)


def test_rope_index_mismatch_errors():
    ids = np.array([_text(2) + vision_block(IMG, (1, 4, 4)) + vision_block(IMG, (1, 4, 4))])
    with pytest.raises(InputError, match="more images than image_grid_thw has rows"):
        get_rope_index(ids, [[1, 4, 4]])
    with pytest.raises(InputError, match="does not match"):
        get_rope_index(ids, [[1, 4, 4], [1, 4, 8]])


# ---------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------


def _image_message(text="Describe this image."):
    return [_user({"type": "image"}, {"type": "text", "text": text})]


def test_processor_left_pads_and_expands(tokenizer):
    proc = Processor(tokenizer)
    chelsea = Image.fromarray(PHOTOS["chelsea"])
    texts = [proc.apply_chat_template(_image_message()), proc.apply_chat_template([_user({"text": "Hi"})])]
    out = proc(text=texts, images=[chelsea])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    grid = out["image_grid_thw"][0]
    n_img = int(grid.prod()) // 4
    assert (ids[0] == IMG).sum() == n_img
    short = tokenizer.encode(texts[1])
    n_pad = ids.shape[1] - len(short)
    assert n_pad > 0 and mask[0].all()
    np.testing.assert_array_equal(ids[1, :n_pad], [PAD] * n_pad)
    np.testing.assert_array_equal(ids[1, n_pad:], short)
    np.testing.assert_array_equal(mask[1], [0] * n_pad + [1] * len(short))
    np.testing.assert_array_equal(out["pixel_values"], ImageProcessor()(images=[chelsea])["pixel_values"])
    assert proc.batch_decode(ids[1:])[0] == "system\nYou are a helpful assistant.\nuser\nHi\nassistant\n"
    with pytest.raises(InputError, match="padding=True"):
        proc(text=texts, images=[chelsea], padding=False)
    with pytest.raises(InputError, match="placeholder"):
        proc(text=texts[1], images=[chelsea])


def _sideways_jpeg(path):
    """A 280x140 (w x h) JPEG whose EXIF orientation 6 says: turn 90 degrees clockwise to show it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(PHOTOS["chelsea"][:140, :280]).save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_turns_images_upright(tmp_path):
    from slimm.processing.messages import process_vision_info

    path = _sideways_jpeg(tmp_path / "phone.jpg")
    stored = np.asarray(Image.open(path).convert("RGB"))
    upright = ImageProcessor()(images=np.rot90(stored, k=-1))  # turned clockwise by hand
    np.testing.assert_array_equal(upright["image_grid_thw"], [[1, 20, 10]])  # 280 high, 140 wide
    for image in (str(path), path, Image.open(path), path.read_bytes()):
        out = ImageProcessor()(images=[image])
        np.testing.assert_array_equal(out["image_grid_thw"], upright["image_grid_thw"])
        np.testing.assert_array_equal(out["pixel_values"], upright["pixel_values"])
    as_stored = ImageProcessor(exif_transpose=False)(images=[str(path)])
    np.testing.assert_array_equal(as_stored["image_grid_thw"], [[1, 10, 20]])
    # the CLI's loader (message items) turns it upright too, and the Processor does not turn it again
    images, _ = process_vision_info([_user({"type": "image", "image": str(path)})])
    assert images[0].size == (140, 280)
    np.testing.assert_array_equal(ImageProcessor()(images=images)["image_grid_thw"], [[1, 20, 10]])


def test_frame_folder_sorts_numerically(tmp_path):
    from slimm.processing.messages import process_vision_info

    for i in range(1, 11):  # frame i is flat red 20*i: string order would put frame_10 second
        Image.fromarray(np.full((56, 56, 3), (20 * i, 0, 0), np.uint8)).save(tmp_path / f"frame_{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    _, videos = process_vision_info([_user({"type": "video", "video": str(tmp_path)})])
    assert [int(np.asarray(f)[0, 0, 0]) for f in videos[0]] == [20 * i for i in range(1, 11)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .png"):
        process_vision_info([_user({"type": "video", "video": str(tmp_path / "empty")})])


def test_one_frame_video_file_is_like_a_one_frame_folder(tmp_path):
    av = pytest.importorskip("av")
    from slimm.processing.messages import process_vision_info

    frame = np.ascontiguousarray(PHOTOS["chelsea"][:96, :128])
    (tmp_path / "frames").mkdir()
    Image.fromarray(frame).save(tmp_path / "frames" / "0.png")
    path = tmp_path / "one.mkv"
    with av.open(str(path), "w") as container:  # lossless FFV1: the decoded frame is the PNG's
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "bgr0"
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    size = {"resized_height": 112, "resized_width": 140}
    outs = []
    for source in (str(path), str(tmp_path / "frames")):
        _, videos = process_vision_info([_user({"type": "video", "video": source, **size})])
        outs.append(ImageProcessor()(videos=[np.stack([np.asarray(f) for f in videos[0]])]))
    np.testing.assert_array_equal(outs[0]["video_grid_thw"], [[1, 8, 10]])
    np.testing.assert_array_equal(outs[0]["video_grid_thw"], outs[1]["video_grid_thw"])
    np.testing.assert_array_equal(outs[0]["pixel_values_videos"], outs[1]["pixel_values_videos"])


def test_one_string_is_one_image(tmp_path, tokenizer):
    from slimm.backends.base import Backend

    class Stub(Backend):  # prepare only: no model behind it
        name, load, new_cache, prefill_rows, decode_rows = "stub", None, None, None, None

    path = tmp_path / "photo.jpg"
    Image.fromarray(PHOTOS["chelsea"]).save(path)
    proc = Processor(tokenizer)
    want = proc(images=[str(path)])["image_grid_thw"]
    for images in (str(path), path, [str(path)]):
        out = Stub(None, proc).prepare("What is this?", images=images)
        np.testing.assert_array_equal(out["image_grid_thw"], want)
        assert (out["input_ids"] == IMG).sum() == int(want.prod()) // 4
    text = proc.apply_chat_template(_image_message())
    np.testing.assert_array_equal(proc(text=text, images=str(path))["image_grid_thw"], want)
    frames = [PHOTOS["chelsea"][:56, :56]] * 2
    out = Stub(None, proc).prepare("And this?", videos=np.stack(frames))  # one video, not two frames
    np.testing.assert_array_equal(out["video_grid_thw"], [[1, 4, 4]])


def test_processor_without_tokenizer_processes_images():
    proc = Processor(None)
    out = proc(images=[PHOTOS["rocket"]])
    assert set(out) == {"pixel_values", "image_grid_thw"}
    with pytest.raises(InputError, match="no tokenizer"):
        proc(text="hello")
    assert proc.apply_chat_template(_image_message()).startswith("<|im_start|>system")


def test_processor_from_pretrained(tmp_path):
    src = default_tokenizer_dir()
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"image_token_id": 151654, "vision_end_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"pad_token_id": 151645}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 28, "min_pixels": 3136}))
    proc = Processor.from_pretrained(tmp_path)
    assert proc.image_token_id == 151654 and proc.vision_end_token_id == 7
    assert proc.video_token_id == 151656 and proc.vision_start_token_id == 151652
    assert proc.pad_token_id == 151645
    assert proc.image_processor.patch_size == 28
    assert proc.chat_template == QWEN2_VL_CHAT_TEMPLATE  # no template anywhere: the built-in one
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "TC {{ messages[0].content }}"})
    )
    assert Processor.from_pretrained(tmp_path).apply_chat_template([{"role": "u", "content": "x"}]) == "TC x"
    (tmp_path / "chat_template.json").write_text(
        json.dumps({"chat_template": "CJ {{ messages[0].content }}"})
    )
    assert Processor.from_pretrained(tmp_path).apply_chat_template([{"role": "u", "content": "x"}]) == "CJ x"
    out = Processor.from_pretrained(tmp_path)(text=["a", "abc abc"])
    assert out["input_ids"][0, 0] == 151645  # left padded with generation_config's pad id

    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Processor.from_pretrained(tmp_path)
    assert Processor.from_pretrained(tmp_path, tokenizer_dir=src).tokenizer is not None
