"""Answers on validation prompts during training (--val_acc_n): drift as it happens, not only losses.

Specified: at every --eval_interval step (0, k, 2k, ..., and the stage's last step) the validation row
also holds `val_acc` and `val_fmt`, greedy Acc and Fmt on the first N validation prompts
(`train.evaluate` on `val_set.examples[:N]` with `val_set.enc`) of the model at that step; N = 0 turns
them off (the row then has only the losses). Greedy generation draws no random numbers, so validating
changes nothing about training, dropout included. The experiment's loss_log rows carry them.
"""
import json
import sys

import pytest
import torch

import data as D
import experiment as E
import sftkey
import train
from conftest import config, tiny_model


def _val_rows(log):
    return [row for row in log if "val_key" in row]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Where the rows are, and what they hold

@pytest.mark.parametrize("iters, interval, steps", [(8, 3, [0, 3, 6, 7]), (7, 3, [0, 3, 6]), (5, 1000, [0, 4])])
def test_validation_rows_at_every_interval_step_and_the_last_with_answers(tokenized, iters, interval, steps):
    log = []
    train.train(tiny_model(), tokenized, tokenized, config(eval_interval=interval, val_acc_n=5),
                sftkey.Stage("test", (0.0, 1.0, 1.0), iters, 1e-2), "cpu", torch.float32, log)
    rows = _val_rows(log)
    assert [row["step"] for row in rows] == steps
    for row in rows:
        assert set(row) >= {"val_thinking", "val_key", "val_acc", "val_fmt"}
        assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["val_fmt"] <= 1.0
        assert row["val_acc"] * 5 == pytest.approx(round(row["val_acc"] * 5))  # a share of 5 prompts


def test_val_acc_n_zero_leaves_only_the_losses(tokenized):
    log = []
    train.train(tiny_model(), tokenized, tokenized, config(eval_interval=3, val_acc_n=0),
                sftkey.Stage("test", (0.0, 1.0, 1.0), 7, 1e-2), "cpu", torch.float32, log)
    rows = _val_rows(log)
    assert [row["step"] for row in rows] == [0, 3, 6]
    assert all("val_acc" not in row and "val_fmt" not in row for row in rows)


def test_each_row_reports_evaluate_on_the_first_n_validation_prompts_of_the_model_at_that_step(tokenized,
                                                                                                monkeypatch):
    """train.evaluate is called at each validation step with val_set.examples[:N] and val_set.enc, on the
    weights after that step's update, and the row holds exactly its acc and fmt (each call returns different
    made-up scores here, so a swap, a stale or a reused result shows)."""
    calls = []

    def spy(model, enc, examples, cfg, device, dtype, dist):
        calls.append({"enc": enc, "examples": list(examples), "weights": _weights(model), "training": model.training})
        k = len(calls)
        return {"acc": k / 10, "fmt": 1 - k / 20, "composite": 0.0, "n": len(examples), "correct": [],
                "formatted": [], "responses": []}
    monkeypatch.setattr(train, "evaluate", spy)
    model, log, n = tiny_model(), [], 6
    val = D.TokenizedSet(tokenized.examples[10:30], tokenized.ids[10:30], tokenized.roles[10:30], {}, tokenized.enc)
    train.train(model, tokenized, val, config(eval_interval=2, val_acc_n=n),
                sftkey.Stage("test", (0.0, 1.0, 1.0), 5, 1e-2), "cpu", torch.float32, log)
    rows = _val_rows(log)
    assert [row["step"] for row in rows] == [0, 2, 4] and len(calls) == 3
    assert [(row["val_acc"], row["val_fmt"]) for row in rows] == [(k / 10, 1 - k / 20) for k in (1, 2, 3)]
    for call in calls:
        assert call["enc"] is val.enc and call["examples"] == tokenized.examples[10:10 + n]  # validation's, not train's
    final = _weights(model)
    assert all(torch.equal(calls[-1]["weights"][k], final[k]) for k in final)  # after the last step's update
    assert not all(torch.equal(calls[0]["weights"][k], calls[1]["weights"][k]) for k in final)


def test_the_last_rows_val_acc_is_a_fresh_evaluate_of_the_final_model(tokenized):
    model, log, n = tiny_model(dropout=0.1), [], 7
    cfg = config(eval_interval=3, val_acc_n=n)
    train.train(model, tokenized, tokenized, cfg, sftkey.Stage("test", (0.0, 1.0, 1.0), 6, 1e-2), "cpu", torch.float32,
                log)
    fresh = train.evaluate(model, tokenized.enc, tokenized.examples[:n], cfg, "cpu", torch.float32)
    last = _val_rows(log)[-1]
    assert last["step"] == 5 and (last["val_acc"], last["val_fmt"]) == (fresh["acc"], fresh["fmt"])


def test_a_val_acc_n_beyond_the_validation_set_uses_all_of_it(tokenized, monkeypatch):
    seen = []
    real = train.evaluate

    def spy(model, enc, examples, *args):
        seen.append(len(examples))
        return real(model, enc, examples, *args)
    monkeypatch.setattr(train, "evaluate", spy)
    val = D.TokenizedSet(tokenized.examples[:4], tokenized.ids[:4], tokenized.roles[:4], {}, tokenized.enc)
    train.train(tiny_model(), tokenized, val, config(val_acc_n=100), sftkey.Stage("test", (0.0, 1.0, 1.0), 2, 1e-2),
                "cpu", torch.float32, [])
    assert seen == [4, 4]  # steps 0 and 1 (the last)


def test_val_acc_n_is_a_flag_defaulting_to_100_and_negative_is_refused(tmp_path, capsys):
    assert train.TrainConfig().val_acc_n == 100 and train.parse_args(["--val_acc_n", "0"]).val_acc_n == 0
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--val_acc_n", "-1", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--val_acc_n" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Validating changes nothing about training

def test_validation_answers_do_not_change_training_with_dropout(tokenized):
    """Weights after training, the loss rows and the RNG state afterwards are bitwise the same with val_acc_n
    0 and 5 (validation at every other step, dropout 0.1: a random draw in generation would shift every mask)."""
    def trained(val_acc_n):
        torch.manual_seed(123)
        model, log = tiny_model(seed=4, dropout=0.1), []
        torch.manual_seed(99)
        train.train(model, tokenized, tokenized, config(eval_interval=2, val_acc_n=val_acc_n),
                    sftkey.Stage("test", (0.0, 1.0, 1.0), 7, 1e-2), "cpu", torch.float32, log)
        losses = [(row["step"], row["loss"]) for row in log if "loss" in row]
        val_losses = [(row["step"], row["val_thinking"], row["val_key"]) for row in _val_rows(log)]
        return _weights(model), losses, val_losses, torch.get_rng_state(), model.training
    off, on = trained(0), trained(5)
    assert all(torch.equal(off[0][k], on[0][k]) for k in off[0])
    assert off[1] == on[1] and off[2] == on[2]
    assert torch.equal(off[3], on[3])  # the next stage draws the same dropout masks too
    # and dropout did act: another seed trains other weights
    torch.manual_seed(98)
    model = tiny_model(seed=4, dropout=0.1)
    torch.manual_seed(98)
    train.train(model, tokenized, tokenized, config(eval_interval=2, val_acc_n=0),
                sftkey.Stage("test", (0.0, 1.0, 1.0), 7, 1e-2), "cpu", torch.float32, [])
    assert not all(torch.equal(off[0][k], v) for k, v in _weights(model).items())


def test_the_model_is_back_in_training_mode_after_validating(tokenized, monkeypatch):
    """evaluate puts the model in eval mode; the next step's forward must run with dropout on again."""
    modes, forward = [], type(tiny_model()).forward

    def recording(self, *args, **kwargs):
        if torch.is_grad_enabled():
            modes.append(self.training)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(type(tiny_model()), "forward", recording)
    train.train(tiny_model(dropout=0.1), tokenized, tokenized, config(eval_interval=1, val_acc_n=3),
                sftkey.Stage("test", (0.0, 1.0, 1.0), 4, 1e-2), "cpu", torch.float32, [])
    assert modes == [True] * 4


# ---------------------------------------------------------------------------------------------
# In the experiment

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_train", "200",
        "--n_val", "20", "--n_test", "4", "--block_size", "96", "--e1", "4", "--e2", "2", "--warmup_iters", "1",
        "--eval_interval", "2", "--log_interval", "100", "--device", "cpu", "--n_boot", "20", "--seeds", "1"]


def test_the_experiments_loss_log_carries_val_acc_and_each_result_the_last(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    E.main([*TINY, "--arms", "sft_tag,sftkey_tag", "--val_acc_n", "3", "--out_dir", str(tmp_path)])
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "results.json").read_text())
    for arm, steps in (("sft_tag", [0, 2, 3]), ("sftkey_tag", [0, 2, 3, 4, 5])):
        val = [r for r in rows if r["arm"] == arm and "val_key" in r]
        assert [r["global_step"] for r in val] == steps, arm
        assert all("val_acc" in r and "val_fmt" in r and r["val_acc"] * 3 == pytest.approx(round(r["val_acc"] * 3))
                   for r in val)
        (result,) = summary["results"][arm]
        assert result["val_acc"] == val[-1]["val_acc"]
        assert summary["aggregates"][arm]["val_acc"] == {"mean": result["val_acc"], "std": None}
    assert summary["config"]["val_acc_n"] == 3


def test_the_experiment_without_val_acc_logs_and_reports_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    E.main([*TINY, "--arms", "sftkey_tag", "--val_acc_n", "0", "--out_dir", str(tmp_path)])
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert any("val_key" in r for r in rows) and not any("val_acc" in r for r in rows)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["results"]["sftkey_tag"][0]["val_acc"] is None
    assert summary["aggregates"]["sftkey_tag"]["val_acc"] == {"mean": None, "std": None}
    assert not summary["picked"]
    text = (tmp_path / "results.md").read_text()
    assert "Picked" not in text
    line = next(line for line in text.splitlines() if line.startswith("| sftkey_tag |"))
    assert line.split(" | ")[5] == "-"  # the val Acc column


def test_a_sweep_without_val_acc_is_refused_or_reports_no_pick(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    try:
        E.main([*TINY, "--arms", "sftkey_tag", "--val_acc_n", "0", "--stage2_lrs", "1e-4,1e-3", "--out_dir",
                str(tmp_path)])
    except SystemExit as exit_info:  # refusing the sweep (nothing to pick with) is a fine answer
        assert exit_info.code == 2 and "--val_acc_n" in capsys.readouterr().err
        return
    capsys.readouterr()
    summary = json.loads((tmp_path / "results.json").read_text())
    assert all(r["val_acc"] is None for runs in summary["results"].values() for r in runs)
    assert not any("best vs best" in k for k in summary["comparisons"])
    assert "-> None" not in (tmp_path / "results.md").read_text()
