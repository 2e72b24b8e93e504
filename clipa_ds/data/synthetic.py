"""Synthetic CLIP data: coloured shapes on noisy backgrounds, with varied captions.

Eight classes (4 colours x 2 shapes) that a tiny CLIP learns in a minute or two on CPU. Every
caption names the colour and the shape within its first six words, so that even 8-token
pre-training (CLIPA's short text) keeps the information. Generation is deterministic in
`seed` and fast (a few hundred microseconds per 64 px image on one core).
"""

from __future__ import annotations

import io
import os
import random
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipa_ds.data.tario import END_OF_ARCHIVE, member

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square")
CLASS_NAMES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]

_POSITIONS = {  # name -> (x, y) centre as a fraction of the image side
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
_TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {size} {colour} {shape} in a photo, at the {position}",
    "a {colour} {shape} on a {background} background",
    "{colour} {shape} at the {position}",
    "a picture of a {colour} {shape} in the {position} of the image",
    "there is a {size} {colour} {shape} here",
    "the {colour} {shape}",
    "a drawing of one {colour} {shape} on {background} noise",
)


class _NoiseBank:
    """Pre-drawn background noise; each image takes a random window (fast, deterministic)."""

    def __init__(self, image_size: int, seed: int) -> None:
        gen = np.random.default_rng(seed)
        self.size = image_size
        self.tiles = gen.integers(-18, 19, size=(8, 2 * image_size, 2 * image_size, 3), dtype=np.int16)

    def background(self, rng: random.Random, base: int) -> np.ndarray:
        t, x, y = rng.randrange(len(self.tiles)), rng.randrange(self.size), rng.randrange(self.size)
        window = self.tiles[t, y : y + self.size, x : x + self.size]
        return np.clip(window + base, 0, 255).astype(np.uint8)  # (S, S, 3)


_BANKS: dict[int, _NoiseBank] = {}


def render_sample(rng: random.Random, image_size: int, label: int | None = None) -> tuple[bytes, str, int]:
    """One scene: (JPEG bytes, caption, class label). All randomness comes from `rng`."""
    label = rng.randrange(len(CLASS_NAMES)) if label is None else label
    colour_name, shape = CLASS_NAMES[label].split(" ")
    dark = rng.random() < 0.5
    base = rng.randint(10, 70) if dark else rng.randint(170, 240)
    # Background: a flat grey plus per-pixel noise; the bank is fixed (seed 0) per image size so
    # that the output depends only on `rng`.
    bank = _BANKS.get(image_size) or _BANKS.setdefault(image_size, _NoiseBank(image_size, 0))
    image = Image.fromarray(bank.background(rng, base), "RGB")

    big = rng.random() < 0.5
    radius = image_size * (rng.uniform(0.16, 0.24) if big else rng.uniform(0.08, 0.13))
    position = rng.choice(list(_POSITIONS))
    fx, fy = _POSITIONS[position]
    cx = (fx + rng.uniform(-0.06, 0.06)) * image_size
    cy = (fy + rng.uniform(-0.06, 0.06)) * image_size
    jitter = lambda v: max(0, min(255, v + rng.randint(-25, 25)))  # noqa: E731
    fill = tuple(jitter(v) for v in COLOURS[colour_name])
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.rectangle(box, fill=fill)

    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    caption = rng.choice(_TEMPLATES).format(
        colour=colour_name,
        shape=shape,
        size="large" if big else "small",
        position=position,
        background="dark" if dark else "light",
    )
    return out.getvalue(), caption, label


def write_synthetic_shards(
    out_dir: str | os.PathLike[str],
    *,
    num_samples: int,
    samples_per_shard: int,
    image_size: int,
    seed: int,
    prefix: str = "train",
) -> list[str]:
    """Write webdataset shards `{prefix}-000000.tar`... (key.jpg, key.txt, key.cls); return paths.

    Keys are `{prefix}{global index:08d}`, unique across shards. Also writes `sizes.json`
    (webdataset's shard index: sample count per shard file name). Same seed -> same bytes.
    """
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError(f"num_samples={num_samples} and samples_per_shard={samples_per_shard} must be > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"clipa-synthetic/{seed}")
    paths: list[str] = []
    sizes: dict[str, int] = {}
    num_shards = (num_samples + samples_per_shard - 1) // samples_per_shard
    for shard in range(num_shards):
        path = out / f"{prefix}-{shard:06d}.tar"
        start = shard * samples_per_shard
        count = min(samples_per_shard, num_samples - start)
        with open(path, "wb") as tar:
            for index in range(start, start + count):
                jpeg, caption, label = render_sample(rng, image_size)
                key = f"{prefix}{index:08d}"
                tar.write(member(f"{key}.jpg", jpeg))
                tar.write(member(f"{key}.txt", caption.encode()))
                tar.write(member(f"{key}.cls", str(label).encode()))
            tar.write(END_OF_ARCHIVE)
        paths.append(str(path))
        sizes[path.name] = count
    (out / "sizes.json").write_text(json.dumps(sizes, indent=0, sort_keys=True))
    return paths


def write_synthetic_eval(
    out_dir: str | os.PathLike[str], *, num_samples: int, image_size: int, seed: int
) -> list[str]:
    """Held-out labelled shards (`eval-*.tar`); use a seed different from the training one."""
    return write_synthetic_shards(
        out_dir, num_samples=num_samples, samples_per_shard=num_samples, image_size=image_size,
        seed=seed + 1_000_003, prefix="eval",
    )


def synthetic_eval_arrays(num_samples: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """In-memory held-out set: (uint8 images (N, S, S, 3) after a JPEG round trip, labels (N,)).

    Classes are balanced (label = i % 8), so chance is exactly 1/8.
    """
    rng = random.Random(f"clipa-synthetic-eval/{seed}")
    images = np.empty((num_samples, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty((num_samples,), dtype=np.int64)
    for i in range(num_samples):
        jpeg, _, label = render_sample(rng, image_size, label=i % len(CLASS_NAMES))
        images[i] = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        labels[i] = label
    return images, labels
