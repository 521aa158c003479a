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
