"""SFTKey, the method (arXiv 2512.21017): everything that is specific to it lives here.

A training response is written as

    <Thinking>reasoning</Thinking><Answer>answer</Answer><|endoftext|>

Stage 1 (SFT-Tag) puts the loss on the whole response; stage 2 ("key only", sftkey_tag) starts from
the stage-1 weights and puts it only on the answer part, the Key, while the reasoning is still
fed in as context. This file holds the token roles, the rendering of an example, the
tokenizer-aware span tagger, the per-role loss weights of each stage, the weighted loss, and the
scoring of generated answers. The network is in model.py, the data in data.py, the loop in
train.py.
"""
from __future__ import annotations

import contextlib
import functools
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F

# Token roles. They only ever increase along a sequence: PROMPT, then THINK, then KEY.
PROMPT, THINK, KEY = 0, 1, 2
PAD = 3  # batching only: positions that hold no token at all
ROLE_NAMES = ("prompt", "thinking", "key")

THINK_OPEN, THINK_CLOSE = "<Thinking>", "</Thinking>"
ANSWER_OPEN, ANSWER_CLOSE = "<Answer>", "</Answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
PROMPT_SEP = "\n"  # between the prompt and the response
UNTAGGED_KEY_PREFIX = "\n#### "  # the untagged (plain SFT) layout ends with a line "#### answer"


def prompt_head(prompt: str) -> str:
    """The prompt as training and evaluation both feed it: trailing whitespace dropped, then PROMPT_SEP.
    Whitespace tokenizes differently at a text's end than before a non-space: with gpt2 a prompt ending
    in "\\n", " \\n" or "\\r\\n" gave one "\\n\\n" token alone (as evaluation fed it) but two "\\n" tokens
    in the training text, where `<Thinking>` follows. data.tokenize counts a mismatch that remains."""
    return prompt.rstrip() + PROMPT_SEP


def render(prompt: str, thinking: str, answer: str, tagged: bool = True) -> tuple[str, list[tuple[int, int, int]]]:
    """Write one example as text and say which characters play which role.

    The tagged template (the paper's "-Tag" format) is exactly

        {prompt}\\n<Thinking>{thinking}</Thinking><Answer>{answer}</Answer>

    with no other separators, the prompt's trailing whitespace dropped (`prompt_head`). The PROMPT span
    is the prompt and its newline, THINK is `<Thinking>…</Thinking>`, KEY is `<Answer>…</Answer>`. The
    untagged template (the plain SFT baseline) is `{prompt}\\n{thinking}\\n#### {answer}`, KEY `\\n#### {answer}`.
    Returns (text, spans) where spans are contiguous (start, end, role) character ranges.
    """
    head = prompt_head(prompt)
    body = f"{THINK_OPEN}{thinking}{THINK_CLOSE}" if tagged else thinking
    key = f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}" if tagged else UNTAGGED_KEY_PREFIX + answer
    a, b = len(head), len(head) + len(body)
    return head + body + key, [(0, a, PROMPT), (a, b, THINK), (b, b + len(key), KEY)]


def tag(enc: tiktoken.Encoding, text: str, spans: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize `text` in one call and give every token the role of the span it comes from.

    Returns (ids, roles): the tokens of the whole text followed by end-of-text (role KEY, since
    closing the answer is part of the answer). Special-token strings in `text` are encoded as
    ordinary text, never as special tokens.

    Rule for a token that overlaps two spans (BPE can merge across a boundary, e.g. GPT-2's `><`
    in `</Thinking><Answer>`): if it holds any byte of the Key it is KEY, so every answer character
    is supervised in stage 2; otherwise if it holds any byte of the prompt it is PROMPT, so no
    prompt character is ever supervised; otherwise THINK. A token holding bytes of the prompt and
    of the Key (possible only when a merge swallows the whole reasoning) fits no role: ValueError.
    Overlap is decided on bytes, exact also for tokens that start or end inside a multi-byte
    character (tiktoken's `decode_with_offsets` gives character offsets, losing the partial one).
    """
    _check_spans(text, spans)
    ids = enc.encode_ordinary(text)
    starts, ends = _token_byte_ranges(enc, ids, text)
    think_start, key_start = _byte_boundaries(text, spans)
    roles = np.where(ends > key_start, KEY, np.where(starts < think_start, PROMPT, THINK))
    if np.any((starts < think_start) & (ends > key_start)):
        raise ValueError("a token spans the prompt, the whole reasoning and the answer; cannot tag it")
    return ids + [enc.eot_token], roles.tolist() + [KEY]


def count_straddling(enc: tiktoken.Encoding, text: str, spans: list[tuple[int, int, int]], ids: list[int]) -> int:
    """How many tokens of `ids` (from `tag`: end-of-text last) hold bytes of two spans: the ones the rule decides."""
    starts, ends = _token_byte_ranges(enc, ids[:-1], text)
    return int(sum(np.sum((starts < b) & (ends > b)) for b in _byte_boundaries(text, spans)))


@functools.lru_cache(maxsize=8)  # per Encoding object (tiktoken's compare by identity)
def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """The length in bytes of every token id of `enc` (0 for unused ids), read-only, built once per encoding:
    decoding each token of each text again was most of the time of tokenizing GSM8K."""
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        with contextlib.suppress(KeyError):  # a gap in the ids (cl100k_base has some): length 0
            lengths[i] = len(enc.decode_single_token_bytes(i))
    lengths.flags.writeable = False  # shared by every caller (the cache)
    return lengths


def _token_byte_ranges(enc: tiktoken.Encoding, ids: list[int], text: str) -> tuple[np.ndarray, np.ndarray]:
    lengths = token_byte_lengths(enc)[np.asarray(ids, dtype=np.int64)]
    ends = np.cumsum(lengths)
    assert ends[-1] == len(text.encode("utf-8")), "tokenization does not round-trip"
    return ends - lengths, ends


def _byte_boundaries(text: str, spans: list[tuple[int, int, int]]) -> tuple[int, int]:
    """Byte offsets where THINK and KEY start."""
    return len(text[:spans[1][0]].encode("utf-8")), len(text[:spans[2][0]].encode("utf-8"))


def _check_spans(text: str, spans: list[tuple[int, int, int]]) -> None:
    if ([role for _, _, role in spans] != [PROMPT, THINK, KEY] or spans[0][0] != 0 or spans[-1][1] != len(text)
            or any(a[1] != b[0] for a, b in zip(spans, spans[1:]))):  # contiguous
        raise ValueError(f"spans must be contiguous PROMPT, THINK, KEY ranges covering the text, got {spans}")


# --- The loss: one weight per role. Stage 1 and stage 2 differ only in these three numbers. ---

def role_weights(key_only: bool = False, key_weight: float = 1.0) -> tuple[float, float, float]:
    """Loss weight of (prompt, thinking, key) tokens. Stage 1: (0, 1, 1); stage 2: (0, 0, 1). `key_weight` > 1
    gives the single-stage control that up-weights the answer instead."""
    return (0.0, 0.0 if key_only else 1.0, key_weight)


@dataclass(frozen=True)
class Stage:
    """One stage of a run: what train.train needs besides the data. train.py and experiment.py share it."""
    name: str
    weights: tuple[float, float, float]
    iters: int
    lr: float
    dft: bool = False  # each token's loss times the model's probability of it (weighted_loss_sum)


def stage_name(before: str, weights: tuple[float, float, float], tagged: bool, dft: bool = False) -> str:
    """The losses of the stages so far ("sft" = (0, 1, 1), "key" = (0, 0, 1), else "w0-1-5"; with `dft`: "dft",
    "dft-key", "dft-w0-1-5"), joined by "+" unless both are words, then _tag for the tagged layout. `before`: the last
    stage's name: after sft_tag, key is "sftkey_tag" (the method); across layouts "sft_untagged+key_tag"."""
    loss = {(0, 1, 1): "sft", (0, 0, 1): "key"}.get(tuple(weights), "w" + "-".join(f"{w:.15g}" for w in weights))
    loss = ("dft" if loss == "sft" else "dft-" + loss) if dft else loss  # "dftkey" would read as dft, then key
    same_layout = before.endswith("_tag") == tagged or not before  # else kept whole, its layout named: "+" joins
    before = before.removesuffix("_tag") if same_layout else before + "_untagged" * tagged
    return before + ("+" if before and not (before + loss).isalpha() else "") + loss + "_tag" * tagged


def token_weights(roles: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    """Per-token loss weights for a tensor of roles (PAD gets 0), computed on the roles' device: copying a weight
    table there was a synchronous copy that made the host wait for the GPU (docs/gpu.md)."""
    return sum(torch.where(roles == role, float(weight), 0.0) for role, weight in enumerate(weights))


def weighted_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                      weights: torch.Tensor, dft: bool = False) -> torch.Tensor:
    """Sum over positions of weight x cross-entropy of predicting `targets` from `hidden` (with `dft`, each
    cross-entropy times the model's probability of its target, held constant: DFT, arXiv 2508.05629).

    Only positions with a non-zero weight are projected onto the vocabulary: in stage 2 that is a few percent of
    them, and the projection is the most expensive matrix product of a small model. The caller divides by the total
    weight of the optimizer step (train.py), so accumulated micro-batches weigh by their tokens; an all-zero one adds 0.
    """
    keep = weights.nonzero(as_tuple=True)  # indices, not a mask: a GPU makes the host wait once, not at every use
    logits = head(hidden[keep])
    losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    weighted = losses * weights[keep]
    return (weighted * torch.exp(-losses.detach()) if dft else weighted).sum()  # DFT: x the probability, held constant


# --- Scoring a generated response (the text the model wrote after the prompt, without end-of-text). ---

_TAGGED = re.compile(r"<Thinking>(.*)</Thinking><Answer>(.*)</Answer>", re.S)
_REFUSED = TAGS + ("<|endoftext|>",)  # what data.py refuses inside a thinking or an answer
# Shown as nothing, yet no category says so: Hangul fillers, Braille blank, ...; reserved default-ignorables; nonchars.
_BLANK = re.compile("[\u115f\u1160\u3164\uffa0\u2800\u180e\u2065"
                    "\ufdd0-\ufdef\ufff0-\ufff8\ufffe\uffff\U000e0000-\U000e0fff]")


def invisible(text: str) -> bool:
    """Whether `text` shows nothing: whitespace, control and format characters, non-spacing marks, Hangul fillers..."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Mn", "Me") or _BLANK.match(c) for c in text)


def format_ok(response: str, ended: bool) -> bool:
    """Fmt: exactly `<Thinking>…</Thinking><Answer>…</Answer>`, then end-of-text, nothing else.

    Strict where the training data is (data.py): neither part holds a tag or the text `<|endoftext|>`,
    and the answer is not `invisible` (empty, only spaces, U+200B, ...). The reasoning may be empty.
    """
    match = _TAGGED.fullmatch(response) if ended else None  # groups: the thinking, the answer
    return bool(match) and not invisible(match[2]) and not any(t in part for part in match.groups() for t in _REFUSED)


def extract_answer(response: str, tagged: bool = True) -> str | None:
    """The answer a response gives, for Acc: the last one outside the reasoning.

    Tagged: the last `<Answer>` after the first `</Thinking>` (where the reasoning ends), or the
    last `<Answer>` anywhere when there is no `</Thinking>`; so an answer drafted inside the
    reasoning never counts once the reasoning is closed. Untagged: the line after the last `####`.
    Lenient on purpose: an answer whose `</Answer>` is missing (cut off at the length limit) still
    counts for Acc; the strict layout is what Fmt scores.
    """
    if tagged:
        close = response.find(THINK_CLOSE)
        start = response.rfind(ANSWER_OPEN, close + len(THINK_CLOSE) if close >= 0 else 0)
        return None if start < 0 else response[start + len(ANSWER_OPEN):].split(ANSWER_CLOSE, 1)[0]
    start = response.rfind("####")
    return None if start < 0 else response[start + 4:].strip().split("\n", 1)[0]


# An optional sign and `$` in either order, ASCII digits with commas between groups of exactly
# three, an optional decimal part, an optional `%`. No exponents, `_`, inf, nan or other scripts' digits.
_NUMBER = re.compile(r"(?:([-+\u2212])\$?|\$([-+\u2212])?)?(\d{1,3}(?:,\d{3})+|\d+)?(\.\d+)?%?", re.ASCII)


def normalize(answer: str) -> str | Fraction:
    """Whitespace folded; a number becomes its exact value (a Fraction), so no two numbers that
    differ, however little, are equal. A number may end in one `.`, read as the end of a sentence
    ("18." is 18, as Python also reads it). `-` and U+2212 `−` are minus signs. Anything else, and
    a number too long for Python's int() (over 4300 digits), stays text."""
    text = " ".join(unicodedata.normalize("NFC", answer).split())  # "e\u0301" is "\u00e9"
    match = _NUMBER.fullmatch(text.removesuffix("."))
    if not match or not (match[3] or match[4]):
        return text
    try:
        value = Fraction((match[3] or "0").replace(",", "") + (match[4] or ""))
    except ValueError:  # more digits than sys.get_int_max_str_digits()
        return text
    return -value if (match[1] or match[2]) in ("-", "\u2212") else value


def answers_match(predicted: str | None, reference: str) -> bool:
    """Acc for one example: equal after `normalize`, numbers exactly ("1,000" == "$1,000" == "1000.0",
    but 2499998 != 2500000), anything else as text. A number never equals a text."""
    return predicted is not None and normalize(predicted) == normalize(reference)


def composite(acc: float, fmt: float) -> float:
    """The paper's headline score."""
    return 0.7 * acc + 0.3 * fmt
