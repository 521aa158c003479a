"""Chat-style data (docs/data_formats.md): --format messages ({"messages": [system?, user, assistant]}) and TRL's
conversational prompt/completion under --format completion. One user turn, one assistant turn whose content is
the tagged completion; a leading system message folded into the prompt as system + "\\n\\n" + user. Bad lines
name file:line, or with --skip_bad_lines are skipped and counted. A tiny run on a messages file, end to end."""
import json
from pathlib import Path

import pytest

import data as D
import train
from conftest import run_cli


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def tagged(thinking: str, answer: str) -> str:
    return f"<Thinking>{thinking}</Thinking><Answer>{answer}</Answer>"


def write_lines(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def read(path: str, fmt: str, skip: bool = False, skipped: list | None = None) -> list[D.Example]:
    return D.read_examples(path, fmt, skip_bad_lines=skip, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Reading

def test_messages_user_then_assistant(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [
        {"messages": [user("What is 2+3?"), assistant(tagged("2+3=5", "5"))]},
        {"messages": [user("Tom has 3 bags of 4."),
                      assistant("  <Thinking> 3*4 = 12 </Thinking>\n<Answer> 12 </Answer>\n")]},
    ])
    examples = read(path, "messages")
    assert [(e.prompt, e.thinking, e.answer) for e in examples] == [
        ("What is 2+3?", "2+3=5", "5"), ("Tom has 3 bags of 4.", "3*4 = 12", "12")]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:2"]


def test_a_leading_system_message_is_folded_into_the_prompt(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [
        {"messages": [system("You are terse."), user("What is 2+3?"), assistant(tagged("2+3=5", "5"))]}])
    (example,) = read(path, "messages")
    assert example.prompt == "You are terse." + "\n\n" + "What is 2+3?"
    assert (example.thinking, example.answer) == ("2+3=5", "5")


def test_a_blank_system_message_is_left_out_of_the_prompt(tmp_path):
    """A system message of whitespace only (or none at all) adds nothing: no leading blank lines in the prompt."""
    path = write_lines(tmp_path / "m.jsonl", [
        {"messages": [system(blank), user("What is 2+3?"), assistant(tagged("2+3=5", "5"))]} for blank in ("", " \n")])
    assert [example.prompt for example in read(path, "messages")] == ["What is 2+3?"] * 2


def test_messages_read_as_the_same_example_as_the_tagged_format(tmp_path):
    chat = write_lines(tmp_path / "m.jsonl", [{"messages": [user("Q: 1+2"), assistant(tagged("1+2=3", "3"))]}])
    flat = write_lines(tmp_path / "t.jsonl", [{"prompt": "Q: 1+2", "thinking": "1+2=3", "answer": "3"}])
    assert read(chat, "messages") == read(flat, "tagged")


def test_completion_reads_trl_conversational_prompt_and_completion(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [
        {"prompt": [user("What is 2+3?")], "completion": [assistant(tagged("2+3=5", "5"))]},
        {"prompt": [system("Be brief."), user("What is 4-1?")], "completion": [assistant(tagged("4-1=3", "3"))]},
        {"prompt": "What is 1+1?", "completion": tagged("1+1=2", "2")},  # the plain layout, in the same file
    ])
    examples = read(path, "completion")
    assert [(e.prompt, e.thinking, e.answer) for e in examples] == [
        ("What is 2+3?", "2+3=5", "5"), ("Be brief.\n\nWhat is 4-1?", "4-1=3", "3"), ("What is 1+1?", "1+1=2", "2")]


@pytest.mark.parametrize("content, problem", [
    ("2+3=5 so 5", "exactly once"),  # untagged
    (tagged("2+3=5", "5") + "<Answer>5</Answer>", "<Answer> exactly once, found it 2 times"),
    ("<Thinking>a</Thinking><Thinking>b</Thinking><Answer>5</Answer>", "<Thinking> exactly once"),
    ("<Answer>5</Answer><Thinking>2+3=5</Thinking>", "is not <Thinking>"),  # each tag once, in the wrong order
    ("<Thinking>2+3=5</Thinking> so <Answer>5</Answer>", "is not <Thinking>"),  # text between the parts
    (tagged("2+3=5", ""), "empty answer"),
], ids=["untagged", "answer_twice", "thinking_twice", "wrong_order", "text_between", "empty_answer"])
def test_the_assistant_content_must_be_the_tagged_completion(tmp_path, content, problem):
    path = write_lines(tmp_path / "m.jsonl", [{"messages": [user("What is 2+3?"), assistant(tagged("2+3=5", "5"))]},
                                              {"messages": [user("What is 2+3?"), assistant(content)]}])
    with pytest.raises(D.DataError) as info:
        read(path, "messages")
    assert str(info.value).startswith(f"{path}:2: ") and problem in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------
# Bad lines: file:line, or skipped and counted

BAD = {
    "multi_turn": ({"messages": [user("a"), assistant(tagged("1", "1")), user("b"), assistant(tagged("2", "2"))]},
                   "one user turn then one assistant turn"),
    "no_assistant": ({"messages": [user("What is 2+3?")]}, "got the roles ['user']"),
    "two_systems": ({"messages": [system("s"), system("t"), user("u"), assistant(tagged("1", "1"))]},
                    "one user turn then one assistant turn"),
    "system_after_user": ({"messages": [user("u"), system("s"), assistant(tagged("1", "1"))]},
                          "got the roles ['user', 'system', 'assistant']"),
    "assistant_first": ({"messages": [assistant(tagged("1", "1")), user("u")]}, "one user turn then one assistant"),
    "not_a_list": ({"messages": "What is 2+3?"}, "must be a list"),
    "an_object": ({"messages": {"role": "user", "content": "hi"}}, "must be a list"),
    "no_messages": ({"prompt": "p", "completion": tagged("1", "1")}, "must be a list"),
    "content_not_a_string": ({"messages": [user("u"), {"role": "assistant", "content": ["<Thinking>"]}]},
                             '"content": "<a string>"'),
    "no_content": ({"messages": [{"role": "user"}, assistant(tagged("1", "1"))]}, '"content": "<a string>"'),
    "message_not_an_object": ({"messages": ["What is 2+3?", assistant(tagged("1", "1"))]}, "must be a list of"),
    "content_null": ({"messages": [user(None), assistant(tagged("1", "1"))]}, '"content": "<a string>"'),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_messages_line_is_an_error_naming_file_and_line(tmp_path, name):
    record, problem = BAD[name]
    good = {"messages": [user("What is 2+3?"), assistant(tagged("2+3=5", "5"))]}
    path = write_lines(tmp_path / "m.jsonl", [good, good, record, good])
    with pytest.raises(D.DataError) as info:
        read(path, "messages")
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and problem in message, message
    assert "--skip_bad_lines" in message and "\n" not in message


ONE_REPLY = 'a chat "prompt" needs a "completion" of one message: the assistant\'s tagged response'


@pytest.mark.parametrize("record, problem", [
    ({"prompt": [user("a"), assistant(tagged("1", "1"))], "completion": [assistant(tagged("1", "1"))]},
     "got the roles ['user', 'assistant', 'assistant']"),  # an assistant turn inside the prompt
    ({"prompt": [user("a")], "completion": []}, ONE_REPLY),  # no assistant turn
    ({"prompt": [user("a")]}, ONE_REPLY),
    ({"prompt": [user("a")], "completion": [user("b")]}, "got the roles ['user', 'user']"),
    ({"prompt": [{"role": "user", "content": 3}], "completion": [assistant(tagged("1", "1"))]}, "<a string>"),
    # found in review: the turns in the wrong fields were read as one good example
    ({"prompt": [user("a"), assistant(tagged("1", "1"))]}, ONE_REPLY),
    ({"prompt": [user("a"), assistant(tagged("1", "1"))], "completion": None}, ONE_REPLY),
    ({"prompt": [], "completion": [user("a"), assistant(tagged("1", "1"))]}, ONE_REPLY),
], ids=["assistant_in_prompt", "empty_completion", "no_completion", "user_completion", "content_a_number",
        "both_turns_in_prompt", "both_turns_in_prompt_null_completion", "both_turns_in_completion"])
def test_a_bad_conversational_completion_line_names_file_and_line(tmp_path, record, problem):
    path = write_lines(tmp_path / "c.jsonl", [{"prompt": "p", "completion": tagged("1", "1")}, record])
    with pytest.raises(D.DataError) as info:
        read(path, "completion")
    assert str(info.value).startswith(f"{path}:2: ") and problem in str(info.value), str(info.value)


def test_skip_bad_lines_skips_and_counts_them(tmp_path):
    good = [{"messages": [user(f"What is {k}+1?"), assistant(tagged(f"{k}+1={k + 1}", str(k + 1)))]}
            for k in range(5)]
    bad = [BAD[name][0] for name in ("multi_turn", "no_assistant", "not_a_list", "content_not_a_string")]
    records = [good[0], bad[0], good[1], bad[1], good[2], "not json", bad[2], good[3], bad[3], good[4]]
    path = write_lines(tmp_path / "m.jsonl", records)
    skipped = []
    examples = read(path, "messages", skip=True, skipped=skipped)
    assert [e.answer for e in examples] == ["1", "2", "3", "4", "5"]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{path}:{n}" for n in (2, 4, 6, 7, 9)]
    assert "got the roles ['user']" in skipped[1] and "invalid JSON" in skipped[2]
    # without the flag, the first bad line stops the read
    with pytest.raises(D.DataError, match=rf"^{path}:2: "):
        read(path, "messages")
    # only bad lines: no examples, said with the count and the first
    only_bad = write_lines(tmp_path / "bad.jsonl", bad)
    with pytest.raises(D.DataError, match=r"no examples in the file \(4 bad lines skipped, the first: .*:1: "):
        read(only_bad, "messages", skip=True, skipped=[])


# ---------------------------------------------------------------------------------------------
# End to end: a tiny run on a messages file

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_val", "10",
        "--max_iters", "4", "--stage2_iters", "2", "--warmup_iters", "1", "--log_interval", "2",
        "--eval_interval", "2", "--val_acc_n", "0", "--dtype", "float32", "--device", "cpu", "--block_size", "64"]


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(train.main, args, capsys)


def test_a_run_on_a_messages_file_trains_and_evaluates_both_stages(tmp_path, capsys):
    rows = [{"messages": ([system("Add.")] if (a + b) % 3 == 0 else []) + [
        user(f"What is {a}+{b}?"), assistant(tagged(f"{a}+{b}={a + b}", str(a + b)))]}
        for a in range(8) for b in range(8)]
    data = write_lines(tmp_path / "train.jsonl", rows + [BAD["multi_turn"][0]])
    test = write_lines(tmp_path / "test.jsonl", rows[:5])
    out = tmp_path / "out"
    code, stdout, err = run_main([*TINY, "--data", data, "--eval_data", test, "--format", "messages",
                                  "--skip_bad_lines", "--out_dir", str(out), "--show_roles", "1"], capsys)
    assert code == 0, err
    assert f"skipped 1 bad lines of --data and --eval_data (--skip_bad_lines): {data}:65: " in stdout
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["results"]) == {"sft_tag", "sftkey_tag"}
    assert all(r["n"] == 5 for r in summary["results"].values())
    train_summary = summary["data"][0]
    assert train_summary["skipped_bad_lines"] == 1 and train_summary["bad_lines"][0].startswith(f"{data}:65: ")
    assert train_summary["examples"] + summary["data"][1]["examples"] == 64
    assert summary["results"]["sft_tag"]["responses"][0]["prompt"].startswith("Add.\n\nWhat is 0+0?")
    assert "--- example 1 of " in stdout and "[T:<Thinking>]" in stdout and "[K:<Answer>]" in stdout

    # the same file without --skip_bad_lines: refused in one line naming file:line, nothing written
    code, _, err = run_main([*TINY, "--data", data, "--eval_data", test, "--format", "messages",
                             "--out_dir", str(tmp_path / "refused")], capsys)
    assert code == 2 and err.startswith(f"error: {data}:65: ") and err.strip().count("\n") == 0, err
    assert not (tmp_path / "refused" / "results.json").exists()


def test_a_conversational_prompt_with_a_non_list_completion_says_what_is_wrong(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [
        {"prompt": [user("What is 2+3?")], "completion": tagged("2+3=5", "5")}])
    with pytest.raises(D.DataError) as info:
        read(path, "completion")
    message = str(info.value)
    assert message.startswith(f"{path}:1: ") and "completion" in message.split(": ", 1)[1], message
    assert "concatenate" not in message, message
