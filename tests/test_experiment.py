"""The experiment (experiment.py): its arms, shared stages trained once, each arm's own data and records.

Arm definitions, shared prefixes trained once, each arm's data layout, log rows and seconds its
own, the paired bootstrap on inputs with a known answer, and miniature runs that write every output
(with and without matplotlib). The statistics on hand-made inputs are in test_experiment_stats.py.
"""
import copy
import dataclasses
import importlib.util
import inspect
import json
import sys
import time
import types

import numpy as np
import pytest
import torch

import data as D
import experiment as E
import runtime
import sftkey
import train
from conftest import for_data, stage_fields

E1, E2 = 6, 3
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_train", "300",
        "--n_val", "20", "--n_test", "6", "--block_size", "64", "--e1", str(E1), "--e2", str(E2), "--warmup_iters", "1",
        "--eval_interval", "2", "--log_interval", "100", "--device", "cpu", "--n_boot", "200", "--seeds", "2"]


def test_arms_have_the_intended_weights_schedules_and_shared_stages():
    cfg = train.TrainConfig(max_iters=10, stage2_iters=4, lr=1e-3, stage2_lr=3e-4, key_weight=5.0)
    full1 = sftkey.Stage("sft_tag", (0, 1, 1), 10, 1e-3)
    expected = {  # name: (tagged, stages as (name, weights, iters, lr))
        "sft": (False, [sftkey.Stage("sft", (0, 1, 1), 10, 1e-3)]),
        "sft_tag": (True, [full1]),
        "key_tag": (True, [sftkey.Stage("key_tag", (0, 0, 1), 10, 1e-3)]),
        "sftkey_tag": (True, [full1, sftkey.Stage("sftkey_tag", (0, 0, 1), 4, 3e-4)]),
        "sftsft_tag": (True, [full1, sftkey.Stage("sftsft_tag", (0, 1, 1), 4, 3e-4)]),
        "sftdft_tag": (True, [full1, sftkey.Stage("sftdft_tag", (0, 1, 1), 4, 3e-4, dft=True)]),
        "weighted": (True, [sftkey.Stage("w0-1-5_tag", (0, 1, 5), 14, 1e-3)]),
        "sft_tag_e1e2": (True, [sftkey.Stage("sft_tag", (0, 1, 1), 14, 1e-3)]),
    }
    assert set(expected) == set(E.ARM_NAMES) == set(E.ABOUT)
    for name, (tagged, stages) in expected.items():
        assert (not E.arm_config(cfg, name).untagged) == tagged, name
        assert E.arm_stages(cfg, name) == stages, name
    # compute matched: the method, its control and the weighted arm train equally long
    total = {n: sum(s.iters for s in E.arm_stages(cfg, n)) for n in E.ARM_NAMES}
    assert total["sftkey_tag"] == total["sftsft_tag"] == total["sftdft_tag"] == total["weighted"] == 14
    # the method's arm is train.py's default run
    assert E.arm_stages(cfg, "sftkey_tag") == train.plan_stages(dataclasses.replace(cfg, key_weight=1.0))
    with pytest.raises(ValueError, match="unknown arm"):
        E.arm_config(cfg, "sftkey")


def test_every_other_train_flag_reaches_every_arm():
    """Issue 17, item 11: a flag of train.py shows in experiment.py --help; it must not be ignored."""
    cfg = train.TrainConfig(dropout=0.25, batch_size=7, grad_clip=0.5, block_size=80, seed=9, weight_decay=0.0)
    for name in E.ARM_NAMES:
        arm = E.arm_config(cfg, name)
        assert (arm.dropout, arm.batch_size, arm.grad_clip, arm.block_size, arm.seed, arm.weight_decay) == \
            (0.25, 7, 0.5, 80, 9, 0.0), name


def test_command_line_aliases_and_refusals():
    cfg, own = E.parse_args(["--e1", "7", "--e2", "2", "--lam", "3", "--arms", "sft_tag, sftkey_tag"])
    assert (cfg.max_iters, cfg.stage2_iters, cfg.key_weight) == (7, 2, 3.0)
    assert own["names"] == ["sft_tag", "sftkey_tag"] and own["n_seeds"] == 3
    cfg, _ = E.parse_args([])
    assert cfg.key_weight == 5.0 and cfg.max_iters > cfg.stage2_iters > 0
    assert "(default: 5.0)" in E.build_parser().format_help()  # --help shows the experiment's own λ
    for flags in (["--resume"], ["--key_only"], ["--untagged"], ["--weights", "0,1,2"],
                  ["--stage2_weights", "0,1,1"]):
        with pytest.raises(ValueError, match=flags[0]):
            E.parse_args(flags)
    with pytest.raises(ValueError, match="unknown arm"):
        E.parse_args(["--arms", "sft_tag,sftkey"])
    with pytest.raises(ValueError, match="at least 1"):
        E.parse_args(["--seeds", "0"])
    for flags in (["--seeds", "1000000000000"], ["--n_boot", "1000000000000"]):  # found in review: a MemoryError
        with pytest.raises(ValueError, match=f"^{flags[0]} 1000000000000: at most 10*$"):
            E.parse_args(flags)
    assert E.parse_args(["--seeds", "1000", "--n_boot", "10000000"])[1]["n_seeds"] == 1000


@pytest.mark.parametrize("flags, problem", [(["--min_lr_ratio", "0"], "--stage2_lr 0 means --lr x --min_lr_ratio"),
                                            (["--data", "train.jsonl"], "--data needs --eval_data"),
                                            (["--n_test", "0"], "--n_test >= 1")])
def test_refused_before_any_arm_is_trained(tmp_path, capsys, flags, problem):
    """Issue 17, items 6 and 8: stage 2 at learning rate 0 (both children would train at lr 0), and --data
    without a test set (every arm was trained, then the statistics failed on no test items)."""
    with pytest.raises(SystemExit) as exit_info:
        E.main([*(for_data(TINY) if "--data" in flags else TINY), *flags, "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and problem in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_paired_comparison_known_answers():
    ones, zeros = np.ones((2, 50)), np.zeros((2, 50))
    c = E.paired_comparison(ones, zeros, n_boot=500)
    assert c["mean"] == 1.0 and c["ci_items"] == [1.0, 1.0] and c["per_seed"] == [1.0, 1.0]

    # Seed 0 gains on the items seed 1 loses: every item's seed-average is 0, so resampling the same
    # items for all seeds gives exactly 0 (independent resampling per seed would not).
    a = np.array([[1, 0] * 50, [0, 1] * 50], dtype=float)
    b = a[::-1]
    c = E.paired_comparison(a, b, n_boot=500)
    assert c["mean"] == 0.0 and c["ci_items"] == [0.0, 0.0] and c["per_seed"] == [0.0, 0.0]

    # One seed, 30% of 2000 items improved: mean 0.3, CI close to the normal 0.3 ± 1.96 sqrt(0.21/2000).
    n = 2000
    a = np.zeros((1, n))
    a[0, :600] = 1
    c = E.paired_comparison(a, np.zeros((1, n)), n_boot=4000, seed=1)
    half = 1.96 * np.sqrt(0.3 * 0.7 / n)
    assert c["mean"] == pytest.approx(0.3)
    assert c["ci_items"][0] == pytest.approx(0.3 - half, abs=0.2 * half)
    assert c["ci_items"][1] == pytest.approx(0.3 + half, abs=0.2 * half)
    # swapping the arms mirrors the answer; the seed makes it reproducible
    mirrored = E.paired_comparison(np.zeros((1, n)), a, n_boot=4000, seed=1)
    assert mirrored["mean"] == pytest.approx(-0.3)
    assert mirrored["ci_items"] == pytest.approx([-c["ci_items"][1], -c["ci_items"][0]])
    assert E.paired_comparison(a, np.zeros((1, n)), n_boot=4000, seed=1) == c

    with pytest.raises(ValueError, match="equal"):
        E.paired_comparison(np.zeros((2, 5)), np.zeros((2, 6)))


def _fingerprint(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def test_shared_prefix_is_trained_once_and_children_start_from_it(tmp_path, monkeypatch, capsys):
    calls = []
    original = train.train

    def counting(**kwargs):
        start = _fingerprint(kwargs["model"])
        optimizer = original(**kwargs)
        stage = kwargs["stage"]
        calls.append({"stage": stage.name, "seed": kwargs["cfg"].seed, "iters": stage.iters,
                      "weights": stage.weights, "start": start, "end": _fingerprint(kwargs["model"])})
        return optimizer
    monkeypatch.setattr(train, "train", counting)
    cfg, own = E.parse_args([*TINY, "--arms", "sft,sftkey_tag,sftsft_tag", "--out_dir", str(tmp_path)])
    summary = E.run_experiment(cfg, **own)

    seeds = [cfg.seed, cfg.seed + 1]
    # sft_tag's stage is trained once per seed, though the arm sft_tag is not asked for
    assert [(c["seed"], c["stage"]) for c in calls] == [
        (s, stage) for s in seeds for stage in ("sft", "sft_tag", "sftkey_tag", "sftsft_tag")]
    assert sum(c["iters"] for c in calls) == 2 * (2 * E1 + 2 * E2)
    by = {(c["seed"], c["stage"]): c for c in calls}
    for s in seeds:
        for child in ("sftkey_tag", "sftsft_tag"):
            assert torch.equal(by[s, child]["start"], by[s, "sft_tag"]["end"])
        assert torch.equal(by[s, "sft"]["start"], by[s, "sft_tag"]["start"])  # same init within a seed
    assert not torch.equal(by[seeds[0], "sft_tag"]["start"], by[seeds[1], "sft_tag"]["start"])

    assert set(summary["results"]) == {"sft", "sftkey_tag", "sftsft_tag"}
    assert all(r["fmt"] is None and r["composite"] is None for r in summary["results"]["sft"])
    assert "| sft | untagged SFT, E1 |" in (tmp_path / "results.md").read_text()
    assert set(summary["comparisons"]) == {"sftkey_tag - sftsft_tag"}
    plotted = {p.name for p in tmp_path.glob("*.png")}
    if importlib.util.find_spec("matplotlib"):
        assert plotted == {"val_loss.png", "accuracy.png"}
    else:
        assert not plotted and "pip install matplotlib" in capsys.readouterr().out


def test_miniature_run_writes_complete_results_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    E.main([*TINY, "--arms", "sft_tag,sftkey_tag", "--out_dir", str(tmp_path)])
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))

    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["complete"] and summary["config"]["max_iters"] == E1 and len(summary["seeds"]) == 2
    assert summary["machine"] == runtime.machine("cpu", torch.float32)  # what besides the flags draws these numbers
    assert runtime.MACHINE_LINE.format(**summary["machine"]) in (tmp_path / "results.md").read_text().splitlines()[0]
    for arm in ("sft_tag", "sftkey_tag"):
        runs = summary["results"][arm]
        assert [r["seed"] for r in runs] == summary["seeds"]
        for r in runs:
            assert len(r["correct"]) == len(r["formatted"]) == r["n"] == 6
            assert r["acc"] == pytest.approx(np.mean(r["correct"]))
            assert r["last_stage_seconds"] > 0 and r["train_seconds"] >= r["last_stage_seconds"]
            assert len(r["reasoning_right"]) == 6 and r["reasoning"] == pytest.approx(np.mean(r["reasoning_right"]))
        for metric in ("acc", "fmt", "composite", "reasoning"):
            stat = summary["aggregates"][arm][metric]
            assert stat["mean"] == pytest.approx(np.mean([r[metric] for r in runs]))
            assert stat["std"] == pytest.approx(np.std([r[metric] for r in runs], ddof=1))
    comparison = summary["comparisons"]["sftkey_tag - sft_tag"]
    for metric in ("acc", "composite", "reasoning"):
        c = comparison[metric]
        per_seed = [x[metric] - y[metric] for x, y in zip(summary["results"]["sftkey_tag"],
                                                           summary["results"]["sft_tag"])]
        assert c["per_seed"] == pytest.approx(per_seed)
        assert c["ci_items"][0] <= c["mean"] <= c["ci_items"][1] and c["n_items"] == 6

    markdown = (tmp_path / "results.md").read_text()
    assert "| sft_tag |" in markdown and "| sftkey_tag |" in markdown and "sftkey_tag - sft_tag" in markdown
    assert "| arm | reasoning right |" in markdown and "ΔReasoning right" in markdown  # the synthetic task
    rows = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    expected = {(arm, seed) for arm in ("sft_tag", "sftkey_tag") for seed in summary["seeds"]}
    assert {(r["arm"], r["seed"]) for r in rows} == expected
    stage2 = [r for r in rows if r["arm"] == "sftkey_tag" and r["stage"] == "sftkey_tag"]
    assert min(r["global_step"] for r in stage2) == E1 and any("val_key" in r for r in stage2)

    monkeypatch.undo()  # matplotlib is back (where installed): --plot_only draws the plots from the files
    if importlib.util.find_spec("matplotlib"):
        E.main(["--plot_only", "--out_dir", str(tmp_path)])
        assert {p.name for p in tmp_path.glob("*.png")} == {"val_loss.png", "accuracy.png"}


def test_only_the_synthetic_tasks_are_scored_for_reasoning(seed_cfg, fake_loop, tmp_path):
    """A synthetic problem has one right reasoning, its worked solution; a real one (--data) has many."""
    (arm, synthetic, _), = run_arms(seed_cfg, ["sft_tag"])
    assert len(synthetic["reasoning_right"]) == synthetic["n"] == seed_cfg.n_test
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}", "thinking": "t", "answer": str(i)}) + "\n" for i in range(60)))
    real = dataclasses.replace(seed_cfg, data=str(path), eval_data=str(path), format="tagged")
    (arm, result, _), = run_arms(real, ["sft_tag"])
    assert result["n"] == 60 and not {"reasoning", "reasoning_right"} & result.keys()


def test_an_earlier_experiment_in_the_folder_is_refused_not_overwritten(tmp_path, capsys):
    """Issue 18, item 2, for experiment.py: its results.json is a run's; a new one does not silently replace it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"complete": true}')
    with pytest.raises(SystemExit) as exit_info:
        E.main([*TINY, "--arms", "sft_tag", "--out_dir", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"complete": true}'


def test_the_plots_are_drawn_while_the_folder_is_still_held(tmp_path, monkeypatch):
    """Review (attack): the plots were drawn after the folder's lock was released, so a second experiment given the
    folder with --overwrite could start meanwhile and get this one's val_loss.png and accuracy.png among its files."""
    import checkpoints
    held = []

    def plot(summary, rows, out_dir):
        try:
            lock = checkpoints.FolderLock(out_dir)
            lock.acquire()
            lock.release()
            held.append(False)
        except ValueError as err:
            held.append("in use by another run" in str(err))
        return []
    monkeypatch.setattr(E, "plot", plot)
    cfg, own = E.parse_args([*TINY, "--seeds", "1", "--arms", "sft_tag", "--out_dir", str(tmp_path / "out")])
    E.run_experiment(cfg, **own)
    assert held == [True]


def test_an_arm_trains_the_same_weights_whichever_arms_run_beside_it_with_dropout(tmp_path):
    """Review: the state kept after a shared stage holds the RNG too, so with dropout an arm that continues
    it (sftkey_tag) gets the weights it gets alone, whatever other arms ran first."""
    def final(name, arms):
        cfg, own = E.parse_args([*TINY, "--seeds", "1", "--dropout", "0.1", "--arms", arms, "--save_ckpt",
                                 "--out_dir", str(tmp_path / name)])
        E.run_experiment(cfg, **own)
        return torch.load(tmp_path / name / f"seed{cfg.seed}" / "sftkey_tag" / "ckpt.pt", weights_only=True)["model"]
    alone, beside = final("alone", "sftkey_tag"), final("beside", "sft_tag,key_tag,sftkey_tag")
    assert all(torch.equal(alone[k], beside[k]) for k in alone)


@pytest.mark.parametrize("flags, why", [(["--weights", "0,1,2"], "the arms set the loss and the layout"),
                                        (["--ckpt_interval", "5"], "arms write no checkpoints on the way"),
                                        (["--eval_only"], "it trains every arm")])
def test_refused_flags_say_why(flags, why):
    with pytest.raises(ValueError, match=why):
        E.parse_args(flags)


# ---------------------------------------------------------------------------------------------
# Each arm's data, log rows and seconds are its own: E.run_seed with train.train and train.evaluate
# replaced by fakes that record what they are given; stage k takes STAGE_SECONDS[k] on a fake time.time.

STAGE_SECONDS = {"sft": 1.0, "sft_tag": 2.0, "key_tag": 4.0, "sftkey_tag": 8.0, "sftsft_tag": 16.0}
STAGE_OF = {"sft": "sft", "sft_tag": "sft_tag", "key_tag": "key_tag", "sftkey_tag": "sftkey_tag",
            "sftsft_tag": "sftsft_tag"}  # an arm's last stage


@pytest.fixture
def fake_loop(monkeypatch):
    calls, evals, clock = [], [], [1000.0]
    signature = inspect.signature(train.train)

    def fake_train(*args, **kwargs):
        kw = stage_fields(signature.bind(*args, **kwargs).arguments)  # by name, however run_seed passes them
        calls.append(kw)
        kw["log"].extend({"stage": kw["stage"], "step": s, "loss": 1.0, "val_thinking": 1.0, "val_key": 2.0}
                         for s in range(kw["iters"]))
        clock[0] += STAGE_SECONDS[kw["stage"]]

    def fake_evaluate(model, enc, examples, cfg, device, dtype):
        evals.append({"untagged": cfg.untagged, "examples": examples})
        tagged = not cfg.untagged
        n = len(examples)  # one score and one response per problem, as train.evaluate gives
        return {"acc": 0.5, "fmt": 1.0 if tagged else None, "composite": 0.65 if tagged else None, "n": n,
                "correct": [i % 2 == 0 for i in range(n)], "formatted": [True] * n if tagged else None,
                "responses": [{"response": ""}] * n}

    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    monkeypatch.setattr(time, "time", lambda: clock[0])
    return types.SimpleNamespace(calls=calls, evals=evals)


@pytest.fixture
def seed_cfg(tmp_path):
    return train.TrainConfig(out_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=16, block_size=64, n_train=100,
                             n_val=10, n_test=4, max_iters=E1, stage2_iters=E2, batch_size=8, warmup_iters=1,
                             eval_interval=100, log_interval=100, device="cpu", seed=11)


def run_arms(cfg, names, on_result=None) -> list[tuple]:
    out = []
    E.run_seed(cfg, names, D.char_encoding(), "cpu", torch.float32, on_result or (lambda *args: out.append(args)))
    return out


def in_layout(data, tagged: bool) -> bool:
    enc = D.char_encoding()
    return all(enc.decode(ids[:-1].tolist()) == sftkey.render(ex.prompt, ex.thinking, ex.answer, tagged)[0]
               for ex, ids in zip(data.examples, data.ids))


@pytest.mark.parametrize("names", [["sft", "sft_tag", "sftkey_tag"], ["sftkey_tag", "key_tag", "sft"]])
def test_the_untagged_arm_trains_validates_and_is_scored_untagged_and_the_tagged_arms_tagged(seed_cfg, fake_loop,
                                                                                             names):
    run_arms(seed_cfg, names)
    assert {c["stage"] for c in fake_loop.calls} == {STAGE_OF[n] for n in names} | {"sft_tag"}
    for c in fake_loop.calls:
        tagged = c["stage"] != "sft"
        assert c["cfg"].untagged == (not tagged), c["stage"]
        assert in_layout(c["train_set"], tagged), f"{c['stage']} trains on the other layout's data"
        assert in_layout(c["val_set"], tagged), f"{c['stage']} validates on the other layout's data"
    assert [e["untagged"] for e in fake_loop.evals] == [n == "sft" for n in names]  # scored by its own rule
    assert all(e["examples"] == fake_loop.evals[0]["examples"] for e in fake_loop.evals)  # one test set


# Reasoning right is read in each arm's own layout: a perfect untagged response's reasoning is its lines before
# "#### answer", a perfect tagged one's is between the <Thinking> tags. (Mutation audit: `reasoning_scores(result,
# test, True)`, so the sft arm's reasoning was looked for between tags it never writes and was never right.)

def test_each_arms_reasoning_is_scored_in_its_own_layout(seed_cfg, fake_loop, monkeypatch):
    def perfect(model, enc, examples, cfg, device, dtype):  # what a model that learnt every test problem writes
        n = len(examples)
        write = ((lambda ex: f"{ex.thinking}\n#### {ex.answer}") if cfg.untagged else
                 (lambda ex: f"<Thinking>{ex.thinking}</Thinking><Answer>{ex.answer}</Answer>"))
        return {"acc": 1.0, "fmt": None if cfg.untagged else 1.0, "composite": None, "n": n, "correct": [True] * n,
                "formatted": None if cfg.untagged else [True] * n,
                "responses": [{"response": write(ex)} for ex in examples]}
    monkeypatch.setattr(train, "evaluate", perfect)
    results = {arm: result for arm, result, _ in run_arms(seed_cfg, ["sft", "sft_tag"])}
    for arm in ("sft", "sft_tag"):
        assert results[arm]["reasoning_right"] == [True] * seed_cfg.n_test, arm
        assert results[arm]["reasoning"] == 1.0 and results[arm]["acc_reasoning_right"] == 1.0, arm


@pytest.mark.parametrize("names", [["sft_tag", "sftkey_tag", "sftsft_tag"], ["sftkey_tag", "sftsft_tag", "sft_tag"]])
def test_each_arm_gets_the_log_rows_and_seconds_of_its_own_stages_only(seed_cfg, fake_loop, names):
    """sftkey_tag and sftsft_tag continue the one sft_tag stage kept in memory: each must get a copy of
    its rows and seconds, not the kept lists that the other arm's stage 2 then extends."""
    got = {}

    def on_result(name, result, rows):
        got[name] = copy.deepcopy((result, rows))
        result["train_seconds"] = -1.0  # what a caller does with one arm's records changes no other arm's
        for row in rows:
            row["stage"] = "changed"
        rows.append({"arm": "other", "stage": "changed"})
    run_arms(seed_cfg, names, on_result)
    stages = {"sft_tag": ["sft_tag"], "sftkey_tag": ["sft_tag", "sftkey_tag"],
              "sftsft_tag": ["sft_tag", "sftsft_tag"]}
    for name, own in stages.items():
        result, rows = got[name]
        expected = [(stage, step) for stage in own for step in range(E1 if stage == "sft_tag" else E2)]
        assert [(r["stage"], r["step"]) for r in rows] == expected, name
        assert [r["global_step"] for r in rows] == list(range(len(expected))), name
        assert all(r["arm"] == name and r["seed"] == seed_cfg.seed for r in rows), name
        assert result["train_seconds"] == sum(STAGE_SECONDS[s] for s in own), name
        assert result["last_stage_seconds"] == STAGE_SECONDS[own[-1]], name
        assert result["steps"] == len(expected), name


def test_the_recorder_keeps_each_arms_results_and_rows_apart(tmp_path):
    cfg = train.TrainConfig(out_dir=str(tmp_path), max_iters=E1, stage2_iters=E2)
    recorder = E.Recorder(cfg, ["sft_tag", "sftkey_tag"], seeds=[1], n_boot=10)
    result = {"acc": 0.5, "fmt": 1.0, "composite": 0.65, "n": 2, "correct": [True, False], "formatted": [True, True],
              "seed": 1, "steps": E1, "train_seconds": 2.0, "last_stage_seconds": 2.0}
    recorder.add("sft_tag", result, [{"arm": "sft_tag", "seed": 1, "stage": "sft_tag", "step": 0, "loss": 1.0}])
    summary = json.loads((tmp_path / "results.json").read_text())  # rewritten after each arm
    assert list(summary["results"]) == ["sft_tag"] and len(summary["results"]["sft_tag"]) == 1
    assert list(summary["aggregates"]) == ["sft_tag"]
    rows = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["sft_tag"]


def test_each_layouts_data_is_shown_and_every_arm_trains_on_the_same_examples(tmp_path, capsys):
    """Found in review: the experiment printed nothing of its data (skipped lines, too-long examples), and where
    --block_size drops an example in one layout only, the sft arm trained on other examples than the tagged arms.
    Now an example too long in either layout is dropped from both, and the experiment says so."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q: {n}", "thinking": "x" * n, "answer": "5"}) + "\n"
                            for n in range(10, 30)))  # rendered: 10 + n tokens tagged, 12 + n untagged
    E.main([*for_data(TINY), "--data", str(path), "--eval_data", str(path), "--format", "tagged", "--block_size", "36",
            "--arms", "sft,sft_tag", "--seeds", "1", "--e1", "1", "--batch_size", "2", "--n_val", "2",
            "--val_acc_n", "0", "--out_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert f"  tagged layout: {path}: " in out and f"  untagged layout: {path}: " in out
    assert "note: training and validation examples too long for --block_size 36 in one layout are dropped from the " \
           "other too (2 too long only untagged, 0 only tagged), so every arm trains on the same examples" in out
    cfg, _ = E.parse_args([*for_data(TINY), "--data", str(path), "--eval_data", str(path), "--format", "tagged",
                           "--block_size", "36", "--batch_size", "2", "--n_val", "2"])
    alone = {untagged: [s.examples for s in D.load_data(dataclasses.replace(cfg, untagged=untagged),
                                                        D.char_encoding())[:2]] for untagged in (False, True)}
    assert sum(map(len, alone[False])) == 16 and sum(map(len, alone[True])) == 14  # 2 too long untagged only
    layouts = E.layout_data(cfg, ["sft", "sft_tag"], D.char_encoding(), {})
    for part in (0, 1):  # training, validation: the same examples in the same order, in both layouts
        both = [ex for ex in alone[False][part] if ex in alone[True][part]]
        assert layouts[True][part].examples == layouts[False][part].examples == both
        assert [len(ids) for ids in layouts[True][part].ids] == [len(ids) - 2 for ids in layouts[False][part].ids]
        assert layouts[True][part].summary["examples"] == len(both)
    assert sum(layouts[True][p].summary.get("dropped_in_other_layout", 0) for p in (0, 1)) == 2
    assert layouts[True][0].summary["dropped_too_long"] + layouts[True][1].summary["dropped_too_long"] == 4
    assert layouts[False][0].summary.get("dropped_in_other_layout", 0) == 0
    assert E.layout_data(cfg, ["sft_tag", "sftkey_tag"], D.char_encoding(), {})[True][0].examples == alone[False][0]
    # --eval_data the --data file: its test prompts that the arms train on (or validate with) are counted
    seen = len({ex.prompt for s in layouts[True][:2] for ex in s.examples})
    assert 0 < seen < 20 and f"  test: 20 examples, {seen} of them with a prompt of the training data" in out
    with pytest.raises(D.DataError, match="^validation: none of its examples fits --block_size 36 in both layouts"):
        E._keep_only(layouts[True][1], set(), D.char_encoding(), 36, True)
    whole = layouts[True][0]  # nothing to drop: the very set, so runs that drop nothing are unchanged bit for bit
    assert E._keep_only(whole, set(whole.examples), D.char_encoding(), 36, True) is whole


def test_run_seed_trains_every_arm_on_the_examples_both_layouts_keep(tmp_path, seed_cfg, fake_loop):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q: {n}", "thinking": "x" * n, "answer": "5"}) + "\n"
                            for n in range(10, 30)))  # as above: two fit the tagged layout only
    cfg = dataclasses.replace(seed_cfg, data=str(path), eval_data=str(path), format="tagged", block_size=36,
                              batch_size=2, n_val=2)
    run_arms(cfg, ["sft", "sft_tag"])
    untagged, tagged = fake_loop.calls
    assert untagged["cfg"].untagged and not tagged["cfg"].untagged
    for part in ("train_set", "val_set"):
        assert untagged[part].examples == tagged[part].examples
    dropped = [tagged[part].summary.get("dropped_in_other_layout", 0) for part in ("train_set", "val_set")]
    assert sum(dropped) == 2 and dropped[0] > 0  # and said in the data line the run prints
    assert f" dropped as too long, {dropped[0]} more in the other layout); " in runtime.format_summary(
        tagged["train_set"].summary)


def test_too_few_examples_for_a_step_in_both_layouts_is_one_clear_error(tmp_path, monkeypatch):
    """Each layout alone has a step's examples, the examples both keep do not: refused before training."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q: {n}", "thinking": "x" * n, "answer": "5"}) + "\n"
                            for n in range(10, 30)))
    cfg, _ = E.parse_args([*for_data(TINY), "--data", str(path), "--eval_data", str(path), "--format", "tagged",
                           "--block_size", "100", "--batch_size", "15", "--n_val", "2"])
    load_data = D.load_data

    def drop_two(c, enc, raw, step):  # each layout drops two other training examples, as if too long
        train_set, val_set, test = load_data(c, enc, raw, step)
        gone = set(train_set.examples[:2] if c.untagged else train_set.examples[2:4])
        return E._keep_only(train_set, set(train_set.examples) - gone, enc, 100, not c.untagged), val_set, test
    monkeypatch.setattr(D, "load_data", drop_two)
    assert [len(s[0].ids) for s in E.layout_data(cfg, ["sft"], D.char_encoding(), {}).values()] == [16]
    with pytest.raises(D.DataError, match="14 training examples fit --block_size 100 in both layouts, fewer than the "
                                          "15 of one optimizer step"):
        E.layout_data(cfg, ["sft", "sft_tag"], D.char_encoding(), {})


def test_the_device_is_set_up_as_train_py_sets_it_up(tmp_path, monkeypatch):
    """runtime.set_up_device, which on CUDA turns cuDNN attention off (a plan per new batch width: 185 ms a GPT-2-small
    step on an H200, not 40) and TF32 on: experiment.py trained without it, on PyTorch's choice."""
    calls = []
    set_up = runtime.set_up_device
    monkeypatch.setattr(runtime, "set_up_device", lambda *args: calls.append(set_up(*args)) or calls[-1])
    cfg, own = E.parse_args([*TINY, "--arms", "sftkey_tag", "--seeds", "1", "--out_dir", str(tmp_path)])
    E.run_experiment(cfg, **own)
    assert [device for _, device, _ in calls] == ["cpu"]


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="needs matplotlib")
def test_the_accuracy_plot_of_an_interrupted_run_counts_the_seeds_each_arm_finished(monkeypatch):
    """Found by attack: an experiment stopped after sftkey_tag's first seed drew accuracy.png titled "mean ± std over
    2 seeds" (the seeds asked for), as results.md does not: each bar has the seeds its arm finished."""
    stat = {"mean": 0.5, "std": None}
    summary = {"seeds": [1, 2], "config": {"max_iters": 10}, "picked": {},
               "results": {"sft_tag": [{}, {}], "sftkey_tag": [{}]},
               "aggregates": {n: {"acc": stat, "fmt": stat} for n in ("sft_tag", "sftkey_tag")}}
    titles = []
    monkeypatch.setattr(E.plots, "save", lambda fig, path: titles.append(fig.axes[0].get_title()) or path)
    E.plot(summary, [], "unused")
    assert titles == ["Acc and Fmt per arm (mean ± std over 1/2 seeds)"]
