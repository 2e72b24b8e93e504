"""Eval data readers: shards with labels or captions, ImageFolder, transform, rank split, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipa_ds.data.tario import END_OF_ARCHIVE, member
from clipa_ds.evaluate.datasets import EvalDataError, EvalDataset, eval_loader, eval_transform, expand_urls
from tests.s3_server import SeaweedS3
from tests.test_eval_fixtures import id_image_png, shard_pattern, write_id_shards


def test_eval_transform_resizes_shorter_side_then_center_crops() -> None:
    # 40 x 20 image: left quarter red, middle half green, right quarter blue.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10, 0] = 255
    pixels[:, 10:30, 1] = 255
    pixels[:, 30:, 2] = 255
    out = eval_transform(Image.fromarray(pixels), 10)  # -> 20 x 10, crop the middle 10 x 10
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert int(out[1].min()) > 200 and int(out[0].max()) < 60 and int(out[2].max()) < 60
    # A portrait image gets its top and bottom cut, not squashed.
    assert eval_transform(Image.fromarray(pixels.transpose(1, 0, 2).copy()), 16).shape == (3, 16, 16)


def test_expand_urls_braces_and_double_colon() -> None:
    assert expand_urls("a-{0..2}.tar::b.tar") == ["a-0.tar", "a-1.tar", "a-2.tar", "b.tar"]


@pytest.mark.parametrize(("shard_sizes", "world_size"), [([5, 4, 4], 2), ([13], 2), ([6, 7], 3)])
def test_ranks_partition_the_samples(tmp_path: Path, shard_sizes: list[int], world_size: int) -> None:
    source = shard_pattern(write_id_shards(tmp_path, shard_sizes, labels=[0] * sum(shard_sizes)))
    keys = [
        [s.key for s in EvalDataset(source, "labels", 8, rank=r, world_size=world_size)] for r in range(world_size)
    ]
    flat = [k for part in keys for k in part]
    assert len(flat) == len(set(flat)) == sum(shard_sizes)  # nothing dropped, nothing twice
    assert all(part for part in keys)
    assert max(map(len, keys)) - min(map(len, keys)) <= max(shard_sizes)


def test_loader_workers_split_a_ranks_shards(tmp_path: Path) -> None:
    source = shard_pattern(write_id_shards(tmp_path, [3, 2, 4, 1], labels=[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]))
    loader, _ = eval_loader(source, "labels", 8, batch_size=3, workers=2)
    batches = list(loader)
    keys = torch.cat([b["key"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert sorted(map(tuple, keys.tolist())) == [(u, p) for u, n in enumerate([3, 2, 4, 1]) for p in range(n)]
    # Labels travel with their samples (sample i has label (i + 1) % 10).
    order = torch.argsort(keys[:, 0] * 100 + keys[:, 1])
    assert labels[order].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert batches[0]["image"].dtype == torch.uint8 and batches[0]["image"].shape[1:] == (3, 8, 8)


def test_shards_without_labels_fail_clearly(tmp_path: Path) -> None:
    source = shard_pattern(write_id_shards(tmp_path, [3], captions=[["a"], ["b"], ["c"]]))
    with pytest.raises(EvalDataError, match=r"has no class label: zero-shot shards need a '\.cls' entry.*found only: png, txt"):
        next(iter(EvalDataset(source, "labels", 8)))


def test_non_integer_label_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(member("x.png", b"") + member("x.cls", b"dog") + END_OF_ARCHIVE)
    with pytest.raises(EvalDataError, match="'dog'.*not an integer"):
        next(iter(EvalDataset(str(path), "labels", 8)))


def test_captions_from_json_list_json_object_or_txt_lines(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("RGB", (12, 9), (1, 2, 3)).save(png, format="PNG")
    path = tmp_path / "caps.tar"
    path.write_bytes(
        member("a.png", png.getvalue()) + member("a.json", json.dumps(["one", "two"]).encode())
        + member("b.png", png.getvalue()) + member("b.json", json.dumps({"captions": ["three"]}).encode())
        + member("c.png", png.getvalue()) + member("c.txt", b"four\n\nfive\n")
        + END_OF_ARCHIVE
    )
    samples = list(EvalDataset(str(path), "captions", 8))
    assert [s.target for s in samples] == [["one", "two"], ["three"], ["four", "five"]]
    assert samples[0].image.shape == (3, 8, 8)


def test_captioned_sample_without_captions_fails(tmp_path: Path) -> None:
    path = tmp_path / "nocap.tar"
    path.write_bytes(member("a.png", b"") + member("a.cls", b"1") + END_OF_ARCHIVE)
    with pytest.raises(EvalDataError, match="has no captions"):
        next(iter(EvalDataset(str(path), "captions", 8)))


def _write_folder(root: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (10, 14), (10 * i, 0, 0)).save(root / name / f"{i}.png")
    (root / "notes.txt").write_text("ignored: not a class directory")


def test_image_folder_labels_are_sorted_directory_positions(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"zebra": 2, "ant": 3, "moth": 1})
    dataset = EvalDataset(str(tmp_path), "labels", 8)
    assert dataset.classes == ["ant", "moth", "zebra"]
    samples = list(dataset)
    assert [s.target for s in samples] == [0, 0, 0, 1, 2, 2]
    split = [list(EvalDataset(str(tmp_path), "labels", 8, rank=r, world_size=2)) for r in range(2)]
    assert sorted(s.key for part in split for s in part) == sorted(s.key for s in samples)


def test_unknown_source_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="neither .tar shards nor a directory"):
        EvalDataset(str(tmp_path / "nowhere"), "labels", 8)
    with pytest.raises(EvalDataError, match="retrieval needs captioned .tar shards"):
        EvalDataset(str(tmp_path), "captions", 8)


@pytest.mark.slow
def test_zeroshot_from_s3_shards_and_image_folder_equals_local(
    tmp_path: Path, s3_env: SeaweedS3
) -> None:
    from clipa_ds.evaluate.labels import make_label_set
    from clipa_ds.evaluate.zeroshot import run_zeroshot
    from tests.test_eval_fixtures import IdTokenizer, TableModel, zeroshot_problem

    labels, images, texts, classnames, templates, vocab = zeroshot_problem(9, 7, 3)
    local = write_id_shards(tmp_path / "shards", [5, 4], labels=labels.tolist())
    s3_env.upload(local, "clipa-eval", "zs")
    # The same samples as an ImageFolder: ROOT/class-name/ID.png, uploaded to s3 too.
    folder = tmp_path / "folder"
    for sample_id, label in enumerate(labels.tolist()):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{label}" / f"{sample_id:03d}.png").write_bytes(id_image_png(sample_id))
    fs = s3_env.filesystem()
    fs.put(str(folder), "clipa-eval/folder", recursive=True)
    present = sorted({int(x) for x in labels.tolist()})
    folder_label_set = make_label_set([classnames[c] for c in present], templates)

    def evaluate(source: str, label_set) -> dict:
        return run_zeroshot(
            TableModel(images, texts), source, tokenizer=IdTokenizer(vocab), image_size=8, device="cpu",
            batch_size=4, label_set=label_set, context_length=4,
        )

    label_set = make_label_set(classnames, templates)
    assert evaluate("s3://clipa-eval/zs/eval-{000..001}.tar", label_set) == evaluate(shard_pattern(local), label_set)
    from_s3 = evaluate("s3://clipa-eval/folder", folder_label_set)
    assert from_s3 == evaluate(str(folder), folder_label_set)
    assert from_s3["samples"] == 9
