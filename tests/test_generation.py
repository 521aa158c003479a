"""Greedy generation (`GPT.generate`) beyond its outputs, and the vocabulary the model is built with.

Generation that quietly stops using its KV cache gives the same tokens, only quadratically slower,
so comparing outputs (test_model.py) cannot see it: here the width of every forward call and the
cache's final length are checked. The `allowed` mask is checked where it matters, with the
padding rows of the embedding rigged to win the argmax. And `checkpoints.build_model` must round the
vocabulary up to a multiple of 64 while covering every id of the encoding, end-of-text included.
"""
import math

import pytest
import tiktoken
import torch

import checkpoints
import data as D
import model as M
import train
from model import GPT, GPTConfig

NEVER = -1  # a stop token that is never produced


def tiny_model(vocab: int = 64, block_size: int = 40, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=1, n_head=2, n_embd=16)).eval()


def record_fed_widths(model: GPT) -> list[int]:
    """The number of positions each forward call feeds, seen at the token embedding."""
    widths = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    return widths


@pytest.fixture
def caches(monkeypatch) -> list[M.KVCache]:
    """Every KVCache generate creates (model.py builds it by its module-level name)."""
    made = []

    class Recorded(M.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(M, "KVCache", Recorded)
    return made


# ---------------------------------------------------------------------------------------------
# The KV cache is really used

@pytest.mark.parametrize("lengths", [[5], [3, 7, 1]])
def test_with_cache_each_step_after_the_first_feeds_only_the_newest_token(caches, lengths):
    model = tiny_model()
    widths = record_fed_widths(model)
    new = 9
    out = model.generate([list(range(1, n + 1)) for n in lengths], new, NEVER, use_cache=True)
    width = max(lengths)  # prompts are left-padded to the longest
    assert [len(o) for o in out] == [new] * len(lengths)
    assert widths == [width] + [1] * (new - 1)
    assert len(caches) == 1
    assert caches[0].length == width + new - 1 == sum(widths)  # the last token is produced, never fed


def test_without_cache_every_step_feeds_the_whole_prefix(caches):
    model = tiny_model()
    widths = record_fed_widths(model)
    out = model.generate([[4, 5, 6, 7]], 6, NEVER, use_cache=False)
    assert len(out[0]) == 6
    assert widths == [4, 5, 6, 7, 8, 9]
    assert caches == []  # no cache is built at all


def test_cached_generation_that_stops_early_fed_only_what_it_produced(caches):
    model = tiny_model()
    free = model.generate([[2, 3]], 12, NEVER)[0]
    stop = free[4]
    expected = free[:free.index(stop) + 1]
    assert 2 < len(expected) < 12  # stops after a few steps, well before the limit
    widths = record_fed_widths(model)
    assert model.generate([[2, 3]], 12, stop) == [expected]
    assert widths == [2] + [1] * (len(expected) - 1)
    assert caches[-1].length == 2 + len(expected) - 1


# A row is done once it has its budget, not one step later: when the other rows stopped at their stop token,
# the batch ends with that row's last token. (Mutation audit: `budget < end + 1 - width`, one more forward
# call whose token was then cut; the tokens were right, so only the number of calls can tell.)

def test_a_batch_whose_last_running_row_reaches_its_budget_stops_with_that_token():
    model = tiny_model()  # block_size 40
    short = [2, 3]
    free = model.generate([short], 12, NEVER)[0]
    k = next(j for j in range(2, 12) if free[j] not in free[:j])  # a token first produced at step j + 1
    stop, budget = free[k], k + 3  # the short row stops after k + 1 tokens; the long row's budget is larger
    long_rows = ([t] * (41 - budget) for t in range(1, 64))  # 41 - budget tokens leave it `budget` to write
    long, long_free = next((row, out) for row in long_rows if stop not in (out := model.generate([row], 40, NEVER)[0]))
    assert len(long_free) == budget
    widths = record_fed_widths(model)
    for use_cache in (True, False):
        widths.clear()
        assert model.generate([short, long], 40, stop, use_cache=use_cache) == [free[:k + 1], long_free]
        assert len(widths) == budget, f"use_cache={use_cache}"  # one call per token of the row that ran longest


# ---------------------------------------------------------------------------------------------
# The allowed mask: the padding rows

def rigged_model(vocab: int, n_vocab: int) -> GPT:
    """Every position's final hidden state is the same vector b (ln_f's gain zeroed), and the
    embedding rows past n_vocab are 100 * b: they have by far the largest logits at every step."""
    model = tiny_model(vocab)
    with torch.no_grad():
        b = torch.randn(16)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        model.transformer.wte.weight[n_vocab:] = 100 * b
    return model


def test_generate_never_emits_an_id_outside_allowed_even_when_padding_rows_win():
    vocab, n_vocab = 64, 50
    model = rigged_model(vocab, n_vocab)
    unlimited = model.generate([[1, 2, 3]], 8, NEVER)[0]
    assert all(t >= n_vocab for t in unlimited)  # the rigging works: without the limit, padding ids win
    h = model.transformer.ln_f.bias  # the hidden state at every position
    best_real = int((model.lm_head.weight[:n_vocab] @ h).argmax())
    for use_cache in (True, False):
        out = model.generate([[1, 2, 3], [4]], 8, NEVER, use_cache=use_cache, allowed=torch.arange(vocab) < n_vocab)
        assert out == [[best_real] * 8] * 2


def test_evaluation_generates_only_ids_the_tokenizer_can_decode_even_when_padding_rows_win():
    """Through train.evaluate, whatever generate's limit parameter is called: the model's vocabulary is
    the encoding's rounded up to a multiple of 64, and the padding ids past enc.n_vocab must never come
    out, even when their logits are by far the largest (as the rigged model makes them at every step)."""
    enc = D.char_encoding()
    vocab = 64 * math.ceil(enc.n_vocab / 64)
    assert vocab > enc.n_vocab
    model = rigged_model(vocab, enc.n_vocab)
    prompts = [enc.encode_ordinary("Q: 1+2\n"), enc.encode_ordinary("Q: 4\n")]
    assert all(t >= enc.n_vocab for row in model.generate(prompts, 6, enc.eot_token) for t in row)  # unlimited
    generated, real = [], model.generate

    def checked(*args, **kwargs):  # what evaluate asks generate for, checked before it is decoded
        out = real(*args, **kwargs)
        past = sorted({t for row in out for t in row if t >= enc.n_vocab})
        assert not past, f"generate gave ids {past} that encoding {enc.name} (n_vocab {enc.n_vocab}) cannot decode"
        generated.extend(out)
        return out
    model.generate = checked
    examples = [D.Example("Q: 1+2", "1+2=3", "3"), D.Example("Q: 4", "4", "4")]
    result = train.evaluate(model, enc, examples, train.TrainConfig(block_size=40), "cpu", torch.float32)
    assert len(generated) == 2 and all(generated) and result["n"] == 2
    h = model.transformer.ln_f.bias  # the hidden state at every position
    best_real = int((model.lm_head.weight[:enc.n_vocab] @ h).argmax())  # what greedy decoding must pick instead
    assert all(row[0] == best_real for row in generated)


# ---------------------------------------------------------------------------------------------
# Vocabulary size of a built model

def byte_encoding_with(n_merges: int) -> tiktoken.Encoding:
    """256 byte tokens, `n_merges` two-letter merges, end-of-text last: n_vocab = 257 + n_merges."""
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(n_merges):
        ranks[bytes([97 + i // 26, 97 + i % 26])] = 256 + i
    return tiktoken.Encoding(f"bytes-{n_merges}", pat_str=r"[\s\S]+", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 256 + n_merges})


def small_config(**kw) -> train.TrainConfig:
    return train.TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, **kw)


@pytest.mark.parametrize("enc, expected", [
    (D.char_encoding(), None),  # the default encoding: n_vocab is not a multiple of 64
    (byte_encoding_with(0), 320),  # 257 ids -> 320
    (byte_encoding_with(63), 320),  # exactly 320 ids: no rounding needed, none added
    (byte_encoding_with(64), 384),  # one id more -> the next multiple
])
def test_build_model_rounds_the_vocabulary_up_to_a_multiple_of_64(enc, expected):
    model = checkpoints.build_model(small_config(), enc, "cpu")
    vocab = model.config.vocab_size
    if expected is None:
        assert enc.n_vocab % 64 != 0
        expected = 64 * math.ceil(enc.n_vocab / 64)
    assert vocab == expected and vocab % 64 == 0 and 0 <= vocab - enc.n_vocab < 64
    assert model.transformer.wte.num_embeddings == model.lm_head.out_features == vocab
    assert enc.eot_token == enc.n_vocab - 1 < vocab
    # The highest id, end-of-text, embeds and gets a logit.
    hidden = model(torch.tensor([[enc.eot_token, 0]]))
    assert model.lm_head(hidden).shape == (1, 2, vocab)


def test_char_encoding_model_embeds_every_token_of_a_tokenized_set():
    enc = D.char_encoding()
    model = checkpoints.build_model(small_config(), enc, "cpu")
    s = D.tokenize(D.synthetic_task(20, seed=0), enc, block_size=96)
    used = {int(t) for ids in s.ids for t in ids}
    assert enc.eot_token in used and max(used) < model.config.vocab_size
    assert {enc.encode_single_token(t) for t in ("<Thinking>", "</Thinking>", "<Answer>", "</Answer>")} <= used
