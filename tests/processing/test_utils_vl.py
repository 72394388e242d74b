"""Tests of slimm.model.utils_vl: opening and pre-sizing images and videos named in messages."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from slimm.errors import InputError
from slimm.model import utils_vl
from slimm.model.utils_vl import fetch_image, fetch_video, process_vision_info, smart_nframes, smart_resize
from slimm.processing import ImageProcessor
from slimm.processing import smart_resize as hf_smart_resize

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    Image.fromarray(skdata.chelsea()).save(path)  # 451x300, lossless
    return path


def _expected(path, size):
    return np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC))


def test_fetch_image_sources_agree(photo_path):
    # 300/28 = 10.7 -> 11, 451/28 = 16.1 -> 16: (308, 448); pixels are PIL's bicubic resize
    expected = _expected(photo_path, (448, 308))
    b64 = "data:image/png;base64," + base64.b64encode(photo_path.read_bytes()).decode()
    sources = [str(photo_path), photo_path, f"file://{photo_path}", b64, Image.open(photo_path)]
    for source in sources:
        image = fetch_image({"type": "image", "image": source})
        assert image.mode == "RGB" and image.size == (448, 308), source
        np.testing.assert_array_equal(np.asarray(image), expected)
    assert fetch_image({"image_url": str(photo_path)}).size == (448, 308)


def test_fetch_image_size_options(photo_path):
    assert fetch_image({"image": str(photo_path), "resized_height": 100, "resized_width": 150}).size == (
        140,
        112,
    )
    small = fetch_image({"image": str(photo_path), "max_pixels": 64 * 28 * 28})
    # beta = sqrt(451*300/50176) = 1.642: floor(274.7/28)*28 = 252, floor(182.7/28)*28 = 168
    assert small.size == (252, 168)
    big = fetch_image({"image": str(photo_path), "min_pixels": 400 * 28 * 28})
    # beta = sqrt(313600/135300) = 1.522: ceil(456.7/28)*28 = 476, ceil(686.6/28)*28 = 700
    assert big.size == (700, 476)


def test_fetch_image_converts_grey_and_rgba(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(skdata.camera()).save(grey)
    image = fetch_image({"image": str(grey)})
    assert image.mode == "RGB" and image.size == (504, 504)
    arr = np.asarray(image)
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])
    rgba = np.concatenate([skdata.chelsea(), np.zeros((300, 451, 1), np.uint8)], axis=2)  # fully transparent
    out = fetch_image({"image": Image.fromarray(rgba, "RGBA")})
    # alpha dropped, not blended onto white: the colours survive
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(Image.fromarray(skdata.chelsea()).resize((448, 308)))
    )


def test_original_smart_resize_differs_from_transformers_only_on_tiny_sides():
    # a side under factor/2 is raised to factor first (original), vs rounded to 0 (transformers)
    assert smart_resize(10, 100, 28, 56 * 56, 28 * 28 * 1280) == (28, 112)
    assert hf_smart_resize(10, 100, 28, 56 * 56, 28 * 28 * 1280) == (28, 196)
    for h, w in ((300, 451), (512, 512), (1211, 1411), (63, 400), (37, 61)):
        assert smart_resize(h, w) == hf_smart_resize(h, w, 28, utils_vl.MIN_PIXELS, utils_vl.MAX_PIXELS)


def test_fetch_image_errors(tmp_path, photo_path):
    with pytest.raises(InputError, match="download"):
        fetch_image({"image": "https://example.com/cat.jpg"})
    cut = tmp_path / "cut.png"
    cut.write_bytes(photo_path.read_bytes()[:5000])
    with pytest.raises(InputError, match="cut.png"):
        fetch_image({"image": str(cut)})
    with pytest.raises(InputError, match="missing.jpg"):
        fetch_image({"image": str(tmp_path / "missing.jpg")})
    with pytest.raises(InputError, match="base64"):
        fetch_image({"image": "data:image/png;base64,bm90IGFuIGltYWdl"})
    with pytest.raises(InputError, match="aspect ratio 300"):
        fetch_image({"image": Image.new("RGB", (3000, 10))})


def test_process_vision_info(photo_path):
    frames = [Image.fromarray(skdata.astronaut()[i * 20 : i * 20 + 200, :300]) for i in range(3)]
    messages = [
        {"role": "system", "content": "plain text"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(photo_path)},
                {"type": "text", "text": "and"},
                {"type": "video", "video": frames},
                {"type": "image", "image": Image.open(photo_path), "max_pixels": 64 * 28 * 28},
            ],
        },
    ]
    images, videos = process_vision_info(messages)
    assert [im.size for im in images] == [(448, 308), (252, 168)]
    assert len(videos) == 1 and len(videos[0]) == 4  # 3 frames padded to an even count
    assert videos[0][3] is videos[0][2]  # by repeating the last one
    assert all(f.size == (308, 196) for f in videos[0])
    images, videos = process_vision_info([[messages[1]], [messages[0]]])  # a batch of conversations
    assert len(images) == 2 and len(videos) == 1
    assert process_vision_info([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == (
        None,
        None,
    )


def test_smart_nframes():
    assert smart_nframes({}, total_frames=25, video_fps=10) == 4  # 5 frames at 2 fps, rounds half to even
    assert smart_nframes({}, total_frames=300, video_fps=30) == 20
    assert smart_nframes({"fps": 1, "min_frames": 8}, total_frames=300, video_fps=30) == 10
    assert smart_nframes({"fps": 1, "min_frames": 16}, total_frames=300, video_fps=30) == 16
    assert smart_nframes({"nframes": 7}, total_frames=300, video_fps=30) == 8
    assert smart_nframes({}, total_frames=3000, video_fps=1) == 768
    with pytest.raises(InputError, match="either 'fps' or 'nframes'"):
        smart_nframes({"fps": 1, "nframes": 4}, 100, 30)
    with pytest.raises(InputError, match="has 10"):
        smart_nframes({"nframes": 12}, total_frames=10, video_fps=30)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    av = pytest.importorskip("av")
    # lossless FFV1 in Matroska, so every frame keeps its exact colour; Matroska stores no frame
    # count, so the reader must count the frames itself
    path = tmp_path_factory.mktemp("vid") / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        for i in range(25):  # 2.5 s; frame i is a flat colour with red = 10 * i
            frame = np.empty((48, 64, 3), np.uint8)
            frame[...] = (10 * i, 128, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _reds(video: torch.Tensor) -> list[float]:
    return video[:, 0].mean(dim=(1, 2)).tolist()


def test_fetch_video_file(video_path):
    video = fetch_video({"type": "video", "video": f"file://{video_path}"})
    # 2.5 s at fps 2 -> 5 -> round(2.5) * 2 = 4 frames at linspace(0, 24, 4) = 0, 8, 16, 24
    # 48x64 is under VIDEO_MIN_PIXELS: scaled up to smart_resize(48, 64, 28, 128*28*28) = (280, 392)
    assert video.dtype == torch.float32 and tuple(video.shape) == (4, 3, 280, 392)
    assert torch.equal(video, video.round()) and video.min() >= 0 and video.max() <= 255
    np.testing.assert_array_equal(_reds(video), [0, 80, 160, 240])
    video = fetch_video({"video": str(video_path), "nframes": 6, "resized_height": 56, "resized_width": 84})
    assert tuple(video.shape) == (6, 3, 56, 84)
    # frames at linspace(0, 24, 6) = 0, 4.8, 9.6, 14.4, 19.2, 24 rounded
    np.testing.assert_array_equal(_reds(video), [0, 50, 100, 140, 190, 240])
    # the processor takes the tensor as a video: 6 frames -> 3 temporal patches of (56/14, 84/14)
    out = ImageProcessor()(videos=[video])
    np.testing.assert_array_equal(out["video_grid_thw"], [[3, 4, 6]])


def test_fetch_video_window_and_pixel_budget(video_path):
    video = fetch_video({"video": str(video_path), "video_start": 1.0, "video_end": 2.0, "nframes": 4})
    np.testing.assert_array_equal(_reds(video), [100, 130, 170, 200])  # frames 10..20
    # total_pixels caps each frame at total / nframes * 2 pixels: 4*784 / 4 * 2 -> 28x28 (uncapped: 56x56)
    small = fetch_video({"video": str(video_path), "min_pixels": 28 * 28, "total_pixels": 4 * 28 * 28})
    assert tuple(small.shape) == (4, 3, 28, 28)
    assert tuple(fetch_video({"video": str(video_path), "min_pixels": 28 * 28}).shape) == (4, 3, 56, 56)
    assert tuple(fetch_video({"video": str(video_path), "max_pixels": 2 * 28 * 28}).shape) == (4, 3, 28, 28)
    with pytest.raises(InputError, match="raise max_pixels"):  # the original would resize to 0 rows
        fetch_video({"video": str(video_path), "max_pixels": 28 * 28})


def test_fetch_video_errors(tmp_path, video_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(InputError, match="broken.mp4"):
        fetch_video({"video": str(bad)})
    with pytest.raises(InputError, match="missing.mp4"):
        fetch_video({"video": str(tmp_path / "missing.mp4")})
    with pytest.raises(InputError, match="download"):
        fetch_video({"video": "https://example.com/a.mp4"})
    with pytest.raises(InputError, match="has 25"):
        fetch_video({"video": str(video_path), "nframes": 40})
    with pytest.raises(InputError, match="empty"):
        fetch_video({"video": []})
