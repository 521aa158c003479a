"""What is read, and what is refused (issue 25, the data side).

Read: every input (--data, --eval_data, a --encoding .tiktoken file) once, from a regular file, or
from the bytes a caller has already read. Refused, each in one DataError naming the flag or file,
the line where there is one, and the problem, before anything is written to --out_dir:
- a FIFO (which must not block the run), a character device such as /dev/zero (which never ends),
  a folder or a socket given as a file;
- a training set smaller than one optimizer step (--batch_size x --grad_accum x ranks);
- a .tiktoken file whose ranks are not exactly 0 to n-1, each once;
- an answer with no visible character (U+3164 HANGUL FILLER and the blank Braille pattern are letters
  and symbols that render blank).
Generation never produces an id the tokenizer cannot decode (a gap in its ids, a padding row), even
where that id's logit is the largest.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import resource
import signal
import socket
from pathlib import Path

import pytest
import tiktoken
import torch

import data as D
import train
from model import GPT, GPTConfig
from conftest import for_data, needs_tiktoken_cache

TINY = ["--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--max_iters", "1", "--stage2_iters", "0",
        "--n_train", "40", "--n_test", "4", "--n_val", "2", "--eval_limit", "1", "--eval_interval", "1000",
        "--log_interval", "1000", "--batch_size", "4", "--device", "cpu"]


def tagged_lines(n: int) -> str:
    return "".join(json.dumps({"prompt": f"Q: {i}+1", "thinking": f"{i}+1={i + 1}", "answer": str(i + 1)}) + "\n"
                   for i in range(n))


class Hung(Exception):
    """The alarm of `bounded`: the code under test blocked (opening a FIFO waits for a writer)."""


@contextlib.contextmanager
def bounded(seconds: int = 30, memory: int | None = None):
    """Fail, rather than hang or exhaust the machine's memory, where the code inside opens a FIFO or
    reads an endless device: an alarm after `seconds`, and (given `memory`) that many bytes more address
    space at most (not always: CUDA reserves far more address space than it uses)."""
    def alarm(signum, frame):
        raise Hung(f"still blocked after {seconds} s")
    handler = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if memory:
        with open("/proc/self/statm") as f:
            cap = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + memory
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def refused(args: list[str], out_dir: Path, capsys, memory: int | None = None) -> str:
    """Run train.main (under `bounded`); assert a one-line error, exit 2 and nothing in --out_dir; return it."""
    with bounded(memory=memory), pytest.raises(SystemExit) as exit_info:
        train.main((for_data(TINY) if "--data" in args else TINY) + args + ["--out_dir", str(out_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert not out_dir.exists() or not any(out_dir.iterdir()), "something was written to --out_dir"
    return err


# ---------------------------------------------------------------------------------------------
# Item 1: inputs are regular files, read once

def test_a_fifo_as_eval_data_is_refused_at_once(tmp_path, capsys):
    """Opening a FIFO with no writer blocked the run forever (open(path) waits for one)."""
    data, fifo = tmp_path / "train.jsonl", tmp_path / "test.fifo"
    data.write_text(tagged_lines(20))
    os.mkfifo(fifo)
    err = refused(["--data", str(data), "--eval_data", str(fifo), "--format", "tagged"], tmp_path / "out", capsys)
    assert f"--eval_data {fifo}: not a regular file (a FIFO); give a file" in err


def test_dev_zero_as_data_is_refused(tmp_path, capsys):
    """Reading /dev/zero to its end never ended: it filled memory."""
    err = refused(["--data", "/dev/zero"], tmp_path / "out", capsys, memory=2 << 30)
    assert "--data /dev/zero: not a regular file (a character device); give a file" in err


def test_read_input_names_what_the_path_is(tmp_path):
    folder, fifo, missing = tmp_path / "folder", tmp_path / "pipe", tmp_path / "missing.jsonl"
    folder.mkdir()
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        with bounded(memory=2 << 30):
            for path, what in [(folder, "not a regular file (a folder)"), (fifo, "not a regular file (a FIFO)"),
                               ("/dev/zero", "not a regular file (a character device)"),
                               (tmp_path / "sock", "not a regular file (a socket)"), (missing, "no such file")]:
                with pytest.raises(D.DataError, match="^" + re.escape(f"--eval_data {path}: {what}")):
                    D.read_input(str(path), "--eval_data")
    finally:
        server.close()
    (tmp_path / "ok.jsonl").write_bytes(b"\x00\xff\n")
    assert D.read_input(str(tmp_path / "ok.jsonl"), "--data") == b"\x00\xff\n"


def test_callers_pass_the_bytes_they_read_and_the_path_only_names_them(tmp_path):
    """load_data, read_examples and get_encoding parse the bytes given: the paths need not exist."""
    train_path, test_path = str(tmp_path / "gone" / "train.jsonl"), str(tmp_path / "gone" / "test.jsonl")
    cfg = train.TrainConfig(data=train_path, eval_data=test_path, format="tagged", n_val=1, block_size=64)
    raw = {"data": tagged_lines(12).encode(), "eval_data": tagged_lines(3).encode()}
    train_set, val_set, test = D.load_data(cfg, D.char_encoding(), raw)
    assert len(train_set.ids) + len(val_set.ids) == 12 and len(test) == 3
    assert test[2].source == f"{test_path}:3"
    with pytest.raises(D.DataError, match=f"^{train_path}:2: invalid JSON"):
        D.read_examples(train_path, "tagged", raw=b'{"prompt": "a", "thinking": "b", "answer": "c"}\n{oops\n')
    ranks = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))
    enc = D.get_encoding(str(tmp_path / "gone" / "bytes.tiktoken"), ranks)
    assert enc.n_vocab == 257 and enc.decode(enc.encode("héllo")) == "héllo"


# ---------------------------------------------------------------------------------------------
# Item 2: a training set smaller than one optimizer step

def test_a_synthetic_set_smaller_than_one_step_is_refused_before_anything_is_written(tmp_path, capsys):
    """--n_train 12 --n_val 1 --grad_accum 16 ended in `max() arg is an empty sequence` after making --out_dir."""
    err = refused(["--n_train", "12", "--n_val", "1", "--batch_size", "32", "--grad_accum", "16"],
                  tmp_path / "out", capsys)
    assert "synthetic task: 11 training examples" in err
    assert "fewer than the 512 of one optimizer step (--batch_size x --grad_accum x ranks)" in err
    assert "lower --batch_size or --grad_accum" in err


def test_a_data_file_smaller_than_one_step_is_named(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(tagged_lines(12))
    err = refused(["--data", str(path), "--format", "tagged", "--n_val", "1", "--batch_size", "16"],
                  tmp_path / "out", capsys)
    assert f"error: {path}: 11 training examples" in err and "fewer than the 16 of one optimizer step" in err


def test_load_data_counts_the_training_set_after_the_split_and_the_dropped(tmp_path):
    """20 examples, 2 of them for validation and some of the rest too long for --block_size."""
    path = tmp_path / "train.jsonl"
    long = [{"prompt": "Q: " + "9" * 80, "thinking": "t", "answer": "1"}] * 6
    path.write_text(tagged_lines(14) + "".join(json.dumps(r) + "\n" for r in long))
    cfg = train.TrainConfig(data=str(path), format="tagged", n_val=2, block_size=40)
    kept = len(D.load_data(cfg, D.char_encoding())[0].ids)
    assert 14 - 2 <= kept < 18  # what the split and the dropping leave
    train_set, _, _ = D.load_data(cfg, D.char_encoding(), step_examples=kept)
    assert len(train_set.ids) == kept == 18 - train_set.summary["dropped_too_long"]
    with pytest.raises(D.DataError, match=f"^{path}: {kept} training examples .* fewer than the {kept + 1} of one"):
        D.load_data(cfg, D.char_encoding(), step_examples=kept + 1)


def test_batches_refuse_a_set_smaller_than_a_batch():
    data = D.tokenize(D.synthetic_task(5, seed=0), D.char_encoding(), 96, name="five")
    assert D.Batches(data, 5, seed=0).indices(0).size == 5
    with pytest.raises(D.DataError, match="five: 5 examples for batches of 6"):
        D.Batches(data, 6, seed=0)


# ---------------------------------------------------------------------------------------------
# Item 3: the ranks of a .tiktoken file are exactly 0..n-1

def tiktoken_file(tmp_path: Path, extra: list[str]) -> Path:
    """The 256 single bytes at ranks 0..255 (lines 1-256), then the `extra` lines."""
    path = tmp_path / "bpe.tiktoken"
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)] + extra
    path.write_text("\n".join(lines) + "\n")
    return path


AB, CD = base64.b64encode(b"ab").decode(), base64.b64encode(b"cd").decode()
RANK_CASES = [  # (name, lines after the 256 bytes, the line named, the problem)
    ("a gap", [f"{AB} 257"], 257, "rank 257 is not below 257, the number of tokens"),
    ("a huge rank", [f"{AB} 99999999999"], 257, "rank 99999999999 is not below 257"),
    ("a rank of 5 million", [f"{AB} 5000000"], 257, "rank 5000000 is not below 257"),
    ("a repeated rank", [f"{AB} 256", f"{CD} 256"], 258, "rank 256 repeats line 257"),
    ("a negative rank", [f"{AB} -1"], 257, "rank -1 is not below 257"),
    ("a repeated token", [f"{AB} 256", f"{AB} 257"], 258, "the token b'ab' repeats line 257"),
]


@pytest.mark.parametrize("name, extra, line, problem", RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_tiktoken_ranks_must_be_0_to_n_minus_1_each_once(tmp_path, capsys, name, extra, line, problem):
    path = tiktoken_file(tmp_path, extra)
    with pytest.raises(D.DataError, match="the ranks must be 0 to n-1, each once") as info:
        D.get_encoding(str(path))
    assert str(info.value).startswith(f"{path}:{line}: {problem}")
    err = refused(["--encoding", str(path)], tmp_path / "out", capsys)  # a one-line error, no traceback
    assert f"{path}:{line}: {problem}" in err


def test_a_complete_tiktoken_file_is_accepted_and_end_of_text_follows_it(tmp_path):
    path = tiktoken_file(tmp_path, [f"{CD} 257", f"{AB} 256"])  # any order of the lines
    enc = D.get_encoding(str(path))
    assert (enc.n_vocab, enc.eot_token) == (259, 258)
    assert enc.encode_ordinary("abcd") == [256, 257]
    assert D.generable_ids(enc, 320).tolist() == [True] * 259 + [False] * 61


@needs_tiktoken_cache
def test_cl100k_base_file_meets_the_rule():
    """The real file (tiktoken's cached copy) has ranks 0..n-1."""
    tiktoken.get_encoding("cl100k_base")  # caches the file, if it was not yet
    cache = os.environ["TIKTOKEN_CACHE_DIR"]
    found = [p for p in Path(cache).glob("*") if p.is_file() and p.read_bytes()[:7] == b"IQ== 0\n"]
    assert found, f"no cl100k_base file in {cache}"
    ranks = D.read_tiktoken_file(str(found[0]))
    assert sorted(ranks.values()) == list(range(len(ranks))) == list(range(100256))


# ---------------------------------------------------------------------------------------------
# Item 4: an answer needs a visible character

@pytest.mark.parametrize("answer", ["\u3164", "\u2800", "\u034f\ufe0f", "\u115f\u1160", "\uffa0", "\u200b\u3164",
                                    "\u0301"],
                         ids=["hangul filler", "blank braille", "joiner + variation selector",
                              "choseong + jungseong fillers", "halfwidth filler", "zero-width space + filler",
                              "a combining mark alone"])
def test_an_answer_of_invisible_characters_is_refused(tmp_path, answer):
    """Lines 1-5 have a visible character each (an Arabic-Indic digit, a letter with its mark, a filler
    before a letter, a Braille dot, ½) and are kept; line 6, `answer`, is refused."""
    path = tmp_path / "data.jsonl"
    visible = ["\u0663", "e\u0301", "\u3164x", "\u2801", "\u00bd"]
    path.write_text("".join(json.dumps({"prompt": "Q", "thinking": "t", "answer": a}) + "\n"
                            for a in [*visible, answer]))
    with pytest.raises(D.DataError, match=f"^{path}:6: empty answer \\(only invisible characters\\)"):
        D.read_examples(str(path), "tagged")
    assert [e.answer for e in D.read_examples(str(path), "tagged", skip_bad_lines=True)] == visible


# ---------------------------------------------------------------------------------------------
# Item 5: generation never picks an id with no bytes

def gappy_encoding() -> tiktoken.Encoding:
    """Bytes at 0..255, end-of-text at 300: ids 256..299 have no token (as cl100k_base's 100256, 100261..)."""
    return tiktoken.Encoding("gappy", pat_str=r"[\s\S]", mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={"<|endoftext|>": 300})


def rigged_model(favoured: dict[int, float]) -> GPT:
    """Every position's final hidden state is the same vector b (ln_f's gain zeroed); embedding row i is
    favoured[i] * b, so the logits rank the favoured ids in that order, far above the rest."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        b = torch.randn(16)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        for i, scale in favoured.items():
            model.transformer.wte.weight[i] = scale * b
    return model


def test_generable_ids_are_exactly_the_decodable_ones():
    enc = gappy_encoding()
    allowed = D.generable_ids(enc, 320)
    assert allowed.dtype == torch.bool and allowed.device.type == "cpu" and allowed.shape == (320,)
    assert allowed.nonzero().flatten().tolist() == list(range(256)) + [300]
    assert D.generable_ids(enc, 200).tolist() == [True] * 200  # a table smaller than n_vocab: cut


@needs_tiktoken_cache
def test_cl100k_base_gaps_are_not_generable():
    enc = tiktoken.get_encoding("cl100k_base")
    allowed = D.generable_ids(enc, 100352)
    assert (~allowed).nonzero().flatten().tolist() == [100256, *range(100261, 100276), *range(100277, 100352)]


def test_generate_never_returns_an_id_outside_the_mask_even_when_it_wins():
    enc = gappy_encoding()
    model = rigged_model({260: 100.0, 310: 90.0, ord("7"): 10.0})  # a gap, then a padding row, then "7"
    assert model.generate([[1, 2]], 4, -1)[0] == [260] * 4  # the rigging works: unmasked, the gap wins
    allowed = D.generable_ids(enc, 320)
    for use_cache in (True, False):
        out = model.generate([[1, 2], [3]], 4, -1, use_cache=use_cache, allowed=allowed)
        assert out == [[ord("7")] * 4] * 2


def test_evaluate_with_a_gap_winning_the_argmax_decodes_every_response():
    """train.evaluate limited generation to ids below n_vocab: the gap id 260 won, and enc.decode failed."""
    enc = gappy_encoding()
    model = rigged_model({260: 100.0, enc.eot_token: 50.0})
    examples = [D.Example("Q: 1", "t", "1"), D.Example("Q: 22", "t", "2")]
    result = train.evaluate(model, enc, examples, train.TrainConfig(block_size=32), "cpu", torch.float32)
    assert result["n"] == 2 and result["acc"] == 0.0
    assert [s["response"] for s in result["responses"]] == ["", ""]  # end-of-text at once
