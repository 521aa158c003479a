"""The contracts of the training loop's parts, each against an independent computation: the lr the
optimizer actually applies, gradient clipping, the validation loss per role, the data order
(`D.Batches` and the stream across stages and micro-batches), the optimizer's parameter groups, and
the initialisation.

Why: a slip in any of these (clipping at the wrong norm, the thinking and key validation losses
swapped, stage 2 re-reading stage 1's batches, biases decayed) still trains and passes tests that
only look at whether a run finishes or a loss falls.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data as D
import runtime
import sftkey
import train
from model import GPT, GPTConfig
from sftkey import KEY, THINK

ENC = D.char_encoding()


@pytest.fixture(scope="module")
def tokenized() -> D.TokenizedSet:
    return D.tokenize(D.synthetic_task(42, seed=3), ENC, block_size=96)  # 1 to 5 steps: varied lengths


def tiny_model(seed: int = 0, n_embd: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=1, n_head=2, n_embd=n_embd))


def run_train(model, data, cfg, iters, peak_lr=1e-2, weights=sftkey.role_weights(), steps_before=0):
    return train.train(model, data, data, cfg, weights, iters, peak_lr, "test", "cpu", torch.float32, [],
                       steps_before=steps_before)


def config(**overrides) -> train.TrainConfig:
    base = dict(batch_size=4, log_interval=1000, eval_interval=1000, warmup_iters=0, weight_decay=0.0, seed=7)
    return train.TrainConfig(**{**base, **overrides})


class GradRecorder(torch.optim.Optimizer):
    """Stands in for AdamW inside train.train: keeps the (clipped) gradients and lrs it is given."""

    def __init__(self, model):
        super().__init__(list(model.parameters()), {"lr": 0.0})
        self.grads, self.lrs = [], []

    @torch.no_grad()
    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        self.grads.append([p.grad.clone() for p in self.param_groups[0]["params"]])


def recorded(model, data, cfg, iters=1, **kwargs) -> GradRecorder:
    model = copy.deepcopy(model)
    recorder = GradRecorder(model)
    model.configure_optimizer = lambda *args, **kw: recorder
    run_train(model, data, cfg, iters, **kwargs)
    return recorder


def norm(grads) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))


# ---------------------------------------------------------------------------------------------
# The lr applied

def test_optimizer_applies_the_scheduled_lr_at_every_step(tokenized):
    cfg = config(warmup_iters=3, min_lr_ratio=0.2)
    iters, peak = 30, 0.05
    applied = recorded(tiny_model(), tokenized, cfg, iters=iters, peak_lr=peak).lrs
    warmup = min(3, iters // 10)
    expected = [peak * (s + 1) / (warmup + 1) if s < warmup else
                peak * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (iters - 1 - warmup))))
                for s in range(iters)]
    assert applied == pytest.approx(expected, rel=1e-9)


def test_every_param_group_of_the_real_optimizer_gets_the_lr(tokenized):
    model = tiny_model()
    seen = []
    make = model.configure_optimizer

    def configure(*args, **kwargs):  # the real AdamW, its step recording each group's lr first
        opt = make(*args, **kwargs)
        step = opt.step

        def recording_step(*a, **k):
            seen.append([g["lr"] for g in opt.param_groups])
            return step(*a, **k)
        opt.step = recording_step
        return opt
    model.configure_optimizer = configure
    run_train(model, tokenized, config(warmup_iters=2, min_lr_ratio=0.5), iters=20, peak_lr=0.01)
    # warm-up of 2 steps: 1/3 and 2/3 of the peak, then the peak once, at step 2
    assert seen[0] == pytest.approx([0.01 / 3] * len(seen[0])) and seen[2] == pytest.approx([0.01] * len(seen[2]))
    assert all(len(set(lrs)) == 1 for lrs in seen) and len(seen) == 20


# ---------------------------------------------------------------------------------------------
# Gradient clipping

def test_clipping_scales_the_gradient_to_the_flag_norm_and_leaves_smaller_ones_alone(tokenized):
    model = tiny_model()
    raw = recorded(model, tokenized, config(grad_clip=0.0)).grads[0]
    total = norm(raw)
    assert total > 0.1  # a real gradient
    for limit in (total / 4, total / 40):
        clipped = recorded(model, tokenized, config(grad_clip=limit)).grads[0]
        assert norm(clipped) == pytest.approx(limit, rel=1e-4)
        for c, g in zip(clipped, raw):  # same direction, scaled by limit / norm
            assert torch.allclose(c, g * (limit / total), rtol=1e-4, atol=1e-10)
    loose = recorded(model, tokenized, config(grad_clip=total * 4)).grads[0]
    assert all(torch.equal(c, g) for c, g in zip(loose, raw))


def trained_weights(model, data, grad_clip) -> dict:
    model = copy.deepcopy(model)
    run_train(model, data, config(grad_clip=grad_clip), iters=3, peak_lr=1e-2)
    return model.state_dict()


def test_clipping_changes_adamw_training_and_off_equals_a_limit_never_reached(tokenized):
    # AdamW normalises each update, so one step hides clipping; over 3 steps the clipped gradients'
    # changing scale (and epsilon) shows.
    model = tiny_model()
    off, never, tiny = (trained_weights(model, tokenized, clip) for clip in (0.0, 1e9, 1e-3))
    assert all(torch.equal(off[k], never[k]) for k in off)
    assert any(not torch.allclose(off[k], tiny[k], rtol=1e-5, atol=1e-7) for k in off)


# ---------------------------------------------------------------------------------------------
# Validation loss per role

def test_validation_loss_is_the_mean_token_loss_per_role(tokenized):
    model = tiny_model(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # peaked predictions: thinking and key losses far apart
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


# ---------------------------------------------------------------------------------------------
# Data order

def test_batches_are_a_pure_function_of_seed_and_index(tokenized):
    sequential = D.Batches(tokenized, 4, seed=9)
    expected = [sequential.indices(i).tolist() for i in range(35)]  # three and a half epochs
    shuffled = D.Batches(tokenized, 4, seed=9)
    for i in np.random.default_rng(0).permutation(35):  # jumping back and forth across epochs
        assert shuffled.indices(int(i)).tolist() == expected[i]
    x, y, roles = D.Batches(tokenized, 4, seed=9).get(12, "cpu")
    rows = expected[12]
    assert torch.equal(x, D.collate([tokenized.ids[j] for j in rows], [tokenized.roles[j] for j in rows], "cpu")[0])


def test_each_epoch_covers_distinct_examples_and_seeds_and_epochs_differ(tokenized):
    batches = D.Batches(tokenized, 4, seed=9)
    per_epoch = len(tokenized.ids) // 4
    assert batches.per_epoch == per_epoch == 10  # 42 examples: 40 used per epoch
    epochs = [np.concatenate([batches.indices(e * per_epoch + k) for k in range(per_epoch)]) for e in range(3)]
    for epoch in epochs:
        assert len(epoch) == len(set(epoch.tolist())) == 40 and set(epoch.tolist()) <= set(range(42))
    assert epochs[0].tolist() != epochs[1].tolist()
    other = D.Batches(tokenized, 4, seed=10)
    first_epoch = lambda b: [b.indices(i).tolist() for i in range(per_epoch)]  # noqa: E731
    assert first_epoch(other) != first_epoch(batches)


def test_batches_hold_similar_lengths(tokenized):
    # 10 batches per epoch fit in one window of 16: sorted by length, each batch is a run of
    # consecutive lengths, so the batches' length ranges do not overlap.
    batches = D.Batches(tokenized, 4, seed=9)
    lengths = sorted([sorted(len(tokenized.ids[j]) for j in batches.indices(i)) for i in range(10)])
    assert len({l for b in lengths for l in b}) > 10  # many lengths: an unsorted epoch would overlap
    for a, b in zip(lengths, lengths[1:]):
        assert a[-1] <= b[0]


def record_batch_numbers(monkeypatch) -> list[tuple[int, int, int]]:
    """(batch number i, parts, part) of every micro-batch D.Batches.get is asked for, in order."""
    fetched = []
    original = D.Batches.get

    def get(self, i, device, parts=1, part=0):
        fetched.append((i, parts, part))
        return original(self, i, device, parts=parts, part=part)
    monkeypatch.setattr(D.Batches, "get", get)
    return fetched


def test_a_step_reads_one_batch_cut_into_its_micro_batches_after_earlier_steps(tokenized, monkeypatch):
    fetched = record_batch_numbers(monkeypatch)
    run_train(tiny_model(), tokenized, config(grad_accum=3), iters=2, steps_before=5)
    assert fetched == [(5, 3, 0), (5, 3, 1), (5, 3, 2), (6, 3, 0), (6, 3, 1), (6, 3, 2)]


def test_run_stage2_continues_the_data_stream_after_stage1(tmp_path, monkeypatch):
    fetched = record_batch_numbers(monkeypatch)
    monkeypatch.setattr(runtime, "peak_flops", lambda *args, **kwargs: 1e12)  # slow, and not under test
    train.run(train.parse_args(["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--batch_size", "4",
                                "--n_train", "60", "--n_val", "6", "--n_test", "1", "--grad_accum", "2",
                                "--max_iters", "3", "--stage2_iters", "2", "--warmup_iters", "1",
                                "--eval_interval", "1000", "--device", "cpu", "--dtype", "float32",
                                "--out_dir", str(tmp_path)]))
    assert [i for i, _, _ in fetched] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # stage 2 reads batches 3 and 4
    assert [part for _, _, part in fetched] == [0, 1] * 5


# ---------------------------------------------------------------------------------------------
# The optimizer

def test_optimizer_decays_exactly_matrices_and_embeddings_with_the_flag_value(tokenized):
    model = GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=16))
    opt = run_train(model, tokenized, config(weight_decay=0.37), iters=0, peak_lr=0.02)
    decay, no_decay = set(), set()
    for module in model.modules():  # the expected split, from the module types
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            decay.add(id(module.weight))
            if getattr(module, "bias", None) is not None:
                no_decay.add(id(module.bias))
        elif isinstance(module, torch.nn.LayerNorm):
            no_decay |= {id(p) for p in module.parameters()}
    assert len(decay) == 2 * 4 + 2  # 4 matrices a block, wte (= lm_head, counted once) and wpe
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each trainable parameter once
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= decay or ids <= no_decay
        assert group["weight_decay"] == (0.37 if ids <= decay else 0.0)
        assert tuple(group["betas"]) == (0.9, 0.95) and group["lr"] == 0.02
    assert {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]} == decay


# ---------------------------------------------------------------------------------------------
# Initialisation

def test_initialisation_gpt2_style():
    torch.manual_seed(0)
    n_layer = 3
    model = GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=n_layer, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    for name, p in model.named_parameters():
        p = p.detach()
        if name.endswith("c_proj.weight"):
            std = 0.02 / math.sqrt(2 * n_layer)
        elif p.dim() >= 2:
            std = 0.02
        elif ".ln_" in name or "ln_f" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
            continue
        else:  # a Linear's bias
            assert torch.count_nonzero(p) == 0, name
            continue
        assert float(p.std()) == pytest.approx(std, rel=0.03), name
        assert abs(float(p.mean())) < 0.1 * std, name
