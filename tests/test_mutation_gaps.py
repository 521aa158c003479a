"""Behaviours that a mutation audit of the suite found untested, one section per gap.

Each test here failed with a deliberate one-line bug planted in the code (listed in the comment
above it) and passes on the real code. Expected values are computed independently in the test.
"""
import json

import pytest
import torch

import data as D
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
