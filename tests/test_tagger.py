"""The span tagger (`sftkey.render`, `sftkey.tag`, `sftkey.count_straddling`); scoring is in test_scoring.py.

The tagger is checked on tokenizers built here: hand-made ones whose merges make one token
straddle a chosen boundary, a byte-only one for multi-byte characters and emoji, a small BPE
trained on tagged text, and GPT-2's real encoding on GSM8K text. Every tagging is compared with
an oracle that assigns each byte its span's role and applies the documented rule per token.
"""
import json
import os

import pytest
import tiktoken
from tiktoken._educational import bpe_train

import data as D
import sftkey
from sftkey import KEY, PROMPT, THINK

from conftest import GSM8K_DIR, needs_gsm8k

EOT = "<|endoftext|>"
ONE_PIECE = r"[\s\S]+"  # no pre-splitting: merges may cross any boundary
GPT2_LIKE = r"""'s|'t| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"""


def byte_encoding(merges: list[bytes] = (), pat_str: str = ONE_PIECE) -> tiktoken.Encoding:
    """All 256 bytes, plus each merge built up as a chain of its prefixes (BPE merges pairs)."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        for end in range(2, len(merge) + 1):
            ranks.setdefault(merge[:end], len(ranks))
    return tiktoken.Encoding("test-bytes", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def oracle_roles(enc: tiktoken.Encoding, text: str, spans, ids: list[int]) -> list[int]:
    """The documented rule, computed independently: each byte gets its span's role, then a token
    holding any KEY byte is KEY, else any PROMPT byte makes it PROMPT, else it is THINK."""
    byte_roles = []
    for start, end, role in spans:
        byte_roles += [role] * len(text[start:end].encode("utf-8"))
    roles, at = [], 0
    for piece in enc.decode_tokens_bytes(ids):
        held = set(byte_roles[at:at + len(piece)])
        at += len(piece)
        roles.append(KEY if KEY in held else PROMPT if PROMPT in held else THINK)
    return roles


def check_tagging(enc: tiktoken.Encoding, text: str, spans) -> tuple[list[int], list[int]]:
    """Tag `text` and check every documented property; returns (ids, roles)."""
    ids, roles = sftkey.tag(enc, text, spans)
    assert len(ids) == len(roles)
    assert ids == enc.encode_ordinary(text) + [enc.eot_token]  # one call over the whole text
    assert enc.decode(ids[:-1]) == text
    assert ids[-1] == enc.eot_token and roles[-1] == KEY
    assert enc.eot_token not in ids[:-1]
    assert roles == sorted(roles), "roles went backwards"
    assert roles[:-1] == oracle_roles(enc, text, spans, ids[:-1])
    return ids, roles


def pieces(enc: tiktoken.Encoding, ids: list[int]) -> list[bytes]:
    return enc.decode_tokens_bytes(ids)


# ---------------------------------------------------------------------------------------------
# render

def test_render_tagged_template():
    text, spans = sftkey.render("Q: 2+3", "2+3=5", "5")
    assert text == "Q: 2+3\n<Thinking>2+3=5</Thinking><Answer>5</Answer>"
    assert [text[a:b] for a, b, _ in spans] == ["Q: 2+3\n", "<Thinking>2+3=5</Thinking>", "<Answer>5</Answer>"]
    assert [role for _, _, role in spans] == [PROMPT, THINK, KEY]


def test_render_untagged_template():
    text, spans = sftkey.render("Q: 2+3", "2+3=5", "5", tagged=False)
    assert text == "Q: 2+3\n2+3=5\n#### 5"
    assert [text[a:b] for a, b, _ in spans] == ["Q: 2+3\n", "2+3=5", "\n#### 5"]
    ids, roles = check_tagging(byte_encoding(), text, spans)
    assert roles.count(KEY) == len("\n#### 5") + 1  # one token per byte, plus end-of-text


# Only the prompt's TRAILING whitespace goes (sftkey.prompt_head); its leading whitespace is part of what it says.
# (Mutation audit: `prompt.strip()`, so an indented prompt lost its indentation in training and evaluation alike.)

@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_render_keeps_a_prompts_leading_whitespace_and_drops_only_its_trailing(tagged):
    prompt = "    print(2+3)  \n"
    assert sftkey.prompt_head(prompt) == "    print(2+3)\n"
    text, spans = sftkey.render(prompt, "2+3=5", "5", tagged)
    assert text.startswith("    print(2+3)\n") and text[spans[0][0]:spans[0][1]] == "    print(2+3)\n"


def test_tag_refuses_spans_that_do_not_cover_the_text():
    text, spans = sftkey.render("Q", "a", "b")
    enc = byte_encoding()
    for bad in ([spans[0], spans[2], spans[1]], spans[:2], [(0, 1, PROMPT), spans[1], spans[2]],
                [spans[0], spans[1], (spans[2][0], spans[2][1] - 1, KEY)]):
        with pytest.raises(ValueError, match="spans"):
            sftkey.tag(enc, text, bad)


# ---------------------------------------------------------------------------------------------
# Tokens that straddle a boundary

# (merge that creates the straddling token, the token, its expected role)
STRADDLES = [
    (b"\n<", b"\n<", PROMPT),  # prompt's newline + thinking's first tag byte: no prompt byte is supervised
    (b"3\n<Thinking>", b"3\n<Thinking>", PROMPT),  # a longer prompt/thinking token
    (b"><", b"><", KEY),  # `</Thinking>` + `<Answer>`: every Key byte is supervised
    (b"=5</Thinking><Answer>5", b"=5</Thinking><Answer>5", KEY),  # reasoning, tags and answer in one token
    (b"</Thinking><Answer>5</Answer>", b"</Thinking><Answer>5</Answer>", KEY),  # ends at the end of the text
]


@pytest.mark.parametrize("merge, token, role", STRADDLES)
def test_straddling_token_gets_the_documented_role(merge, token, role):
    enc = byte_encoding([merge])
    text, spans = sftkey.render("Q: 2+3", "2+3=5", "5")
    ids, roles = check_tagging(enc, text, spans)
    toks = pieces(enc, ids[:-1])
    assert toks.count(token) == 1, f"the encoding did not produce {token!r}: {toks}"
    at = toks.index(token)
    assert roles[at] == role
    assert sftkey.count_straddling(enc, text, spans, ids) == 1
    # Neighbours keep their own span's role: the rule only decides the straddling token.
    before, after = roles[at - 1] if at else PROMPT, roles[at + 1]
    assert before <= role <= after
    if role == KEY:
        assert after == KEY and ids[-1] == enc.eot_token
    if token.endswith(b"</Answer>"):
        assert at == len(ids) - 2  # the last text token, then end-of-text


def test_no_merges_means_no_straddling_tokens():
    enc = byte_encoding()
    text, spans = sftkey.render("Q: 2+3", "2+3=5", "5")
    ids, roles = check_tagging(enc, text, spans)
    assert sftkey.count_straddling(enc, text, spans, ids) == 0
    assert roles == [PROMPT] * 7 + [THINK] * len("<Thinking>2+3=5</Thinking>") + [KEY] * (len("<Answer>5</Answer>") + 1)


def test_token_holding_prompt_whole_reasoning_and_answer_is_refused():
    # With an empty reasoning one token can cover the prompt's end, both thinking tags and the
    # Key's start; the tagger cannot supervise it without supervising the prompt, so it refuses.
    enc = byte_encoding([b"\n<Thinking></Thinking><Answer>"])
    text, spans = sftkey.render("Q", "", "5")
    with pytest.raises(ValueError, match="cannot tag"):
        sftkey.tag(enc, text, spans)


def test_char_encoding_keeps_tags_whole_and_never_straddles():
    enc = D.char_encoding()
    text, spans = sftkey.render("Q: 47+38-19", "47+38=85 85-19=66", "66")
    ids, roles = check_tagging(enc, text, spans)
    toks = pieces(enc, ids[:-1])
    for tag in sftkey.TAGS:
        assert toks.count(tag.encode()) == 1
    assert sftkey.count_straddling(enc, text, spans, ids) == 0


# ---------------------------------------------------------------------------------------------
# Multi-byte characters and emoji

def char_role(spans, index: int) -> int:
    return next(role for start, end, role in spans if start <= index < end)


def test_multibyte_characters_split_into_byte_tokens_take_their_characters_role():
    enc = byte_encoding()  # no multi-byte merges: é is 2 tokens, an emoji 4
    text, spans = sftkey.render("Café ☕ — prix?", "naïve 🙂 2€+3€", "5€ 🎉")
    ids, roles = check_tagging(enc, text, spans)
    assert len(ids) - 1 == len(text.encode("utf-8")) > len(text)
    # tiktoken gives a token that starts inside a character that character's offset, so several
    # tokens share an offset; each must have the role of the character it belongs to.
    _, offsets = enc.decode_with_offsets(ids[:-1])
    assert len(set(offsets)) == len(text) < len(offsets)
    assert roles[:-1] == [char_role(spans, i) for i in offsets]


def test_tokens_starting_inside_a_character_at_a_boundary():
    # Untagged template: prompt "\n" then reasoning starting with an emoji; reasoning ending in é
    # then the Key's "\n#### ". Merges make tokens that cross both boundaries from or into the
    # middle of a character: the byte rule decides them, the character offsets could not.
    emoji, e_acute = "🙂".encode(), "é".encode()
    enc = byte_encoding([b"\n" + emoji[:1], e_acute[1:] + b"\n"])
    text, spans = sftkey.render("Q", "🙂 café", "5", tagged=False)
    ids, roles = check_tagging(enc, text, spans)
    toks = pieces(enc, ids[:-1])
    first = toks.index(b"\n" + emoji[:1])
    assert roles[first] == PROMPT  # holds the prompt's newline
    assert roles[first + 1:first + 4] == [THINK] * 3  # the rest of the emoji
    last = toks.index(e_acute[1:] + b"\n")
    assert toks[last - 1] == e_acute[:1] and roles[last - 1] == THINK
    assert roles[last] == KEY  # starts inside é (THINK) but holds the Key's newline
    assert sftkey.count_straddling(enc, text, spans, ids) == 2


# ---------------------------------------------------------------------------------------------
# A trained BPE over many texts

@pytest.fixture(scope="module")
def trained_encoding() -> tiktoken.Encoding:
    corpus = "\n".join(sftkey.render(ex.prompt, ex.thinking, ex.answer)[0] for ex in D.synthetic_task(40, seed=0))
    ranks = bpe_train(corpus + "\ncafé naïve 🙂🙂 — 5€", vocab_size=300, pat_str=GPT2_LIKE, visualise=None)
    return tiktoken.Encoding("test-trained", pat_str=GPT2_LIKE, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


EXTRA_EXAMPLES = [
    ("Combien font 2+3 ? é", "On ajoute: 2+3=5 ✓", "5"),
    ("🙂🙂", "🎉 then 7-2=5 🙂", "5 🙂"),
    ("Q: 1+1", "a literal <|endoftext|> inside the reasoning", "2"),
    ("<|endoftext|>", "x", "<|endoftext|>"),
    ("", "", "0"),
    ("Q:\n\n", " spaced  out ", " 1,000 "),
]


def test_trained_bpe_satisfies_every_property(trained_encoding):
    enc = trained_encoding
    examples = [(ex.prompt, ex.thinking, ex.answer) for ex in D.synthetic_task(60, seed=1)] + EXTRA_EXAMPLES
    straddling = 0
    for tagged in (True, False):
        for prompt, thinking, answer in examples:
            text, spans = sftkey.render(prompt, thinking, answer, tagged)
            ids, _ = check_tagging(enc, text, spans)
            straddling += sftkey.count_straddling(enc, text, spans, ids)
    assert straddling >= len(examples)  # the trained merges do cross boundaries (`><` at least)


@pytest.mark.parametrize("make", [byte_encoding, D.char_encoding])
def test_literal_endoftext_in_text_is_plain_text(make):
    enc = make()
    text, spans = sftkey.render("say <|endoftext|>", "it is <|endoftext|>", EOT)
    ids, roles = check_tagging(enc, text, spans)
    assert ids.count(enc.eot_token) == 1 and roles.count(KEY) > 1


# ---------------------------------------------------------------------------------------------
# GPT-2's real encoding on GSM8K text

GSM8K_LIKE = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May?",
              "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.",
              "72")


def gsm8k_examples(n: int) -> list[tuple[str, str, str]]:
    with open(os.path.join(GSM8K_DIR, "train.jsonl"), encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(n)]
    out = []
    for r in records:
        thinking, _, answer = r["answer"].rpartition("\n####")
        out.append((r["question"], thinking.strip(), answer.strip()))
    return out


@needs_gsm8k
def test_gpt2_straddling_tag_token_is_key(gpt2_encoding):
    enc = gpt2_encoding
    for prompt, thinking, answer in [GSM8K_LIKE] + gsm8k_examples(25):
        text, spans = sftkey.render(prompt, thinking, answer)
        ids, roles = check_tagging(enc, text, spans)
        toks = pieces(enc, ids[:-1])
        assert toks.count(b"><") == 1
        at = toks.index(b"><")
        assert roles[at - 1] == THINK and roles[at] == KEY  # `...inking` | `><` | `Answer`
        assert b"".join(toks[at:]).decode() == "><Answer>" + answer + "</Answer>"
        assert all(r == KEY for r in roles[at:])
        assert sftkey.count_straddling(enc, text, spans, ids) >= 1
        # Every answer character sits in a KEY token.
        key_text = enc.decode([i for i, r in zip(ids[:-1], roles) if r == KEY])
        assert key_text.endswith("<Answer>" + answer + "</Answer>")


def test_gpt2_untagged_template(gpt2_encoding):
    text, spans = sftkey.render(*GSM8K_LIKE, tagged=False)
    ids, roles = check_tagging(gpt2_encoding, text, spans)
    assert gpt2_encoding.decode([i for i, r in zip(ids[:-1], roles) if r == KEY]) == "\n#### 72"


def test_gpt2_literal_endoftext_is_plain_text(gpt2_encoding):
    text, spans = sftkey.render("What is <|endoftext|>?", "It is the string <|endoftext|>.", "<|endoftext|>")
    ids, _ = check_tagging(gpt2_encoding, text, spans)
    assert ids.count(gpt2_encoding.eot_token) == 1
