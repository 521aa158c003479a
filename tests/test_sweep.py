"""The stage-2 learning-rate sweep of experiment.py (--stage2_lrs) and the selection of its settings.

Specified: `--stage2_lrs 1e-5,1e-4` trains each SWEPT arm (sftkey_tag, sftsft_tag) at every setting as a
variant `variant(arm, lr)` (e.g. sftkey_tag.lr1e-05); every variant continues the one stage 1 of its seed
(trained once, kept in memory) with its own stage-2 peak lr and the data stream read on after stage 1.
`pick` chooses each swept arm's setting by validation Acc (mean over seeds, at the last step), never by
the test set; `compare` adds per-lr pairs and the two picked settings against each other (best vs best).
The fakes below stand in for train.train / train.evaluate (the pattern of test_experiment_stats.py);
miniature real runs at the end check the files a sweep writes.
"""
import dataclasses
import json
import sys
import types

import numpy as np
import pytest
import torch

import checkpoints
import data as D
import experiment as E
import train
from conftest import stage_fields

E1, E2 = 3, 2
SWEEP = ["--arms", "sft_tag,sftkey_tag,sftsft_tag", "--stage2_lrs", "1e-5,1e-4"]
NAMES = ["sft_tag", "sftkey_tag.lr1e-05", "sftkey_tag.lr0.0001", "sftsft_tag.lr1e-05", "sftsft_tag.lr0.0001"]
CODE = {"sft_tag": 2, "sftkey_tag": 8, "sftsft_tag": 16}  # per stage: the mark added to the weights, seconds taken
VAL_ACC = {("sftkey_tag", 1e-5): 0.8, ("sftkey_tag", 1e-4): 0.3,  # the last validation Acc a fake stage reports
           ("sftsft_tag", 1e-5): 0.2, ("sftsft_tag", 1e-4): 0.7}


@pytest.fixture(scope="module")
def enc():
    return D.get_encoding(D.SYNTHETIC_ENCODING)


@pytest.fixture
def cfg(tmp_path):
    cfg, _ = E.parse_args(["--out_dir", str(tmp_path), "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
                           "--block_size", "64", "--n_train", "100", "--n_val", "10", "--n_test", "4",
                           "--e1", str(E1), "--e2", str(E2), "--batch_size", "8", "--warmup_iters", "1",
                           "--device", "cpu", "--seed", "11", *SWEEP])
    return cfg


def _fingerprint(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


@pytest.fixture
def fakes(monkeypatch):
    """train.train adds CODE[stage] to every weight, advances a fake clock by CODE[stage] seconds and logs a
    validation row per step whose val_acc is 0.05 until the last step, then VAL_ACC[stage, lr] (0.5 for
    stage 1); train.evaluate returns fixed scores. Both record what they were given."""
    calls, evals, clock = [], [], [1000.0]

    def fake_train(**kw):
        kw = stage_fields(kw)
        calls.append({**kw, "start": _fingerprint(kw["model"])})
        with torch.no_grad():
            for p in kw["model"].parameters():
                p.add_(CODE[kw["stage"]])
        calls[-1]["end"] = _fingerprint(kw["model"])
        last = VAL_ACC.get((kw["stage"], kw["peak_lr"]), 0.5)
        kw["log"] += [{"stage": kw["stage"], "step": s, "val_thinking": 1.0, "val_key": 2.0,
                       "val_acc": last if s + 1 == kw["iters"] else 0.05, "val_fmt": 1.0} for s in range(kw["iters"])]
        clock[0] += CODE[kw["stage"]]
        return None

    def fake_evaluate(model, enc, examples, cfg, device, dtype):
        evals.append({"weights": _fingerprint(model), "n": len(examples)})
        n = len(examples)  # one score and one response per problem, as train.evaluate gives
        return {"acc": 0.5, "fmt": 1.0, "composite": 0.65, "n": n, "correct": [i % 2 == 0 for i in range(n)],
                "formatted": [True] * n, "responses": [{"response": ""}] * n}

    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    monkeypatch.setattr(E, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(E, "plot", lambda *args: [])
    return types.SimpleNamespace(calls=calls, evals=evals)


def _run_seed(cfg, enc, names):
    out = []
    E.run_seed(cfg, names, enc, "cpu", torch.float32, lambda *args: out.append(args))
    return out


# ---------------------------------------------------------------------------------------------
# The command line

def test_a_sweep_expands_each_swept_arm_into_one_variant_per_lr_in_arm_then_given_order():
    """Arms in ARM_NAMES order (whatever --arms says), each swept arm's variants in the order the lrs were
    given; the unswept sft_tag stays as it is."""
    cfg, own = E.parse_args(SWEEP)
    assert own["names"] == NAMES
    _, own = E.parse_args(["--arms", "sftsft_tag,sftkey_tag,sft_tag", "--stage2_lrs", "1e-4,1e-5"])
    assert own["names"] == ["sft_tag", "sftkey_tag.lr0.0001", "sftkey_tag.lr1e-05",
                            "sftsft_tag.lr0.0001", "sftsft_tag.lr1e-05"]
    _, own = E.parse_args(["--arms", "sftkey_tag,sftsft_tag,weighted", "--stage2_lrs", "1e-5,3e-5,1e-4"])
    assert own["names"] == ["sftkey_tag.lr1e-05", "sftkey_tag.lr3e-05", "sftkey_tag.lr0.0001",
                            "sftsft_tag.lr1e-05", "sftsft_tag.lr3e-05", "sftsft_tag.lr0.0001", "weighted"]
    assert E.variant("sftkey_tag", 1e-5) == "sftkey_tag.lr1e-05"
    # without a sweep the arms keep their plain names
    assert E.parse_args(["--arms", "sft_tag,sftkey_tag"])[1]["names"] == ["sft_tag", "sftkey_tag"]


def test_each_variant_is_its_arm_with_its_own_stage2_lr_and_nothing_else_changed():
    cfg, own = E.parse_args([*SWEEP, "--lr", "2e-3"])
    for name in own["names"]:
        arm, _, lr = name.partition(".lr")
        got, plain = E.arm_config(cfg, name), E.arm_config(cfg, arm)
        assert got == (dataclasses.replace(plain, stage2_lr=float(lr)) if lr else plain), name
        stages, plain_stages = E.arm_stages(cfg, name), E.arm_stages(cfg, arm)
        assert stages[0] == plain_stages[0] == E.arm_stages(cfg, "sft_tag")[0]  # the one stage 1
        if lr:
            assert stages[1] == dataclasses.replace(plain_stages[1], lr=float(lr))
    assert E.arm_stages(cfg, "sftkey_tag.lr1e-05")[1].lr == 1e-5
    assert E.arm_stages(cfg, "sftsft_tag.lr0.0001")[1].lr == 1e-4


@pytest.mark.parametrize("flags", [["--stage2_lrs", "1e-5,1e-5"], ["--stage2_lrs", "abc"], ["--stage2_lrs", "0"],
                                   ["--stage2_lrs", "1e-5,0"], ["--stage2_lrs", "1e-5,-1e-4"],
                                   ["--stage2_lrs", "inf"], ["--stage2_lrs", "nan"], ["--stage2_lrs", "1e-5,,x"],
                                   ["--stage2_lrs", ","], ["--stage2_lrs", "1e-5,"],  # neither is "no sweep"
                                   ["--stage2_lrs", "1e-5,1e-4", "--stage2_lr", "1e-4"]])
def test_bad_sweeps_are_refused(flags):
    with pytest.raises(ValueError, match="--stage2_lrs"):
        E.parse_args(["--arms", "sft_tag,sftkey_tag,sftsft_tag", *flags])


def test_a_bad_sweep_is_a_one_line_error_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--arms", "sftkey_tag", "--stage2_lrs", "1e-5,1e-5", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: --stage2_lrs") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_distinct_lrs_that_agree_to_six_digits_are_refused_or_kept_apart():
    try:
        cfg, own = E.parse_args(["--arms", "sftkey_tag", "--stage2_lrs", "1e-4,1.0000001e-4"])
    except ValueError:
        return  # refusing them is fine
    assert len(set(own["names"])) == len(own["names"]) == 2


def test_a_variant_trains_at_exactly_the_lr_given():
    cfg, own = E.parse_args(["--arms", "sftkey_tag", "--stage2_lrs", "1.2345678e-4"])
    assert [E.arm_config(cfg, n).stage2_lr for n in own["names"]] == [1.2345678e-4]


# ---------------------------------------------------------------------------------------------
# run_seed: one stage 1 per seed, each variant's stage 2 at its lr from it

def test_every_variant_continues_the_one_stage_1_at_its_own_lr_reading_on_after_it(cfg, enc, fakes):
    out = _run_seed(cfg, enc, NAMES)
    stages = [(c["stage"], c["peak_lr"]) for c in fakes.calls]
    assert stages == [("sft_tag", cfg.lr), ("sftkey_tag", 1e-5), ("sftkey_tag", 1e-4),
                      ("sftsft_tag", 1e-5), ("sftsft_tag", 1e-4)]  # stage 1 trained once, for all five
    first, children = fakes.calls[0], fakes.calls[1:]
    assert (first["steps_before"], first["iters"]) == (0, E1)
    torch.manual_seed(cfg.seed)
    assert torch.equal(first["start"], _fingerprint(checkpoints.build_model(cfg, enc, "cpu")))
    for c in children:
        assert torch.equal(c["start"], first["end"]), c["stage"]  # exactly stage 1's weights, not a sibling's
        assert (c["steps_before"], c["iters"]) == (E1, E2)  # the data stream read on after stage 1
        assert c["cfg"].stage2_lr == c["peak_lr"] and c["cfg"].seed == cfg.seed
        assert c["weights"] == ((0.0, 0.0, 1.0) if c["stage"] == "sftkey_tag" else (0.0, 1.0, 1.0))
    # each is evaluated with its own final weights; timings count the shared stage 1 and its own stage 2
    results = {name: r for name, r, _ in out}
    assert [name for name, _, _ in out] == NAMES
    for e, name in zip(fakes.evals, NAMES):
        arm = name.partition(".lr")[0]
        assert torch.allclose(e["weights"], first["start"] + CODE["sft_tag"] + (CODE[arm] if arm != "sft_tag" else 0))
        assert results[name]["train_seconds"] == CODE["sft_tag"] + (CODE[arm] if arm != "sft_tag" else 0)
        assert results[name]["steps"] == E1 + (E2 if arm != "sft_tag" else 0)


def test_a_variants_val_acc_is_the_last_validation_row_of_its_own_last_stage(cfg, enc, fakes):
    out = _run_seed(cfg, enc, NAMES)
    for name, result, rows in out:
        arm, _, lr = name.partition(".lr")
        assert result["val_acc"] == (VAL_ACC[arm, float(lr)] if lr else 0.5), name
        assert result["val_acc"] == [r for r in rows if "val_acc" in r][-1]["val_acc"]
        # the rows of a variant: stage 1's (shared) then its own, at global steps that continue
        assert [r["global_step"] for r in rows] == list(range(E1 + (E2 if lr else 0)))
        assert all(r["arm"] == name for r in rows)


def test_the_experiment_trains_stage_1_once_per_seed_and_picks_by_validation(cfg, fakes):
    summary = E.run_experiment(cfg, NAMES, n_seeds=2, n_boot=50)
    seeds = [cfg.seed, cfg.seed + 1]
    assert [(c["cfg"].seed, c["stage"], c["peak_lr"]) for c in fakes.calls] == [
        (s, stage, lr) for s in seeds for stage, lr in [("sft_tag", cfg.lr), ("sftkey_tag", 1e-5),
                                                         ("sftkey_tag", 1e-4), ("sftsft_tag", 1e-5),
                                                         ("sftsft_tag", 1e-4)]]
    assert list(summary["results"]) == NAMES
    assert summary["picked"] == {"sftkey_tag": "sftkey_tag.lr1e-05", "sftsft_tag": "sftsft_tag.lr0.0001"}
    assert "sftkey_tag.lr1e-05 - sftsft_tag.lr0.0001 (best vs best)" in summary["comparisons"]
    assert {"sftkey_tag.lr1e-05 - sftsft_tag.lr1e-05",
            "sftkey_tag.lr0.0001 - sftsft_tag.lr0.0001"} <= set(summary["comparisons"])
    assert summary["aggregates"]["sftkey_tag.lr1e-05"]["val_acc"] == {"mean": 0.8, "std": 0.0}


# ---------------------------------------------------------------------------------------------
# pick and compare on hand-made results: validation chooses, the test set never does

SEEDS = (5, 6, 7)


def _result(seed, correct, val_acc, formatted=None):
    correct = [bool(c) for c in correct]
    formatted = [True] * len(correct) if formatted is None else [bool(f) for f in formatted]
    acc, fmt = float(np.mean(correct)), float(np.mean(formatted))
    return {"seed": seed, "acc": acc, "fmt": fmt, "composite": 0.7 * acc + 0.3 * fmt, "n": len(correct),
            "correct": correct, "formatted": formatted, "samples": [], "steps": 5, "train_seconds": 1.0,
            "last_stage_seconds": 1.0, "val_acc": val_acc}


def _opposed(rng_seed=0, n_items=40):
    """Each swept arm at lrs 1e-5 and 1e-4: validation prefers one setting, the test set the other by far."""
    rng = np.random.default_rng(rng_seed)
    spec = {  # name: (test accuracy rate, val_acc per seed)
        "sftkey_tag.lr1e-05": (0.15, [0.7, 0.6, 0.65]), "sftkey_tag.lr0.0001": (0.85, [0.3, 0.35, 0.2]),
        "sftsft_tag.lr1e-05": (0.9, [0.1, 0.2, 0.15]), "sftsft_tag.lr0.0001": (0.1, [0.5, 0.45, 0.55]),
        "sft_tag": (0.5, [0.4, 0.4, 0.4])}
    return {name: [_result(s, rng.random(n_items) < rate, v) for s, v in zip(SEEDS, vals)]
            for name, (rate, vals) in spec.items()}


def _by_test(results, arm):
    """What a selection on the test set would choose."""
    return max((n for n in results if n.startswith(arm + ".lr")),
               key=lambda n: np.mean([r["acc"] for r in results[n]]))


def test_pick_follows_validation_acc_where_the_test_set_ranks_the_other_way():
    results = _opposed()
    assert E.pick(results, "sftkey_tag") == "sftkey_tag.lr1e-05"
    assert E.pick(results, "sftsft_tag") == "sftsft_tag.lr0.0001"
    # the design: the test set would pick the other setting of each arm
    assert _by_test(results, "sftkey_tag") == "sftkey_tag.lr0.0001"
    assert _by_test(results, "sftsft_tag") == "sftsft_tag.lr1e-05"


def test_pick_does_not_move_when_only_test_scores_change():
    results = _opposed()
    before = {arm: E.pick(results, arm) for arm in E.SWEPT}
    for name, runs in results.items():  # the picked settings now score 0 on the test set, the others 1
        picked = name in before.values()
        for r in runs:
            r["correct"] = [not picked] * len(r["correct"])
            r["acc"] = r["composite"] = float(not picked)
    assert {arm: E.pick(results, arm) for arm in E.SWEPT} == before
    # while validation moves it
    for r in results["sftkey_tag.lr0.0001"]:
        r["val_acc"] = 0.99
    assert E.pick(results, "sftkey_tag") == "sftkey_tag.lr0.0001"


def test_pick_takes_the_mean_over_seeds_and_the_first_listed_on_a_tie():
    # lr1e-05: one seed far ahead, mean 0.5; lr0.0001: steady 0.6 -> the mean picks lr0.0001
    results = {"sftkey_tag.lr1e-05": [_result(s, [1, 0], v) for s, v in zip(SEEDS, [0.95, 0.3, 0.25])],
               "sftkey_tag.lr0.0001": [_result(s, [1, 0], 0.6) for s in SEEDS]}
    assert E.pick(results, "sftkey_tag") == "sftkey_tag.lr0.0001"
    tie = {"sftsft_tag.lr0.0001": [_result(s, [1, 0], 0.5) for s in SEEDS],
           "sftsft_tag.lr1e-05": [_result(s, [1, 0], 0.5) for s in SEEDS]}
    assert E.pick(tie, "sftsft_tag") == "sftsft_tag.lr0.0001"
    # found in review, the parity sweep's control: 530 of 600 both, whose float means differ in the last bit
    real_tie = {"sftsft_tag.lr0.0001": [_result(s, [1, 0], v) for s, v in zip(SEEDS, [0.79, 0.945, 0.915])],
                "sftsft_tag.lr0.0003": [_result(s, [1, 0], v) for s, v in zip(SEEDS, [0.81, 0.93, 0.91])]}
    assert np.mean([0.79, 0.945, 0.915]) != np.mean([0.81, 0.93, 0.91])  # what made the tie look broken
    assert E.pick(real_tie, "sftsft_tag") == "sftsft_tag.lr0.0001"
    # found in review: rounding the means would split this tie (1280 prompts, 4 seeds: 3823 of 5120 both)
    seeds4 = (*SEEDS, 8)
    tie_1280 = {"sftsft_tag.lr0.0001": [_result(s, [1, 0], k / 1280) for s, k in zip(seeds4, (650, 838, 1101, 1234))],
                "sftsft_tag.lr0.0003": [_result(s, [1, 0], k / 1280) for s, k in zip(seeds4, (667, 948, 1055, 1153))]}
    assert E.pick(tie_1280, "sftsft_tag") == "sftsft_tag.lr0.0001"
    # only variants of the arm asked for; no variant (or no validation Acc) -> None
    assert E.pick(results, "sftsft_tag") is None
    assert E.pick({"sftkey_tag": [_result(5, [1], 0.9)]}, "sftkey_tag") is None  # not a sweep
    no_val = {n: [dict(r, val_acc=None) for r in runs] for n, runs in results.items()}
    assert E.pick(no_val, "sftkey_tag") is None


def test_compare_pairs_the_settings_lr_by_lr_and_the_two_picked_ones():
    results = _opposed()
    got = E.compare(results, n_boot=100, seed=3)
    best = "sftkey_tag.lr1e-05 - sftsft_tag.lr0.0001 (best vs best)"
    assert set(got) == {"sftkey_tag.lr1e-05 - sftsft_tag.lr1e-05", "sftkey_tag.lr0.0001 - sftsft_tag.lr0.0001", best,
                        "sftkey_tag.lr1e-05 - sft_tag"}  # the picked method against stage 1 too
    pairs = {best: ("sftkey_tag.lr1e-05", "sftsft_tag.lr0.0001"),
             "sftkey_tag.lr1e-05 - sftsft_tag.lr1e-05": ("sftkey_tag.lr1e-05", "sftsft_tag.lr1e-05"),
             "sftkey_tag.lr0.0001 - sftsft_tag.lr0.0001": ("sftkey_tag.lr0.0001", "sftsft_tag.lr0.0001")}
    for key, (a, b) in pairs.items():
        sa = np.array([r["correct"] for r in results[a]], dtype=float)
        sb = np.array([r["correct"] for r in results[b]], dtype=float)
        assert got[key]["acc"] == E.paired_comparison(sa, sb, n_boot=100, seed=3), key
    # the picked pair is by validation: the test-set choice would be lr0.0001 - lr1e-05, which is absent
    assert not any(k.startswith("sftkey_tag.lr0.0001 - sftsft_tag.lr1e-05") for k in got)


def test_compare_labels_the_lr_pair_best_vs_best_when_both_picks_share_an_lr():
    results = _opposed()
    for r in results["sftsft_tag.lr1e-05"]:
        r["val_acc"] = 0.9  # now both arms pick lr1e-05
    got = E.compare(results, n_boot=50, seed=0)
    assert set(got) == {"sftkey_tag.lr1e-05 - sftsft_tag.lr1e-05 (best vs best)",
                        "sftkey_tag.lr0.0001 - sftsft_tag.lr0.0001", "sftkey_tag.lr1e-05 - sft_tag"}


def test_compare_leaves_out_lrs_that_miss_a_seed_and_the_best_pair_without_validation():
    results = _opposed()
    results["sftsft_tag.lr0.0001"] = results["sftsft_tag.lr0.0001"][:2]  # a seed short
    got = E.compare(results, n_boot=50, seed=0)
    assert "sftkey_tag.lr0.0001 - sftsft_tag.lr0.0001" not in got
    no_val = {n: [dict(r, val_acc=None) for r in runs] for n, runs in _opposed().items()}
    assert not any("best vs best" in k for k in E.compare(no_val, n_boot=50, seed=0))


def test_markdown_says_which_settings_were_picked():
    results = _opposed()
    cfg = train.TrainConfig(max_iters=5, stage2_iters=2)
    recorder = E.Recorder(cfg, list(results), list(SEEDS), n_boot=50)
    recorder.results = results
    summary = recorder.summary(complete=True)
    assert summary["picked"] == {"sftkey_tag": "sftkey_tag.lr1e-05", "sftsft_tag": "sftsft_tag.lr0.0001"}
    text = E.markdown(summary)
    assert ("Picked by validation Acc (never the test set): sftkey_tag -> sftkey_tag.lr1e-05, "
            "sftsft_tag -> sftsft_tag.lr0.0001") in text
    assert "| sftkey_tag.lr1e-05 - sftsft_tag.lr0.0001 (best vs best) |" in text
    assert summary["arms"]["sftkey_tag.lr1e-05"]["about"].endswith("stage-2 peak lr 1e-05")


def test_markdown_says_a_pick_was_a_tie_and_how_many_seeds_each_row_has():
    """Found by trying: every validation Acc 0 read as a pick of the first lr; an incomplete run said "over 3 seeds"
    of rows that held one."""
    results = _opposed()
    for r in results["sftsft_tag.lr1e-05"]:
        r["val_acc"] = 0.5  # lr0.0001's mean: a tie, which pick gives to the first listed
    recorder = E.Recorder(train.TrainConfig(max_iters=5, stage2_iters=2), list(results), list(SEEDS), n_boot=50)
    recorder.results = results
    text = E.markdown(recorder.summary(complete=True))
    assert ("sftkey_tag -> sftkey_tag.lr1e-05, sftsft_tag -> sftsft_tag.lr1e-05 (tied with another lr: the first "
            "listed)") in text and f"over {len(SEEDS)} seed(s)" in text
    recorder.results = {**results, "sft_tag": results["sft_tag"][:1]}  # stopped before the other seeds
    assert f"over 1/{len(SEEDS)} seed(s)" in E.markdown(recorder.summary(complete=False))


def test_the_header_of_a_sweep_does_not_name_a_stage2_lr_no_variant_used():
    results = _opposed()
    cfg, own = E.parse_args(["--arms", "sftkey_tag,sftsft_tag", "--stage2_lrs", "1e-5,1e-4", "--lr", "1e-2"])
    recorder = E.Recorder(cfg, own["names"], list(SEEDS), n_boot=50)
    recorder.results = {n: results[n] for n in own["names"]}
    header = E.markdown(recorder.summary(complete=True)).splitlines()[0]
    assert "stage 2: 0.001" not in header  # 1e-2 x 0.1: the lr of none of the four variants


# ---------------------------------------------------------------------------------------------
# Miniature real runs

TINY = ["--n_train", "200", "--n_test", "20", "--n_val", "20", "--e1", "6", "--e2", "3", "--n_layer", "1",
        "--n_embd", "32", "--n_head", "2", "--block_size", "96", "--batch_size", "8", "--val_acc_n", "5",
        "--eval_interval", "3", "--n_boot", "50", "--warmup_iters", "1", "--log_interval", "100", "--device", "cpu"]


def test_a_miniature_sweep_writes_every_variant_the_picks_and_the_best_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    E.main([*TINY, "--arms", "sft_tag,sftkey_tag,sftsft_tag,sftdft_tag", "--seeds", "2", "--stage2_lrs", "1e-4,1e-3",
            "--out_dir", str(tmp_path)])
    assert "-> sftdft_tag (weights 0,1,1 x probability (DFT), 3 steps, peak lr 0.001)" in capsys.readouterr().out
    names = ["sft_tag", "sftkey_tag.lr0.0001", "sftkey_tag.lr0.001", "sftsft_tag.lr0.0001", "sftsft_tag.lr0.001",
             "sftdft_tag.lr0.0001", "sftdft_tag.lr0.001"]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["complete"] and list(summary["results"]) == names == list(summary["aggregates"])
    assert [s["lr"] for s in summary["arms"]["sftkey_tag.lr0.001"]["stages"]] == [summary["config"]["lr"], 1e-3]
    assert summary["arms"]["sftsft_tag.lr0.0001"]["stages"][1]["lr"] == 1e-4
    rows = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    for name in names:
        runs = summary["results"][name]
        assert [r["seed"] for r in runs] == summary["seeds"]
        for r in runs:
            val = [row for row in rows if row["arm"] == name and row["seed"] == r["seed"] and "val_key" in row]
            # at the interval (3) and each stage's last step; stage 2 continues at global step 6
            expected = [0, 3, 5] + ([6, 8] if ".lr" in name else [])
            assert [row["global_step"] for row in val] == expected, name
            assert all(row["val_acc"] * 5 == pytest.approx(round(row["val_acc"] * 5)) for row in val)  # of 5 prompts
            assert all(0 <= row["val_fmt"] <= 1 for row in val)
            assert r["val_acc"] == val[-1]["val_acc"]
            assert len(r["correct"]) == r["n"] == 20
        assert summary["aggregates"][name]["val_acc"]["mean"] == pytest.approx(np.mean([r["val_acc"] for r in runs]))
    # stage 1 trained once per seed: every variant's stage-1 rows are the same numbers
    for seed in summary["seeds"]:
        stage1 = {name: [(r["global_step"], r.get("loss"), r.get("val_key")) for r in rows
                         if r["arm"] == name and r["seed"] == seed and r["global_step"] < 6] for name in names}
        assert all(v == stage1["sft_tag"] for v in stage1.values())
    picked = summary["picked"]
    for arm in E.SWEPT:
        variants = [n for n in names if n.startswith(arm + ".lr")]
        means = [summary["aggregates"][n]["val_acc"]["mean"] for n in variants]
        assert picked[arm] == variants[int(np.argmax(means))]
    best = f"{picked['sftkey_tag']} - {picked['sftsft_tag']} (best vs best)"
    assert best in summary["comparisons"] and summary["comparisons"][best]["acc"]["n_seeds"] == 2
    for a, b in (("sftkey_tag", "sftdft_tag"), ("sftdft_tag", "sftsft_tag")):  # the DFT control, best against best
        assert f"{picked[a]} - {picked[b]} (best vs best)" in summary["comparisons"]
    for lr in ("0.0001", "0.001"):  # every comparison of two swept arms at every lr
        for a, b in (("sftkey_tag", "sftsft_tag"), ("sftkey_tag", "sftdft_tag"), ("sftdft_tag", "sftsft_tag")):
            key = f"{a}.lr{lr} - {b}.lr{lr}"
            assert key in summary["comparisons"] or f"{key} (best vs best)" in summary["comparisons"]
    text = (tmp_path / "results.md").read_text()
    assert all(f"| {n} |" in text for n in names)
    assert "Picked by validation Acc" in text and f"| {best} |" in text


def test_a_variant_trained_in_a_sweep_equals_its_arm_trained_alone_at_that_lr(tmp_path):
    """With dropout: the kept stage 1 restores the RNG, so sftkey_tag.lr0.001 of a sweep is sftkey_tag run alone
    with --stage2_lr 1e-3, bit for bit, whichever variants ran before it."""
    def final(folder, flags, arm):
        cfg, own = E.parse_args([*TINY, "--e1", "4", "--e2", "2", "--n_test", "2", "--val_acc_n", "1",
                                 "--seeds", "1", "--dropout", "0.1", "--save_ckpt", "--n_boot", "10",
                                 "--out_dir", str(tmp_path / folder), *flags])
        E.run_experiment(cfg, **own)
        return torch.load(tmp_path / folder / f"seed{cfg.seed}" / arm / "ckpt.pt", weights_only=True)["model"]
    swept = final("sweep", ["--arms", "sftkey_tag,sftsft_tag", "--stage2_lrs", "1e-4,1e-3"], "sftkey_tag.lr0.001")
    alone = final("alone", ["--arms", "sftkey_tag", "--stage2_lr", "1e-3"], "sftkey_tag")
    other = final("sweep", ["--arms", "sftkey_tag,sftsft_tag", "--stage2_lrs", "1e-4,1e-3", "--overwrite"],
                  "sftkey_tag.lr0.0001")
    assert all(torch.equal(swept[k], alone[k]) for k in alone)
    assert not all(torch.equal(other[k], alone[k]) for k in alone)  # the lr does matter


def test_the_conditioning_command_reports_per_seed_acc_and_its_std(tmp_path, monkeypatch, capsys):
    """`experiment.py --arms sft_tag --seeds 3`: how much Acc varies from seed to seed, the arm alone."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    E.main([*TINY, "--arms", "sft_tag", "--seeds", "3", "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "results.json").read_text())
    runs = summary["results"]["sft_tag"]
    assert list(summary["results"]) == ["sft_tag"] and [r["seed"] for r in runs] == summary["seeds"]
    assert len(set(summary["seeds"])) == 3
    for r in runs:
        assert r["acc"] == pytest.approx(np.mean(r["correct"])) and r["n"] == 20 and r["val_acc"] is not None
        assert f"seed {r['seed']} | sft_tag: Acc" in out
    accs = [r["acc"] for r in runs]
    assert summary["aggregates"]["sft_tag"]["acc"] == {"mean": pytest.approx(np.mean(accs)),
                                                       "std": pytest.approx(np.std(accs, ddof=1))}
    assert summary["comparisons"] == {} and not summary.get("picked")


def test_compare_pairs_only_arms_run_at_the_same_seeds():
    """Found in review: runs were paired by position, checking only their number; other seeds are not a pair."""
    same = {"sftkey_tag": [_result(s, [1, 0], None) for s in SEEDS], "sft_tag": [_result(s, [0, 0], None) for s in SEEDS]}
    assert list(E.compare(same, n_boot=50, seed=0)) == ["sftkey_tag - sft_tag"]
    other = dict(same, sft_tag=[_result(s, [0, 0], None) for s in (5, 6, 8)])
    assert E.compare(other, n_boot=50, seed=0) == {}
