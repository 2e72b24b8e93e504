"""Offline part-of-speech lookup for syntax masking: word -> noun / adjective / verb / other.

The table comes from the English lexicon that ships inside the `textblob` package
(textblob/en/en-lexicon.txt: ~94k "word TAG" lines from Brill's tagger, trained on the Brown
corpus and the Penn Treebank). Each word gets its most frequent Penn tag; we fold the tags into
four coarse classes. No context rules and no downloads: a dictionary lookup per word is what
lets syntax masking run at data-loader speed, and a caption word is tagged the same way in every
caption.

Words are looked up lowercased (the BERT vocabulary is uncased). When a word appears in several
casings, the lowercase entry wins ("park" NN over "Park" NNP; "us" PRP over "Us" NNP).

Unknown words follow textblob's own Brill defaults, simplified: numbers and punctuation are
"other"; an unknown alphabetic word is guessed from its suffix (-ing/-ed: verb; -ous, -ful,
-ive, -able, -ible, -less, -ish, -ic, -al: adjective; -ly: other) and is otherwise a noun, which
is what Brill's tagger assumes for unknown words (in captions they are mostly names, brands
and rare objects).

The table is built on first use and cached for the life of the process (no work at import).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from clipa_ds.package_files import shipped_file

NOUN, ADJ, VERB, OTHER = 0, 1, 2, 3
TAG_NAMES: tuple[str, ...] = ("noun", "adj", "verb", "other")

_PENN_TO_COARSE = {
    "NN": NOUN, "NNS": NOUN, "NNP": NOUN, "NNPS": NOUN,
    "JJ": ADJ, "JJR": ADJ, "JJS": ADJ,
    "VB": VERB, "VBD": VERB, "VBG": VERB, "VBN": VERB, "VBP": VERB, "VBZ": VERB,
}  # fmt: skip

_ADJ_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "less", "ish", "ic", "al")


def lexicon_path() -> Path:
    """The lexicon file shipped in the installed textblob package (never downloaded)."""
    return shipped_file("textblob", "en", "en-lexicon.txt", what="textblob's English lexicon")


@functools.cache
def load_lexicon() -> dict[str, int]:
    """{lowercased word: coarse tag} built once per process from textblob's lexicon."""
    table: dict[str, int] = {}
    with open(lexicon_path(), encoding="utf-8") as f:
        for line in f:
            if line.startswith(";;;"):
                continue
            parts = line.split()
            if len(parts) != 2:
                continue
            word, penn = parts
            coarse = _PENN_TO_COARSE.get(penn.split("|", 1)[0], OTHER)
            lower = word.lower()
            if word == lower:
                table[lower] = coarse  # the lowercase entry is authoritative
            else:
                table.setdefault(lower, coarse)
    return table


def guess_tag(word: str) -> int:
    """Coarse tag of a word that is not in the lexicon (cheap suffix heuristic)."""
    if not word.isalpha():
        return OTHER
    if len(word) >= 5 and (word.endswith("ing") or word.endswith("ed")):
        return VERB
    if len(word) >= 5 and word.endswith(_ADJ_SUFFIXES):
        return ADJ
    if word.endswith("ly"):
        return OTHER
    return NOUN


def coarse_tag(word: str) -> int:
    """NOUN, ADJ, VERB or OTHER for a lowercased word."""
    tag = load_lexicon().get(word)
    return guess_tag(word) if tag is None else tag


def coarse_tags(words: Sequence[str]) -> list[int]:
    """Tags of several lowercased words (one table lookup each)."""
    get = load_lexicon().get
    tags = [get(w, -1) for w in words]
    if -1 in tags:  # rare: only unknown words pay for the heuristic
        tags = [guess_tag(w) if t < 0 else t for w, t in zip(words, tags)]
    return tags
