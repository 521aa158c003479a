"""The network (model.GPT) and the loss on its outputs: causality, generation, initialisation, the weighted loss.

KV-cache and batched generation are checked against cache-free generation of each prompt alone,
the initialisation against GPT-2's, the weighted loss against a full projection, and the key-only
gradient against changed targets. Dropout is in test_dropout.py.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import data as D
import sftkey
from model import GPT, GPTConfig

VOCAB = 53


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy shared CPU OpenMP's waiting
    made these tests ~100x slower (measured: 2.5 ms vs 218 ms per forward). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(seed: int = 0, std: float = 0.4, block_size: int = 48) -> GPT:
    """A float64 model with large random weights: peaked, varied logits, so a wrong token shows.

    float64 keeps summation-order differences (cache vs no cache, batch vs alone) far below the
    gap between the two largest logits, so the comparisons below can demand exact equality.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.double().eval()


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


NEVER = -1  # a stop token that is never produced


def test_hidden_states_are_causal():
    model = random_model()
    x = torch.tensor(random_prompts([20])[0])[None]
    full = model(x)
    assert full.shape == (1, 20, 32)
    assert torch.allclose(model(x[:, :12]), full[:, :12], atol=1e-12)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_kv_cache_gives_the_tokens_of_cache_free_generation():
    model = random_model()
    for prompt in random_prompts([1, 5, 11]):
        slow = model.generate([prompt], 25, NEVER, use_cache=False)
        fast = model.generate([prompt], 25, NEVER, use_cache=True)
        assert fast == slow
        assert len(slow[0]) == 25 and len(set(slow[0])) >= 5  # non-trivial output: the test can fail


def test_generation_is_greedy_decoding_through_lm_head():
    """generate() writes the output projection as W @ h.T for speed; it must pick lm_head's argmax."""
    model = random_model()
    prompt = random_prompts([7])[0]
    x = torch.tensor(prompt)[None]
    with torch.no_grad():
        for _ in range(15):
            x = torch.cat([x, model.lm_head(model(x))[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert model.generate([prompt], 15, NEVER) == [x[0, 7:].tolist()]


def test_batched_left_padded_generation_matches_each_prompt_alone():
    model = random_model()
    prompts = random_prompts([3, 1, 9, 6])
    alone = [model.generate([p], 20, NEVER, use_cache=False)[0] for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)
    for use_cache in (True, False):
        assert model.generate(prompts, 20, NEVER, use_cache=use_cache) == alone


def test_rows_stop_at_their_own_stop_token():
    model = random_model()
    prompts = random_prompts([4, 2, 8])
    free = [model.generate([p], 20, NEVER, use_cache=False)[0] for p in prompts]
    stop = free[0][6]  # row 0 is sure to stop early; other rows stop wherever they produce it
    expected = [out[:out.index(stop) + 1] if stop in out else out for out in free]
    assert len(expected[0]) <= 7
    assert model.generate(prompts, 20, stop, use_cache=True) == expected
    assert [model.generate([p], 20, stop, use_cache=True)[0] for p in prompts] == expected


def test_generation_stays_inside_block_size():
    # This test used to assert lengths [6, 6]: every row got block_size minus the batch's longest
    # prompt, so a row's output depended on its batch-mates (issue 17, item 1). Each row now has its
    # own budget: block_size + 1 tokens in all, prompt included, the last one predicted from position
    # block_size - 1 and never fed back (item 2: the longest example training keeps has that length).
    model = random_model(block_size=16)
    assert [len(o) for o in model.generate(random_prompts([10, 3]), 100, NEVER)] == [7, 14]
    assert [len(o) for o in model.generate(random_prompts([10, 3]), 9, NEVER)] == [7, 9]  # and the caller's limit
    assert len(model.generate(random_prompts([16]), 4, NEVER)[0]) == 1  # a full block still predicts one token
    with pytest.raises(ValueError, match="block_size"):
        model.generate(random_prompts([17]), 4, NEVER)


@pytest.mark.parametrize("prompts", [[[]], [[5, 6], []], []], ids=["empty", "one empty of two", "none"])
def test_generation_refuses_an_empty_prompt_or_none(prompts):
    """An empty prompt has no position to predict its first token from: it was an IndexError alone, and beside
    another prompt it was answered from padding; no prompts at all failed inside torch."""
    with pytest.raises(ValueError, match="prompts of 1 to block_size 16 tokens"):
        random_model(block_size=16).generate(prompts, 4, NEVER)


def test_a_short_prompt_beside_a_long_one_gives_its_tokens_alone():
    """Block 32: a 3-token prompt writes 30 tokens alone; beside a 20-token prompt it used to get 12."""
    model = random_model(block_size=32)
    short, long = random_prompts([3, 20], seed=5)
    alone = {c: [model.generate([p], 100, NEVER, use_cache=c)[0] for p in (short, long)] for c in (True, False)}
    assert alone[True] == alone[False]  # the cache changes nothing
    assert [len(a) for a in alone[True]] == [30, 13] and len(set(alone[True][0])) >= 5  # never stopped early
    for use_cache in (True, False):
        assert model.generate([short, long], 100, NEVER, use_cache=use_cache) == alone[True]
        assert model.generate([long, short, short], 100, NEVER, use_cache=use_cache) == [alone[True][i] for i in (1, 0, 0)]


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


# ---------------------------------------------------------------------------------------------
# The loss

def tagged_batch(n: int = 3, seed: int = 0):
    enc = D.char_encoding()
    s = D.tokenize(D.synthetic_task(n, seed), enc, block_size=96)
    return D.collate(s.ids, s.roles, "cpu")


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32))


def test_weighted_loss_sum_equals_full_projection():
    model = small_model()
    x, y, roles = tagged_batch()
    for weights in (sftkey.role_weights(), sftkey.role_weights(key_only=True), sftkey.role_weights(key_weight=3.0)):
        w = sftkey.token_weights(roles, weights)
        hidden = model(x)
        expected = (F.cross_entropy(model.lm_head(hidden).flatten(0, 1), y.flatten(), reduction="none")
                    * w.flatten()).sum()
        got = sftkey.weighted_loss_sum(hidden, model.lm_head, y, w)
        assert torch.allclose(got, expected, rtol=1e-5)
    empty = sftkey.weighted_loss_sum(model(x), model.lm_head, y, torch.zeros_like(w))
    assert empty.item() == 0.0


def test_token_weights_are_each_roles_weight_and_zero_at_padding():
    roles = torch.tensor([[sftkey.PROMPT, sftkey.THINK, sftkey.KEY, sftkey.PAD]])
    assert sftkey.token_weights(roles, (0.5, 2.0, 7.0)).tolist() == [[0.5, 2.0, 7.0, 0.0]]
    # Found in review: each weight reached every position, as 0 x weight elsewhere; an infinite one made them all NaN.
    assert sftkey.token_weights(roles, (0.0, 1.0, math.inf)).tolist() == [[0.0, 1.0, math.inf, 0.0]]


def test_dft_loss_is_probability_times_cross_entropy_and_its_gradient_that_of_minus_the_probability():
    """DFT (arXiv 2508.05629) scales each token's loss by its probability, held constant; d(-sg(p) log p) = -dp, so
    its gradient is exactly that of the negative weighted probability. Without the detach it would be
    -(1 + log p) dp: the loss value alone would not show it."""
    model = small_model()
    x, y, roles = tagged_batch()
    w = sftkey.token_weights(roles, sftkey.role_weights(key_weight=3.0))
    hidden = model(x).detach().requires_grad_()
    prob = F.softmax(model.lm_head(hidden).double(), dim=-1).gather(-1, y[..., None])[..., 0]
    expected = (w * prob * -prob.log()).sum()
    got = sftkey.weighted_loss_sum(hidden, model.lm_head, y, w, dft=True)
    assert torch.allclose(got.double(), expected, rtol=1e-5)
    (dft_grad,) = torch.autograd.grad(got, hidden)
    (prob_grad,) = torch.autograd.grad(-(w * prob).sum(), hidden)
    assert torch.allclose(dft_grad.double(), prob_grad.double(), rtol=1e-4, atol=1e-9)
    plain = sftkey.weighted_loss_sum(hidden, model.lm_head, y, w)
    assert got < plain  # every probability is below 1


def gradient(model: GPT, x, y, roles, key_only: bool) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    w = sftkey.token_weights(roles, sftkey.role_weights(key_only=key_only))
    (sftkey.weighted_loss_sum(model(x), model.lm_head, y, w) / w.sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_key_only_gradient_ignores_thinking_targets_but_not_key_targets():
    model = small_model()
    x, y, roles = tagged_batch()
    think, key = roles == sftkey.THINK, roles == sftkey.KEY
    y_think = torch.where(think, (y + 7) % 256, y)  # other targets at every thinking position
    y_key = y.clone()
    y_key[key.nonzero()[0].unbind()] += 1  # one key target changed
    assert not torch.equal(y_think, y) and not torch.equal(y_key, y)

    base = gradient(model, x, y, roles, key_only=True)
    assert same(gradient(model, x, y_think, roles, key_only=True), base)
    assert not same(gradient(model, x, y_key, roles, key_only=True), base)

    base = gradient(model, x, y, roles, key_only=False)
    assert not same(gradient(model, x, y_think, roles, key_only=False), base)
    assert not same(gradient(model, x, y_key, roles, key_only=False), base)
