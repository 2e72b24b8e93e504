"""Image token reduction: which patch tokens the image tower keeps during training.

Pure functions of (strategy, ratio, patch grid, batch, generator). The tower adds position
embeddings first, then gathers the kept tokens with `keep_indices`, so every kept token keeps
its own position. Every image in a batch keeps exactly `num_kept(N, ratio)` tokens, so the
gathered tensor stays dense (B, K, D). Indices are sorted ascending: kept tokens stay in their
original raster order.

Strategies (ratio = fraction of patch tokens dropped, in [0, 1)):
- none:   keep all tokens (ratio must be 0).
- random: a uniformly random subset of K tokens per image.
- grid:   the grid is tiled by ch x cw cells with ch * cw = 1 / (1 - ratio) (0.5 -> 1x2,
          0.75 -> 2x2, 0.875 -> 2x4, 8/9 -> 3x3); one patch is kept per cell, at the same
          random (dy, dx) offset in every cell of an image (a fresh offset per image).
          The cell must divide the patch grid.
- block:  contiguous square blocks are dropped (a vectorised, square-only variant of BEiT's
          block-wise masking) for a few rounds; a block never overshoots the number still to
          drop, and whatever the rounds leave undropped is topped up with random single
          patches, so exactly K are kept.
"""

from __future__ import annotations

import math

import torch

from clipa_ds.config import ConfigError

IMAGE_MASKS: tuple[str, ...] = ("none", "random", "grid", "block")

# Rounds of block dropping before the random top-up. Each round is a handful of small,
# batch-vectorised tensor ops, so the cost is bounded and independent of the batch size.
_BLOCK_ROUNDS = 12
_EPS = 1e-6


def num_kept(num_tokens: int, ratio: float) -> int:
    """Patch tokens kept per image: K = floor(num_tokens * (1 - ratio)), at least 1.

    A tolerance of 1e-6 absorbs float error (196 * (1 - 0.75) = 49, 100 * (1 - 0.29) = 71, not
    70). The same K applies to every image of a batch and to every strategy.
    """
    if num_tokens < 1:
        raise ConfigError(f"num_tokens={num_tokens} must be >= 1")
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"image.mask_ratio={ratio} must be in [0, 1)")
    return max(1, min(num_tokens, int(math.floor(num_tokens * (1.0 - ratio) + _EPS))))


def _grid_ratios(grid_h: int, grid_w: int, limit: int = 6) -> list[str]:
    """Grid-masking ratios that tile this patch grid, for error messages."""
    hs = [d for d in range(1, grid_h + 1) if grid_h % d == 0]
    ws = [d for d in range(1, grid_w + 1) if grid_w % d == 0]
    areas = sorted({a * b for a in hs for b in ws if a * b > 1})
    return [f"{1 - 1 / n:.10g} ({_cell_for_area(n, grid_h, grid_w)})" for n in areas[:limit]]


def _cell_for_area(area: int, grid_h: int, grid_w: int) -> str:
    cell = _find_cell(area, grid_h, grid_w)
    return f"{cell[0]}x{cell[1]} cell" if cell else "?"


def _find_cell(area: int, grid_h: int, grid_w: int) -> tuple[int, int] | None:
    """The most square (ch, cw) with ch * cw == area that divides the grid; None if none does.

    For each factor pair a <= b, (a, b) = a rows x b columns is tried before (b, a).
    """
    pairs = [(a, area // a) for a in range(int(math.isqrt(area)), 0, -1) if area % a == 0]
    for a, b in pairs:
        for ch, cw in ((a, b), (b, a)):
            if grid_h % ch == 0 and grid_w % cw == 0:
                return ch, cw
    return None


def grid_cell(ratio: float, grid_h: int, grid_w: int) -> tuple[int, int]:
    """(cell_h, cell_w) for grid masking at `ratio` on a grid_h x grid_w patch grid."""
    area_f = 1.0 / (1.0 - ratio)
    area = int(round(area_f))
    if abs(area_f - area) > 1e-4:
        raise ConfigError(
            f"image.mask_ratio={ratio} does not suit image.mask='grid': grid keeps one patch per "
            f"cell, so the ratio must be 1 - 1/n (0.5 for 1x2 cells, 0.75 for 2x2, 0.875 for 2x4). "
            f"Ratios that tile a {grid_h}x{grid_w} patch grid: {', '.join(_grid_ratios(grid_h, grid_w))}"
        )
    n = grid_h * grid_w
    if area > n or num_kept(n, ratio) != n // area:
        raise ConfigError(
            f"image.mask_ratio={ratio} is too far from 1 - 1/{area} for grid masking on a "
            f"{grid_h}x{grid_w} patch grid (it would keep {num_kept(n, ratio)} patches, the grid "
            f"{n // area}); write the ratio with more digits, e.g. {1 - 1 / area!r}"
        )
    cell = _find_cell(area, grid_h, grid_w)
    if cell is None:
        raise ConfigError(
            f"image.mask_ratio={ratio} with image.mask='grid' needs cells of {area} patches, and no "
            f"such cell divides the {grid_h}x{grid_w} patch grid (image.size / patch size). Ratios "
            f"that tile it: {', '.join(_grid_ratios(grid_h, grid_w))}; or use image.mask='random'"
        )
    return cell


def validate_image_mask(strategy: str, ratio: float, grid_h: int, grid_w: int) -> None:
    """Raise ConfigError unless `strategy` at `ratio` works on a grid_h x grid_w patch grid."""
    if strategy not in IMAGE_MASKS:
        raise ConfigError(f"image.mask={strategy!r} is not valid; choose one of: {', '.join(IMAGE_MASKS)}")
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"image.mask_ratio={ratio} must be in [0, 1) (fraction of patch tokens dropped)")
    if grid_h < 1 or grid_w < 1:
        raise ConfigError(f"patch grid {grid_h}x{grid_w} is empty; image.size must be >= the patch size")
    if strategy == "none" and ratio != 0.0:
        raise ConfigError(
            f"image.mask_ratio={ratio} has no effect with image.mask='none'; "
            f"set image.mask to one of {', '.join(IMAGE_MASKS[1:])} or image.mask_ratio=0"
        )
    if strategy == "grid":
        grid_cell(ratio, grid_h, grid_w)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _random_keep(batch: int, n: int, k: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    noise = _uniform((batch, n), generator, device)  # (B, N)
    return noise.topk(k, dim=1, largest=False).indices.sort(dim=1).values  # (B, K)


def _grid_keep(
    ratio: float, grid_h: int, grid_w: int, batch: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    ch, cw = grid_cell(ratio, grid_h, grid_w)
    u = _uniform((batch, 2), generator, device)
    dy = (u[:, 0] * ch).long().clamp_(max=ch - 1)  # (B,) same offset in every cell of an image
    dx = (u[:, 1] * cw).long().clamp_(max=cw - 1)
    rows = torch.arange(0, grid_h, ch, device=device)  # (Gh,) top row of each cell
    cols = torch.arange(0, grid_w, cw, device=device)  # (Gw,)
    y = rows[None, :, None] + dy[:, None, None]  # (B, Gh, 1)
    x = cols[None, None, :] + dx[:, None, None]  # (B, 1, Gw)
    # Cells are visited in raster order with a fixed offset, so indices are already ascending.
    return (y * grid_w + x).reshape(batch, -1)  # (B, Gh * Gw)


def _isqrt(t: torch.Tensor) -> torch.Tensor:
    s = t.double().sqrt().floor().long()
    s = s - (s * s > t).long()
    return s + ((s + 1) * (s + 1) <= t).long()


def _block_keep(
    k: int, grid_h: int, grid_w: int, batch: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    n = grid_h * grid_w
    max_side = max(1, min(grid_h, grid_w) // 2)
    dropped = torch.zeros(batch, grid_h, grid_w, dtype=torch.bool, device=device)  # (B, H, W)
    ys = torch.arange(grid_h, device=device)[None, :, None]  # (1, H, 1)
    xs = torch.arange(grid_w, device=device)[None, None, :]  # (1, 1, W)
    for _ in range(_BLOCK_ROUNDS):
        remaining = (n - k) - dropped.flatten(1).sum(1)  # (B,) still to drop
        # A side-s block drops at most s*s new patches, so s <= isqrt(remaining) never overshoots.
        hi = _isqrt(remaining).clamp(max=max_side)  # (B,) 0 when done
        lo = (hi + 1) // 2  # favour large blocks: side in [ceil(hi/2), hi]
        u = _uniform((batch, 3), generator, device)
        side = lo + (u[:, 0] * (hi - lo + 1)).long().clamp(max=(hi - lo).clamp(min=0))  # (B,)
        y0 = (u[:, 1] * (grid_h - side + 1)).long()  # (B,)
        x0 = (u[:, 2] * (grid_w - side + 1)).long()
        y0, x0, side = y0[:, None, None], x0[:, None, None], side[:, None, None]
        block = (ys >= y0) & (ys < y0 + side) & (xs >= x0) & (xs < x0 + side)  # (B, H, W)
        dropped |= block
    # Exactly K kept: survivors score in [0, 1), dropped in [1, 2); keep the K lowest. Survivors
    # outnumber K when the rounds under-drop, and the extra drops are then random patches.
    score = dropped.flatten(1).float() + _uniform((batch, n), generator, device)  # (B, N)
    return score.topk(k, dim=1, largest=False).indices.sort(dim=1).values  # (B, K)


def keep_indices(
    strategy: str,
    ratio: float,
    grid_h: int,
    grid_w: int,
    batch: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices (B, K) of the patch tokens to keep, sorted ascending per row, K = num_kept(N, ratio).

    Indices count patches in raster order over the grid_h x grid_w grid (no prefix tokens: the
    tower offsets them past any class token). Deterministic for a given `generator` state. The
    random numbers are drawn on the generator's device (so a CPU generator works for a CUDA
    tower); the result is moved to `device`.
    """
    validate_image_mask(strategy, ratio, grid_h, grid_w)
    device = torch.device(device)
    work = generator.device if generator is not None else device
    n = grid_h * grid_w
    k = num_kept(n, ratio)
    if strategy == "none" or k == n:
        idx = torch.arange(n, device=work).expand(batch, n)  # (B, N)
    elif strategy == "random":
        idx = _random_keep(batch, n, k, generator, work)
    elif strategy == "grid":
        idx = _grid_keep(ratio, grid_h, grid_w, batch, generator, work)
    else:
        idx = _block_keep(k, grid_h, grid_w, batch, generator, work)
    return idx.to(device)
