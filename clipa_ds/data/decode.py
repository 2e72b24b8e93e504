"""Image and caption decoding for training samples.

Fast path: choose the random-resized-crop box from the JPEG *header* first, then ask libjpeg
for a DCT-scaled decode (`Image.draft`, 1/2, 1/4 or 1/8 scale) that still leaves the crop at
least `size` pixels wide, and finish with one antialiased resize of the crop. At 84 px most
web images decode at 1/4 or 1/8 scale, which skips most of the IDCT work. The naive path
decodes at full resolution and then does the same crop + resize (the usual torchvision way).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "text", "caption")


class BadSample(Exception):
    """A sample that cannot be used; `reason` names the counter to increment."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def crop_box(
    width: int, height: int, rng: random.Random, min_scale: float, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[float, float, float, float]:
    """torchvision-style RandomResizedCrop box (left, top, right, bottom) in source pixels."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x = rng.uniform(0, width - w)
            y = rng.uniform(0, height - h)
            return (x, y, x + w, y + h)
    # Fallback: the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    x, y = (width - w) / 2, (height - h) / 2
    return (x, y, x + w, y + h)


def decode_image(
    data: bytes, size: int, rng: random.Random, *, max_pixels: int, min_scale: float, fast: bool = True
) -> np.ndarray:
    """Encoded image -> random-resized crop as uint8 (size, size, 3). Raises BadSample."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except Image.DecompressionBombError as err:
        raise BadSample("oversized_image", str(err)) from None
    except Exception as err:  # PIL raises many types for garbage input
        raise BadSample("bad_image", type(err).__name__) from None
    if width * height > max_pixels:
        raise BadSample("oversized_image", f"{width}x{height} > {max_pixels} pixels")
    box = crop_box(width, height, rng, min_scale)
    try:
        if fast and image.format == "JPEG":
            # Largest DCT reduction that keeps the crop >= size on both sides; draft() picks
            # the largest scale whose result is still >= the requested size.
            reduce = max(1.0, min(box[2] - box[0], box[3] - box[1]) / size)
            image.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
            sx, sy = image.size[0] / width, image.size[1] / height
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        if image.mode != "RGB":
            image = image.convert("RGB")
        out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
        return np.asarray(out, dtype=np.uint8)  # (S, S, 3)
    except Image.DecompressionBombError as err:
        raise BadSample("oversized_image", str(err)) from None
    except Exception as err:  # truncated / corrupt data surfaces only at decode time
        raise BadSample("bad_image", type(err).__name__) from None


def decode_caption(files: dict[str, bytes]) -> str:
    """The sample's caption as text; raises BadSample(missing_caption | bad_text)."""
    raw = next((files[e] for e in TEXT_EXTENSIONS if e in files), None)
    if raw is None:
        raise BadSample("missing_caption")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("bad_text", "not UTF-8") from None
    if not text:
        raise BadSample("missing_caption", "empty caption")
    return text


def image_bytes(files: dict[str, bytes]) -> bytes:
    data = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    if data is None:
        raise BadSample("missing_image")
    return data
