"""Text token reduction (clipa_ds.reduce.text, reduce.pos_lexicon): invariants and syntax order."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from clipa_ds.config import ConfigError
from clipa_ds.reduce import pos_lexicon
from clipa_ds.reduce.text import TEXT_STRATEGIES, select_pieces

RANDOMISED = ("random", "block")


def _words(text: str, multi: dict[str, int] | None = None) -> tuple[list[str], list[tuple[int, ...]]]:
    """Words of `text` with unique piece ids (word i, piece j -> 100 * i + j); `multi` gives
    some words several pieces, so order and whole-word checks are meaningful."""
    words = text.split()
    multi = multi or {}
    return words, [tuple(100 * i + j for j in range(multi.get(w, 1))) for i, w in enumerate(words)]


def _flat(pieces: list[tuple[int, ...]]) -> list[int]:
    return [t for p in pieces for t in p]


def _is_subsequence(sub: list[int], seq: list[int]) -> bool:
    it = iter(seq)
    return all(t in it for t in sub)


LONG = (
    "a large brown dog with a red collar is running quickly across the wet green grass of "
    "the old city park while two small children are watching it from a wooden bench"
)


def test_registry_names() -> None:
    assert TEXT_STRATEGIES == ("truncate", "random", "block", "syntax")


@pytest.mark.parametrize("strategy", TEXT_STRATEGIES)
@pytest.mark.parametrize("budget", [1, 3, 7, 31])
def test_exact_budget_and_order_single_piece_words(strategy: str, budget: int) -> None:
    words, pieces = _words(LONG)
    kept = select_pieces(strategy, words, pieces, budget, random.Random(0))
    assert len(kept) == budget  # single-piece words: every strategy fills the budget exactly
    assert len(set(kept)) == budget
    assert _is_subsequence(kept, _flat(pieces))  # original order


@pytest.mark.parametrize("strategy", TEXT_STRATEGIES)
def test_multi_piece_words_order_and_whole_words(strategy: str) -> None:
    words, pieces = _words(LONG, multi={"brown": 2, "collar": 3, "quickly": 2, "children": 4, "wooden": 2})
    flat = _flat(pieces)
    for seed in range(20):
        kept = select_pieces(strategy, words, pieces, 7, random.Random(seed))
        assert _is_subsequence(kept, flat)
        if strategy in ("truncate", "block"):
            assert len(kept) == 7  # pieces: the last word may be cut to fill the budget
            start = flat.index(kept[0])
            assert kept == flat[start : start + 7]  # one contiguous span
            assert kept[0] % 100 == 0  # ... starting at a word start
        else:
            kept_set = set(kept)
            taken = [p for p in pieces if p[0] in kept_set]
            assert all(set(p) <= kept_set for p in taken)  # whole words only
            left = 7 - len(kept)
            # As full as possible: every word left out is longer than the slots left over.
            assert all(len(p) > left for p in pieces if p[0] not in kept_set)


def test_truncate_keeps_the_first_pieces() -> None:
    words, pieces = _words(LONG, multi={"large": 3})
    assert select_pieces("truncate", words, pieces, 4) == [0, 100, 101, 102]


@pytest.mark.parametrize("strategy", RANDOMISED)
def test_deterministic_per_seed_and_different_across_seeds(strategy: str) -> None:
    words, pieces = _words(LONG)
    a = select_pieces(strategy, words, pieces, 7, random.Random(1))
    b = select_pieces(strategy, words, pieces, 7, random.Random(1))
    assert a == b
    others = {tuple(select_pieces(strategy, words, pieces, 7, random.Random(s))) for s in range(2, 12)}
    assert len(others - {tuple(a)}) >= 5


@pytest.mark.parametrize("strategy", ("truncate", "syntax"))
def test_rng_free_strategies_ignore_the_seed(strategy: str) -> None:
    words, pieces = _words(LONG)
    results = {tuple(select_pieces(strategy, words, pieces, 7, random.Random(s))) for s in range(5)}
    assert len(results) == 1
    assert list(results)[0] == tuple(select_pieces(strategy, words, pieces, 7, None))


def test_random_keeps_words_from_everywhere() -> None:
    words, pieces = _words(LONG)
    positions: set[int] = set()
    for seed in range(30):
        positions |= {t // 100 for t in select_pieces("random", words, pieces, 5, random.Random(seed))}
    assert max(positions) > 20 and min(positions) < 5


def _kept_words(text: str, budget: int, multi: dict[str, int] | None = None) -> list[str]:
    words, pieces = _words(text, multi)
    kept = select_pieces("syntax", words, pieces, budget)
    return [words[i] for i in sorted({t // 100 for t in kept})]


def test_syntax_keeps_nouns_first_then_adjectives_then_verbs() -> None:
    text = "a small brown dog is running across the green grass in the park"
    assert _kept_words(text, 3) == ["dog", "grass", "park"]
    # Then adjectives, ties in caption order (small, brown before green), emitted in caption order.
    assert _kept_words(text, 5) == ["small", "brown", "dog", "grass", "park"]
    assert _kept_words(text, 6) == ["small", "brown", "dog", "green", "grass", "park"]
    # Then verbs ("is" is a verb in the lexicon, and comes first).
    assert _kept_words(text, 7) == ["small", "brown", "dog", "is", "green", "grass", "park"]
    assert _kept_words(text, 8) == ["small", "brown", "dog", "is", "running", "green", "grass", "park"]


def test_syntax_on_more_hand_written_captions() -> None:
    assert _kept_words("two people riding horses on the beach at sunset", 4) == ["people", "horses", "beach", "sunset"]
    assert _kept_words("a man is cutting a delicious chocolate cake with a knife", 2) == ["man", "chocolate"]
    assert _kept_words("there is a cat sleeping on a laptop keyboard", 3) == ["cat", "laptop", "keyboard"]
    # A noun whose pieces do not fit is skipped (not cut); a shorter word uses the slots left.
    kept = _kept_words("a skateboarder performs a trick on a ramp", 3, multi={"skateboarder": 4})
    assert kept == ["performs", "trick", "ramp"]
    kept = _kept_words("a skateboarder performs a trick on a ramp", 4, multi={"skateboarder": 4})
    assert kept == ["skateboarder"]


def test_syntax_with_only_unknown_words_is_valid() -> None:
    words, pieces = _words("zzqxv blorptangle qwfpgjl 12345 ### snorkwuzzle frabjously")
    for budget in (1, 3, 5):
        kept = select_pieces("syntax", words, pieces, budget)
        assert len(kept) == budget and _is_subsequence(kept, _flat(pieces))


@pytest.mark.parametrize("strategy", TEXT_STRATEGIES)
def test_empty_and_short_captions(strategy: str) -> None:
    assert select_pieces(strategy, [], [], 7, random.Random(0)) == []
    words, pieces = _words("a dog", multi={"dog": 2})
    assert select_pieces(strategy, words, pieces, 7, random.Random(0)) == [0, 100, 101]  # fits: all kept


def test_bad_input() -> None:
    words, pieces = _words(LONG)
    with pytest.raises(ConfigError) as err:
        select_pieces("shuffle", words, pieces, 7)
    assert all(name in str(err.value) for name in TEXT_STRATEGIES)
    with pytest.raises(ConfigError, match="context_length"):
        select_pieces("truncate", words, pieces, 0)
    with pytest.raises(ValueError, match="rng"):
        select_pieces("random", words, pieces, 7, None)


def test_pos_lexicon_tags() -> None:
    tag = pos_lexicon.coarse_tag
    assert [tag(w) for w in ("dog", "beach", "paris")] == [pos_lexicon.NOUN] * 3
    assert [tag(w) for w in ("red", "wooden", "happy")] == [pos_lexicon.ADJ] * 3
    assert [tag(w) for w in ("running", "sits", "is")] == [pos_lexicon.VERB] * 3
    assert [tag(w) for w in ("a", "the", "on", ",", "3")] == [pos_lexicon.OTHER] * 5
    # Unknown words: suffix guess, else noun (Brill's default); non-alphabetic: other.
    assert "kitesurfing" not in pos_lexicon.load_lexicon()
    assert tag("kitesurfing") == pos_lexicon.VERB and tag("blorptangle") == pos_lexicon.NOUN
    assert tag("img_0042") == pos_lexicon.OTHER


def test_lexicon_loads_offline_without_textblob_or_nltk() -> None:
    code = (
        "import sys\n"
        "from clipa_ds.reduce import pos_lexicon, text\n"
        "assert 'textblob' not in sys.modules\n"  # nothing at import time
        "assert len(pos_lexicon.load_lexicon()) > 50000\n"
        "bad = [m for m in ('textblob', 'nltk') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {"PATH": "", "HF_HUB_OFFLINE": "1", "NLTK_DATA": "/nonexistent", "PYTHONPATH": os.environ["PYTHONPATH"]}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_syntax_masking_benchmark_quick(capsys: pytest.CaptureFixture[str]) -> None:
    """The throughput benchmark runs on its generated 10-30 word captions and prints JSON."""
    import json

    from benchmarks.syntax_masking import main, make_captions

    captions = make_captions(200, seed=1)
    assert all(10 <= len(c.split()) <= 30 for c in captions) and len(set(captions)) > 150
    main(["--captions", "300", "--reps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    final = json.loads(lines[-1])
    assert set(final["captions_per_s_per_core"]) == set(TEXT_STRATEGIES)
    assert all(v["warm"] > 0 for v in final["captions_per_s_per_core"].values())
