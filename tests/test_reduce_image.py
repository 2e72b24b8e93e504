"""Image token reduction (clipa_ds.reduce.image): invariants of every strategy, and bad input."""

from __future__ import annotations

import pytest
import torch

from clipa_ds.config import ConfigError
from clipa_ds.reduce.image import IMAGE_MASKS, grid_cell, keep_indices, num_kept, validate_image_mask

MASKED = ("random", "grid", "block")
# (grid_h, grid_w): B/16 at 224 px, and a non-square grid.
GRIDS = ((14, 14), (8, 12))


def _keep(strategy: str, ratio: float, gh: int, gw: int, batch: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return keep_indices(strategy, ratio, gh, gw, batch, device="cpu", generator=gen)


def test_registry_names() -> None:
    assert IMAGE_MASKS == ("none", "random", "grid", "block")


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [(196, 0.0, 196), (196, 0.5, 98), (196, 0.75, 49), (256, 0.3, 179), (100, 0.29, 71), (10, 0.99, 1)],
)
def test_num_kept_rounding(n: int, ratio: float, k: int) -> None:
    # floor(N * (1 - ratio)) with float tolerance (100 * 0.71 is 70.999...), at least one token.
    assert num_kept(n, ratio) == k


@pytest.mark.parametrize("strategy", MASKED)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize(("gh", "gw"), GRIDS)
def test_exact_count_sorted_unique_in_range(strategy: str, ratio: float, gh: int, gw: int) -> None:
    idx = _keep(strategy, ratio, gh, gw)
    n = gh * gw
    assert idx.dtype == torch.long
    assert idx.shape == (16, num_kept(n, ratio))
    assert bool((idx >= 0).all()) and bool((idx < n).all())
    # Strictly ascending rows: original order kept and no token twice.
    assert bool((idx[:, 1:] > idx[:, :-1]).all())


@pytest.mark.parametrize("strategy", MASKED)
def test_deterministic_per_seed_and_different_across_seeds(strategy: str) -> None:
    a = _keep(strategy, 0.75, 14, 14, seed=1)
    b = _keep(strategy, 0.75, 14, 14, seed=1)
    c = _keep(strategy, 0.75, 14, 14, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Each image draws its own mask.
    assert len({tuple(row.tolist()) for row in a}) > 1


@pytest.mark.parametrize("strategy", IMAGE_MASKS)
def test_ratio_zero_keeps_everything(strategy: str) -> None:
    idx = _keep(strategy, 0.0, 8, 12, batch=3)
    assert torch.equal(idx, torch.arange(96).expand(3, 96))


@pytest.mark.parametrize(
    ("gh", "gw", "ratio", "cell"),
    [(8, 12, 0.75, (2, 2)), (8, 12, 0.5, (1, 2)), (8, 12, 0.875, (2, 4)), (8, 12, 1 - 1 / 3, (1, 3)),
     (12, 12, 1 - 1 / 9, (3, 3)), (7, 8, 0.5, (1, 2)), (7, 7, 1 - 1 / 7, (1, 7))],
)  # fmt: skip
def test_grid_keeps_one_patch_per_cell_at_one_offset(gh: int, gw: int, ratio: float, cell: tuple[int, int]) -> None:
    assert grid_cell(ratio, gh, gw) == cell
    ch, cw = cell
    idx = _keep("grid", ratio, gh, gw)
    assert idx.shape[1] == num_kept(gh * gw, ratio) == (gh // ch) * (gw // cw)
    ys, xs = idx // gw, idx % gw
    for y, x in zip(ys, xs):
        cells = (y // ch) * (gw // cw) + x // cw
        assert sorted(cells.tolist()) == list(range((gh // ch) * (gw // cw)))  # one per cell
        assert len(set((y % ch).tolist())) == 1 and len(set((x % cw).tolist())) == 1  # one offset


def test_grid_offsets_cover_the_cell() -> None:
    idx = _keep("grid", 0.75, 14, 14, batch=64)
    offsets = {(int(r[0]) // 14 % 2, int(r[0]) % 14 % 2) for r in idx}
    assert offsets == {(0, 0), (0, 1), (1, 0), (1, 1)}


def _largest_dropped_square(dropped: torch.Tensor) -> int:
    """Side of the largest all-dropped square in an (H, W) bool grid (dynamic programming)."""
    h, w = dropped.shape
    best = 0
    side = [[0] * (w + 1) for _ in range(h + 1)]
    for y in range(h):
        for x in range(w):
            if dropped[y, x]:
                side[y + 1][x + 1] = 1 + min(side[y][x], side[y][x + 1], side[y + 1][x])
                best = max(best, side[y + 1][x + 1])
    return best


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_block_drops_contiguous_squares(ratio: float) -> None:
    gh = gw = 14
    idx = _keep("block", ratio, gh, gw, batch=8)
    for row in idx:
        dropped = torch.ones(gh * gw, dtype=torch.bool)
        dropped[row] = False
        # The first block has side >= ceil(min(7, isqrt(drops)) / 2) = 4: real blocks, not noise.
        assert _largest_dropped_square(dropped.view(gh, gw)) >= 4
    # Random masking at the same ratio almost never leaves a 4x4 hole.
    rand = _keep("random", ratio, gh, gw, batch=8)
    holes = []
    for row in rand:
        dropped = torch.ones(gh * gw, dtype=torch.bool)
        dropped[row] = False
        holes.append(_largest_dropped_square(dropped.view(gh, gw)))
    assert min(holes) < 4


def test_no_generator_uses_global_rng() -> None:
    torch.manual_seed(3)
    a = keep_indices("random", 0.5, 4, 4, 2, device="cpu")
    torch.manual_seed(3)
    b = keep_indices("random", 0.5, 4, 4, 2, device="cpu")
    assert torch.equal(a, b) and a.shape == (2, 8)


def test_none_keeps_all_tokens() -> None:
    assert torch.equal(_keep("none", 0.0, 3, 5, batch=2), torch.arange(15).expand(2, 15))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range_rejected(ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"image.mask_ratio.*\[0, 1\)"):
        validate_image_mask("random", ratio, 14, 14)
    with pytest.raises(ConfigError):
        _keep("random", ratio, 14, 14)


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        validate_image_mask("checkerboard", 0.5, 14, 14)
    assert "checkerboard" in str(err.value)
    for name in IMAGE_MASKS:
        assert name in str(err.value)


def test_grid_cell_must_divide_the_patch_grid() -> None:
    # 0.75 needs 2x2 cells: a 7x7 grid (112 px at patch 16) cannot be tiled.
    with pytest.raises(ConfigError, match=r"divides the 7x7 patch grid"):
        validate_image_mask("grid", 0.75, 7, 7)
    # A ratio that is not 1 - 1/n has no cell at all; the message offers ratios that work.
    with pytest.raises(ConfigError, match=r"1 - 1/n.*0\.75 \(2x2 cell\)"):
        validate_image_mask("grid", 0.6, 14, 14)
    validate_image_mask("grid", 0.75, 14, 14)  # fine
    validate_image_mask("random", 0.75, 7, 7)  # only grid needs the cell to divide


def test_none_with_a_ratio_is_rejected() -> None:
    with pytest.raises(ConfigError, match="no effect"):
        validate_image_mask("none", 0.3, 14, 14)


def test_generator_device_may_differ_from_output_device() -> None:
    # A CPU generator drives the draw; the result lands on the requested device.
    gen = torch.Generator().manual_seed(0)
    idx = keep_indices("block", 0.5, 6, 6, 2, device=torch.device("cpu"), generator=gen)
    assert idx.device.type == "cpu" and idx.shape == (2, 18)


@pytest.mark.slow  # a subprocess importing torch + timm: ~10 s idle, > 20 s on a busy machine
def test_token_reduction_benchmark_quick() -> None:
    """The benchmark runs end to end and its last line is the agreed JSON object."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "token_reduction.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick"], check=True, capture_output=True, text=True, timeout=300
    ).stdout
    lines = [json.loads(line) for line in out.strip().splitlines()]
    final = lines[-1]
    assert set(final["speedup"]) == set(MASKED)
    for strategy in MASKED:
        assert set(final["speedup"][strategy]) == {"0.5", "0.75"}
        assert all(v > 0 for v in final["speedup"][strategy].values())
    rows = {(r["strategy"], r["ratio"]): r for r in lines[:-1]}
    assert rows[("none", 0.0)]["tokens"] == 64 and rows[("random", 0.75)]["tokens"] == 16
