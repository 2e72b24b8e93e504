"""Distributed evaluation (2 ranks, gloo) equals a brute-force single-process computation.

Eval sizes are odd (13 labelled samples, 21 captioned images with 1-3 captions each), and both
ways of splitting are covered: whole shards per rank (3 shards) and samples strided over ranks
(1 shard). Embeddings come from a table model, so "the same embeddings" holds exactly.
The same two processes also check that a data error on one rank stops both (no hang).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipa_ds.evaluate.datasets import EvalDataError
from clipa_ds.evaluate.labels import make_label_set
from clipa_ds.evaluate.metrics import PeerRankError
from clipa_ds.evaluate.retrieval import run_retrieval
from clipa_ds.evaluate.zeroshot import run_zeroshot
from tests.test_eval_fixtures import (
    IdTokenizer,
    TableModel,
    brute_retrieval,
    brute_zeroshot,
    retrieval_problem,
    shard_pattern,
    write_id_shards,
    zeroshot_problem,
)

NUM_LABELLED, NUM_CLASSES, NUM_TEMPLATES = 13, 7, 3
NUM_CAPTIONED = 21
SPLITS = {"units": ([5, 4, 4], [8, 7, 6]), "strided": ([13], [21])}  # labelled, captioned shard sizes


def build_data(root: Path) -> dict[str, str]:
    labels, *_ = zeroshot_problem(NUM_LABELLED, NUM_CLASSES, NUM_TEMPLATES)
    _, _, captions, _, _ = retrieval_problem(NUM_CAPTIONED)
    sources = {}
    for split, (labelled, captioned) in SPLITS.items():
        sources[f"zeroshot-{split}"] = shard_pattern(write_id_shards(root / f"z-{split}", labelled, labels=labels.tolist()))
        sources[f"retrieval-{split}"] = shard_pattern(write_id_shards(root / f"r-{split}", captioned, captions=captions))
    # Shard 0 (rank 0) is labelled, shard 1 (rank 1) is not.
    good = write_id_shards(root / "mixed", [2], labels=[0, 1], prefix="good")
    bad = write_id_shards(root / "mixed", [2], captions=[["x"], ["y"]], prefix="bad")
    sources["unlabelled-rank1"] = shard_pattern(good + bad)
    return sources


def evaluate_all(sources: dict[str, str]) -> dict[str, dict]:
    """Every scenario on this process (one rank of a group, or alone)."""
    labels, z_images, z_texts, classnames, templates, z_vocab = zeroshot_problem(NUM_LABELLED, NUM_CLASSES, NUM_TEMPLATES)
    r_images, r_texts, _, r_vocab, _ = retrieval_problem(NUM_CAPTIONED)
    label_set = make_label_set(classnames, templates)
    results: dict[str, dict] = {}
    for name, source in sources.items():
        if name.startswith("unlabelled"):
            continue
        if name.startswith("zeroshot"):
            model = TableModel(z_images, z_texts)
            workers = 2 if name.endswith("units") else 0  # DataLoader workers split a rank's shards
            summary = run_zeroshot(
                model, source, tokenizer=IdTokenizer(z_vocab), image_size=8, device="cpu",
                batch_size=4, label_set=label_set, context_length=4, workers=workers,
            )
            # Prompts are encoded only while building the class embeddings.
            summary["text_rows"] = model.text_rows
        else:
            model = TableModel(r_images, r_texts)
            summary = run_retrieval(
                model, source, tokenizer=IdTokenizer(r_vocab), image_size=8, device="cpu",
                batch_size=4, context_length=4,
            )
        summary["image_ids"] = sorted(model.image_ids)
        results[name] = summary
    return results


def _rank_main(rank: int, port: int, sources: dict[str, str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = evaluate_all(sources)
        # A failure on one rank is raised on every rank instead of hanging the other one.
        _, _, _, classnames, templates, vocab = zeroshot_problem(NUM_LABELLED, NUM_CLASSES, NUM_TEMPLATES)
        try:
            run_zeroshot(
                TableModel(torch.zeros(1, 4), torch.zeros(len(vocab), 4)), sources["unlabelled-rank1"],
                tokenizer=IdTokenizer(vocab), image_size=8, device="cpu", batch_size=1,
                label_set=make_label_set(classnames, templates), context_length=4,
            )
            results["error"] = "none"
        except (EvalDataError, PeerRankError) as exc:
            results["error"] = type(exc).__name__
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_two_ranks_equal_single_process_and_brute_force(tmp_path: Path, port: int) -> None:
    sources = build_data(tmp_path / "data")
    mp.spawn(_rank_main, args=(port, sources, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = evaluate_all(sources)

    labels, z_images, z_texts, *_ = zeroshot_problem(NUM_LABELLED, NUM_CLASSES, NUM_TEMPLATES)
    r_images, r_texts, _, _, owners = retrieval_problem(NUM_CAPTIONED)
    expected_zeroshot = brute_zeroshot(z_images, z_texts, labels, NUM_CLASSES, NUM_TEMPLATES)
    expected_retrieval = brute_retrieval(r_images, r_texts, owners)

    assert [rank.pop("error") for rank in ranks] == ["PeerRankError", "EvalDataError"]
    for name in single:
        metric_keys = [k for k in single[name] if k.startswith(("top", "image_to_text", "text_to_image"))]
        expected = expected_zeroshot if name.startswith("zeroshot") else expected_retrieval
        assert {k: single[name][k] for k in metric_keys} == expected, name
        for rank in ranks:  # both ranks report the same, global numbers
            assert {k: rank[name][k] for k in metric_keys} == expected, name
        # Every sample was encoded by exactly one rank: nothing dropped, nothing twice.
        seen = ranks[0][name]["image_ids"] + ranks[1][name]["image_ids"]
        total = NUM_LABELLED if name.startswith("zeroshot") else NUM_CAPTIONED
        assert sorted(seen) == list(range(total)), name
        assert ranks[0][name]["image_ids"] and ranks[1][name]["image_ids"], name
        if name.startswith("zeroshot"):
            assert ranks[0][name]["samples"] == NUM_LABELLED
            # Class embeddings are computed once, split over the ranks: 3 + 4 classes here.
            rows = [rank[name]["text_rows"] for rank in ranks]
            assert rows == [3 * NUM_TEMPLATES, 4 * NUM_TEMPLATES]
            assert single[name]["text_rows"] == NUM_CLASSES * NUM_TEMPLATES
        else:
            assert ranks[0][name]["images"] == NUM_CAPTIONED
            assert ranks[0][name]["captions"] == len(owners)
