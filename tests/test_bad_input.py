"""Bad input through the command line: one clear error naming file, line and problem, no traceback.

Every case runs `train.main` in-process (a subprocess costs seconds of imports each) and checks the
exit code, the message on stderr and that nothing was written to --out_dir; one case runs
`python train.py` in a subprocess to prove the same end to end. `--skip_bad_lines` is tested at
the end, both in `data.read_examples` and through a tiny training run.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data as D
import runtime
import train

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--max_iters", "1", "--stage2_iters", "0",
        "--n_val", "2", "--eval_limit", "1", "--eval_interval", "1000", "--log_interval", "1000"]
SYNTHETIC = ["--n_train", "40", "--n_test", "4"]  # the synthetic task's size; --data refuses them
GOOD_GSM8K = json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"})


def jsonl(*records) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


def run_main(args: list[str], out_dir: Path, capsys) -> tuple[int, str]:
    """train.main with tiny-model flags; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ([] if "--data" in args else SYNTHETIC) + args + ["--out_dir", str(out_dir)])
    return exit_info.value.code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, out_dir: Path, *fragments: str) -> None:
    assert code not in (0, None), err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, f"not one paragraph: {err!r}"
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not out_dir.exists() or not any(out_dir.iterdir()), "something was written to --out_dir"


# (name, file contents (str or bytes), extra flags, line named in the error (None: no line), problem)
DATA_CASES = [
    ("invalid JSON", jsonl(GOOD_GSM8K, '{"question": "x", "answer": '), [], 2, "invalid JSON"),
    ("not an object", jsonl(GOOD_GSM8K, GOOD_GSM8K, "[1, 2]"), [], 3, "expected a JSON object, got list"),
    ("a string line", jsonl('"just text"'), [], 1, "expected a JSON object, got str"),
    ("missing field", jsonl(GOOD_GSM8K, {"question": "x"}), [], 2, "missing field 'answer'"),
    ("non-string field", jsonl({"question": "x", "answer": 5}), [], 1, "field 'answer' must be a string, got int"),
    ("null field", jsonl({"prompt": None, "thinking": "a", "answer": "1"}), ["--format", "tagged"], 1,
     "field 'prompt' must be a string, got NoneType"),
    ("no #### line", jsonl({"question": "x", "answer": "just reasoning"}), [], 1, "no final line '#### <answer>'"),
    ("empty answer", jsonl(GOOD_GSM8K, {"question": "x", "answer": "a\n####   "}), [], 2, "empty answer"),
    ("empty question", jsonl(GOOD_GSM8K, {"question": " ", "answer": "a\n#### 1"}), [], 2, "empty prompt"),
    ("blank tagged answer", jsonl({"prompt": "x", "thinking": "a", "answer": " \t"}), ["--format", "tagged"], 1,
     "empty answer"),
    ("</Answer> in the answer", jsonl({"prompt": "x", "thinking": "a", "answer": "5</Answer>"}),
     ["--format", "tagged"], 1, "the answer contains the tag </Answer>"),
    ("<Thinking> in the thinking", jsonl(GOOD_GSM8K, {"question": "x", "answer": "a <Thinking> b\n#### 1"}), [], 2,
     "the thinking contains the tag <Thinking>"),
    ("completion without tags", jsonl({"prompt": "x", "completion": "the answer is 5"}), ["--format", "completion"],
     1, "must hold <Thinking> exactly once, found it 0 times"),
    ("completion with a tag twice",
     jsonl({"prompt": "x", "completion": "<Thinking>a</Thinking><Answer>1</Answer><Answer>2</Answer>"}),
     ["--format", "completion"], 1, "must hold <Answer> exactly once, found it 2 times"),
    ("completion tags out of order",
     jsonl({"prompt": "x", "completion": "<Answer>1</Answer><Thinking>a</Thinking>"}), ["--format", "completion"],
     1, "is not <Thinking>…</Thinking><Answer>…</Answer>"),
    ("<|endoftext|> in the prompt", jsonl(GOOD_GSM8K, {"question": "a<|endoftext|>b", "answer": "c\n#### 1"}), [],
     2, "the prompt contains '<|endoftext|>'"),
    ("<|endoftext|> in the answer", jsonl({"question": "a", "answer": "c\n#### 1<|endoftext|>"}), [], 1,
     "the answer contains '<|endoftext|>'"),
    ("invalid UTF-8", (jsonl(GOOD_GSM8K, GOOD_GSM8K) + '{"question": "caf').encode() + b"\xe9\"}\n", [], 3,
     "not valid UTF-8"),
    ("lone surrogate", jsonl(GOOD_GSM8K, '{"question": "\\ud800", "answer": "a\\n#### 1"}'), [], 2,
     "not a Unicode character"),
    ("deeply nested JSON", jsonl("[" * 100000), [], 1, "invalid JSON"),
    # issue 18, item 12: what the messages say of these lines
    ("a NUL byte", b'{"question": "a\x00b", "answer": "r\\n#### 5"}\n', [], 1,
     "invalid JSON (Invalid control character U+0000 at column 16)"),  # was "... at at column 16"
    ("the '#### 5' line alone", jsonl(GOOD_GSM8K, {"question": "x", "answer": "#### 5"}), [], 2,
     "the gsm8k answer has no reasoning before its final line '#### <answer>'"),
    ("text after the '#### 5' line", jsonl(GOOD_GSM8K, {"question": "x", "answer": "1+1=2\n#### 2\nSo two."}), [], 2,
     "the gsm8k answer has text after its final line '#### <answer>'"),  # found in review: it joined the answer
    ("a repeated key", b'{"question": "x", "answer": "1+1=2\\n#### 2", "answer": "1+1=2\\n#### 4"}\n', [], 1,
     "the key 'answer' appears twice in one object"),  # found in review: the last one was read, silently
    ("a repeated key in a message", '{"messages": [{"role": "user", "role": "assistant", "content": "a"}]}\n',
     ["--format", "messages"], 1, "the key 'role' appears twice in one object"),
    ("CR-only line ends", (GOOD_GSM8K + "\r") * 20, [], 1, "the file uses CR-only line ends"),
    ("a zero-width space for an answer", jsonl(GOOD_GSM8K, {"question": "x", "answer": "a\n#### \u200b"}), [], 2,
     "empty answer (only invisible characters)"),
    ("invisible format characters for an answer", jsonl({"prompt": "x", "thinking": "a", "answer": "\u2060 \ufeff"}),
     ["--format", "tagged"], 1, "empty answer (only invisible characters)"),
    ("empty file", "", [], None, "no examples in the file"),
    ("only blank lines", "\n  \n\t\n", [], None, "no examples in the file"),
    ("all too long", jsonl(*[{"question": "x" * 300, "answer": "a\n#### 1"}] * 30), [], None,
     "longer than --block_size 96"),
    ("too few for a validation set", jsonl(*[GOOD_GSM8K] * 3), [], None, "leave no validation set"),
]


@pytest.mark.parametrize("name, contents, flags, line, problem", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(tmp_path, capsys, name, contents, flags, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_bytes(contents if isinstance(contents, bytes) else contents.encode("utf-8"))
    code, err = run_main(["--data", str(path), *flags], tmp_path / "out", capsys)
    where = f"{path}:{line}:" if line else f"{path}:"
    assert_clean_failure(code, err, tmp_path / "out", where, problem)


def test_bad_line_in_eval_data_is_named(tmp_path, capsys):
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text(jsonl(*[GOOD_GSM8K] * 20))
    test_file.write_text(jsonl(GOOD_GSM8K, GOOD_GSM8K, GOOD_GSM8K, "{oops"))
    code, err = run_main(["--data", str(train_file), "--eval_data", str(test_file)], tmp_path / "out", capsys)
    assert_clean_failure(code, err, tmp_path / "out", f"{test_file}:4:", "invalid JSON")


def bad_tiktoken(tmp_path: Path) -> str:
    path = tmp_path / "broken.tiktoken"
    path.write_text("YQ== 0\nnot base64 at all\n")
    return str(path)


FLAG_CASES = [
    ("unknown format", lambda tmp: ["--format", "xml"], "--format xml: unknown"),
    ("unknown encoding", lambda tmp: ["--encoding", "nope"], "--encoding nope: unknown"),
    ("missing .tiktoken", lambda tmp: ["--encoding", str(tmp / "none.tiktoken")], "no such file"),
    ("broken .tiktoken", lambda tmp: ["--encoding", bad_tiktoken(tmp)], "broken.tiktoken:2: not a '<base64 token>"),
    ("missing --init_from", lambda tmp: ["--init_from", str(tmp / "ckpt.pt")], "--init_from"),
    ("missing --data", lambda tmp: ["--data", str(tmp / "none.jsonl")], "none.jsonl: no such file"),
    ("--data is a folder", lambda tmp: ["--data", str(tmp)], "not a regular file (a folder); give a file"),
    ("--eval_data without --data", lambda tmp: ["--eval_data", str(tmp / "x.jsonl")], "needs --data"),
    ("--eval_only with --data alone", lambda tmp: ["--eval_only", "--data", str(tmp / "x.jsonl")], "needs --eval_data"),
    ("--eval_only of nothing", lambda tmp: ["--eval_only"], "--eval_only evaluates --init_from: give the checkpoint"),
    ("the synthetic task's sizes with --data (were ignored)", lambda tmp: ["--data", "x.jsonl", "--n_train", "50",
     "--data_seed", "3"], "--n_train 50, --data_seed 3: the synthetic task's, which --data replaces"),
    ("its test size with --eval_data (was ignored)", lambda tmp: ["--data", "x.jsonl", "--eval_data", "y.jsonl",
     "--n_test", "7"], "--n_test 7: the synthetic task's, which --data replaces (its test set is --eval_data; "
                       "--eval_limit N scores its first N)"),
    ("stage-2 lr without stage 2", lambda tmp: ["--stage2_iters", "0", "--stage2_lr", "1e-4"],
     "--stage2_iters 0 leaves it out"),
    ("stage-2 weights without stage 2", lambda tmp: ["--stage2_iters", "0", "--stage2_weights", "0,1,1"],
     "--stage2_lr, --stage2_weights and --stage2_dft set up stage 2; --stage2_iters 0 leaves it out"),
    ("DFT without stage 2", lambda tmp: ["--stage2_iters", "0", "--stage2_dft"], "--stage2_iters 0 leaves it out"),
    ("no stage at all", lambda tmp: ["--max_iters", "0", "--stage2_iters", "0"], "--max_iters 0 runs no stage 1"),
    ("stage-1 weights without stage 1", lambda tmp: ["--max_iters", "0", "--key_only"],
     "which set it up, are refused"),
    ("stage 2 at lr 0", lambda tmp: ["--stage2_iters", "2", "--min_lr_ratio", "0"], "--stage2_lr 0 means --lr x --min_lr_ratio"),
    ("a one-step stage 2 at lr 0", lambda tmp: ["--stage2_iters", "1", "--min_lr_ratio", "0"],
     "stage 2 would train at learning rate 0"),
    ("heads do not divide the width", lambda tmp: ["--n_embd", "10", "--n_head", "3"], "not a multiple of --n_head"),
    ("zero batch size", lambda tmp: ["--batch_size", "0"], "--batch_size 0: must be a whole number >= 1"),
    ("nan learning rate", lambda tmp: ["--lr", "nan"], "--lr nan: must be a finite number"),
    ("unknown device", lambda tmp: ["--device", "tpu"], "--device tpu: not a device"),
    ("a device torch knows but this code does not run on", lambda tmp: ["--device", "meta"],
     "--device meta: not a device this runs on; use auto, cpu, cuda or cuda:N"),  # was a traceback in training
    ("a CUDA device this machine lacks", lambda tmp: ["--device", f"cuda:{torch.cuda.device_count()}"],
     f"this machine has {torch.cuda.device_count()} CUDA device(s)"),
    ("unknown dtype", lambda tmp: ["--dtype", "float8"], "--dtype float8"),
]


@pytest.mark.parametrize("name, flags, problem", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flag(tmp_path, capsys, name, flags, problem):
    code, err = run_main(flags(tmp_path), tmp_path / "out", capsys)
    assert_clean_failure(code, err, tmp_path / "out", problem)


def test_out_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + SYNTHETIC + ["--out_dir", str(target)])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and ": not a folder" in err and "Traceback" not in err
    assert target.read_text() == "keep me"


def test_an_empty_out_dir_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out_dir "$OUT" with OUT unset: the run would write here
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + SYNTHETIC + ["--out_dir", ""])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--out_dir is empty; give a folder ('.' for the current one)" in err
    assert list(tmp_path.iterdir()) == []


def test_end_to_end_no_traceback(tmp_path):
    """The real command line, in its own process: exit code 2, one line on stderr, nothing written."""
    (tmp_path / "data.jsonl").write_text(jsonl(GOOD_GSM8K, "{bad"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train.py", *TINY, "--data", str(tmp_path / "data.jsonl"),
                           "--out_dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "data.jsonl:2: invalid JSON" in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Reading details and --skip_bad_lines

def test_line_numbers_count_only_newlines(tmp_path):
    """U+2028 inside a JSON string, CRLF line ends and a byte-order mark are not bad lines."""
    path = tmp_path / "data.jsonl"
    good = json.dumps({"question": "a\u2028b\u0085c", "answer": "d\n#### 1"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + (good + "\r\n" + good + "\r\n{oops\r\n").encode("utf-8"))
    with pytest.raises(D.DataError, match=r"data\.jsonl:3: invalid JSON"):
        D.read_examples(str(path), "gsm8k")
    examples = D.read_examples(str(path), "gsm8k", skip_bad_lines=True)
    assert [e.prompt for e in examples] == ["a\u2028b\u0085c"] * 2
    assert examples[1].source == f"{path}:2"


@pytest.mark.parametrize("bad", ['{"question": "cut off', '{"question": "q", "answer": "x"', '{"q"'])
def test_a_bad_line_of_a_crlf_file_is_reported_as_the_same_line_with_lf_ends(bad):
    """The line end is not part of the line: the CR of CRLF is neither named as the problem (an invisible
    U+000D inside a cut-off string) nor counted in the column. (Mutation audit: the trailing CR kept.)"""
    messages = []
    for end in (b"\n", b"\r\n"):
        with pytest.raises(D.DataError) as err:
            D.read_examples("f.jsonl", "gsm8k", raw=(GOOD_GSM8K.encode() + end + bad.encode() + end) * 2)
        messages.append(str(err.value))
    assert messages[0].startswith("f.jsonl:2: invalid JSON (") and messages[1] == messages[0]


def test_skip_bad_lines_counts_and_names_each(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [GOOD_GSM8K, "{oops", GOOD_GSM8K, json.dumps({"question": "x"}), "", GOOD_GSM8K, "[]"]
    path.write_text("\n".join(lines))
    skipped: list[str] = []
    examples = D.read_examples(str(path), "gsm8k", skip_bad_lines=True, skipped=skipped)
    assert len(examples) == 3
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{path}:2", f"{path}:4", f"{path}:7"]
    with pytest.raises(D.DataError, match=":2: invalid JSON"):
        D.read_examples(str(path), "gsm8k")


def test_a_line_of_other_than_jsons_whitespace_is_a_bad_line_not_a_blank_one(tmp_path):
    """Found in review: a line holding only U+00A0 (or U+2028, a form feed) was skipped silently as blank."""
    path = tmp_path / "data.jsonl"
    for blank in ("\u00a0", "\u2028", "\x0c", "\x1f"):
        path.write_text(GOOD_GSM8K + "\n \t\n" + blank + "\n" + GOOD_GSM8K + "\n", encoding="utf-8")
        with pytest.raises(D.DataError, match=rf"data\.jsonl:3: invalid JSON \(.* U\+{ord(blank):04X} at column 1"):
            D.read_examples(str(path), "gsm8k")
    assert len(D.read_examples(str(path), "gsm8k", skip_bad_lines=True)) == 2  # line 2 (JSON's whitespace) is blank


def test_calculator_annotations_are_stripped_in_every_format(tmp_path):
    """Found in review: --strip_calculator was applied to the gsm8k format only, and silently ignored by the rest."""
    reasoning, answer = "11*2 = <<11*2=22>>22", "22"
    records = {"gsm8k": {"question": "Q", "answer": f"{reasoning}\n#### {answer}"},
               "tagged": {"prompt": "Q", "thinking": reasoning, "answer": answer},
               "completion": {"prompt": "Q", "completion": f"<Thinking>{reasoning}</Thinking><Answer>{answer}</Answer>"},
               "messages": {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content":
                            f"<Thinking>{reasoning}</Thinking><Answer>{answer}</Answer>"}]}}
    for fmt, record in records.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        assert D.read_examples(str(path), fmt)[0].thinking == reasoning
        assert D.read_examples(str(path), fmt, strip_calculator=True)[0].thinking == "11*2 = 22", fmt


def test_stripping_several_calculator_notes_on_one_line_keeps_the_text_between_them():
    """GSM8K writes a note after every computation, often several on one line: each note goes, the rest stays.
    (Mutation audit: a greedy <<.*>> deleted from the first note's start to the last one's end.)"""
    reasoning = "She has 3*4 = <<3*4=12>>12 eggs, sells 12-5 = <<12-5=7>>7 and keeps 7/7 = <<7/7=1>>1 box."
    raw = json.dumps({"prompt": "Q", "thinking": reasoning, "answer": "1"}).encode() + b"\n"
    got = D.read_examples("f.jsonl", "tagged", strip_calculator=True, raw=raw)[0].thinking
    assert got == "She has 3*4 = 12 eggs, sells 12-5 = 7 and keeps 7/7 = 1 box."


def test_a_test_prompt_counts_as_trained_on_by_what_the_model_reads():
    """Found in review: a test prompt that differed from a training prompt only by trailing whitespace, which
    sftkey.prompt_head drops (the model reads the same tokens), was not counted: the recall warning stayed silent."""
    trained = D.TokenizedSet([D.Example("Q: 1+1", "1+1=2", "2")], [], [], {})
    test = [D.Example("Q: 1+1 \n", "1+1=2", "2"), D.Example("Q: 1+1\t", "1+1=2", "2"), D.Example("Q: 1+2", "x", "3")]
    assert "test: 3 examples, 2 of them with a prompt of the training data" in runtime.test_line([trained], test)


def test_test_prompts_of_the_training_data_are_counted_before_training(tmp_path, capsys):
    """Found in review: --eval_data the --data file was accepted in silence, and Acc then measured recall."""
    path = tmp_path / "data.jsonl"
    path.write_text(jsonl(*[{"prompt": f"Q: {a}+{b}", "thinking": f"{a}+{b}={a + b}", "answer": str(a + b)}
                            for a in range(5) for b in range(4)]))
    train.main(TINY + ["--data", str(path), "--eval_data", str(path), "--format", "tagged", "--batch_size", "4",
                       "--eval_limit", "0", "--out_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "test: 20 examples, 20 of them with a prompt of the training data (--eval_data the --data file?)" in printed
    train.main(TINY + SYNTHETIC + ["--out_dir", str(tmp_path / "synthetic")])  # its test set is apart by construction
    assert re.search(r"\ntest: 1 examples\n", capsys.readouterr().out)  # --eval_limit 1: nothing more said


def test_skip_bad_lines_with_nothing_left(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("{oops\n[]\n")
    with pytest.raises(D.DataError, match=r"no examples in the file \(2 bad lines skipped"):
        D.read_examples(str(path), "gsm8k", skip_bad_lines=True)


def test_skip_bad_lines_through_a_training_run(tmp_path, capsys):
    """A tiny run on a file with two bad lines: it trains, and the summary reports both."""
    path = tmp_path / "data.jsonl"
    good = [{"prompt": f"Q: {a}+{b}", "thinking": f"{a}+{b}={a + b}", "answer": str(a + b)}
            for a in range(4) for b in range(4)]
    path.write_text(jsonl(*good[:5], "not json", *good[5:], {"prompt": "x", "thinking": "y"}))
    out = tmp_path / "out"
    train.main(TINY + ["--data", str(path), "--format", "tagged", "--skip_bad_lines", "--batch_size", "8",
                       "--out_dir", str(out)])  # 15 examples train: a step of 32 would be refused
    printed = capsys.readouterr().out
    assert "skipped 2 bad lines" in printed and f"{path}:6: invalid JSON" in printed
    summary = json.loads((out / "results.json").read_text())["data"][0]
    assert summary["skipped_bad_lines"] == 2 and summary["examples"] + 1 == len(good)  # one held out
    assert any(line.startswith(f"{path}:18: missing field 'answer'") for line in summary["bad_lines"])
