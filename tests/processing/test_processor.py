"""Tests of slimm.model.processor: the original's SliMMQwen2VLProcessor interface."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from slimm.errors import InputError
from slimm.model.processor import BatchFeature, SliMMQwen2VLProcessor
from slimm.model.utils_vl import process_vision_info
from slimm.processing import Processor, Tokenizer, default_tokenizer_dir

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    shutil.copy(default_tokenizer_dir() / "tokenizer.json", path / "tokenizer.json")
    (path / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 200 * 28 * 28})
    )
    (path / "processor_config.json").write_text(json.dumps({"deepstack_type": "efficient"}))
    Image.fromarray(skdata.chelsea()).save(path / "cat.png")
    return path


@pytest.fixture(scope="module")
def processor(ckpt):
    return SliMMQwen2VLProcessor.from_pretrained(ckpt)


def _messages(ckpt):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(ckpt / "cat.png")},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]


def test_readme_flow_returns_torch_tensors(processor, ckpt):
    messages = _messages(ckpt)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(
        text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt"
    )
    assert isinstance(inputs, BatchFeature) and isinstance(inputs, dict)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    assert isinstance(inputs.input_ids, torch.Tensor) and inputs.input_ids.dtype == torch.int64
    assert inputs.attention_mask.dtype == torch.int64 and inputs.image_grid_thw.dtype == torch.int64
    assert inputs.pixel_values.dtype == torch.float32
    assert inputs.input_ids is inputs["input_ids"]
    # process_vision_info sized the cat to 448x308 (137984 px, within max_pixels 156800): grid 22 x 32
    np.testing.assert_array_equal(inputs.image_grid_thw.numpy(), [[1, 22, 32]])
    assert int((inputs.input_ids == 151655).sum()) == 22 * 32 // 4
    # the same numbers as the numpy Processor underneath
    ref = Processor.from_pretrained(ckpt)(text=[text], images=image_inputs)
    for key, value in ref.items():
        np.testing.assert_array_equal(inputs[key].numpy(), value)
    assert inputs.to("cpu") is inputs and inputs.input_ids.device.type == "cpu"
    half = BatchFeature(dict(inputs)).to("cpu", dtype=torch.bfloat16)
    assert half.pixel_values.dtype == torch.bfloat16 and half.input_ids.dtype == torch.int64
    with pytest.raises(AttributeError):
        _ = inputs.pixel_values_videos


def test_original_api_keeps_exif_orientation_as_stored(processor, tmp_path):
    # qwen-vl-utils' fetch_image and the transformers processor never apply EXIF orientation
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show it
    path = tmp_path / "phone.jpg"
    Image.fromarray(skdata.chelsea()[:140, :280]).save(path, exif=exif.tobytes())
    images, _ = process_vision_info([{"role": "user", "content": [{"type": "image", "image": str(path)}]}])
    assert images[0].size == (280, 140)
    np.testing.assert_array_equal(processor(images=images)["image_grid_thw"], [[1, 10, 20]])
    np.testing.assert_array_equal(processor(images=[Image.open(path)])["image_grid_thw"], [[1, 10, 20]])


def test_return_tensors_and_call_forms(processor, ckpt):
    image = Image.open(ckpt / "cat.png")
    as_np = processor(
        images=[image], text="<|vision_start|><|image_pad|><|vision_end|>hi", return_tensors="np"
    )
    assert isinstance(as_np.input_ids, np.ndarray) and as_np.input_ids.shape[0] == 1
    default = processor(
        [image], ["<|vision_start|><|image_pad|><|vision_end|>hi"]
    )  # original's positional order
    np.testing.assert_array_equal(default.input_ids, as_np.input_ids)
    only_pixels = processor(images=[image], return_tensors="pt")
    assert set(only_pixels) == {"pixel_values", "image_grid_thw"}
    with pytest.raises(InputError, match="return_tensors"):
        processor(text="hi", return_tensors="tf")


def test_batch_decode(processor):
    tok: Tokenizer = processor.tokenizer
    a, b = tok.encode("Hello , world !<|im_end|>"), tok.encode("It is n't<|endoftext|> bad .")
    assert len(a) == 5 and len(b) == 7
    rows = torch.tensor([[151643] * 2 + a, b])  # left-padded like generated output
    assert processor.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False) == [
        "Hello , world !",
        "It is n't bad .",
    ]
    assert processor.batch_decode(rows, clean_up_tokenization_spaces=True) == [
        "Hello, world!",
        "It isn't bad.",
    ]
    assert processor.batch_decode(rows[:1], skip_special_tokens=False) == [
        "<|endoftext|><|endoftext|>Hello , world !<|im_end|>"
    ]
    assert processor.decode(rows[1]) == "It is n't bad ."


def test_from_pretrained_options(processor, ckpt):
    assert processor.deepstack_type == "efficient"
    assert processor.image_processor.config.max_pixels == 200 * 28 * 28
    assert processor.tokenizer.token_to_id("<|image_pad|>") == 151655
    small = SliMMQwen2VLProcessor.from_pretrained(ckpt, max_pixels=56 * 56 * 4)
    out = small(images=[Image.open(ckpt / "cat.png")])
    assert int(out["image_grid_thw"].prod()) * 14 * 14 <= 56 * 56 * 4
    batched = processor.apply_chat_template([_messages(ckpt), _messages(ckpt)])
    assert isinstance(batched, list) and len(batched) == 2 and batched[0] == batched[1]
    ids = processor.apply_chat_template(_messages(ckpt), tokenize=True)
    assert ids[0] == 151644 and 151655 in ids
