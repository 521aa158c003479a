"""show.py, the role viewer: every token with its role, as a run trains on it.

The plain output is checked token by token on synthetic examples with the offline `sftkey-chars`
encoding (one token per byte, one per tag, so the expected line can be written by hand), its
escapes on bytes a terminal would hide or garble, and the straddling flag on GPT-2's `><` in
`</Thinking><Answer>` against `sftkey.count_straddling`. Through the command line: the same
flags as train.py, plain when piped, colours only on request, errors in one line.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tiktoken

import data as D
import sftkey
import show
from conftest import for_data, needs_tiktoken_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = {"sft_tag": (0.0, 1.0, 1.0), "sftkey_tag": (0.0, 0.0, 1.0)}
SMALL = ["--n_train", "60", "--n_val", "6", "--n_test", "4"]


def tokenized(examples: list[D.Example], enc: tiktoken.Encoding, tagged: bool = True) -> D.TokenizedSet:
    return D.tokenize(examples, enc, block_size=400, tagged=tagged)


def test_plain_output_of_a_synthetic_example_token_by_token():
    data = tokenized([D.Example("Q: 1+2", "1+2=3", "3", "toy.jsonl:4")], D.char_encoding())
    text = show.show_examples(data, D.char_encoding(), 1, STAGES, color=False)
    assert "\033" not in text
    lines = text.split("\n")
    assert lines[:2] == show.legend(False).split("\n")
    assert lines[2:] == [
        "",
        "--- example 1 of 1 (toy.jsonl:4): 18 tokens ---",
        r"[P:Q][P::][P: ][P:1][P:+][P:2][P:\n]",  # the newline is a token of the prompt: written \n, then a break
        "[T:<Thinking>][T:1][T:+][T:2][T:=][T:3][T:</Thinking>][K:<Answer>][K:3][K:</Answer>][K:<|endoftext|>]",
        "tokens: prompt 7, thinking 7, key 4 (end-of-text included); straddling 0",
        # 17 targets (the first token is never one); stage 1 supervises thinking and key, stage 2 the key alone
        "loss sft_tag     weights prompt 0, thinking 1, key 1: 11 of 17 targets supervised",
        "loss sftkey_tag  weights prompt 0, thinking 0, key 1: 4 of 17 targets supervised",
    ]


def test_untagged_layout_puts_the_hash_line_in_the_key():
    enc = D.char_encoding()
    data = tokenized([D.Example("Q: 4-1", "4-1=3", "3")], enc, tagged=False)
    lines = show.show_examples(data, enc, 1, {"sft": (0.0, 1.0, 1.0)}, tagged=False).split("\n")[5:7]
    assert lines == ["[T:4][T:-][T:1][T:=][T:3][K:\\n]", "[K:#][K:#][K:#][K:#][K: ][K:3][K:<|endoftext|>]"]


def test_escapes_keep_every_byte_visible_and_unambiguous():
    assert show.visible(b"a b") == "a b"
    assert show.visible(b"\n\r\t") == r"\n\r\t"
    assert show.visible(b"\\n") == r"\\n"  # a backslash and an n: not a newline
    assert show.visible(b"\x07\x7f") == r"\x07\x7f"
    assert show.visible("\u200b\u00a0\u2028".encode()) == r"\u200b\u00a0\u2028"  # invisible, no-break, line sep
    # Found in review: U+0085 and U+00A0 were shown as \x85 and \xa0, as the lone bytes 0x85 and 0xa0 are.
    assert show.visible("\u0085".encode()) == r"\u0085" != show.visible(b"\x85") == r"\x85"
    assert show.visible("é".encode()) == "é"
    assert show.visible("é".encode()[:1]) == r"\xc3"  # half a character: its byte
    assert show.visible("\U000e0001".encode()) == r"\U000e0001"  # a format character beyond the BMP
    # With one token per byte, a two-byte character is two tokens, each shown as its byte.
    enc = D.char_encoding()
    data = tokenized([D.Example("é\ta\\", "x", "y")], enc)
    assert show.show_examples(data, enc, 1, STAGES).split("\n")[4] == r"[P:\xc3][P:\xa9][P:\t][P:a][P:\\][P:\n]"


def test_long_lines_wrap_at_token_boundaries():
    enc = D.char_encoding()
    data = tokenized([D.Example("Q: " + "1+" * 80 + "1", "x", "y")], enc)
    lines = show.show_examples(data, enc, 1, STAGES).split("\n")[4:]
    assert all(len(line) <= show.WIDTH for line in lines)
    assert lines[0].startswith("[P:Q]") and lines[0].endswith("]") and lines[1].startswith("[P:")


def test_colour_marks_roles_and_alternates_backgrounds():
    enc = D.char_encoding()
    data = tokenized([D.Example("Q", "t", "k")], enc)
    text = show.show_examples(data, enc, 1, STAGES, color=True)
    assert "[P:" not in text
    first = text.split("\n")[4]
    assert first == f"\033[90mQ{show.RESET}\033[90;48;5;236m\\n{show.RESET}"
    assert f"\033[32m<|endoftext|>{show.RESET}" in text or f"\033[32;48;5;236m<|endoftext|>{show.RESET}" in text


@needs_tiktoken_cache
def test_gpt2_straddling_token_is_flagged_where_the_tagger_counts_it(gpt2_encoding):
    examples = [D.Example("Tom has 3 bags of 4 apples. How many apples?", "3*4 = <<3*4=12>>12 apples.", "12"),
                D.Example("What is 2+3?", "2+3=5", "5")]
    data = tokenized(examples, gpt2_encoding)
    text = show.show_examples(data, gpt2_encoding, 2, STAGES).split("\n", 2)[2]  # after the legend
    # GPT-2 merges the punctuation run "><" of "</Thinking><Answer>": a byte of the thinking and one of the Key.
    assert text.count("*:") == 2 and text.count("[K*:><][K:Answer][K:>]") == 2
    assert "[T:</][T:Th][T:inking][K*:><]" in text  # "</" of the closing tag merged on its own
    assert "[T:.</]" in text  # a merge inside one span is no straddle
    assert text.count("straddling 1") == 2
    for example, ids, roles in zip(data.examples, data.ids, data.roles):
        rendered, spans = sftkey.render(example.prompt, example.thinking, example.answer)
        tokens = show.example_tokens(example, ids.tolist(), roles.tolist(), gpt2_encoding)
        assert sum(t.straddles for t in tokens) == sftkey.count_straddling(gpt2_encoding, rendered, spans, ids.tolist())


@needs_tiktoken_cache
@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_shown_roles_are_the_training_roles(name):
    enc = tiktoken.get_encoding(name)
    examples = [D.Example("Ünïcödé prompt 🙂?", "think 🙂🙂 ok", "😀 12"), D.Example("x\r\n", "a\n\nb", " 7 ")]
    data = tokenized(examples, enc)
    for k, example in enumerate(data.examples):
        tokens = show.example_tokens(example, data.ids[k].tolist(), data.roles[k].tolist(), enc)
        assert [t.role for t in tokens] == data.roles[k].tolist()
        assert tokens[-1].text == "<|endoftext|>" and tokens[-1].role == sftkey.KEY


def test_tokens_from_another_encoding_are_refused():
    enc = D.char_encoding()
    data = tokenized([D.Example("Q", "t", "k")], enc)
    with pytest.raises(ValueError, match="not the rendered text"):
        show.example_tokens(data.examples[0], data.ids[0].tolist(), data.roles[0].tolist(), enc, tagged=False)


def test_cli_takes_train_flags_and_prints_plain_when_piped(capsys):
    show.main(["--n", "2", *SMALL])
    out = capsys.readouterr().out
    assert out.startswith("synthetic train: 54 examples")
    assert out.count("--- example ") == 2 and "--- example 1 of 54: " in out
    assert "\033" not in out and "[P:Q]" in out and "[K:<|endoftext|>]" in out
    assert "loss sft_tag " in out and "loss sftkey_tag " in out

    show.main(["--n", "1", "--stage2_weights", "0,1,1", "--split", "validation", "--color", "always", *SMALL])
    out = capsys.readouterr().out
    assert out.startswith("validation: 6 examples") and "\033[" in out and "loss sftsft_tag " in out

    show.main(["--n", "1", "--key_weight", "5", "--stage2_iters", "0", "--untagged", *SMALL])
    out = capsys.readouterr().out
    assert "loss sft " not in out and "loss w0-1-5 " in out and "weights prompt 0, thinking 1, key 5" in out
    assert "<Thinking>" not in out


def test_the_examples_are_those_the_run_trains_on(capsys):
    import train
    cfg = train.TrainConfig(n_train=60, n_val=6, n_test=4)
    train_set, _, _ = D.load_data(cfg, D.char_encoding())
    show.main(["--n", "3", *SMALL])
    shown = capsys.readouterr().out
    for example in train_set.examples[:3]:
        assert "".join(f"[P:{c}]" for c in example.prompt) in shown
    assert "".join(f"[P:{c}]" for c in train_set.examples[3].prompt) + "[P:\\n]" not in shown


@pytest.mark.parametrize("flags, message", [
    (["--n", "-1"], "--n -1: must be a whole number >= 0"),
    (["--data", "/nonexistent/train.jsonl"], "--data /nonexistent/train.jsonl: no such file"),
    (["--weights", "0,0,0"], "--weights 0,0,0"),
    (["--encoding", "nope"], "--encoding nope: unknown"),
    (["--init_from", "/nonexistent/ckpt.pt"], "--init_from /nonexistent/ckpt.pt: no such file"),  # was ignored
])
def test_bad_input_is_one_line_and_exit_2(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        show.main([*(for_data(SMALL) if "--data" in flags else SMALL), *flags])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err and captured.err.count("\n") == 1


def test_stages_after_an_init_from_checkpoint_have_train_pys_names(tmp_path, capsys):
    """Found in review: show.py named the stages as if from random weights (sft_tag, sftkey_tag) where train.py,
    from the same --init_from, names them after the stage the checkpoint ended (sftkey_tag's continuation)."""
    import train
    train.main([*SMALL, "--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--max_iters", "1", "--stage2_iters", "1",
                "--val_acc_n", "0", "--eval_limit", "1", "--out_dir", str(tmp_path)])
    start = str(tmp_path / "sftkey_tag" / "ckpt.pt")
    capsys.readouterr()
    show.main(["--n", "1", "--init_from", start, *SMALL])
    out = capsys.readouterr().out
    names = [stage.name for stage in train.plan_stages(train.parse_args(SMALL), "sftkey_tag")]
    assert "sft_tag" not in names and all(f"loss {name} " in out for name in names), (names, out[-400:])


def test_a_reader_that_stops_early_is_not_an_error():
    """`show.py | head`: the pipe closes while show.py still writes; it ends quietly with exit 0, as `cat` would."""
    reader = subprocess.Popen([sys.executable, os.path.join(ROOT, "show.py"), "--n", "3000", "--n_train", "3500"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert reader.stdout.readline().startswith(b"synthetic train:")
    reader.stdout.close()  # more than a pipe's buffer is still to come
    assert reader.wait(timeout=120) == 0 and reader.stderr.read() == b""
