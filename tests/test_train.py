"""The training loop and the default run: per-role weights, the shift, a step's loss, the loss log, learning.

Per-role weights, the input/target/role shift, the loss of a step under gradient accumulation
(through `train.train` itself), the loss log, overfitting a few examples, and the default run in
miniature through the command line. The optimizer step is in test_optimization.py, the validation
loss in test_validation.py, the data stream in test_batches.py.
"""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

import data as D
import runtime
import sftkey
import train
from conftest import for_data
from model import GPT, GPTConfig
from sftkey import KEY, PAD, PROMPT, THINK


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy shared CPU OpenMP's waiting
    made small models ~100x slower (measured). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Weights and the shift

def test_role_weights_of_each_stage():
    assert sftkey.role_weights() == (0.0, 1.0, 1.0)
    assert sftkey.role_weights(key_only=True) == (0.0, 0.0, 1.0)
    assert sftkey.role_weights(key_weight=4.0) == (0.0, 1.0, 4.0)
    assert sftkey.role_weights(key_only=True, key_weight=2.0) == (0.0, 0.0, 2.0)


def test_token_weights_give_pad_zero():
    roles = torch.tensor([[PROMPT, THINK, THINK, KEY, KEY, PAD], [PROMPT, PROMPT, KEY, PAD, PAD, PAD]])
    assert sftkey.token_weights(roles, (0.0, 1.0, 1.0)).tolist() == [[0, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]]
    assert sftkey.token_weights(roles, (0.0, 0.0, 1.0)).tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]]
    assert sftkey.token_weights(roles, (0.0, 0.5, 3.0)).tolist() == [[0, .5, .5, 3, 3, 0], [0, 0, 3, 0, 0, 0]]
    assert sftkey.token_weights(roles, (0.0, 1.0, 1.0)).dtype.is_floating_point
    with torch.autocast("cpu", torch.bfloat16):  # whole-number weights, under autocast: float32 all the same
        whole = sftkey.token_weights(roles.int(), (0, 1, 3))
    assert whole.dtype == torch.float32 and whole.tolist() == [[0, 1, 1, 3, 3, 0], [0, 0, 3, 0, 0, 0]]


def test_collate_shift_position_t_predicts_token_t_plus_1_with_its_role():
    enc = D.char_encoding()
    tok = lambda s: enc.encode_single_token(s)  # noqa: E731
    short = D.tokenize([D.Example("Q: 1+2", "1+2=3", "3"), D.Example("Q: 5", "5", "5")], enc, 64)
    x, y, roles = D.collate(short.ids, short.roles, "cpu")
    ids = short.ids[0].tolist()
    # "Q: 1+2\n" (7 prompt tokens), <Thinking> 1+2=3 </Thinking> (7), <Answer> 3 </Answer> EOT (4)
    assert ids == [tok(c) for c in "Q: 1+2\n"] + [tok("<Thinking>")] + [tok(c) for c in "1+2=3"] + \
        [tok("</Thinking>"), tok("<Answer>"), tok("3"), tok("</Answer>"), enc.eot_token]
    assert x.shape == y.shape == roles.shape == (2, len(ids) - 1)
    assert x[0].tolist() == ids[:-1] and y[0].tolist() == ids[1:]
    # The prompt's last position (its newline) predicts the first <Thinking>, a THINK target.
    assert x[0, 6] == tok("\n") and y[0, 6] == tok("<Thinking>") and roles[0, 6] == THINK
    assert roles[0, :6].tolist() == [PROMPT] * 6  # prompt tokens predicted from the prompt
    # </Thinking> predicts <Answer> (KEY) and </Answer> predicts end-of-text (KEY).
    assert x[0, 13] == tok("</Thinking>") and y[0, 13] == tok("<Answer>") and roles[0, 13] == KEY
    assert x[0, -1] == tok("</Answer>") and y[0, -1] == enc.eot_token and roles[0, -1] == KEY
    assert roles[0].tolist() == [PROMPT] * 6 + [THINK] * 7 + [KEY] * 4
    # The shorter row is right-padded; its padding carries the PAD role and so no weight.
    n = len(short.ids[1]) - 1
    assert y[1, n - 1] == enc.eot_token and roles[1, n:].tolist() == [PAD] * (x.shape[1] - n)
    assert int(sftkey.token_weights(roles, sftkey.role_weights()).sum()) == 11 + 3 + 4  # THINK+KEY targets
    assert int(sftkey.token_weights(roles, sftkey.role_weights(key_only=True)).sum()) == 4 + 4


# ---------------------------------------------------------------------------------------------
# The loss of one optimizer step, through train.train

class GradRecorder(torch.optim.Optimizer):
    """Stands in for AdamW inside train.train: keeps the gradient it is given, changes nothing."""

    def __init__(self, model: torch.nn.Module):
        self.names = [name for name, _ in model.named_parameters()]
        super().__init__(list(model.parameters()), {"lr": 0.0})
        self.grads: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.grads.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for n, p in zip(self.names, params)})


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=1, n_head=2, n_embd=32))


def train_one_step(model: GPT, data: D.TokenizedSet, weights, batch_size: int, grad_accum: int):
    """The gradient and logged loss of train.train's first step (no clipping, no decay)."""
    model = copy.deepcopy(model)
    recorder = GradRecorder(model)
    model.configure_optimizer = lambda *args, **kwargs: recorder
    cfg = train.TrainConfig(batch_size=batch_size, grad_accum=grad_accum, grad_clip=0.0, weight_decay=0.0,
                            log_interval=1, eval_interval=1000, seed=5)
    log: list[dict] = []
    train.train(model=model, train_set=data, val_set=data, cfg=cfg, stage=sftkey.Stage("test", weights, 1, 1.0),
                device="cpu", dtype=torch.float32, log=log)
    assert len(recorder.grads) == 1
    losses = [entry["loss"] for entry in log if "loss" in entry]
    return recorder.grads[0], losses[0]


def direct_gradient(model: GPT, parts: list[tuple[list, list]], weights, normalise: str):
    """Reference: the step loss written out by hand over the micro-batches `parts`.

    normalise="step": sum of weighted token losses over all parts / sum of all weights (the rule);
    "mean_of_means": each part's own weighted mean, averaged (the known-wrong rule).
    """
    model = copy.deepcopy(model)
    sums, totals = [], []
    for ids, roles in parts:
        x, y, r = D.collate(ids, roles, "cpu")
        w = sftkey.token_weights(r, weights)
        sums.append(sftkey.weighted_loss_sum(model(x), model.lm_head, y, w))
        totals.append(w.sum())
    if normalise == "step":
        loss = sum(sums) / sum(totals)
    else:
        loss = sum(s / t for s, t in zip(sums, totals)) / len(sums)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, float(loss.detach())


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)


@pytest.fixture(scope="module")
def six_examples() -> D.TokenizedSet:
    # Reasoning and answers of very different lengths: Batches groups similar lengths, so the three
    # micro-batches of two hold very different numbers of supervised tokens in every stage.
    examples = [D.Example("Q: 1+1", "1+1=2", "2"), D.Example("Q: 3-1", "3-1=2", "2"),
                D.Example("Q: 9+8+7", "9+8=17 17+7=24", "24"), D.Example("Q: 5+4", "5+4=9", "9"),
                D.Example("Q: 99+99+99+99", "99+99=198 198+99=297 297+99=396", "396"),
                D.Example("Q: 10-90-90-90", "10-90=-80 -80-90=-170 -170-90=-260", "-260")]
    return D.tokenize(examples, D.char_encoding(), block_size=96)


@pytest.mark.parametrize("weights", [sftkey.role_weights(), sftkey.role_weights(key_only=True),
                                     sftkey.role_weights(key_weight=3.0)])
def test_accumulated_micro_batches_equal_one_batch(six_examples, weights):
    model = tiny_model()
    accumulated, acc_loss = train_one_step(model, six_examples, weights, batch_size=2, grad_accum=3)
    whole, whole_loss = train_one_step(model, six_examples, weights, batch_size=6, grad_accum=1)
    everything = [(six_examples.ids, six_examples.roles)]
    reference, ref_loss = direct_gradient(model, everything, weights, "step")
    assert max_rel_diff(accumulated, reference) < 1e-4
    assert max_rel_diff(whole, reference) < 1e-4
    assert acc_loss == pytest.approx(ref_loss, rel=1e-5) and whole_loss == pytest.approx(ref_loss, rel=1e-5)
    # The comparison can fail: averaging the micro-batches' own means gives another gradient.
    batches = D.Batches(six_examples, 2, seed=5)
    parts = [([six_examples.ids[j] for j in batches.indices(i)], [six_examples.roles[j] for j in batches.indices(i)])
             for i in range(3)]
    wrong, _ = direct_gradient(model, parts, weights, "mean_of_means")
    assert max_rel_diff(wrong, reference) > 1e-2


def test_micro_batch_with_zero_weight_adds_nothing(six_examples):
    key_only = sftkey.role_weights(key_only=True)
    ids, roles = six_examples.ids, six_examples.roles
    no_key = roles[1].copy()
    no_key[:] = PROMPT  # a micro-batch whose every target is prompt (or padding): weight 0 in stage 2
    mixed = D.TokenizedSet(six_examples.examples[:2], [ids[0], ids[1]], [roles[0], no_key], {})
    alone = D.TokenizedSet(six_examples.examples[:1], [ids[0]], [roles[0]], {})
    with_empty, loss = train_one_step(tiny_model(), mixed, key_only, batch_size=1, grad_accum=2)
    without, loss_alone = train_one_step(tiny_model(), alone, key_only, batch_size=1, grad_accum=1)
    assert all(torch.isfinite(g).all() for g in with_empty.values()) and np.isfinite(loss)
    assert max_rel_diff(with_empty, without) < 1e-5
    assert loss == pytest.approx(loss_alone, rel=1e-6)

    nothing = D.TokenizedSet(six_examples.examples[1:2], [ids[1]], [no_key], {})
    grads, loss = train_one_step(tiny_model(), nothing, key_only, batch_size=1, grad_accum=1)
    assert loss == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


# The step loss is sum(weight x token loss) / sum(weight): only the weights' ratios matter, also when a step's
# total weight is below 1. (Mutation audit: the total clamped at 1 instead of 1e-8, so small weights such as
# 0,0,0.001 shrank the gradient by their scale; every default weight has a step total far above 1.)

def test_only_the_ratios_of_the_weights_matter_even_when_a_steps_total_weight_is_below_one(six_examples):
    small = (0.0, 0.0, 1e-3)
    roles = D.collate(six_examples.ids, six_examples.roles, "cpu")[2]
    assert 0 < float(sftkey.token_weights(roles, small).sum()) < 0.1  # under 100 key targets in the six examples
    grads_small, loss_small = train_one_step(tiny_model(), six_examples, small, batch_size=6, grad_accum=1)
    # The reference: the loss with weights 0,0,1 written out by hand, sum of key token losses / their number.
    reference, ref_loss = direct_gradient(tiny_model(), [(six_examples.ids, six_examples.roles)], (0.0, 0.0, 1.0),
                                          "step")
    assert max_rel_diff(grads_small, reference) < 1e-4
    assert loss_small == pytest.approx(ref_loss, rel=1e-5)  # the mean key loss, not a thousandth of it


# ---------------------------------------------------------------------------------------------
# The loss log: every log_interval-th step and always the last step of a stage.
# (Mutation audit: the `or step + 1 == iters` dropped, so a stage's final loss was never logged.)

def test_loss_is_logged_every_log_interval_steps_and_at_the_last_step(six_examples):
    log = []
    model = tiny_model()
    model.configure_optimizer = lambda *args, **kwargs: GradRecorder(model)  # AdamW not needed
    cfg = train.TrainConfig(batch_size=2, log_interval=3, eval_interval=1000, warmup_iters=0, weight_decay=0.0, seed=7)
    train.train(model, six_examples, six_examples, cfg, sftkey.Stage("stage_x", sftkey.role_weights(), 5, 1e-3), "cpu",
                torch.float32, log)
    loss_steps = [row["step"] for row in log if "val_key" not in row]
    assert loss_steps == [0, 3, 4]
    assert all(row["stage"] == "stage_x" for row in log)
    val_steps = [row["step"] for row in log if "val_key" in row]
    assert val_steps == [0, 4]  # eval_interval 1000: the first step and the last


# ---------------------------------------------------------------------------------------------
# The learning-rate schedule

@pytest.mark.parametrize("iters, warmup_iters", [(1500, 100), (300, 100), (57, 3), (10, 0), (1, 5)])
def test_schedule_reaches_the_peak_once_and_ends_exactly_at_the_floor(iters, warmup_iters):
    """Issue 17, item 6: the warm-up used to reach the peak at step w - 1 and the cosine start there again
    at step w (two steps at the peak), and the last step ended a hair above the floor. Against an
    independent formula: steps 0..w on one straight line from 0 to the peak, then a cosine over
    steps w..iters-1 from the peak to exactly peak x min_lr_ratio."""
    cfg = train.TrainConfig(warmup_iters=warmup_iters, min_lr_ratio=0.1)
    peak, floor = 3e-4, 3e-4 * 0.1
    lrs = np.array([train.lr_at(step, iters, peak, cfg) for step in range(iters)])
    w = min(warmup_iters, iters // 10)
    rise = peak * np.arange(1, w + 2) / (w + 1)  # steps 0..w
    fall = floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * np.linspace(0, 1, iters - w)))  # steps w..iters-1
    np.testing.assert_allclose(lrs, np.concatenate([rise[:-1], fall]) if iters > 1 else [peak], rtol=1e-12)
    assert lrs[w] == peak and np.sum(lrs == peak) == 1 and lrs.min() > 0  # the peak once; no step at lr 0
    if iters > 1:
        assert lrs[-1] == floor and np.all(np.diff(lrs[:w + 1]) > 0) and np.all(np.diff(lrs[w:]) < 0)


def test_a_stage_at_learning_rate_zero_is_refused_naming_both_flags(tmp_path, capsys):
    """Issue 17, item 6: --stage2_lr 0 (the default) means lr x min_lr_ratio, so --min_lr_ratio 0 made every
    stage-2 step a no-op, logged lr 0 and the weights unchanged. Now an error, before anything runs."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*MINI, "--min_lr_ratio", "0", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--stage2_lr" in err and "--min_lr_ratio" in err
    assert not (tmp_path / "out").exists()
    for fine in (["--stage2_lr", "1e-4"], ["--stage2_iters", "0"]):  # a stage-2 peak of its own, or no stage 2
        train.runtime.check_config(train.parse_args(["--min_lr_ratio", "0", *fine]))


# ---------------------------------------------------------------------------------------------
# Learning

def test_tiny_model_overfits_a_few_examples_and_generates_them():
    enc = D.char_encoding()
    examples = D.synthetic_task(4, seed=3)
    data = D.tokenize(examples, enc, block_size=64)
    cfg = train.TrainConfig(batch_size=4, block_size=64, lr=3e-3, warmup_iters=10, weight_decay=0.0,
                            log_interval=1000, eval_interval=1000, eval_batch_size=4, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=64))
    before = train.evaluate(model, enc, examples, cfg, "cpu", torch.float32)
    train.train(model=model, train_set=data, val_set=data, cfg=cfg,
                stage=sftkey.Stage("overfit", sftkey.role_weights(), 200, cfg.lr), device="cpu", dtype=torch.float32,
                log=[])
    model.eval()
    for ex, ids in zip(examples, data.ids):
        prompt = enc.encode_ordinary(ex.prompt + sftkey.PROMPT_SEP)
        assert ids[:len(prompt)].tolist() == prompt
        assert model.generate([prompt], 64, enc.eot_token) == [ids[len(prompt):].tolist()]
    after = train.evaluate(model, enc, examples, cfg, "cpu", torch.float32)
    assert (after["acc"], after["fmt"], after["composite"], after["n"]) == (1.0, 1.0, pytest.approx(1.0), 4)
    assert before["fmt"] == 0.0 and before["acc"] < 1.0  # it was learnt, not there from the start


BOUNDARY_BLOCK = 37
# Two examples of exactly BOUNDARY_BLOCK + 1 tokens (sftkey-chars: one token a character or tag, and
# end-of-text): the longest that training keeps. One has a short prompt and a long reasoning, the other
# a long prompt and a short one, so batched together the short prompt sits beside a long one.
BOUNDARY_EXAMPLES = [D.Example("a", "12+34=46 46-5=41 41+9=50 50-8", "42"),
                     D.Example("Q: what is two plus one, then?", "x", "3")]


@pytest.fixture(scope="module")
def boundary_model():
    """A tiny model that has learnt BOUNDARY_EXAMPLES by heart (about a second of training)."""
    enc = D.char_encoding()
    data = D.tokenize(BOUNDARY_EXAMPLES, enc, block_size=BOUNDARY_BLOCK)
    cfg = train.TrainConfig(batch_size=2, block_size=BOUNDARY_BLOCK, lr=1e-2, warmup_iters=5, weight_decay=0.0,
                            log_interval=1000, eval_interval=1000, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=BOUNDARY_BLOCK, n_layer=1, n_head=2, n_embd=32))
    train.train(model=model, train_set=data, val_set=data, cfg=cfg,
                stage=sftkey.Stage("overfit", sftkey.role_weights(), 80, cfg.lr), device="cpu", dtype=torch.float32,
                log=[])
    return model.eval(), enc, data, cfg


def test_an_example_of_block_size_plus_one_tokens_is_kept_learnt_and_written_in_full(boundary_model):
    """One rule for the longest example (issue 17, item 2): training keeps len(ids) - 1 <= block_size
    (the model reads all but end-of-text), so generation may write up to block_size + 1 tokens in all;
    it used to stop at block_size, one short of end-of-text, and such an example always scored Fmt 0."""
    model, enc, data, cfg = boundary_model
    assert [len(ids) for ids in data.ids] == [BOUNDARY_BLOCK + 1] * 2 and data.summary["dropped_too_long"] == 0
    with pytest.raises(D.DataError, match="longer than --block_size"):  # one token more is dropped
        D.tokenize(BOUNDARY_EXAMPLES, enc, block_size=BOUNDARY_BLOCK - 1)
    for ex, ids in zip(BOUNDARY_EXAMPLES, data.ids):
        prompt = enc.encode_ordinary(ex.prompt + sftkey.PROMPT_SEP)
        assert model.generate([prompt], BOUNDARY_BLOCK, enc.eot_token) == [ids[len(prompt):].tolist()]
    result = train.evaluate(model, enc, BOUNDARY_EXAMPLES, cfg, "cpu", torch.float32)
    assert (result["acc"], result["fmt"]) == (1.0, 1.0)


def test_evaluation_scores_the_same_at_any_eval_batch_size(boundary_model):
    """Issue 17, item 1: every row of a batch used to get block_size minus the longest prompt, so the short
    prompt, batched beside the long one, was cut inside its reasoning: Acc 1.0 alone, 0.5 together."""
    model, enc, data, cfg = boundary_model
    scores = [train.evaluate(model, enc, BOUNDARY_EXAMPLES, dataclasses.replace(cfg, eval_batch_size=size), "cpu",
                             torch.float32) for size in (1, 64)]
    assert [s["acc"] for s in scores] == [1.0, 1.0]  # before: [1.0, 0.5]
    assert [s["fmt"] for s in scores] == [1.0, 1.0] and scores[0]["responses"] == scores[1]["responses"]


# ---------------------------------------------------------------------------------------------
# The default run in miniature, through the command line

MINI = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_train", "60", "--n_val", "6", "--n_test", "5",
        "--max_iters", "4", "--stage2_iters", "2", "--batch_size", "8", "--warmup_iters", "1",
        "--log_interval", "1", "--eval_interval", "2", "--device", "cpu", "--dtype", "float32"]


def test_default_run_in_miniature_writes_results_and_checkpoints(tmp_path, capsys):
    train.main([*MINI, "--out_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| sft_tag |" in printed and "| sftkey_tag |" in printed

    with open(tmp_path / "results.json") as f:
        summary = json.load(f)
    assert list(summary["results"]) == ["sft_tag", "sftkey_tag"]
    for r in summary["results"].values():
        assert r["n"] == 5 and len(r["correct"]) == 5
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["fmt"] <= 1.0
        assert r["composite"] == pytest.approx(0.7 * r["acc"] + 0.3 * r["fmt"])
    train_summary, val_summary = summary["data"]
    assert train_summary["examples"] + train_summary["dropped_too_long"] == 54 and val_summary["examples"] == 6
    for s in summary["data"]:
        assert {"straddling_tokens", "prompt_prefix_mismatches", "key_fraction"} <= set(s)
    assert summary["config"]["max_iters"] == 4 and summary["config"]["stage2_iters"] == 2
    # What else moves the numbers: the dtype auto chose; another CPU kernel width or thread count sums in another order.
    assert summary["machine"] == {"dtype": "float32", "device": runtime.device_name("cpu"),
                                  "threads": torch.get_num_threads(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
                                  "torch": torch.__version__, "cuda": torch.version.cuda,  # None: a CPU build of PyTorch
                                  "ranks": 1}  # torchrun's processes: they multiply the batch
    assert f"{summary['machine']['cpu_kernels']} CPU kernels, {torch.get_num_threads()} threads" in printed

    log = summary["log"]
    steps = {stage: [e["step"] for e in log if e["stage"] == stage and "loss" in e] for stage in summary["results"]}
    assert steps == {"sft_tag": [0, 1, 2, 3], "sftkey_tag": [0, 1]}
    for stage in summary["results"]:  # validation loss split by role in both stages
        val = [e for e in log if e["stage"] == stage and "val_key" in e]
        assert val and all(np.isfinite(e["val_thinking"]) and np.isfinite(e["val_key"]) for e in val)
    assert all(np.isfinite(e["loss"]) for e in log if "loss" in e)

    ckpts = {stage: torch.load(tmp_path / stage / "ckpt.pt", weights_only=True) for stage in ("sft_tag", "sftkey_tag")}
    assert ckpts["sft_tag"]["step"] == 4 and ckpts["sftkey_tag"]["step"] == 2
    for ckpt in ckpts.values():
        assert ckpt["model_config"]["n_embd"] == 32 and ckpt["optimizer"] is not None
    moved = [k for k in ckpts["sft_tag"]["model"] if not torch.equal(ckpts["sft_tag"]["model"][k],
                                                                     ckpts["sftkey_tag"]["model"][k])]
    assert moved  # stage 2 trained further


def test_data_without_eval_data_trains_and_says_it_has_no_test_set(tmp_path, capsys, monkeypatch):
    """Issue 17, item 8: --data without --eval_data used to print 'Acc nan' on 'n 0' and exit 0. It still
    trains (and checkpoints), but says before training that there is no test set and scores nothing."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}", "thinking": f"{a}+{b}={a + b}", "answer": str(a + b)})
                            + "\n" for a in range(5) for b in range(4)))
    monkeypatch.setattr(train.runtime, "peak_flops", lambda *args: None)  # no MFU: its CPU measurement takes ~2 s
    train.main([*for_data(MINI), "--data", str(path), "--format", "tagged", "--n_val", "2", "--max_iters", "2",
                "--stage2_iters", "1", "--out_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "test: none" in printed and printed.index("test: none") < printed.index("sft_tag step")
    assert "sft_tag: not evaluated, no test set" in printed and "nan" not in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [(r["n"], r["acc"], r["composite"]) for r in results.values()] == [(0, None, None)] * 2
    assert (tmp_path / "out" / "sftkey_tag" / "ckpt.pt").exists()


def test_help_exits_zero_and_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    squeezed = "".join(text.split())  # argparse re-wraps help text
    for f in dataclasses.fields(train.TrainConfig):
        assert f"--{f.name}" in text
        assert "".join(f.metadata["help"].split()) in squeezed, f"--{f.name} is not documented"
    # The flags other tools rely on (issue 2).
    for flag in ("out_dir", "data", "format", "encoding", "init_from", "key_only", "max_iters", "batch_size",
                 "block_size", "n_layer", "n_head", "n_embd", "lr", "seed", "device", "dtype", "eval_only",
                 "eval_limit"):
        assert f"--{flag} " in text or f"--{flag}\n" in text
