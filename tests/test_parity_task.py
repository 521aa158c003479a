"""The synthetic `parity` task (--task parity): the arithmetic task's problems, answered "even" or "odd".

Specified: the same problems as `arithmetic` for a data_seed (prompts and worked reasoning), the answer
"even" when the result (the reasoning's last number) is even, else "odd", so the reasoning never writes
the answer (it is a step of its own); about as many "even" as "odd"; deterministic from --data_seed.
`--task parity` with `--data` and an unknown --task are one-line errors (exit 2).
"""
import json
import re
import types

import numpy as np
import pytest
import torch

import data as D
import experiment as E
import sftkey
import train

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "96", "--batch_size", "8",
        "--n_train", "200", "--n_val", "20", "--n_test", "12", "--max_iters", "4", "--stage2_iters", "2",
        "--warmup_iters", "1", "--eval_interval", "2", "--val_acc_n", "4", "--log_interval", "100",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def both():
    """(arithmetic, parity) synthetic_split at data_seed 3: 2000 training, 300 test problems each."""
    return D.synthetic_split(2000, 300, 3, "arithmetic"), D.synthetic_split(2000, 300, 3, "parity")


def _last_number(thinking: str) -> int:
    return int(re.findall(r"\d+", thinking)[-1])


def test_parity_is_in_the_tasks_and_arithmetic_the_default():
    assert D.TASKS[0] == "arithmetic" and "parity" in D.TASKS
    assert train.TrainConfig().task == "arithmetic"
    assert D.synthetic_split(50, 10, 3) == D.synthetic_split(50, 10, 3, "arithmetic")


def test_parity_has_the_same_prompts_and_reasoning_as_arithmetic(both):
    (a_train, a_test), (p_train, p_test) = both
    for arith, parity in ((a_train, p_train), (a_test, p_test)):
        assert len(arith) == len(parity)
        assert [(e.prompt, e.thinking) for e in arith] == [(e.prompt, e.thinking) for e in parity]
        # the answer is the parity of the arithmetic answer
        assert [e.answer for e in parity] == [("even", "odd")[int(e.answer) % 2] for e in arith]


def test_the_answer_is_even_exactly_when_the_reasonings_last_number_is(both):
    _, (p_train, p_test) = both
    for ex in p_train + p_test:
        assert ex.answer in ("even", "odd")
        assert (ex.answer == "even") == (_last_number(ex.thinking) % 2 == 0), ex
        # and the prompt's arithmetic gives that number (the problem itself is intact)
        assert eval(ex.prompt.removeprefix("Q: ")) == _last_number(ex.thinking)


def test_the_reasoning_never_writes_the_answer(both):
    _, (p_train, p_test) = both
    for ex in p_train + p_test:
        assert "even" not in ex.thinking and "odd" not in ex.thinking
        assert "even" not in ex.prompt and "odd" not in ex.prompt
        assert ex.answer not in ex.thinking


def test_even_and_odd_are_balanced_over_20000_training_problems():
    train_set, test = D.synthetic_split(20_000, 500, 0, "parity")
    share = np.mean([ex.answer == "even" for ex in train_set])
    assert 0.45 <= share <= 0.55, share
    assert 0.40 <= np.mean([ex.answer == "even" for ex in test]) <= 0.60


def test_parity_problems_are_deterministic_from_data_seed_and_differ_with_it():
    first = D.synthetic_split(300, 40, 5, "parity")
    assert D.synthetic_split(300, 40, 5, "parity") == first
    other = D.synthetic_split(300, 40, 6, "parity")
    assert [e.prompt for e in other[0]] != [e.prompt for e in first[0]]
    assert [e.prompt for e in other[1]] != [e.prompt for e in first[1]]
    # the test problems are never training ones, as in arithmetic
    assert not {e.prompt for e in first[1]} & {e.prompt for e in first[0]}


def test_load_data_with_task_parity_gives_parity_answers_everywhere():
    cfg = train.TrainConfig(task="parity", n_train=200, n_val=20, n_test=10, block_size=96)
    enc = D.char_encoding()
    train_set, val_set, test = D.load_data(cfg, enc)
    for examples in (train_set.examples, val_set.examples, test):
        assert examples and {e.answer for e in examples} <= {"even", "odd"}
    # the answer is what the key tokens hold
    ids, roles = train_set.ids[0], train_set.roles[0]
    key = enc.decode([int(t) for t, r in zip(ids, roles) if r == sftkey.KEY]).removesuffix("<|endoftext|>")
    assert key == f"{sftkey.ANSWER_OPEN}{train_set.examples[0].answer}{sftkey.ANSWER_CLOSE}"
    assert val_set.enc is enc and train_set.enc is enc


class Oracle(torch.nn.Module):
    """Answers each test prompt with its reference (the ones in `wrong` with the other word), in the tagged layout."""

    def __init__(self, enc, examples, wrong=frozenset()):
        super().__init__()
        self.enc, self.wrong = enc, wrong
        self.by_head = {sftkey.prompt_head(e.prompt): e for e in examples}
        self.config = types.SimpleNamespace(vocab_size=enc.n_vocab, block_size=96)

    def generate(self, prompts, max_new_tokens, stop_token, allowed=None):
        out = []
        for p in prompts:
            ex = self.by_head[self.enc.decode(p)]
            answer = {"even": "odd", "odd": "even"}[ex.answer] if ex.prompt in self.wrong else ex.answer
            text = sftkey.render(ex.prompt, ex.thinking, answer)[0][len(sftkey.prompt_head(ex.prompt)):]
            out.append(self.enc.encode_ordinary(text) + [stop_token])
        return out


def test_parity_answers_are_scored_by_the_word():
    enc = D.char_encoding()
    _, test = D.synthetic_split(10, 20, 4, "parity")
    cfg = train.TrainConfig(block_size=96)
    right = train.evaluate(Oracle(enc, test), enc, test, cfg, "cpu", torch.float32)
    assert right["acc"] == 1.0 and right["fmt"] == 1.0
    wrong = {e.prompt for e in test[:5]}
    half = train.evaluate(Oracle(enc, test, wrong), enc, test, cfg, "cpu", torch.float32)
    assert half["correct"] == [e.prompt not in wrong for e in test] and half["acc"] == 0.75


def test_train_py_runs_and_scores_the_parity_task_end_to_end(tmp_path, capsys):
    train.main([*TINY, "--task", "parity", "--out_dir", str(tmp_path)])
    capsys.readouterr()
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["config"]["task"] == "parity"
    assert list(summary["results"]) == [s["name"] for s in summary["stages"]] and len(summary["stages"]) == 2
    for result in summary["results"].values():
        assert result["n"] == 12 and len(result["correct"]) == 12
        assert result["acc"] == pytest.approx(np.mean(result["correct"]))
    answers = {e.prompt: e.answer for e in D.synthetic_split(200, 12, 0, "parity")[1]}  # the run's test set
    for result in summary["results"].values():
        kept = result.get("responses", result.get("samples"))  # the responses kept with the scores
        assert kept and all(r["reference"] == answers[r["prompt"]] for r in kept)
    assert any("val_acc" in row for row in summary["log"])


def test_experiment_accepts_the_parity_task():
    cfg, _ = E.parse_args(["--task", "parity", "--arms", "sft_tag"])
    assert cfg.task == "parity" and E.arm_config(cfg, "sftkey_tag").task == "parity"


@pytest.mark.parametrize("flags, fragment", [
    (["--task", "parity", "--data", "x.jsonl", "--eval_data", "y.jsonl"], "--task parity"),
    (["--task", "parity", "--data", "x.jsonl"], "--task parity"),
    (["--task", "nope"], "--task nope: unknown"),
])
def test_bad_task_flags_are_one_line_errors(tmp_path, capsys, flags, fragment):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, *flags, "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
