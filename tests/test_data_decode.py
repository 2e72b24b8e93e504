"""Decoding: DCT-scaled fast path matches the full decode, bad input is classified, synthetic data."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipa_ds.data.decode import BadSample, crop_box, decode_caption, decode_image
from clipa_ds.data.synthetic import CLASS_NAMES, render_sample, synthetic_eval_arrays, write_synthetic_shards
from clipa_ds.data.tario import iter_samples

REPO = Path(__file__).resolve().parent.parent


def photo_jpeg(side: int = 448) -> bytes:
    from sklearn.datasets import load_sample_images

    image = Image.fromarray(load_sample_images().images[0]).resize((side, side * 2 // 3))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("size", [64, 84, 224])
def test_fast_decode_matches_full_decode(size: int) -> None:
    data = photo_jpeg()
    fast = decode_image(data, size, random.Random(1), max_pixels=10**8, min_scale=0.9, fast=True)
    naive = decode_image(data, size, random.Random(1), max_pixels=10**8, min_scale=0.9, fast=False)
    assert fast.shape == naive.shape == (size, size, 3) and fast.dtype == np.uint8
    # Same crop; DCT scaling only changes the low-pass filter: a few grey levels on average.
    assert np.abs(fast.astype(int) - naive.astype(int)).mean() < 6


def test_crop_box_stays_inside_and_respects_scale() -> None:
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(50, 900), rng.randint(50, 900)
        left, top, right, bottom = crop_box(w, h, rng, min_scale=0.5)
        assert 0 <= left < right <= w + 1e-6 and 0 <= top < bottom <= h + 1e-6
        assert (right - left) * (bottom - top) >= 0.5 * w * h * 0.99 or not (0.75 <= w / h <= 4 / 3)


def test_bad_images_and_captions_are_classified() -> None:
    rng = random.Random(0)
    with pytest.raises(BadSample) as err:
        decode_image(b"garbage", 32, rng, max_pixels=10**6, min_scale=0.9)
    assert err.value.reason == "bad_image"
    truncated = photo_jpeg()[:3000]
    with pytest.raises(BadSample) as err:
        decode_image(truncated, 32, rng, max_pixels=10**6, min_scale=0.9)
    assert err.value.reason == "bad_image"
    big = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(big, format="PNG")
    with pytest.raises(BadSample) as err:
        decode_image(big.getvalue(), 32, rng, max_pixels=10**6, min_scale=0.9)
    assert err.value.reason == "oversized_image"
    assert decode_caption({"txt": " a red circle \n".encode()}) == "a red circle"
    for files, reason in [({}, "missing_caption"), ({"txt": b" "}, "missing_caption"), ({"txt": b"\xff\xfe"}, "bad_text")]:
        with pytest.raises(BadSample) as err:
            decode_caption(files)
        assert err.value.reason == reason


def test_synthetic_shards_are_deterministic_and_learnable(tmp_path: Path) -> None:
    a = write_synthetic_shards(tmp_path / "a", num_samples=80, samples_per_shard=32, image_size=64, seed=7)
    b = write_synthetic_shards(tmp_path / "b", num_samples=80, samples_per_shard=32, image_size=64, seed=7)
    assert [Path(p).name for p in a] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all(Path(x).read_bytes() == Path(y).read_bytes() for x, y in zip(a, b))
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {
        "train-000000.tar": 32, "train-000001.tar": 32, "train-000002.tar": 16}
    samples = [s for p in a for s in iter_samples(open(p, "rb"))]
    assert len({s.key for s in samples}) == 80
    for s in samples:
        label = int(s.files["cls"])
        colour, shape = CLASS_NAMES[label].split()
        words = s.files["txt"].decode().split()[:6]
        assert colour in words and shape in words  # survives 8-token pre-training
        image = np.asarray(Image.open(io.BytesIO(s.files["jpg"])))
        assert image.shape == (64, 64, 3)
    assert len({int(s.files["cls"]) for s in samples}) == len(CLASS_NAMES) == 8


def test_synthetic_colour_is_visible_in_pixels() -> None:
    images, labels = synthetic_eval_arrays(64, 48, seed=0)
    assert images.shape == (64, 48, 48, 3) and list(np.bincount(labels)) == [8] * 8
    # The shape's colour dominates the most saturated pixels: red > blue for red classes.
    for image, label in zip(images, labels):
        pixels = image.reshape(-1, 3).astype(int)
        saturated = pixels[np.argsort(pixels.max(1) - pixels.min(1))[-20:]].mean(0)
        colour = CLASS_NAMES[label].split()[0]
        channel = {"red": 0, "green": 1, "blue": 2, "yellow": 0}[colour]
        assert saturated.argmax() == channel or (colour == "yellow" and saturated[1] > saturated[2])


def test_synthetic_generation_is_fast() -> None:
    rng = random.Random(0)
    render_sample(rng, 64)
    start = time.perf_counter()
    for _ in range(500):
        render_sample(rng, 64)
    assert (time.perf_counter() - start) / 500 < 0.004  # 40k images well under 3 minutes even on a busy core


@pytest.mark.slow
def test_loader_benchmark_quick_mode_prints_json() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader.py"), "--quick", "--sizes", "84"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rates = result["samples_per_s_per_core"]
    assert rates["fast"]["84"] > 0 and rates["naive"]["84"] > 0
    assert rates["fast"]["84"] > rates["naive"]["84"]  # DCT scaling must win at low resolution
    assert 300 <= result["jpeg_short_side_min"] <= result["jpeg_short_side_max"] <= 512
    assert 25 <= result["mean_jpeg_kb"] <= 55
