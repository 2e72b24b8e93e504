"""Text token reduction throughput: captions/s on one core, tokenization included.

Captions are generated from templates and word lists (no downloads): 10-30 words, mixed case,
punctuation, numbers, and a share of non-ASCII captions that take the slow (Rust) path. Each
strategy runs over the same captions; "cold" is the first pass over a fresh tokenizer (word
cache empty), "warm" a later pass. One process, one thread.

    PYTHONPATH=. python benchmarks/syntax_masking.py [--captions 20000] [--context-length 8]

Prints one JSON line per (strategy, pass) and a final JSON object with captions_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ADJ = (
    "red blue green yellow small large old young wooden tall bright dark busy empty colorful "
    "fluffy shiny rusty modern ancient crowded quiet snowy sunny rainy white black brown striped "
    "delicious tiny huge vintage"
).split()
_NOUN = (
    "dog cat man woman child boy girl bus train car bicycle skateboard surfboard kite pizza sandwich "
    "table bench street beach park field kitchen bathroom bedroom laptop phone umbrella horse cow "
    "elephant giraffe zebra bird plate bowl clock tower building bridge river mountain ocean wave "
    "frisbee ball racket fence window door sign truck motorcycle airplane boat tree flower vase "
    "couch chair television refrigerator oven sink toilet teddy bear cake donut banana apple "
    "skateboarder snowboarder surfer crowd player team stadium hydrant lamp mirror pillow blanket"
).split()
_VERB = (
    "riding holding sitting standing walking running eating playing looking carrying flying "
    "jumping lying parked waiting crossing throwing catching watching pulling pushing grazing "
    "swimming climbing leaning covered filled decorated"
).split()
_PREP = "on in near under beside behind next to with at across along through over".split()
_EXTRA = (
    "on a sunny day", "at night", "in the background", "during the winter", "in front of a crowd",
    "while people watch", "with 2 friends", "after the rain", "in New York City", "by the sea",
)
_NON_ASCII = ("at a café", "in Zürich", "near the façade", "with a piñata", "— très chic")


def _phrase(rng: random.Random) -> str:
    adjs = rng.sample(_ADJ, rng.choice((0, 0, 1, 1, 2)))
    noun = rng.choice(_NOUN)
    if rng.random() < 0.3:
        det, noun = rng.choice(("two", "three", "some", "many", "a group of")), noun + "s"
    else:
        det = rng.choice(("a", "the", "one", "this"))
    return " ".join((det, *adjs, noun))


def _caption(rng: random.Random) -> str:
    parts = [_phrase(rng), rng.choice(("", "is ", "are ")) + rng.choice(_VERB), _phrase(rng)]
    parts += [rng.choice(_PREP), _phrase(rng)]
    for _ in range(rng.randint(0, 2)):
        parts += [rng.choice(("and", "while", ",", "with")), _phrase(rng), rng.choice(_VERB)]
    if rng.random() < 0.5:
        parts.append(rng.choice(_EXTRA))
    if rng.random() < 0.1:
        parts.append(rng.choice(("(photo by J. Smith)", "- stock image #4521", "2019", "IMG_0042")))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + rng.choice((".", "", "!", " ."))


def make_captions(n: int, seed: int = 0, non_ascii_share: float = 0.03) -> list[str]:
    """n varied captions of 10-30 words (whitespace-separated), about 3% with non-ASCII text."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        text = _caption(rng)
        if rng.random() < non_ascii_share:
            text += " " + rng.choice(_NON_ASCII)
        if 10 <= len(text.split()) <= 30:
            out.append(text)
    return out


def measure(tokenizer, captions: list[str], context_length: int, strategy: str, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for c in captions:
        tokenizer.encode(c, context_length, strategy, rng)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"captions_per_s_wall": len(captions) / wall, "captions_per_s_cpu": len(captions) / cpu}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=20000)
    parser.add_argument("--context-length", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="warm passes; the median is reported")
    args = parser.parse_args(argv)

    from clipa_ds.data.tokenizer import CaptionTokenizer

    captions = make_captions(args.captions)
    n_words = [len(c.split()) for c in captions]
    print(json.dumps({"captions": len(captions), "words_min": min(n_words), "words_max": max(n_words),
                      "words_mean": sum(n_words) / len(n_words)}))  # fmt: skip
    result: dict[str, dict[str, float]] = {}
    for strategy in ("syntax", "truncate", "random", "block"):
        tok = CaptionTokenizer()  # fresh: the first pass fills the word cache
        tok.encode("warm up the lexicon and the model", args.context_length, strategy, random.Random(0))
        cold = measure(tok, captions, args.context_length, strategy, seed=1)
        warm = sorted(
            (measure(tok, captions, args.context_length, strategy, seed=2 + r) for r in range(args.reps)),
            key=lambda m: m["captions_per_s_cpu"],
        )[args.reps // 2]
        for name, m in (("cold", cold), ("warm", warm)):
            print(json.dumps({"strategy": strategy, "pass": name, **{k: round(v) for k, v in m.items()}}))
        result[strategy] = {"cold": round(cold["captions_per_s_cpu"]), "warm": round(warm["captions_per_s_cpu"])}
    final = {"captions_per_s_per_core": result, "clock": "process cpu time", "context_length": args.context_length,
             "target": 20000}  # fmt: skip
    print(json.dumps(final))
    return final


if __name__ == "__main__":
    main()
