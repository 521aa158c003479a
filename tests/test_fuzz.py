"""Seeded fuzz test of the span tagger, `sftkey.tag`, over random text and random BPE encodings.

The text mixes ASCII, accents, combining marks, CJK, emoji (with skin tones and ZWJ sequences),
stray tag fragments and whitespace runs. The encodings are GPT-2's real one, the project's
`sftkey-chars`, encodings built by hand from random substrings of the rendered texts (so tokens
straddle span boundaries and split multi-byte characters) with several pre-split patterns, and a
tiny one trained with tiktoken's educational BPE trainer. For every case the tagger must give
back the text, monotone roles, a KEY role for every token holding a byte of the Key, and no
supervised token holding a byte of the prompt. The one documented refusal (a single token
spanning prompt, the whole reasoning and the Key) may occur only when such a token really exists.
"""
from __future__ import annotations

import random

import pytest
import tiktoken
from tiktoken._educational import bpe_train

import data as D
import sftkey

SEED = 20240611
PIECES = (
    # ASCII words, digits, punctuation
    "the", "Answer", "x", "42", "3.14", "-7", "=", "+", ",", ".", "?", "!", "'s", "\"", "#", "####", "$", "%",
    # accents, precomposed and combining (e + U+0301), Greek and Cyrillic
    "é", "café", "naïve", "e\u0301", "a\u0308\u0323", "Ωμέγα", "ёж", "ß",
    # CJK and emoji (4-byte characters, skin-tone modifiers, a ZWJ family, a flag)
    "中文", "数学题", "答え", "한국", "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "∑", "\u00a0",
    # stray tag fragments, whole tags, special-token look-alikes
    "</Thi", "<Answer", "><", "nking>", "</", "<", ">", "Answer>", "<Thinking>", "</Answer>", "<|endoftext|>",
    "<|endof", "|>",
    # whitespace runs
    " ", "  ", "\t", "\n", "\n\n", " \n ", "\r\n", "   \t  ", "\u2028",
)
PATTERNS = {
    "whole text": r"[\s\S]+",  # no pre-splitting: merges may cross every boundary
    "words and spaces": r"\S+|\s+",
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": D._CL100K_PATTERN,
}


def random_field(rng: random.Random, max_pieces: int = 6) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def random_case(rng: random.Random) -> tuple[str, list[tuple[int, int, int]]]:
    tagged = rng.random() < 0.8
    return sftkey.render(random_field(rng), random_field(rng), random_field(rng), tagged)


def hand_built_encoding(rng: random.Random, name: str, pattern: str, n_substrings: int) -> tiktoken.Encoding:
    """All 256 bytes, then merge chains for random byte substrings of rendered random examples.

    Adding every prefix of a substring makes the whole substring reachable by BPE merges, so the
    encoding really produces tokens that cross span boundaries or cut characters in two.
    """
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_substrings):
        raw = random_case(rng)[0].encode("utf-8")
        start = rng.randrange(len(raw))
        piece = raw[start:start + rng.randint(2, 16)]
        for end in range(2, len(piece) + 1):
            ranks.setdefault(piece[:end], len(ranks))
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def trained_encoding(rng: random.Random, pattern: str) -> tiktoken.Encoding:
    """A tiny BPE trained on rendered random examples (pure Python, so kept to 48 merges)."""
    corpus = "".join(random_case(rng)[0] for _ in range(40))
    ranks = bpe_train(corpus, 256 + 48, pattern, visualise=None)
    return tiktoken.Encoding("trained", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def check_case(enc: tiktoken.Encoding, text: str, spans: list[tuple[int, int, int]], stats: dict) -> None:
    """Tag one case and check every property; `stats` counts refusals, straddles and split characters."""
    starts, ends, pieces = [], [], enc.decode_tokens_bytes(enc.encode_ordinary(text))
    for piece in pieces:  # byte range of every token, computed here independently of sftkey
        starts.append(ends[-1] if ends else 0)
        ends.append(starts[-1] + len(piece))
    think_b, key_b = (len(text[:spans[i][0]].encode("utf-8")) for i in (1, 2))
    try:
        ids, roles = sftkey.tag(enc, text, spans)
    except ValueError:
        # The only allowed refusal: one token covering the end of the prompt, all of the reasoning
        # and the start of the Key.
        assert any(s < think_b and e > key_b for s, e in zip(starts, ends)), (enc.name, text)
        stats["refused"] += 1
        return
    assert len(ids) == len(roles) == len(pieces) + 1
    assert ids[-1] == enc.eot_token and roles[-1] == sftkey.KEY
    body = ids[:-1]
    assert enc.eot_token not in body, "special-token text must stay ordinary text"
    assert enc.decode(body) == text and b"".join(enc.decode_tokens_bytes(body)) == text.encode("utf-8")
    assert all(a <= b for a, b in zip(roles, roles[1:])), (enc.name, text, roles)
    stage1 = sftkey.role_weights()
    for s, e, role in zip(starts, ends, roles):
        if e > key_b:  # holds a byte of the Key: every answer character is supervised in stage 2
            assert role == sftkey.KEY, (enc.name, text, s, e, role)
        if s < think_b:  # holds a byte of the prompt: never supervised
            assert stage1[role] == 0, (enc.name, text, s, e, role)
        if role == sftkey.THINK:  # a THINK token holds reasoning bytes only
            assert think_b <= s and e <= key_b
        stats["straddling"] += (s < think_b < e) + (s < key_b < e)
    stats["split_characters"] += sum(1 for p in pieces if not _is_utf8(p))


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.fixture(scope="module")
def encodings(gpt2_encoding) -> list[tiktoken.Encoding]:
    rng = random.Random(SEED)
    built = [hand_built_encoding(rng, f"random-{name}-{i}", pattern, n_substrings=rng.choice((30, 150, 600)))
             for i in range(2) for name, pattern in PATTERNS.items()]
    return [gpt2_encoding, D.char_encoding(), trained_encoding(rng, PATTERNS["whole text"]), *built]


def test_tagger_fuzz(encodings):
    rng = random.Random(SEED + 1)
    stats = {"refused": 0, "straddling": 0, "split_characters": 0}
    cases = 0
    for enc in encodings:
        for _ in range(1000):
            text, spans = random_case(rng)
            check_case(enc, text, spans, stats)
            cases += 1
    assert cases >= 10000
    # The fuzz must reach the hard cases, or it proves little.
    assert stats["straddling"] > 100, stats
    assert stats["split_characters"] > 100, stats
    assert stats["refused"] < cases // 10, stats


def test_fuzz_reaches_the_refusal_and_it_is_exact():
    """An encoding with one token for prompt end + empty reasoning + Key start: refused, not mis-tagged."""
    text, spans = sftkey.render("q", "", "5", tagged=False)  # "q\n\n#### 5"
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"\n\n"] = 256
    enc = tiktoken.Encoding("nn", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 257})
    stats = {"refused": 0, "straddling": 0, "split_characters": 0}
    check_case(enc, text, spans, stats)
    assert stats["refused"] == 1
    with pytest.raises(ValueError, match="spans the prompt"):
        sftkey.tag(enc, text, spans)
