"""The fast paths against the plain ones, the FLOP formula against counted FLOPs, and bench.py end to end.

Speed itself is never asserted: only that the fast paths compute the same thing and that the
benchmark runs and reports every figure.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import data as D
import runtime
import sftkey
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"stage 1": sftkey.role_weights(), "stage 2": sftkey.role_weights(key_only=True),
          "key x5": sftkey.role_weights(key_weight=5.0)}


@pytest.fixture(scope="module")
def batch():
    """Four synthetic examples of different lengths, so the batch has padding too."""
    enc = D.char_encoding()
    data = D.tokenize(D.synthetic_task(4, seed=3), enc, block_size=96)
    assert len({len(ids) for ids in data.ids}) > 1
    return D.collate(data.ids, data.roles, "cpu")


def _model(dtype=torch.float32, **overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32), **overrides})
    return GPT(config).to(dtype)


def _loss_and_grads(model: GPT, loss_sum, x, y, w) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model(x), model.lm_head, y, w) / w.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", STAGES)
def test_supervised_only_projection_equals_full_projection(batch, stage):
    x, y, roles = batch
    w = sftkey.token_weights(roles, STAGES[stage]).double()
    model = _model(torch.float64)
    fast = _loss_and_grads(model, sftkey.weighted_loss_sum, x, y, w)
    plain = _loss_and_grads(model, bench.full_projection_loss_sum, x, y, w)
    assert 0 < int((w != 0).sum()) < int((roles != sftkey.PAD).sum())  # the mask really skips positions
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=0)
    assert fast[1].keys() == plain[1].keys()
    for name in fast[1]:
        torch.testing.assert_close(fast[1][name], plain[1][name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("full", [True, False])
def test_flop_formula_matches_counted_matmul_flops(batch, full):
    """GPT.flops_per_token against PyTorch's FLOP counter over one forward and backward.

    The math attention kernel is forced so that the counter sees the attention products too.
    """
    x, y, roles = batch
    w = sftkey.token_weights(roles, STAGES["stage 2"])
    model = _model()
    loss_sum = bench.full_projection_loss_sum if full else sftkey.weighted_loss_sum
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_sum(model(x), model.lm_head, y, w).backward()
    positions = x.numel()
    projected = positions if full else int((w != 0).sum())
    expected = model.flops_per_token(x.size(1), projected / positions) * positions
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-6)


def test_mfu_is_formula_flops_over_peak():
    model = _model()
    peak = runtime.peak_flops("cpu", torch.float32, size=128, repeats=1)
    assert math.isfinite(peak) and peak > 0
    assert runtime.mfu(model, 1000.0, 50, 0.1, peak) == pytest.approx(model.flops_per_token(50, 0.1) * 1000.0 / peak)


def test_peak_memory_sees_the_full_logits(batch):
    """The step-memory tracker counts what is allocated, frees what is freed, and shows the logits."""
    with bench.PeakMemory() as tracker:
        a = torch.ones(1000, dtype=torch.float32) * 2
        del a
        b = torch.ones(10, dtype=torch.float32) * 2
    assert tracker.peak >= 4000 and tracker.current < 4000
    del b
    x, y, roles = batch
    w = sftkey.token_weights(roles, STAGES["stage 2"])
    model = _model(vocab_size=4096)
    peaks = {}
    for full in (True, False):
        loss_sum = bench.full_projection_loss_sum if full else sftkey.weighted_loss_sum
        with bench.PeakMemory() as tracker:
            loss_sum(model(x), model.lm_head, y, w).backward()
        peaks[full] = tracker.peak
        model.zero_grad(set_to_none=True)
    assert peaks[True] - peaks[False] >= x.numel() * 4096 * 4  # at least the float32 (B, T, vocab) logits


def test_batches_window_trades_padding_for_mixing():
    enc = D.char_encoding()
    data = D.tokenize(D.synthetic_task(640, seed=5), enc, block_size=96)
    shares = [bench.padding_share(data, 16, window, seed=0) for window in (1, 4, 16)]
    assert shares[0] > shares[1] > shares[2] >= 0
    batches = D.Batches(data, 16, seed=0, window=4)
    epoch = np.concatenate([batches.indices(i) for i in range(batches.per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch) == batches.per_epoch * 16  # each example once per epoch
    with pytest.raises(ValueError, match="window"):
        D.Batches(data, 16, seed=0, window=0)


def test_bench_runs_end_to_end_and_writes_every_figure(tmp_path):
    """The quick configuration, on GSM8K-shaped synthetic text (so it does not need ../shared/gsm8k)."""
    path = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--data", "", "--threads", "1", "--emulated_bf16",
                           "--json", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(path.read_text())
    for key in ("key_step_speedup", "sft_step_speedup", "kv_cache_speedup", "padding_fraction", "bf16_speedup",
                "mfu", "bf16_speedup_default_model"):
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, key
    assert out["padding_fraction"] < 1
    assert {"full", "sft", "key"} <= set(out["train_step"])
    assert out["train_step"]["key"]["projected_fraction"] < out["train_step"]["sft"]["projected_fraction"] < 1
    for title in ("Training step", "Greedy generation", "Padding", "Precision"):
        assert title in done.stdout
