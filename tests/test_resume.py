"""Interruptions: a run stopped by a signal and resumed ends with exactly the weights of an
uninterrupted run; a non-finite loss stops before it can spoil the weights; checkpoint writes are
atomic."""
import os
import signal

import pytest
import torch

import checkpoints
import data as D
import runtime
import sftkey
import train
from model import GPT, GPTConfig

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_train", "300",
        "--n_val", "20", "--n_test", "4", "--max_iters", "12", "--stage2_iters", "6", "--warmup_iters", "2",
        "--log_interval", "4", "--eval_interval", "100", "--dtype", "float32", "--device", "cpu",
        "--dropout", "0.1"]  # dropout makes the result depend on the RNG state too


def _config(out_dir, *extra: str) -> train.TrainConfig:
    return train.parse_args([*TINY, "--out_dir", str(out_dir), *extra])


def _final_weights(out_dir) -> dict:
    return torch.load(os.path.join(out_dir, "sftkey_tag", "ckpt.pt"), weights_only=True)["model"]


@pytest.fixture
def own_signal_handlers():
    """Handlers of the test's own for SIGINT and SIGTERM while it runs, whatever the process started
    with (under nohup or as a background job SIGINT starts ignored); the originals are put back after.
    Distinct functions, so the test sees that a run restores the handler it found, not some default."""
    def on_sigint(signum, frame):  # as Python's default handler does
        raise KeyboardInterrupt

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)
    handlers = {signal.SIGINT: on_sigint, signal.SIGTERM: on_sigterm}
    before = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield handlers
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("stage, at", [("sft_tag", 5), ("sftkey_tag", 3)])
def test_resume_after_signal_gives_identical_weights(tmp_path, monkeypatch, own_signal_handlers, stage, at):
    straight = train.run(_config(tmp_path / "straight"))
    expected = _final_weights(tmp_path / "straight")

    out = tmp_path / "interrupted"
    original = D.Batches.get
    batch = at + (12 if stage == "sftkey_tag" else 0)  # stage 2 reads on after stage 1's 12 batches

    def get(self, i, device):  # a real SIGINT to this process, while fetching that batch
        if i == batch:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, i, device)
    monkeypatch.setattr(D.Batches, "get", get)
    with pytest.raises(runtime.Interrupted, match="--resume"):
        train.run(_config(out))
    saved = torch.load(out / stage / "ckpt.pt", weights_only=True)
    assert saved["step"] == at + 1  # the step in flight was finished, then checkpointed
    for sig, handler in own_signal_handlers.items():  # the handlers installed before the run, restored
        assert signal.getsignal(sig) is handler, sig.name

    monkeypatch.setattr(D.Batches, "get", original)
    summary = train.run(_config(out, "--resume"))
    resumed = _final_weights(out)
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    assert set(summary["results"]) == {"sft_tag", "sftkey_tag"}
    for name in ("sft_tag", "sftkey_tag"):
        assert summary["results"][name]["correct"] == straight["results"][name]["correct"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = sftkey.weighted_loss_sum

    def poisoned(*args):
        loss = original(*args)
        if not torch.is_grad_enabled():  # validation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 9 else loss  # the 9th training step goes wrong
    monkeypatch.setattr(sftkey, "weighted_loss_sum", poisoned)
    with pytest.raises(FloatingPointError, match="step 8"):
        train.run(_config(tmp_path, "--ckpt_interval", "4"))
    saved = torch.load(tmp_path / "sft_tag" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 8
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8))
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint(path, model, None, cfg, step=1)

    def crash(obj, f, *args, **kwargs):  # f: the open temporary file
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(path, model, None, cfg, step=2)
    assert torch.load(path, weights_only=True)["step"] == 1


def test_resume_between_stages_restores_the_rng(tmp_path, monkeypatch):
    """Stopped after stage 1's final checkpoint, before stage 2's first step: --resume skips the
    finished stage 1 and starts stage 2 from the RNG state stage 1 ended with, as an uninterrupted
    run does (with dropout on, the weights depend on it)."""
    # A process started with SIGINT ignored (a background job) would ignore the signals below.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        train.run(_config(tmp_path / "straight"))
        expected = _final_weights(tmp_path / "straight")
        original = D.Batches.get

        def get(self, i, device):  # stage 2's first batch: two SIGINTs, the second stops at once
            if i == 12:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return original(self, i, device)

        for name, restore in (("resumed", checkpoints.restore_rng), ("unrestored", lambda saved: None)):
            out = tmp_path / name
            monkeypatch.setattr(D.Batches, "get", get)
            with pytest.raises(KeyboardInterrupt):
                train.run(_config(out))
            assert not (out / "sftkey_tag").exists()  # stage 2 never took a step
            assert "sft_tag" in torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)["results"]
            monkeypatch.setattr(D.Batches, "get", original)
            monkeypatch.setattr(checkpoints, "restore_rng", restore)
            train.run(_config(out, "--resume"))
            weights = _final_weights(out)
            same = all(torch.equal(weights[n], expected[n]) for n in expected)
            # Bitwise equal when restored; without restoring stage 2's dropout masks differ.
            assert same == (name == "resumed"), name
    finally:
        signal.signal(signal.SIGINT, previous)
