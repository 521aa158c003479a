"""The method end to end (train.run): which tokens each stage's loss is on, both stages' lr schedule, seeding.

Through `train.run`/`train.main` on tiny configurations: which tokens each stage's loss is on, the
learning-rate schedule of both stages as logged, and seeding.

Why: these are the properties that make SFTKey what it is (stage 1 on thinking and key, stage 2 on
the key only, stage 2 continuing from where stage 1's schedule ended), and a one-line slip in
`run` (the wrong weights for a stage, a flag not passed on) leaves every unit test green.

How the loss of a stage is checked: the logged loss of a stage's first step is computed before its
first update, from the weights the stage starts from (a checkpoint file we can load) and the batch
the run actually fetched (recorded by wrapping `D.Batches.get`). The test recomputes it directly
(logits = hidden @ wte.T, cross-entropy per position, mean over the positions whose target is
THINK or KEY, or KEY only). Comparing final weights of runs whose data differ only in the thinking
text cannot show "key only": the thinking is the key's context, so it changes the key's gradient
even when no loss is put on it.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import data as D
import runtime
import train
from sftkey import KEY, THINK

MODEL = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "96", "--batch_size", "4",
         "--eval_interval", "1000", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(autouse=True, scope="module")
def no_flops_measurement():
    """run() times 2048x2048 matrix products for the MFU column (about 2.5 s per run on one
    thread); the MFU is not under test here. Where the function lives elsewhere, runs are only slower."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "peak_flops", lambda *args, **kwargs: 1e12)  # slow, and not under test
        yield


def write_tagged(path, examples) -> str:
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "thinking": ex.thinking, "answer": ex.answer}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"train": write_tagged(folder / "train.jsonl", D.synthetic_task(40, seed=11)),
            "eval": write_tagged(folder / "eval.jsonl", D.synthetic_task(2, seed=12))}


def run_recording_batches(argv: list[str]) -> tuple[dict, list[tuple[torch.Tensor, ...]]]:
    """train.run on parsed `argv`, and every micro-batch it fetched, in order."""
    fetched = []
    original = D.Batches.get

    def get(self, i, device, **split):
        batch = original(self, i, device, **split)
        fetched.append(tuple(t.clone() for t in batch))
        return batch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D.Batches, "get", get)
        summary = train.run(train.parse_args(argv))
    return summary, fetched


def weights_of(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def model_with(path, argv):
    cfg = train.parse_args(argv)
    model = checkpoints.build_model(cfg, D.get_encoding(cfg.encoding), "cpu")
    model.load_state_dict(weights_of(path))
    return model.eval()


@torch.no_grad()
def role_means(model, batch) -> dict[str, float]:
    """Mean cross-entropy of the batch's next-token predictions over THINK+KEY targets and KEY targets."""
    x, y, roles = batch
    logits = model(x) @ model.transformer.wte.weight.T
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    return {"full": float(ce[(roles == THINK) | (roles == KEY)].mean()), "key": float(ce[roles == KEY].mean())}


def first_loss(summary, stage) -> float:
    return next(row["loss"] for row in summary["log"] if row["stage"] == stage and "loss" in row)


@pytest.fixture(scope="module")
def start_ckpt(files, tmp_path_factory):
    """A briefly trained stage-1 checkpoint: its thinking and key losses clearly differ (at random
    initialisation every token costs about log(vocab))."""
    out = tmp_path_factory.mktemp("start")
    train.run(train.parse_args([*MODEL, "--data", files["train"], "--format", "tagged", "--eval_data", files["eval"],
                                "--n_val", "4", "--max_iters", "40", "--stage2_iters", "0", "--lr", "5e-3",
                                "--warmup_iters", "2", "--log_interval", "100", "--out_dir", str(out)]))
    return str(out / "sft_tag" / "ckpt.pt")


def method_argv(files, start_ckpt, out, *extra) -> list[str]:
    return [*MODEL, "--data", files["train"], "--format", "tagged", "--eval_data", files["eval"], "--n_val", "4",
            "--init_from", start_ckpt, "--warmup_iters", "1", "--log_interval", "1", "--out_dir", str(out), *extra]


def assert_loss_is(logged: float, means: dict, which: str) -> None:
    other = "key" if which == "full" else "full"
    assert logged == pytest.approx(means[which], rel=1e-5)
    # the two candidates lie 100x the tolerance apart, so the comparison can tell them apart
    assert abs(means[which] - means[other]) > 1e-3 * means[which]


# ---------------------------------------------------------------------------------------------
# Which tokens each stage's loss is on

def test_two_stage_run_stage1_loss_on_thinking_and_key_stage2_on_key_only(files, start_ckpt, tmp_path):
    argv = method_argv(files, start_ckpt, tmp_path, "--max_iters", "3", "--stage2_iters", "2")
    summary, fetched = run_recording_batches(argv)
    assert len(fetched) == 3 + 2
    start = model_with(start_ckpt, argv)
    # The start checkpoint is an sft_tag stage, so the stages are named by that history.
    assert [s["name"] for s in summary["stages"]] == ["sftsft_tag", "sftsftkey_tag"]
    assert_loss_is(first_loss(summary, "sftsft_tag"), role_means(start, fetched[0]), "full")
    # Stage 2 starts from stage 1's final weights, written to sftsft_tag/ckpt.pt.
    after_stage1 = model_with(tmp_path / "sftsft_tag" / "ckpt.pt", argv)
    assert_loss_is(first_loss(summary, "sftsftkey_tag"), role_means(after_stage1, fetched[3]), "key")


def test_key_only_flag_from_a_stage1_checkpoint_is_stage2_by_hand_named_sftkey_tag(files, start_ckpt, tmp_path):
    argv = method_argv(files, start_ckpt, tmp_path, "--key_only", "--max_iters", "2", "--stage2_iters", "0")
    summary, fetched = run_recording_batches(argv)
    assert list(summary["results"]) == ["sftkey_tag"] and os.path.isfile(tmp_path / "sftkey_tag" / "ckpt.pt")
    assert_loss_is(first_loss(summary, "sftkey_tag"), role_means(model_with(start_ckpt, argv), fetched[0]), "key")


def test_stage2_updates_the_stage1_weights(files, start_ckpt, tmp_path):
    argv = method_argv(files, start_ckpt, tmp_path, "--max_iters", "2", "--stage2_iters", "2")
    train.run(train.parse_args(argv))
    start, one, two = (weights_of(p) for p in (start_ckpt, tmp_path / "sftsft_tag" / "ckpt.pt",
                                               tmp_path / "sftsftkey_tag" / "ckpt.pt"))
    assert any(not torch.equal(start[k], one[k]) for k in start)
    assert any(not torch.equal(one[k], two[k]) for k in one)


# ---------------------------------------------------------------------------------------------
# The learning-rate schedule, as logged

def expected_lr(step: int, iters: int, peak: float, warmup_iters: int, r: float) -> float:
    warmup = min(warmup_iters, iters // 10)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)  # rises to the peak, reached once, at step `warmup`
    return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, iters - 1 - warmup))))


def logged_lrs(summary, stage) -> list[float]:
    rows = [row for row in summary["log"] if row["stage"] == stage and "lr" in row]
    assert [row["step"] for row in rows] == list(range(len(rows)))  # --log_interval 1: every step
    return [row["lr"] for row in rows]


SYNTH = [*MODEL, "--n_train", "60", "--n_val", "6", "--n_test", "2", "--log_interval", "1"]


def test_logged_lr_follows_warmup_and_cosine_in_both_stages_stage2_peak_where_stage1_ended(tmp_path):
    lr, r = 2e-3, 0.25
    summary = train.run(train.parse_args([*SYNTH, "--max_iters", "40", "--stage2_iters", "20", "--warmup_iters", "3",
                                          "--lr", str(lr), "--min_lr_ratio", str(r), "--out_dir", str(tmp_path)]))
    stage1, stage2 = logged_lrs(summary, "sft_tag"), logged_lrs(summary, "sftkey_tag")
    # stage 1: 3 warm-up steps; stage 2: warm-up capped at a tenth of its 20 steps, peak lr x r
    assert stage1 == pytest.approx([expected_lr(s, 40, lr, 3, r) for s in range(40)], rel=1e-9)
    assert stage2 == pytest.approx([expected_lr(s, 20, lr * r, 3, r) for s in range(20)], rel=1e-9)
    assert stage1[:4] == pytest.approx([lr / 4, 2 * lr / 4, 3 * lr / 4, lr])  # by hand: warm-up, then the peak once
    assert stage1[4] < lr and stage1[-1] == pytest.approx(lr * r)  # the cosine ends exactly at the floor
    assert stage2[:3] == pytest.approx([lr * r / 3, 2 * lr * r / 3, lr * r])


def test_explicit_stage2_lr_is_stage2s_peak(tmp_path):
    lr, stage2_lr, r = 2e-3, 7e-4, 0.3
    summary = train.run(train.parse_args([*SYNTH, "--max_iters", "10", "--stage2_iters", "10", "--warmup_iters", "2",
                                          "--lr", str(lr), "--stage2_lr", str(stage2_lr), "--min_lr_ratio", str(r),
                                          "--out_dir", str(tmp_path)]))
    assert logged_lrs(summary, "sft_tag") == pytest.approx([expected_lr(s, 10, lr, 2, r) for s in range(10)])
    assert logged_lrs(summary, "sftkey_tag") == pytest.approx(
        [expected_lr(s, 10, stage2_lr, 2, r) for s in range(10)], rel=1e-9)
    assert max(logged_lrs(summary, "sftkey_tag")) == pytest.approx(stage2_lr)


def test_lr_at_and_stage2_peak_lr_match_the_formula():
    cfg = train.TrainConfig(lr=3e-3, warmup_iters=5, min_lr_ratio=0.2)
    for iters in (1, 7, 30, 100):
        for step in range(iters):
            assert train.lr_at(step, iters, 1.5, cfg) == pytest.approx(expected_lr(step, iters, 1.5, 5, 0.2))
    assert train.lr_at(999, 1000, 1.0, cfg) == pytest.approx(0.2, rel=1e-4)  # the cosine ends at its floor
    assert train.stage2_peak_lr(cfg) == pytest.approx(3e-3 * 0.2)
    assert train.stage2_peak_lr(train.TrainConfig(lr=3e-3, stage2_lr=4e-4)) == 4e-4


# ---------------------------------------------------------------------------------------------
# Seeds

SEEDED = [*SYNTH, "--max_iters", "3", "--stage2_iters", "2", "--warmup_iters", "1", "--dropout", "0.1"]


def final_weights_for(tmp_path, name, *extra) -> dict:
    train.main([*SEEDED, "--out_dir", str(tmp_path / name), *extra])
    return weights_of(tmp_path / name / "sftkey_tag" / "ckpt.pt")


def test_same_seed_gives_identical_weights_another_seed_differs(tmp_path, capsys):
    first, again = final_weights_for(tmp_path, "a", "--seed", "5"), final_weights_for(tmp_path, "b", "--seed", "5")
    other = final_weights_for(tmp_path, "c", "--seed", "6")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_data_seed_changes_the_problems_but_seed_keeps_the_test_set():
    enc = D.char_encoding()

    def problems(*extra):
        train_set, val_set, test = D.load_data(train.parse_args([*SYNTH, *extra]), enc)
        return {ex.prompt for ex in train_set.examples + val_set.examples}, [ex.prompt for ex in test]
    base_pool, base_test = problems("--seed", "1", "--data_seed", "0")
    seed_pool, seed_test = problems("--seed", "2", "--data_seed", "0")
    other_pool, other_test = problems("--seed", "1", "--data_seed", "3")
    # --seed only re-splits train/validation: the same problems, the same test items in the same order
    assert seed_test == base_test and seed_pool == base_pool
    pool, test = D.synthetic_split(60, 2, 0)
    assert base_pool == {ex.prompt for ex in pool} and base_test == [ex.prompt for ex in test]
    assert other_test != base_test and other_pool != base_pool
