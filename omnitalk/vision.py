"""Image input for the CLIP vision tower: loading (Pillow) and CLIP's preprocessing (numpy/torch).

`preprocess_image` reproduces OpenAI CLIP's torchvision pipeline without torchvision:
Resize(224, bicubic) -> CenterCrop(224) -> convert("RGB") -> ToTensor -> Normalize(CLIP mean/std).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from omnitalk.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Images with more pixels than this are refused before decoding (decompression-bomb guard).
MAX_IMAGE_PIXELS = 50_000_000

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]


class ImageError(InputError):
    """An image cannot be read or used."""


def _check_size(img: Image.Image, what: str) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{what} has zero size ({w}x{h}); pass an image with at least one pixel")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
            f"(omnitalk.vision.MAX_IMAGE_PIXELS); downscale it first (the model only sees 224x224)"
        )


def load_image(source: ImageSource, *, convert_rgb: bool = True) -> Image.Image:
    """Open `source` (a path, encoded image bytes, or a PIL image), fully decoded.

    With `convert_rgb` (the default) palette/RGBA/L/CMYK/... images are converted with
    `image.convert("RGB")`, as CLIP's `_convert_image_to_rgb` does. Pass `convert_rgb=False` to keep
    the file's mode: CLIP converts *after* resizing, which `preprocess_image` also does, so that is
    the bit-exact route for non-RGB files. Raises `ImageError` naming the problem and the fix.
    """
    if isinstance(source, Image.Image):
        _check_size(source, "image")
        return source.convert("RGB") if convert_rgb and source.mode != "RGB" else source

    if isinstance(source, (bytes, bytearray, memoryview)):
        what, data = f"image data ({len(source)} bytes)", bytes(source)
        if not data:
            raise ImageError("image data is empty (0 bytes); pass the bytes of a PNG/JPEG/... file")
        fp = io.BytesIO(data)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        what = f"image file {str(path)!r}"
        if not path.exists():
            raise ImageError(f"{what} does not exist; check the path")
        if not path.is_file():
            raise ImageError(f"{what} is not a regular file; pass the path of an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"{what} is empty (0 bytes); re-save or re-download the image")
        fp = path
    else:
        raise ImageError(
            f"cannot read an image from {type(source).__name__}; pass a path, encoded image bytes or a PIL.Image"
        )

    try:
        img = Image.open(fp)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is too large to decode safely ({e}); downscale it first") from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError from broken headers ...
        raise ImageError(
            f"{what} is not a readable image ({type(e).__name__}: {e}); pass a PNG, JPEG, WebP, GIF or BMP file"
        ) from None
    _check_size(img, what)
    try:
        img.load()  # decodes the pixels: truncated or corrupt data fails here
    except Exception as e:
        raise ImageError(
            f"{what} is truncated or corrupt ({type(e).__name__}: {e}); re-save or re-download the image"
        ) from None
    return img.convert("RGB") if convert_rgb and img.mode != "RGB" else img


def preprocess_image(img: Image.Image, size: int = 224) -> torch.Tensor:
    """CLIP's `_transform(size)` on a PIL image -> float32 tensor (3, size, size).

    Resize: shorter side -> `size`, longer side -> int(size * long / short) (truncation, as torchvision),
    PIL bicubic. CenterCrop: top/left = int(round((dim - size) / 2.0)). Then RGB, /255, CLIP mean/std.
    """
    if not isinstance(img, Image.Image):
        raise ImageError(f"preprocess_image expects a PIL.Image, got {type(img).__name__}; use load_image() first")
    _check_size(img, "image")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)  # PIL forces NEAREST for modes "1"/"P", as in CLIP
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")

    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (size, size, 3) uint8
    x = x.permute(2, 0, 1).to(torch.float32).div(255)  # (3, size, size) in [0, 1]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std
