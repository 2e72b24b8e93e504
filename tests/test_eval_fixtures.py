"""Fixtures for the evaluation tests: id-coded shards, a table model and brute-force references.

The table model makes distributed-vs-single-process comparisons exact: every image carries its
sample id in its colour (R + 256 G, PNG, so lossless) and the model returns a fixed embedding per
id; every caption/prompt maps to a fixed text embedding. The brute-force references below rank
with a plain stable argsort, independently of clipa_ds.evaluate.metrics.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from clipa_ds.data.tario import END_OF_ARCHIVE, member
from clipa_ds.evaluate.datasets import EvalDataset
from clipa_ds.task import IMAGE_MEAN, IMAGE_STD


def id_image_png(sample_id: int, size: int = 8) -> bytes:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = sample_id % 256, sample_id // 256, 7
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def write_id_shards(
    directory: Path,
    shard_sizes: list[int],
    *,
    labels: list[int] | None = None,
    captions: list[list[str]] | None = None,
    prefix: str = "eval",
) -> list[str]:
    """Shards of sum(shard_sizes) samples with ids 0.. in order; returns the shard paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, sample_id = [], 0
    for shard, count in enumerate(shard_sizes):
        path = directory / f"{prefix}-{shard:03d}.tar"
        with open(path, "wb") as tar:
            for _ in range(count):
                key = f"s{sample_id:06d}"
                tar.write(member(f"{key}.png", id_image_png(sample_id)))
                if labels is not None:
                    tar.write(member(f"{key}.cls", str(labels[sample_id]).encode()))
                if captions is not None:
                    tar.write(member(f"{key}.txt", "\n".join(captions[sample_id]).encode()))
                sample_id += 1
            tar.write(END_OF_ARCHIVE)
        paths.append(str(path))
    return paths


def shard_pattern(paths: list[str]) -> str:
    return "::".join(paths)


class IdTokenizer:
    """encode_batch: token 0 holds the caption's id in `vocab` (unknown captions -> id 0)."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab
        self.calls: list[list[str]] = []

    def encode_batch(self, captions: list[str], context_length: int) -> Tensor:
        self.calls.append(list(captions))
        tokens = torch.zeros(len(captions), context_length, dtype=torch.long)
        tokens[:, 0] = torch.tensor([self.vocab.get(c, 0) for c in captions], dtype=torch.long)
        return tokens  # (B, L)


class TableModel(nn.Module):
    """encode_image: embedding of the id coded in the image colour; encode_text: of token 0."""

    def __init__(self, image_table: Tensor, text_table: Tensor) -> None:
        super().__init__()
        self.register_buffer("image_table", image_table.float())
        self.register_buffer("text_table", text_table.float())
        self.dummy = nn.Linear(1, 1)  # gives the model a dtype and a submodule with a mode
        self.image_ids: list[int] = []
        self.text_rows = 0
        self.modes: list[bool] = []

    def encode_image(self, images: Tensor) -> Tensor:
        self.modes.append(self.training or self.dummy.training)
        mean = torch.tensor(IMAGE_MEAN).view(1, 3) * 255.0
        std = torch.tensor(IMAGE_STD).view(1, 3) * 255.0
        pixels = torch.round(images[:, :, 0, 0].float() * std + mean).long()  # (B, 3)
        ids = pixels[:, 0] + 256 * pixels[:, 1]
        real = ids < self.image_table.shape[0]  # dummy forwards decode to out-of-range ids
        self.image_ids += ids[real].tolist()
        return F.normalize(self.image_table[ids.clamp(max=self.image_table.shape[0] - 1)], dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        self.modes.append(self.training or self.dummy.training)
        self.text_rows += tokens.shape[0]
        return F.normalize(self.text_table[tokens[:, 0]], dim=-1)


def zeroshot_problem(num_samples: int, num_classes: int, num_templates: int, dim: int = 16, seed: int = 0):
    """Tables where images lean toward their class (accuracy well between 0 and 100%)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_samples,), generator=gen)
    text_table = torch.randn(num_classes * num_templates, dim, generator=gen)
    centres = F.normalize(text_table.view(num_classes, num_templates, dim).mean(1), dim=-1)
    image_table = centres[labels] + 2.5 * torch.randn(num_samples, dim, generator=gen) / dim**0.5
    classnames = [f"class {c}" for c in range(num_classes)]
    templates = [f"template {t} of {{}}" for t in range(num_templates)]
    vocab = {templates[t].replace("{}", classnames[c]): c * num_templates + t
             for c in range(num_classes) for t in range(num_templates)}
    return labels, image_table, text_table, classnames, templates, vocab


def retrieval_problem(num_images: int, dim: int = 16, seed: int = 0):
    """1-3 captions per image; caption embeddings near their image's."""
    gen = torch.Generator().manual_seed(seed)
    image_table = torch.randn(num_images, dim, generator=gen)
    counts = torch.randint(1, 4, (num_images,), generator=gen).tolist()
    owners = [i for i, n in enumerate(counts) for _ in range(n)]
    # Row 0 is reserved for unknown captions (dummy forwards).
    text_table = torch.cat([torch.zeros(1, dim), image_table[owners] + 3.0 * torch.randn(len(owners), dim, generator=gen)])
    captions, vocab, row = [], {}, 1
    for i, n in enumerate(counts):
        captions.append([f"caption {j} of image {i}" for j in range(n)])
        for text in captions[-1]:
            vocab[text] = row
            row += 1
    return image_table, text_table, captions, vocab, owners


def stable_rank(scores: Tensor, positives: set[int]) -> int:
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return min(order.index(p) for p in positives)


def brute_zeroshot(image_table, text_table, labels, num_classes, num_templates, ks=(1, 5)) -> dict[str, float]:
    prompts = F.normalize(text_table, dim=-1).view(num_classes, num_templates, -1)
    classes = F.normalize(prompts.mean(1), dim=-1)
    images = F.normalize(image_table, dim=-1)
    ranks = [stable_rank(images[i] @ classes.T, {int(labels[i])}) for i in range(len(labels))]
    return {f"top{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in ks}


def brute_retrieval(image_table, text_table, owners, ks=(1, 5, 10)) -> dict[str, float]:
    images = F.normalize(image_table, dim=-1)
    texts = F.normalize(text_table[1:], dim=-1)  # row 0: unknown-caption placeholder
    i2t = [stable_rank(images[i] @ texts.T, {t for t, o in enumerate(owners) if o == i}) for i in range(len(images))]
    t2i = [stable_rank(texts[t] @ images.T, {owners[t]}) for t in range(len(texts))]
    out = {f"image_to_text_R@{k}": 100.0 * sum(r < k for r in i2t) / len(i2t) for k in ks}
    out.update({f"text_to_image_R@{k}": 100.0 * sum(r < k for r in t2i) / len(t2i) for k in ks})
    return out


# ----------------------------------------------------------------------------------------------
# The fixtures themselves behave as the other tests assume.
# ----------------------------------------------------------------------------------------------


def test_id_shards_round_trip_ids_and_labels(tmp_path: Path) -> None:
    labels = [3, 1, 4, 1, 5, 9, 2]
    paths = write_id_shards(tmp_path, [4, 3], labels=labels)
    dataset = EvalDataset(shard_pattern(paths), "labels", image_size=8)
    model = TableModel(torch.eye(300), torch.eye(2))
    from clipa_ds.task import normalize_images

    seen = []
    for sample in dataset:
        model.encode_image(normalize_images(sample.image[None]))
        seen.append((sample.key, sample.target))
    assert model.image_ids == list(range(7))
    assert [t for _, t in seen] == labels
    assert [k for k, _ in seen] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]


def test_zeroshot_problem_is_neither_trivial_nor_hopeless() -> None:
    labels, image_table, text_table, _, _, _ = zeroshot_problem(200, 7, 3)
    top1 = brute_zeroshot(image_table, text_table, labels, 7, 3)["top1"]
    assert 25.0 < top1 < 95.0
