"""What an optimizer step applies: the scheduled lr, clipping, AdamW's groups, each step's own gradient.

Each is checked against an independent computation. Why: a slip here (clipping at the wrong norm,
biases decayed, gradients left to accumulate across steps) still trains and passes tests that only
look at whether a run finishes or a loss falls. The validation loss is in test_validation.py, the
data order in test_batches.py, the initialisation in test_model.py.
"""
import copy
import math

import pytest
import torch

import data as D
import sftkey
import train
from model import GPT, GPTConfig
from conftest import config, run_train, tiny_model

ENC = D.char_encoding()


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
# Each step's gradient
# (Mutation audit: `optimizer.zero_grad(...)` deleted, so gradients accumulated across steps; in the
# suite only the resume test noticed, through the weights of a resumed run.)

def test_every_step_gets_the_gradient_of_its_own_batch_only(tokenized):
    model = tiny_model(seed=2)
    recorder = GradRecorder(model)
    model.configure_optimizer = lambda *args, **kwargs: recorder
    cfg = config(grad_clip=0.0)
    train.train(model, tokenized, tokenized, cfg, sftkey.Stage("test", sftkey.role_weights(), 3, 1e-3), "cpu",
                torch.float32, [])
    params = list(model.parameters())
    for step in range(3):  # the weights never change, so each step's gradient is batch `step`'s at them
        model.zero_grad(set_to_none=True)
        x, y, roles = D.Batches(tokenized, cfg.batch_size, cfg.seed).get(step, "cpu")
        w = sftkey.token_weights(roles, sftkey.role_weights())
        (sftkey.weighted_loss_sum(model(x), model.lm_head, y, w) / w.sum()).backward()
        for got, p in zip(recorder.grads[step], params):
            assert torch.allclose(got, p.grad, rtol=1e-5, atol=1e-7)
