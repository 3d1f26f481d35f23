import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnitalk import vision
from omnitalk.errors import InputError
from omnitalk.vision import ImageError, load_image, preprocess_image

PARITY = Path(__file__).resolve().parents[0] / "fixtures" / "parity"
IMAGE = PARITY / "inputs" / "image.png"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_matches_fixture():
    x = preprocess_image(load_image(IMAGE))
    expected = np.load(PARITY / "expected" / "clip_input.npy")
    assert x.dtype == torch.float32 and x.shape == (3, 224, 224)
    assert np.abs(x.numpy() - expected).max() < 1e-6


def test_sources_agree():
    from_path = load_image(IMAGE)
    from_bytes = load_image(IMAGE.read_bytes())
    from_pil = load_image(Image.open(IMAGE))
    for img in (from_path, from_bytes, from_pil):
        assert img.mode == "RGB" and img.size == (320, 240)
    assert torch.equal(preprocess_image(from_path), preprocess_image(from_bytes))
    assert torch.equal(preprocess_image(from_path), preprocess_image(from_pil))


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (100, 100), (500, 223), (7, 1000)])
def test_resize_and_crop_geometry(size):
    # a horizontal/vertical ramp shows where the crop lands
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = (np.arange(w) * 255 // max(w - 1, 1))[None, :]
    arr[..., 1] = (np.arange(h) * 255 // max(h - 1, 1))[:, None]
    x = preprocess_image(Image.fromarray(arr))
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "LA", "1"])
def test_non_rgb_modes_accepted(mode):
    img = Image.open(IMAGE).convert(mode)
    loaded = load_image(_png_bytes(img) if mode != "CMYK" else img)
    assert loaded.mode == "RGB"
    assert preprocess_image(loaded).shape == (3, 224, 224)
    # CLIP resizes before converting: the unconverted route works too
    raw = load_image(img, convert_rgb=False)
    assert raw.mode == mode and preprocess_image(raw).shape == (3, 224, 224)


def test_grayscale_convert_before_or_after_resize_is_identical():
    gray = Image.open(IMAGE).convert("L")
    assert torch.equal(preprocess_image(gray), preprocess_image(load_image(gray)))


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_random_bytes_rejected(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(data)
    p = tmp_path / "noise.jpg"
    p.write_bytes(data)
    with pytest.raises(ImageError, match="noise.jpg"):
        load_image(p)


def test_truncated_png_rejected(tmp_path):
    data = IMAGE.read_bytes()
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(p)
    with pytest.raises(ImageError):
        load_image(data[:20])  # header cut: not even identifiable


def test_error_is_input_error_and_value_error():
    with pytest.raises(InputError):
        load_image(b"not an image")
    with pytest.raises(ValueError):
        load_image(b"not an image")
    with pytest.raises(ImageError, match="PIL.Image"):
        load_image(12345)


def test_pixel_limit(monkeypatch):
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 320 * 240 - 1)
    with pytest.raises(ImageError, match="downscale"):
        load_image(IMAGE)
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        load_image(Image.new("RGB", (320, 240)))
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 320 * 240)
    assert load_image(IMAGE).size == (320, 240)


def test_zero_size_image():
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="zero size"):
        preprocess_image(Image.new("RGB", (5, 0)))
