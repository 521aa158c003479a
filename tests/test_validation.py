"""The validation loss: the mean token loss per role (thinking, key) on the validation set, as train and run() log it.

The validation losses are the curves that show stage 2 lowering the loss on the key while the loss
on the thinking drifts; computed on the wrong set, over the wrong tokens or as a mean of batch means,
they still look like plausible curves. Dropout at validation is in test_dropout.py.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import data as D
import runtime
import sftkey
import train
from model import GPT
from sftkey import KEY, THINK
from conftest import Frozen, config, tiny_model

ENC = D.char_encoding()


def peaked(model: GPT) -> GPT:
    """Large random weights: peaked predictions, so different tokens have very different losses."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


# ---------------------------------------------------------------------------------------------
# Per role

def test_validation_loss_is_the_mean_token_loss_per_role(tokenized):
    model = peaked(tiny_model(seed=1))  # thinking and key losses far apart
    val = D.TokenizedSet(tokenized.examples[:7], tokenized.ids[:7], tokenized.roles[:7], {})
    # 7 examples in batches of 3 (3, 3, 1): a mean of batch means would weigh the last one wrongly.
    got = train.validation_loss(model, val, config(batch_size=3), "cpu", torch.float32)
    losses, roles = [], []
    with torch.no_grad():
        for ids, r in zip(val.ids, val.roles):  # one unpadded sequence at a time
            x, y = torch.from_numpy(ids[:-1])[None], torch.from_numpy(ids[1:])
            logits = model(x)[0] @ model.transformer.wte.weight.T
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            roles.append(torch.from_numpy(r[1:]))  # the role of the token predicted
    losses, roles = torch.cat(losses), torch.cat(roles)
    thinking, key = float(losses[roles == THINK].mean()), float(losses[roles == KEY].mean())
    assert abs(thinking - key) > 0.1 * key
    assert got["thinking"] == pytest.approx(thinking, rel=1e-5)
    assert got["key"] == pytest.approx(key, rel=1e-5)
    # and not over the prompt or everything (the alternatives are distinct numbers)
    assert float(losses.mean()) != pytest.approx(got["key"], rel=1e-3)


def test_a_role_with_no_tokens_in_the_validation_set_gives_a_finite_loss_and_leaves_the_other_exact():
    """Untagged examples with an empty reasoning (the tagged format allows one) hold no thinking token at all:
    the thinking figure must stay a number, not NaN in the log, and the key one the mean over key tokens.
    (Mutation audit: the token counts divided without their clamp at 1, so the thinking loss was 0/0.)"""
    model = peaked(tiny_model(seed=1))
    val = D.tokenize([D.Example("Q: 1+2", "", "3"), D.Example("Q: 40+2", "", "42")], ENC, 96, tagged=False)
    assert not any((r == THINK).any() for r in val.roles)
    got = train.validation_loss(model, val, config(batch_size=2), "cpu", torch.float32)
    losses = []
    with torch.no_grad():
        for ids, r in zip(val.ids, val.roles):  # one unpadded sequence at a time
            logits = model(torch.from_numpy(ids[:-1])[None])[0] @ model.transformer.wte.weight.T
            losses.append(F.cross_entropy(logits, torch.from_numpy(ids[1:]), reduction="none")[r[1:] == KEY])
    assert math.isfinite(got["thinking"])
    assert got["key"] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# On the validation set, not the training set

def test_every_validation_loss_train_logs_is_the_validation_sets_not_the_training_sets(tokenized):
    model = peaked(tiny_model(seed=2))
    model.configure_optimizer = lambda *args, **kwargs: Frozen(model.parameters())
    training = D.TokenizedSet(tokenized.examples[:30], tokenized.ids[:30], tokenized.roles[:30], {})
    validation = D.tokenize([D.Example("What is nine and nine?", "nine and nine make 18", "eighteen"),
                             D.Example("Name a colour.", "the sky is blue", "blue")], ENC, block_size=96)
    cfg = config(eval_interval=1)
    on_val = train.validation_loss(model, validation, cfg, "cpu", torch.float32)
    on_train = train.validation_loss(model, training, cfg, "cpu", torch.float32)
    for role in ("thinking", "key"):  # the two sets are told apart by either figure
        assert abs(on_val[role] - on_train[role]) > 0.03 * on_train[role], role
    log = []
    train.train(model, training, validation, cfg, sftkey.Stage("test", (0.0, 1.0, 1.0), 3, 1e-3), "cpu", torch.float32,
                log)
    rows = [row for row in log if "val_key" in row]
    assert [row["step"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["val_thinking"] == pytest.approx(on_val["thinking"], rel=1e-6)
        assert row["val_key"] == pytest.approx(on_val["key"], rel=1e-6)


def test_run_logs_the_validation_loss_of_its_validation_split(tmp_path, monkeypatch):
    """What run() logs as val_thinking and val_key at the end of each stage is train.validation_loss of
    the stage's final weights on the validation split that D.load_data makes for the same flags."""
    monkeypatch.setattr(runtime, "peak_flops", lambda *args, **kwargs: 1e12)  # slow, and not under test
    cfg = train.parse_args(["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8",
                            "--n_train", "60", "--n_val", "6", "--n_test", "1", "--max_iters", "3",
                            "--stage2_iters", "2", "--warmup_iters", "1", "--lr", "3e-3", "--eval_interval",
                            "1000", "--device", "cpu", "--dtype", "float32", "--out_dir", str(tmp_path)])
    train_set, val_set, _ = D.load_data(cfg, D.get_encoding(cfg.encoding))
    expected, on_train = {}, {}
    real = train.train

    def recording(*args, **kwargs):  # after each stage: the losses of its final weights on each set
        optimizer = real(*args, **kwargs)
        arguments = inspect.signature(real).bind(*args, **kwargs).arguments
        model, stage = arguments["model"], arguments["stage"].name
        expected[stage] = train.validation_loss(model, val_set, cfg, "cpu", torch.float32)
        on_train[stage] = train.validation_loss(model, train_set, cfg, "cpu", torch.float32)
        return optimizer
    monkeypatch.setattr(train, "train", recording)
    summary = train.run(cfg)
    assert set(expected) == {"sft_tag", "sftkey_tag"}
    for stage, losses in expected.items():
        last = [row for row in summary["log"] if row["stage"] == stage and "val_key" in row][-1]
        assert last["val_thinking"] == pytest.approx(losses["thinking"], rel=1e-6), stage
        assert last["val_key"] == pytest.approx(losses["key"], rel=1e-6), stage
        # the test can fail: the training set's losses are other numbers
        assert on_train[stage]["key"] != pytest.approx(losses["key"], rel=1e-4), stage
