"""Stop signals at every moment of a run, sent by another process to `python train.py` (issue 18,
items 9 and 10): whenever SIGINT, SIGTERM or SIGHUP comes, the run ends at the next safe point with
one line on stderr (after the notices a signal in training prints) and exit code 130, never a traceback,
and what it wrote resumes exactly.

The child is train.py's main with one hook that prints MARK at a chosen moment (a training batch,
an evaluation, the data loading); the test waits for that line, then signals. Where the moment would
pass faster than a signal arrives (a tiny model's training step), the hook also waits there.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import runtime
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_train", "300",
        "--n_val", "20", "--n_test", "4", "--max_iters", "12", "--stage2_iters", "6", "--warmup_iters", "2",
        "--log_interval", "1", "--eval_interval", "100", "--dtype", "float32", "--device", "cpu",
        "--dropout", "0.1"]  # dropout: a resumed run equals a straight one only with the RNG restored too
# seconds of generation, time to be cut short; no validation answers, so the only evaluations are the tests
LOST = "received: the run ends here; no training since the last checkpoint is lost"  # train.py's stop message
LONG_EVALUATION = ["--n_test", "300", "--eval_batch_size", "1", "--val_acc_n", "0"]

CHILD = """
import signal, sys, time
import data as D, runtime, train
where, argv = sys.argv[1], sys.argv[2:]
runtime.peak_flops = lambda *args, **kwargs: 1e12  # timing the CPU's peak (for MFU) costs seconds: not tested here

def mark():
    print("MARK", flush=True)

if where.startswith("batch:"):  # MARK while fetching this batch of a training step, which then waits for
    at, get = int(where[6:]), D.Batches.get  # the signal (however late the test sends it) and half a second more
    def get_marked(self, i, device, **split):
        if i == at:
            mark()
            stop = signal.getsignal(signal.SIGINT).__self__  # the run's StopSignal
            for _ in range(1000):
                if stop.received:
                    break
                time.sleep(0.01)
            time.sleep(0.5)
        return get(self, i, device, **split)
    D.Batches.get = get_marked
elif where.startswith("evaluate:"):  # MARK as the n-th evaluation starts
    nth, evaluate, calls = int(where[9:]), train.evaluate, []
    def evaluate_marked(*args):
        calls.append(1)
        if len(calls) == nth:
            mark()
        return evaluate(*args)
    train.evaluate = evaluate_marked
elif where.startswith("save:"):  # MARK inside the n-th checkpoint's first write, which waits for the signal
    import checkpoints as ckpts
    nth, save, write, saves = int(where[5:].split("@")[0]), ckpts.save_checkpoint, ckpts._Recording.write, []
    def save_counted(*args, **kwargs):
        saves.append(1)
        return save(*args, **kwargs)
    def write_marked(self, data):
        if len(saves) == nth and not self.f.tell():
            mark()
            stop = signal.getsignal(signal.SIGINT).__self__
            while not stop.received:
                time.sleep(0.01)
        return write(self, data)
    ckpts.save_checkpoint, ckpts._Recording.write = save_counted, write_marked
elif where == "load":  # MARK as the data loading starts, which then takes a while
    load = D.load_data
    def load_marked(*args):
        mark()
        time.sleep(5)
        return load(*args)
    D.load_data = load_marked
(__import__("experiment").main if where.endswith("@experiment") else train.main)(argv)
"""


def run_child(where: str, flags: list[str], *signals: signal.Signals, gap: float = 0.05) -> tuple[int, str, str]:
    """train.py with `flags`; once it prints MARK (at `where`), send `signals`, `gap` seconds apart.
    Returns (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, where, *flags], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    try:
        if signals:
            for line in proc.stdout:
                seen.append(line)
                if line.strip() == "MARK":
                    break
            else:
                raise AssertionError(f"the child ended without reaching {where}: {''.join(seen)}{proc.stderr.read()}")
            for k, sig in enumerate(signals):
                time.sleep(gap if k else 0)
                proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + out, err


def assert_stopped(code: int, err: str, *fragments: str) -> str:
    """Exit 130, no traceback, and the last line on stderr the one that says what stopped the run."""
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: "), err
    for fragment in fragments:
        assert fragment in last, (fragment, err)
    return last


def weights(out_dir: Path, stage: str = "sftkey_tag") -> dict:
    return torch.load(out_dir / stage / "ckpt.pt", weights_only=True)["model"]


def test_double_sigint_50ms_apart_finishes_the_step_checkpoints_it_and_resumes_bitwise(tmp_path, monkeypatch):
    """Item 10: the second SIGINT used to raise KeyboardInterrupt mid-step (a traceback, exit -2, the
    step lost). Now it repeats the notice; the step in flight (the 6th, batch 5) completes and is
    checkpointed, and the resumed run ends with the weights of an uninterrupted one."""
    out = tmp_path / "interrupted"
    code, _, err = run_child("batch:5", [*TINY, "--out_dir", str(out)], signal.SIGINT, signal.SIGINT)
    assert_stopped(code, err, "after step 6 of 12", "--resume")
    assert "SIGINT received again: already stopping" in err
    assert torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)["step"] == 6

    code, _, err = run_child("none", [*TINY, "--out_dir", str(out), "--resume"])
    assert code == 0, err
    monkeypatch.setattr(runtime, "peak_flops", lambda *args, **kwargs: 1e12)  # as in the child: MFU only
    train.run(train.parse_args([*TINY, "--out_dir", str(tmp_path / "straight")]))
    expected, resumed = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


def test_sigterm_during_an_evaluation_stops_at_once(tmp_path):
    """Item 10: SIGTERM during stage 1's evaluation used to let it run to the end, then train one
    more step and a validation pass before exiting. Now it stops there: no result of stage 1, no
    step of stage 2; stage 1's weights were checkpointed before the evaluation, so --resume redoes
    only the evaluation."""
    out = tmp_path / "out"
    code, stdout, err = run_child("evaluate:1", [*TINY, *LONG_EVALUATION, "--out_dir", str(out)], signal.SIGTERM)
    assert_stopped(code, err, f"SIGTERM {LOST}", "--resume")
    assert "sft_tag: Acc" not in stdout and "sftkey_tag step" not in stdout, stdout
    saved = torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 12 and "sft_tag" not in saved["results"]
    assert not (out / "sftkey_tag").exists()


def test_sigterm_during_the_final_evaluation_exits_130_not_0(tmp_path):
    """Item 10: during the last evaluation SIGTERM used to be ignored (exit 0 once it was done)."""
    out = tmp_path / "out"
    flags = [*TINY, *LONG_EVALUATION, "--stage2_iters", "0", "--out_dir", str(out)]  # one stage: its evaluation
    code, stdout, err = run_child("evaluate:1", flags, signal.SIGTERM)  # is the last
    assert_stopped(code, err, f"SIGTERM {LOST}")
    assert "sft_tag: Acc" not in stdout and not (out / "results.json").exists()
    assert torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)["step"] == 12  # its weights, kept


def test_sigterm_inside_a_checkpoint_write_waits_for_it_and_exits_130(tmp_path):
    """Found in review: a signal inside torch.save's writer (here, the write after stage 1's evaluation) came out of
    its C++ as "unexpected pos", reported as a failed disk write (exit 1, no --resume advice). The write now
    finishes first: exit 130, and the checkpoint holds the evaluation, so --resume only writes the results."""
    out = tmp_path / "out"
    code, _, err = run_child("save:2", [*TINY, "--stage2_iters", "0", "--out_dir", str(out)], signal.SIGTERM)
    assert_stopped(code, err, "SIGTERM received", "--resume")
    assert "sft_tag" in torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)["results"]
    code, stdout, err = run_child("none", [*TINY, "--stage2_iters", "0", "--out_dir", str(out), "--resume"])
    assert code == 0 and "evaluating" not in stdout and (out / "results.json").exists(), err


def test_an_experiment_stopped_inside_a_save_ckpt_write_finishes_it_and_exits_130(tmp_path):
    """The same for experiment.py --save_ckpt: the arm's checkpoint is written whole, then the run stops."""
    out = tmp_path / "exp"
    flags = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_train", "300",
             "--n_val", "20", "--n_test", "4", "--warmup_iters", "1", "--dtype", "float32", "--device", "cpu",
             "--seeds", "1", "--e1", "3", "--e2", "2", "--arms", "sft_tag,sftkey_tag", "--n_boot", "10",
             "--save_ckpt", "--out_dir", str(out)]
    code, _, err = run_child("save:1@experiment", flags, signal.SIGINT)
    assert_stopped(code, err, "SIGINT received", "the arms finished so far are in --out_dir")
    assert torch.load(out / "seed1337" / "sft_tag" / "ckpt.pt", weights_only=True)["step"] == 3


def test_sigint_while_the_data_loads_is_one_line_and_exit_130(tmp_path):
    """Item 10: SIGINT while the data loaded used to print a KeyboardInterrupt traceback."""
    out = tmp_path / "out"
    code, _, err = run_child("load", [*TINY, "--out_dir", str(out)], signal.SIGINT)
    last = assert_stopped(code, err, f"SIGINT {LOST}")
    assert err.strip() == last  # the one line on stderr
    assert not out.exists()


def test_sighup_stops_a_run_as_sigterm_does(tmp_path):
    """Item 9: a closed terminal or ssh session (SIGHUP) used to kill the run with nothing written.
    Now it finishes the step in flight, checkpoints it and exits 130, as SIGTERM does."""
    out = tmp_path / "out"
    code, _, err = run_child("batch:3", [*TINY, "--out_dir", str(out)], signal.SIGHUP)
    assert_stopped(code, err, "sft_tag stopped by signal after step 4 of 12")
    assert "SIGHUP received: stopping once the step or write in flight is saved" in err
    assert torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)["step"] == 4


# ---------------------------------------------------------------------------------------------
# StopSignal itself, in this process

def test_stop_signal_raises_at_once_outside_deferred_and_only_after_it_inside(tmp_path):
    """Outside deferred() a signal raises Interrupted at once; inside, any number of them only set
    the flag (the loop's after_step honours it) and leaving the block raises; the handlers found
    (SIGHUP's too) are back afterwards."""
    found = {sig: signal.getsignal(sig) for sig in runtime.STOP_SIGNALS}
    assert signal.SIGHUP in found
    with runtime.StopSignal():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler's Interrupted, long before the end
            raise AssertionError("SIGTERM outside deferred() did not stop at once")
        except runtime.Interrupted as err:
            assert f"SIGTERM {LOST}" in str(err)
    with runtime.StopSignal() as stop:
        try:
            with stop.deferred():
                for sig in (signal.SIGINT, signal.SIGINT, signal.SIGHUP):
                    os.kill(os.getpid(), sig)
                    time.sleep(0.01)
                assert stop.received and stop.name == "SIGINT"  # still here: the step in flight goes on
            raise AssertionError("leaving deferred() with a signal received did not stop the run")
        except runtime.Interrupted as err:
            assert "SIGINT received: the run ends here" in str(err)
    assert {sig: signal.getsignal(sig) for sig in runtime.STOP_SIGNALS} == found


class TwoRanks(runtime.Dist):
    """Rank 0 of two, the other rank's flags given: all_reduce combines the two as torch.distributed would."""

    def __init__(self, other: list[float]):
        super().__init__(rank=0, world=2)
        self.other = other

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        other = torch.tensor(self.other, dtype=value.dtype)
        return {"sum": value + other, "max": torch.maximum(value, other), "min": torch.minimum(value, other)}[op]


def test_a_signal_that_reached_one_rank_stops_every_rank():
    """`Dist.any`: a flag true on any rank is true on all (a signal sent to one rank's process stops the whole job
    after the step in flight, every rank checkpointing together), false only where every rank has it false."""
    assert TwoRanks([0.0, 1.0]).any(True, False) == [True, True]
    assert TwoRanks([1.0, 0.0]).any(False, False) == [True, False]
    assert TwoRanks([0.0, 0.0]).any(False, False) == [False, False]
    assert TwoRanks([1.0, 1.0]).any(True, True) == [True, True]


def test_a_signal_while_the_handlers_go_back_still_ends_the_run_with_interrupted(monkeypatch):
    """A SIGTERM that lands as a finished run puts its handlers back is held until they are back, then raised: the
    command exits 130, not 0. With an error already on its way out, that error goes on instead."""
    def restore_hit_by_sigterm(stop):
        original = stop._restore

        def restore():
            os.kill(os.getpid(), signal.SIGTERM)  # our handler is still in place: held (deferred)
            original()
        monkeypatch.setattr(stop, "_restore", restore)
    found = {sig: signal.getsignal(sig) for sig in runtime.STOP_SIGNALS}
    try:
        with runtime.StopSignal() as stop:
            restore_hit_by_sigterm(stop)
        raise AssertionError("a SIGTERM while the handlers went back was lost")
    except runtime.Interrupted as err:
        assert "SIGTERM received" in str(err)
    assert {sig: signal.getsignal(sig) for sig in runtime.STOP_SIGNALS} == found
    try:
        with runtime.StopSignal() as stop:
            restore_hit_by_sigterm(stop)
            raise KeyError("the run's own error")
    except KeyError as err:
        assert "the run's own error" in str(err)
    assert {sig: signal.getsignal(sig) for sig in runtime.STOP_SIGNALS} == found
