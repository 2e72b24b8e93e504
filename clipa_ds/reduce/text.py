"""Text token reduction: which word-pieces of a training caption fit in the token budget.

One pure function, `select_pieces`, of (strategy, words, pieces per word, budget, rng). The
tokenizer splits a caption into words and word-pieces, calls this, then adds [CLS] and padding;
the budget is context_length - 1 because [CLS] is never dropped. Evaluation prompts never come
here (CaptionTokenizer.encode_batch truncates only).

When the whole caption fits in the budget, every strategy returns all its pieces unchanged.
Otherwise (kept pieces always come out in the original caption order):
- truncate: the first `budget` pieces (the last word may be cut, as in CLIP/CLIPA).
- random:   words in a random order (rng.shuffle), each taken if all its pieces still fit,
            until the budget is full; a word that does not fit is skipped and later (shorter)
            words may still fill the remaining slots.
- block:    one contiguous span of exactly `budget` pieces that starts at a random word start
            (among the starts that leave a full span); its last word may be cut.
- syntax:   nouns first, then adjectives, then verbs, then the rest (pos_lexicon.coarse_tag);
            ties in original word order, so it is deterministic and ignores rng. A word is taken
            only if all its pieces fit; one that does not is skipped (never cut) and the scan
            goes on, so a shorter lower-priority word can still use the remaining slots.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from clipa_ds.config import ConfigError
from clipa_ds.reduce.pos_lexicon import coarse_tags

TEXT_STRATEGIES: tuple[str, ...] = ("truncate", "random", "block", "syntax")

Pieces = Sequence[Sequence[int]]


def validate_text_strategy(strategy: str) -> None:
    if strategy not in TEXT_STRATEGIES:
        raise ConfigError(f"text.strategy={strategy!r} is not valid; choose one of: {', '.join(TEXT_STRATEGIES)}")


def _take_words(order: Sequence[int], pieces: Pieces, budget: int) -> list[int]:
    """Greedily take words in `order` whose pieces all fit; emit them in original order."""
    keep = [False] * len(pieces)
    left = budget
    for i in order:
        n = len(pieces[i])
        if n <= left:
            keep[i] = True
            left -= n
            if left == 0:
                break
    out: list[int] = []
    for p, k in zip(pieces, keep):
        if k:
            out.extend(p)
    return out


def _block(pieces: Pieces, budget: int, total: int, rng: random.Random) -> list[int]:
    starts: list[int] = []  # piece offset of each word that can start a full span
    offset = 0
    for p in pieces:
        if offset > total - budget:
            break
        if p:
            starts.append(offset)
        offset += len(p)
    start = starts[rng.randrange(len(starts))]
    flat = [t for p in pieces for t in p]
    return flat[start : start + budget]


def select_pieces(
    strategy: str,
    words: Sequence[str],
    pieces: Pieces,
    budget: int,
    rng: random.Random | None = None,
) -> list[int]:
    """Word-piece ids kept from a caption, in caption order, at most `budget` of them.

    words: the caption's words, lowercased (used by syntax for the POS lookup); pieces: the
    word-piece ids of each word (same length as words); budget: context_length - 1 (>= 1).
    rng drives random and block and is required for them; truncate and syntax ignore it.
    """
    validate_text_strategy(strategy)
    if budget < 1:
        raise ConfigError(f"text budget {budget} must be >= 1 (text.context_length must be >= 2)")
    if len(words) != len(pieces):
        raise ValueError(f"{len(words)} words but {len(pieces)} piece lists")
    total = sum(map(len, pieces))
    if total <= budget:
        return [t for p in pieces for t in p]
    if strategy == "truncate":
        return [t for p in pieces for t in p][:budget]
    if strategy == "syntax":
        tags = coarse_tags(words)
        order = sorted(range(len(words)), key=tags.__getitem__)  # stable: ties keep caption order
        return _take_words(order, pieces, budget)
    if rng is None:
        raise ValueError(f"text strategy {strategy!r} needs rng=random.Random(seed) for reproducible draws")
    if strategy == "random":
        order = list(range(len(words)))
        rng.shuffle(order)
        return _take_words(order, pieces, budget)
    return _block(pieces, budget, total, rng)
