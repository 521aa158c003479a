"""Dropout (--dropout): in training at the embeddings, in attention and at both sublayer outputs; never in eval.

A dropout that is silently off still trains (only less regularised) and a dropout left on at
evaluation still scores (only noisily), so no end-to-end result shows either. Here the model's
residual stream and attention output are compared in train and eval mode on the same weights, and
the loop is checked to train in train mode and to validate and evaluate in eval mode.
"""
import pytest
import torch

import data as D
import sftkey
import train
from model import GPT, GPTConfig
from conftest import Frozen, config

ENC = D.char_encoding()
P = 0.5


def tiny_model(dropout: float, seed: int = 0, vocab: int = 64, block_size: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=1, n_head=2, n_embd=32, dropout=dropout))


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(seed))


def block_inputs(model: GPT) -> list[torch.Tensor]:
    """What the first transformer block is fed at every forward call: the embeddings after dropout."""
    fed = []
    model.transformer.h[0].register_forward_pre_hook(lambda module, args: fed.append(args[0].detach().clone()))
    return fed


def embeddings(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.transformer.wte(x) + model.transformer.wpe(torch.arange(x.shape[1]))


# ---------------------------------------------------------------------------------------------
# In the model

def test_embedding_dropout_in_training_zeroes_about_p_of_the_residual_stream_and_scales_the_rest():
    model = tiny_model(P)
    x = tokens()
    emb = embeddings(model, x)
    assert torch.count_nonzero(emb) == emb.numel()  # no zero of its own: a zero below is dropout's
    fed = block_inputs(model)
    model.train()
    model(x)
    dropped = fed[-1] == 0
    share = float(dropped.float().mean())  # of 3072 draws
    assert 0.4 < share < 0.6, f"embedding dropout {P} zeroed {share:.1%} of the residual stream in training"
    assert torch.allclose(fed[-1][~dropped], emb[~dropped] / (1 - P), rtol=1e-5, atol=1e-7)  # inverted dropout
    model(x)
    assert not torch.equal(fed[-1] == 0, dropped)  # a fresh mask each call
    model.eval()
    model(x)
    assert torch.equal(fed[-1], emb), "embedding dropout applied in eval mode"


def attention_output_difference(dropout: float) -> float:
    """Largest change that train mode makes to the model's output, given the same block input.

    The MLP's output projection is zeroed (its dropout then drops zeros) and the block is fed, in eval
    mode, exactly what it was fed in train mode, so embedding dropout plays no part: what remains is
    the attention's own dropout."""
    model = tiny_model(dropout)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight.zero_()
        model.transformer.h[0].mlp.c_proj.bias.zero_()
    x = tokens()
    fed = block_inputs(model)
    model.train()
    with torch.no_grad():
        trained = model(x)
    model.eval()
    feed_again = model.transformer.h[0].register_forward_pre_hook(lambda module, args: (fed[0], *args[1:]),
                                                                  prepend=True)  # before block_inputs' hook
    with torch.no_grad():
        evaluated = model(x)
    feed_again.remove()
    assert torch.equal(fed[1], fed[0])  # the eval pass really ran on the train pass's block input
    return float((trained - evaluated).abs().max())


def test_attention_dropout_is_applied_in_training():
    assert attention_output_difference(0.0) < 1e-6  # the comparison itself: no dropout, no difference
    assert attention_output_difference(P) > 1e-2, "attention dropout not applied in training"


def test_attention_output_dropout_in_training_as_gpt2s_resid_dropout():
    """GPT-2 (and gpt2.hf_config's resid_pdrop) drops the attention's output projection too, not only the MLP's:
    in train mode about P of the attention sublayer's output is zero, in eval mode none of it."""
    model = tiny_model(P)
    out = []
    model.transformer.h[0].attn.register_forward_hook(lambda module, args, y: out.append(y.detach()))
    model.train()
    model(tokens())
    share = float((out[-1] == 0).float().mean())
    assert 0.4 < share < 0.6, f"the attention output projection's dropout zeroed {share:.1%} in training"
    model.eval()
    model(tokens())
    assert torch.count_nonzero(out[-1]) == out[-1].numel()


def test_in_eval_mode_a_model_with_dropout_computes_exactly_what_it_computes_without():
    with_dropout, without = tiny_model(P), tiny_model(0.0)
    without.load_state_dict(with_dropout.state_dict())
    x = tokens()

    def gap() -> float:
        with torch.no_grad():
            return float((with_dropout(x) - without(x)).abs().max())
    with_dropout.train(), without.train()
    assert gap() > 1e-2  # in train mode they differ
    with_dropout.eval(), without.eval()
    assert gap() == 0.0, "dropout applied in eval mode"
    prompts = [[1, 2, 3], [4, 5]]
    assert with_dropout.generate(prompts, 20, -1) == without.generate(prompts, 20, -1)


def test_generate_refuses_a_model_left_in_train_mode_with_dropout_and_not_one_without():
    """Sampling with dropout on would read each token with a different thinned network: refused, not silent."""
    with_dropout, without = tiny_model(P), tiny_model(0.0)
    with_dropout.train(), without.train()
    with pytest.raises(RuntimeError, match="call model.eval"):
        with_dropout.generate([[1, 2, 3]], 5, -1)
    assert len(without.generate([[1, 2, 3]], 5, -1)[0]) == 5  # dropout 0: train mode computes what eval mode does


# ---------------------------------------------------------------------------------------------
# In the loop
# (Mutation audit: `model.train()` deleted from the loop, so after the first validation every later
# step trained without dropout; `model.eval()` deleted from validation_loss, so noisy validation losses.)

@pytest.fixture(scope="module")
def tokenized() -> D.TokenizedSet:  # this file's own: fewer, other problems
    return D.tokenize(D.synthetic_task(24, seed=5), ENC, block_size=96)


def loop_model(dropout: float = 0.0, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=1, n_head=2, n_embd=32, dropout=dropout))


def test_every_training_forward_is_in_train_mode_and_every_validation_forward_in_eval_mode(tokenized):
    model = loop_model(dropout=0.2)
    modes = []  # (grad enabled, model.training) at every forward call
    model.register_forward_pre_hook(lambda module, args: modes.append((torch.is_grad_enabled(), module.training)))
    model.configure_optimizer = lambda *args, **kwargs: Frozen(model.parameters())
    train.train(model, tokenized, tokenized, config(eval_interval=1),
                sftkey.Stage("test", sftkey.role_weights(), 4, 1e-3), "cpu", torch.float32, [])
    training = [m for grad, m in modes if grad]
    validating = [m for grad, m in modes if not grad]
    assert len(training) == 4 and validating  # one forward per step (grad_accum 1), a validation every step
    assert all(training), "a training step ran with dropout off"
    assert not any(validating), "a validation loss ran with dropout on"


def test_validation_loss_of_a_model_left_in_train_mode_has_no_dropout_noise(tokenized):
    model = loop_model(dropout=0.5)
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


def test_evaluation_of_a_model_left_in_train_mode_generates_without_dropout():
    with_dropout, without = loop_model(dropout=0.5), loop_model(dropout=0.0)
    with torch.no_grad():
        for p in with_dropout.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # peaked predictions that dropout would change
    without.load_state_dict(with_dropout.state_dict())
    examples = D.synthetic_task(4, seed=2)
    cfg = config(block_size=40, eval_batch_size=4)
    reference = train.evaluate(without.eval(), ENC, examples, cfg, "cpu", torch.float32)
    with_dropout.train()  # as the training loop leaves it
    got = train.evaluate(with_dropout, ENC, examples, cfg, "cpu", torch.float32)
    assert got["responses"] == reference["responses"] and got["correct"] == reference["correct"]
