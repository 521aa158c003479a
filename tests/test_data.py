"""What data.py promises about a data set: reading examples, the summary's figures, the block-size cut, the split.

Also the synthetic task's problems and the prompt evaluation feeds. The summary is printed at the
start of every run and stored in results.json; it is how one sees that a data set holds what one
thinks (how long the reasoning is next to the answer, how many examples were dropped, whether the
tokenizer merges across the template's boundaries). Each figure is compared with a direct count on
small hand-made sets where the figures all differ: with `sftkey-chars` (one token per ASCII
character or tag, so counts follow from string lengths) and with GPT-2's real tokenizer for the
tokens that straddle a boundary and the prompts that do not tokenize as a prefix of their example.
Reading bad input is in test_bad_input.py, the real GSM8K files in test_gsm8k.py.
"""
import json
import re

import pytest
import tiktoken
import torch

import data as D
import runtime
import sftkey
import train
from model import GPTConfig

CHARS = D.char_encoding()


def char_role_counts(ex: D.Example) -> tuple[int, int, int]:
    """Tokens per role with sftkey-chars, from the template: prompt + "\\n"; <Thinking> text
    </Thinking>; <Answer> text </Answer> end-of-text (each tag is one token)."""
    return len(ex.prompt) + 1, len(ex.thinking) + 2, len(ex.answer) + 3


def model_reads(ex: D.Example) -> int:
    """Tokens the model reads of an example: all but the final end-of-text."""
    return sum(char_role_counts(ex)) - 1


# ---------------------------------------------------------------------------------------------
# Reading examples

# gsm8k: the final answer is the one after the LAST "\n####" line.
# (Mutation audit: `rpartition` -> `partition`, so a reasoning holding a "####" line lost its answer.)

def test_gsm8k_answer_is_after_the_last_hash_line_and_earlier_ones_stay_in_the_reasoning(tmp_path):
    path = tmp_path / "g.jsonl"
    record = {"question": "Q?", "answer": "first try\n#### 3\nno, recount: 2+3=5\n#### 5"}
    path.write_text(json.dumps(record) + "\n")
    [example] = D.read_examples(str(path), "gsm8k")
    assert example.answer == "5"
    assert example.thinking == "first try\n#### 3\nno, recount: 2+3=5"
    assert example.prompt == "Q?"


# A prompt may hold the tag strings (only the thinking and the answer may not).
# (Mutation audit: the tag check applied to the prompt too, so such examples were refused.)

def test_a_prompt_that_mentions_the_tags_is_kept_and_tagged(tmp_path):
    prompt = "What do <Thinking> and </Answer> mean?"
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "thinking": "they are tags", "answer": "markup"}) + "\n")
    [example] = D.read_examples(str(path), "tagged")
    assert (example.prompt, example.thinking, example.answer) == (prompt, "they are tags", "markup")
    data = D.tokenize([example], CHARS, block_size=96)
    n_prompt = len(CHARS.encode_ordinary(prompt + sftkey.PROMPT_SEP))  # the tags in it are tokens of the prompt
    assert data.roles[0][:n_prompt].tolist() == [sftkey.PROMPT] * n_prompt
    with pytest.raises(D.DataError, match="thinking contains the tag"):
        path.write_text(json.dumps({"prompt": "Q", "thinking": "a <Answer> b", "answer": "markup"}) + "\n")
        D.read_examples(str(path), "tagged")


# ---------------------------------------------------------------------------------------------
# The summary's figures

KEPT = [D.Example("Q: 1+2", "1+2=3", "3"),
        D.Example("Q: 10+25-3", "10+25=35 35-3=32", "32"),
        D.Example("What is nine?", "9", "9")]
TOO_LONG = D.Example("Q: " + "1+" * 20 + "1", "1+1=2 " * 8, "1234567")  # longest in every role


def test_summary_figures_match_a_direct_count_with_the_char_encoding():
    block = max(model_reads(ex) for ex in KEPT) + 1
    assert model_reads(TOO_LONG) > block
    s = D.tokenize(KEPT[:2] + [TOO_LONG] + KEPT[2:], CHARS, block).summary
    counts = [char_role_counts(ex) for ex in KEPT]
    prompt, thinking, key = ([c[i] for c in counts] for i in range(3))
    assert (prompt, thinking, key) == ([7, 11, 14], [7, 18, 3], [4, 5, 4])  # by hand, from the texts
    assert s["examples"] == 3 and s["dropped_too_long"] == 1
    assert s["prompt_tokens_mean"] == pytest.approx(32 / 3) and s["prompt_tokens_max"] == 14
    assert s["thinking_tokens_mean"] == pytest.approx(28 / 3) and s["thinking_tokens_max"] == 18
    assert s["key_tokens_mean"] == pytest.approx(13 / 3) and s["key_tokens_max"] == 5
    # Over the whole set (not a mean of per-example fractions, which would be 0.384).
    assert s["key_fraction"] == pytest.approx(sum(key) / (sum(thinking) + sum(key))) == pytest.approx(13 / 41)
    # Every tag is one token and every other token one character: nothing straddles or re-tokenizes.
    assert s["straddling_tokens"] == 0 and s["prompt_prefix_mismatches"] == 0


# Prompts ending in "\n" used to tokenize differently alone ("\n\n" is one GPT-2 token) than followed
# by the separator and the response (the newlines split before a non-space); the template now drops a
# prompt's trailing whitespace (sftkey.prompt_head), so they no longer do. An untagged reasoning
# starting with "\n\n" (possible only for an Example built in code: files' reasoning is stripped)
# still makes one "\n\n" token of the prompt's separator and its first newline: a mismatch that remains.
GPT2_SET = [D.Example("Q: 2+3", "2+3=5", "5"),
            D.Example("Q: 7\n", "7", "7"),
            D.Example("Q: 1+1", "1+1=2", "2"),
            D.Example("List:\n", "none", "0"),
            D.Example("Q", "\n\nx", "1")]


def direct_counts(enc, examples, tagged: bool) -> tuple[int, int]:
    """(straddling tokens, prompt-prefix mismatches), counted from the tokenizer's own output: a
    token straddles when its bytes run across the start of the reasoning or of the Key."""
    straddling = mismatches = 0
    for ex in examples:
        text, spans = sftkey.render(ex.prompt, ex.thinking, ex.answer, tagged)
        ids = enc.encode_ordinary(text)
        bounds = [len(text[:spans[i][0]].encode()) for i in (1, 2)]
        at = 0
        for token in enc.decode_tokens_bytes(ids):
            straddling += sum(at < b < at + len(token) for b in bounds)
            at += len(token)
        prompt_ids = enc.encode_ordinary(ex.prompt.rstrip() + "\n")  # what evaluation feeds
        mismatches += ids[:len(prompt_ids)] != prompt_ids
    return straddling, mismatches


def test_gpt2_straddling_tokens_and_prefix_mismatches_tagged(gpt2_encoding):
    s = D.tokenize(GPT2_SET, gpt2_encoding, 64).summary
    # Tagged: `><` of `</Thinking><Answer>` straddles once per example; no prompt mismatches (the
    # reasoning starts with `<Thinking>`, so E's "\n\n" does not reach the prompt).
    assert (s["examples"], s["straddling_tokens"], s["prompt_prefix_mismatches"]) == (5, 5, 0)
    assert s["first_prompt_prefix_mismatch"] is None
    assert direct_counts(gpt2_encoding, GPT2_SET, tagged=True) == (5, 0)


def test_gpt2_straddling_tokens_and_prefix_mismatches_untagged(gpt2_encoding):
    s = D.tokenize(GPT2_SET, gpt2_encoding, 64, tagged=False).summary
    # Untagged: only E's "\n\n" straddles (prompt separator + reasoning), and only E mismatches.
    assert (s["examples"], s["straddling_tokens"], s["prompt_prefix_mismatches"]) == (5, 1, 1)
    assert direct_counts(gpt2_encoding, GPT2_SET, tagged=False) == (1, 1)


def test_the_first_prompt_prefix_mismatch_named_is_the_earliest_line_of_the_file(gpt2_encoding):
    """Line 9 comes before line 10 though "f:10" sorts first as text. (Mutation audit: a plain min over the
    "file:line" names, which named line 10 whenever both mismatched.)"""
    mismatching = [D.Example("Q", "\n\nx", "1", source=f"f:{line}") for line in (10, 9, 100)]
    s = D.tokenize(mismatching + [D.Example("Q", "y", "2", source="f:1")], gpt2_encoding, 64, tagged=False).summary
    assert s["prompt_prefix_mismatches"] == 3 and s["first_prompt_prefix_mismatch"] == "f:9"


# ---------------------------------------------------------------------------------------------
# The block-size cut

def test_tokenize_keeps_an_example_that_exactly_fills_the_block_and_drops_one_token_more():
    short, exact = D.Example("Q", "a", "1"), D.Example("Q: 12+30", "12+30=42", "42")
    n = model_reads(exact)
    kept = D.tokenize([short, exact], CHARS, block_size=n)
    assert kept.summary["dropped_too_long"] == 0 and kept.examples == [short, exact]
    assert len(kept.ids[1]) - 1 == n
    cut = D.tokenize([short, exact], CHARS, block_size=n - 1)
    assert cut.summary["dropped_too_long"] == 1 and cut.examples == [short]


def test_tokenize_refuses_a_set_where_nothing_fits():
    with pytest.raises(D.DataError, match="longer than --block_size"):
        D.tokenize([D.Example("Q: 12+30", "12+30=42", "42")], CHARS, block_size=10)


# A test prompt of exactly --block_size tokens (as evaluation feeds it) leaves no room for a response: refused.
# One token fewer is read. (Mutation audit: `>= cfg.block_size` -> `>`, so a prompt filling the block was
# accepted and answered with a single token.)

@pytest.mark.parametrize("prompt_tokens, refused", [(32, True), (31, False)])
def test_a_test_prompt_is_refused_exactly_when_it_fills_the_block(tmp_path, prompt_tokens, refused):
    rows = [{"prompt": f"Q: {a}+1", "thinking": f"{a}+1={a + 1}", "answer": str(a + 1)} for a in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt = "x" * (prompt_tokens - 1)  # one token per character, and the "\n" evaluation feeds after it
    assert len(CHARS.encode_ordinary(sftkey.prompt_head(prompt))) == prompt_tokens
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": prompt, "thinking": "t", "answer": "1"}) + "\n")
    cfg = train.TrainConfig(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "test.jsonl"),
                            format="tagged", block_size=32, n_val=2)
    if refused:
        with pytest.raises(D.DataError, match=r"test.jsonl:1: the prompt alone fills --block_size 32"):
            D.load_data(cfg, CHARS)
    else:
        assert [ex.prompt for ex in D.load_data(cfg, CHARS)[2]] == [prompt]


HUGE = D.Example("Q: 1+1", "1+1=2 " * 40_000, "2")  # 240 KB of reasoning: no block of 96 tokens holds it


def test_a_line_too_long_to_fit_is_dropped_from_its_byte_length_untagged(monkeypatch):
    """Issue 18, item 12: a 5 MB line took 9.6 s and 290 MB to tag before being dropped. No token of
    sftkey-chars holds more than 11 bytes (the longest tag), so a text of more bytes than 11 x block
    cannot fit and is dropped unread; the figures are those tagging everything gives."""
    tagged_lengths = []
    original = sftkey.tag

    def tag(enc, text, *args):
        tagged_lengths.append(len(text))
        return original(enc, text, *args)
    monkeypatch.setattr(sftkey, "tag", tag)
    block = max(model_reads(ex) for ex in KEPT) + 1
    s = D.tokenize(KEPT[:1] + [HUGE, TOO_LONG] + KEPT[1:], CHARS, block).summary
    assert max(tagged_lengths) < 1000  # the huge one never reached the tokenizer
    assert len(tagged_lengths) == 4  # the others all did, TOO_LONG (over the block, under 11 x block bytes) too
    assert s["examples"] == 3 and s["dropped_too_long"] == 2  # counted exactly as before
    monkeypatch.setattr(sftkey, "tag", original)
    assert s == D.tokenize(KEPT + [TOO_LONG], CHARS, block).summary | {"dropped_too_long": 2}


def test_a_set_where_nothing_fits_names_the_true_shortest_length_also_of_unread_lines():
    with pytest.raises(D.DataError, match=f"the shortest has {model_reads(TOO_LONG)}\\)"):
        D.tokenize([HUGE, TOO_LONG], CHARS, block_size=10)
    with pytest.raises(D.DataError, match=f"the shortest has {model_reads(HUGE)}\\)"):  # tokenized to say so
        D.tokenize([HUGE, HUGE], CHARS, block_size=10)


# ---------------------------------------------------------------------------------------------
# split

@pytest.mark.parametrize("n, n_val, expected", [(50, 3, 3), (50, 5, 5), (50, 9, 5), (25, 10, 2), (9, 4, 0)])
def test_split_sizes_are_min_of_n_val_and_a_tenth(n, n_val, expected):
    examples = D.synthetic_task(n, seed=0)
    train_part, val = D.split(examples, n_val, seed=1)
    assert len(val) == expected == min(n_val, n // 10)
    assert len(train_part) == n - expected


def test_split_is_a_disjoint_partition():
    examples = D.synthetic_task(60, seed=0)
    train_part, val = D.split(examples, 6, seed=2)
    train_ids, val_ids = {id(e) for e in train_part}, {id(e) for e in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {id(e) for e in examples}
    assert len(train_ids) + len(val_ids) == len(examples)  # no example twice in a part


def test_split_is_seeded():
    examples = D.synthetic_task(60, seed=0)
    assert D.split(examples, 6, seed=2) == D.split(examples, 6, seed=2)
    assert D.split(examples, 6, seed=2)[1] != D.split(examples, 6, seed=3)[1]


# --seed re-draws the validation split (the experiment's seeds differ in it); --data_seed does not.
# (Mutation audit: load_data split with cfg.data_seed.)

def test_seed_redraws_the_validation_split_of_the_same_problems():
    flags = ["--n_train", "60", "--n_val", "6", "--n_test", "2", "--block_size", "96"]

    def split_for(*extra):
        train_set, val_set, test = D.load_data(train.parse_args([*flags, *extra]), CHARS)
        return {e.prompt for e in train_set.examples}, {e.prompt for e in val_set.examples}
    train_a, val_a = split_for("--seed", "1", "--data_seed", "0")
    train_b, val_b = split_for("--seed", "2", "--data_seed", "0")
    train_c, val_c = split_for("--seed", "1", "--data_seed", "0")
    assert len(val_a) == len(val_b) == 6
    assert train_a | val_a == train_b | val_b  # the same problems
    assert val_a != val_b  # split differently
    assert (train_c, val_c) == (train_a, val_a)
    # and the split is the one D.split draws with --seed
    pool = D.synthetic_split(60, 2, 0)[0]  # the training problems of --n_train 60 --n_test 2 --data_seed 0
    expected_train, expected_val = D.split(pool, 6, 2)
    assert val_b == {e.prompt for e in expected_val}


# ---------------------------------------------------------------------------------------------
# The synthetic task

STEP = re.compile(r"(\d+)([+-])(\d)=(\d+)")


def left_to_right(prompt: str) -> int:
    """The value of "Q: 17+8-5" evaluated here, term by term."""
    terms = re.findall(r"([+-]?)(\d+)", prompt.removeprefix("Q: "))
    return sum(-int(x) if sign == "-" else int(x) for sign, x in terms)


def test_synthetic_answers_are_the_prompts_arithmetic_and_the_steps_chain():
    examples = D.synthetic_task(300, seed=5)
    step_counts = set()
    for ex in examples:
        assert re.fullmatch(r"Q: \d+([+-]\d)+", ex.prompt), ex.prompt
        assert ex.answer == str(left_to_right(ex.prompt))
        start = int(re.match(r"Q: (\d+)", ex.prompt)[1])
        assert 1 <= start < 20
        steps = [STEP.fullmatch(s) for s in ex.thinking.split(" ")]
        assert all(steps), ex.thinking
        total, ops = start, re.findall(r"[+-]\d", ex.prompt.removeprefix(f"Q: {start}"))
        assert len(steps) == len(ops)
        for step, op in zip(steps, ops):
            a, sign, x, result = int(step[1]), step[2], int(step[3]), int(step[4])
            assert a == total and sign + str(x) == op and 1 <= x <= 9
            assert result == (a + x if sign == "+" else a - x) >= 0  # never below zero
            total = result
        assert str(total) == ex.answer
        step_counts.add(len(steps))
    assert step_counts == {1, 2, 3, 4, 5}


# "Never below zero" (docs/data_formats.md): a subtraction may bring the total down to exactly zero.
# (Mutation audit: `x < total`, so no step ever reached 0 and an answer of 0 never occurred.)

def test_synthetic_subtractions_may_reach_zero_but_never_go_below():
    steps = [STEP.fullmatch(s) for ex in D.synthetic_task(500, seed=5) for s in ex.thinking.split(" ")]
    assert min(int(step[4]) for step in steps) == 0
    assert all(step[1] == step[3] and step[2] == "-" for step in steps if step[4] == "0")  # each is "a-a=0"


def test_synthetic_problems_are_distinct_and_seeded():
    a = D.synthetic_task(200, seed=7)
    assert len({ex.prompt for ex in a}) == 200
    assert D.synthetic_task(200, seed=7) == a
    assert [ex.prompt for ex in D.synthetic_task(200, seed=8)] != [ex.prompt for ex in a]


# ---------------------------------------------------------------------------------------------
# The prompt evaluation feeds is the one training saw

class RecordingModel:
    """Stands in for GPT in train.evaluate: records the prompts it is given and answers end-of-text."""

    def __init__(self, eot: int):
        self.eot, self.prompts, self.config = eot, [], GPTConfig(vocab_size=eot + 1)

    def eval(self):
        return self

    def generate(self, prompts, max_new_tokens, stop_token, **limits):  # limits: the vocabulary's, unused here
        self.prompts += prompts
        return [[self.eot] for _ in prompts]


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
@pytest.mark.parametrize("ending", ["\n", " \n", "\r\n"], ids=["LF", "space-LF", "CRLF"])
def test_a_prompt_ending_in_a_newline_is_fed_at_evaluation_as_training_saw_it(tmp_path, gpt2_encoding, ending,
                                                                              tagged):
    """Issue 17, item 7: with gpt2 such a prompt alone, as evaluation fed it (prompt + "\\n"), ended in one
    "\\n\\n" token, but the training text (where the response follows) had two "\\n" tokens there."""
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2+3?" + ending, "thinking": "2+3=5", "answer": "5"}) + "\n")
    examples = D.read_examples(str(path), "tagged")
    data = D.tokenize(examples, gpt2_encoding, 64, tagged=tagged)
    assert data.summary["prompt_prefix_mismatches"] == 0
    model = RecordingModel(gpt2_encoding.eot_token)
    train.evaluate(model, gpt2_encoding, examples, train.TrainConfig(untagged=not tagged), "cpu", torch.float32)
    [fed] = model.prompts
    assert fed == data.ids[0][:len(fed)].tolist() and gpt2_encoding.decode(fed) == "What is 2+3?\n"


def test_a_prompt_mismatch_that_remains_is_named_by_file_and_line(tmp_path, capsys):
    """Trailing whitespace is the usual cause; an encoding that merges across the template can still make
    a prompt tokenize otherwise alone. Here one merges "5\\n<", so prompts ending in 5 do: the summary and
    a warning name the first such line of the training file and of the test file."""
    ranks = {bytes([b]): b for b in range(256)} | {b"5\n": 256, b"5\n<": 257}
    enc = tiktoken.Encoding("merges-5-newline", pat_str=r"5\n<|[\s\S]", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 258})
    line = lambda a, b: json.dumps({"prompt": f"Q: {a}+{b}", "thinking": f"{a}+{b}={a + b}", "answer": str(a + b)})
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text("\n".join(line(1, b) for b in (1, 2, 3, 5, 4, 6, 7, 8, 5, 9, 1, 2)) + "\n")
    test_file.write_text("\n".join(line(2, b) for b in (1, 2, 5, 5)) + "\n")
    s = D.tokenize(D.read_examples(str(train_file), "tagged"), enc, 64).summary
    assert (s["prompt_prefix_mismatches"], s["first_prompt_prefix_mismatch"]) == (2, f"{train_file}:4")
    assert f"prompt-prefix mismatches 2 (the first: {train_file}:4)" in runtime.format_summary(s)
    cfg = train.TrainConfig(data=str(train_file), eval_data=str(test_file), format="tagged", n_val=1, block_size=64)
    D.load_data(cfg, enc)
    err = capsys.readouterr().err
    assert f"warning: {test_file}:3: with encoding merges-5-newline" in err and "(2 test prompts do)" in err
