"""Stages as data: what a step trains on, where a stage reads on, how stages are named, the loss weights per role.

Issue 17, items 9-11: what a step trains on, where a stage reads on in the data stream, how stages
are named, and the per-role loss weights a user may set; also --key_weight's stage, and the RNG
state stage 2 starts from when a run is resumed between the stages.

Why: a stage is its loss weights, steps and peak lr, and the data it reads. Two runs that the README
says are the same (--batch_size 16 --grad_accum 2 and --batch_size 32; stage 2 by hand from a stage-1
checkpoint and stage 2 in one command) must train the same weights, and two runs that differ must
never share a name or a checkpoint folder.
"""
import inspect
import json
import math
import os
import shutil

import pytest
import torch

import checkpoints
import data as D
import runtime
import sftkey
import train
from model import GPT, GPTConfig

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--n_train", "200",
        "--n_val", "10", "--n_test", "2", "--warmup_iters", "1", "--eval_interval", "1000", "--log_interval", "1",
        "--device", "cpu", "--dtype", "float32", "--lr", "3e-3"]


@pytest.fixture(autouse=True)
def no_flops_measurement(monkeypatch):
    monkeypatch.setattr(runtime, "peak_flops", lambda *args, **kwargs: 1e12)  # slow, and not under test


def run(tmp_path, name, *flags) -> dict:
    return train.run(train.parse_args([*TINY, "--out_dir", str(tmp_path / name), *flags]))


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------
# Item 9: a step's examples are planned per optimizer step, then cut into micro-batches

def test_grad_accum_trains_on_the_same_examples_as_one_big_batch(tmp_path):
    flags = ["--max_iters", "5", "--stage2_iters", "0"]
    big = run(tmp_path, "big", "--batch_size", "16", *flags)
    accumulated = run(tmp_path, "accumulated", "--batch_size", "8", "--grad_accum", "2", *flags)
    w_big, w_acc = weights(tmp_path / "big/sft_tag/ckpt.pt"), weights(tmp_path / "accumulated/sft_tag/ckpt.pt")
    # the same 16 examples a step, so the same update up to float rounding (per-step losses agree too)
    assert max_diff(w_big, w_acc) < 1e-5
    losses = [[row["loss"] for row in s["log"] if "loss" in row] for s in (big, accumulated)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # and training moved the weights far more than that: the comparison can tell runs apart
    other = run(tmp_path, "other_seed", "--batch_size", "16", "--seed", "7", *flags)
    assert max_diff(w_big, weights(tmp_path / "other_seed/sft_tag/ckpt.pt")) > 1e-2
    assert other["log"][0]["loss"] != pytest.approx(big["log"][0]["loss"], rel=1e-5)


def test_a_batch_is_cut_into_near_equal_pieces_that_cover_it():
    examples = D.synthetic_task(50, seed=3)
    data = D.tokenize(examples, D.get_encoding(D.SYNTHETIC_ENCODING), 64, True, name="t")
    batches = D.Batches(data, 12, seed=5)
    for i in (0, 3, 7):
        rows = batches.indices(i)
        pieces = [batches.get(i, "cpu", parts=5, part=p)[0] for p in range(5)]
        assert sum(len(x) for x in pieces) == len(rows) == 12 and {len(x) for x in pieces} <= {2, 3}
        whole_x = batches.get(i, "cpu")[0]
        start = 0
        for x in pieces:  # piece p holds rows start..start+len of the whole batch, in order
            width = x.shape[1]
            assert torch.equal(x, whole_x[start:start + len(x), :width])
            start += len(x)


# ---------------------------------------------------------------------------------------------
# Item 10: a stage run from a checkpoint reads on where the checkpoint stopped

def test_stage2_by_hand_from_the_stage1_checkpoint_equals_stage2_in_one_command(tmp_path):
    one = run(tmp_path, "one", "--max_iters", "4", "--stage2_iters", "3")
    run(tmp_path, "by_hand", "--max_iters", "4", "--stage2_iters", "0")
    stage2_lr = train.stage2_peak_lr(train.parse_args(TINY))
    second = run(tmp_path, "by_hand2", "--init_from", str(tmp_path / "by_hand/sft_tag/ckpt.pt"), "--key_only",
                 "--max_iters", "3", "--stage2_iters", "0", "--lr", repr(stage2_lr))
    assert [s["name"] for s in second["stages"]] == ["sftkey_tag"]  # named by its history, as in `one`
    expected = weights(tmp_path / "one/sftkey_tag/ckpt.pt")
    assert max_diff(expected, weights(tmp_path / "by_hand2/sftkey_tag/ckpt.pt")) == 0.0
    assert [r["loss"] for r in second["log"] if "loss" in r] == \
        [r["loss"] for r in one["log"] if "loss" in r and r["stage"] == "sftkey_tag"]
    # A stage 2 by hand as stage 2 (--max_iters 0: no stage 1), the only way to a DFT stage from a checkpoint; a
    # 0-step stage 1 named as trained was found in review, and with it the name of an sft, sft, dft chain.
    dft = ["--stage2_weights", "0,1,1", "--stage2_dft", "--stage2_iters", "3"]
    one_dft = run(tmp_path, "one_dft", "--max_iters", "4", *dft)
    second = run(tmp_path, "by_hand_dft", "--init_from", str(tmp_path / "by_hand/sft_tag/ckpt.pt"), "--max_iters", "0",
                 *dft)
    assert [s["name"] for s in second["stages"]] == ["sftdft_tag"] and list(second["results"]) == ["sftdft_tag"]
    expected = weights(tmp_path / "one_dft/sftdft_tag/ckpt.pt")
    assert max_diff(expected, weights(tmp_path / "by_hand_dft/sftdft_tag/ckpt.pt")) == 0.0
    assert [r["loss"] for r in second["log"] if "loss" in r] == \
        [r["loss"] for r in one_dft["log"] if "loss" in r and r["stage"] == "sftdft_tag"]


def test_a_stage_from_a_checkpoint_reads_on_after_every_step_before_it(tmp_path):
    """--init_from a checkpoint of a stage that itself read on (stream_start 12, then 5 steps): the next stage
    starts at batch 17 of the data stream, not at 5 (which would train again on batches the weights have seen)."""
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8))
    path = tmp_path / "start.pt"
    checkpoints.save_checkpoint(str(path), model, None, train.TrainConfig(), 5,
                                {"stage": "sftkey_tag", "stream_start": 12})
    inputs = checkpoints.read_inputs(train.TrainConfig(init_from=str(path)))
    assert inputs.origin == ("sftkey_tag", 12 + 5)


def test_compute_matched_control_is_one_command_that_reads_on(tmp_path, monkeypatch):
    seen = []
    real = train.train

    def recording(model, train_set, val_set, cfg, stage, *args, **kwargs):
        steps_before = args[3] if len(args) > 3 else kwargs.get("steps_before")
        seen.append((stage.name, tuple(stage.weights), stage.iters, steps_before))
        return real(model, train_set, val_set, cfg, stage, *args, **kwargs)
    monkeypatch.setattr(train, "train", recording)
    summary = run(tmp_path, "control", "--max_iters", "4", "--stage2_iters", "2", "--stage2_weights", "0,1,1")
    assert seen == [("sft_tag", (0.0, 1.0, 1.0), 4, 0), ("sftsft_tag", (0.0, 1.0, 1.0), 2, 4)]
    assert list(summary["results"]) == ["sft_tag", "sftsft_tag"]
    assert (tmp_path / "control/sftsft_tag/ckpt.pt").is_file()


# ---------------------------------------------------------------------------------------------
# Item 11: stages named by what they are, weights set freely, printed, checked

@pytest.mark.parametrize("flags, names", [
    ([], ["sft_tag", "sftkey_tag"]),
    (["--key_weight", "5"], ["w0-1-5_tag", "w0-1-5+key_tag"]),
    (["--untagged"], ["sft", "sftkey"]),
    (["--untagged", "--key_only", "--stage2_iters", "0"], ["key"]),
    (["--key_only", "--stage2_iters", "0"], ["key_tag"]),
    (["--stage2_weights", "0,1,1"], ["sft_tag", "sftsft_tag"]),
    (["--stage2_weights", "0,0.1,1"], ["sft_tag", "sft+w0-0.1-1_tag"]),
    (["--weights", "1,1,1", "--stage2_iters", "0"], ["w1-1-1_tag"]),
    (["--stage2_weights", "0,1,1", "--stage2_dft"], ["sft_tag", "sftdft_tag"]),
    (["--stage2_dft"], ["sft_tag", "sft+dft-key_tag"]),
    (["--stage2_weights", "0,0.1,1", "--stage2_dft"], ["sft_tag", "sft+dft-w0-0.1-1_tag"]),
])
def test_stage_names_say_what_each_stage_is(flags, names):
    assert [s.name for s in train.plan_stages(train.parse_args(flags))] == names


def test_different_losses_never_share_a_name():
    """Weights and DFT (each token's loss times its probability) both make the loss: a name for every pair."""
    grid = [(w, dft) for w in [(p, t, k) for p in (0, 0.5, 1) for t in (0, 0.1, 1, 2) for k in (0, 1, 5) if p or t or k]
            for dft in (False, True)]
    for tagged in (True, False):
        firsts = {sftkey.stage_name("", w, tagged, dft): w for w, dft in grid}
        assert len(firsts) == len(grid)
        seconds = {sftkey.stage_name(first, w, tagged, dft) for first in firsts for w, dft in grid}
        assert len(seconds) == len(grid) ** 2
        assert not seconds & set(firsts)


def test_a_stage_after_one_in_the_other_layout_keeps_that_name_whole():
    """Untagged SFT then a tagged key-only stage is not the method (sftkey_tag); tagged then untagged SFT is not
    sftsft. Crossing the layouts never gives a name that a history in one layout has."""
    assert sftkey.stage_name("sft", (0, 0, 1), tagged=True) == "sft_untagged+key_tag"
    assert sftkey.stage_name("sft_tag", (0, 1, 1), tagged=False) == "sft_tag+sft"
    grid = [(0, 1, 1), (0, 0, 1), (0, 1, 5)]
    names = {crossed: {sftkey.stage_name(sftkey.stage_name("", a, tagged != crossed), b, tagged)
                       for a in grid for b in grid for tagged in (True, False)} for crossed in (True, False)}
    assert len(names[True]) == 2 * len(grid) ** 2 and not names[True] & names[False]
    assert all(checkpoints.NAME.fullmatch(name) for name in names[True])  # a folder name


# A stage's name holds its weights exactly enough to tell apart any two that --weights can give.
# (Mutation audit: `f"{w:g}"`, six significant digits: 0,1,1.0000001 and 0,1,1.0000002 were both "w0-1-1", one
# name and one checkpoint folder for two different losses.)

@pytest.mark.parametrize("tagged", [True, False])
def test_losses_differing_in_the_seventh_digit_have_different_names_that_read_back_as_their_weights(tagged):
    grid = [(0.0, 1.0, 1.0000001), (0.0, 1.0, 1.0000002), (0.0, 0.1234567, 1.0), (0.0, 0.1234568, 1.0)]
    names = [sftkey.stage_name("", w, tagged) for w in grid]
    assert len(set(names)) == len(grid)
    for w, name in zip(grid, names):
        assert tuple(float(x) for x in name.removeprefix("w").removesuffix("_tag").split("-")) == w


def test_weights_flags_reach_each_stage_and_the_short_forms_agree():
    stages = train.plan_stages(train.parse_args(["--weights", "0.5,1,2", "--stage2_weights", "0,0.1,1"]))
    assert [s.weights for s in stages] == [(0.5, 1.0, 2.0), (0.0, 0.1, 1.0)]
    for short, long in ((["--key_only"], ["--weights", "0,0,1"]), (["--key_weight", "5"], ["--weights", "0,1,5"]),
                        (["--key_only", "--key_weight", "2"], ["--weights", "0,0,2"])):
        assert train.plan_stages(train.parse_args(short)) == train.plan_stages(train.parse_args(long))


def test_the_stages_are_printed_before_training(tmp_path, capsys):
    run(tmp_path, "printed", "--max_iters", "2", "--stage2_iters", "1", "--stage2_weights", "0,0.5,1")
    lines = capsys.readouterr().out.splitlines()
    first_step = next(i for i, line in enumerate(lines) if "step" in line and "/2" in line)
    assert "stage 1: sft_tag | loss weights prompt 0, thinking 1, answer 1 | 2 steps | peak lr 0.003" in \
        lines[:first_step]
    assert "stage 2: sft+w0-0.5-1_tag | loss weights prompt 0, thinking 0.5, answer 1 | 1 steps | peak lr 0.0003" \
        in lines[:first_step]


def test_help_says_how_the_loss_is_normalised():
    text = " ".join(train.build_parser().format_help().split())
    assert "sum(weight x token loss) / sum(weight)" in text and "--stage2_weights" in text


@pytest.mark.parametrize("flags, problem", [
    (["--weights", "0,-1,1"], "--weights 0,-1,1: each weight must be 0 or between"),
    (["--weights", "0,nan,1"], "--weights 0,nan,1: each weight must be 0"),
    (["--weights", "0,1,inf"], "--weights 0,1,inf: each weight must be 0"),
    (["--weights", "0,0,0"], "and one not 0"),
    (["--stage2_weights", "0,0,0"], "--stage2_weights 0,0,0"),
    (["--stage2_weights", "1,2"], "--stage2_weights '1,2': give three comma-separated numbers"),
    (["--weights", "a,b,c"], "give three comma-separated numbers"),
    (["--key_weight", "1e39"], "--key_only/--key_weight 0.0,1.0,1e+39: each weight must be 0 or between"),
    (["--key_weight", "-2"], "--key_only/--key_weight"),
    (["--key_weight", "1e-50"], "each weight must be 0 or between 1e-06 and 1e+06"),
    (["--weights", "0,1,2", "--key_only"], "give one or the other"),
    (["--weights", "0,1,2", "--key_weight", "0.5"], "give one or the other"),  # a key weight below 1 too
])
def test_bad_weights_stop_before_anything_is_written(tmp_path, capsys, flags, problem):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, *flags, "--out_dir", str(out)])
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err
    assert not out.exists()


def test_weight_bounds_keep_a_step_total_finite_in_float32():
    low, high = runtime.WEIGHT_RANGE
    assert math.isfinite(float(torch.tensor(high, dtype=torch.float32) * 1e6 * 1e3))  # 1e6 tokens a step, x1e3
    assert float(torch.tensor(low, dtype=torch.float32)) > 0


def test_a_legacy_checkpoint_is_a_start_point_too_and_a_bad_one_a_clear_error(tmp_path, capsys):
    """--init_from is read once, whole (checkpoints.read_inputs): a legacy (not zip) file is a start point
    too, and a file that is no checkpoint gets read_checkpoint's one-line message."""
    run(tmp_path, "first", "--max_iters", "3", "--stage2_iters", "0")
    saved = torch.load(tmp_path / "first/sft_tag/ckpt.pt", weights_only=True)
    legacy = tmp_path / "legacy.pt"
    torch.save(saved, legacy, _use_new_zipfile_serialization=False)
    second = run(tmp_path, "second", "--init_from", str(legacy), "--key_only", "--max_iters", "2",
                 "--stage2_iters", "0")
    assert [s["name"] for s in second["stages"]] == ["sftkey_tag"]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cfg = train.parse_args([*TINY, "--init_from", str(garbage)])
    with pytest.raises(ValueError, match=r"garbage\.pt: (refused to load|not a readable PyTorch checkpoint)"):
        checkpoints.read_inputs(cfg)


# ---------------------------------------------------------------------------------------------
# train.py's --key_weight sets the key weight of the (single) stage; stage 2 is always (0, 0, 1).
# (Mutation audit: run() built stage 1's weights with role_weights(cfg.key_only), dropping --key_weight.)

RUN = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--batch_size", "4",
       "--eval_interval", "1000", "--device", "cpu", "--dtype", "float32", "--n_train", "60", "--n_val", "6",
       "--n_test", "1", "--warmup_iters", "1"]


def test_stage2_dft_reaches_the_loss_of_stage_2_only(tmp_path, monkeypatch, capsys):
    seen = []
    real_loss = sftkey.weighted_loss_sum

    def recording(hidden, head, targets, weights, dft=False):
        if torch.is_grad_enabled():  # the training step's loss, not validation's (which is always plain)
            seen.append(dft)
        return real_loss(hidden, head, targets, weights, dft)
    monkeypatch.setattr(sftkey, "weighted_loss_sum", recording)
    summary = train.main([*RUN, "--out_dir", str(tmp_path), "--max_iters", "2", "--stage2_iters", "3",
                          "--stage2_weights", "0,1,1", "--stage2_dft"])
    assert seen == [False, False, True, True, True]
    assert "sftdft_tag | loss weights prompt 0, thinking 1, answer 1, each x its probability (DFT)" in \
        capsys.readouterr().out
    assert summary is None and (tmp_path / "sftdft_tag" / "ckpt.pt").is_file()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    marked = {(row["stage"], row.get("dft", False)) for row in rows if "loss" in row}  # DFT's objective, so marked
    assert marked == {("sft_tag", False), ("sftdft_tag", True)}


def test_key_weight_flag_reaches_the_loss_of_stage_1_only(tmp_path, monkeypatch, capsys):
    seen = {}
    real_train = train.train

    def recording(*args, **kwargs):
        given = inspect.signature(real_train).bind(*args, **kwargs).arguments  # however run() passes them
        seen[given["stage"].name] = (tuple(given["stage"].weights), given["stage"].iters)
        return real_train(*args, **kwargs)
    monkeypatch.setattr(train, "train", recording)
    train.main([*RUN, "--out_dir", str(tmp_path), "--key_weight", "5", "--max_iters", "2", "--stage2_iters", "1"])
    assert seen == {"w0-1-5_tag": ((0.0, 1.0, 5.0), 2), "w0-1-5+key_tag": ((0.0, 0.0, 1.0), 1)}


# ---------------------------------------------------------------------------------------------
# Between the stages: resumed after stage 1 finished (and was evaluated) but before stage 2 wrote a
# checkpoint, stage 2 starts from the RNG state stage 1 ended with, so dropout draws what the
# uninterrupted run drew.
# (Mutation audit: the `ckpts.restore_rng(saved)` of a finished stage skipped.)

def test_resume_between_the_stages_gives_the_uninterrupted_weights(tmp_path, capsys):
    flags = [*RUN, "--max_iters", "3", "--stage2_iters", "2", "--dropout", "0.2", "--seed", "4"]
    train.main([*flags, "--out_dir", str(tmp_path / "whole")])
    # As if stopped right after stage 1's evaluation: only stage 1's final checkpoint (with its results).
    os.makedirs(tmp_path / "cut" / "sft_tag")
    shutil.copy(tmp_path / "whole" / "sft_tag" / "ckpt.pt", tmp_path / "cut" / "sft_tag" / "ckpt.pt")
    torch.manual_seed(999)  # the resumed process starts from some other RNG state
    train.main([*flags, "--out_dir", str(tmp_path / "cut"), "--resume"])

    def final(name):
        return torch.load(tmp_path / name / "sftkey_tag" / "ckpt.pt", weights_only=True)["model"]
    whole, resumed = final("whole"), final("cut")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    stage1 = torch.load(tmp_path / "whole" / "sft_tag" / "ckpt.pt", weights_only=True)["model"]
    assert any(not torch.equal(stage1[k], resumed[k]) for k in stage1)  # stage 2 did train

