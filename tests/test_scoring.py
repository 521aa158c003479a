"""Scoring a generated response: Fmt, which answer counts for Acc, exact answer comparison, the composite.

Fmt (`sftkey.format_ok`), which answer counts for Acc (`sftkey.extract_answer`), exact answer
comparison (`sftkey.normalize`, `sftkey.answers_match`), the composite, and the wiring of all of
them in `train.evaluate`. The untagged layout's rule is in test_untagged.py.

Acc and Fmt are the paper's headline numbers, so a loose rule here silently inflates or deflates
every result: a float tolerance that calls 2499998 right for 2500000, a parser that reads "1,2" as
12, an answer drafted inside the reasoning taken for the final one, or an empty answer scored as
well-formed. The matching rules are also run over every reference answer of the real GSM8K files.
"""
import json
import os
import re
from fractions import Fraction

import pytest
import torch

import data as D
import sftkey
import train
from conftest import GSM8K_DIR, needs_gsm8k
from model import GPTConfig

GOOD = "<Thinking>48/2 = 24\n48+24 = 72</Thinking><Answer>72</Answer>"


# ---------------------------------------------------------------------------------------------
# Fmt

@pytest.mark.parametrize("response, ended, ok", [
    (GOOD, True, True),
    (GOOD, False, False),  # no end-of-text
    (GOOD + " more", True, False),  # text after </Answer>
    (GOOD + "\n", True, False),
    (" " + GOOD, True, False),  # text before <Thinking>
    ("<Thinking>a</Thinking> <Answer>72</Answer>", True, False),  # nothing between the tags
    ("<Thinking>a</Thinking>\n<Answer>72</Answer>", True, False),
    ("<Thinking>a</Thinking>", True, False),  # missing answer
    ("<Answer>72</Answer>", True, False),  # missing reasoning
    ("<Thinking>a<Answer>72</Answer>", True, False),
    ("<Thinking>a</Thinking><Answer>72", True, False),
    ("<Thinking>a</Thinking><Answer>7</Answer><Answer>2</Answer>", True, False),  # a tag twice
    ("<Thinking>a<Thinking>b</Thinking><Answer>7</Answer>", True, False),  # nested tags
    ("<Thinking>a</Answer></Thinking><Answer>7</Answer>", True, False),
    ("<Thinking>a</Thinking><Answer>7<Thinking></Answer>", True, False),
    # Changed on purpose: an empty answer used to pass ("empty parts are still the format"), but the
    # training data refuses empty answers (data.py: "empty answer"), so it is not the trained format.
    ("<Thinking></Thinking><Answer></Answer>", True, False),
    ("<Thinking>a</Thinking><Answer> \n\t</Answer>", True, False),  # only whitespace: empty once stripped
    ("<Thinking></Thinking><Answer>7</Answer>", True, True),  # the data allows an empty reasoning
    # The data refuses a literal `<|endoftext|>` in any field (it would end the example early).
    ("<Thinking>a <|endoftext|></Thinking><Answer>7</Answer>", True, False),
    ("<Thinking>a</Thinking><Answer>7<|endoftext|></Answer>", True, False),
    ("", True, False),
    ("", False, False),
])
def test_format_ok(response, ended, ok):
    assert sftkey.format_ok(response, ended) is ok


@pytest.mark.parametrize("answer", ["7", "\u0663", "e\u0301", "\u3164x", "\u2801", "\u00bd",  # visible: kept
                                    "\u0903", "\ue000", "\U0001fae9",  # a spacing mark, private use, a newer emoji
                                    "\ufff0", "\u2065", "\U000e0002", "\uffff",  # reserved ignorables, a nonchar
                                    "\u200b", "\u3164", "\u2800", "\u034f\ufe0f", "\u0301", " \u00a0", "\u2060\ufeff"])
def test_fmt_takes_exactly_the_answers_a_training_file_may_hold(answer):
    """One rule (sftkey.invisible) for both: an answer of zero-width spaces, Hangul fillers or a lone combining
    mark is refused in the data, so a response giving one is not the trained format either."""
    try:
        D._parse(json.dumps({"prompt": "Q", "thinking": "t", "answer": answer}), "tagged", False)
        in_the_data = True
    except ValueError as err:
        assert "empty answer" in str(err)
        in_the_data = False
    assert in_the_data is (answer in ("7", "\u0663", "e\u0301", "\u3164x", "\u2801", "\u00bd", "\u0903", "\ue000",
                                      "\U0001fae9"))  # found in review: the last three were refused as empty
    assert sftkey.format_ok(f"<Thinking>t</Thinking><Answer>{answer}</Answer>", ended=True) is in_the_data


def test_fmt_is_true_only_for_the_exact_rendered_layout():
    """Every training response as render writes it passes; one stray character at any of the places
    the layout leaves no room for fails, and so does a response that did not end with end-of-text."""
    for ex in D.synthetic_task(10, seed=0):
        text, spans = sftkey.render(ex.prompt, ex.thinking, ex.answer)
        response = text[spans[0][1]:]  # what the model writes after the prompt
        assert sftkey.format_ok(response, ended=True)
        assert not sftkey.format_ok(response, ended=False)
        gap = spans[1][1] - spans[0][1]  # between </Thinking> and <Answer>
        for at in (0, gap, len(response)):
            for extra in (" ", "\n", "x"):
                assert not sftkey.format_ok(response[:at] + extra + response[at:], ended=True), (at, extra)


# ---------------------------------------------------------------------------------------------
# Which answer counts

@pytest.mark.parametrize("response, answer", [
    (GOOD, "72"),
    (GOOD + " and then 73", "72"),  # text after </Answer> ignored
    ("<Thinking>x</Thinking><Answer> $1,000 </Answer>", " $1,000 "),
    ("<Thinking>x</Thinking>72", None),  # missing tag
    ("", None),
    # The answer after the reasoning counts, not one drafted inside it.
    ("<Thinking>try <Answer>7</Answer> no</Thinking><Answer>9</Answer>", "9"),
    ("<Thinking>try <Answer>7</Answer> no</Thinking>", None),  # reasoning closed, no answer after it
    ("<Thinking>try <Answer>7</Answer> no</Thinking><Answer>9", "9"),  # cut off: still counts for Acc
    ("<Thinking>a</Thinking><Answer>7</Answer><Answer>9</Answer>", "9"),  # the last one after the reasoning
    ("<Thinking>a</Thinking><Answer>7</Answer></Thinking><Answer>9</Answer>", "9"),
    # Without a </Thinking>: the last <Answer>, as the untagged layout takes the last ####.
    ("<Thinking>a <Answer>7</Answer> b <Answer>9</Answer>", "9"),
    ("<Thinking>a <Answer>7</Answer> b <Answer>9", "9"),
    ("<Answer>7</Answer>", "7"),
])
def test_extract_answer_tagged(response, answer):
    assert sftkey.extract_answer(response) == answer


# The rule when `</Thinking>` appears more than once, or after an answer: the reasoning ends at the
# FIRST `</Thinking>`, and the answer is the LAST `<Answer>` after it; an `</Thinking>` after an answer
# neither voids it nor moves the end of the reasoning.
@pytest.mark.parametrize("response, answer", [
    ("<Thinking>a</Thinking><Answer>5</Answer></Thinking><Answer>7</Answer>", "7"),
    ("<Answer>5</Answer></Thinking><Answer>7</Answer>", "7"),  # 5 comes before the reasoning ends
    ("<Answer>5</Answer></Thinking>", None),  # the only answer is inside the reasoning
    ("<Answer>5</Answer></Thinking>x</Thinking><Answer>7</Answer>", "7"),
    ("<Thinking>a</Thinking><Answer>5</Answer></Thinking>", "5"),  # a stray close after it keeps the answer
    ("<Thinking>a</Thinking><Answer>5</Answer></Thinking>b</Thinking>", "5"),
    ("<Thinking>a</Thinking><Answer>5</Answer></Thinking><Answer>7", "7"),  # the last one, cut off
    ("<Thinking>a</Thinking><Answer>5</Answer><Answer>6</Answer></Thinking>", "6"),
    ("<Thinking>a</Thinking></Thinking><Answer>5</Answer>", "5"),
    ("</Thinking><Answer>5</Answer>", "5"),
    ("<Thinking>x<Answer>1</Answer></Thinking><Answer>5</Answer></Thinking><Answer>7</Answer></Thinking>", "7"),
])
def test_extract_answer_reasoning_ends_at_the_first_close_and_the_last_answer_after_it_counts(response, answer):
    assert sftkey.extract_answer(response) == answer


# The answer that counts ends at the FIRST `</Answer>` after its `<Answer>`: what follows is not part of it.
# (Mutation audit: `rsplit(ANSWER_CLOSE, 1)`, so "<Answer>5</Answer> so </Answer>" answered "5</Answer> so ".)

@pytest.mark.parametrize("response", [
    "<Thinking>a</Thinking><Answer>5</Answer></Answer>",
    "<Thinking>a</Thinking><Answer>5</Answer> so 6</Answer>",
    "<Thinking>a</Thinking><Answer>5</Answer>x</Answer>y</Answer>",
])
def test_extract_answer_stops_at_the_first_answer_close(response):
    assert sftkey.extract_answer(response) == "5"
    assert sftkey.answers_match(sftkey.extract_answer(response), "5")


@pytest.mark.parametrize("response, answer", [
    ("48+24 = 72\n#### 72", "72"),
    ("#### 1\n#### 72\nmore", "72"),  # the last marker, its line only
    ("no marker", None),
])
def test_extract_answer_untagged(response, answer):
    assert sftkey.extract_answer(response, tagged=False) == answer


# ---------------------------------------------------------------------------------------------
# Exact comparison

@pytest.mark.parametrize("raw, value", [
    ("72", Fraction(72)), ("72.0", Fraction(72)), (" 72 ", Fraction(72)), ("1,000", Fraction(1000)),
    ("$1,000", Fraction(1000)), ("-3", Fraction(-3)), ("50%", Fraction(50)), ("0.25", Fraction(1, 4)),
    ("1.0000001", Fraction(10_000_001, 10_000_000)), ("12,345,678", Fraction(12_345_678)),
    ("-$5", Fraction(-5)), ("$-5", Fraction(-5)), ("\u22125", Fraction(-5)), ("18.", Fraction(18)),
    ("  seventy   two\n", "seventy two"), ("1,2", "1,2"), ("1_000", "1_000"), ("\u0663", "\u0663"),
    ("inf", "inf"), ("nan", "nan"), ("1e3", "1e3"), ("-$-5", "-$-5"), ("$", "$"), ("18..", "18.."),
])
def test_normalize(raw, value):
    got = sftkey.normalize(raw)
    assert type(got) is type(value) and got == value


def test_normalize_huge_number_stays_text_instead_of_crashing():
    digits = "9" * 5000  # beyond int()'s default 4300-digit limit for strings
    assert sftkey.normalize(digits) == digits
    assert sftkey.answers_match(digits, digits) and not sftkey.answers_match(digits, digits[:-1] + "8")


@pytest.mark.parametrize("a, b, match", [
    ("72", "72", True), ("72.0", "72", True), ("72", "72.00", True), (" 72\n", "72", True),
    ("1000", "1,000", True), ("1000", "1000.0", True), ("1000", "$1,000", True), ("$1,000.00", "1,000", True),
    ("0.5", ".5", True), ("50%", "50", True), ("12,345,678", "12345678", True),
    ("-$5", "-5", True), ("$-5", "-5", True), ("\u22125", "-5", True), ("-$5", "$-5", True),
    ("18.", "18", True), ("1,000.", "1000", True),  # a sentence-ending full stop
    ("73", "72", False), ("72.5", "72", False), ("-72", "72", False), ("\u22125", "5", False),
    ("7 2", "72", False), ("", "72", False),
    # Exact, not within a tolerance: these are equal as floats, or within 1e-6 relative.
    ("2499998", "2500000", False), ("1.0000001", "1", False),
    ("12345678901234567891", "12345678901234567890", False), ("0.1", "0.1000000000000000001", False),
    # Commas only between groups of three digits.
    ("1,2", "12", False), ("1,0,0,0", "1000", False), ("12,34", "1234", False), ("1,0000", "10000", False),
    (",100", "100", False), ("100,", "100", False),
    # Python's float() accepts these; a grader must not.
    ("1_000", "1000", False), ("\u0663", "3", False), ("\uff13", "3", False), ("1e3", "1000", False),
    ("inf", "inf", True), ("inf", "Infinity", False), ("inf", "1e999", False), ("nan", "NaN", False),
    ("18..", "18", False),
    ("seventy  two", "seventy two", True), ("abc", "abd", False), ("72 apples", "72", False),
    ("caf\u00e9", "cafe\u0301", True), ("\u00c5", "A\u030a", True),  # one text, two code point sequences (NFC)
    ("one thousand", "1000", False),
])
def test_answers_match_both_ways(a, b, match):
    assert sftkey.answers_match(a, b) is match
    assert sftkey.answers_match(b, a) is match


def test_no_answer_matches_nothing():
    assert not sftkey.answers_match(None, "72")
    assert not sftkey.answers_match(None, "")


# ---------------------------------------------------------------------------------------------
# Every GSM8K reference answer

def gsm8k_references() -> list[str]:
    refs = []
    for name in ("train.jsonl", "test.jsonl"):
        with open(os.path.join(GSM8K_DIR, name), encoding="utf-8") as f:
            refs += [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in f if line.strip()]
    return refs


@needs_gsm8k
def test_every_gsm8k_reference_matches_itself_and_its_variants_but_not_its_neighbours():
    refs = gsm8k_references()
    assert len(refs) > 8000
    integer = re.compile(r"-?(\d{1,3}(,\d{3})+|\d+)")  # every GSM8K reference is an integer like this
    for ref in refs:
        assert integer.fullmatch(ref), ref
        value = int(ref.replace(",", ""))
        for variant in (ref, str(value), f"{value:,}", f"{value}.0", f"{value:,}.00", f"${value:,}", f" {ref}\n"):
            assert sftkey.answers_match(variant, ref), (variant, ref)
        for other in (value + 1, value - 1):
            for variant in (str(other), f"{other:,}"):
                assert not sftkey.answers_match(variant, ref), (variant, ref)


# ---------------------------------------------------------------------------------------------
# The composite, and evaluate's use of the rules

def test_scoring_a_response_end_to_end():
    response = "<Thinking>2+3=5</Thinking><Answer>5.0</Answer> trailing"
    assert sftkey.answers_match(sftkey.extract_answer(response), "5")
    assert not sftkey.format_ok(response, ended=True)
    assert sftkey.composite(1.0, 0.0) == pytest.approx(0.7)
    assert sftkey.composite(0.5, 1.0) == pytest.approx(0.65)
    assert sftkey.composite(1.0, 1.0) == pytest.approx(1.0)


class ScriptedModel:
    """Stands in for GPT in train.evaluate: answers each prompt with a fixed response."""

    def __init__(self, enc, script: dict[str, tuple[str, bool]]):
        self.enc, self.script, self.config = enc, script, GPTConfig(vocab_size=enc.n_vocab)

    def eval(self):
        return self

    def generate(self, prompts, *args, **kwargs):  # the limits do not matter to a script
        outs = []
        for ids in prompts:
            response, ended = self.script[self.enc.decode(ids)]
            outs.append(self.enc.encode_ordinary(response) + ([self.enc.eot_token] if ended else []))
        return outs


def test_evaluate_scores_each_response_by_the_rules():
    enc = D.char_encoding()
    cases = [  # (prompt, reference, response, ended, correct, formatted)
        ("Q: 1", "5", "<Thinking>a</Thinking><Answer>5</Answer>", True, True, True),
        ("Q: 22", "5", "<Thinking>a</Thinking><Answer>5</Answer>", False, True, False),  # cut off
        ("Q: 333", "9", "<Thinking><Answer>7</Answer></Thinking><Answer>9</Answer>", True, True, False),
        ("Q: 4444", "7", "<Thinking><Answer>7</Answer></Thinking><Answer>9</Answer>", True, False, False),
        ("Q: 55555", "2500000", "<Thinking>a</Thinking><Answer>2499998</Answer>", True, False, True),
    ]
    model = ScriptedModel(enc, {p + sftkey.PROMPT_SEP: (r, e) for p, _, r, e, _, _ in cases})
    examples = [D.Example(p, "t", ref) for p, ref, *_ in cases]
    cfg = train.TrainConfig(block_size=64, eval_batch_size=2)
    result = train.evaluate(model, enc, examples, cfg, "cpu", torch.float32)
    assert result["correct"] == [c[4] for c in cases]
    assert result["formatted"] == [c[5] for c in cases]
    assert result["acc"] == pytest.approx(3 / 5) and result["fmt"] == pytest.approx(2 / 5)
    assert result["composite"] == pytest.approx(0.7 * 3 / 5 + 0.3 * 2 / 5)


# A response that did not end with end-of-text is scored on all its tokens.
# (Mutation audit: `ended = True`, so the last token of a cut-off response was dropped as if it were end-of-text.)

def test_evaluate_keeps_every_token_of_a_response_cut_off_at_the_limit():
    enc = D.char_encoding()
    cut = "<Thinking>6+6=12</Thinking><Answer>12"  # the length limit hit before </Answer>
    full = "<Thinking>1+1=2</Thinking><Answer>2</Answer>"
    model = ScriptedModel(enc, {"Q: 6+6\n": (cut, False), "Q: 1+1\n": (full, True)})
    examples = [D.Example("Q: 6+6", "6+6=12", "12"), D.Example("Q: 1+1", "1+1=2", "2")]
    result = train.evaluate(model, enc, examples, train.TrainConfig(block_size=64), "cpu", torch.float32)
    assert result["correct"] == [True, True]  # "12", not "1"
    assert result["formatted"] == [False, True]  # no end-of-text, no </Answer>
    assert sorted(s["response"] for s in result["responses"]) == sorted([cut, full])
