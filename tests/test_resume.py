"""Interruptions: a run stopped by a signal and resumed ends with exactly the weights of an
uninterrupted run; a non-finite loss stops before it can spoil the weights; checkpoint writes are
atomic."""
import os
import signal
from dataclasses import replace

import pytest
import torch

import checkpoints
import data as D
import runtime
import sftkey
import train
from model import GPT, GPTConfig

LOST = "received: the run ends here; no training since the last checkpoint is lost"  # train.py's stop message
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
    """Handlers of the test's own for SIGINT, SIGTERM and SIGHUP while it runs, whatever the process
    started with (under nohup or as a background job SIGINT starts ignored); the originals are put back
    after. Distinct functions, so the test sees that a run restores the handler it found, not some default."""
    def on_sigint(signum, frame):  # as Python's default handler does
        raise KeyboardInterrupt

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    def on_sighup(signum, frame):
        raise SystemExit(128 + signum)
    handlers = {signal.SIGINT: on_sigint, signal.SIGTERM: on_sigterm, signal.SIGHUP: on_sighup}
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

    def get(self, i, device, **split):  # a real SIGINT to this process, while fetching that batch
        if i == batch:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, i, device, **split)
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


def _poison_training_step(monkeypatch, nth: int) -> None:
    """The nth training step's loss becomes NaN (validation is left alone)."""
    calls = {"n": 0}
    original = sftkey.weighted_loss_sum

    def poisoned(*args):
        loss = original(*args)
        if not torch.is_grad_enabled():  # validation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == nth else loss
    monkeypatch.setattr(sftkey, "weighted_loss_sum", poisoned)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison_training_step(monkeypatch, 9)
    with pytest.raises(FloatingPointError, match="step 8") as stop:
        train.run(_config(tmp_path, "--ckpt_interval", "4"))
    saved = torch.load(tmp_path / "sft_tag" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 8
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    # issue 18, item 11: the message names the checkpoint that is there, and the likely causes
    assert f"The last checkpoint, {tmp_path / 'sft_tag' / 'ckpt.pt'} at step 8, is intact." in str(stop.value)
    assert "a learning rate too high (this stage's peak is 0.002" in str(stop.value)


def test_non_finite_loss_before_any_checkpoint_says_so_and_does_not_blame_the_lr(tmp_path, monkeypatch):
    """Issue 18, item 11: the message used to say "The last checkpoint in OUT is intact; try a lower
    --lr" when no checkpoint existed, and at step 0, before any update, where the lr cannot be the cause."""
    _poison_training_step(monkeypatch, 1)
    with pytest.raises(FloatingPointError, match="sft_tag step 0") as stop:
        train.run(_config(tmp_path))
    message = str(stop.value)
    assert f"No checkpoint has been written to {tmp_path / 'sft_tag' / 'ckpt.pt'} yet." in message
    assert "its learning rate is not the cause" in message and "lower --lr" not in message
    assert not (tmp_path / "sft_tag" / "ckpt.pt").exists()


def test_non_finite_message_names_a_loss_weight_infinite_in_float32():
    """--key_weight 1e39 is finite as a Python float but infinite in float32, the loss's dtype."""
    stage = sftkey.Stage("sft_tag", sftkey.role_weights(key_weight=1e39), 9, 1e-3)
    message = runtime.non_finite_message(stage, 0, None)
    assert "a loss weight of 1e+39 (--weights, --stage2_weights or --key_weight), infinite in float32" in message
    assert "This stage writes no checkpoint." in message
    later = runtime.non_finite_message(replace(stage, weights=sftkey.role_weights(key_weight=50.0)), 5, None)
    # the loss is normalised by the sum of the weights: a large (finite) one is not a cause
    assert "a learning rate too high" in later and "loss weight" not in later
    assert "loss weight" not in runtime.non_finite_message(replace(stage, weights=sftkey.role_weights()), 5, None)


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
        original = runtime.print_result

        def print_result(name, *args):  # just after stage 1's checkpoint with its results: a SIGINT there,
            original(name, *args)  # outside the training steps, stops the run at once
            if name == "sft_tag":
                os.kill(os.getpid(), signal.SIGINT)

        for name, restore in (("resumed", checkpoints.restore_rng), ("unrestored", lambda saved, rank=0: None)):
            out = tmp_path / name
            monkeypatch.setattr(runtime, "print_result", print_result)
            with pytest.raises(runtime.Interrupted, match=f"SIGINT {LOST}"):
                train.run(_config(out))
            assert not (out / "sftkey_tag").exists()  # stage 2 never took a step
            assert "sft_tag" in torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)["results"]
            monkeypatch.setattr(runtime, "print_result", original)
            monkeypatch.setattr(checkpoints, "restore_rng", restore)
            train.run(_config(out, "--resume"))
            weights = _final_weights(out)
            same = all(torch.equal(weights[n], expected[n]) for n in expected)
            # Bitwise equal when restored; without restoring stage 2's dropout masks differ.
            assert same == (name == "resumed"), name
    finally:
        signal.signal(signal.SIGINT, previous)


def test_each_checkpoint_holds_the_rng_state_of_its_own_step(tmp_path):
    """A later periodic checkpoint records the RNG state at its step, not the one gathered for an earlier write:
    --resume from it must go on with the dropout masks the uninterrupted run draws next."""
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8))
    path = tmp_path / "sft_tag" / "ckpt.pt"
    stage = checkpoints.StageCheckpoint(str(path), _config(tmp_path), "sft_tag", [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        stage.save(2, model, None)
        torch.rand(100)  # the draws of steps 3 and 4
        at_step_4 = torch.get_rng_state()
        stage.save(4, model, None)
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 4 and torch.equal(saved["rng_ranks"][0]["rng"], at_step_4)
