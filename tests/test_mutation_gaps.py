"""Behaviours that a mutation audit of the suite found untested, one section per gap.

Each test here failed with a deliberate one-line bug planted in the code (listed in the comment
above it) and passes on the real code. Expected values are computed independently in the test.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import data as D
import experiment as E
import runtime
import sftkey
import train
from model import GPT, GPTConfig

ENC = D.char_encoding()


@pytest.fixture(scope="module")
def tokenized() -> D.TokenizedSet:
    return D.tokenize(D.synthetic_task(24, seed=5), ENC, block_size=96)


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=1, n_head=2, n_embd=32, dropout=dropout))


def config(**overrides) -> train.TrainConfig:
    base = dict(batch_size=4, log_interval=1000, eval_interval=1000, warmup_iters=0, weight_decay=0.0, seed=7)
    return train.TrainConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------
# Dropout is on for every training step and off for every validation loss.
# Mutants: `model.train()` deleted from the loop (after the first validation every later step
# trained without dropout); `model.eval()` deleted from validation_loss (noisy validation losses).

def test_every_training_forward_is_in_train_mode_and_every_validation_forward_in_eval_mode(tokenized):
    model = tiny_model(dropout=0.2)
    modes = []  # (grad enabled, model.training) at every forward call
    model.register_forward_pre_hook(lambda module, args: modes.append((torch.is_grad_enabled(), module.training)))
    model.configure_optimizer = lambda *args, **kwargs: GradRecorder(model.parameters())  # AdamW not needed
    train.train(model, tokenized, tokenized, config(eval_interval=1), sftkey.role_weights(), 4, 1e-3, "test",
                "cpu", torch.float32, [])
    training = [m for grad, m in modes if grad]
    validating = [m for grad, m in modes if not grad]
    assert len(training) == 4 and validating  # one forward per step (grad_accum 1), a validation every step
    assert all(training), "a training step ran with dropout off"
    assert not any(validating), "a validation loss ran with dropout on"


def test_validation_loss_of_a_model_left_in_train_mode_has_no_dropout_noise(tokenized):
    model = tiny_model(dropout=0.5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # large activations: dropout would move the loss a lot
    val = D.TokenizedSet(tokenized.examples[:6], tokenized.ids[:6], tokenized.roles[:6], {})
    reference = train.validation_loss(model.eval(), val, config(), "cpu", torch.float32)
    for _ in range(2):
        model.train()  # as the training loop leaves it
        got = train.validation_loss(model, val, config(), "cpu", torch.float32)
        assert got == pytest.approx(reference, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# gsm8k: the final answer is the one after the LAST "\n####" line.
# Mutant: `rpartition` -> `partition` (a reasoning holding a "####" line lost its answer).

def test_gsm8k_answer_is_after_the_last_hash_line_and_earlier_ones_stay_in_the_reasoning(tmp_path):
    path = tmp_path / "g.jsonl"
    record = {"question": "Q?", "answer": "first try\n#### 3\nno, recount: 2+3=5\n#### 5"}
    path.write_text(json.dumps(record) + "\n")
    [example] = D.read_examples(str(path), "gsm8k")
    assert example.answer == "5"
    assert example.thinking == "first try\n#### 3\nno, recount: 2+3=5"
    assert example.prompt == "Q?"


# ---------------------------------------------------------------------------------------------
# A prompt may hold the tag strings (only the thinking and the answer may not).
# Mutant: the tag check applied to the prompt too (such examples refused).

def test_a_prompt_that_mentions_the_tags_is_kept_and_tagged(tmp_path):
    prompt = "What do <Thinking> and </Answer> mean?"
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "thinking": "they are tags", "answer": "markup"}) + "\n")
    [example] = D.read_examples(str(path), "tagged")
    assert (example.prompt, example.thinking, example.answer) == (prompt, "they are tags", "markup")
    data = D.tokenize([example], ENC, block_size=96)
    n_prompt = len(ENC.encode_ordinary(prompt + sftkey.PROMPT_SEP))  # the tags in it are tokens of the prompt
    assert data.roles[0][:n_prompt].tolist() == [sftkey.PROMPT] * n_prompt
    with pytest.raises(D.DataError, match="thinking contains the tag"):
        path.write_text(json.dumps({"prompt": "Q", "thinking": "a <Answer> b", "answer": "markup"}) + "\n")
        D.read_examples(str(path), "tagged")


# ---------------------------------------------------------------------------------------------
# Batches: after grouping by length, the batches' order within an epoch is shuffled.
# Mutant: `return list(batches)` (each epoch runs from the shortest batches to the longest).

def test_batch_order_within_an_epoch_is_shuffled_not_shortest_first(tokenized):
    n_sorted = 0
    for seed in range(6):
        batches = D.Batches(tokenized, 3, seed=seed)  # 24 examples: 8 batches, one window
        shortest = [min(len(tokenized.ids[j]) for j in batches.indices(i)) for i in range(8)]
        n_sorted += shortest == sorted(shortest)
    # A shuffled order of 8 batches is ascending with probability about 1/8! (ties aside).
    assert n_sorted <= 1


# ---------------------------------------------------------------------------------------------
# --seed re-draws the validation split (the experiment's seeds differ in it); --data_seed does not.
# Mutant: load_data splits with cfg.data_seed.

def test_seed_redraws_the_validation_split_of_the_same_problems():
    flags = ["--n_train", "60", "--n_val", "6", "--n_test", "2", "--block_size", "96"]

    def split_for(*extra):
        train_set, val_set, test = D.load_data(train.parse_args([*flags, *extra]), ENC)
        return {e.prompt for e in train_set.examples}, {e.prompt for e in val_set.examples}
    train_a, val_a = split_for("--seed", "1", "--data_seed", "0")
    train_b, val_b = split_for("--seed", "2", "--data_seed", "0")
    train_c, val_c = split_for("--seed", "1", "--data_seed", "0")
    assert len(val_a) == len(val_b) == 6
    assert train_a | val_a == train_b | val_b  # the same problems
    assert val_a != val_b  # split differently
    assert (train_c, val_c) == (train_a, val_a)
    # and the split is the one D.split draws with --seed
    pool = D.synthetic_task(62, 0)[:60]
    expected_train, expected_val = D.split(pool, 6, 2)
    assert val_b == {e.prompt for e in expected_val}


# ---------------------------------------------------------------------------------------------
# The loss log: every log_interval-th step and always the last step of a stage.
# Mutant: the `or step + 1 == iters` dropped (a stage's final loss never logged).

def test_loss_is_logged_every_log_interval_steps_and_at_the_last_step(tokenized):
    log = []
    model = tiny_model()
    model.configure_optimizer = lambda *args, **kwargs: GradRecorder(model.parameters())  # AdamW not needed
    train.train(model, tokenized, tokenized, config(log_interval=3), sftkey.role_weights(), 5, 1e-3,
                "stage_x", "cpu", torch.float32, log)
    loss_steps = [row["step"] for row in log if "val_key" not in row]
    assert loss_steps == [0, 3, 4]
    assert all(row["stage"] == "stage_x" for row in log)
    val_steps = [row["step"] for row in log if "val_key" in row]
    assert val_steps == [0, 4]  # eval_interval 1000: the first step and the last


# ---------------------------------------------------------------------------------------------
# evaluate: a response that did not end with end-of-text is scored on all its tokens.
# Mutant: `ended = True` (the last token of a cut-off response dropped, as if it were end-of-text).

class ScriptedModel:
    """Stands in for GPT in train.evaluate: answers each prompt with a fixed token sequence."""

    def __init__(self, enc, script):
        self.enc, self.script, self.config = enc, script, GPTConfig(vocab_size=enc.n_vocab)

    def eval(self):
        return self

    def generate(self, prompts, *args, **kwargs):
        return [self.script[self.enc.decode(ids)] for ids in prompts]


def test_evaluate_keeps_every_token_of_a_response_cut_off_at_the_limit():
    cut = "<Thinking>6+6=12</Thinking><Answer>12"  # the length limit hit before </Answer>
    full = "<Thinking>1+1=2</Thinking><Answer>2</Answer>"
    script = {"Q: 6+6\n": ENC.encode_ordinary(cut), "Q: 1+1\n": ENC.encode_ordinary(full) + [ENC.eot_token]}
    examples = [D.Example("Q: 6+6", "6+6=12", "12"), D.Example("Q: 1+1", "1+1=2", "2")]
    result = train.evaluate(ScriptedModel(ENC, script), ENC, examples, config(block_size=64), "cpu", torch.float32)
    assert result["correct"] == [True, True]  # "12", not "1"
    assert result["formatted"] == [False, True]  # no end-of-text, no </Answer>
    assert sorted(s["response"] for s in result["samples"]) == sorted([cut, full])


# ---------------------------------------------------------------------------------------------
# train.py's --key_weight sets the key weight of the (single) stage; stage 2 is always (0, 0, 1).
# Mutant: run() builds stage 1's weights with role_weights(cfg.key_only), dropping --key_weight.

RUN = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--batch_size", "4",
       "--eval_interval", "1000", "--device", "cpu", "--dtype", "float32", "--n_train", "60", "--n_val", "6",
       "--n_test", "1", "--warmup_iters", "1"]


@pytest.fixture
def no_peak_measurement(monkeypatch):
    """train.run times 2048 x 2048 matrix products for MFU; these tests do not need the figure."""
    monkeypatch.setattr(runtime, "peak_flops", lambda *args, **kwargs: 1e12)


def test_key_weight_flag_reaches_the_loss_of_stage_1_only(tmp_path, monkeypatch, capsys, no_peak_measurement):
    seen = {}
    real_train = train.train

    def recording(model, train_set, val_set, cfg, weights, iters, *args, **kwargs):
        seen[args[1]] = (tuple(weights), iters)  # args[1] is the stage name
        return real_train(model, train_set, val_set, cfg, weights, iters, *args, **kwargs)
    monkeypatch.setattr(train, "train", recording)
    train.main([*RUN, "--out_dir", str(tmp_path), "--key_weight", "5", "--max_iters", "2", "--stage2_iters", "1"])
    assert seen == {"w0-1-5_tag": ((0.0, 1.0, 5.0), 2), "w0-1-5+key_tag": ((0.0, 0.0, 1.0), 1)}


# ---------------------------------------------------------------------------------------------
# Resume after stage 1 finished (and was evaluated) but before stage 2 wrote a checkpoint: stage 2
# must start from the RNG state stage 1 ended with, so dropout draws what the uninterrupted run drew.
# Mutant: the `ckpts.restore_rng(saved)` of a finished stage skipped.

def test_resume_between_the_stages_gives_the_uninterrupted_weights(tmp_path, capsys, no_peak_measurement):
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


# ---------------------------------------------------------------------------------------------
# paired_comparison: a level-L interval cuts (1 - L) / 2 from each tail.
# Mutant: `tail = 1 - level` (a 95% interval that is really a 90% one). The suite's designs had
# the same quantiles at 2.5%/5% and 95%/97.5%; this one does not.

def test_a_95_percent_interval_puts_2_5_percent_in_each_tail():
    # Item means [1, 0, 0]: a resample's mean is Binomial(3, 1/3) / 3, whose cumulative
    # probabilities are 8/27, 20/27, 26/27 = 0.963, 1 at 0, 1/3, 2/3, 1. The 97.5% quantile is
    # therefore 1 and the 95% quantile 2/3; both low quantiles are 0.
    cdf = np.cumsum([math.comb(3, k) * (1 / 3) ** k * (2 / 3) ** (3 - k) for k in range(4)])
    assert 0.95 < cdf[2] < 0.975
    a = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    c = E.paired_comparison(a, np.zeros_like(a), n_boot=20_000, seed=4)
    assert c["ci"] == [0.0, 1.0]
    assert c["mean"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# Each optimizer step sees the gradient of its own batch only.
# Mutant: `optimizer.zero_grad(...)` deleted (gradients accumulate across steps); in the suite only
# the resume test noticed, through the weights of a resumed run.

class GradRecorder(torch.optim.Optimizer):
    """Stands in for AdamW in train.train: records the gradients it is given and changes nothing."""

    def __init__(self, params):
        super().__init__(list(params), {"lr": 0.0})
        self.grads = []

    @torch.no_grad()
    def step(self, closure=None):
        self.grads.append([p.grad.clone() for p in self.param_groups[0]["params"]])


def test_every_step_gets_the_gradient_of_its_own_batch_only(tokenized):
    model = tiny_model(seed=2)
    recorder = GradRecorder(model.parameters())
    model.configure_optimizer = lambda *args, **kwargs: recorder
    cfg = config(grad_clip=0.0)
    train.train(model, tokenized, tokenized, cfg, sftkey.role_weights(), 3, 1e-3, "test", "cpu", torch.float32, [])
    params = list(model.parameters())
    for step in range(3):  # the weights never change, so each step's gradient is batch `step`'s at them
        model.zero_grad(set_to_none=True)
        x, y, roles = D.Batches(tokenized, cfg.batch_size, cfg.seed).get(step, "cpu")
        w = sftkey.token_weights(roles, sftkey.role_weights())
        (sftkey.weighted_loss_sum(model(x), model.lm_head, y, w) / w.sum()).backward()
        for got, p in zip(recorder.grads[step], params):
            assert torch.allclose(got, p.grad, rtol=1e-5, atol=1e-7)
