"""Pure evaluation math on random embeddings, against plain stable-argsort references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipa_ds.evaluate import metrics
from tests.test_eval_fixtures import brute_retrieval, brute_zeroshot, retrieval_problem, stable_rank, zeroshot_problem


def test_rank_of_first_positive_matches_stable_sort_with_ties() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (50, 9), generator=gen).float()  # many exact ties
    positive = torch.rand(50, 9, generator=gen) < 0.3
    ranks = metrics.rank_of_first_positive(scores, positive)
    for row in range(50):
        pos = set(positive[row].nonzero().flatten().tolist())
        expected = stable_rank(scores[row], pos) if pos else 9
        assert int(ranks[row]) == expected


def test_ties_go_to_the_lower_index() -> None:
    scores = torch.tensor([[1.0, 1.0, 0.0]])
    assert metrics.rank_of_first_positive(scores, torch.tensor([[True, False, False]])).item() == 0
    assert metrics.rank_of_first_positive(scores, torch.tensor([[False, True, False]])).item() == 1
    # Collapsed embeddings (all scores equal) do not give perfect recall.
    flat = torch.zeros(1, 20)
    only_last = torch.zeros(1, 20, dtype=torch.bool)
    only_last[0, 19] = True
    assert metrics.rank_of_first_positive(flat, only_last).item() == 19


def test_class_embeddings_are_normalised_mean_of_normalised_prompts() -> None:
    feats = torch.randn(5, 4, 8) * torch.rand(5, 4, 1) * 10  # prompts of unequal norms
    out = metrics.class_embeddings(feats)
    assert out.shape == (5, 8)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5))
    expected = F.normalize(torch.stack([F.normalize(feats[c], dim=-1).sum(0) for c in range(5)]), dim=-1)
    assert torch.allclose(out, expected, atol=1e-6)
    # Not the mean of raw features: a long prompt vector would dominate that.
    assert not torch.allclose(out, F.normalize(feats.mean(1), dim=-1), atol=1e-3)


def test_zeroshot_counts_match_brute_force() -> None:
    labels, image_table, text_table, *_ = zeroshot_problem(300, 11, 4, seed=3)
    classes = metrics.class_embeddings(text_table.view(11, 4, -1))
    ranks = metrics.zeroshot_ranks(F.normalize(image_table, dim=-1), classes, labels)
    hits = metrics.hits_at_k(ranks, (1, 5))
    expected = brute_zeroshot(image_table, text_table, labels, 11, 4)
    assert 100.0 * hits[1] / 300 == expected["top1"]
    assert 100.0 * hits[5] / 300 == expected["top5"]
    assert 0 < hits[1] < hits[5] < 300


def test_retrieval_counts_match_brute_force_with_several_captions() -> None:
    image_table, text_table, _, _, owners = retrieval_problem(40, seed=5)
    images = F.normalize(image_table, dim=-1)
    texts = F.normalize(text_table[1:], dim=-1)
    text_image = torch.tensor(owners)
    i2t = metrics.image_to_text_ranks(images, torch.arange(40), texts, text_image)
    t2i = metrics.text_to_image_ranks(texts, text_image, images)
    hits = {f"i2t@{k}": v for k, v in metrics.hits_at_k(i2t, (1, 5, 10)).items()}
    hits.update({f"t2i@{k}": v for k, v in metrics.hits_at_k(t2i, (1, 5, 10)).items()})
    summary = metrics.recall_summary(hits, {"i2t": 40, "t2i": len(owners)}, (1, 5, 10))
    assert summary == brute_retrieval(image_table, text_table, owners)
    assert 0 < summary["image_to_text_R@1"] < 100


def test_image_to_text_hit_if_any_caption_in_top_k() -> None:
    # Image 0's first caption ranks last, its second ranks first: a hit at 1.
    images = torch.tensor([[1.0, 0.0]])
    texts = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    ranks = metrics.image_to_text_ranks(images, torch.tensor([0]), texts, torch.tensor([0, 0, 1]))
    assert ranks.tolist() == [0]


def test_chunking_does_not_change_ranks(monkeypatch) -> None:
    labels, image_table, text_table, *_ = zeroshot_problem(50, 6, 2, seed=4)
    classes = metrics.class_embeddings(text_table.view(6, 2, -1))
    full = metrics.zeroshot_ranks(image_table, classes, labels)
    monkeypatch.setattr(metrics, "QUERY_CHUNK", 7)
    assert torch.equal(metrics.zeroshot_ranks(image_table, classes, labels), full)


def test_collectives_are_no_ops_in_one_process() -> None:
    rows = torch.randn(3, 2)
    assert metrics.world() == (0, 1)
    assert metrics.gather_rows(rows) is rows
    assert list(metrics.lockstep([1, 2])) == [1, 2]
