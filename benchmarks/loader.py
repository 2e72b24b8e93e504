"""Loader throughput per CPU core: fast (DCT-scaled JPEG decode) vs naive (full decode + resize).

Builds local webdataset shards from the real photographs that scikit-image and scikit-learn
ship (random crops re-encoded as JPEGs of about 40 KB whose shorter side is 300-512 px, as
img2dataset writes shards, with 10-25-word captions), then measures the *full* training
pipeline (read tar, decode, random-resized crop + bicubic resize, tokenize with the stage's
text strategy, collate into uint8/long tensors) in one process on one core (`data.workers=0`,
one torch thread), as samples per CPU-second, at 64, 84, 112 and 224 px. Fast and naive runs
alternate round by round, side by side in one run, and each keeps its best round (other
processes on a shared machine only ever slow a round down).

    python benchmarks/loader.py [--quick] [--images N] [--rounds R] [--sizes 64,84,112,224]

The last line printed is JSON: {"samples_per_s_per_core": {"fast": {"84": x, ...},
"naive": {"84": y, ...}}, "speedup": {...}, ...}.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clipa_ds.config import DataConfig, ImageStageConfig, StageConfig, TextStageConfig  # noqa: E402
from clipa_ds.data.pipeline import build_train_loader  # noqa: E402
from clipa_ds.data.tario import END_OF_ARCHIVE, member  # noqa: E402
from clipa_ds.data.tokenizer import CaptionTokenizer  # noqa: E402

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
                  "motorcycle_left", "retina", "rocket")
WORDS = ("a photo of the small red old car near big green tree with two dogs running on wet sandy beach "
         "under cloudy blue sky while people walk along wooden pier at sunset in quiet coastal town").split()


def photographs() -> list[np.ndarray]:
    """RGB uint8 photographs shipped inside scikit-image and scikit-learn (no downloads)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 (a photo missing from this skimage build is skipped)
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            photos.append(np.ascontiguousarray(image[:, :, :3]))
    photos.extend(load_sample_images().images)
    return photos


def make_jpeg(photo: np.ndarray, rng: random.Random, quality: int) -> bytes:
    """A random crop, rescaled so that its shorter side is 300-512 px, as a JPEG.

    Like the shards img2dataset writes (resize_mode=keep_ratio: the shorter side is set)."""
    height, width = photo.shape[:2]
    side = rng.randint(min(height, width) // 2, min(height, width))
    aspect = rng.uniform(0.75, 1.33)
    crop_w, crop_h = min(width, int(side * aspect)), min(height, int(side / aspect))
    x, y = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = Image.fromarray(photo[y : y + crop_h, x : x + crop_w])
    target = rng.randint(300, 512)
    scale = target / min(crop_w, crop_h)
    image = image.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def calibrate_quality(photos: list[np.ndarray], target_kb: float = 40.0) -> int:
    """JPEG quality whose mean file size on sample crops is closest to `target_kb`."""
    best, best_err = 85, float("inf")
    for quality in range(70, 96, 3):
        rng = random.Random(0)
        sizes = [len(make_jpeg(photos[rng.randrange(len(photos))], rng, quality)) for _ in range(32)]
        err = abs(np.mean(sizes) / 1024 - target_kb)
        if err < best_err:
            best, best_err = quality, err
    return best


def write_shards(out: Path, images: int, per_shard: int, seed: int) -> tuple[str, dict[str, float]]:
    photos = photographs()
    quality = calibrate_quality(photos)
    rng = random.Random(seed)
    sizes, sides = [], []
    shards = (images + per_shard - 1) // per_shard
    for shard in range(shards):
        with open(out / f"bench-{shard:06d}.tar", "wb") as handle:
            for i in range(shard * per_shard, min(images, (shard + 1) * per_shard)):
                jpeg = make_jpeg(photos[rng.randrange(len(photos))], rng, quality)
                caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 25)))
                handle.write(member(f"{i:08d}.jpg", jpeg) + member(f"{i:08d}.txt", caption.encode()))
                sizes.append(len(jpeg) / 1024)
                sides.append(min(Image.open(io.BytesIO(jpeg)).size))
            handle.write(END_OF_ARCHIVE)
    stats = {"photos": len(photos), "jpeg_quality": quality, "mean_jpeg_kb": round(float(np.mean(sizes)), 1),
             "jpeg_short_side_min": int(min(sides)), "jpeg_short_side_max": int(max(sides))}
    return f"{out}/bench-{{000000..{shards - 1:06d}}}.tar", stats


def stage_for(size: int) -> StageConfig:
    # CLIPA: low-res pre-training uses 8 syntax-masked tokens; 224 px fine-tuning 32 full tokens.
    text = TextStageConfig(context_length=8, strategy="syntax") if size < 224 else TextStageConfig(context_length=32)
    return StageConfig(name=f"bench{size}", samples=10**9, global_batch=64, image=ImageStageConfig(size=size), text=text)


def measure(urls: str, size: int, fast: bool, samples: int, tokenizer: CaptionTokenizer) -> float:
    """Samples per CPU-second of the whole pipeline in this process (one core).

    CPU time of this process, not wall time: on a shared machine, wall time also counts the
    time other processes hold the core, CPU time does not."""
    cfg = DataConfig(train_urls=urls, workers=0, shuffle_buffer=64, fast_decode=fast)
    loader = build_train_loader(cfg, stage_for(size), stage_index=0, rank=0, world_size=1, seed=0, micro_batch=32,
                                tokenizer=tokenizer)
    next(loader)  # warm-up: tokenizer model, first shard
    batches = max(1, samples // 32)
    start = time.process_time()
    for batch in itertools.islice(loader, batches):
        assert batch["image"].shape[-1] == size
    return batches * 32 / (time.process_time() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run for tests (~15 s)")
    parser.add_argument("--images", type=int, default=0, help="images in the shards (default 1024, quick 192)")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds per mode (default 3, quick 1)")
    parser.add_argument("--sizes", default="64,84,112,224")
    args = parser.parse_args(argv)
    images = args.images or (192 if args.quick else 1024)
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    tokenizer = CaptionTokenizer()
    results: dict[str, dict[str, float]] = {"fast": {}, "naive": {}}
    with tempfile.TemporaryDirectory(prefix="clipa-loader-bench-") as tmp:
        urls, stats = write_shards(Path(tmp), images, per_shard=64, seed=0)
        print(f"shards: {images} images, {stats}", file=sys.stderr)
        for size in sizes:
            best = {"fast": 0.0, "naive": 0.0}
            for _ in range(rounds):
                for mode in ("fast", "naive"):
                    best[mode] = max(best[mode], measure(urls, size, mode == "fast", images, tokenizer))
            for mode in best:
                results[mode][str(size)] = round(best[mode], 1)
            print(f"{size:>4} px  fast {best['fast']:8.1f}  naive {best['naive']:8.1f}  samples/s/core  "
                  f"x{best['fast'] / best['naive']:.2f}", file=sys.stderr)
    speedup = {s: round(results["fast"][s] / results["naive"][s], 2) for s in results["fast"]}
    print(json.dumps({"samples_per_s_per_core": results, "speedup": speedup, "images": images, "rounds": rounds,
                      **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
