"""Damaged data is skipped and counted, never silent: tar damage, bad samples, failing shards."""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from clipa_ds.config import DataConfig, ImageStageConfig, StageConfig, TextStageConfig
from clipa_ds.data.pipeline import build_train_loader
from clipa_ds.data.reader import COUNTERS, DataError
from clipa_ds.data.shards import ShardPlan, parse_sources
from clipa_ds.data.synthetic import render_sample
from clipa_ds.data.tario import END_OF_ARCHIVE, TarCorrupt, TarTruncated, iter_samples, member
from clipa_ds.data.tokenizer import CaptionTokenizer

STAGE = StageConfig(name="s", samples=1000, global_batch=1, image=ImageStageConfig(size=32),
                    text=TextStageConfig(context_length=8))
RNG = random.Random(0)


def good(key: str) -> bytes:
    jpeg, caption, _ = render_sample(RNG, 48)
    return member(f"{key}.jpg", jpeg) + member(f"{key}.txt", caption.encode())


def png(size: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (size, size), 7).save(out, format="PNG")
    return out.getvalue()


def tar(*parts: bytes) -> bytes:
    return b"".join(parts) + END_OF_ARCHIVE


# ----------------------------------------------------------------------------- tar reader


def test_reader_matches_tarfile_including_long_names(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    long_dir = "d" * 120
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in [(f"{long_dir}/a.jpg", b"1"), (f"{long_dir}/a.txt", b"22"), ("b.seg.jpg", b"333")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    samples = list(iter_samples(open(path, "rb")))
    assert [(s.key, s.files) for s in samples] == [
        (f"{long_dir}/a", {"jpg": b"1", "txt": b"22"}), ("b", {"seg.jpg": b"333"}),
    ]
    # Resuming from a sample's byte offset yields the rest.
    with open(path, "rb") as handle:
        handle.seek(samples[0].end)
        rest = list(iter_samples(handle, samples[0].end))
    assert [s.key for s in rest] == ["b"] and rest[0].offset == samples[0].end


def test_corrupt_header_raises_where_tarfile_stops_silently() -> None:
    data = bytearray(tar(good("a"), good("b"), good("c")))
    second = list(iter_samples(io.BytesIO(bytes(data))))[2].offset
    data[second + 10] ^= 0xFF  # damage the third sample's name field
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r|")]
    assert len(names) == 4  # tarfile just ends: the silent loss this reader exists for
    with pytest.raises(TarCorrupt) as err:
        list(iter_samples(io.BytesIO(bytes(data))))
    assert err.value.samples == 1  # "b" may be incomplete at the damage, so it is not trusted


def test_truncated_member_raises() -> None:
    data = tar(good("a"), good("b"))
    with pytest.raises(TarTruncated) as err:
        list(iter_samples(io.BytesIO(data[: len(data) - 1500])))
    assert err.value.samples == 1


# ----------------------------------------------------------------------------- loader counters

SHARDS = {
    "good": tar(*(good(f"good{i}") for i in range(4))),
    "badsamples": tar(
        good("bs0"), good("bs1"),
        member("bs2.jpg", b"\xff\xd8\xff not a jpeg") + member("bs2.txt", b"a red circle"),
        member("bs3.jpg", render_sample(RNG, 48)[0]),  # no caption
        member("bs4.jpg", render_sample(RNG, 48)[0]) + member("bs4.txt", b"\xff\xfe bad utf8 \xc3"),
        member("bs5.png", png(1500)) + member("bs5.txt", b"a huge grey square"),  # 2.25 MP > cap
        member("bs6.txt", b"a caption without an image"),
        member("bs7.jpg", render_sample(RNG, 48)[0]) + member("bs7.txt", b"   "),
    ),
    "truncated": tar(*(good(f"tr{i}") for i in range(4)))[:-3000],
    "corrupt": None,  # filled below
    "empty": END_OF_ARCHIVE,
    "vanished": tar(*(good(f"va{i}") for i in range(4))),
}
_corrupt = bytearray(tar(*(good(f"co{i}") for i in range(4))))
_corrupt[list(iter_samples(io.BytesIO(bytes(_corrupt))))[2].offset + 3] ^= 0x55
SHARDS["corrupt"] = bytes(_corrupt)
EXPECTED_SAMPLES = {"good": 4, "badsamples": 8, "truncated": 4, "corrupt": 4, "empty": 0, "vanished": 4}
CONTRIBUTION = {  # counters each shard adds when read completely
    "good": {"shards_opened": 1, "shards_done": 1, "samples_read": 4, "samples_ok": 4},
    "badsamples": {"shards_opened": 1, "shards_done": 1, "samples_read": 8, "samples_ok": 2, "bad_image": 1,
                   "missing_caption": 2, "bad_text": 1, "oversized_image": 1, "missing_image": 1},
    "truncated": {"shards_opened": 1, "shards_truncated": 1, "samples_read": 3, "samples_ok": 3,
                  "shards_short": 1, "samples_missing": 1},
    "corrupt": {"shards_opened": 1, "shards_corrupt": 1, "samples_read": 1, "samples_ok": 1,
                "shards_short": 1, "samples_missing": 3},
    "empty": {"shards_opened": 1, "shards_done": 1, "shards_empty": 1},
    "vanished": {"shards_opened": 1, "shards_failed": 1, "shards_empty": 1, "shards_short": 1,
                 "samples_missing": 4},
}


def write_damaged(tmp_path: Path) -> DataConfig:
    for name, data in SHARDS.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
    (tmp_path / "sizes.json").write_text(json.dumps({f"{n}.tar": c for n, c in EXPECTED_SAMPLES.items()}))
    return DataConfig(
        train_urls=f"{tmp_path}/{{{','.join(SHARDS)}}}.tar", workers=0, shuffle_buffer=1,
        index=str(tmp_path / "sizes.json"), max_image_pixels=1_000_000, max_failed_shard_frac=0.5,
    )


def test_every_loss_is_counted(tmp_path: Path) -> None:
    cfg = write_damaged(tmp_path)
    it = build_train_loader(cfg, STAGE, stage_index=0, rank=0, world_size=1, seed=5, micro_batch=1,
                            tokenizer=CaptionTokenizer(), with_keys=True)
    (tmp_path / "vanished.tar").unlink()  # disappears after the start-up check
    # Read until the first sample of epoch 1: epoch 0 is then complete, plus exactly the
    # shards of epoch 1 passed on the way (each shard starts with a good sample).
    keys = []
    for batch in it:
        if batch["draw"][0] >= len(SHARDS):
            break
        keys += batch["key"]
    first_next = batch["draw"][0]
    plan = ShardPlan(parse_sources(cfg.train_urls, []), seed=5, stage_index=0, resample=False)
    expected: Counter[str] = Counter()
    for draw in range(first_next):
        expected.update(CONTRIBUTION[Path(plan.url(draw)).stem])
    expected.update({"shards_opened": 1, "samples_read": 1, "samples_ok": 1})
    assert it.counters() == {k: expected.get(k, 0) for k in COUNTERS}
    assert len(keys) == len(set(keys)) == 4 + 2 + 3 + 1


def test_too_many_failing_shards_stop_with_a_clear_error(tmp_path: Path) -> None:
    cfg = write_damaged(tmp_path)
    cfg.workers = 1  # the error must cross the worker process boundary
    cfg.max_failed_shard_frac = 0.0
    it = build_train_loader(cfg, STAGE, stage_index=0, rank=0, world_size=1, seed=5, micro_batch=1,
                            tokenizer=CaptionTokenizer())
    (tmp_path / "vanished.tar").unlink()
    with pytest.raises(DataError, match=r"max_failed_shard_frac=0.0.*vanished.tar.*FileNotFoundError"):
        list(itertools.islice(it, 100))


def test_a_dataset_without_usable_samples_stops_instead_of_spinning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipa_ds.data.reader as reader

    monkeypatch.setattr(reader, "MAX_BAD_STREAK", 30)
    (tmp_path / "nocaptions.tar").write_bytes(tar(*(member(f"n{i}.jpg", render_sample(RNG, 32)[0]) for i in range(8))))
    cfg = DataConfig(train_urls=str(tmp_path / "nocaptions.tar"), workers=0, shuffle_buffer=4)
    it = build_train_loader(cfg, STAGE, stage_index=0, rank=0, world_size=1, seed=0, micro_batch=1,
                            tokenizer=CaptionTokenizer())
    with pytest.raises(DataError, match="30 consecutive samples were unusable.*missing_caption"):
        next(it)
